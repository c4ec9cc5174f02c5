"""bf16 model weights with fp32 master copies held by the optimizer (`train.bf16_weights: true`).

Under autocast every linear layer re-casts its fp32 input to bf16 and the residual stream stays fp32,
so a CPU step spends much of its time in dtype conversions. Keeping the model itself in bf16 removes
them; the optimizer updates fp32 masters and the model gets their bf16 rounding after each step, so no
small update is lost. Checkpoints hold the fp32 masters: resuming is exact.

The fp32 gradients live in buffers kept from step to step: a fresh 4-bytes-per-parameter allocation each
step costs the kernel a page fault per 4 KiB touched (~25k per step at 26M parameters).
"""
from __future__ import annotations

import torch
from torch import nn


class MasterWeights:
    def __init__(self, model: nn.Module):
        # named_parameters() yields a tied weight once, under its first name.
        self.names = [n for n, _ in model.named_parameters()]
        self.model_params = [p for _, p in model.named_parameters()]
        self.master = [nn.Parameter(p.detach().float().clone()) for p in self.model_params]
        self.by_model_id = {id(p): m for p, m in zip(self.model_params, self.master)}
        model.to(torch.bfloat16)
        self.model_params = list(model.parameters())  # .to() keeps Parameter objects; refresh anyway
        self.grad_buffers: list[torch.Tensor | None] = [None] * len(self.master)

    def groups_for(self, model_groups: list[dict]) -> list[dict]:
        """The optimizer's parameter groups, with each model parameter replaced by its master."""
        return [{**g, "params": [self.by_model_id[id(p)] for p in g["params"]]} for g in model_groups]

    @torch.no_grad()
    def grads_to_master(self) -> None:
        """Each master's .grad becomes the fp32 copy of its model parameter's gradient (None where there was none)."""
        dst, src = [], []
        for i, (p, m) in enumerate(zip(self.model_params, self.master)):
            if p.grad is None:
                m.grad = None
                continue
            if self.grad_buffers[i] is None:
                self.grad_buffers[i] = torch.empty_like(m)
            m.grad = self.grad_buffers[i]
            dst.append(m.grad)
            src.append(p.grad)
            p.grad = None
        if dst:
            torch._foreach_copy_(dst, src)

    @torch.no_grad()
    def master_to_model(self) -> None:
        torch._foreach_copy_(self.model_params, self.master)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {n: m.detach() for n, m in zip(self.names, self.master)}
