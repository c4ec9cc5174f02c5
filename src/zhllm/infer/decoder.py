"""The one-token decode step, with fused weights: the hot loop of generation.

At batch 1 a decode step is a chain of matrix-vector products: it reads every weight once, and on a CPU the
ops between the products (Python, dispatch, cache misses after each weight stream) cost about a third of the
step. So the step runs on fused copies of the weights: q/k/v in one matrix and gate/up in another (33
products per step for 8 layers instead of 57), each RMSNorm's weight folded into the matrix it feeds
(W @ (g * n) = (W * g) @ n, so a norm is one `F.rms_norm` call), RoPE as one `addcmul`. The copies are built
by `infer/linear.py` in the fastest layout for the device and dtype (oneDNN-prepacked bf16, or weight-only
int8 when asked), live in the engine's `FusedDecoderCache` (never on the model), are rebuilt when the model's
weights change (a trainer evaluating between steps) and are never saved: the checkpoint keeps HF parameter names.
The copies are read from plain `nn.Linear` weights, so only a plain `Transformer` qualifies (`can_fuse`): under
LoRA the weights would be the base's, under FSDP shards. A mixture-of-experts layer keeps its own module (router,
grouped experts, shared expert) after the fused attention: which weights a token reads depends on its route.

Prefill (the prompt) goes through `Transformer.hidden_states`, which writes the same `KVCache`; this step
then continues from `cache.length`. In fp32 the step equals `Transformer.forward` with a cache to rounding
(1e-6); in bf16 the folded weights and fused RoPE round differently, within bf16 precision.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..model.moe import MoE, Experts
from ..model.transformer import KVCache, Transformer
from .linear import LinearFn, decode_linear


@dataclass
class FusedLayer:
    qkv: LinearFn  # input RMSNorm weight folded in
    o: LinearFn
    gate_up: LinearFn | None  # post-attention RMSNorm weight folded in (dense layers)
    down: LinearFn | None
    moe: MoE | None = None  # a mixture-of-experts layer: the module itself, after ...
    moe_norm: torch.Tensor | None = None  # ... the post-attention RMSNorm with this weight


def _cat(*tensors):
    return None if tensors[0] is None else torch.cat(tensors).contiguous()


def _folded(norm_weight: torch.Tensor, *weights: torch.Tensor) -> torch.Tensor:
    """The weights stacked on the output axis, times the RMSNorm weight that scales their input:
    W @ (g * n) = (W * g) @ n, so the step normalises without scaling. Computed in fp32, then rounded once."""
    return (torch.cat(weights).float() * norm_weight.float()).to(weights[0].dtype).contiguous()


class FusedDecoder:
    """Decode one token per row: `step(tokens (B,), positions (B,), cache, key_mask) -> logits (B, V)`.

    quantize: `none` (the model's weights, prepacked where the device has a faster layout) or `int8`
    (weight-only int8 copies, CPU): see `infer/linear.py`. int8 steps at batch 1 in bf16 run in the native
    step of `infer/native.py` where it can be built.
    """

    def __init__(self, model: Transformer, quantize: str = "none"):
        cfg = model.config
        self.model = model
        self.n_heads, self.n_kv, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.eps = cfg.norm_eps
        linear = decode_linear(quantize)
        with torch.no_grad():
            self.layers = [self._fuse(layer, linear) for layer in model.model.layers]
            self.lm_head = linear(_folded(model.model.norm.weight, model.lm_head.weight), None)
            half = self.head_dim // 2
            # rotate_half(x) * sin == roll(x, half) * (sin with its first half negated)
            self.sin_sign = torch.cat([-torch.ones(half), torch.ones(half)]).to(model.lm_head.weight.device)
        self.embed = model.model.embed_tokens.weight
        self.native = self._native_module(quantize)

    def _native_module(self, quantize: str):
        """The compiled batch-1 int8 step (infer/native.py) where it applies: int8 without biases, bf16."""
        if quantize != "int8" or self.embed.dtype != torch.bfloat16 or self.head_dim > 256:
            return None
        if any(layer.moe is not None for layer in self.layers):
            return None
        mats = [m for layer in self.layers for m in (layer.qkv, layer.o, layer.gate_up, layer.down)] + [self.lm_head]
        if any(m.bias is not None for m in mats):
            return None
        from .native import native_decode
        module = native_decode()
        if module is not None:
            self.int8_weights, self.int8_scales = [m.q for m in mats], [m.scale for m in mats]
        return module

    @staticmethod
    def _fuse(layer, linear) -> FusedLayer:
        a, m = layer.self_attn, layer.mlp
        bias = lambda lin: None if lin.bias is None else lin.bias.detach()  # noqa: E731
        qkv = linear(_folded(layer.input_layernorm.weight, a.q_proj.weight, a.k_proj.weight, a.v_proj.weight),
                     _cat(a.q_proj.bias, a.k_proj.bias, a.v_proj.bias))
        o = linear(a.o_proj.weight.detach(), bias(a.o_proj))
        if isinstance(m, MoE):
            return FusedLayer(qkv, o, None, None, moe=m, moe_norm=layer.post_attention_layernorm.weight.detach())
        return FusedLayer(
            qkv, o,
            gate_up=linear(_folded(layer.post_attention_layernorm.weight, m.gate_proj.weight, m.up_proj.weight),
                           _cat(m.gate_proj.bias, m.up_proj.bias)),
            down=linear(m.down_proj.weight.detach(), bias(m.down_proj)),
        )

    def step(self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache,
             key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, V) for one new token per row, appended to `cache` at `cache.length`.

        positions: (B,) RoPE position of each row's token (rows with left padding lag the cache index).
        key_mask: (B, 1, 1, cache.length + 1) bool, True where a row may attend; None when no row is padded.
        """
        L = cache.length
        if L + 1 > cache.capacity:
            raise ValueError(f"KV cache holds {cache.capacity} positions, asked for {L + 1}")
        if self.native is not None and tokens.shape[0] == 1 and key_mask is None:
            H, KV = self.n_heads, self.n_kv
            cos, sin = self.model.rope(positions[:, None], self.embed.dtype, L + 1)
            logits = self.native.decode_step(int(tokens[0]), L, self.int8_weights, self.int8_scales, cache.k,
                                             cache.v, self.embed, cos[0, 0, 0], sin[0, 0, 0], H, KV, self.eps)
            cache.length = L + 1
            return logits
        x = F.embedding(tokens, self.embed)
        cos, sin = self.model.rope(positions[:, None], x.dtype, L + 1)

        def store(i: int, k: torch.Tensor, v: torch.Tensor):
            cache.k[i, :, :, L], cache.v[i, :, :, L] = k, v
            return cache.k[i, :, :, :L + 1], cache.v[i, :, :, :L + 1]

        logits = self._layers(x, cos, sin, store, key_mask)
        cache.length = L + 1
        return logits

    def step_rows(self, tokens: torch.Tensor, lengths: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Logits (n, V) for one new token in each of the first n rows of `cache`, where row r holds its own
        sequence in positions [0, lengths[r]) (no padding): the token is written at lengths[r], which is also
        its RoPE position. Rows of different lengths decode together, so requests can join and leave a running
        batch (the server's continuous batching, zhllm/serve). `cache.length` is neither read nor changed; the
        caller advances `lengths`. Always the PyTorch step (the native one is for a single left-aligned row)."""
        n = tokens.shape[0]
        top = int(lengths.max()) + 1
        if top > cache.capacity:
            raise ValueError(f"KV cache holds {cache.capacity} positions, asked for {top}")
        rows = torch.arange(n, device=tokens.device)
        # Rows shorter than the longest must not see the stale keys beyond their own end.
        key_mask = None
        if int(lengths.min()) + 1 != top:
            key_mask = (torch.arange(top, device=tokens.device)[None, :] <= lengths[:, None])[:, None, None, :]
        x = F.embedding(tokens, self.embed)
        cos, sin = self.model.rope(lengths[:, None], x.dtype, top)

        def store(i: int, k: torch.Tensor, v: torch.Tensor):
            cache.k[i, rows, :, lengths], cache.v[i, rows, :, lengths] = k, v
            return cache.k[i, :n, :, :top], cache.v[i, :n, :, :top]

        return self._layers(x, cos, sin, store, key_mask)

    def _layers(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, store, key_mask) -> torch.Tensor:
        """The fused layers and head for one token per row; `store(layer, k, v)` writes the new keys and
        values (B, KV, D) into the cache and returns the keys and values (B, KV, S, D) to attend to."""
        B = x.shape[0]
        H, KV, D = self.n_heads, self.n_kv, self.head_dim
        cos, sin = cos[:, 0], sin[:, 0] * self.sin_sign.to(x.dtype)  # (B, 1, D): broadcast over heads
        shape, eps = (x.shape[-1],), self.eps
        for i, w in enumerate(self.layers):
            qkv = w.qkv(F.rms_norm(x, shape, None, eps)).view(B, H + 2 * KV, D)
            qk = qkv[:, :H + KV]
            qk = torch.addcmul(qk * cos, qk.roll(D // 2, -1), sin)  # RoPE
            keys, values = store(i, qk[:, H:], qkv[:, H + KV:])
            # Query heads sharing a KV head sit on the sequence axis, as in Attention: no repeated cache.
            q = qk[:, :H].reshape(B, KV, H // KV, D)
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=key_mask)
            x = x + w.o(out.reshape(B, H * D))
            if w.moe is not None:
                x = x + w.moe(w.moe_norm * F.rms_norm(x.float(), shape, None, eps).to(x.dtype))
                continue
            gate, up = w.gate_up(F.rms_norm(x, shape, None, eps)).chunk(2, dim=-1)
            x = x + w.down(F.silu(gate) * up)
        return self.lm_head(F.rms_norm(x, shape, None, eps))


def _version(p: torch.Tensor) -> int:
    try:
        return p._version
    except RuntimeError:  # tensors made under inference_mode have no version counter (and cannot change)
        return 0


def _weights_key(model: Transformer) -> tuple:
    # In-place optimizer updates bump `_version`; `.to()` or reloading changes data_ptr.
    return tuple((p.data_ptr(), _version(p), p.dtype) for p in model.parameters())


def can_fuse(model: torch.nn.Module) -> bool:
    """Whether the fused step would decode what `model` computes: a plain zhllm Transformer (not an FSDP or
    other subclass) whose projections are plain nn.Linear layers (not LoRA or quantized wrappers) holding
    ordinary tensors (not DTensor shards)."""
    if type(model) is not Transformer:
        return False
    linears = [model.lm_head]
    for layer in model.model.layers:
        a, m = layer.self_attn, layer.mlp
        linears += [a.q_proj, a.k_proj, a.v_proj, a.o_proj]
        if isinstance(m, MoE):
            if type(m.experts) is not Experts:
                return False
            linears.append(m.gate)
            if m.shared_expert is not None:
                linears += [m.shared_expert_gate, m.shared_expert.gate_proj, m.shared_expert.up_proj,
                            m.shared_expert.down_proj]
        else:
            linears += [m.gate_proj, m.up_proj, m.down_proj]
    if any(type(m) is not torch.nn.Linear for m in linears) or type(model.model.embed_tokens) is not torch.nn.Embedding:
        return False
    return all(type(p) is torch.nn.Parameter and type(p.data) is torch.Tensor for p in model.parameters())


class FusedDecoderCache:
    """One model's FusedDecoder, built on first use and rebuilt only when the model's weights change (a
    trainer sampling between optimizer steps). Held by an `Engine`, never stored on the model."""

    def __init__(self, quantize: str = "none"):
        decode_linear(quantize)  # an unknown mode fails here, not at the first decode
        self.quantize = quantize
        self._key: tuple | None = None
        self._decoder: FusedDecoder | None = None

    def get(self, model: Transformer) -> FusedDecoder:
        key = _weights_key(model)
        if self._decoder is None or self._decoder.model is not model or key != self._key:
            self._decoder, self._key = FusedDecoder(model, self.quantize), key
        return self._decoder
