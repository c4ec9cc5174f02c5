"""Causal self-attention, blocked for compiled bf16 CPU training.

PyTorch's CPU flash attention is the slowest part of a bf16 training step. Its backward ran at about 6% of
the bf16 matmul peak on an AMX CPU and took 71 of the 90 ms of an attention call per layer on an AVX512
one. Its forward took 18-26 ms per 26m-preset layer (batch 4, seq 512, 8 heads of 64) on an AMD EPYC with
AVX512-BF16, longer than at seq 1024 with half the batch.

Here both passes go one block of 128 query rows at a time against only the keys that block can see, as a
few bf16 batched matmuls plus elementwise work that inductor fuses; the backward recomputes the
probabilities from the forward's log-sum-exp. Measured per layer call at the 26m shape: the blocked
backward took forward plus backward from 97 to 69 ms (Intel AVX512); the blocked forward took the forward
from 18-26 to 11-12 ms (AMD), and the whole 26m bf16 step 9-13% faster there.
At the demo's shape (batch 8, seq 256, 8 heads of 32) and at seq 1024 it is
within noise of PyTorch's; at seq 2048, where a block's score rows no longer fit in cache, it is slower,
and in fp32 it measured within 10% of PyTorch's either way. Eagerly the unfused elementwise work costs
more than it saves. So it is used for bf16, sequences up to 1024, inside `torch.compile` (the trainer's
`train.compile`).

Eagerly, short bf16 rows (GRPO/PPO/DPO updates on answers of a few dozen tokens) run PyTorch's attention in fp32
instead: its bf16 kernel is slow there. Forward plus backward at 8 heads, about 2,700 tokens per call (AMD Zen 4,
2 threads), casts included: 4.4x faster at seq 48, 2.1-2.3x at 64 and 100, 1.5x at 160 (heads of 64; 1.5-4.4x
with heads of 32); from 192 on it ranged 0.8-1.3x, so longer rows keep bf16.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

BLOCK = 128  # query rows per block: 64 and 256 both measured slower at seq 512
MAX_SEQ = 1024
SHORT_SEQ = 160  # eager bf16 rows up to this long: attention in fp32 (see the module's docstring)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + causal mask) v for (B, heads, T, head_dim) tensors of equal head count."""
    if q.device.type == "cpu" and q.requires_grad and q.shape[2] <= MAX_SEQ:
        if torch.is_autocast_enabled("cpu"):  # SDPA is on autocast's low-precision list; do as it would
            dtype = torch.get_autocast_dtype("cpu")
            q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
        if q.dtype == k.dtype == v.dtype == torch.bfloat16:
            if torch.compiler.is_compiling():
                return _BlockedCausalAttention.apply(q, k, v)
            if q.shape[2] <= SHORT_SEQ:
                with torch.autocast("cpu", enabled=False):
                    out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True)
                return out.to(torch.bfloat16)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


class _BlockedCausalAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v):
        out, lse = blocked_causal_attention_forward(q, k, v)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        return blocked_causal_attention_backward(*ctx.saved_tensors, grad_out.contiguous())


def query_blocks(T: int, device: torch.device):
    """(start, end, visible) per block of query rows [start, end): they see keys [0, end), as `visible` masks."""
    for start in range(0, T, BLOCK):
        end = min(start + BLOCK, T)
        yield start, end, torch.arange(start, end, device=device)[:, None] >= torch.arange(end, device=device)


def blocked_causal_attention_forward(q, k, v):
    """(output, per-row log-sum-exp of the scaled scores), as flash attention returns them. Products run in
    the input dtype, the softmax in fp32."""
    scale = q.shape[-1] ** -0.5
    outs, lses = [], []
    for start, end, visible in query_blocks(q.shape[2], q.device):
        s = ((q[:, :, start:end] @ k[:, :, :end].transpose(-1, -2)).float() * scale).masked_fill(~visible, -math.inf)
        lse = torch.logsumexp(s, dim=-1)
        outs.append(torch.exp(s - lse[..., None]).to(q.dtype) @ v[:, :, :end])
        lses.append(lse)
    return torch.cat(outs, dim=2), torch.cat(lses, dim=2)


def blocked_causal_attention_backward(q, k, v, out, lse, grad_out):
    """Gradients of causal attention for q, k, v, given the output and the per-row log-sum-exp of the scaled
    scores. Products run in the input dtype; probabilities and sums of gradients in fp32."""
    T, scale = q.shape[2], q.shape[-1] ** -0.5
    delta = (grad_out.float() * out.float()).sum(-1, keepdim=True)  # rowsum(dP * P) = rowsum(dO * O)
    dq_blocks, dk, dv = [], None, None
    for start, end, visible in query_blocks(T, q.device):
        q_i, do_i, k_i, v_i = q[:, :, start:end], grad_out[:, :, start:end], k[:, :, :end], v[:, :, :end]
        p = torch.exp((q_i @ k_i.transpose(-1, -2)).float() * scale - lse[:, :, start:end, None])
        p = p.masked_fill(~visible, 0.0)
        dv_i = (p.to(q.dtype).transpose(-1, -2) @ do_i).float()
        ds = (p * ((do_i @ v_i.transpose(-1, -2)).float() - delta[:, :, start:end]) * scale).to(q.dtype)
        dq_blocks.append(ds @ k_i)
        dk_i = (ds.transpose(-1, -2) @ q_i).float()
        # Later blocks see more keys: grow the running sums with zero rows for the new keys.
        dk = dk_i if dk is None else dk_i + F.pad(dk, (0, 0, 0, end - dk.shape[2]))
        dv = dv_i if dv is None else dv_i + F.pad(dv, (0, 0, 0, end - dv.shape[2]))
    return torch.cat(dq_blocks, dim=2), dk.to(k.dtype), dv.to(v.dtype)
