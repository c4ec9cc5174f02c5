"""GRPO's arithmetic on tensors: group-normalised advantages and the clipped, KL-regularised token loss.

Nothing here runs a model: `group_advantages` turns one reward per completion into advantages, and
`grpo_loss` turns per-token log-probs (current policy, the policy that sampled, the reference) into the loss
of one micro-batch, aggregated per `loss_type` as TRL's GRPOTrainer does:
- grpo: mean over each completion's tokens, then over completions (short answers weigh more per token);
- bnpo: mean over all completion tokens of the micro-batch;
- dr_grpo: sum over tokens / (completions x max_completion_length), a constant normaliser (Dr. GRPO).
The KL to the reference is the k3 estimator exp(ref - logp) - (ref - logp) - 1, added per token with `beta`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import ZhllmError

LOSS_TYPES = ("grpo", "dr_grpo", "bnpo")
STD_EPS = 1e-4  # TRL's: a group whose rewards all agree gets advantage 0, not a division by zero


def group_advantages(rewards: torch.Tensor, group_size: int, scale: bool = True) -> torch.Tensor:
    """(N,) rewards of N = prompts x group_size completions (prompt-major) -> (N,) advantages: reward minus
    its group's mean, divided by the group's (unbiased) std + 1e-4 when `scale`."""
    if group_size < 1 or rewards.numel() % group_size:
        raise ZhllmError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    groups = rewards.float().view(-1, group_size)
    advantages = groups - groups.mean(1, keepdim=True)
    if scale:
        std = groups.std(1, keepdim=True) if group_size > 1 else torch.zeros_like(advantages[:, :1])
        advantages = advantages / (std + STD_EPS)
    return advantages.reshape(-1)


def k3_kl(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(policy || reference) from sampled tokens: always >= 0, unbiased."""
    delta = ref_logps - logps
    return torch.exp(delta) - delta - 1


@dataclass
class GrpoLossOutput:
    loss: torch.Tensor  # the micro-batch's loss (a mean, per loss_type)
    kl: float | None    # masked token mean of k3 (None when beta = 0: no reference pass)
    clip_fraction: float  # share of tokens whose ratio left [1-eps_low, 1+eps_high] on the side that clips


def check_loss_settings(loss_type: str, epsilon_low: float, epsilon_high: float, beta: float) -> None:
    if loss_type not in LOSS_TYPES:
        raise ZhllmError(f"unknown GRPO loss_type {loss_type!r}; choose one of {', '.join(LOSS_TYPES)}")
    if not 0 <= epsilon_low < 1 or epsilon_high < 0:
        raise ZhllmError(f"GRPO clipping needs 0 <= epsilon_low < 1 and epsilon_high >= 0 "
                         f"(got {epsilon_low}, {epsilon_high})")
    if beta < 0:
        raise ZhllmError(f"GRPO beta must be >= 0, got {beta}")


def grpo_loss(logps: torch.Tensor, old_logps: torch.Tensor, ref_logps: torch.Tensor | None,
              advantages: torch.Tensor, mask: torch.Tensor, *, loss_type: str = "grpo", epsilon_low: float = 0.2,
              epsilon_high: float = 0.2, beta: float = 0.0, max_completion_length: int | None = None
              ) -> GrpoLossOutput:
    """logps, old_logps, ref_logps, mask: (N, T) over completion tokens; advantages (N,).

    old_logps are the sampling policy's (equal to logps.detach() on the first pass over a rollout, so the
    ratio is 1 and only its gradient matters); ref_logps may be None when beta == 0."""
    check_loss_settings(loss_type, epsilon_low, epsilon_high, beta)
    mask = mask.to(logps.dtype)
    adv = advantages.to(logps.dtype)[:, None]
    ratio = torch.exp(logps - old_logps)
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    per_token = -torch.min(ratio * adv, clipped * adv)
    kl = None
    if beta != 0.0:
        if ref_logps is None:
            raise ZhllmError("GRPO with beta > 0 needs the reference's log-probs")
        token_kl = k3_kl(logps, ref_logps)
        per_token = per_token + beta * token_kl
        kl = float((token_kl.detach() * mask).sum() / mask.sum().clamp(min=1.0))
    if loss_type == "grpo":
        loss = ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    elif loss_type == "bnpo":
        loss = (per_token * mask).sum() / mask.sum().clamp(min=1.0)
    else:
        if not max_completion_length:
            raise ZhllmError("GRPO loss_type dr_grpo needs max_completion_length")
        loss = (per_token * mask).sum() / (per_token.shape[0] * max_completion_length)
    with torch.no_grad():
        clip = ((ratio < 1 - epsilon_low) & (adv < 0)) | ((ratio > 1 + epsilon_high) & (adv > 0))
        clip_fraction = float((clip.to(mask.dtype) * mask).sum() / mask.sum().clamp(min=1.0))
    return GrpoLossOutput(loss, kl, clip_fraction)


ROWS_PER_CHUNK = 256  # positions whose fp32 vocab rows are live at once (4 MB at a 4,096 vocab)


class _TokenLogProbs(torch.autograd.Function):
    """log softmax(logits / T) at the target tokens, and each position's entropy, a chunk of positions at a
    time. Only the logits and one log-normaliser per position are kept for backward, which recomputes each
    chunk's softmax: the whole-tensor way holds several fp32 copies of (rows x vocab) at the update's peak
    (365 MB against 125 MB for the demo's 190 completions of 40 tokens over a 4,096 vocab)."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, temperature: float):
        flat, flat_targets = logits.reshape(-1, logits.shape[-1]), targets.reshape(-1, 1)
        n = flat.shape[0]
        lse, token, entropy = (torch.empty(n, dtype=torch.float32, device=logits.device) for _ in range(3))
        for start in range(0, n, ROWS_PER_CHUNK):
            rows = slice(start, start + ROWS_PER_CHUNK)
            x = flat[rows].float() / temperature
            norm = x.logsumexp(-1)
            lse[rows] = norm
            token[rows] = x.gather(-1, flat_targets[rows]).squeeze(-1) - norm
            entropy[rows] = norm - ((x - norm[:, None]).exp() * x).sum(-1)  # H = lse - sum(p * x)
        ctx.save_for_backward(logits, targets, lse)
        ctx.temperature = temperature
        token, entropy = token.view(targets.shape), entropy.view(targets.shape)
        ctx.mark_non_differentiable(entropy)
        return token, entropy

    @staticmethod
    def backward(ctx, grad_token: torch.Tensor, _grad_entropy: torch.Tensor | None):
        logits, targets, lse = ctx.saved_tensors
        flat, flat_targets = logits.reshape(-1, logits.shape[-1]), targets.reshape(-1, 1)
        g = grad_token.reshape(-1, 1).float() / ctx.temperature
        grad = torch.empty_like(flat)
        for start in range(0, flat.shape[0], ROWS_PER_CHUNK):
            rows = slice(start, start + ROWS_PER_CHUNK)
            probs = (flat[rows].float() / ctx.temperature - lse[rows, None]).exp_()
            # d log p(target) / d x = onehot(target) - softmax(x), times 1/T for x = logits / T
            grad[rows] = probs.mul_(-g[rows]).scatter_add_(-1, flat_targets[rows], g[rows])
        return grad.view_as(logits), None, None


def token_logps_and_entropy(logits: torch.Tensor, targets: torch.Tensor,
                            temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs of `targets` (fp32, differentiable) and the entropy of each position's distribution
    (fp32, no gradient), from (N, T, V) logits divided by the sampling temperature (the distribution the
    tokens were drawn from, as TRL)."""
    return _TokenLogProbs.apply(logits, targets, temperature)
