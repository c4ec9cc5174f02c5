"""AdamW (or Muon for the hidden matrices with AdamW for the rest) with decay only on matrices, and
learning-rate schedules as pure functions of the step.

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


def split_muon_groups(model: nn.Module, groups: list[dict], params_of=lambda p: p) -> list[dict]:
    """The decayed group's 2-D hidden weights (attention and MLP projections) become a Muon group; embeddings,
    the lm_head (the output wants per-token scales, not an orthogonal update), norms, biases and 3-D expert
    stacks stay with AdamW. `params_of` maps a model parameter to the one the optimizer holds (bf16 masters)."""
    kept = {id(m.weight) for name, m in model.named_modules()
            if isinstance(m, nn.Embedding) or name.split(".")[-1] == "lm_head"}
    wanted = {id(params_of(p)) for p in model.parameters() if p.requires_grad and p.ndim == 2 and id(p) not in kept}
    out = []
    for g in groups:
        muon = [p for p in g["params"] if id(p) in wanted]
        rest = [p for p in g["params"] if id(p) not in wanted]
        out += ([{**g, "params": rest}] if rest else []) + ([{**g, "params": muon, "muon": True}] if muon else [])
    return out


class MuonAdamW(torch.optim.Optimizer):
    """torch's Muon for groups marked `muon`, fused AdamW for the others, as one optimizer.

    One param_groups list and one state (the inner optimizers share both), so the lr schedule, checkpoints,
    resume (named or positional) and the weight-version hook treat it like plain AdamW. Muon's step is scaled
    per matrix to AdamW's update RMS (Moonshot's `match_rms_adamw`), so one lr and weight decay serve both.
    """

    def __init__(self, groups: list[dict], lr: float, betas: tuple[float, float], kernel: dict,
                 momentum: float = 0.95):
        super().__init__(groups, {"lr": lr, "weight_decay": 0.0})
        self._adamw = torch.optim.AdamW([g for g in self.param_groups if not g.get("muon")], lr=lr, betas=betas,
                                        eps=1e-8, **kernel)
        self._muon = torch.optim.Muon([g for g in self.param_groups if g.get("muon")], lr=lr, momentum=momentum,
                                      adjust_lr_fn="match_rms_adamw")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # load_state_dict replaces the group dicts and the state: point the inner optimizers at the current ones
        for inner, muon in ((self._adamw, False), (self._muon, True)):
            inner.param_groups = [g for g in self.param_groups if bool(g.get("muon")) == muon]
            inner.state = self.state
            if inner.param_groups:
                inner.step()
        return loss


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
                    groups: list[dict] | None = None, kernel: dict | None = None,
                    kind: str = "adamw") -> torch.optim.Optimizer:
    """kind "muon": groups marked by split_muon_groups go to Muon, the rest to AdamW (MuonAdamW)."""
    groups = groups if groups is not None else parameter_groups(model, weight_decay)
    params = [p for g in groups for p in g["params"]]
    kernel = kernel if kernel is not None else adamw_kernel_options(params)
    if kind == "muon":
        optimizer = MuonAdamW(groups, lr=lr, betas=betas, kernel=kernel)
    else:
        optimizer = torch.optim.AdamW(groups, lr=lr, betas=betas, eps=1e-8, **kernel)
    if kind == "muon" or kernel.get("fused"):
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
