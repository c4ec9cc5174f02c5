"""train.precision auto: bf16 only where this CPU multiplies bf16 at least as fast as fp32; kept on resume."""
import pytest
import torch

import zhllm.train.precision as precision_mod
from zhllm.errors import ConfigError
from zhllm.train.config import RunConfig
from zhllm.config import from_dict
from zhllm.train.parallel import Dist
from zhllm.train.precision import resolve_precision
from zhllm.train.state import load_trainer_state

from test_train_units import make_trainer, tiny_model, tiny_run, RandomWindows


@pytest.fixture
def peaks(monkeypatch):
    """Pretend matmul peaks (FLOP/s) by dtype; returns the dict to fill."""
    table = {}
    monkeypatch.setattr(precision_mod, "cpu_matmul_peak", lambda dtype: table[dtype])
    return table


@pytest.mark.parametrize("bf16, fp32, expected", [(3e12, 1e12, "bf16"), (150e9, 255e9, "fp32"), (2e11, 2e11, "bf16")])
def test_auto_picks_the_faster_matmul(peaks, bf16, fp32, expected):
    peaks.update({torch.bfloat16: bf16, torch.float32: fp32})
    said = []
    assert resolve_precision("auto", Dist(), echo=said.append) == expected
    assert said and expected in said[0] and "GFLOP/s" in said[0]


@pytest.fixture
def probes(monkeypatch):
    """Pretend results of the quick matmul probe (FLOP/s) by dtype."""
    table = {torch.float32: 180e9, torch.bfloat16: 110e9, torch.float16: 2.5e9}
    monkeypatch.setattr(precision_mod, "measure_matmul_peak", lambda dtype, n, reps: table[dtype])
    return table


def test_explicit_precision_is_kept(peaks, probes):
    for p in ("fp32", "bf16", "fp16"):
        assert resolve_precision(p, Dist(), echo=lambda *_: None) == p  # `peaks` is empty: auto would raise


def test_explicit_precision_the_cpu_emulates_warns(probes):
    said = []
    assert resolve_precision("fp16", Dist(), echo=said.append) == "fp16"
    assert len(said) == 1 and "fp16 at 2.5 GFLOP/s against 180 in fp32" in said[0] and "auto" in said[0]
    said.clear()
    for p in ("bf16", "fp32"):  # bf16 at 0.6x fp32 (a VM without AMX): slower, but not emulated
        resolve_precision(p, Dist(), echo=said.append)
    assert said == []


def test_resumed_run_keeps_its_precision(peaks):
    peaks.update({torch.bfloat16: 1e9, torch.float32: 9e9})
    assert resolve_precision("auto", Dist(), resumed="bf16", echo=lambda *_: None) == "bf16"


def test_real_measurement_gives_a_precision():
    assert resolve_precision("auto", Dist(), echo=lambda *_: None) in ("bf16", "fp32")


def test_trainer_applies_bf16_weights_only_in_bf16(tmp_path, peaks):
    peaks.update({torch.bfloat16: 1e9, torch.float32: 2e9})
    tr = make_trainer(tmp_path / "a", precision="auto", bf16_weights=True)
    assert tr.cfg.train.precision == "fp32" and tr.master is None
    assert {p.dtype for p in tr.model.parameters()} == {torch.float32}
    peaks.update({torch.bfloat16: 4e9})
    tr = make_trainer(tmp_path / "b", precision="auto", bf16_weights=True)
    assert tr.cfg.train.precision == "bf16" and tr.master is not None
    assert {p.dtype for p in tr.model.parameters()} == {torch.bfloat16}


def test_checkpoint_records_precision_and_resume_keeps_it(tmp_path, peaks):
    from zhllm.train.trainer import Trainer
    from zhllm.train.objectives import CausalLM
    peaks.update({torch.bfloat16: 4e9, torch.float32: 1e9})
    tr = make_trainer(tmp_path, precision="auto", bf16_weights=True, max_steps=3)
    tr.fit()
    ckpt = tmp_path / "run" / "checkpoints" / "step_3"
    assert load_trainer_state(ckpt).precision == "bf16"
    peaks.update({torch.bfloat16: 1e9, torch.float32: 4e9})  # "another machine": auto alone would pick fp32
    cfg = tiny_run(tmp_path, precision="auto", bf16_weights=True, max_steps=6)
    data = RandomWindows(cfg.train.seq_len)
    resumed = Trainer(cfg, CausalLM(), tiny_model(), data, data, resume_dir=ckpt, dist=Dist(), echo=lambda *_: None)
    assert resumed.cfg.train.precision == "bf16" and resumed.master is not None


def test_bf16_weights_with_fp32_is_a_config_error():
    with pytest.raises(ConfigError, match="bf16_weights"):
        from_dict(RunConfig, {"data": {"path": ["x"]}, "train": {"max_steps": 1, "precision": "fp32",
                                                                  "bf16_weights": True}}).validate("r.yaml")
