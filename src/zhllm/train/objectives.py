"""Objectives: what a training step minimises. One per stage; the loop (trainer.py) is shared.

A stage is (objective, dataset, default recipe): pretraining is `CausalLM` on packed token windows; SFT
will be `CausalLM` with a loss mask on chat examples; DPO and reward modelling add their own objective
classes here. The trainer only needs `weight(batch)` and `loss(model, batch)`.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Protocol

import torch
import torch.nn.functional as F


@dataclass
class LossOutput:
    loss_sum: torch.Tensor   # summed over the batch's `weight` units (tokens for LM losses)
    weight: float            # how many units loss_sum covers; the trainer normalises by the global total


class Objective(Protocol):
    name: str

    def weight(self, batch: torch.Tensor) -> float:
        """Units the batch contributes (known before the forward pass, so the global normaliser is too)."""

    def loss(self, model: torch.nn.Module, batch: torch.Tensor) -> LossOutput: ...


def to_device(batch, device: torch.device):
    """A batch is a tensor (packed pretraining windows) or a dict of tensors (SFT rows with masks)."""
    if isinstance(batch, dict):
        return {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    return batch.to(device, non_blocking=True)


def token_cross_entropy_sum(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Summed next-token cross-entropy, computed in fp32 whatever the logits' dtype.

    bf16 logits lose ~3 significant digits, which shows up as a noisy loss when the softmax is taken
    in bf16; upcasting the (B*T, vocab) logits costs little next to the lm_head matmul that made them.
    """
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                           ignore_index=ignore_index, reduction="sum")


@functools.cache
def compiled_cross_entropy_sum():
    """`token_cross_entropy_sum` through torch.compile: the upcast, log-softmax and gather become one fused
    kernel instead of a (B*T, vocab) fp32 copy and two passes over it (26m on a CPU: ~8% of a step)."""
    return torch.compile(token_cross_entropy_sum)


class CausalLM:
    """Next-token prediction on packed windows of seq_len+1 tokens (inputs = [:-1], targets = [1:])."""

    name = "causal_lm"
    cross_entropy_sum = staticmethod(token_cross_entropy_sum)  # the trainer swaps in the compiled one

    def weight(self, batch: torch.Tensor) -> float:
        return float(batch.shape[0] * (batch.shape[1] - 1))

    def loss(self, model: torch.nn.Module, batch: torch.Tensor) -> LossOutput:
        inputs, targets = batch[:, :-1], batch[:, 1:]
        logits = model(inputs)
        return LossOutput(self.cross_entropy_sum(logits, targets), self.weight(batch))


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


@dataclass
class Stage:
    """A training stage: its objective, how it opens its data, and its packaged recipes' folder."""
    name: str
    objective: Callable[[], Objective]
    recipes: str  # folder under configs/


STAGES = {"pretrain": Stage("pretrain", CausalLM, "pretrain")}
