"""Scoring with a reward model: `RewardScorer` (conversations -> scores, batched) for `zhllm rm score` and for
GRPO's `{type: model}` reward, and `score_file` behind `zhllm rm score`.

A conversation is rendered exactly as the reward model was trained on it (data/chat.py's renderer, the
chat template with the final assistant reply), right-padded, and scored at its last token. A row longer than
`max_len` keeps its end: the reply the score is about.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from ..corpus.read_stats import ReadStats
from ..data.chat import BadRecord, Message, check_conversation, normalize_record, render_with_labels
from ..data.preference import parse_record
from ..errors import ZhllmError
from ..fsutil import atomic_write_text


class RewardScorer:
    """A reward model and its tokenizer, loaded once; `score(conversations)` -> one float each."""

    def __init__(self, model_dir: str | Path, batch_size: int = 16, max_len: int | None = None):
        from ..model.reward import is_reward_model_dir, load_reward_model
        from ..tokenizer.load import load_tokenizer
        if not is_reward_model_dir(model_dir):
            raise ZhllmError(f"{model_dir}: not a reward model (its config.json names no *ForSequenceClassification "
                             "architecture; train one with `zhllm rm`)")
        self.model = load_reward_model(model_dir).eval()
        self.tokenizer = load_tokenizer(model_dir)
        self.batch_size = batch_size
        self.max_len = max_len or self.model.config.max_seq_len
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

    def encode(self, messages: list[Message]) -> list[int]:
        ids, _ = render_with_labels(self.tokenizer, check_conversation(messages))
        return ids[-self.max_len:]

    @torch.inference_mode()
    def score_ids(self, rows: Sequence[list[int]], progress: bool = False) -> list[float]:
        from tqdm import tqdm
        out: list[float] = []
        starts = range(0, len(rows), self.batch_size)
        for start in tqdm(starts, disable=not progress, desc="rm score", unit="batch"):
            chunk = rows[start:start + self.batch_size]
            width = max(len(r) for r in chunk)
            ids = torch.full((len(chunk), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for i, r in enumerate(chunk):
                ids[i, :len(r)], mask[i, :len(r)] = torch.tensor(r), 1
            out += self.model(ids, attention_mask=mask).tolist()
        return out

    def score(self, conversations: Sequence[list[Message]]) -> list[float]:
        return self.score_ids([self.encode(m) for m in conversations])


@dataclass
class ScoreStats:
    records: int = 0
    pairs: int = 0
    chosen_wins: int = 0
    bad: ReadStats = field(default_factory=ReadStats)

    def __str__(self) -> str:
        lines = [f"scored {self.records} records" + (f", {self.pairs} of them preference pairs: chosen scored "
                                                     f"higher in {self.chosen_wins} "
                                                     f"({self.chosen_wins / self.pairs:.1%})"
                                                     if self.pairs else "")]
        if self.bad.bad_total:
            lines.append(f"skipped {self.bad.bad_total} bad records: "
                         + ", ".join(f"{k} {v}" for k, v in sorted(self.bad.bad.items()))
                         + (f" (first: {self.bad.examples[0]})" if self.bad.examples else ""))
        return "\n".join(lines)


def _conversations(data: Any) -> tuple[str, list[list[Message]]]:
    """("pair", [chosen conversation, rejected conversation]) or ("single", [conversation])."""
    if isinstance(data, dict) and "chosen" in data and "rejected" in data:
        rec = parse_record(data)
        return "pair", [rec.prompt + [{"role": "assistant", "content": rec.chosen}],
                        rec.prompt + [{"role": "assistant", "content": rec.rejected}]]
    messages = normalize_record(data)
    if not messages or messages[-1]["role"] != "assistant":
        raise BadRecord("no assistant reply to score")
    return "single", [messages]


def score_file(model_dir: str | Path, inputs: Sequence[str], out: str | Path, batch_size: int = 16,
               max_len: int | None = None, strict: bool = False, progress: bool = True) -> ScoreStats:
    """Score every record of `inputs` and write them with their scores to `out` (JSONL, atomically)."""
    from ..corpus.readers import iter_records
    out = Path(out)
    if out.is_dir():
        raise ZhllmError(f"--out {out} is a directory; name a .jsonl file")
    scorer = RewardScorer(model_dir, batch_size=batch_size, max_len=max_len)
    stats = ScoreStats()
    kept: list[tuple[dict, str]] = []
    rows: list[list[int]] = []
    for rec in iter_records(inputs, strict=strict, stats=stats.bad):
        try:
            kind, conversations = _conversations(rec.data)
            encoded = [scorer.encode(m) for m in conversations]
        except BadRecord as e:
            stats.bad.add_bad(rec.where, str(e), strict=strict)
            continue
        kept.append((rec.data, kind))
        rows += encoded
    if not kept:
        raise ZhllmError(f"{list(inputs)}: no record to score ({stats.bad.why_empty()})")
    scores = iter(scorer.score_ids(rows, progress=progress))
    lines = []
    for data, kind in kept:
        stats.records += 1
        if kind == "pair":
            c, r = next(scores), next(scores)
            stats.pairs += 1
            stats.chosen_wins += c > r
            data = {**data, "chosen_score": c, "rejected_score": r}
        else:
            data = {**data, "score": next(scores)}
        lines.append(json.dumps(data, ensure_ascii=False) + "\n")
    atomic_write_text(out, "".join(lines))
    return stats
