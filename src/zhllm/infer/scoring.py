"""Scoring rows that start with the same tokens: the shared prefix runs once, the rows' own suffixes after it.

k-shot evaluation repeats one long prefix (an instruction line and the same k worked examples) before every
item of a subject. `plan_prefixes` groups an engine batch's rows by their longest common token prefix;
`SharedPrefix` prefills such a prefix once into a KV cache and scores batches of right-padded suffixes that
attend to it, with positions continuing after it. Right padding needs no attention mask: a real token
never sees the padding after it.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..model.transformer import KVCache, Transformer
from .backends import eager
from .decoder import can_fuse

# tokens. Sharing CMMLU's 24-token subject line (0-shot) measured even to slightly faster at the 26m preset;
# a shorter prefix saves less than the extra, smaller forwards cost.
MIN_SHARED_PREFIX = 16
_MAX_SPLIT_DEPTH = 64   # nesting of ever longer common prefixes followed when choosing groups


def can_share(model: nn.Module) -> bool:
    """Only zhllm Transformers take a KV cache; any other model scores whole rows."""
    return isinstance(model, Transformer)


def common_length(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def plan_prefixes(rows: Sequence[Sequence[int]], caps: Sequence[int],
                  min_prefix: int) -> tuple[list[tuple[int, list[int]]], list[int]]:
    """Groups (prefix length, row indices) of rows that share at least `min_prefix` leading tokens, and the
    indices of the rows left alone. `caps[i]` bounds row i's prefix (its scored positions must lie after it).

    In lexicographic order rows with a common prefix are adjacent, and a run's common prefix is the smallest
    common length of neighbours in it. A run either shares that prefix as one group or splits where
    neighbours share least, whichever skips more prefix tokens ((rows - 1) * prefix length per group)."""
    order = sorted((i for i in range(len(rows)) if caps[i] >= min_prefix), key=lambda i: tuple(rows[i]))
    lcp = [common_length(rows[order[j]], rows[order[j + 1]]) for j in range(len(order) - 1)]

    def best(lo: int, hi: int, depth: int) -> tuple[int, list[tuple[int, list[int]]]]:
        if hi - lo < 2:
            return 0, []
        least = min(lcp[lo:hi - 1])
        prefix = min(least, min(caps[order[k]] for k in range(lo, hi)))
        whole = (hi - lo - 1) * prefix if prefix >= min_prefix else 0
        split, groups = 0, []
        if depth < _MAX_SPLIT_DEPTH:
            cuts = [j + 1 for j in range(lo, hi - 1) if lcp[j] == least]
            for a, b in zip([lo] + cuts, cuts + [hi]):
                saved, sub = best(a, b, depth + 1)
                split, groups = split + saved, groups + sub
        if whole and whole >= split:
            return whole, [(prefix, order[lo:hi])]
        return split, groups

    groups = best(0, len(order), 0)[1]
    grouped = {i for _, members in groups for i in members}
    return groups, [i for i in range(len(rows)) if i not in grouped]


class SharedPrefix:
    """One prefix's keys/values (batch 1), prefilled once, and the scoring of suffix batches after it.

    A plain Transformer runs `hidden_states` and its head only on the scored positions; a LoRA-injected or
    FSDP-sharded one runs its own forward (which applies the adapter and gathers the shards)."""

    def __init__(self, model: Transformer, prefix: torch.Tensor):
        self.model, self.fused = model, can_fuse(model)
        with eager():
            # The cache holds keys in the dtype the forward computes in (FSDP mixed precision may differ
            # from the weights'), which one token's forward tells.
            dtype = model.model.embed_tokens.weight.dtype if self.fused else model(prefix[None, :1]).dtype
            self.cache = KVCache.empty(model.config, 1, prefix.shape[0], dtype, prefix.device)
            if self.fused:
                model.hidden_states(prefix[None], cache=self.cache)
            else:
                model(prefix[None], cache=self.cache)
        # FSDP's mixed precision casts forward inputs and passes a copy of the cache dataclass (same tensors),
        # so the forward's length count lands on the copy.
        self.cache.length = prefix.shape[0]

    @property
    def length(self) -> int:
        return self.cache.length

    def logits(self, ids: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """Logits (M, V) at positions (rows[m], cols[m]) of right-padded suffixes `ids` (B, T) that follow
        the prefix; cols count from the first suffix token."""
        B, T = ids.shape
        n = self.cache.length
        cache = KVCache.empty(self.model.config, B, n + T, self.cache.k.dtype, ids.device)
        cache.k[:, :, :, :n] = self.cache.k
        cache.v[:, :, :, :n] = self.cache.v
        cache.length = n
        with eager():
            if self.fused:
                return self.model.lm_head(self.model.hidden_states(ids, cache=cache)[rows, cols])
            return self.model(ids, cache=cache)[rows, cols]
