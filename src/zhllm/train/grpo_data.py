"""GRPO's prompts: records -> encoded prompts with their reference answers -> the prompts of each micro-step.

A record (json, jsonl, parquet; files, directories, globs) holds `prompt` (a string, or a list of chat
messages) or `messages` (chat messages; a last assistant turn is dropped and, without `answer`, becomes the
answer), optional `system`, and `answer` (a string or a number) where a reward needs one. With `chat` (the
default) a string prompt is the user's turn rendered with the tokenizer's chat template plus the assistant
header; without it the prompt is plain text for a pretrained model to continue. Bad records are counted and
skipped by reason with file:line (strict: the first is an error), as DPO's and SFT's data are.

`PromptDataset.batch(position, count)` follows the trainer's data positions. With `ppo_epochs` passes per
rollout, optimizer steps s..s+ppo_epochs-1 of one rollout read the same prompts: a position maps to the
position of its rollout's first pass (`source`), which also seeds that rollout's sampling. So what a step
samples is a pure function of (seed, step), and resuming needs no sampler state.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..corpus.read_stats import ReadStats
from ..errors import ZhllmError

Prompt = str | list[dict]


@dataclass
class PromptRecord:
    prompt: Prompt        # what reward functions see: the text or the chat messages
    ids: list[int]        # the encoded prompt the policy continues
    answer: str | None


class BadPrompt(Exception):
    pass


def parse_prompt_record(data: Any, chat: bool) -> tuple[Prompt, str | None]:
    """(prompt, answer) of one record; raises BadPrompt with the reason."""
    if not isinstance(data, dict):
        raise BadPrompt("not an object")
    answer = data.get("answer")
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        answer = str(answer)
    if answer is not None and not isinstance(answer, str):
        raise BadPrompt("answer is not text or a number")
    if "prompt" in data:
        prompt = data["prompt"]
    elif "messages" in data:
        prompt = data["messages"]
    else:
        raise BadPrompt("no prompt or messages field")
    if isinstance(prompt, str):
        if not prompt.strip():
            raise BadPrompt("empty prompt")
        if not chat:
            return prompt, answer
        system = data.get("system")
        if system is not None and not isinstance(system, str):
            raise BadPrompt("system is not text")
        prompt = ([{"role": "system", "content": system}] if system and system.strip() else []) + \
            [{"role": "user", "content": prompt}]
        return prompt, answer
    if not isinstance(prompt, list) or not prompt:
        raise BadPrompt("prompt is not text or a message list")
    if not chat:
        raise BadPrompt("chat messages, but data.chat is false")
    for m in prompt:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise BadPrompt("a message needs a text role and content")
        if m["role"] not in ("system", "user", "assistant"):
            raise BadPrompt(f"unknown role {m['role']!r}")
    messages = [{"role": m["role"], "content": m["content"]} for m in prompt]
    if messages[-1]["role"] == "assistant":
        last = messages.pop()
        answer = answer if answer is not None else last["content"]
    if not messages or messages[-1]["role"] != "user":
        raise BadPrompt("messages do not end with a user turn")
    return messages, answer


def load_prompts(tokenizer, inputs: list[str], rewards, *, chat: bool = True, max_prompt_len: int,
                 strict: bool = False) -> tuple[list[PromptRecord], ReadStats]:
    """Every usable record, in input order, with the skip accounting. `rewards.answer_problem(answer)`
    says why a record's answer cannot be scored (missing where a rule needs it)."""
    from ..corpus.readers import expand_inputs, iter_records
    from ..data.chat import tokenizers_single_threaded
    from ..infer.prompts import encode_prompt

    stats = ReadStats()
    out = []
    with tokenizers_single_threaded():
        for rec in iter_records(expand_inputs(inputs), strict=strict, stats=stats):
            try:
                prompt, answer = parse_prompt_record(rec.data, chat)
                problem = rewards.answer_problem(answer)
                if problem:
                    raise BadPrompt(problem)
                try:
                    ids = encode_prompt(tokenizer, prompt)
                except ZhllmError as e:
                    raise BadPrompt(str(e)) from None
            except BadPrompt as e:
                stats.add_bad(rec.where, str(e), strict=strict)
                continue
            if len(ids) > max_prompt_len:  # a length policy, not bad data: skipped even under strict
                stats.add_bad(rec.where, "prompt too long", f"{len(ids)} > {max_prompt_len} tokens")
                continue
            out.append(PromptRecord(prompt, ids, answer))
    return out, stats


class PromptDataset:
    """Prompts in a seeded order per epoch (a pure function of seed, epoch and position, as the other
    datasets). `prompts_per_step` is batch_size x grad_accum x world: the trainer's positions per step."""

    def __init__(self, records: list[PromptRecord], rewards, *, seed: int, ppo_epochs: int, prompts_per_step: int):
        if not records:
            raise ZhllmError("no prompts to train on (all records were skipped or the input is empty)")
        self.records, self.rewards, self.seed = records, rewards, seed
        self.ppo_epochs, self.prompts_per_step = ppo_epochs, prompts_per_step
        self._order_cache: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.records)

    def order(self, epoch: int) -> np.ndarray:
        if self._order_cache is None or self._order_cache[0] != epoch:
            self._order_cache = (epoch, np.random.default_rng([self.seed, epoch]).permutation(len(self.records)))
        return self._order_cache[1]

    def source(self, position: int) -> tuple[int, int]:
        """(position of this micro-batch in its rollout's first pass, which pass this is)."""
        step, within = divmod(position, self.prompts_per_step)
        rollout, pass_ = divmod(step, self.ppo_epochs)
        return rollout * self.prompts_per_step + within, pass_

    def batch(self, position: int, count: int) -> dict[str, torch.Tensor]:
        """The prompt indices of a micro-batch and its rollout identity; the objective samples and scores."""
        source, pass_ = self.source(position)
        rollout = source // self.prompts_per_step
        n = len(self.records)
        idx = [int(self.order(p // n)[p % n]) for p in range(source, source + count)]
        return {"prompt_index": torch.tensor(idx, dtype=torch.long),
                "rollout": torch.tensor([source, pass_, rollout], dtype=torch.long)}
