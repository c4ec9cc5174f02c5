"""Preference data for DPO: records -> (prompt turns, chosen reply, rejected reply) -> token ids -> batches.

Formats (auto-detected per record):
- strings: `prompt`, `chosen`, `rejected`, optional `system` and `history` ([user, assistant] pairs), the
  layout of shared/data/dpo/dpo_zh.jsonl;
- messages: `chosen` and `rejected` as OpenAI message lists that share every turn but the last assistant
  reply (multi-turn), optionally after a `prompt` (a string or a message list) and `system`;
- sharegpt: `conversations` (`from`/`value` turns ending with the user) plus `chosen` and `rejected`, each
  a `{"from": "gpt", "value": ...}` turn or a string.

Each side is rendered by the SFT renderer (`chat.render_with_labels`), so the ids are exactly the chat
template's; only the final assistant reply (up to and including its end-of-turn token) carries loss.
`max_prompt_len` drops whole earliest user/assistant pairs of the prompt (the system prompt stays) until the
prompt fits, and so does `max_len` for the longer side; a pair that cannot fit is skipped ("too long"), as
is every pair with overflow="skip" that would need truncation. Malformed records and pairs whose chosen and
rejected replies are equal are skipped and counted with file:line in a `ReadStats` (strict: the first one is
an error). An optional numeric `margin` field (any format; reward models: how much better chosen is) rides along
on the encoded pair (`Pair.margin`) and in batches as `margin` (NaN where a pair has none).
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..corpus.read_stats import ReadStats
from ..errors import ZhllmError
from .chat import IGNORE, BadRecord, Message, check_conversation, normalize_record, render_with_labels

FORMATS = ("auto", "strings", "messages", "sharegpt")
Side = tuple[list[int], list[int]]  # (input_ids, labels) of prompt + one reply


@dataclass
class PreferenceRecord:
    prompt: list[Message]  # system?, then user/assistant turns ending with the user
    chosen: str
    rejected: str
    margin: float | None = None  # the record's optional `margin` (reward-model training)


class Pair(tuple):
    """An encoded pair, ((chosen ids, labels), (rejected ids, labels)), that also carries its record's margin."""
    margin: float | None = None


def detect_format(data: dict) -> str:
    if "conversations" in data:
        return "sharegpt"
    if isinstance(data.get("chosen"), list):
        return "messages"
    if "prompt" in data and "chosen" in data:
        return "strings"
    raise BadRecord("unknown format")


def parse_record(data: Any, fmt: str = "auto") -> PreferenceRecord:
    """One record as prompt turns and the two replies; raises BadRecord with the reason."""
    if not isinstance(data, dict):
        raise BadRecord("not an object")
    fmt = detect_format(data) if fmt == "auto" else fmt
    if "chosen" not in data or "rejected" not in data:
        raise BadRecord("missing field")
    if fmt == "strings":
        prompt = normalize_record({k: data[k] for k in ("system", "history", "prompt") if k in data}
                                  | {"response": ""}, "prompt_response")[:-1]
        chosen, rejected = _reply(data["chosen"]), _reply(data["rejected"])
    elif fmt == "sharegpt":
        prompt = normalize_record({"conversations": data["conversations"], "system": data.get("system")}, "sharegpt")
        chosen, rejected = _reply(data["chosen"]), _reply(data["rejected"])
    elif fmt == "messages":
        prompt, chosen, rejected = _from_message_lists(data)
    else:
        raise ZhllmError(f"unknown preference format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if chosen.strip() == rejected.strip():
        raise BadRecord("chosen equals rejected")
    # validate the turn order once with the chosen reply in place; both sides share the prompt
    msgs = check_conversation(prompt + [{"role": "assistant", "content": chosen}])
    check_conversation(prompt + [{"role": "assistant", "content": rejected}])
    return PreferenceRecord(msgs[:-1], chosen, rejected, _margin(data.get("margin")))


def _margin(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value):
        raise BadRecord("margin is not a finite number")
    return float(value)


def _reply(value: Any) -> str:
    """A reply given as a string, a ShareGPT turn or an OpenAI message."""
    if isinstance(value, dict):
        role = value.get("role", value.get("from", "assistant"))
        value = value.get("content", value.get("value"))
        if str(role).lower() not in ("assistant", "gpt", "bot", "model", "chatgpt"):
            raise BadRecord("reply is not an assistant turn")
    if value is None:
        raise BadRecord("missing field")
    if not isinstance(value, str):
        raise BadRecord("field is not text")
    return value


def _from_message_lists(data: dict) -> tuple[list[Message], str, str]:
    head: list[Message] = []
    if isinstance(data.get("system"), str) and data["system"].strip():
        head.append({"role": "system", "content": data["system"]})
    prompt = data.get("prompt")
    if isinstance(prompt, str):
        head.append({"role": "user", "content": prompt})
    elif isinstance(prompt, list):
        head += normalize_record({"messages": prompt}, "messages")
    elif prompt is not None:
        raise BadRecord("prompt is not text or a message list")
    sides = []
    for key in ("chosen", "rejected"):
        turns = data[key]
        if not isinstance(turns, list) or not turns:
            raise BadRecord(f"{key} is not a message list")
        msgs = normalize_record({"messages": turns}, "messages")
        if msgs[-1]["role"] != "assistant":
            raise BadRecord(f"{key} does not end with an assistant reply")
        sides.append(msgs)
    if sides[0][:-1] != sides[1][:-1]:
        raise BadRecord("chosen and rejected do not share their prompt turns")
    return head + sides[0][:-1], sides[0][-1]["content"], sides[1][-1]["content"]


# ---------------------------------------------------------------- records -> token ids

def encode_side(tokenizer, prompt: list[Message], reply: str) -> tuple[list[int], list[int], int]:
    """(input_ids, labels on the final reply only, prompt length in tokens) as the chat template renders it."""
    ids, labels = render_with_labels(tokenizer, prompt + [{"role": "assistant", "content": reply}])
    # the last run of labelled tokens is the final reply; earlier assistant turns are prompt here
    end = max(i for i, t in enumerate(labels) if t != IGNORE) + 1
    start = end
    while start > 0 and labels[start - 1] != IGNORE:
        start -= 1
    return ids, [IGNORE] * start + labels[start:], start


def encode_pair(tokenizer, record: PreferenceRecord, max_len: int | None = None, max_prompt_len: int | None = None,
                overflow: str = "truncate") -> tuple[Side, Side, int]:
    """((chosen ids, labels), (rejected ids, labels), earlier user/assistant pairs dropped)."""
    if overflow not in ("truncate", "skip"):
        raise ZhllmError(f"overflow must be 'truncate' or 'skip', not {overflow!r}")
    prompt = list(record.prompt)
    first = 1 if prompt and prompt[0]["role"] == "system" else 0
    dropped = 0
    while True:
        c_ids, c_labels, prompt_len = encode_side(tokenizer, prompt, record.chosen)
        r_ids, r_labels, _ = encode_side(tokenizer, prompt, record.rejected)
        fits = ((max_prompt_len is None or prompt_len <= max_prompt_len)
                and (max_len is None or max(len(c_ids), len(r_ids)) <= max_len))
        if fits:
            return (c_ids, c_labels), (r_ids, r_labels), dropped
        if overflow == "skip" or len(prompt) - first <= 1:
            raise BadRecord("too long")
        prompt = prompt[:first] + prompt[first + 2:]
        dropped += 1


@dataclass
class PreferenceStats:
    records: int = 0
    pairs: int = 0
    truncated: int = 0
    formats: Counter = field(default_factory=Counter)
    bad: ReadStats = field(default_factory=ReadStats)  # skipped records by reason, file:line examples

    def summary(self) -> str:
        lines = [f"records {self.records}, pairs {self.pairs}, formats {dict(self.formats)}"]
        if self.truncated:
            lines.append(f"truncated (earlier turns dropped): {self.truncated}")
        if self.bad.bad:
            lines += [f"skipped {n} ({reason})" for reason, n in self.bad.bad.most_common()]
            lines += [f"  e.g. {e}" for e in self.bad.examples]
        return "\n".join(lines)


def _where(record: Any, index: int) -> tuple[Any, str]:
    if hasattr(record, "data"):
        return record.data, record.where
    return record, f"record {index + 1}"


def iter_preference_records(records: Iterable[Any], fmt: str = "auto", strict: bool = False,
                            stats: PreferenceStats | None = None) -> Iterator[tuple[PreferenceRecord, str]]:
    """(record, "file:line") per good record; bad ones are counted in stats.bad and skipped."""
    if fmt not in FORMATS:
        raise ZhllmError(f"unknown preference format {fmt!r}; choose one of {', '.join(FORMATS)}")
    stats = stats if stats is not None else PreferenceStats()
    for i, raw in enumerate(records):
        data, where = _where(raw, i)
        stats.records += 1
        try:
            rec = parse_record(data, fmt)
        except BadRecord as e:
            stats.bad.add_bad(where, str(e), strict=strict)
            continue
        stats.formats[detect_format(data) if fmt == "auto" else fmt] += 1
        yield rec, where


def encode_preference_records(tokenizer, records: Iterable[Any], fmt: str = "auto", max_len: int | None = None,
                              max_prompt_len: int | None = None, overflow: str = "truncate", strict: bool = False,
                              stats: PreferenceStats | None = None) -> list[tuple[Side, Side]]:
    """All good pairs as ((chosen ids, labels), (rejected ids, labels)), in input order."""
    stats = stats if stats is not None else PreferenceStats()
    out = []
    for rec, where in iter_preference_records(records, fmt, strict, stats):
        try:
            chosen, rejected, dropped = encode_pair(tokenizer, rec, max_len, max_prompt_len, overflow)
        except BadRecord as e:  # a length policy, not bad data: never fatal under strict
            stats.bad.add_bad(where, str(e))
            continue
        stats.pairs += 1
        stats.truncated += dropped > 0
        pair = Pair((chosen, rejected))
        pair.margin = rec.margin
        out.append(pair)
    return out


def load_preference_pairs(tokenizer, inputs, fmt: str = "auto", max_len: int | None = None,
                          max_prompt_len: int | None = None, overflow: str = "truncate",
                          strict: bool = False) -> tuple[list[tuple[Side, Side]], PreferenceStats]:
    """Files (json, jsonl, parquet; directories, globs) -> encoded pairs and their accounting."""
    from ..corpus.readers import expand_inputs, iter_records
    from .chat import tokenizers_single_threaded

    stats = PreferenceStats()
    records = iter_records(expand_inputs(inputs), strict=strict, stats=stats.bad)
    with tokenizers_single_threaded():
        pairs = encode_preference_records(tokenizer, records, fmt, max_len, max_prompt_len, overflow, strict, stats)
    return pairs, stats


# ---------------------------------------------------------------- pairs -> batches

class PreferenceDataset:
    """Pairs in a seeded order per epoch (a pure function of seed, epoch and position, as SFTDataset).

    `batch(start, count)` gives pairs start..start+count-1 as 2*count right-padded rows, the chosen replies
    first and the rejected ones after, so one forward pass covers both (`attention_mask` marks real tokens).
    `ref_logps` (n, 2), once set, rides along as the batch's `ref_logps` (2*count,) in the same row order.
    """

    def __init__(self, pairs: list[tuple[Side, Side]], seed: int = 0, pad_id: int = 0):
        if not pairs:
            raise ZhllmError("no preference pairs to train on (all records were skipped or the input is empty)")
        self.pairs, self.seed, self.pad_id = pairs, seed, pad_id
        self.ref_logps: np.ndarray | None = None
        self._order_cache: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.pairs)

    def order(self, epoch: int) -> np.ndarray:
        if self._order_cache is None or self._order_cache[0] != epoch:
            self._order_cache = (epoch, np.random.default_rng([self.seed, epoch]).permutation(len(self.pairs)))
        return self._order_cache[1]

    def pair_indices(self, start: int, count: int) -> list[int]:
        n = len(self.pairs)
        return [int(self.order(pos // n)[pos % n]) for pos in range(start, start + count)]

    def batch(self, start: int, count: int) -> dict[str, torch.Tensor]:
        return self.collate(self.pair_indices(start, count))

    def collate(self, indices: list[int]) -> dict[str, torch.Tensor]:
        rows = [self.pairs[i][0] for i in indices] + [self.pairs[i][1] for i in indices]
        width = max(len(ids) for ids, _ in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, (x, y) in enumerate(rows):
            ids[r, :len(x)], labels[r, :len(y)], mask[r, :len(x)] = torch.tensor(x), torch.tensor(y), 1
        out = {"input_ids": ids, "labels": labels, "attention_mask": mask}
        if self.ref_logps is not None:
            ref = self.ref_logps[indices]
            out["ref_logps"] = torch.from_numpy(np.concatenate([ref[:, 0], ref[:, 1]]))
        margins = [getattr(self.pairs[i], "margin", None) for i in indices]
        if any(m is not None for m in margins):
            out["margin"] = torch.tensor([float("nan") if m is None else m for m in margins], dtype=torch.float32)
        return out
