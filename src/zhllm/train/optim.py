"""AdamW with decay only on matrices, and learning-rate schedules as pure functions of the step.

Schedules are functions (not stateful torch schedulers) so that resuming needs nothing but the step number.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.autograd.graph import increment_version


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay 2-D+ weights of linear layers; never norms, biases or embeddings (decaying an embedding row
    shrinks rare tokens toward zero just because they are rare). Tied weights are counted once."""
    decay, no_decay, seen = [], [], set()
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    for _name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.ndim >= 2 and id(p) not in embeddings else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def adamw_kernel_options(params: list[torch.Tensor]) -> dict:
    """`fused=True` where the device has a fused kernel (CUDA, and CPU in recent torch), else foreach.

    Measured on CPU (benchmarks/bench_train.py): fused and foreach AdamW are both far cheaper than the
    per-parameter loop, and fused avoids the intermediate tensors foreach allocates.
    """
    devices = {p.device.type for p in params}
    if devices <= {"cuda", "cpu"} and all(p.dtype.is_floating_point for p in params):
        return {"fused": True}
    return {"foreach": True}


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float],
                    groups: list[dict] | None = None, kernel: dict | None = None) -> torch.optim.AdamW:
    groups = groups if groups is not None else parameter_groups(model, weight_decay)
    params = [p for g in groups for p in g["params"]]
    kernel = kernel if kernel is not None else adamw_kernel_options(params)
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=betas, eps=1e-8, **kernel)
    if kernel.get("fused"):
        # The fused kernel writes the weights without bumping their version counters, which is how an
        # inference engine kept across steps (GRPO rollouts, in-loop samples) knows its decode weights are stale.
        optimizer.register_step_post_hook(lambda opt, args, kwargs: increment_version(params))
    return optimizer


def lr_at(step: int, *, lr: float, total_steps: int, warmup_steps: int, schedule: str = "cosine",
          min_lr_ratio: float = 0.1, decay_fraction: float = 0.2) -> float:
    """Learning rate for optimizer step `step` (0-based).

    cosine: linear warmup, then cosine from lr to lr*min_lr_ratio at the last step.
    wsd: warmup, stable at lr, then linear decay to lr*min_lr_ratio over the last `decay_fraction` of steps
         (warmup-stable-decay: a run can be extended from any stable-phase checkpoint).
    constant: warmup, then lr.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    floor = lr * min_lr_ratio
    if schedule == "constant":
        return lr
    last = max(total_steps - 1, 1)
    if schedule == "cosine":
        span = max(last - warmup_steps, 1)
        progress = min(max(step - warmup_steps, 0) / span, 1.0)
        return floor + (lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "wsd":
        decay_steps = max(int(round(total_steps * decay_fraction)), 1)
        decay_start = max(total_steps - decay_steps, warmup_steps)
        if step < decay_start:
            return lr
        progress = min((step - decay_start) / max(last - decay_start, 1), 1.0)
        return lr - (lr - floor) * progress
    raise ValueError(f"unknown schedule {schedule!r}")


def set_lr(optimizer: torch.optim.Optimizer, value: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = value
