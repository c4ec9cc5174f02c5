"""Terminal front ends: `zhllm chat` (multi-turn, streaming) and `zhllm generate` (one prompt).

When stdin is not a terminal, `chat` reads one user message per line and prints each answer followed by a
newline, with no banner or prompts, so it can be scripted (`printf '你好\\n再见\\n' | zhllm chat DIR`).
"""
from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import TextIO

from ..errors import ZhllmError
from .generate import load_for_inference, stream_generate
from .prompts import encode_messages

COMMANDS_HELP = "/reset clears the conversation, /exit (or Ctrl-D) quits"


class ChatSession:
    """The conversation so far; `reply` streams the assistant's answer and records it."""

    def __init__(self, model, tokenizer, system: str | None = None, **sampling):
        self.model, self.tokenizer, self.system, self.sampling = model, tokenizer, system, sampling
        self.history: list[dict] = []

    def reset(self) -> None:
        self.history = []

    def _messages(self, turns: list[dict]) -> list[dict]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + turns

    def _fit(self, turns: list[dict]) -> list[dict]:
        """Drop the oldest exchanges until the prompt leaves room for an answer in the context."""
        ctx = self.model.config.max_seq_len
        budget = ctx - min(self.sampling.get("max_new_tokens", 256), ctx // 2)
        while len(encode_messages(self.tokenizer, self._messages(turns))) > budget:
            if len(turns) <= 1:
                raise ZhllmError(f"this message is too long for the model's {ctx}-token context")
            turns = turns[2:]  # one user message and its answer
        return turns

    def reply(self, user_text: str) -> Iterator[str]:
        turns = self._fit(self.history + [{"role": "user", "content": user_text}])
        answer = []
        for piece in stream_generate(self.model, self.tokenizer, self._messages(turns), **self.sampling):
            answer.append(piece)
            yield piece
        self.history = turns + [{"role": "assistant", "content": "".join(answer)}]


def chat(model_dir: str, system: str | None = None, device: str = "auto", dtype: str = "auto",
         quantize: str = "none", stdin: TextIO | None = None, stdout: TextIO | None = None, **sampling) -> int:
    """Run a chat on a terminal (or over piped lines). Returns the exit code."""
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    model, tokenizer = load_for_inference(model_dir, device=device, dtype=dtype, quantize=quantize)
    session = ChatSession(model, tokenizer, system, **sampling)
    interactive = stdin.isatty()
    if interactive:
        print(f"zhllm chat with {model_dir}: {COMMANDS_HELP}", file=stdout)
    failed = False
    while True:
        if interactive:
            stdout.write("\n你> ")
            stdout.flush()
        line = stdin.readline()
        if not line:  # EOF
            break
        text = line.rstrip("\r\n")
        command = text.strip()
        if not command:
            continue
        if command == "/exit":
            break
        if command == "/reset":
            session.reset()
            if interactive:
                print("(conversation cleared)", file=stdout)
            continue
        if interactive:
            stdout.write("助手> ")
        try:
            for piece in session.reply(text):
                stdout.write(piece)
                stdout.flush()
        except ZhllmError as e:  # one bad message should not end the conversation
            print(f"zhllm: error: {e}", file=sys.stderr)
            failed = True
        stdout.write("\n")
        stdout.flush()
    return 1 if failed and not interactive else 0


def print_generation(model_dir: str, prompt: str, device: str = "auto", dtype: str = "auto",
                     quantize: str = "none", chat_template: bool = False, stdout: TextIO | None = None, **sampling) -> int:
    """`zhllm generate`: stream the continuation of `prompt` (or, with chat_template, the answer to it)."""
    stdout = stdout or sys.stdout
    model, tokenizer = load_for_inference(model_dir, device=device, dtype=dtype, quantize=quantize)
    prompt_or_messages = [{"role": "user", "content": prompt}] if chat_template else prompt
    for piece in stream_generate(model, tokenizer, prompt_or_messages, **sampling):
        stdout.write(piece)
        stdout.flush()
    stdout.write("\n")
    return 0
