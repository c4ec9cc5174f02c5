"""bf16 model weights with fp32 master copies held by the optimizer (`train.bf16_weights: true`).

Under autocast every linear layer re-casts its fp32 input to bf16 and the residual stream stays fp32,
so a CPU step spends much of its time in dtype conversions. Keeping the model itself in bf16 removes
them; the optimizer updates fp32 masters and the model gets their bf16 rounding after each step, so no
small update is lost. Checkpoints hold the fp32 masters: resuming is exact.
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

    def groups_for(self, model_groups: list[dict]) -> list[dict]:
        """The optimizer's parameter groups, with each model parameter replaced by its master."""
        return [{**g, "params": [self.by_model_id[id(p)] for p in g["params"]]} for g in model_groups]

    def grads_to_master(self) -> None:
        for p, m in zip(self.model_params, self.master):
            m.grad = None if p.grad is None else p.grad.float()
            p.grad = None

    @torch.no_grad()
    def master_to_model(self) -> None:
        for p, m in zip(self.model_params, self.master):
            p.copy_(m)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {n: m.detach() for n, m in zip(self.names, self.master)}
