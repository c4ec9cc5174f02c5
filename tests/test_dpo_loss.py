"""DPO-family losses: loss, rewards and gradients equal TRL's on a tiny model and a fixed batch (sigmoid,
hinge, ipo, robust, rpo through DPOTrainer; simpo and the odds ratio through TRL's CPO/ORPO loss methods);
conservative DPO and ORPO's NLL against the papers' formulas; the three reference mechanisms agree."""
import copy
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from zhllm import ZhllmError
from zhllm.train.dpo_loss import (DPO, adapter_reference, forward_logps, model_reference, preference_loss,
                                  sequence_logps)

B, T = 3, 14
TOL = 1e-5


def _batch(seed: int = 0) -> dict:
    """B pairs as 2B right-padded rows (chosen first): prompt tokens, then responses of different lengths."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 300, (2 * B, T), generator=g)
    attention = torch.ones_like(ids)
    completion = torch.zeros_like(ids)
    for row, (prompt, end) in enumerate([(4, 14), (6, 11), (3, 9), (4, 12), (6, 14), (3, 13)]):
        attention[row, end:] = 0
        completion[row, prompt:end] = 1
    ids = ids * attention
    labels = ids.masked_fill(completion == 0, -100)
    return {"input_ids": ids, "attention_mask": attention, "labels": labels, "completion_mask": completion}


class Logits(torch.nn.Module):
    """A transformers CausalLM seen the way zhllm's objectives call a model: model(ids, attention_mask) -> logits."""

    def __init__(self, hf):
        super().__init__()
        self.hf = hf

    def forward(self, input_ids, attention_mask=None):
        return self.hf(input_ids=input_ids, attention_mask=attention_mask).logits


@pytest.fixture(scope="module")
def models(tiny_model_dir):
    from transformers import AutoModelForCausalLM
    ref = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    policy = copy.deepcopy(ref)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # the policy has moved away from the reference, so log-ratios are not zero
        for p in policy.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return policy, ref


@pytest.fixture(scope="module")
def trl_tokenizer(tokenizer_dir):
    from zhllm.tokenizer.load import load_tokenizer
    return load_tokenizer(tokenizer_dir)


def _trl_dpo(policy, ref, tokenizer, tmp_path, **config):
    """TRL's DPOTrainer on copies of the models: (loss, metrics, {param name: grad})."""
    pytest.importorskip("trl", reason="trl is the reference implementation (pip install -e .[test])")
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer
    policy, ref = copy.deepcopy(policy), copy.deepcopy(ref)
    data = Dataset.from_dict({"prompt": ["你好"], "chosen": ["世界"], "rejected": ["天气"]})
    args = DPOConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, bf16=False, **config)
    trainer = DPOTrainer(model=policy, ref_model=ref, args=args, train_dataset=data, processing_class=tokenizer)
    trainer.model.train()
    batch = _batch()
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "completion_mask")}
    loss = trainer._compute_loss(trainer.model, inputs, False)
    loss.backward()
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    return float(loss.detach()), metrics, {n: p.grad.clone() for n, p in trainer.model.named_parameters()}


def _ours(policy, ref, **kwargs):
    policy, ref = copy.deepcopy(policy), copy.deepcopy(ref)
    policy.train()
    objective = DPO(reference=model_reference(Logits(ref)), **kwargs)
    out = objective.loss(Logits(policy), _batch())
    loss = out.loss_sum / out.weight
    loss.backward()
    metrics = {k: v / out.weight for k, v in out.metrics.items()}
    return float(loss.detach()), metrics, {n: p.grad.clone() for n, p in policy.named_parameters()}


@pytest.mark.parametrize("trl_config, ours", [
    ({"loss_type": ["sigmoid"], "beta": 0.1}, {"loss": "sigmoid", "beta": 0.1}),
    ({"loss_type": ["hinge"], "beta": 0.5}, {"loss": "hinge", "beta": 0.5}),
    ({"loss_type": ["ipo"], "beta": 0.3}, {"loss": "ipo", "beta": 0.3}),
    ({"loss_type": ["robust"], "beta": 0.2, "label_smoothing": 0.2},
     {"loss": "robust", "beta": 0.2, "label_smoothing": 0.2}),
    ({"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 0.7], "beta": 0.1},
     {"loss": "sigmoid", "beta": 0.1, "rpo_alpha": 0.7}),
], ids=["sigmoid", "hinge", "ipo", "robust", "rpo"])
def test_loss_rewards_and_gradients_equal_trl(models, trl_tokenizer, tmp_path, trl_config, ours):
    policy, ref = models
    trl_loss, trl_metrics, trl_grads = _trl_dpo(policy, ref, trl_tokenizer, tmp_path, **trl_config)
    loss, metrics, grads = _ours(policy, ref, **ours)
    assert abs(trl_loss - loss) < TOL
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected"):
        assert abs(trl_metrics[name] - metrics[name]) < TOL * max(1.0, abs(metrics[name])), name
    assert trl_metrics["rewards/accuracies"] == metrics["rewards/accuracy"]
    assert abs(trl_metrics["rewards/margins"]) > 1e-3  # the check is not vacuous: rewards differ from zero
    for name, g in grads.items():
        other = trl_grads[name.removeprefix("hf.")]
        assert torch.allclose(g, other, atol=TOL, rtol=1e-4), name
    assert max(float(g.abs().max()) for g in grads.values()) > 1e-4


def _logps(seed=3):
    g = torch.Generator().manual_seed(seed)
    lengths_c, lengths_r = torch.tensor([5., 9., 3., 7.]), torch.tensor([8., 4., 6., 7.])
    chosen = (-torch.rand(4, generator=g) * 2 - 0.1) * lengths_c
    rejected = (-torch.rand(4, generator=g) * 2 - 0.1) * lengths_r
    return chosen.requires_grad_(), rejected.requires_grad_(), lengths_c, lengths_r


def _grads(loss, *tensors):
    return torch.autograd.grad(loss, tensors)


def test_simpo_equals_trl_cpo_simpo():
    pytest.importorskip("trl", reason="trl is the reference implementation (pip install -e .[test])")
    from trl.experimental.cpo.cpo_trainer import CPOTrainer
    chosen, rejected, lc, lr = _logps()
    fake = SimpleNamespace(alpha=0.0, beta=2.0, simpo_gamma=0.5, label_smoothing=0.0, loss_type="simpo",
                           accelerator=SimpleNamespace(device=torch.device("cpu")))
    # TRL's CPO trainer averages the log-probs per token before the loss when loss_type is simpo
    want, want_c, want_r = CPOTrainer.cpo_loss(fake, chosen / lc, rejected / lr)
    got = preference_loss("simpo", chosen, rejected, chosen_lengths=lc, rejected_lengths=lr, beta=2.0, gamma=0.5)
    assert torch.allclose(got.losses, want, atol=TOL)
    assert (torch.allclose(got.chosen_rewards, want_c, atol=TOL)
            and torch.allclose(got.rejected_rewards, want_r, atol=TOL))
    for a, b in zip(_grads(got.losses.mean(), chosen, rejected), _grads(want.mean(), chosen, rejected)):
        assert torch.allclose(a, b, atol=TOL)


def test_orpo_odds_ratio_equals_trl_and_nll_is_the_papers():
    pytest.importorskip("trl", reason="trl is the reference implementation (pip install -e .[test])")
    from trl.experimental.orpo.orpo_trainer import ORPOTrainer
    chosen, rejected, lc, lr = _logps()
    fake = SimpleNamespace(beta=0.25, accelerator=SimpleNamespace(device=torch.device("cpu")))
    ratio_losses, want_c, want_r, _, _ = ORPOTrainer.odds_ratio_loss(fake, chosen / lc, rejected / lr)
    got = preference_loss("orpo", chosen, rejected, chosen_lengths=lc, rejected_lengths=lr, beta=0.25)
    # TRL's trainer minimises nll - mean(beta * log sigmoid(log odds)); ours carries the same sign inside
    assert torch.allclose(got.losses, -ratio_losses, atol=TOL)
    assert (torch.allclose(got.chosen_rewards, want_c, atol=TOL)
            and torch.allclose(got.rejected_rewards, want_r, atol=TOL))
    for a, b in zip(_grads(got.losses.mean(), chosen, rejected), _grads(-ratio_losses.mean(), chosen, rejected)):
        assert torch.allclose(a, b, atol=TOL)


def test_orpo_objective_is_response_nll_plus_odds_ratio_term(models):
    """ORPO (Hong et al. 2024, eq. 6): L = L_SFT(chosen response) + λ L_OR, L_OR = -log σ(log odds_c/odds_r)."""
    policy, _ = models
    model, batch = Logits(copy.deepcopy(policy)), _batch()
    out = DPO(loss="orpo", beta=0.25).loss(model, batch)
    with torch.no_grad():
        logits = model(batch["input_ids"], batch["attention_mask"])
        logp = logits.log_softmax(-1)[:, :-1].gather(2, batch["input_ids"][:, 1:, None])[..., 0]
        mask = batch["completion_mask"][:, 1:].bool()
        nll = -logp[:B][mask[:B]].mean()
        avg = torch.stack([logp[i][mask[i]].mean() for i in range(2 * B)])
        odds = avg - torch.log(1 - torch.exp(avg))
        l_or = -F.logsigmoid(odds[:B] - odds[B:])
    assert abs(float(out.loss_sum / out.weight) - float(nll + 0.25 * l_or.mean())) < TOL


def test_conservative_dpo_is_the_papers_formula():
    """cDPO (Mitchell 2023): L = -(1-ε) log σ(β h) - ε log σ(-β h), h the DPO log-ratio difference."""
    chosen, rejected, _, _ = _logps()
    ref_c, ref_r = chosen.detach() * 0.9, rejected.detach() * 1.1
    eps, beta = 0.1, 0.3
    got = preference_loss("label_smoothing", chosen, rejected, ref_c, ref_r, beta=beta, label_smoothing=eps).losses
    for i in range(4):
        h = float((chosen[i] - ref_c[i]) - (rejected[i] - ref_r[i]))
        sig = 1 / (1 + math.exp(-beta * h))
        want = -(1 - eps) * math.log(sig) - eps * math.log(1 - sig)
        assert abs(float(got[i]) - want) < TOL


def test_sequence_logps_count_only_labelled_tokens():
    logits = torch.randn(2, 5, 7)
    labels = torch.tensor([[-100, 3, 4, -100, -100], [-100, -100, 1, 2, 6]])
    total, lengths, _ = sequence_logps(logits, labels)
    logp = logits.log_softmax(-1)
    assert lengths.tolist() == [2, 3]
    assert torch.allclose(total[0], logp[0, 0, 3] + logp[0, 1, 4])
    assert torch.allclose(total[1], logp[1, 1, 1] + logp[1, 2, 2] + logp[1, 3, 6])


def test_copy_adapter_and_precomputed_references_agree(tiny_model_dir):
    from zhllm.model.io import load_model
    from zhllm.train.lora import apply_lora
    base = load_model(tiny_model_dir)
    frozen = copy.deepcopy(base)
    policy = apply_lora(base, r=4, alpha=8)
    with torch.no_grad():  # a trained adapter: the policy differs from its base
        for n, p in policy.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    batch = _batch()
    want = forward_logps(frozen, batch)[0]
    via_adapter = adapter_reference(policy)(batch)
    assert torch.allclose(via_adapter, want, atol=TOL)
    assert not torch.allclose(forward_logps(policy, batch)[0], want, atol=1e-3)  # the adapter matters
    trainable = {n for n, p in policy.named_parameters() if p.requires_grad}
    assert trainable and all("lora" in n for n in trainable)  # disabling and re-enabling kept the grad flags
    losses = []
    for reference in (model_reference(frozen), adapter_reference(policy), None):
        b = dict(batch, ref_logps=want) if reference is None else batch
        losses.append(float(DPO(beta=0.1, reference=reference).loss(policy, b).loss_sum))
    assert max(losses) - min(losses) < TOL


def test_bad_settings_are_one_line_errors():
    for kwargs, words in [({"loss": "dpo"}, "dpo.loss"), ({"beta": 0}, "beta"),
                          ({"loss": "robust", "label_smoothing": 0.5}, "[0, 0.5)"),
                          ({"loss": "sigmoid", "label_smoothing": 0.1}, "label_smoothing"),
                          ({"loss": "ipo", "gamma": 1.0}, "simpo")]:
        with pytest.raises(ZhllmError, match=words.replace("[", r"\[").replace(")", r"\)")):
            DPO(**kwargs)
    with pytest.raises(ZhllmError, match="adapter"):
        adapter_reference(torch.nn.Linear(2, 2))({"input_ids": torch.zeros(2, 2, dtype=torch.long)})
    with pytest.raises(ZhllmError, match="ref_logps"):
        DPO().reference({})
