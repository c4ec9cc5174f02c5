"""`zhllm distill`: the loss is the written-out formula, a tiny student's KL to its teacher falls, a teacher with
another tokenizer is refused in one line, and a killed run resumes bitwise."""
import math
import os
import subprocess
import sys

import pytest
import torch

from train_support import make_shards, set_args, train_losses
from zhllm.cli import main
from zhllm.train.distill import distill_losses, run_distill


def test_loss_is_the_written_out_formula():
    torch.manual_seed(0)
    s, t = torch.randn(5, 7), torch.randn(5, 7)
    y = torch.randint(0, 7, (5,))
    T, alpha = 2.0, 0.3
    ps, pt = (s / T).softmax(-1), (t / T).softmax(-1)
    forward = sum(float(pt[i, j] * math.log(pt[i, j] / ps[i, j])) for i in range(5) for j in range(7))
    reverse = sum(float(ps[i, j] * math.log(ps[i, j] / pt[i, j])) for i in range(5) for j in range(7))
    ce = sum(-float(s[i].log_softmax(-1)[y[i]]) for i in range(5))
    for kind, kl in (("forward", forward), ("reverse", reverse)):
        total, got_kl, got_ce = distill_losses(s, t, y, kind, T, alpha)
        assert float(got_kl) == pytest.approx(kl, rel=1e-5) and float(got_ce) == pytest.approx(ce, rel=1e-5)
        assert float(total) == pytest.approx(alpha * T * T * kl + (1 - alpha) * ce, rel=1e-5)
    assert float(distill_losses(t, t, y, "forward", T, 1.0)[0]) == pytest.approx(0, abs=1e-5)


@pytest.fixture(scope="module")
def shards(tmp_path_factory, tokenizer_dir, corpus):
    return make_shards(tmp_path_factory.mktemp("shards") / "s", tokenizer_dir, corpus)


def sets(teacher, shards, out, *extra):
    return [f"teacher.path={teacher}", f"data.path=[{shards}]", f"out_dir={out}", "model.dim=32", "model.n_heads=4",
            "model.n_kv_heads=2", "model.ffn_dim=64", "train.max_steps=8", "train.batch_size=4", "train.seq_len=32",
            "train.lr=3e-3", "train.warmup_steps=1", "train.precision=fp32", "train.threads=1",
            "teacher.dtype=float32", "eval.every=4", "eval.batches=2", "eval.prompts=[]", "checkpoint.every=4",
            "log.every=1", "log.progress=false", "log.tensorboard=false", "log.plots=false", *extra]


def kls(run_dir, kind="train"):
    from zhllm.train.metrics import read_metrics
    return [r["kl"] if kind == "train" else r["val_kl"] for r in read_metrics(run_dir)
            if r.get("kind", "train") == kind]


def test_student_kl_to_the_teacher_falls(tmp_path, tiny_model_dir, shards):
    torch.set_num_threads(1)
    run_distill("tiny", sets(tiny_model_dir, shards, tmp_path / "run", "train.max_steps=24", "eval.every=8",
                             "distill.alpha=1.0", "distill.temperature=1.0"))
    train, val = kls(tmp_path / "run"), kls(tmp_path / "run", "eval")
    assert len(train) == 24 and len(val) == 3
    assert sum(train[-4:]) / 4 < 0.7 * sum(train[:4]) / 4
    assert val[-1] < val[0]
    from zhllm.train.metrics import read_metrics
    last = [r for r in read_metrics(tmp_path / "run") if r.get("kind") == "eval"][-1]
    assert last["val_ppl"] == pytest.approx(math.exp(last["val_ce"]))  # the data's perplexity, not the mixed loss
    assert not any(p.name.startswith("teacher") for p in (tmp_path / "run" / "checkpoints" / "latest").iterdir())


def test_teacher_with_another_tokenizer_is_refused(tmp_path, shards, corpus, capsys):
    from zhllm.model.config import model_config_from
    from zhllm.model.io import new_model, save_model
    from zhllm.tokenizer.load import load_tokenizer
    from zhllm.tokenizer.train import train_tokenizer_from_texts
    other_tok = train_tokenizer_from_texts(corpus, vocab_size=320, out_dir=tmp_path / "tok")
    other = save_model(new_model(model_config_from("tiny", {"vocab_size": len(load_tokenizer(other_tok))})),
                       tmp_path / "teacher", tokenizer=other_tok)
    argv = ["distill", "--config", "tiny"] + set_args(sets(other, shards, tmp_path / "x"))
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "use different tokenizers" in err and len(err.splitlines()) == 1, err
    argv = ["distill", "--config", "tiny"] + set_args(sets(tmp_path / "nope", shards, tmp_path / "y"))
    assert main(argv) == 2
    assert "teacher.path" in capsys.readouterr().err


def test_kill_and_resume_is_bitwise_equal(tmp_path, tiny_model_dir, shards):
    torch.set_num_threads(1)
    run_distill("tiny", sets(tiny_model_dir, shards, tmp_path / "ref"))
    args = [sys.executable, "-m", "zhllm", "distill", "--config", "tiny"]
    for s in sets(tiny_model_dir, shards, tmp_path / "cut"):
        args += ["--set", s]
    died = subprocess.run(args, env={**os.environ, "OMP_NUM_THREADS": "1", "ZHLLM_FAIL_AT_STEP": "6"},
                          capture_output=True, text=True)
    assert died.returncode == 1, died.stderr[-2000:]
    run_distill("tiny", sets(tiny_model_dir, shards, tmp_path / "cut"), resume="auto")
    assert train_losses(tmp_path / "ref") == train_losses(tmp_path / "cut")
    assert kls(tmp_path / "ref") == kls(tmp_path / "cut")


def test_int8_teacher_is_close_to_its_full_precision_forward_and_trains(tmp_path, tiny_model_dir, shards):
    from zhllm.infer.linear import Int8Module, quantize_linears_int8
    from zhllm.model.io import load_model
    full = load_model(tiny_model_dir)
    int8 = quantize_linears_int8(load_model(tiny_model_dir, dtype=torch.bfloat16))
    assert isinstance(int8.model.layers[0].self_attn.q_proj, Int8Module)
    assert type(int8.lm_head) is torch.nn.Linear  # tied to the embedding: kept
    x = torch.randint(0, 300, (2, 16))
    with torch.no_grad():
        want, got = full(x), int8(x).float()
    assert (got - want).abs().max() < 0.05 * want.abs().max()
    torch.set_num_threads(1)
    run_distill("tiny", sets(tiny_model_dir, shards, tmp_path / "run", "train.max_steps=8", "eval.every=0",
                             "teacher.dtype=int8", "distill.alpha=1.0"))
    train = kls(tmp_path / "run")
    assert len(train) == 8 and all(math.isfinite(k) for k in train) and train[-1] < train[0]


def test_top_k_loss_is_the_written_out_formula_and_the_full_kl_at_k_equal_vocab():
    from zhllm.train.distill import topk_distill_losses
    torch.manual_seed(1)
    s, t = torch.randn(4, 9), torch.randn(4, 9)
    y = torch.randint(0, 9, (4,))
    T, k = 1.5, 3
    top = t.topk(k, dim=-1)
    want = 0.0
    for i in range(4):
        p = (top.values[i] / T).softmax(-1)  # the teacher renormalised over its k tokens
        q = (s[i] / T).log_softmax(-1)[top.indices[i]]  # the student's full softmax at those tokens
        want += float((p * (p.log() - q)).sum())
    _, kl, _ = topk_distill_losses(s, top.indices, top.values, y, T, 1.0)
    assert float(kl) == pytest.approx(want, rel=1e-5)
    full = t.topk(9, dim=-1)
    for a, b in zip(topk_distill_losses(s, full.indices, full.values, y, T, 0.4),
                    distill_losses(s, t, y, "forward", T, 0.4)):
        assert float(a) == pytest.approx(float(b), rel=1e-5)


def test_teacher_cache_runs_the_teacher_once_per_window_and_resumes_bitwise(tmp_path, tiny_model_dir, shards,
                                                                            monkeypatch):
    from zhllm.data.shards import PackedTokenDataset
    from zhllm.train.distill import Distill
    torch.set_num_threads(1)
    windows = len(PackedTokenDataset([str(shards)], 32, "train"))
    steps = -(-2 * windows // 4)  # two epochs of 4-window batches
    rows = []
    run_teacher = Distill.run_teacher
    monkeypatch.setattr(Distill, "run_teacher", lambda self, x: rows.append(x.shape[0]) or run_teacher(self, x))
    cached = ["teacher.top_k=8", "teacher.cache=true", "eval.every=0", f"train.max_steps={steps}",
              f"checkpoint.every={steps // 2}"]
    run_distill("tiny", sets(tiny_model_dir, shards, tmp_path / "ref", *cached))
    assert sum(rows) == windows  # every window's teacher logits computed once, read back in the second epoch
    assert (tmp_path / "ref" / "teacher_topk" / "meta.json").is_file()
    # the same recipe without the cache gives the same losses (the logits are rounded alike either way)
    run_distill("tiny", sets(tiny_model_dir, shards, tmp_path / "live", *cached[:1], *cached[2:]))
    assert train_losses(tmp_path / "ref") == train_losses(tmp_path / "live")
    # killed half-way, resumed: the cache built so far is read, the losses are bitwise those of the straight run
    monkeypatch.undo()
    args = [sys.executable, "-m", "zhllm", "distill", "--config", "tiny"]
    for s in sets(tiny_model_dir, shards, tmp_path / "cut", *cached):
        args += ["--set", s]
    died = subprocess.run(args, env={**os.environ, "OMP_NUM_THREADS": "1", "ZHLLM_FAIL_AT_STEP": str(steps // 2 + 1)},
                          capture_output=True, text=True)
    assert died.returncode == 1, died.stderr[-2000:]
    run_distill("tiny", sets(tiny_model_dir, shards, tmp_path / "cut", *cached), resume="auto")
    assert train_losses(tmp_path / "ref") == train_losses(tmp_path / "cut")
    # a cache made for another recipe is refused, not overwritten
    with pytest.raises(Exception, match="another k"):
        run_distill("tiny", sets(tiny_model_dir, shards, tmp_path / "other", "teacher.top_k=4", "teacher.cache=true",
                                 f"teacher.cache_dir={tmp_path / 'ref' / 'teacher_topk'}", "eval.every=0"))
