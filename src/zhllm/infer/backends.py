"""How one generation call runs the model: its KV cache, its prefill and its one-token steps.

The engine picks one of three per model (`decode_session`):
- `FusedSession`: a plain zhllm Transformer (`decoder.can_fuse`): prefill through `Transformer.hidden_states`,
  then the fused decode step of `infer/decoder.py` on the same KV cache. The fast path.
- `CachedSession`: any other zhllm Transformer (LoRA layers injected by peft, an FSDP-sharded model): the
  model's own forward with a KV cache, so LoRA deltas are applied and FSDP's hooks gather the shards.
- `UncachedSession`: any other causal LM taking `input_ids`, `attention_mask`, `position_ids` (a transformers
  model): the full forward every step, slow but correct.
Rows are left-padded: `key_mask` (B, capacity) is True on every real prompt token and every generated one.
`keep(rows)` drops the other rows (finished ones) from a session, so they cost nothing in later steps.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from ..model.transformer import KVCache, Transformer
from .decoder import FusedDecoderCache, can_fuse


def unwrap(model: nn.Module) -> nn.Module:
    """The module that computes: through DDP, torch.compile and peft's PeftModel (whose LoRA layers stay
    injected in the base model, so the base model's forward applies them)."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif type(model).__name__ == "OptimizedModule" and isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        elif hasattr(model, "peft_config") and callable(getattr(model, "get_base_model", None)):
            model = model.get_base_model()
        else:
            return model


def eager():
    """Layers compiled for training would recompile for every new cache shape: run them eagerly here."""
    set_stance = getattr(torch.compiler, "set_stance", None)  # torch >= 2.6
    return set_stance("force_eager") if set_stance is not None else contextlib.nullcontext()


class FusedSession:
    def __init__(self, model: Transformer, decoder_cache: FusedDecoderCache, key_mask: torch.Tensor | None,
                 lens: list[int], capacity: int):
        self.model, self.key_mask = model, key_mask
        weight = model.model.embed_tokens.weight
        self.cache = KVCache.empty(model.config, len(lens), capacity, weight.dtype, weight.device)
        self.decoder = decoder_cache.get(model)
        self.positions = torch.tensor(lens, dtype=torch.long, device=weight.device)
        self.step_mask = key_mask[:, None, None, :] if key_mask is not None else None

    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        mask = self.key_mask[:, :ids.shape[1]] if self.key_mask is not None else None
        with eager():
            hidden = self.model.hidden_states(ids, attention_mask=mask, cache=self.cache)
        return self.model.lm_head(hidden[:, -1])

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        mask = self.step_mask[..., :self.cache.length + 1] if self.step_mask is not None else None
        logits = self.decoder.step(tokens, self.positions, self.cache, mask)
        self.positions += 1
        return logits

    def keep(self, rows: torch.Tensor) -> None:
        self.cache, self.positions = self.cache.select(rows), self.positions[rows]
        if self.key_mask is not None:
            self.key_mask = self.key_mask[rows]
            self.step_mask = self.key_mask[:, None, None, :]


class CachedSession:
    def __init__(self, model: Transformer, key_mask: torch.Tensor | None, lens: list[int], capacity: int):
        self.model, self.key_mask, self.batch, self.capacity = model, key_mask, len(lens), capacity
        self.cache: KVCache | None = None

    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        with eager():
            # The cache must hold keys in the dtype the forward computes in, which FSDP's mixed precision
            # or an autocast context may make differ from the weights': one token's forward tells.
            dtype = self.model(ids[:1, :1]).dtype
            self.cache = KVCache.empty(self.model.config, self.batch, self.capacity, dtype, ids.device)
            mask = self.key_mask[:, :ids.shape[1]] if self.key_mask is not None else None
            logits = self.model(ids, attention_mask=mask, cache=self.cache)[:, -1]
        # FSDP's mixed precision casts forward inputs and hands the model a copy of the cache dataclass (same
        # tensors), so the forward's length count lands on the copy: the session keeps the count itself.
        self.cache.length = ids.shape[1]
        return logits

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        n = self.cache.length
        mask = self.key_mask[:, :n + 1] if self.key_mask is not None else None
        with eager():
            logits = self.model(tokens[:, None], attention_mask=mask, cache=self.cache)[:, -1]
        self.cache.length = n + 1
        return logits

    def keep(self, rows: torch.Tensor) -> None:
        self.cache, self.batch = self.cache.select(rows), len(rows)
        if self.key_mask is not None:
            self.key_mask = self.key_mask[rows]


class UncachedSession:
    def __init__(self, model: nn.Module, key_mask: torch.Tensor | None, lens: list[int], capacity: int):
        self.model, self.key_mask = model, key_mask
        self.ids: torch.Tensor | None = None

    def _logits(self) -> torch.Tensor:
        n = self.ids.shape[1]
        mask = self.key_mask[:, :n] if self.key_mask is not None else torch.ones_like(self.ids, dtype=torch.bool)
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
        with eager():
            out = self.model(input_ids=self.ids, attention_mask=mask.long(), position_ids=positions)
        return getattr(out, "logits", out)[:, -1]

    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        self.ids = ids
        return self._logits()

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        self.ids = torch.cat([self.ids, tokens[:, None]], dim=1)
        return self._logits()

    def keep(self, rows: torch.Tensor) -> None:
        self.ids = self.ids[rows]
        if self.key_mask is not None:
            self.key_mask = self.key_mask[rows]


def decode_session(model: nn.Module, fused: FusedDecoderCache | None, key_mask: torch.Tensor | None,
                   lens: list[int], capacity: int):
    """The session for one call; `fused` is the engine's cache when the model qualifies for the fused step."""
    if fused is not None:
        return FusedSession(model, fused, key_mask, lens, capacity)
    if isinstance(model, Transformer):
        return CachedSession(model, key_mask, lens, capacity)
    return UncachedSession(model, key_mask, lens, capacity)


def sequence_logits(model: nn.Module, ids: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Logits (M, V) at positions (rows[m], cols[m]) of right-padded `ids` (B, T): a causal model's earlier
    positions never see the padding after them, so no mask is needed. A plain Transformer runs its head on
    those positions only; other models run their whole forward."""
    with eager():
        if can_fuse(model):
            return model.lm_head(model.hidden_states(ids)[rows, cols])
        out = model(ids) if isinstance(model, Transformer) else model(input_ids=ids)
    return getattr(out, "logits", out)[rows, cols]
