"""`zhllm dpo train` through the shared loop: the three references agree, exact resume, a planted preference is
learnt, held-out metrics are logged, and real pairs (when ../shared is present) raise held-out accuracy."""
import json
import os
import random
import subprocess
import sys

import pytest
import torch

from conftest import shared_data
from train_support import set_args
from zhllm.cli import main
from zhllm.train.dpo import run_dpo

PROMPTS = ["今天天气怎么样？", "北京是哪里？", "什么是机器学习？", "长江有多长？", "小明有几个苹果？",
           "请介绍一下你自己。", "春眠不觉晓的下一句？", "中国的首都是哪里？"]
GOOD = ["今天天气很好，我们去公园散步吧！", "北京是中国的首都。", "机器学习是人工智能的一个分支。",
        "长江是中国最长的河流。"]
BAD = ["def add(a, b):", "Hello, world.", "This is a mixed sentence.", "return a + b"]


def planted_pairs(n: int, seed: int = 0) -> list[dict]:
    """Chosen replies are Chinese sentences, rejected ones English/code: a preference a tiny model can learn
    and that carries over to held-out pairs."""
    rng = random.Random(seed)
    return [{"prompt": f"{rng.choice(PROMPTS)}（{i}）", "chosen": rng.choice(GOOD), "rejected": rng.choice(BAD)}
            for i in range(n)]


@pytest.fixture()
def pairs_file(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in planted_pairs(48)))
    return path


def sets(model_dir, data, out, *extra):
    return [f"model.init_from={model_dir}", f"data.path={data}", f"out_dir={out}", "train.max_steps=6",
            "train.batch_size=4", "train.seq_len=64", "train.warmup_steps=1", "train.lr=3e-3",
            "train.precision=fp32", "train.threads=1", "eval.every=3", "eval.batches=2", "checkpoint.every=3",
            "data.val_fraction=0.2", "log.every=1", "log.progress=false", "log.tensorboard=false",
            "log.plots=false", *extra]


def records(run_dir, kind="train"):
    from zhllm.train.metrics import read_metrics
    return [r for r in read_metrics(run_dir) if r.get("kind", "train") == kind]


def test_copy_adapter_and_precomputed_references_give_equal_losses(tmp_path, tiny_model_dir, pairs_file):
    torch.set_num_threads(1)
    runs = {}
    for ref in ("copy", "adapter", "precomputed"):
        out = tmp_path / ref
        run_dpo("tiny", sets(tiny_model_dir, pairs_file, out, "lora.enabled=true", "lora.r=4", "lora.dropout=0",
                             "train.max_steps=4", f"dpo.reference={ref}"))
        runs[ref] = records(out)
    assert (tmp_path / "precomputed" / "reference_logps.npz").is_file()
    assert not (tmp_path / "copy" / "reference_logps.npz").exists()
    for ref in ("adapter", "precomputed"):
        for a, b in zip(runs["copy"], runs[ref]):
            for key in ("loss", "rewards/margins", "rewards/chosen", "logps/rejected"):
                assert abs(a[key] - b[key]) < 1e-5, (ref, a["step"], key, a[key], b[key])
    assert runs["copy"][0]["rewards/margins"] == pytest.approx(0, abs=1e-6)  # the policy starts as its reference
    assert runs["copy"][-1]["rewards/margins"] != pytest.approx(0, abs=1e-6)
    # full fine-tuning: the copy and the policy's own precomputed log-probs agree too
    full = {}
    for ref in ("copy", "precomputed"):
        run_dpo("tiny", sets(tiny_model_dir, pairs_file, tmp_path / f"full-{ref}", "train.max_steps=3",
                             f"dpo.reference={ref}"))
        full[ref] = [r["loss"] for r in records(tmp_path / f"full-{ref}")]
    assert full["copy"] == pytest.approx(full["precomputed"], abs=1e-5)


def test_kill_and_resume_is_bitwise_equal_and_keeps_precomputed_reference(tmp_path, tiny_model_dir, pairs_file,
                                                                          capsys):
    torch.set_num_threads(1)  # the killed subprocess runs with one thread too: same kernels, same bits
    run_dpo("tiny", sets(tiny_model_dir, pairs_file, tmp_path / "ref"))
    args = [sys.executable, "-m", "zhllm", "dpo", "train", "--config", "tiny"]
    for s in sets(tiny_model_dir, pairs_file, tmp_path / "cut"):
        args += ["--set", s]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ZHLLM_FAIL_AT_STEP": "4"}
    died = subprocess.run(args, env=env, capture_output=True, text=True)
    assert died.returncode == 1, died.stderr[-2000:]
    stored = (tmp_path / "cut" / "reference_logps.npz").read_bytes()
    capsys.readouterr()
    run_dpo("tiny", sets(tiny_model_dir, pairs_file, tmp_path / "cut"), resume="auto")
    # the policy at step 3 is not the reference any more: recomputing would change every loss after it
    assert "reference log-probs: loaded from" in capsys.readouterr().out
    assert (tmp_path / "cut" / "reference_logps.npz").read_bytes() == stored
    a, b = records(tmp_path / "ref"), records(tmp_path / "cut")
    assert [r["step"] for r in b] == list(range(1, 7))
    for key in ("loss", "rewards/margins", "rewards/accuracy", "logps/chosen", "tokens_seen"):
        assert [r[key] for r in a] == [r[key] for r in b], key
    # Tokens count the 8 rows (4 pairs) padded to each batch's longest, not train.batch_size x seq_len (4 x 64)
    seen = [0] + [r["tokens_seen"] for r in a]
    per_step = [y - x for x, y in zip(seen, seen[1:])]
    assert all(t % 8 == 0 for t in per_step) and len(set(per_step)) > 1, per_step
    assert [r["val_loss"] for r in records(tmp_path / "ref", "eval")] == \
        [r["val_loss"] for r in records(tmp_path / "cut", "eval")]
    from safetensors.torch import load_file
    wa = load_file(str(tmp_path / "ref" / "checkpoints" / "step_6" / "model.safetensors"))
    wb = load_file(str(tmp_path / "cut" / "checkpoints" / "step_6" / "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_planted_preference_is_learnt_on_held_out_pairs(tmp_path, tiny_model_dir, pairs_file):
    torch.set_num_threads(1)
    out = tmp_path / "run"
    run_dpo("tiny", sets(tiny_model_dir, pairs_file, out, "train.max_steps=16", "eval.every=4", "eval.batches=4",
                         "dpo.beta=0.5", "log.plots=true", "log.tensorboard=true"))
    evals = records(out, "eval")
    assert [r["step"] for r in evals] == [4, 8, 12, 16]
    assert evals[-1]["val_rewards/accuracy"] > 0.9
    assert evals[-1]["val_rewards/margins"] > evals[0]["val_rewards/margins"] > 0
    train = records(out)
    assert {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracy", "logps/chosen",
            "logps/rejected"} <= set(train[0])
    for name in ("loss", "rewards", "accuracy"):
        assert (out / "plots" / f"{name}.png").stat().st_size > 1000
    assert list((out / "tb").iterdir())


def test_recipe_mistakes_are_one_line_errors(tmp_path, tiny_model_dir, pairs_file, capsys):
    # `zhllm dpo --config` is `zhllm dpo train --config`; both spellings reach the same checks
    for base, extra, needle in ((["dpo", "train", "--config", "tiny"], ["dpo.reference=adapter"], "needs lora.enabled"),
                                (["dpo", "--config", "tiny"], ["dpo.loss=nope"], "dpo.loss"),
                                (["dpo", "train", "--config", "tiny"], ["dpo.loss=sigmoid", "dpo.gamma=1"],
                                 "gamma applies to the simpo loss"),
                                (["dpo", "--config", "tiny"], ["data.max_prompt_len=64"], "leaves no room"),
                                (["dpo"], [], "name a subcommand")):
        argv = base + set_args(sets(tiny_model_dir, pairs_file, tmp_path / "x", *extra))
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert needle in err and len(err.splitlines()) == 1, err


def test_real_pairs_raise_held_out_preference_accuracy(tmp_path):
    data = shared_data("dpo/dpo_zh.jsonl")
    tokenizer = shared_data("tokenizers/minimind")
    from zhllm.model.config import model_config_from
    from zhllm.model.io import new_model, save_model
    from zhllm.tokenizer.load import load_tokenizer
    model_dir = save_model(new_model(model_config_from("tiny", {"vocab_size": len(load_tokenizer(tokenizer))}), seed=0),
                           tmp_path / "model", tokenizer=tokenizer)
    rows = [json.loads(line) for line in data.read_text(encoding="utf-8").splitlines()]
    short = [r for r in rows if not r["history"] and len(r["prompt"]) + max(len(r["chosen"]), len(r["rejected"])) < 200]
    subset = tmp_path / "dpo.jsonl"
    subset.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in short[:200]), encoding="utf-8")
    out = tmp_path / "real"
    run_dpo("tiny", sets(model_dir, subset, out, "train.seq_len=256", "train.max_steps=16", "eval.every=16",
                         "train.lr=1e-3", "eval.batches=10", "data.val_fraction=0.2", "train.batch_size=8"))
    ev = records(out, "eval")[-1]
    # at step 0 the policy is its reference: every margin is 0 and accuracy (margin > 0) is 0
    assert ev["val_rewards/accuracy"] > 0.5 and ev["val_rewards/margins"] > 0 and ev["val_loss"] < 0.6931, ev
