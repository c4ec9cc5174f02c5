"""Validation loss, perplexity and bits per byte: the one implementation. The training loop's periodic eval,
the pipeline's eval stage and `zhllm eval` all call `evaluate_loss`, so one checkpoint on the same windows
gets the same figure wherever it is measured.

The windows are the first ones of a dataset read in order (`batch(start, count)`): rank r of w reads
micro-batches (i*w + r) for i < n, i.e. together the first n*w*batch_size windows, whatever w is.
"""
from __future__ import annotations

import math
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence

import torch
import torch.nn.functional as F

from ..device import to_device


@dataclass
class LossOutput:
    loss_sum: torch.Tensor   # summed over the batch's `weight` units (tokens for LM losses)
    weight: float            # how many units loss_sum covers
    # Positions the forward computed, for objectives whose rows are not train.seq_len long (pairs padded to
    # their batch's longest, rollouts); None: the trainer counts batch_size x seq_len.
    tokens: int | None = field(default=None, kw_only=True)


class LossObjective(Protocol):
    """What evaluation needs of an objective (train/objectives.py's satisfy it without eval importing them)."""

    def loss(self, model: torch.nn.Module, batch: Any) -> LossOutput: ...


def token_cross_entropy_sum(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Summed next-token cross-entropy, computed in fp32 whatever the logits' dtype.

    bf16 logits lose ~3 significant digits, which shows up as a noisy loss when the softmax is taken
    in bf16; upcasting the (B*T, vocab) logits costs little next to the lm_head matmul that made them.
    """
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                           ignore_index=ignore_index, reduction="sum")


class NextTokenLoss:
    """Next-token prediction on packed windows of seq_len+1 tokens (inputs = [:-1], targets = [1:]): the loss
    of a checkpoint on token shards. Pretraining trains on exactly this (train/objectives.py: CausalLM)."""

    name = "causal_lm"
    cross_entropy_sum = staticmethod(token_cross_entropy_sum)  # the trainer swaps in a compiled one

    def weight(self, batch: torch.Tensor) -> float:
        return float(batch.shape[0] * (batch.shape[1] - 1))

    def loss(self, model: torch.nn.Module, batch: torch.Tensor) -> LossOutput:
        inputs, targets = batch[:, :-1], batch[:, 1:]
        logits = model(inputs)
        return LossOutput(self.cross_entropy_sum(logits, targets), self.weight(batch))


def eval_batches(num_windows: int, batch_size: int, batches: int, world: int = 1) -> int:
    """Micro-batches each rank evaluates: `batches`, fewer when the split is short, at least 1."""
    return max(1, min(batches, num_windows // max(batch_size * world, 1)))


@torch.no_grad()
def token_nll(model: torch.nn.Module, objective: LossObjective, data, batch_size: int, batches: int, *,
              device: torch.device | str | None = None, autocast: AbstractContextManager | None = None,
              rank: int = 0, world: int = 1, extra: dict[str, float] | None = None) -> tuple[float, float]:
    """(summed negative log-likelihood in nats, units it covers) over this rank's share of the eval windows.
    Units are the objective's loss units: predicted tokens (CausalLM), unmasked label tokens (SFT) or pairs
    (DPO). `extra` receives the sums of an objective's own figures (`metrics` of its loss output)."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    nll, units = 0.0, 0.0
    try:
        for i in range(eval_batches(len(data), batch_size, batches, world)):
            batch = to_device(data.batch((i * world + rank) * batch_size, batch_size), device)
            with autocast if autocast is not None else nullcontext():
                out = objective.loss(model, batch)
            nll += float(out.loss_sum)
            units += out.weight
            for k, v in getattr(out, "metrics", {}).items():
                if extra is not None:
                    extra[k] = extra.get(k, 0.0) + v
    finally:
        model.train(was_training)
    return nll, units


def loss_metrics(nll: float, units: float, bytes_per_token: float | None = None) -> dict:
    """val_loss (nats per unit), val_ppl, and val_bpb when the text's UTF-8 bytes per token is known."""
    loss = nll / max(units, 1e-12)
    result = {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0))}
    if bytes_per_token:
        result["val_bpb"] = loss / math.log(2) / bytes_per_token
    return result


def evaluate_loss(model: torch.nn.Module, objective: LossObjective, data, batch_size: int, batches: int, *,
                  device: torch.device | str | None = None, autocast: AbstractContextManager | None = None,
                  rank: int = 0, world: int = 1,
                  reduce: Callable[[Sequence[float]], Sequence[float]] | None = None,
                  bytes_per_token: float | None = None) -> dict:
    """Mean loss over the first `batches * batch_size * world` windows of `data` (the same windows every
    call, so successive evals are comparable). Under DDP/FSDP every rank calls it and `reduce` sums the
    ranks' [nll, units] (the forward is collective under FSDP, so every rank runs the same number of
    batches). bits/byte uses `data.bytes_per_token` unless given: the split being measured, not another."""
    extra: dict[str, float] = {}
    nll, units = token_nll(model, objective, data, batch_size, batches, device=device, autocast=autocast,
                           rank=rank, world=world, extra=extra)
    if reduce is not None:
        nll, units, *sums = reduce([nll, units, *extra.values()])
        extra = dict(zip(extra, sums))
    if bytes_per_token is None:
        bytes_per_token = getattr(data, "bytes_per_token", None)
    result = loss_metrics(nll, units, bytes_per_token)
    result.update({f"val_{k}": v / max(units, 1e-12) for k, v in extra.items()})  # means per unit
    # Perplexity and bits per byte describe the data's negative log-likelihood: the loss itself for the LM
    # objectives, one of an objective's own figures for others (distillation's `ce`), none for preferences.
    data_nll = getattr(objective, "data_nll", "loss")
    if data_nll != "loss":
        del result["val_ppl"]
        result.pop("val_bpb", None)
        if data_nll is not None and f"val_{data_nll}" in result:
            nll_metrics = loss_metrics(result[f"val_{data_nll}"], 1.0, bytes_per_token)
            result.update({k: v for k, v in nll_metrics.items() if k != "val_loss"})
    result["val_windows"] = eval_batches(len(data), batch_size, batches, world) * batch_size * world
    return result
