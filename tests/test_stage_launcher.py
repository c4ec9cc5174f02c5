"""The stage launcher (train/run.py): a new stage is a record + an objective; the out_dir policy of training runs;
parallelize; zhllm.device; eval/ does not import train/."""
import json
import subprocess
import sys
from dataclasses import dataclass, field

import pytest
import torch
import torch.nn.functional as F
import yaml

from zhllm.config import checked, to_dict
from zhllm.errors import ZhllmError
from zhllm.eval.loss import LossOutput
from zhllm.model.config import model_config_from
from zhllm.model.io import new_model
from zhllm.outputs import MARKER, read_marker, write_marker
from zhllm.train.config import RunConfig, StageConfig
from zhllm.train.run import Stage, run_stage
from zhllm.train.state import checkpoint_dirs


# ---- a toy stage, declared in the test: rows repeat one token, the objective predicts it everywhere ----
@dataclass
class ToyData:
    vocab: int = checked(32, ge=2)


@dataclass
class ToyConfig(StageConfig):
    data: ToyData = field(default_factory=ToyData)
    out_dir: str = "runs/toy"


class RepeatedRows:
    def __init__(self, vocab: int, seq_len: int):
        self.vocab, self.seq_len = vocab, seq_len

    def __len__(self):
        return 64

    def batch(self, start, count):
        return torch.tensor([[(start + i) % self.vocab] * self.seq_len for i in range(count)])


class FirstTokenEverywhere:
    name = "toy"
    calls = 0

    def weight(self, batch):
        return float(batch.numel())

    def loss(self, model, batch):
        FirstTokenEverywhere.calls += 1
        logits = model(batch)
        targets = batch[:, :1].expand_as(batch)
        return LossOutput(F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="sum"),
                          self.weight(batch))


def toy_model(vocab, seed):
    return new_model(model_config_from("tiny", {"vocab_size": vocab, "dim": 32, "ffn_dim": 64}), seed=seed)


TOY = Stage(
    name="toy", config=ToyConfig, objective=lambda run, model: FirstTokenEverywhere(),
    open_data=lambda run: (RepeatedRows(run.cfg.data.vocab, run.cfg.train.seq_len), None),
    build_model=lambda run, train: toy_model(train.vocab, run.cfg.train.seed))


def toy_recipe(tmp_path, out_dir, steps=8):
    recipe = tmp_path / "toy.yaml"
    recipe.write_text(yaml.safe_dump({
        "model": {"preset": "tiny"}, "data": {"vocab": 8},
        "train": {"max_steps": steps, "batch_size": 4, "seq_len": 8, "warmup_steps": 1, "precision": "fp32"},
        "checkpoint": {"every": 0, "keep": 1}, "eval": {"every": 0},
        "log": {"every": 1, "tensorboard": False, "progress": False, "plots": False}, "out_dir": str(out_dir)}))
    return recipe


def test_a_new_stage_is_a_record_and_an_objective(tmp_path):
    out = tmp_path / "toy"
    FirstTokenEverywhere.calls = 0
    summary = run_stage(TOY, toy_recipe(tmp_path, out))
    assert summary["step"] == 8 and FirstTokenEverywhere.calls == 8
    losses = [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
              if r.get("kind") == "train"]
    # the toy objective is what was trained: step 1 logs its loss on the first rows at the initial weights
    first = FirstTokenEverywhere().loss(toy_model(8, seed=0), RepeatedRows(8, 8).batch(0, 4))
    assert losses[0] == pytest.approx(float(first.loss_sum.detach()) / first.weight, rel=1e-4)
    assert read_marker(out)["command"] == "toy"
    dumped = yaml.safe_load((out / "config.yaml").read_text())
    assert list(dumped)[:2] == ["model", "data"] and dumped["data"] == {"vocab": 8}
    assert [s for s, _ in checkpoint_dirs(out / "checkpoints")] == [8]
    # the launcher's guard and resume work for it like for pretraining
    with pytest.raises(ZhllmError, match="already holds checkpoints; pass --resume auto"):
        run_stage(TOY, toy_recipe(tmp_path, out, steps=10))
    assert run_stage(TOY, toy_recipe(tmp_path, out, steps=10), resume="auto")["step"] == 10


# ---- the out_dir policy of training runs ----
def _pretrain_recipe(tmp_path, out_dir, data="shards"):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"model": {"preset": "tiny"}, "data": {"path": [str(data)]},
                                      "train": {"max_steps": 1}, "out_dir": str(out_dir)}))
    return recipe


def _one_line(excinfo):
    assert "\n" not in str(excinfo.value)
    return str(excinfo.value)


def test_a_directory_zhllm_did_not_write_is_refused(tmp_path):
    from zhllm.train.pretrain import run_pretrain
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(ZhllmError, match="not written by zhllm") as e:
        run_pretrain(_pretrain_recipe(tmp_path, out))
    assert "out_dir" in _one_line(e)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_another_commands_output_is_refused(tmp_path):
    from zhllm.train.sft import run_sft
    out = tmp_path / "pre"
    out.mkdir()
    write_marker(out, "pretrain")
    recipe = tmp_path / "sft.yaml"
    recipe.write_text(yaml.safe_dump({"model": {"init_from": str(tmp_path / "base")}, "data": {"path": ["c.jsonl"]},
                                      "out_dir": str(out)}))
    with pytest.raises(ZhllmError, match=r"holds the output of `zhllm pretrain`.*choose another out_dir") as e:
        run_sft(recipe)
    assert "--overwrite" not in _one_line(e)  # training commands have no such flag


def test_out_dir_may_not_hold_the_data(tmp_path):
    from zhllm.train.pretrain import run_pretrain
    data = tmp_path / "run" / "shards"
    data.mkdir(parents=True)
    with pytest.raises(ZhllmError, match="contains the input"):
        run_pretrain(_pretrain_recipe(tmp_path, tmp_path / "run", data))


def _old_run(d, cfg):
    """A run directory as written before markers: its resolved config and metrics."""
    d.mkdir()
    (d / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg)))
    (d / "metrics.jsonl").write_text("{}\n")


def test_earlier_runs_without_a_marker_are_recognised_by_their_stage_only(tmp_path):
    from zhllm.train.pretrain import PRETRAIN
    from zhllm.train.run import check_run_dir
    from zhllm.train.sft import SFT, SftConfig
    pre = RunConfig(model={"preset": "tiny"}, out_dir=str(tmp_path / "pre"))
    pre.data.path = ["shards"]
    _old_run(tmp_path / "pre", pre)
    check_run_dir(PRETRAIN, pre)  # its own earlier run: resumable
    sft = SftConfig(model={"init_from": "base"}, out_dir=str(tmp_path / "pre"))
    with pytest.raises(ZhllmError, match="not written by zhllm"):
        check_run_dir(SFT, sft)  # a pretraining run is not an SFT run
    assert not (tmp_path / "pre" / MARKER).exists()


# ---- parallelize, device, layering ----
def test_parallelize_applies_checkpointing_and_compile_per_layer_keeping_names():
    from zhllm.train.config import TrainSection
    from zhllm.train.parallel import Dist, parallelize
    model = new_model(model_config_from("tiny", {"vocab_size": 32, "dim": 32, "ffn_dim": 64}))
    names = [n for n, _ in model.named_parameters()]
    wrapped = parallelize(model, TrainSection(activation_checkpointing=True, compile=True), Dist())
    assert wrapped is model and [n for n, _ in model.named_parameters()] == names
    for layer in model.model.layers:
        assert layer.forward.func.__name__ == "checkpoint" and layer._compiled_call_impl is not None


def test_device_module():
    from zhllm.device import resolve_device, resolve_dtype, to_device
    cpu = resolve_device("auto") if not torch.cuda.is_available() else torch.device("cpu")
    assert resolve_dtype("fp16", cpu) == torch.float16 and resolve_dtype(torch.float64, cpu) == torch.float64
    with pytest.raises(ZhllmError, match="unknown dtype 'fp8'"):
        resolve_dtype("fp8", cpu)
    batch = to_device({"input_ids": torch.zeros(2, 3, dtype=torch.long)}, cpu)
    assert batch["input_ids"].device.type == "cpu"


def test_eval_does_not_import_train():
    code = ("import sys, zhllm.eval.loss, zhllm.eval.demo_tasks; "
            "print([m for m in sys.modules if m.startswith('zhllm.train')])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("lora", [False, True])
def test_every_fine_tuning_stage_refuses_a_tokenizer_bigger_than_the_model(tmp_path, tokenizer_dir, lora):
    """SFT, DPO, GRPO, PPO and the reward model load their policy through one function, which names the model
    directory when its tokenizer has ids the embedding cannot look up (they would index out of range mid-run)."""
    from zhllm.model.io import save_model
    from zhllm.model.reward import load_reward_model
    from zhllm.tokenizer.load import load_tokenizer
    from zhllm.train.grpo import GrpoConfig
    from zhllm.train.run import StageRun
    from zhllm.train.sft import LoraSection, load_policy

    tok = load_tokenizer(tokenizer_dir)
    small = save_model(new_model(model_config_from("tiny", {"vocab_size": len(tok) - 8}), seed=0), tmp_path / "m",
                       tokenizer=tokenizer_dir)
    run = StageRun(cfg=GrpoConfig(lora=LoraSection(enabled=lora)), source="recipe.yaml", resume_dir=None,
                   init_from=str(small), tokenizer=tok)
    for load in (None, lambda path: load_reward_model(path, train=True)):
        with pytest.raises(ZhllmError,
                           match=f"{small}: tokenizer has {len(tok)} tokens, the model only {len(tok) - 8}"):
            load_policy(run, load=load)
    run.init_from = str(save_model(new_model(model_config_from("tiny", {"vocab_size": len(tok)}), seed=0),
                                   tmp_path / "fits", tokenizer=tokenizer_dir))  # a model that fits
    assert load_policy(run).training
