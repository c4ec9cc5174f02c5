"""The mixture-of-experts feed-forward of transformers' Qwen2-MoE, its router losses, and its checkpoint layout.

Parameter names are transformers' (v5) in-memory ones: `mlp.gate.weight` (the router), `mlp.experts.gate_up_proj`
(E, 2*I, dim) and `mlp.experts.down_proj` (E, dim, I) as stacked 3-D tensors, `mlp.shared_expert.*` and
`mlp.shared_expert_gate.weight`. On disk a checkpoint keeps the Hub's per-expert layout
(`mlp.experts.N.gate_proj.weight`, ...), which every transformers version, vLLM and llama.cpp read.

Routing is dropless: each token goes to exactly `top_k` experts whatever the load. Tokens are sorted by expert so
that each expert multiplies one contiguous slice (one grouped matmul on CUDA, one matmul per expert elsewhere);
no per-token work happens in Python.
"""
from __future__ import annotations

import contextlib
import re

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig, MoEConfig
from .mlp import MLP

# Router logits of the MoE layers run with autograd on, while `record_router_logits` is open (the trainer's step):
# the load-balancing and z losses are training terms, so the model's forward stays a plain logits function.
_records: list | None = None


@contextlib.contextmanager
def record_router_logits():
    """Collect (router logits (tokens, E), MoEConfig) of every MoE layer run with grad enabled in this block."""
    global _records
    previous, _records = _records, []
    try:
        yield _records
    finally:
        _records = previous


class Experts(nn.Module):
    """`n_experts` SwiGLU experts as two stacked weights, applied to tokens grouped by expert."""

    def __init__(self, dim: int, m: MoEConfig):
        super().__init__()
        self.n_experts = m.n_experts
        self.gate_up_proj = nn.Parameter(torch.empty(m.n_experts, 2 * m.expert_ffn_dim, dim))
        self.down_proj = nn.Parameter(torch.empty(m.n_experts, dim, m.expert_ffn_dim))

    # Slices whose sizes depend on the routing cannot be traced into one graph: compiled layers run this eagerly.
    @torch.compiler.disable
    def forward(self, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x (N, dim); expert_ids and weights (N, top_k). Returns sum_k weights[:, k] * expert_k(x)."""
        top_k = expert_ids.shape[1]
        flat = expert_ids.reshape(-1)
        order = flat.argsort(stable=True)        # assignments grouped by expert, token order kept within one
        token = order // top_k
        counts = torch.bincount(flat, minlength=self.n_experts)
        if _grouped_mm_ok(x):
            xs = x[token]
            offsets = counts.cumsum(0).to(torch.int32)
            h = F.grouped_mm(xs, self.gate_up_proj.transpose(1, 2), offs=offsets)
            gate, up = h.chunk(2, dim=-1)
            y = F.grouped_mm((F.silu(gate) * up).contiguous(), self.down_proj.transpose(1, 2), offs=offsets)
        else:
            # Each expert's rows are padded with zero rows to a multiple of ROWS_MULTIPLE: oneDNN builds a kernel
            # per matrix shape and keeps ~1k of them, and routing gives every step new row counts, so unpadded
            # slices rebuild kernels all the time (measured: matmuls at half speed in a 26m-active MoE step).
            padded = (counts + ROWS_MULTIPLE - 1) // ROWS_MULTIPLE * ROWS_MULTIPLE
            expert = flat[order]
            rank = torch.arange(flat.numel(), device=x.device) - (counts.cumsum(0) - counts)[expert]
            slot = (padded.cumsum(0) - padded)[expert] + rank   # where each assignment sits among padded rows
            source = torch.full((int(padded.sum()),), x.shape[0], dtype=torch.long, device=x.device)
            source[slot] = token
            # index_select, not [source]: its backward is index_add, several times faster than indexing's
            # accumulating index_put in bf16 on a CPU. Padding rows read the appended zero row.
            xs = torch.cat([x, x.new_zeros(1, x.shape[1])]).index_select(0, source)
            # unbind, not [e]: indexing would give each expert's backward a zero-filled gradient of the whole
            # stacked weight to add into (a third of the block's time on a CPU); unbind's backward is one stack.
            gate_up, down = self.gate_up_proj.unbind(0), self.down_proj.unbind(0)
            outs, start = [], 0
            for e, n in enumerate(padded.tolist()):
                if n:
                    gate, up = F.linear(xs[start:start + n], gate_up[e]).chunk(2, dim=-1)
                    outs.append(F.linear(F.silu(gate) * up, down[e]))
                    start += n
            y = torch.cat(outs).index_select(0, slot)
        y = y * weights.reshape(-1)[order, None].to(y.dtype)
        return torch.zeros_like(x).index_add_(0, token, y.to(x.dtype))


ROWS_MULTIPLE = 64


def _grouped_mm_ok(x: torch.Tensor) -> bool:
    """F.grouped_mm where it is the fast path: bf16 on an sm80+ GPU. On a CPU it is no faster than one matmul
    per expert (measured with torch 2.13) and its backward rejects broadcast gradients."""
    return (x.is_cuda and x.dtype == torch.bfloat16 and hasattr(F, "grouped_mm")
            and torch.cuda.get_device_capability(x.device) >= (8, 0))


class MoE(nn.Module):
    """Router + routed experts + the sigmoid-gated shared expert (transformers' Qwen2MoeSparseMoeBlock), or without
    the shared expert (MixtralSparseMoeBlock)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        m = self.moe = cfg.moe
        self.gate = nn.Linear(cfg.dim, m.n_experts, bias=False)
        self.experts = Experts(cfg.dim, m)
        if m.shared_expert_ffn_dim:  # Qwen2-MoE's; Mixtral has none
            self.shared_expert = MLP(cfg.dim, m.shared_expert_ffn_dim)
            self.shared_expert_gate = nn.Linear(cfg.dim, 1, bias=False)
        else:
            self.shared_expert = self.shared_expert_gate = None

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Router logits (N, E), the chosen experts (N, top_k) and their weights (N, top_k), for x (N, dim)."""
        logits = self.gate(x)
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        weights, expert_ids = torch.topk(probs, self.moe.top_k, dim=-1)
        if self.moe.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return logits, expert_ids, weights.to(logits.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        logits, expert_ids, weights = self.route(x)
        if _records is not None and torch.is_grad_enabled():
            _records.append((logits, self.moe))
        out = self.experts(x, expert_ids, weights)
        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out.reshape(shape)


def load_balancing_loss(logits: list[torch.Tensor], top_k: int) -> torch.Tensor:
    """Switch Transformer's auxiliary loss as transformers' Qwen2-MoE computes it: E x sum over experts of (share of
    top-k assignments) x (mean router probability), both pooled over all layers' tokens. 1.0 at perfect balance
    with top_k 1; top_k at perfect balance in general."""
    n_experts = logits[0].shape[-1]
    assigned = torch.zeros(n_experts, device=logits[0].device)
    prob_sum = torch.zeros(n_experts, device=logits[0].device)
    rows = 0
    for layer in logits:
        probs = torch.softmax(layer.float(), dim=-1)
        chosen = torch.topk(probs, top_k, dim=-1).indices.reshape(-1)
        assigned = assigned + torch.bincount(chosen, minlength=n_experts).float()
        prob_sum = prob_sum + probs.sum(dim=0)
        rows += probs.shape[0]
    return n_experts * torch.sum((assigned / rows) * (prob_sum / rows))


def z_loss(logits: list[torch.Tensor]) -> torch.Tensor:
    """ST-MoE's router z-loss: the mean squared log-sum-exp of the router logits (keeps them small), over layers."""
    return torch.stack([torch.logsumexp(layer.float(), dim=-1).square().mean() for layer in logits]).mean()


def expert_load(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Share of one layer's top-k assignments that each expert received, (E,), summing to 1."""
    chosen = torch.topk(logits.float(), top_k, dim=-1).indices.reshape(-1)
    return torch.bincount(chosen, minlength=logits.shape[-1]).float() / chosen.numel()


def router_loss_terms(records: list) -> tuple[torch.Tensor, dict[str, float]]:
    """From `record_router_logits`' records: the training term (the mean per-layer load-balancing loss and the z
    loss, times their coefficients) and figures to log (`moe/aux_loss`, `moe/z_loss`,
    `expert_load/L<layer>/E<expert>`, layers counted in call order)."""
    logits = [r[0] for r in records]
    m: MoEConfig = records[0][1]
    # Per layer, then averaged (Switch Transformer, Megatron): transformers pools every layer's tokens first, so
    # layers that favour different experts cancel out and each can stay unbalanced (measured: the busiest of 4
    # experts took half of a layer's assignments while the pooled loss read 2.01, its balanced value 2).
    aux = torch.stack([load_balancing_loss([layer], m.top_k) for layer in logits]).mean()
    z = z_loss(logits)
    figures = {"moe/aux_loss": float(aux.detach()), "moe/z_loss": float(z.detach())}
    for i, layer in enumerate(logits):
        for e, share in enumerate(expert_load(layer.detach(), m.top_k).tolist()):
            figures[f"expert_load/L{i}/E{e}"] = share
    return m.router_aux_loss_coef * aux + m.router_z_loss_coef * z, figures


# ---- checkpoint layout: the Hub's per-expert tensors on disk, stacked ones in memory ----
_PER_EXPERT = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
# Mixtral's Hub names: block_sparse_moe for mlp, w1/w3/w2 for gate/up/down.
_MIXTRAL = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
_MIXTRAL_KEY = re.compile(r"^(.*)\.block_sparse_moe\.(gate\.weight|experts\.(\d+)\.(w1|w2|w3)\.weight)$")


def _from_mixtral_name(k: str) -> str:
    match = _MIXTRAL_KEY.match(k)
    if match is None:
        return k
    if match[3] is None:
        return f"{match[1]}.mlp.gate.weight"
    return f"{match[1]}.mlp.experts.{match[3]}.{_MIXTRAL[match[4]]}.weight"


def to_mixtral_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-expert tensors (after `split_expert_weights`) under Mixtral's Hub names."""
    back = {v: k for k, v in _MIXTRAL.items()}
    out = {}
    for k, v in state.items():
        k = k.replace(".mlp.gate.weight", ".block_sparse_moe.gate.weight")
        match = _PER_EXPERT.match(k)
        if match:
            k = f"{match[1].replace('.mlp.', '.block_sparse_moe.')}.{match[2]}.{back[match[3]]}.weight"
        out[k] = v
    return out


def stack_expert_weights(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-expert checkpoint tensors (Qwen2-MoE's or Mixtral's names) -> the stacked `gate_up_proj` / `down_proj`
    of each layer under transformers' in-memory names (others untouched)."""
    groups: dict[str, dict[str, dict[int, torch.Tensor]]] = {}
    out = {}
    for k, v in state.items():
        k = _from_mixtral_name(k)
        match = _PER_EXPERT.match(k)
        if match:
            groups.setdefault(match[1], {}).setdefault(match[3], {})[int(match[2])] = v
        else:
            out[k] = v
    for prefix, parts in groups.items():
        n = 1 + max(max(p) for p in parts.values())
        try:
            gate, up, down = ([parts[name][e] for e in range(n)] for name in ("gate_proj", "up_proj", "down_proj"))
        except KeyError as e:
            raise ValueError(f"{prefix}: expert weights are incomplete (missing expert {e})") from None
        out[f"{prefix}.gate_up_proj"] = torch.cat([torch.stack(gate), torch.stack(up)], dim=1)
        out[f"{prefix}.down_proj"] = torch.stack(down)
    return out


def split_expert_weights(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of `stack_expert_weights`, for writing a checkpoint."""
    out = {}
    for k, v in state.items():
        if k.endswith(".mlp.experts.gate_up_proj"):
            prefix = k[: -len(".gate_up_proj")]
            gate, up = v.chunk(2, dim=1)
            for e in range(v.shape[0]):
                out[f"{prefix}.{e}.gate_proj.weight"] = gate[e].contiguous()
                out[f"{prefix}.{e}.up_proj.weight"] = up[e].contiguous()
        elif k.endswith(".mlp.experts.down_proj"):
            prefix = k[: -len(".down_proj")]
            for e in range(v.shape[0]):
                out[f"{prefix}.{e}.down_proj.weight"] = v[e].contiguous()
        else:
            out[k] = v
    return out
