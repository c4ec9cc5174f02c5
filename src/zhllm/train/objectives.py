"""Objectives: what a training step minimises. One per stage; the loop (trainer.py) is shared.

Pretraining minimises `CausalLM` on packed token windows, SFT `MaskedCausalLM` on chat rows whose prompt
tokens are masked out; a new stage (DPO, a reward model) adds its objective class here and names it in its
stage record (train/run.py). The trainer needs `weight(batch)` and `loss(model, batch)`; evaluation
(zhllm.eval.loss) only `loss`.
"""
from __future__ import annotations

import functools
from typing import Protocol

import torch

from ..eval.loss import LossOutput, NextTokenLoss, token_cross_entropy_sum


class Objective(Protocol):
    name: str

    def weight(self, batch: torch.Tensor) -> float:
        """Units the batch contributes (known before the forward pass, so the global normaliser is too)."""

    def loss(self, model: torch.nn.Module, batch: torch.Tensor) -> LossOutput: ...


@functools.cache
def compiled_cross_entropy_sum():
    """`token_cross_entropy_sum` through torch.compile: the upcast, log-softmax and gather become one fused
    kernel instead of a (B*T, vocab) fp32 copy and two passes over it (26m on a CPU: ~8% of a step)."""
    return torch.compile(token_cross_entropy_sum)


class CausalLM(NextTokenLoss):
    """Next-token prediction on packed windows: the measurement eval.loss makes, as a training objective."""


class MaskedCausalLM:
    """Next-token loss on the tokens whose label is not -100 (assistant replies), for packed or padded rows."""

    name = "sft"
    cross_entropy_sum = staticmethod(token_cross_entropy_sum)

    def weight(self, batch: dict) -> float:
        return float((batch["labels"][:, 1:] != -100).sum())

    def loss(self, model: torch.nn.Module, batch: dict) -> LossOutput:
        extra = {k: batch[k] for k in ("segment_ids", "attention_mask") if k in batch}
        logits = model(batch["input_ids"], **extra)
        loss = self.cross_entropy_sum(logits[:, :-1], batch["labels"][:, 1:])
        return LossOutput(loss, self.weight(batch))
