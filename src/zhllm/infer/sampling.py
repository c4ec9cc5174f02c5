"""Choosing the next token from logits: greedy, temperature, top-k, top-p, repetition penalty.

The semantics follow `transformers`' logits processors (so settings mean the same thing in both), applied
in the same order: repetition penalty, temperature, top-k, top-p, then sampling.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import ZhllmError


@dataclass
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    repetition_penalty: float = 1.0  # 1 = off; >1 discourages tokens already in the prompt or output
    seed: int | None = None

    def __post_init__(self):
        checks = [
            (self.max_new_tokens >= 1, f"max_new_tokens must be >= 1, got {self.max_new_tokens}"),
            (self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}"),
            (self.top_k >= 0, f"top_k must be >= 0, got {self.top_k}"),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
            (self.repetition_penalty > 0, f"repetition_penalty must be > 0, got {self.repetition_penalty}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ZhllmError(message)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL-style penalty on tokens in `seen` (B, V) bool: positive logits divided, negative multiplied."""
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def filter_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def filter_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches `p` (at least one token)."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = sorted_logits.softmax(-1)
    # A token is dropped when the tokens ranked above it already reach p.
    drop_sorted = (probs.cumsum(-1) - probs) >= p
    drop_sorted[..., 0] = False
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def draw(probs: torch.Tensor, generator: torch.Generator | None,
         rows: tuple[int, torch.Tensor] | None = None) -> torch.Tensor:
    """One token per row of (B, V) probabilities, by inverting each row's CDF at a uniform draw: exact, and
    several times faster than torch.multinomial on a CPU (whose exponential draws cost one per vocabulary entry
    and row). A zero-probability token (filtered by top-k/top-p) is never chosen: its CDF step is empty.

    rows = (batch, indices): these B rows are those indices of a batch whose finished rows have left; the
    uniforms are drawn for the whole batch, so a row samples the same tokens however early the others finish."""
    cdf = probs.cumsum(-1)
    n = rows[0] if rows is not None else probs.shape[0]
    u = torch.rand(n, 1, generator=generator, device=probs.device, dtype=cdf.dtype)
    u = (u[rows[1]] if rows is not None else u) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).clamp_(max=probs.shape[-1] - 1)[:, 0]


def sample_next(logits: torch.Tensor, params: SamplingParams, seen: torch.Tensor | None,
                generator: torch.Generator | None, with_logprobs: bool = False,
                rows: tuple[int, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(B, V) logits of the last position -> ((B,) chosen token ids, (B,) their log-probs or None); `rows`: as
    `draw`'s, when these are the rows left of a larger batch.

    The log-prob is that of the distribution the token was drawn from (after repetition penalty, temperature,
    top-k and top-p); a greedy choice reports the model's own log-prob (temperature 1, after the penalty).
    """
    logits = logits.float()
    if params.repetition_penalty != 1.0 and seen is not None:
        logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if params.greedy:
        tokens = logits.argmax(-1)
    else:
        logits = filter_top_p(filter_top_k(logits / params.temperature, params.top_k), params.top_p)
        tokens = draw(logits.softmax(-1), generator, rows)
    if not with_logprobs:
        return tokens, None
    return tokens, logits.gather(1, tokens[:, None])[:, 0] - logits.logsumexp(-1)
