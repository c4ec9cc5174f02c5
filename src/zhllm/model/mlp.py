"""The SwiGLU feed-forward: a dense layer's MLP, and Qwen2-MoE's shared expert (HF names gate/up/down_proj)."""
from __future__ import annotations

import torch.nn.functional as F
from torch import nn


class MLP(nn.Module):
    def __init__(self, dim: int, ffn_dim: int, bias: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(dim, ffn_dim, bias=bias)
        self.up_proj = nn.Linear(dim, ffn_dim, bias=bias)
        self.down_proj = nn.Linear(ffn_dim, dim, bias=bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
