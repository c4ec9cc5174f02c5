"""PPO's tensor math, apart from any model or loop: per-token rewards with the KL penalty, GAE, whitening,
the clipped policy and value losses, and the adaptive KL coefficient.

Shapes: (N, T) over completion tokens, left-aligned with `mask` True on real ones. Token t's value V_t is the
value model's output at the position that predicts token t (the state before it), as in TRL's PPOTrainer.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


def token_rewards(scores: torch.Tensor, logps: torch.Tensor, ref_logps: torch.Tensor | None, mask: torch.Tensor,
                  kl_coef: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(rewards (N, T), per-token KL (N, T)): -kl_coef * (log pi - log pi_ref) at every token (k1, zero
    without a reference), plus each row's scalar score at its last real token."""
    kl = (logps - ref_logps) * mask if ref_logps is not None else torch.zeros_like(logps)
    rewards = -kl_coef * kl
    last = mask.long().sum(1).clamp(min=1) - 1
    rewards[torch.arange(len(scores)), last] += scores.to(rewards.dtype)
    return rewards * mask, kl


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, returns) by generalised advantage estimation; the value after a row's last token is 0."""
    n, t = rewards.shape
    m = mask.to(values.dtype)
    advantages = torch.zeros_like(values)
    running = torch.zeros(n, dtype=values.dtype, device=values.device)
    for i in reversed(range(t)):
        next_value = values[:, i + 1] * m[:, i + 1] if i + 1 < t else torch.zeros_like(running)
        delta = rewards[:, i] + gamma * next_value - values[:, i]
        running = (delta + gamma * lam * running) * m[:, i]
        advantages[:, i] = running
    return advantages, (advantages + values) * m


def whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over the masked entries (unbiased variance, as TRL's masked_whiten)."""
    m = mask.to(x.dtype)
    n = m.sum()
    mean = (x * m).sum() / n
    var = (((x - mean) * m) ** 2).sum() / (n - 1).clamp(min=1)
    return (x - mean) * torch.rsqrt(var + eps) * m


@dataclass
class PPOLoss:
    loss: torch.Tensor          # policy + vf_coef * value - ent_coef * entropy, a masked token mean
    policy: float
    value: float
    clip_fraction: float        # share of tokens whose ratio was clipped
    value_clip_fraction: float


def ppo_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, values: torch.Tensor,
             old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, entropy: torch.Tensor | None = None,
             *, cliprange: float = 0.2, cliprange_value: float = 0.2, vf_coef: float = 0.1,
             ent_coef: float = 0.0) -> PPOLoss:
    m = mask.to(logps.dtype)
    n = m.sum().clamp(min=1)
    ratio = torch.exp(logps - old_logps)
    pg = torch.maximum(-advantages * ratio, -advantages * ratio.clamp(1 - cliprange, 1 + cliprange))
    policy = (pg * m).sum() / n
    clipped_values = old_values + (values - old_values).clamp(-cliprange_value, cliprange_value)
    vf = 0.5 * torch.maximum((values - returns) ** 2, (clipped_values - returns) ** 2)
    value = (vf * m).sum() / n
    loss = policy + vf_coef * value
    if ent_coef and entropy is not None:
        loss = loss - ent_coef * (entropy * m).sum() / n
    with torch.no_grad():
        clip_fraction = float((((ratio - 1).abs() > cliprange).to(m.dtype) * m).sum() / n)
        value_clip_fraction = float((((values - returns) ** 2 < (clipped_values - returns) ** 2).to(m.dtype) * m).sum()
                                    / n)
    return PPOLoss(loss, float(policy.detach()), float(value.detach()), clip_fraction, value_clip_fraction)


def adapt_kl_coef(kl_coef: float, kl: float, target: float, samples: int, horizon: int) -> float:
    """Ziegler et al.'s adaptive controller: move kl_coef towards the value that holds the KL at `target`."""
    error = max(-0.2, min(0.2, kl / target - 1))
    return kl_coef * (1 + error * samples / horizon)
