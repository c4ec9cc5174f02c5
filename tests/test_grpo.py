"""`zhllm grpo` through the shared loop: a tiny model learns a verifiable toy task, kill + --resume auto equals
an uninterrupted run bitwise (mid-rollout, with a KL reference), LoRA with the adapter reference, and bad
prompt files / broken reward functions are one-line errors."""
import json
import os
import subprocess
import sys

import pytest
import torch

from train_support import run_on_two_ranks, set_args
from zhllm.cli import main
from zhllm.infer.prompts import encode_prompt
from zhllm.tokenizer.load import load_tokenizer
from zhllm.train.grpo import run_grpo

QUESTIONS = ["3加4等于几？", "10减3等于几？", "7乘1等于几？", "14除以2等于几？"]


@pytest.fixture()
def prompts_file(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": q, "answer": "7"}, ensure_ascii=False) + "\n" for q in QUESTIONS))
    return path


@pytest.fixture()
def dense_reward(tmp_path):
    """A reward that varies within every group from the first step (unlike "answer 7"), so updates happen."""
    module = tmp_path / "dense_reward.py"
    module.write_text("def distinct(completions, **kw):\n    return [len(set(c)) / 8 for c in completions]\n")
    return f"rewards=[{{type: function, function: '{module}:distinct'}}, {{type: exact, weight: 0.5}}]"


def sets(model_dir, data, out, *extra):
    return [f"model.init_from={model_dir}", f"data.path={data}", f"out_dir={out}", "train.max_steps=6",
            "train.batch_size=2", "train.seq_len=64", "train.lr=1e-2", "train.threads=1", "train.precision=fp32",
            "grpo.max_new_tokens=3", "grpo.num_generations=4", "checkpoint.every=0", "log.every=1",
            "log.progress=false", "log.tensorboard=false", "log.plots=false", *extra]


def records(run_dir):
    from zhllm.train.metrics import read_metrics
    return [r for r in read_metrics(run_dir) if r.get("kind", "train") == "train"]


def test_tiny_model_learns_to_answer_seven(tmp_path, tiny_model_dir, prompts_file):
    """Reward 1 when the answer is 7: from chance (a random model over 400 tokens) to reliably 7."""
    torch.set_num_threads(1)
    out = tmp_path / "run"
    run_grpo("tiny", sets(tiny_model_dir, prompts_file, out, "train.max_steps=70", "train.batch_size=4",
                          "grpo.num_generations=16", "grpo.beta=0.01", "log.plots=true"))
    rs = records(out)
    assert [r["step"] for r in rs] == list(range(1, 71))
    first, last = rs[:3], rs[-5:]
    assert sum(r["reward"] for r in first) / 3 < 0.2
    assert sum(r["reward"] for r in last) / 5 > 0.8
    assert all(r["rewards/exact/mean"] == r["reward"] for r in rs)  # one rule of weight 1
    kls = [r["kl"] for r in rs]
    assert kls[0] == pytest.approx(0, abs=1e-3) and max(kls) < 20 and sum(kls[-10:]) / 10 < 8
    for key in ("reward_std", "clip_ratio", "entropy", "completions/mean_length", "completions/clipped_ratio",
                "rollout_s", "step_s"):
        assert all(key in r for r in rs), key
    assert 0 < rs[-1]["rollout_s"] < rs[-1]["step_s"]
    assert rs[-1]["entropy"] < rs[0]["entropy"]
    assert (out / "plots" / "reward.png").is_file() and (out / "plots" / "kl.png").is_file()
    assert (out / "checkpoints" / "step_70" / "model.safetensors").is_file()
    assert not (out / "checkpoints" / "step_70" / "grpo_rollouts.pt").exists()  # nothing pending at the end


def test_kill_between_passes_and_resume_is_bitwise_equal(tmp_path, tiny_model_dir, prompts_file, dense_reward):
    torch.set_num_threads(1)  # the killed subprocess runs with one thread too: same kernels, same bits
    extra = ["grpo.ppo_epochs=2", "grpo.beta=0.04", "checkpoint.every=3", dense_reward]
    run_grpo("tiny", sets(tiny_model_dir, prompts_file, tmp_path / "ref", *extra))
    args = [sys.executable, "-m", "zhllm", "grpo", "--config", "tiny"]
    for s in sets(tiny_model_dir, prompts_file, tmp_path / "cut", *extra):
        args += ["--set", s]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ZHLLM_FAIL_AT_STEP": "3"}
    died = subprocess.run(args, env=env, capture_output=True, text=True)
    assert died.returncode == 1, died.stderr[-2000:]
    # step 3 is the first pass over the second rollout: step 4 must train on the same samples
    assert (tmp_path / "cut" / "checkpoints" / "step_3" / "grpo_rollouts.pt").is_file()
    run_grpo("tiny", sets(tiny_model_dir, prompts_file, tmp_path / "cut", *extra), resume="auto")
    a, b = records(tmp_path / "ref"), records(tmp_path / "cut")
    assert [r["step"] for r in b] == list(range(1, 7))
    for key in ("loss", "reward", "kl", "clip_ratio", "entropy", "grad_norm"):
        assert [r[key] for r in a] == [r[key] for r in b], key
    assert any(r["clip_ratio"] > 0 for r in a)  # second passes really moved the ratio
    from safetensors.torch import load_file
    wa = load_file(str(tmp_path / "ref" / "checkpoints" / "step_6" / "model.safetensors"))
    wb = load_file(str(tmp_path / "cut" / "checkpoints" / "step_6" / "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_lora_policy_with_adapter_reference(tmp_path, tiny_model_dir, prompts_file, dense_reward):
    torch.set_num_threads(1)
    out = tmp_path / "lora"
    run_grpo("tiny", sets(tiny_model_dir, prompts_file, out, "lora.enabled=true", "lora.r=4", "lora.dropout=0",
                          "grpo.beta=0.1", "train.max_steps=3", "grpo.loss_type=dr_grpo", dense_reward))
    rs = records(out)
    assert rs[0]["kl"] == pytest.approx(0, abs=1e-6)  # adapters start at zero: policy == reference
    assert rs[-1]["kl"] > 0
    assert (out / "checkpoints" / "step_3" / "adapter" / "adapter_config.json").is_file()


def test_lora_policy_under_fsdp_trains_as_under_ddp(tmp_path, tiny_model_dir, prompts_file, dense_reward):
    # each rank decodes from a gathered copy: through the shards, a rank whose rows stopped sooner paired its next
    # collectives with the other's decode steps (wrong weights, different samples) or waited for ever
    rs = {}
    for parallel in ("fsdp", "ddp"):
        args = ["grpo", "--config", "tiny"] + set_args(sets(
            tiny_model_dir, prompts_file, tmp_path / parallel, "lora.enabled=true", "lora.r=4", "lora.dropout=0",
            "grpo.beta=0.1", "train.max_steps=2", "grpo.max_new_tokens=24", f"train.parallel={parallel}",
            # rows stop early, at lengths that differ between the ranks: what the random model often writes
            "grpo.stop_strings=[a, h, 不, '：', '3', T, '(', 学, 习, 个, 中, 公, W, 从]",
            dense_reward))
        run_on_two_ranks(args)
        rs[parallel] = records(tmp_path / parallel)
    assert [r["step"] for r in rs["fsdp"]] == [1, 2]
    for key in ("reward", "completions/mean_length", "kl", "loss", "grad_norm"):
        assert rs["fsdp"][0][key] == pytest.approx(rs["ddp"][0][key], rel=1e-4, abs=1e-6), key
    assert rs["fsdp"][0]["grad_norm"] > 0
    assert rs["fsdp"][0]["completions/clipped_ratio"] < 1  # rows stopped early


def test_bad_prompt_records_are_skipped_or_named(tmp_path, tiny_model_dir, capsys):
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps({"prompt": "3加4等于几？", "answer": 7}, ensure_ascii=False) + "\n"
                    + json.dumps({"prompt": "没有答案的问题"}, ensure_ascii=False) + "\n"
                    + "{not json\n"
                    + json.dumps({"messages": [{"role": "user", "content": "问"}, {"role": "assistant",
                                                                                     "content": "7"}]}) + "\n")
    out = tmp_path / "run"
    run_grpo("tiny", sets(tiny_model_dir, data, out, "train.max_steps=1", "train.batch_size=2"))
    log = capsys.readouterr().out
    assert f"{data}:2: missing answer" in log and "2 prompts" in log
    code = main(["grpo", "--config", "tiny", *set_args(sets(
        tiny_model_dir, data, tmp_path / "strict", "data.strict=true"))])
    assert code == 2
    assert f"zhllm: error: {data}:2: missing answer" in capsys.readouterr().err
    data.write_text(json.dumps({"question": "没有 prompt 字段"}, ensure_ascii=False) + "\n")
    assert main(["grpo", "--config", "tiny", *set_args(sets(
        tiny_model_dir, data, tmp_path / "none"))]) == 2
    err = capsys.readouterr().err
    assert "no usable prompt" in err and f"{data}:1: no prompt or messages field" in err


def test_broken_reward_function_is_named_before_training(tmp_path, tiny_model_dir, prompts_file, capsys):
    module = tmp_path / "my_rewards.py"
    module.write_text("def score(prompts, completions, answer, **kw):\n    return {'not': 'a list'}\n")
    base = sets(tiny_model_dir, prompts_file, tmp_path / "run", "train.max_steps=1")
    args = ["grpo", "--config", "tiny", *set_args(base)]
    rewards = f"rewards=[{{type: function, function: '{module}:score'}}]"
    assert main(args + ["--set", rewards]) == 2
    err = capsys.readouterr().err
    assert f"'{module}:score' returned a dict" in err and "Traceback" not in err
    missing = f"rewards=[{{type: function, function: '{module}:nothing'}}]"
    assert main(args + ["--set", missing, "--set", f"out_dir={tmp_path / 'run2'}"]) == 2
    assert "has no function nothing" in capsys.readouterr().err
    assert not (tmp_path / "run2").exists()  # refused before anything was written


def test_ppo_epochs_passes_read_the_same_prompts(tiny_model_dir):
    from zhllm.train.grpo_data import PromptDataset, PromptRecord
    data = PromptDataset([PromptRecord(str(i), [i + 1], "7") for i in range(10)], None, seed=0, ppo_epochs=2,
                         prompts_per_step=4)
    steps = [data.batch(step * 4 + 2, 2) for step in range(4)]  # micro-batch 1 of each step
    assert torch.equal(steps[0]["prompt_index"], steps[1]["prompt_index"])
    assert torch.equal(steps[2]["prompt_index"], steps[3]["prompt_index"])
    assert not torch.equal(steps[0]["prompt_index"], steps[2]["prompt_index"])
    assert [s["rollout"].tolist() for s in steps] == [[2, 0, 0], [2, 1, 0], [6, 0, 1], [6, 1, 1]]


def test_dynamic_sampling_through_the_cli_samples_more_rounds(tmp_path, tiny_model_dir, prompts_file):
    """A random model never answers 7: every group agrees, so each step uses all its rounds."""
    torch.set_num_threads(1)
    out = tmp_path / "dyn"
    overrides = sets(tiny_model_dir, prompts_file, out, "train.max_steps=2", "grpo.dynamic_sampling=2")
    assert main(["grpo", "--config", "tiny", *[a for s in overrides for a in ("--set", s)]]) == 0
    rs = records(out)
    assert [r["sampling_rounds"] for r in rs] == [3, 3] and [r["groups_kept"] for r in rs] == [0, 0]
    # Tokens count what the update computed: 2 prompts x 4 samples, each row prompt + completion (1-3 tokens)
    # padded to the longest; not train.batch_size x train.seq_len (2 x 64).
    tokenizer = load_tokenizer(tiny_model_dir)
    lengths = [len(encode_prompt(tokenizer, [{"role": "user", "content": q}])) for q in QUESTIONS]
    steps = [rs[0]["tokens_seen"], rs[1]["tokens_seen"] - rs[0]["tokens_seen"]]
    for tokens in steps:
        assert tokens % 8 == 0 and min(lengths) + 1 <= tokens // 8 <= max(lengths) + 3, (tokens, lengths)


def test_dynamic_sampling_keeps_only_groups_whose_rewards_differ():
    """Round 0 has one informative group of two; the next rounds are drawn at random and seeded, and sampling
    stops once the micro-batch's two groups are kept. Metrics cover every sampled group."""
    from types import SimpleNamespace

    from zhllm.train.grpo_rollout import GRPO, Sampling
    plans = {0: [[1, 1], [0, 1]], 1: [[0, 0], [1, 1]], 2: [[1, 0], [0, 1]], 3: [[0, 1], [0, 1]]}
    calls = []

    def sample_and_score(engine, prompt_index, source, round_=0):
        calls.append((tuple(prompt_index), round_))
        rewards = torch.tensor([float(x) for group in plans[round_] for x in group])
        rows = [(SimpleNamespace(prompt=i, round=round_), SimpleNamespace(token_ids=[1], finish_reason="stop"))
                for i in prompt_index for _ in range(2)]
        return rows, rewards, {"exact": rewards}

    def make(rounds):
        g = GRPO(Sampling(2, 4, 1.0, 1.0, 0, []), loss_type="grpo", scale_rewards=True, epsilon_low=0.2,
                 epsilon_high=0.2, beta=0.0, ppo_epochs=1, seed=0, grad_accum=1, reference=None, tokenizer=None,
                 dynamic_sampling=rounds)
        g.data = SimpleNamespace(records=list(range(50)))
        g._sample_and_score = sample_and_score
        return g

    g = make(rounds=5)
    rows, total, _ = g._sample_and_score(None, [3, 4], source=8)
    kept_rows, kept, metrics = g._informative(None, rows, total, {"exact": total}, source=8)
    assert kept.tolist() == [0, 1, 1, 0]  # round 0's second group, then round 2's first
    assert [r.round for r, _ in kept_rows] == [0, 0, 2, 2] and kept_rows[0][0].prompt == 4
    assert [c[1] for c in calls] == [0, 1, 2]  # stopped as soon as two were kept
    assert calls[1][0] != calls[2][0] and all(0 <= i < 50 for c in calls for i in c[0])
    assert metrics["sampling_rounds"] == 3 and metrics["groups_kept"] == pytest.approx(3 / 6)
    assert metrics["reward"] == pytest.approx(7 / 12)  # over every sampled completion
    drawn = calls[1:]
    calls.clear()
    again = make(rounds=5)._informative(None, rows, total, {"exact": total}, source=8)
    assert again[1].tolist() == kept.tolist() and calls == drawn  # the same draws: seeded, so resumable
    # no round finds an informative group: the first round's groups stay (advantage 0, no gradient)
    plans.update({1: [[0, 0], [0, 0]], 0: [[1, 1], [0, 0]]})
    rows, total, _ = sample_and_score(None, [3, 4], 8)
    kept_rows, kept, metrics = make(rounds=1)._informative(None, rows, total, {"exact": total}, source=8)
    assert kept.tolist() == [1, 1, 0, 0] and metrics["groups_kept"] == 0 and metrics["sampling_rounds"] == 2
