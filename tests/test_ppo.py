"""`zhllm ppo`: the tensor math equals direct formulas (GAE as the textbook recursion, clipped losses, KL
rewards, whitening, the adaptive controller), a tiny model learns a verifiable toy task with bounded KL, a
killed run resumes bitwise between passes (adaptive KL coefficient included; with a LoRA policy too), and recipe
mistakes are one line."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from test_grpo import QUESTIONS
from train_support import run_cli, run_on_two_ranks, set_args
from zhllm.cli import main
from zhllm.train.ppo import run_ppo
from zhllm.train.ppo_loss import adapt_kl_coef, gae, ppo_loss, token_rewards, whiten


def test_gae_is_the_recursion():
    torch.manual_seed(0)
    rewards, values = torch.randn(3, 5), torch.randn(3, 5)
    lengths = [5, 3, 1]
    mask = torch.tensor([[i < n for i in range(5)] for n in lengths])
    gamma, lam = 0.9, 0.8
    adv, ret = gae(rewards * mask, values * mask, mask, gamma, lam)
    for r, n in enumerate(lengths):
        running = 0.0
        for t in reversed(range(n)):
            next_value = float(values[r, t + 1]) if t + 1 < n else 0.0
            delta = float(rewards[r, t]) + gamma * next_value - float(values[r, t])
            running = delta + gamma * lam * running
            assert float(adv[r, t]) == pytest.approx(running, abs=1e-5)
            assert float(ret[r, t]) == pytest.approx(running + float(values[r, t]), abs=1e-5)
        assert not adv[r, n:].any() and not ret[r, n:].any()


def test_token_rewards_whitening_and_controller():
    logps, ref = torch.tensor([[-1.0, -2.0, -0.5]]), torch.tensor([[-1.5, -1.0, -0.5]])
    mask = torch.tensor([[True, True, False]])
    rewards, kl = token_rewards(torch.tensor([2.0]), logps, ref, mask, kl_coef=0.1)
    assert rewards[0].tolist() == pytest.approx([-0.05, 0.1 + 2.0, 0.0])  # the score lands on the last real token
    assert kl[0].tolist() == pytest.approx([0.5, -1.0, 0.0])
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    m = torch.tensor([[True, True, True, False]])
    assert whiten(x, m)[0].tolist() == pytest.approx([-1.0, 0.0, 1.0, 0.0], abs=1e-4)  # unbiased std of 1,2,3 = 1
    assert adapt_kl_coef(0.1, kl=12.0, target=6.0, samples=100, horizon=1000) == pytest.approx(0.1 * (1 + 0.2 * 0.1))
    assert adapt_kl_coef(0.1, kl=5.4, target=6.0, samples=100, horizon=1000) == pytest.approx(0.1 * (1 - 0.1 * 0.1))


def test_ppo_loss_is_the_written_out_formula():
    torch.manual_seed(1)
    n, t = 4, 6
    logps, old = torch.randn(n, t) * 0.3 - 1, torch.randn(n, t) * 0.3 - 1
    adv, ret = torch.randn(n, t), torch.randn(n, t)
    values, old_values = torch.randn(n, t), torch.randn(n, t)
    entropy = torch.rand(n, t)
    mask = torch.rand(n, t) > 0.3
    eps, eps_v, vf, ent = 0.2, 0.3, 0.5, 0.01
    out = ppo_loss(logps, old, adv, values, old_values, ret, mask, entropy, cliprange=eps, cliprange_value=eps_v,
                   vf_coef=vf, ent_coef=ent)
    pg_terms, vf_terms, ent_terms = [], [], []
    for i in range(n):
        for j in range(t):
            if not mask[i, j]:
                continue
            ratio = float(torch.exp(logps[i, j] - old[i, j]))
            a = float(adv[i, j])
            pg_terms.append(max(-a * ratio, -a * min(max(ratio, 1 - eps), 1 + eps)))
            v, v0, r = float(values[i, j]), float(old_values[i, j]), float(ret[i, j])
            v_clip = v0 + min(max(v - v0, -eps_v), eps_v)
            vf_terms.append(0.5 * max((v - r) ** 2, (v_clip - r) ** 2))
            ent_terms.append(float(entropy[i, j]))
    k = len(pg_terms)
    expected = sum(pg_terms) / k + vf * sum(vf_terms) / k - ent * sum(ent_terms) / k
    assert float(out.loss) == pytest.approx(expected, rel=1e-5)
    assert out.policy == pytest.approx(sum(pg_terms) / k, rel=1e-5) and out.value == pytest.approx(sum(vf_terms) / k,
                                                                                                      rel=1e-5)


@pytest.fixture()
def prompts_file(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": q, "answer": "7"}, ensure_ascii=False) + "\n" for q in QUESTIONS))
    return path


def sets(model_dir, data, out, *extra):
    return [f"model.init_from={model_dir}", f"data.path={data}", f"out_dir={out}", "train.max_steps=6",
            "train.batch_size=2", "train.seq_len=64", "train.lr=1e-2", "train.threads=1", "train.precision=fp32",
            "ppo.max_new_tokens=3", "ppo.num_generations=4", "ppo.kl_coef=0.01", "checkpoint.every=0",
            "log.every=1", "log.progress=false", "log.tensorboard=false", "log.plots=false", *extra]


def records(run_dir):
    from zhllm.train.metrics import read_metrics
    return [r for r in read_metrics(run_dir) if r.get("kind", "train") == "train"]


def test_tiny_model_learns_to_answer_seven(tmp_path, tiny_model_dir, prompts_file):
    torch.set_num_threads(1)
    out = tmp_path / "run"
    run_ppo("tiny", sets(tiny_model_dir, prompts_file, out, "train.max_steps=60", "train.batch_size=4", "train.lr=2e-2",
                         "ppo.num_generations=16", "log.plots=true"))
    rs = records(out)
    assert [r["step"] for r in rs] == list(range(1, 61))
    assert sum(r["reward"] for r in rs[:3]) / 3 < 0.2
    assert sum(r["reward"] for r in rs[-5:]) / 5 > 0.8
    kls = [r["kl"] for r in rs]
    assert kls[0] == pytest.approx(0, abs=1e-3) and max(kls) < 20
    for key in ("value_loss", "policy_loss", "clip_ratio", "value_clip_ratio", "explained_variance", "entropy",
                "kl_coef", "rollout_s"):
        assert all(key in r for r in rs), key
    ckpt = out / "checkpoints" / "step_60"
    from zhllm.model.io import load_model
    from zhllm.model.reward import is_reward_model_dir
    assert load_model(ckpt).config.vocab_size > 0  # the policy: a plain HF causal LM directory
    assert is_reward_model_dir(ckpt / "value")
    assert (out / "plots" / "reward.png").is_file() and (out / "plots" / "kl.png").is_file()


def test_kill_between_passes_and_resume_is_bitwise_equal(tmp_path, tiny_model_dir, prompts_file):
    torch.set_num_threads(1)
    extra = ["ppo.ppo_epochs=2", "ppo.target_kl=0.01", "ppo.kl_horizon=20", "checkpoint.every=3"]
    run_ppo("tiny", sets(tiny_model_dir, prompts_file, tmp_path / "ref", *extra))
    args = [sys.executable, "-m", "zhllm", "ppo", "--config", "tiny"]
    for s in sets(tiny_model_dir, prompts_file, tmp_path / "cut", *extra):
        args += ["--set", s]
    died = subprocess.run(args, env={**os.environ, "OMP_NUM_THREADS": "1", "ZHLLM_FAIL_AT_STEP": "3"},
                          capture_output=True, text=True)
    assert died.returncode == 1, died.stderr[-2000:]
    assert (tmp_path / "cut" / "checkpoints" / "step_3" / "grpo_rollouts.pt").is_file()  # pass 1 of 2 done
    run_ppo("tiny", sets(tiny_model_dir, prompts_file, tmp_path / "cut", *extra), resume="auto")
    a, b = records(tmp_path / "ref"), records(tmp_path / "cut")
    assert [r["step"] for r in b] == list(range(1, 7))
    assert len({r["kl_coef"] for r in a}) > 1  # the controller moved the coefficient
    for key in ("loss", "reward", "kl", "kl_coef", "value_loss", "policy_loss"):
        assert [r[key] for r in a] == [r[key] for r in b], key
    from safetensors.torch import load_file
    for rel in ("model.safetensors", "value/model.safetensors"):
        wa = load_file(str(tmp_path / "ref" / "checkpoints" / "step_6" / rel))
        wb = load_file(str(tmp_path / "cut" / "checkpoints" / "step_6" / rel))
        assert all(torch.equal(wa[k], wb[k]) for k in wa), rel


def test_lora_policy_with_adapter_reference_resumes_bitwise(tmp_path, tiny_model_dir, prompts_file):
    torch.set_num_threads(1)
    extra = ["lora.enabled=true", "lora.r=4", "ppo.ppo_epochs=2", "train.max_steps=4", "checkpoint.every=2"]
    run_ppo("tiny", sets(tiny_model_dir, prompts_file, tmp_path / "ref", *extra))
    args = [sys.executable, "-m", "zhllm", "ppo", "--config", "tiny"]
    for s in sets(tiny_model_dir, prompts_file, tmp_path / "cut", *extra):
        args += ["--set", s]
    died = subprocess.run(args, env={**os.environ, "OMP_NUM_THREADS": "1", "ZHLLM_FAIL_AT_STEP": "2"},
                          capture_output=True, text=True)
    assert died.returncode == 1, died.stderr[-2000:]
    run_ppo("tiny", sets(tiny_model_dir, prompts_file, tmp_path / "cut", *extra), resume="auto")
    a, b = records(tmp_path / "ref"), records(tmp_path / "cut")
    assert a[0]["kl"] == pytest.approx(0, abs=1e-6) and a[-1]["kl"] != 0  # adapters start at zero: policy == reference
    for key in ("loss", "reward", "kl", "value_loss", "policy_loss"):
        assert [r[key] for r in a] == [r[key] for r in b], key
    from safetensors.torch import load_file
    for rel in ("adapter/adapter_model.safetensors", "model.safetensors", "value/model.safetensors"):
        wa = load_file(str(tmp_path / "ref" / "checkpoints" / "step_4" / rel))
        wb = load_file(str(tmp_path / "cut" / "checkpoints" / "step_4" / rel))
        assert all(torch.equal(wa[k], wb[k]) for k in wa), rel
    base = load_file(str(Path(tiny_model_dir) / "model.safetensors"))
    merged = load_file(str(tmp_path / "ref" / "checkpoints" / "step_4" / "model.safetensors"))
    assert not torch.equal(merged["model.layers.0.self_attn.q_proj.weight"],
                           base["model.layers.0.self_attn.q_proj.weight"])  # the saved policy has the adapter in


def test_lora_policy_under_fsdp_saves_what_ddp_saves(tmp_path, tiny_model_dir, prompts_file):
    # rollouts decode from the gathered policy, the reference runs through the sharded root, and a checkpoint
    # rebuilds the pair from the gathered state: the merged policy, adapter and value model equal DDP's
    from safetensors.torch import load_file
    for parallel in ("fsdp", "ddp"):
        args = ["ppo", "--config", "tiny"] + set_args(sets(
            tiny_model_dir, prompts_file, tmp_path / parallel, "lora.enabled=true", "lora.r=4", "train.max_steps=2",
            "checkpoint.every=2", f"train.parallel={parallel}"))
        run_on_two_ranks(args)
    assert [r["step"] for r in records(tmp_path / "fsdp")] == [1, 2]
    for rel in ("adapter/adapter_model.safetensors", "model.safetensors", "value/model.safetensors"):
        wa = load_file(str(tmp_path / "fsdp" / "checkpoints" / "step_2" / rel))
        wb = load_file(str(tmp_path / "ddp" / "checkpoints" / "step_2" / rel))
        assert set(wa) == set(wb) and all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa), rel
    value = load_file(str(tmp_path / "fsdp" / "checkpoints" / "step_2" / "value/model.safetensors"))
    base = load_file(str(Path(tiny_model_dir) / "model.safetensors"))
    assert not torch.equal(value["model.layers.0.mlp.up_proj.weight"], base["model.layers.0.mlp.up_proj.weight"])


def test_kill_between_passes_under_torchrun_resumes_bitwise(tmp_path, tiny_model_dir, prompts_file):
    # the checkpoint holds every rank's pending rollout (rank 1's was once sampled again), and the adaptive KL
    # controller moves by all ranks' KL, so the coefficient rank 0 saves is every rank's
    from safetensors.torch import load_file
    extra = ["ppo.ppo_epochs=2", "ppo.target_kl=0.01", "ppo.kl_horizon=20", "checkpoint.every=3",
             "train.parallel=ddp"]

    def args(out):
        return ["ppo", "--config", "tiny"] + set_args(sets(tiny_model_dir, prompts_file, out, *extra))
    run_on_two_ranks(args(tmp_path / "ref"))
    died = run_cli(args(tmp_path / "cut"), env={"ZHLLM_FAIL_AT_STEP": "3"}, torchrun=2)
    assert died.returncode != 0 and (tmp_path / "cut" / "checkpoints" / "step_3" / "grpo_rollouts.pt").is_file()
    resumed = run_on_two_ranks(args(tmp_path / "cut") + ["--resume", "auto"])
    assert "sampling it again" not in resumed.stdout + resumed.stderr
    a, b = records(tmp_path / "ref"), records(tmp_path / "cut")
    assert [r["step"] for r in b] == list(range(1, 7))
    for key in ("loss", "reward", "kl", "kl_coef", "value_loss", "policy_loss", "grad_norm"):
        assert [r[key] for r in a] == [r[key] for r in b], key
    for rel in ("model.safetensors", "value/model.safetensors"):
        wa = load_file(str(tmp_path / "ref" / "checkpoints" / "step_6" / rel))
        wb = load_file(str(tmp_path / "cut" / "checkpoints" / "step_6" / rel))
        assert all(torch.equal(wa[k], wb[k]) for k in wa), rel


def test_a_full_state_rebuilds_the_policy_and_value_pair(tiny_model_dir):
    # what a checkpoint under FSDP or with bf16 weights does: load the whole state into an empty pair
    from zhllm.model.io import load_model, model_from_state_dict
    from zhllm.model.reward import load_reward_model
    from zhllm.train.lora import apply_lora
    from zhllm.train.parallel import empty_like
    from zhllm.train.ppo import PolicyAndValue
    both = PolicyAndValue(apply_lora(load_model(tiny_model_dir), r=4), load_reward_model(tiny_model_dir, seed=0))
    with torch.no_grad():
        for name, p in both.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
    state = {n: p.detach().clone() for n, p in both.named_parameters()}  # as bf16 master weights name them
    full = model_from_state_dict(both.config, state, empty_like(both))
    assert type(full) is PolicyAndValue and type(full.value) is type(both.value)
    ids = torch.randint(0, both.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        (la, va), (lb, vb) = both(ids, with_values=True), full(ids, with_values=True)
    assert torch.equal(la, lb) and torch.equal(va, vb)


def test_activation_checkpointing_covers_the_policy_and_the_value_model(tiny_model_dir):
    from zhllm.model.io import load_model
    from zhllm.model.reward import load_reward_model
    from zhllm.train.parallel import apply_activation_checkpointing, decoder_stacks
    from zhllm.train.ppo import PolicyAndValue

    def grads(checkpointed: bool):
        both = PolicyAndValue(load_model(tiny_model_dir), load_reward_model(tiny_model_dir, train=True, seed=0))
        assert len(decoder_stacks(both)) == 2
        if checkpointed:
            apply_activation_checkpointing(both)
            assert all(type(layer.forward).__name__ == "partial"
                       for stack in decoder_stacks(both) for layer in stack.layers)
        ids = torch.randint(0, both.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
        logits, values = both(ids, with_values=True)
        (logits.float().logsumexp(-1).mean() + values.square().mean()).backward()
        return {n: p.grad for n, p in both.named_parameters()}

    plain, checkpointed = grads(False), grads(True)
    assert all(plain[n] is not None for n in plain if n.startswith("value.model.layers"))
    assert all(torch.allclose(plain[n], checkpointed[n], atol=1e-6) for n in plain)


def test_recipe_mistakes_are_one_line_errors(tmp_path, tiny_model_dir, prompts_file, capsys):
    for extra, needle in ((["ppo.cliprange=0"], "ppo.cliprange"),
                          (["eval.every=5"], "eval.every must be 0"),
                          (["lora.qlora=true"], "lora.qlora needs lora.enabled: true"),
                          (["value.init_from=/nope"], "value model /nope: no such directory")):
        argv = ["ppo", "--config", "tiny"] + set_args(sets(tiny_model_dir, prompts_file,
                                                                             tmp_path / "x", *extra))
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert needle in err and len(err.splitlines()) == 1, err
