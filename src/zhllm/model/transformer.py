"""The decoder: RMSNorm, RoPE, grouped-query attention (SDPA), SwiGLU or mixture-of-experts (moe.py), KV cache.

Module and parameter names are those of `transformers`' LlamaForCausalLM / Qwen2ForCausalLM, so the
state dict *is* an HF checkpoint and PEFT targets (`q_proj`, ..., `down_proj`) mean the same thing here and
there. Pure PyTorch: no parallelism, no I/O, no config parsing (ARCHITECTURE rule 1).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .causal_attention import causal_attention
from .config import ModelConfig
from .mlp import MLP
from .moe import MoE


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 and scale in the input dtype, as transformers does, so logits match it.
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


def rope_frequencies(cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (head_dim/2,) and the attention scale that multiplies cos/sin."""
    dim, base = cfg.head_dim, cfg.rope_theta
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    rs = cfg.rope_scaling
    if rs is None or rs.type == "dynamic":
        return inv_freq, 1.0
    if rs.type == "linear":
        return inv_freq / rs.factor, 1.0
    orig = rs.original_max_position_embeddings or cfg.max_seq_len
    if rs.type == "llama3":
        low_wavelen = orig / rs.low_freq_factor
        high_wavelen = orig / rs.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / rs.factor, inv_freq)
        smooth = (orig / wavelen - rs.low_freq_factor) / (rs.high_freq_factor - rs.low_freq_factor)
        smoothed = (1 - smooth) * scaled / rs.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(medium, smoothed, scaled), 1.0
    # YaRN: interpolate low frequencies, keep high ones, blend with a linear ramp between.
    def correction_dim(rotations: float) -> float:
        return dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(base))
    low = max(math.floor(correction_dim(rs.beta_fast)), 0)
    high = min(math.ceil(correction_dim(rs.beta_slow)), dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation = 1 - ramp
    inv_freq = (inv_freq / rs.factor) * (1 - extrapolation) + inv_freq * extrapolation
    scale = rs.attention_factor if rs.attention_factor is not None else (
        0.1 * math.log(rs.factor) + 1.0 if rs.factor > 1 else 1.0)
    return inv_freq, scale


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


@dataclass
class KVCache:
    """Preallocated keys/values for every layer: (layers, B, n_kv_heads, max_len, head_dim)."""
    k: torch.Tensor
    v: torch.Tensor
    length: int = 0  # positions filled so far (the same for every row; padding is masked, not skipped)

    @classmethod
    def empty(cls, cfg: ModelConfig, batch: int, max_len: int, dtype: torch.dtype, device) -> "KVCache":
        shape = (cfg.n_layers, batch, cfg.n_kv_heads, max_len, cfg.head_dim)
        return cls(torch.empty(shape, dtype=dtype, device=device), torch.empty(shape, dtype=dtype, device=device))

    @property
    def capacity(self) -> int:
        return self.k.shape[3]

    def select(self, rows: torch.Tensor) -> "KVCache":
        """The cache of only these batch rows (a copy), at the same length."""
        return KVCache(self.k[:, rows], self.v[:, rows], self.length)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer, self.n_heads, self.n_kv, self.head_dim = layer, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        qkv_bias = bool(cfg.attention_bias)
        self.q_proj = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=qkv_bias)
        # Llama's attention_bias covers o_proj too; Qwen2's bias is on q/k/v only.
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=qkv_bias and cfg.arch == "llama")

    def forward(self, x, cos, sin, mask=None, cache: KVCache | None = None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        group = self.n_heads // self.n_kv
        if cache is not None:
            start = cache.length
            cache.k[self.layer, :, :, start:start + T] = k
            cache.v[self.layer, :, :, start:start + T] = v
            k = cache.k[self.layer, :, :, :start + T]
            v = cache.v[self.layer, :, :, :start + T]
            # Fold the query heads that share a KV head into the sequence axis: no copy of the cache
            # per head, which is what makes batch-1 decoding memory-bound rather than copy-bound.
            q = q.reshape(B, self.n_kv, group * T, self.head_dim)
            if mask is not None:
                mask = mask.repeat(1, 1, group, 1)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            out = out.view(B, self.n_heads, T, self.head_dim)
        else:
            if group > 1:
                k = k[:, :, None].expand(B, self.n_kv, group, T, self.head_dim).reshape(B, self.n_heads, T,
                                                                                         self.head_dim)
                v = v[:, :, None].expand(B, self.n_kv, group, T, self.head_dim).reshape(B, self.n_heads, T,
                                                                                         self.head_dim)
            out = causal_attention(q, k, v) if mask is None else F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MoE(cfg) if cfg.is_moe_layer(layer) else MLP(cfg.dim, cfg.ffn_dim, cfg.mlp_bias)

    def forward(self, x, cos, sin, mask=None, cache=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    """`model.*` in HF naming: embeddings, layers, final norm."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = Backbone(cfg)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        inv_freq, self.rope_scale = rope_frequencies(cfg)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self._rope_cache: tuple | None = None

    # ---- initialisation ----
    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> "Transformer":
        """Normal(0, init_std) weights; the two residual projections per layer are scaled by
        1/sqrt(2 * n_layers) so the residual stream's variance does not grow with depth (GPT-2). MoE: the router
        and the stacked experts likewise (an expert's down projection is a residual projection)."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        std = self.config.init_std
        resid_std = std / math.sqrt(2 * self.config.n_layers)
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            else:
                s = resid_std if name.endswith(("o_proj.weight", "down_proj.weight", "experts.down_proj")) else std
                p.copy_(torch.randn(p.shape, generator=gen) * s)
        return self

    # ---- rotary tables ----
    def rope(self, position_ids: torch.Tensor, dtype: torch.dtype, limit: int):
        """cos/sin of shape (B, 1, T, head_dim) for integer positions (B, T), all below `limit`."""
        cache = self._rope_cache
        if cache is None or cache[0].shape[0] < limit or cache[0].device != position_ids.device:
            rs = self.config.rope_scaling
            if rs is not None and rs.type == "dynamic" and limit > self.config.max_seq_len:
                # Dynamic NTK changes the frequencies with the sequence length; only the trained range is exact.
                raise ValueError(f"dynamic RoPE scaling beyond max_seq_len={self.config.max_seq_len} is not supported")
            n = max(limit, self.config.max_seq_len)
            t = torch.arange(n, device=self.inv_freq.device, dtype=torch.float32)
            freqs = torch.outer(t, self.inv_freq.float())
            emb = torch.cat((freqs, freqs), dim=-1)
            cache = ((emb.cos() * self.rope_scale).to(position_ids.device),
                     (emb.sin() * self.rope_scale).to(position_ids.device))
            self._rope_cache = cache
        cos, sin = cache[0][position_ids], cache[1][position_ids]
        return cos.unsqueeze(1).to(dtype), sin.unsqueeze(1).to(dtype)

    # ---- forward ----
    def hidden_states(self, input_ids: torch.Tensor, *, position_ids: torch.Tensor | None = None,
                      attention_mask: torch.Tensor | None = None, segment_ids: torch.Tensor | None = None,
                      cache: KVCache | None = None) -> torch.Tensor:
        """Final-norm hidden states (B, T, dim).

        attention_mask: (B, S) 1 for real tokens, 0 for padding, over the cache plus the new tokens.
        segment_ids: (B, T) document ids of a packed sequence; tokens attend only within their document
        and positions restart at each document.
        """
        B, T = input_ids.shape
        start = cache.length if cache is not None else 0
        if cache is not None and start + T > cache.capacity:
            raise ValueError(f"KV cache holds {cache.capacity} positions, asked for {start + T}")
        mask = None
        if segment_ids is not None:
            same = segment_ids[:, :, None] == segment_ids[:, None, :]
            mask = (same & torch.ones(T, T, dtype=torch.bool, device=input_ids.device).tril())[:, None]
            if position_ids is None:
                position_ids = positions_from_segments(segment_ids)
        elif attention_mask is not None:
            keys = attention_mask[:, :start + T].bool()
            q_pos = torch.arange(start, start + T, device=input_ids.device)
            k_pos = torch.arange(start + T, device=input_ids.device)
            causal = k_pos[None, :] <= q_pos[:, None]
            mask = (causal[None] & keys[:, None, :])[:, None]
            # A fully padded query row (left padding) would give NaN; let it see itself, its output is unused.
            mask = mask | torch.eye(start + T, dtype=torch.bool, device=input_ids.device)[start:][None, None]
            if position_ids is None:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, start:start + T]
        if position_ids is None:
            position_ids = torch.arange(start, start + T, device=input_ids.device)[None].expand(B, T)
        if mask is None and cache is not None and T > 1:
            # Folded GQA heads (see Attention) make SDPA's is_causal wrong, so spell the causal mask out.
            q_pos = torch.arange(start, start + T, device=input_ids.device)
            mask = (torch.arange(start + T, device=input_ids.device)[None, :] <= q_pos[:, None])[None, None]
        x = self.model.embed_tokens(input_ids)
        cos, sin = self.rope(position_ids, x.dtype, start + T)
        for layer in self.model.layers:
            x = layer(x, cos, sin, mask, cache)
        if cache is not None:
            cache.length += T
        return self.model.norm(x)

    def forward(self, input_ids: torch.Tensor, *, logits_at: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        """Logits (B, T, vocab), or with `logits_at` (B, K) positions only theirs (B, K, vocab): the lm_head and
        what follows it skip the positions nobody reads (a prompt's, in an RL update). Other keyword arguments
        as in `hidden_states`."""
        h = self.hidden_states(input_ids, **kwargs)
        if logits_at is not None:
            h = h.gather(1, logits_at[..., None].expand(-1, -1, h.shape[-1]))
        return self.lm_head(h)


def positions_from_segments(segment_ids: torch.Tensor) -> torch.Tensor:
    """Position of each token within its document, for packed rows: [0,0,0,1,1] -> [0,1,2,0,1]."""
    B, T = segment_ids.shape
    idx = torch.arange(T, device=segment_ids.device).expand(B, T)
    starts = torch.ones_like(segment_ids, dtype=torch.bool)
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    first = torch.where(starts, idx, torch.zeros_like(idx)).cummax(dim=1).values
    return idx - first
