"""Unit tests of the training engine: schedules, parameter groups, non-finite guard, signals, configs, pruning."""
import json
import math
import os
import signal

import pytest
import torch

from zhllm.errors import ConfigError, ZhllmError
from zhllm.model.config import model_config_from
from zhllm.model.io import new_model
from zhllm.train.config import RunConfig, load_run_config
from zhllm.config import from_dict
from zhllm.train.objectives import CausalLM, LossOutput
from zhllm.train.optim import lr_at, parameter_groups
from zhllm.train.parallel import Dist
from zhllm.train.state import checkpoint_dirs, prune_checkpoints, resolve_resume
from zhllm.train.trainer import NonFiniteError, Trainer


class RandomWindows:
    """Stand-in with PackedTokenDataset's interface: window i is a pure function of i."""
    vocab_size, eos_id, bytes_per_token, tokenizer_dir = 64, 0, 3.0, None

    def __init__(self, seq_len: int):
        self.seq_len = seq_len

    def __len__(self):
        return 100

    def batch(self, start, count):
        return torch.stack([torch.randint(0, 64, (self.seq_len + 1,), generator=torch.Generator().manual_seed(i))
                            for i in range(start, start + count)])


def tiny_run(tmp_path, **train) -> RunConfig:
    return from_dict(RunConfig, {
        "model": {"preset": "tiny"}, "data": {"path": ["unused"]},
        "train": {"max_steps": 6, "batch_size": 2, "seq_len": 16, "warmup_steps": 1, "precision": "fp32", **train},
        "eval": {"every": 3, "batches": 1}, "checkpoint": {"every": 3, "keep": 1},
        "log": {"every": 1, "tensorboard": False, "progress": False, "plots": False}, "out_dir": str(tmp_path / "run")})


def tiny_model():
    return new_model(model_config_from("tiny", {"vocab_size": 64, "dim": 32, "n_heads": 4, "ffn_dim": 64}), seed=0)


def make_trainer(tmp_path, objective=None, **train):
    cfg = tiny_run(tmp_path, **train)
    data = RandomWindows(cfg.train.seq_len)
    return Trainer(cfg, objective or CausalLM(), tiny_model(), data, data, dist=Dist(), echo=lambda *_: None)


# ---- schedules ----
def test_cosine_warmup_then_decay_to_floor():
    kw = dict(lr=1.0, total_steps=100, warmup_steps=10, schedule="cosine", min_lr_ratio=0.1)
    assert lr_at(0, **kw) == pytest.approx(0.1)
    assert lr_at(9, **kw) == pytest.approx(1.0)
    assert lr_at(10, **kw) == pytest.approx(1.0)
    assert lr_at(99, **kw) == pytest.approx(0.1)
    values = [lr_at(s, **kw) for s in range(10, 100)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_wsd_is_flat_then_decays_linearly():
    kw = dict(lr=1.0, total_steps=100, warmup_steps=10, schedule="wsd", min_lr_ratio=0.0, decay_fraction=0.2)
    assert lr_at(50, **kw) == 1.0 and lr_at(79, **kw) == 1.0
    assert lr_at(80, **kw) == pytest.approx(1.0)
    assert lr_at(90, **kw) == pytest.approx(1 - 10 / 19)
    assert lr_at(99, **kw) == pytest.approx(0.0)


def test_constant_schedule():
    assert lr_at(500, lr=2e-4, total_steps=10, warmup_steps=5, schedule="constant") == 2e-4


# ---- parameter groups ----
def test_no_decay_on_norms_biases_embeddings():
    model = new_model(model_config_from("tiny", {"vocab_size": 64, "arch": "qwen2"}))
    decay, no_decay = parameter_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    kept = {names[id(p)] for p in no_decay["params"]}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(n.endswith("proj.weight") for n in decayed)
    assert "model.embed_tokens.weight" in kept  # tied with lm_head: counted once, never decayed
    assert any(n.endswith("q_proj.bias") for n in kept) and any(n.endswith("norm.weight") for n in kept)
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))



def test_an_engine_kept_across_optimizer_steps_decodes_the_new_weights():
    """CPU fused AdamW writes weights without bumping their version counters; the optimizer bumps them, so an
    engine's fused decode weights (keyed by version) are rebuilt instead of decoding the old model."""
    from zhllm.infer.engine import Engine
    from zhllm.train.optim import adamw_kernel_options, build_optimizer
    model = new_model(model_config_from("tiny", {"vocab_size": 64, "init_std": 0.3}), seed=0)
    params = [p for p in model.parameters()]
    opt = build_optimizer(model, lr=0.5, weight_decay=0.0, betas=(0.9, 0.95))
    assert adamw_kernel_options(params) == {"fused": True}  # the case that needs the bump
    engine = Engine(model)
    prompt = [[1, 2, 3]]
    before = engine.generate_batch(prompt, max_new_tokens=6, temperature=0.0).completions[0].token_ids
    for _ in range(3):
        model(torch.tensor([[5, 6, 7, 8]])).float().logsumexp(-1).sum().backward()
        opt.step()
        opt.zero_grad()
    after = engine.generate_batch(prompt, max_new_tokens=6, temperature=0.0).completions[0].token_ids
    fresh = Engine(model).generate_batch(prompt, max_new_tokens=6, temperature=0.0).completions[0].token_ids
    assert after == fresh and fresh != before


# ---- the loop ----
def test_training_runs_and_keeps_checkpoints(tmp_path):
    tr = make_trainer(tmp_path, max_steps=6, lr=1e-2)
    summary = tr.fit()
    assert summary["step"] == 6 and summary["skipped_steps"] == 0
    steps = [s for s, _ in checkpoint_dirs(tmp_path / "run" / "checkpoints")]
    assert steps == [6] or steps == [3, 6]  # keep 1 plus the best


def test_no_eta_from_the_warm_up_window(tmp_path):
    from zhllm.train.metrics import read_metrics, train_line
    make_trainer(tmp_path, max_steps=4).fit()
    train = [r for r in read_metrics(tmp_path / "run") if r["kind"] == "train"]
    assert train[0]["step"] == 1 and train[0]["eta_s"] is None and "eta -" in train_line(train[0])
    assert all(r["eta_s"] is not None for r in train[1:]) and "eta 0m00s" in train_line(train[-1])


class NaNAt:
    """CausalLM whose loss is NaN on chosen calls (counting micro-batches)."""
    name = "nan"

    def __init__(self, calls):
        self.calls, self.n, self.inner = set(calls), 0, CausalLM()

    def weight(self, batch):
        return self.inner.weight(batch)

    def loss(self, model, batch):
        self.n += 1
        out = self.inner.loss(model, batch)
        return LossOutput(out.loss_sum * float("nan"), out.weight) if self.n in self.calls else out


def test_nonfinite_step_is_skipped_and_counted(tmp_path):
    tr = make_trainer(tmp_path, NaNAt({2}), max_steps=4)
    tr.cfg.eval.every = 0
    before = {k: v.clone() for k, v in tr.model.state_dict().items()}
    summary = tr.fit()
    assert summary["skipped_steps"] == 1 and summary["step"] == 4
    assert all(torch.isfinite(v).all() for v in tr.model.state_dict().values())
    assert any(not torch.equal(before[k], v) for k, v in tr.model.state_dict().items())


def test_nonfinite_in_a_row_stops_without_checkpoint(tmp_path):
    tr = make_trainer(tmp_path, NaNAt(range(1, 100)), max_steps=6, max_nonfinite=3)
    with pytest.raises(NonFiniteError, match="3 non-finite steps in a row"):
        tr.fit()
    assert checkpoint_dirs(tmp_path / "run" / "checkpoints") == []


class PoisonAt(CausalLM):
    """Fills one weight with inf before the given loss call, as a blown-up optimizer step would."""
    def __init__(self, call):
        self.call, self.n = call, 0

    def loss(self, model, batch):
        self.n += 1
        if self.n == self.call:
            with torch.no_grad():
                next(model.parameters()).fill_(float("inf"))
        return super().loss(model, batch)


def test_nonfinite_weights_raise_at_the_save_and_write_nothing(tmp_path):
    tr = make_trainer(tmp_path, PoisonAt(5), max_steps=6, max_nonfinite=5)
    tr.cfg.eval.every = 0
    with pytest.raises(NonFiniteError, match="step 6: the weights are not finite"):
        tr.fit()
    ckpts = tmp_path / "run" / "checkpoints"
    assert [s for s, _ in checkpoint_dirs(ckpts)] == [3]  # the one before the blow-up, nothing after
    assert not list(ckpts.glob(".step_*"))


class SignalAt(CausalLM):
    def __init__(self, call):
        self.call, self.n = call, 0

    def loss(self, model, batch):
        self.n += 1
        if self.n == self.call:
            os.kill(os.getpid(), signal.SIGTERM)
        return super().loss(model, batch)


def test_sigterm_saves_and_stops_cleanly(tmp_path):
    tr = make_trainer(tmp_path, SignalAt(2), max_steps=6)
    tr.cfg.eval.every = 0
    previous = signal.getsignal(signal.SIGTERM)
    summary = tr.fit()
    assert summary["stopped_early"] and summary["step"] == 2
    assert [s for s, _ in checkpoint_dirs(tmp_path / "run" / "checkpoints")] == [2]
    assert signal.getsignal(signal.SIGTERM) is previous


def test_grad_accumulation_equals_bigger_batch(tmp_path):
    a = make_trainer(tmp_path / "a", batch_size=4, grad_accum=1, max_steps=3)
    b = make_trainer(tmp_path / "b", batch_size=2, grad_accum=2, max_steps=3)
    la = [a.train_step()["loss"] for _ in range(3)]
    lb = [b.train_step()["loss"] for _ in range(3)]
    assert la == pytest.approx(lb, rel=1e-5)
    for (k, va), vb in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.allclose(va, vb, atol=1e-6), k


# ---- configs ----
def test_unknown_key_names_key_and_file(tmp_path):
    f = tmp_path / "r.yaml"
    f.write_text("model: {preset: tiny}\ndata: {path: [x]}\ntrain: {max_steps: 1, lrr: 0.1}\n")
    with pytest.raises(ConfigError, match=r"r\.yaml.*unknown key 'train\.lrr'"):
        load_run_config(f)


@pytest.mark.parametrize("text, message", [
    ("model: {preset: tiny}\ndata: {path: [x]}\ntrain: {}\n", "max_steps or train.max_tokens"),
    ("model: {preset: nope}\ndata: {path: [x]}\ntrain: {max_steps: 1}\n", "unknown model.preset 'nope'"),
    ("model: {preset: tiny, dimm: 3}\ndata: {path: [x]}\ntrain: {max_steps: 1}\n", "unknown key 'model.dimm'"),
    ("model: {preset: tiny}\ndata: {path: [x, y], weights: [1]}\ntrain: {max_steps: 1}\n", "data.weights"),
    ("model: {init_from: d, dim: 3}\ndata: {path: [x]}\ntrain: {max_steps: 1}\n", "remove model.dim"),
    ("model: {preset: tiny}\ndata: {path: [x]}\ntrain: {max_steps: 1, schedule: linear}\n", "train.schedule"),
    ("model: {preset: tiny}\ndata: {path: [x]}\ntrain: {max_steps: 1, optimizer: muon, parallel: fsdp}\n",
     "train.optimizer muon needs whole matrices"),
])
def test_config_mistakes_are_one_line_errors(tmp_path, text, message):
    f = tmp_path / "r.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=message) as e:
        load_run_config(f)
    assert "\n" not in str(e.value)


def test_init_from_with_smaller_vocab_is_refused(tmp_path, tiny_model_dir):
    from zhllm.train.pretrain import build_model
    cfg = from_dict(RunConfig, {"model": {"init_from": str(tiny_model_dir)}, "data": {"path": ["x"]},
                                "train": {"max_steps": 1, "seq_len": 16}})
    build_model(cfg, "r.yaml", 400, 0, None)
    with pytest.raises(ZhllmError, match="smaller than the shards' tokenizer"):
        build_model(cfg, "r.yaml", 100000, 0, None)


def test_preset_vocab_follows_the_data():
    from zhllm.train.pretrain import build_model
    cfg = from_dict(RunConfig, {"model": {"preset": "tiny"}, "data": {"path": ["x"]},
                                "train": {"max_steps": 1, "seq_len": 16}})
    model = build_model(cfg, "r.yaml", 321, 0, None)
    assert model.config.vocab_size == 321 and model.config.eos_token_id == 0


def test_packaged_recipes_load():
    for name in ("tiny", "6m", "26m", "1.4b"):
        cfg = load_run_config(name)
        assert cfg.train.max_steps or cfg.train.max_tokens
    assert load_run_config("1.4b").train.parallel == "fsdp"
    assert load_run_config("26m").train.seq_len == 512
    assert load_run_config("6m").train.optimizer == "muon"
    assert model_config_from("6m").num_params(include_embeddings=False) == 4_427_008


# ---- checkpoint bookkeeping ----
def _fake_ckpt(root, step, complete=True):
    d = root / f"step_{step}"
    d.mkdir(parents=True)
    files = ["config.json", "model.safetensors", "optimizer.pt"] + (["trainer_state.json"] if complete else [])
    for f in files:
        (d / f).write_text("{}" if f == "trainer_state.json" else "x")
    return d


def test_resume_auto_takes_newest_complete(tmp_path):
    _fake_ckpt(tmp_path, 5)
    _fake_ckpt(tmp_path, 10)
    _fake_ckpt(tmp_path, 15, complete=False)
    assert resolve_resume("auto", tmp_path).name == "step_10"
    assert resolve_resume(None, tmp_path) is None
    assert resolve_resume("auto", tmp_path / "empty") is None
    with pytest.raises(ZhllmError, match="not a complete training checkpoint"):
        resolve_resume(str(tmp_path / "step_15"), tmp_path)


def test_prune_keeps_newest_and_best(tmp_path):
    for s in (1, 2, 3, 4):
        _fake_ckpt(tmp_path, s)
    (tmp_path / "best").write_text("step_1\n")
    (tmp_path / ".step_5.tmp-abcd").mkdir()
    prune_checkpoints(tmp_path, keep=2)
    assert [s for s, _ in checkpoint_dirs(tmp_path)] == [1, 3, 4]
    assert not (tmp_path / ".step_5.tmp-abcd").exists()


def test_flops_per_token_counts_matmuls():
    from zhllm.train.metrics import flops_per_token
    cfg = model_config_from("26m")
    n = cfg.num_params(include_embeddings=False) + cfg.vocab_size * cfg.dim
    assert flops_per_token(cfg, 512) == 6 * n + 12 * cfg.n_layers * cfg.dim * 512
    assert math.isclose(flops_per_token(cfg, 512) / 6 / 26e6, 1.0, rel_tol=0.35)


def test_fp16_runs_with_grad_scaler(tmp_path):
    tr = make_trainer(tmp_path, precision="fp16", max_steps=3)
    assert tr.scaler is not None
    losses = [tr.train_step()["loss"] for _ in range(3)]
    assert all(math.isfinite(x) for x in losses)
    assert tr.state.step == 3


def test_bf16_weights_with_fp32_masters_resume_exactly(tmp_path):
    from zhllm.model.io import load_model
    from zhllm.train.metrics import read_metrics
    a = make_trainer(tmp_path / "a", bf16_weights=True, precision="bf16", max_steps=6)
    assert next(a.model.parameters()).dtype == torch.bfloat16
    a.fit()
    b = make_trainer(tmp_path / "b", SignalAt(3), bf16_weights=True, precision="bf16", max_steps=6)
    b.cfg.eval.every = 0
    b.fit()
    ckpt = tmp_path / "b" / "run" / "checkpoints" / "step_3"
    cfg = tiny_run(tmp_path / "b", bf16_weights=True, precision="bf16", max_steps=6)
    data = RandomWindows(16)
    resumed = Trainer(cfg, CausalLM(), load_model(ckpt, dtype=torch.float32, train=True), data, data,
                      resume_dir=ckpt, dist=Dist(), echo=lambda *_: None)
    resumed.fit()
    def loss(d):
        return {r["step"]: r["loss"] for r in read_metrics(d) if r["kind"] == "train"}
    assert loss(tmp_path / "a" / "run") == loss(tmp_path / "b" / "run")
    assert torch.equal(a.master.master[0], resumed.master.master[0])
    saved = load_model(tmp_path / "a" / "run" / "checkpoints" / "step_6")
    assert next(saved.parameters()).dtype == torch.float32  # checkpoints hold the fp32 masters


def test_muon_takes_the_hidden_matrices_and_steps_like_torchs_muon_and_adamw(tmp_path):
    """MuonAdamW is torch's Muon on the attention/MLP matrices plus fused AdamW on the rest, in one optimizer."""
    tr = make_trainer(tmp_path, optimizer="muon", max_steps=2, warmup_steps=0, lr=1e-2)
    model = tr.model
    muon = {id(p) for g in tr.optimizer.param_groups if g.get("muon") for p in g["params"]}
    names = {n for n, p in model.named_parameters() if id(p) in muon}
    assert names == {n for n, p in model.named_parameters() if p.ndim == 2 and "embed" not in n}
    assert all(n.endswith(("proj.weight")) for n in names) and len(names) == 7 * model.config.n_layers
    ref = tiny_model()
    groups = parameter_groups(ref, 0.1)
    hidden = [p for p in groups[0]["params"] if p.ndim == 2 and p is not ref.model.embed_tokens.weight]
    rest = [p for p in groups[0]["params"] if not any(p is q for q in hidden)]
    ref_muon = torch.optim.Muon(hidden, lr=1e-2, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    ref_adamw = torch.optim.AdamW([{"params": rest, "weight_decay": 0.1}, groups[1]], lr=1e-2, betas=(0.9, 0.95),
                                  eps=1e-8)
    for step in range(2):
        batch = RandomWindows(16).batch(step * 2, 2)
        for m, opts in ((model, [tr.optimizer]), (ref, [ref_muon, ref_adamw])):
            m(batch[:, :-1]).float().logsumexp(-1).mean().backward()
            for o in opts:
                o.step()
                o.zero_grad()
    for (n, a), b in zip(model.named_parameters(), ref.parameters()):
        assert torch.allclose(a, b, atol=1e-6), n


@pytest.mark.parametrize("train", [{}, {"precision": "bf16", "bf16_weights": True}], ids=["fp32", "bf16-masters"])
def test_muon_resumes_exactly(tmp_path, train):
    from zhllm.model.io import load_model
    from zhllm.train.metrics import read_metrics
    a = make_trainer(tmp_path / "a", optimizer="muon", **train)
    a.fit()
    b = make_trainer(tmp_path / "b", SignalAt(3), optimizer="muon", **train)
    b.cfg.eval.every = 0
    b.fit()
    ckpt = tmp_path / "b" / "run" / "checkpoints" / "step_3"
    data = RandomWindows(16)
    resumed = Trainer(tiny_run(tmp_path / "b", optimizer="muon", **train), CausalLM(),
                      load_model(ckpt, dtype=torch.float32, train=True), data, data,
                      resume_dir=ckpt, dist=Dist(), echo=lambda *_: None)
    assert any("momentum_buffer" in st for st in resumed.optimizer.state.values())
    resumed.fit()
    def loss(d):
        return {r["step"]: r["loss"] for r in read_metrics(d) if r["kind"] == "train"}
    assert loss(tmp_path / "a" / "run") == loss(tmp_path / "b" / "run")
    assert all(torch.equal(x, y) for x, y in zip(a.model.parameters(), resumed.model.parameters()))


def test_resuming_with_another_optimizer_is_a_clear_error(tmp_path):
    from zhllm.model.io import load_model
    make_trainer(tmp_path, optimizer="adamw", max_steps=3).fit()
    ckpt = tmp_path / "run" / "checkpoints" / "step_3"
    data = RandomWindows(16)

    def resume():
        return Trainer(tiny_run(tmp_path, optimizer="muon", max_steps=6), CausalLM(),
                       load_model(ckpt, dtype=torch.float32, train=True), data, data, resume_dir=ckpt, dist=Dist(),
                       echo=lambda *_: None)
    with pytest.raises(ZhllmError, match="trained with train.optimizer=adamw, the recipe now asks for muon"):
        resume()
    state = json.loads((ckpt / "trainer_state.json").read_text())
    del state["optimizer"]  # a checkpoint from before the state recorded it
    (ckpt / "trainer_state.json").write_text(json.dumps(state))
    with pytest.raises(ZhllmError, match="optimizer state does not fit this run's optimizer"):
        resume()


def test_mfu_over_100_percent_remeasures_the_cpu_peak(tmp_path, monkeypatch):
    """A peak measured while the host was slow would report MFU above 100% for the whole run."""
    import zhllm.train.metrics as metrics
    measured = iter([1e3] + [1e15] * 10)  # first a slow moment, then the real peak
    calls = []
    monkeypatch.setattr(metrics, "_CPU_PEAKS", {})
    monkeypatch.setattr(metrics, "measure_matmul_peak", lambda dtype: calls.append(dtype) or next(measured))
    make_trainer(tmp_path, max_steps=3).fit()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    mfus = [r["mfu"] for r in rows if r.get("kind") == "train"]
    assert len(calls) == 2 and all(0 < m < 1 for m in mfus)
