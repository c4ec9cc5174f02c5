"""Terminal front ends: `zhllm chat` (multi-turn, streaming) and `zhllm generate` (one prompt).

When stdin is not a terminal, `chat` reads one user message per line and prints each answer followed by a
newline, with no banner or prompts, and a blank line between answers (an answer may itself span lines), so it
can be scripted (`printf '你好\\n再见\\n' | zhllm chat DIR`).
"""
from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import TextIO

import torch

from ..errors import ZhllmError
from .engine import Engine
from .prompts import encode_messages

COMMANDS_HELP = "/reset clears the conversation, /exit (or Ctrl-D) quits"


class ChatSession:
    """The conversation so far; `reply` streams the assistant's answer and records it."""

    def __init__(self, engine: Engine | torch.nn.Module, tokenizer=None, system: str | None = None, **sampling):
        """`ChatSession(engine, system=...)`, or `ChatSession(model, tokenizer, ...)` for a model."""
        self.engine = engine if isinstance(engine, Engine) else Engine(engine, tokenizer)
        self.tokenizer = self.engine.tokenizer
        self.system, self.sampling = system, sampling
        self.history: list[dict] = []

    def reset(self) -> None:
        self.history = []

    def _messages(self, turns: list[dict]) -> list[dict]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + turns

    def _fit(self, turns: list[dict]) -> list[dict]:
        """Drop the oldest exchanges until the prompt leaves room for an answer in the context."""
        ctx = self.engine.max_seq_len
        budget = ctx - min(self.sampling.get("max_new_tokens", 256), ctx // 2)
        while len(encode_messages(self.tokenizer, self._messages(turns))) > budget:
            if len(turns) <= 1:
                raise ZhllmError(f"this message is too long for the model's {ctx}-token context")
            turns = turns[2:]  # one user message and its answer
        return turns

    def reply(self, user_text: str) -> Iterator[str]:
        turns = self._fit(self.history + [{"role": "user", "content": user_text}])
        answer = []
        for piece in self.engine.stream(self._messages(turns), **self.sampling):
            answer.append(piece)
            yield piece
        self.history = turns + [{"role": "assistant", "content": "".join(answer)}]


def chat(model_dir: str, system: str | None = None, device: str = "auto", dtype: str = "auto",
         quantize: str = "none", stdin: TextIO | None = None, stdout: TextIO | None = None, **sampling) -> int:
    """Run a chat on a terminal (or over piped lines). Returns the exit code."""
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    session = ChatSession(Engine.load(model_dir, device=device, dtype=dtype, quantize=quantize), system=system,
                          **sampling)
    interactive = stdin.isatty()
    if interactive:
        print(f"zhllm chat with {model_dir}: {COMMANDS_HELP}", file=stdout)
    failed, answered = False, False
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
        elif answered:
            stdout.write("\n")  # piped: a blank line between answers, which may span several lines themselves
        answer = ""
        try:
            for piece in session.reply(text):
                answer += piece
                stdout.write(piece)
                stdout.flush()
        except ZhllmError as e:  # one bad message should not end the conversation
            print(f"zhllm: error: {e}", file=sys.stderr)
            failed = True
        if not answer.endswith("\n"):
            stdout.write("\n")
        stdout.flush()
        answered = True
    return 1 if failed and not interactive else 0


def print_generation(model_dir: str, prompt: str, device: str = "auto", dtype: str = "auto",
                     quantize: str = "none", chat_template: bool = False, stdout: TextIO | None = None,
                     **sampling) -> int:
    """`zhllm generate`: stream the continuation of `prompt` (or, with chat_template, the answer to it)."""
    stdout = stdout or sys.stdout
    engine = Engine.load(model_dir, device=device, dtype=dtype, quantize=quantize)
    prompt_or_messages = [{"role": "user", "content": prompt}] if chat_template else prompt
    for piece in engine.stream(prompt_or_messages, **sampling):
        stdout.write(piece)
        stdout.flush()
    stdout.write("\n")
    return 0
