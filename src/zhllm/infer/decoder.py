"""The one-token decode step, with fused weights: the hot loop of generation.

At batch 1 a decode step is a chain of matrix-vector products, and on a CPU the time between them (Python,
op dispatch, small allocations) costs as much as the products. So this step runs on fused copies of the
weights (q/k/v in one matrix, gate/up in one matrix: 33 matmuls per step for 8 layers instead of 57) and
does nothing per layer that it need not do. The checkpoint keeps HF parameter names: the fused copies live
only here, are rebuilt when the model's weights change (a trainer evaluating between steps) and never saved.

Prefill (the prompt) goes through `Transformer.hidden_states`, which writes the same `KVCache`; this step
then continues from `cache.length`. Numerics follow `model/transformer.py` exactly (same RMSNorm casting,
same RoPE tables), so the step reproduces `Transformer.forward` with a cache.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..model.transformer import KVCache, Transformer, rotate_half

_CACHE_ATTR = "_zhllm_fused_decoder"


@dataclass
class FusedLayer:
    input_norm: torch.Tensor
    qkv: torch.Tensor
    qkv_bias: torch.Tensor | None
    o: torch.Tensor
    o_bias: torch.Tensor | None
    post_norm: torch.Tensor
    gate_up: torch.Tensor
    gate_up_bias: torch.Tensor | None
    down: torch.Tensor
    down_bias: torch.Tensor | None


def _cat_or_none(*tensors):
    return None if tensors[0] is None else torch.cat(tensors).contiguous()


class FusedDecoder:
    """Decode one token per row: `step(tokens (B,), positions (B,), cache, key_mask) -> logits (B, V)`."""

    def __init__(self, model: Transformer):
        cfg = model.config
        self.model = model
        self.n_heads, self.n_kv, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.eps = cfg.norm_eps
        with torch.no_grad():
            self.layers = [self._fuse(layer) for layer in model.model.layers]
        self.embed = model.model.embed_tokens.weight
        self.final_norm = model.model.norm.weight
        self.lm_head = model.lm_head.weight

    @staticmethod
    def _fuse(layer) -> FusedLayer:
        a, m = layer.self_attn, layer.mlp
        return FusedLayer(
            input_norm=layer.input_layernorm.weight.detach(),
            qkv=torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]).contiguous(),
            qkv_bias=_cat_or_none(a.q_proj.bias, a.k_proj.bias, a.v_proj.bias),
            o=a.o_proj.weight.detach(), o_bias=None if a.o_proj.bias is None else a.o_proj.bias.detach(),
            post_norm=layer.post_attention_layernorm.weight.detach(),
            gate_up=torch.cat([m.gate_proj.weight, m.up_proj.weight]).contiguous(),
            gate_up_bias=_cat_or_none(m.gate_proj.bias, m.up_proj.bias),
            down=m.down_proj.weight.detach(), down_bias=None if m.down_proj.bias is None else m.down_proj.bias.detach(),
        )

    def _norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        # Same casting as model.transformer.RMSNorm; for fp32 the casts are no-ops.
        return weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)

    def step(self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache,
             key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, V) for one new token per row, appended to `cache` at `cache.length`.

        positions: (B,) RoPE position of each row's token (rows with left padding lag the cache index).
        key_mask: (B, 1, 1, cache.length + 1) bool, True where a row may attend; None when no row is padded.
        """
        B = tokens.shape[0]
        H, KV, D = self.n_heads, self.n_kv, self.head_dim
        L = cache.length
        if L + 1 > cache.capacity:
            raise ValueError(f"KV cache holds {cache.capacity} positions, asked for {L + 1}")
        x = self.embed[tokens]
        cos, sin = self.model.rope(positions[:, None], x.dtype, L + 1)
        cos, sin = cos[:, 0], sin[:, 0]  # (B, 1, D): broadcast over the heads axis of (B, heads, D)
        for i, w in enumerate(self.layers):
            h = self._norm(x, w.input_norm)
            qkv = F.linear(h, w.qkv, w.qkv_bias).view(B, H + 2 * KV, D)
            qk = qkv[:, :H + KV]
            qk = qk * cos + rotate_half(qk) * sin
            cache.k[i, :, :, L] = qk[:, H:]
            cache.v[i, :, :, L] = qkv[:, H + KV:]
            # Query heads sharing a KV head sit on the sequence axis, as in Attention: no repeated cache.
            q = qk[:, :H].reshape(B, KV, H // KV, D)
            out = F.scaled_dot_product_attention(q, cache.k[i, :, :, :L + 1], cache.v[i, :, :, :L + 1],
                                                 attn_mask=key_mask)
            x = x + F.linear(out.reshape(B, H * D), w.o, w.o_bias)
            gate, up = F.linear(self._norm(x, w.post_norm), w.gate_up, w.gate_up_bias).chunk(2, dim=-1)
            x = x + F.linear(F.silu(gate) * up, w.down, w.down_bias)
        cache.length = L + 1
        return F.linear(self._norm(x, self.final_norm), self.lm_head)


def _version(p: torch.Tensor) -> int:
    try:
        return p._version
    except RuntimeError:  # tensors made under inference_mode have no version counter (and cannot change)
        return 0


def _weights_key(model: Transformer) -> tuple:
    # In-place optimizer updates bump `_version`; `.to()` or reloading changes data_ptr.
    return tuple((p.data_ptr(), _version(p), p.dtype) for p in model.parameters())


def fused_decoder(model: Transformer) -> FusedDecoder:
    """The model's FusedDecoder, built once and rebuilt only when its weights have changed."""
    key = _weights_key(model)
    cached = model.__dict__.get(_CACHE_ATTR)
    if cached is not None and cached[0] == key:
        return cached[1]
    decoder = FusedDecoder(model)
    model.__dict__[_CACHE_ATTR] = (key, decoder)
    return decoder
