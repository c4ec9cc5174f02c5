"""Causal self-attention, with a faster bf16 backward for compiled CPU training.

PyTorch's CPU flash-attention backward is the slowest kernel of a bf16 training step: on the 26m preset it
ran at about 6% of the bf16 matmul peak on an AMX CPU, and took 71 of the 90 ms of an attention call per
layer on an AVX512 one. The backward below
recomputes the probabilities from the forward's log-sum-exp, one block of 128 query rows at a time against
only the keys that block can see, so it is a few bf16 batched matmuls plus elementwise work that inductor
fuses. Per layer call, forward and backward, on that AVX512 CPU: 97 -> 69 ms at the 26m shape (batch 4,
seq 512, 8 heads of 64), 39 -> 29 ms at the demo's (batch 8, seq 256, 8 heads of 32), 114 -> 108 ms at
seq 1024; but 156 -> 179 ms at seq 2048, where a block's score rows no longer fit in cache, and in fp32 it
measured within 10% of PyTorch's either way. Eagerly the unfused elementwise work costs more than it saves.
So it is used for bf16, sequences up to 1024, inside `torch.compile` (the trainer's `train.compile`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

BLOCK = 128  # query rows per block: 64 and 256 both measured slower at seq 512
MAX_SEQ = 1024


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + causal mask) v for (B, heads, T, head_dim) tensors of equal head count."""
    if q.device.type == "cpu" and torch.compiler.is_compiling() and q.requires_grad and q.shape[2] <= MAX_SEQ:
        if torch.is_autocast_enabled("cpu"):  # SDPA is on autocast's low-precision list; do as it would
            dtype = torch.get_autocast_dtype("cpu")
            q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
        if q.dtype == k.dtype == v.dtype == torch.bfloat16:
            return _FlashForwardBlockedBackward.apply(q, k, v)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


class _FlashForwardBlockedBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True)[:2]
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        return blocked_causal_attention_backward(*ctx.saved_tensors, grad_out.contiguous())


def blocked_causal_attention_backward(q, k, v, out, lse, grad_out):
    """Gradients of causal attention for q, k, v, given the output and the per-row log-sum-exp of the scaled
    scores. Products run in the input dtype; probabilities and sums of gradients in fp32."""
    T, scale = q.shape[2], q.shape[-1] ** -0.5
    delta = (grad_out.float() * out.float()).sum(-1, keepdim=True)  # rowsum(dP * P) = rowsum(dO * O)
    dq_blocks, dk, dv = [], None, None
    for start in range(0, T, BLOCK):
        end = min(start + BLOCK, T)  # this block's queries see keys [0, end)
        q_i, do_i, k_i, v_i = q[:, :, start:end], grad_out[:, :, start:end], k[:, :, :end], v[:, :, :end]
        p = torch.exp((q_i @ k_i.transpose(-1, -2)).float() * scale - lse[:, :, start:end, None])
        visible = torch.arange(start, end, device=q.device)[:, None] >= torch.arange(end, device=q.device)
        p = p.masked_fill(~visible, 0.0)
        dv_i = (p.to(q.dtype).transpose(-1, -2) @ do_i).float()
        ds = (p * ((do_i @ v_i.transpose(-1, -2)).float() - delta[:, :, start:end]) * scale).to(q.dtype)
        dq_blocks.append(ds @ k_i)
        dk_i = (ds.transpose(-1, -2) @ q_i).float()
        # Later blocks see more keys: grow the running sums with zero rows for the new keys.
        dk = dk_i if dk is None else dk_i + F.pad(dk, (0, 0, 0, end - dk.shape[2]))
        dv = dv_i if dv is None else dv_i + F.pad(dv, (0, 0, 0, end - dv.shape[2]))
    return torch.cat(dq_blocks, dim=2), dk.to(k.dtype), dv.to(v.dtype)
