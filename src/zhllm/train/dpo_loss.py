"""Preference losses (the DPO family) and the DPO objective for the shared trainer.

The losses are pure functions of per-sequence summed log-probs of the chosen and rejected responses (and
their token counts): `preference_loss` gives per-pair losses and rewards, `summarize` the logged figures.
Conventions follow TRL, so `beta` means the same thing in both (tests/test_dpo_loss.py checks them against
TRL, or against the paper's formula where TRL lacks the loss):

- sigmoid (DPO):        -log σ(β Δ)                         Δ = (π_c - ref_c) - (π_r - ref_r)
- label_smoothing:      -(1-ε) log σ(β Δ) - ε log σ(-β Δ)   conservative DPO (cDPO), ε = label_smoothing
- robust:               ((1-ε)(-log σ(β Δ)) + ε log σ(-β Δ)) / (1 - 2ε)   (unbiased under label noise ε)
- hinge:                max(0, 1 - β Δ)
- ipo:                  (Δc/|c| - Δr/|r| - 1/(2β))²          log-ratios averaged per token, as TRL does
- simpo:                -log σ(β (π_c/|c| - π_r/|r|) - γ)     reference-free, length-normalised
- orpo:                 NLL(c) - β log σ(log odds(c) - log odds(r)),  odds(y) = p/(1-p), p = exp(π_y/|y|)

`rpo_alpha` adds α · NLL(chosen) to any loss (RPO). NLL is the mean over the batch's chosen response tokens
(TRL's "sft" term); with gradient accumulation it becomes the mean of the micro-batches' means.

Rewards are β × (log-ratio) for reference losses and β × (length-normalised log-prob) for the reference-free
ones, as TRL logs them.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..errors import ZhllmError
from .lora import adapters_disabled
from .objectives import LossOutput

LOSSES = ("sigmoid", "label_smoothing", "robust", "hinge", "ipo", "simpo", "orpo")
REFERENCE_FREE = frozenset({"simpo", "orpo"})
IGNORE = -100


@dataclass
class PairLosses:
    losses: torch.Tensor            # (B,) per pair, rpo/orpo NLL not included
    chosen_rewards: torch.Tensor    # (B,) detached
    rejected_rewards: torch.Tensor  # (B,) detached


def check_loss_settings(loss: str, beta: float, label_smoothing: float = 0.0, gamma: float = 0.0,
                        rpo_alpha: float = 0.0) -> None:
    """One clear error for settings that make no sense together (before any model is loaded)."""
    if loss not in LOSSES:
        raise ZhllmError(f"dpo.loss must be one of {', '.join(LOSSES)}, got {loss!r}")
    if not beta > 0:
        raise ZhllmError(f"dpo.beta must be > 0, got {beta}")
    if rpo_alpha < 0:
        raise ZhllmError(f"dpo.rpo_alpha must be >= 0, got {rpo_alpha}")
    if loss == "robust" and not 0 <= label_smoothing < 0.5:
        raise ZhllmError(f"dpo.label_smoothing must be in [0, 0.5) for the robust loss, got {label_smoothing}")
    if loss == "label_smoothing" and not 0 < label_smoothing < 0.5:
        raise ZhllmError(f"dpo.label_smoothing must be in (0, 0.5) for conservative DPO, got {label_smoothing}")
    if loss not in ("robust", "label_smoothing") and label_smoothing:
        raise ZhllmError(f"dpo.label_smoothing applies to the robust and label_smoothing losses, not {loss!r}")
    if gamma and loss != "simpo":
        raise ZhllmError(f"dpo.gamma applies to the simpo loss only, not {loss!r}")


def preference_loss(loss: str, chosen_logps: torch.Tensor, rejected_logps: torch.Tensor,
                    ref_chosen_logps: torch.Tensor | None = None, ref_rejected_logps: torch.Tensor | None = None,
                    chosen_lengths: torch.Tensor | None = None, rejected_lengths: torch.Tensor | None = None,
                    beta: float = 0.1, label_smoothing: float = 0.0, gamma: float = 0.0) -> PairLosses:
    """Per-pair losses from summed response log-probs (B,) of the policy (and reference); lengths are the
    response token counts (needed by ipo, simpo and orpo)."""
    check_loss_settings(loss, beta, label_smoothing, gamma)
    if loss in ("ipo", "simpo", "orpo") and (chosen_lengths is None or rejected_lengths is None):
        raise ValueError(f"the {loss} loss needs the response lengths")
    if loss in REFERENCE_FREE:
        chosen_avg = chosen_logps / chosen_lengths.clamp(min=1)
        rejected_avg = rejected_logps / rejected_lengths.clamp(min=1)
        if loss == "simpo":
            losses = -F.logsigmoid(beta * (chosen_avg - rejected_avg) - gamma)
        else:
            chosen_avg, rejected_avg = chosen_avg.float(), rejected_avg.float()
            log_odds = (chosen_avg - rejected_avg) - (_log1mexp(chosen_avg) - _log1mexp(rejected_avg))
            losses = -beta * F.logsigmoid(log_odds)
        return PairLosses(losses, beta * chosen_avg.detach(), beta * rejected_avg.detach())
    if ref_chosen_logps is None or ref_rejected_logps is None:
        raise ValueError(f"the {loss} loss needs reference log-probs")
    chosen_ratio, rejected_ratio = chosen_logps - ref_chosen_logps, rejected_logps - ref_rejected_logps
    z = beta * (chosen_ratio - rejected_ratio)
    if loss == "sigmoid":
        losses = -F.logsigmoid(z)
    elif loss == "label_smoothing":
        losses = -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
    elif loss == "robust":
        losses = (-(1 - label_smoothing) * F.logsigmoid(z) + label_smoothing * F.logsigmoid(-z)) \
            / (1 - 2 * label_smoothing)
    elif loss == "hinge":
        losses = torch.relu(1 - z)
    else:  # ipo
        delta = chosen_ratio / chosen_lengths.clamp(min=1) - rejected_ratio / rejected_lengths.clamp(min=1)
        losses = (delta - 1 / (2 * beta)) ** 2
    return PairLosses(losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach())


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, stable at both ends (Mächler 2012)."""
    return torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def summarize(pair: PairLosses, chosen_logps: torch.Tensor, rejected_logps: torch.Tensor) -> dict[str, float]:
    """The logged figures of a batch, as sums over its pairs (divide by the pair count for the mean)."""
    margins = pair.chosen_rewards - pair.rejected_rewards
    return {"rewards/chosen": float(pair.chosen_rewards.sum()), "rewards/rejected": float(pair.rejected_rewards.sum()),
            "rewards/margins": float(margins.sum()), "rewards/accuracy": float((margins > 0).float().sum()),
            "logps/chosen": float(chosen_logps.detach().sum()), "logps/rejected": float(rejected_logps.detach().sum())}


# ---------------------------------------------------------------- log-probs of a batch of pairs

def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(summed log-probs (N,), response lengths (N,), per-token log-probs (N, T-1)) of the labelled tokens.
    Labels are aligned with the inputs (-100 outside responses); the shift happens here."""
    targets = labels[:, 1:]
    token_logps = -F.cross_entropy(logits[:, :-1].float().transpose(1, 2), targets.clamp(min=0), reduction="none")
    mask = targets != IGNORE
    token_logps = token_logps * mask
    return token_logps.sum(-1), mask.sum(-1), token_logps


def forward_logps(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One forward over chosen and rejected rows together: (summed log-probs, lengths, per-token log-probs)."""
    logits = model(batch["input_ids"], attention_mask=batch["attention_mask"])
    return sequence_logps(logits, batch["labels"])


# ---------------------------------------------------------------- the reference

# A reference maps a batch (chosen rows first, then rejected) to the reference's summed response log-probs
# of all its rows (2B,), without gradient. Three ways to get one, all giving the same numbers:
Reference = Callable[[dict], torch.Tensor]


def precomputed_reference(batch: dict) -> torch.Tensor:
    """Reference log-probs stored in the batch (`ref_logps`, computed once before training)."""
    if "ref_logps" not in batch:
        raise ZhllmError("this batch carries no precomputed reference log-probs (ref_logps)")
    return batch["ref_logps"]


def model_reference(reference_model: torch.nn.Module) -> Reference:
    """A separate frozen model (a copy of the policy at the start of training)."""
    reference_model.eval().requires_grad_(False)

    def logps(batch: dict) -> torch.Tensor:
        with torch.no_grad():
            return forward_logps(reference_model, batch)[0]
    return logps


def adapter_reference(policy: torch.nn.Module) -> Reference:
    """The LoRA policy itself with its adapters switched off: the base model, without a second copy."""
    def logps(batch: dict) -> torch.Tensor:
        with torch.no_grad(), adapters_disabled(policy):
            return forward_logps(policy, batch)[0]
    return logps


# ---------------------------------------------------------------- the objective

@dataclass
class DPOLossOutput(LossOutput):
    metrics: dict[str, float] = field(default_factory=dict)  # sums over the batch's pairs


class DPO:
    """The preference objective: `weight` is the number of pairs, `loss` one forward over chosen+rejected.

    reference: a `Reference` (frozen copy, disabled adapter) or None to read precomputed log-probs from the
    batch; unused by the reference-free losses."""

    name = "dpo"
    data_nll = None  # a preference loss has no perplexity

    def __init__(self, loss: str = "sigmoid", beta: float = 0.1, label_smoothing: float = 0.0, gamma: float = 0.0,
                 rpo_alpha: float = 0.0, reference: Reference | None = None):
        check_loss_settings(loss, beta, label_smoothing, gamma, rpo_alpha)
        self.loss_type, self.beta, self.label_smoothing, self.gamma = loss, beta, label_smoothing, gamma
        self.rpo_alpha = rpo_alpha
        self.reference = reference if reference is not None else precomputed_reference

    def weight(self, batch: dict) -> float:
        return float(batch["input_ids"].shape[0] // 2)

    def prepare(self, trainer) -> None:
        """Called by the Trainer before the first step: a reference that needs the placed model sets up here."""
        if self.loss_type not in REFERENCE_FREE and hasattr(self.reference, "prepare"):
            self.reference.prepare(trainer)

    def loss(self, model: torch.nn.Module, batch: dict) -> DPOLossOutput:
        logps, lengths, token_logps = forward_logps(model, batch)
        b = logps.shape[0] // 2
        ref = None if self.loss_type in REFERENCE_FREE else self.reference(batch).to(logps)
        pair = preference_loss(self.loss_type, logps[:b], logps[b:],
                               None if ref is None else ref[:b], None if ref is None else ref[b:],
                               lengths[:b], lengths[b:], self.beta, self.label_smoothing, self.gamma)
        loss_sum = pair.losses.sum()
        nll_weight = self.rpo_alpha + (1.0 if self.loss_type == "orpo" else 0.0)
        metrics = summarize(pair, logps[:b], logps[b:])
        if nll_weight:
            nll = -token_logps[:b].sum() / lengths[:b].sum().clamp(min=1)
            loss_sum = loss_sum + nll_weight * nll * b
            metrics["nll/chosen"] = float(nll.detach()) * b
        return DPOLossOutput(loss_sum, float(b), metrics, tokens=batch["input_ids"].numel())
