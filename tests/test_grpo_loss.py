"""GRPO's loss on a fixed batch: equal to the formulas written out here, and to TRL's GRPOTrainer._compute_loss
(the method itself, called on a stand-in trainer whose per-token log-probs are the batch's)."""
import math
from collections import defaultdict
from contextlib import nullcontext
from types import SimpleNamespace

import pytest
import torch

from zhllm.errors import ZhllmError
from zhllm.train import grpo_loss as grpo_loss_module
from zhllm.train.grpo_loss import group_advantages, grpo_loss, k3_kl, token_logps_and_entropy

G = 3
REWARDS = torch.tensor([1.0, 0.0, 0.5, 2.0, 2.0, 2.0])  # the second group all agrees: advantage 0
MASK = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 1, 0], [1, 1, 0, 0]],
                    dtype=torch.bool)


def batch():
    g = torch.Generator().manual_seed(3)
    logps = -torch.rand(6, 4, generator=g) * 3
    old = logps + (torch.rand(6, 4, generator=g) - 0.5) * 1.2  # some ratios leave the clip range
    ref = logps + (torch.rand(6, 4, generator=g) - 0.5) * 0.6
    return logps, old, ref


def written_out_advantages(rewards, scale):
    out = []
    for start in range(0, len(rewards), G):
        group = [float(r) for r in rewards[start:start + G]]
        mean = sum(group) / G
        std = math.sqrt(sum((r - mean) ** 2 for r in group) / (G - 1))
        out += [(r - mean) / (std + 1e-4) if scale else r - mean for r in group]
    return out


def written_out_loss(logps, old, ref, adv, mask, loss_type, eps_low, eps_high, beta, max_len):
    """Token by token: -min(r A, clip(r) A) + beta (exp(ref - lp) - (ref - lp) - 1), then aggregated."""
    rows = []
    for i in range(logps.shape[0]):
        row = []
        for t in range(logps.shape[1]):
            if not mask[i, t]:
                continue
            lp, o, rf = float(logps[i, t]), float(old[i, t]), float(ref[i, t])
            r = math.exp(lp - o)
            term = -min(r * adv[i], min(max(r, 1 - eps_low), 1 + eps_high) * adv[i])
            term += beta * (math.exp(rf - lp) - (rf - lp) - 1)
            row.append(term)
        rows.append(row)
    if loss_type == "grpo":
        return sum(sum(r) / len(r) for r in rows) / len(rows)
    if loss_type == "bnpo":
        return sum(sum(r) for r in rows) / sum(len(r) for r in rows)
    return sum(sum(r) for r in rows) / (len(rows) * max_len)


@pytest.mark.parametrize("scale", [True, False])
def test_group_advantages_equal_the_written_out_formula(scale):
    got = group_advantages(REWARDS, G, scale)
    assert got.tolist() == pytest.approx(written_out_advantages(REWARDS, scale), abs=1e-6)
    assert got[3:].abs().max() == 0  # an agreeing group teaches nothing


def test_group_advantages_match_trl_scaling():
    from trl.trainer.utils import nanstd
    mean = REWARDS.view(-1, G).mean(1).repeat_interleave(G)
    std = nanstd(REWARDS.view(-1, G), dim=1).repeat_interleave(G)
    assert torch.allclose(group_advantages(REWARDS, G), (REWARDS - mean) / (std + 1e-4))


CASES = [("grpo", 0.2, 0.2, 0.04), ("bnpo", 0.2, 0.28, 0.1), ("dr_grpo", 0.1, 0.3, 0.0), ("grpo", 0.2, 0.28, 0.0)]


@pytest.mark.parametrize("loss_type,eps_low,eps_high,beta", CASES)
def test_loss_equals_the_written_out_formula(loss_type, eps_low, eps_high, beta):
    logps, old, ref = batch()
    adv = group_advantages(REWARDS, G)
    out = grpo_loss(logps, old, ref if beta else None, adv, MASK, loss_type=loss_type, epsilon_low=eps_low,
                    epsilon_high=eps_high, beta=beta, max_completion_length=5)
    want = written_out_loss(logps, old, ref, adv.tolist(), MASK, loss_type, eps_low, eps_high, beta, 5)
    assert float(out.loss) == pytest.approx(want, rel=1e-5, abs=1e-7)
    ratio = torch.exp(logps - old)
    a = adv[:, None]
    clipped = (((ratio < 1 - eps_low) & (a < 0)) | ((ratio > 1 + eps_high) & (a > 0)))[MASK]
    assert 0 < out.clip_fraction == pytest.approx(float(clipped.float().mean()))
    if beta:
        assert out.kl == pytest.approx(float(k3_kl(logps, ref)[MASK].mean()))
    else:
        assert out.kl is None


def trl_loss(logps, old, ref, adv, mask, loss_type, eps_low, eps_high, beta, max_len, grad_accum=1):
    """TRL's own `_compute_loss`, on a stand-in for the trainer: its model call returns our log-probs."""
    from trl import GRPOTrainer
    accelerator = SimpleNamespace(gather=lambda x: x, reduce=lambda x, reduction: x, autocast=nullcontext,
                                  gather_for_metrics=lambda x: x, num_processes=1)
    fake = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (logps, torch.zeros_like(logps), None),
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level="token",
        beta=beta, loss_type=loss_type, epsilon_low=eps_low, epsilon_high=eps_high,
        args=SimpleNamespace(delta=None, use_bias_correction_kl=False), use_vllm=False,
        model=SimpleNamespace(training=True), current_gradient_accumulation_steps=grad_accum,
        max_completion_length=max_len, _entropy_bonus_enabled=False, aux_loss_enabled=False,
        accelerator=accelerator, _metrics={"train": defaultdict(list)})
    inputs = {"prompt_ids": torch.zeros(6, 2, dtype=torch.long), "prompt_mask": torch.ones(6, 2, dtype=torch.long),
              "completion_ids": torch.zeros(6, 4, dtype=torch.long), "completion_mask": mask.long(),
              "advantages": adv, "old_per_token_logps": old, "ref_per_token_logps": ref}
    loss = GRPOTrainer._compute_loss(fake, None, inputs)
    return float(loss), fake._metrics["train"]


@pytest.mark.parametrize("loss_type,eps_low,eps_high,beta", CASES)
def test_loss_equals_trls(loss_type, eps_low, eps_high, beta):
    pytest.importorskip("trl")
    logps, old, ref = batch()
    adv = group_advantages(REWARDS, G)
    ours = grpo_loss(logps, old, ref if beta else None, adv, MASK, loss_type=loss_type, epsilon_low=eps_low,
                     epsilon_high=eps_high, beta=beta, max_completion_length=5)
    theirs, metrics = trl_loss(logps, old, ref, adv, MASK, loss_type, eps_low, eps_high, beta, 5)
    assert float(ours.loss) == pytest.approx(theirs, rel=1e-6, abs=1e-8)
    assert ours.clip_fraction == pytest.approx(metrics["clip_ratio/region_mean"][0])
    if beta:
        assert ours.kl == pytest.approx(metrics["kl"][0])


def test_first_pass_gradient_is_the_advantage_weighted_log_likelihood():
    """On the rollout's own policy (ratio 1) the clip is inactive: d loss / d logp = -A / |o| per token (grpo)."""
    logps = batch()[0].clone().requires_grad_(True)
    adv = group_advantages(REWARDS, G)
    grpo_loss(logps, logps.detach(), None, adv, MASK).loss.backward()
    want = -adv[:, None] / MASK.sum(-1, keepdim=True) / 6 * MASK
    assert torch.allclose(logps.grad, want, atol=1e-7)


def test_bad_settings_are_clear_errors():
    logps = batch()[0]
    with pytest.raises(ZhllmError, match="loss_type"):
        grpo_loss(logps, logps, None, REWARDS, MASK, loss_type="ppo")
    with pytest.raises(ZhllmError, match="reference"):
        grpo_loss(logps, logps, None, REWARDS, MASK, beta=0.1)
    with pytest.raises(ZhllmError, match="groups of 4"):
        group_advantages(REWARDS, 4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_token_logps_and_entropy_equal_the_whole_tensor_formula(monkeypatch, dtype):
    """Chunked (3 positions at a time here, so chunks split rows and end short): the same log-probs, entropies
    and logit gradients as log_softmax over the whole tensor, and TRL's where it computes them."""
    monkeypatch.setattr(grpo_loss_module, "ROWS_PER_CHUNK", 3)
    g = torch.Generator().manual_seed(5)
    logits = (torch.randn(4, 5, 11, generator=g) * 3).to(dtype).requires_grad_(True)
    targets = torch.randint(0, 11, (4, 5), generator=g)
    weights = torch.randn(4, 5, generator=g)
    logps, entropy = token_logps_and_entropy(logits, targets, temperature=0.7)
    (logps * weights).sum().backward()
    ours = logits.grad.clone()
    logits.grad = None
    whole = (logits.float() / 0.7).log_softmax(-1)
    want_logps = whole.gather(-1, targets[..., None]).squeeze(-1)
    (want_logps * weights).sum().backward()
    assert torch.allclose(logps, want_logps, atol=1e-5)
    assert torch.allclose(entropy, -(whole.exp() * whole).sum(-1).detach(), atol=1e-4)
    assert torch.allclose(ours.float(), logits.grad.float(), atol=1e-5 if dtype == torch.float32 else 1e-2)
    assert not entropy.requires_grad
    trl_utils = pytest.importorskip("trl.trainer.utils")
    with torch.no_grad():
        assert torch.allclose(logps, trl_utils.selective_log_softmax(logits.float(), targets, temperature=0.7),
                              atol=1e-5)
        assert torch.allclose(entropy, trl_utils.entropy_from_logits(logits.float() / 0.7), atol=1e-4)
