"""Typed config of a training stage: one base (`model`, `train`, `eval`, `checkpoint`, `log`, `out_dir`) that
every stage's config extends with its own `data` section (and its own extras, e.g. SFT's `lora`).

The shared sections are typed once here, so each stage gets the same keys, defaults and checks. Each numeric
field declares its allowed range with `checked(...)`; `from_dict` enforces it, with one-line errors.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, TypeVar

from ..config import PACKAGE_CONFIGS, checked, load_config
from ..errors import ConfigError


@dataclass
class DataSection:
    path: list[str] = checked(default_factory=list, nonblank=True)  # one or more shard directories
    weights: Optional[list[float]] = checked(None, ge=0)           # mixing weights, one per path


@dataclass
class TrainSection:
    max_steps: Optional[int] = checked(None, ge=1)
    max_tokens: Optional[int] = checked(None, ge=1)   # used when max_steps is not set
    batch_size: int = checked(4, ge=1)                # micro-batch per process
    grad_accum: int = checked(1, ge=1)
    seq_len: int = checked(512, ge=2)                 # a row predicts seq_len - 1 next tokens
    lr: float = checked(3e-4, gt=0)
    min_lr_ratio: float = checked(0.1, ge=0, le=1)
    warmup_steps: int = checked(100, ge=0)
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    decay_fraction: float = checked(0.2, gt=0, le=1)  # WSD: share of the steps spent decaying at the end
    optimizer: Literal["adamw", "muon"] = "adamw"  # muon: Muon for hidden matrices, AdamW for the rest (train/optim.py)
    weight_decay: float = checked(0.1, ge=0)
    beta1: float = checked(0.9, ge=0, lt=1)
    beta2: float = checked(0.95, ge=0, lt=1)
    grad_clip: float = checked(1.0, ge=0)            # 0 disables clipping
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"  # auto: see train/precision.py
    bf16_weights: bool = False         # when training in bf16: bf16 model + fp32 masters in the optimizer
    seed: int = checked(0, ge=0)
    compile: bool = False
    activation_checkpointing: bool = False
    parallel: Literal["none", "ddp", "fsdp"] = "none"
    ddp_powersgd: bool = False
    zero1: bool = False
    device: Literal["auto", "cpu", "cuda"] = "auto"
    max_nonfinite: int = checked(5, ge=1)            # consecutive skipped steps before the run stops
    threads: int = checked(0, ge=0)                  # torch intra-op threads; 0 = torch's default


@dataclass
class EvalSection:
    every: int = checked(200, ge=0)                  # 0 disables periodic eval
    batches: int = checked(8, ge=1)
    prompts: list[str] = checked(default_factory=list, nonblank=True)  # greedy samples at each eval
    max_new_tokens: int = checked(32, ge=1)


@dataclass
class CheckpointSection:
    every: int = checked(500, ge=0)                  # 0 = only at the end (and on SIGTERM)
    keep: int = checked(3, ge=1)                     # newest K kept, plus the best by val loss


@dataclass
class LogSection:
    every: int = checked(10, ge=1)
    tensorboard: bool = True
    wandb: bool = False                # Weights & Biases (pip install 'zhllm[wandb]'), files in out_dir/wandb
    swanlab: bool = False              # SwanLab (pip install 'zhllm[swanlab]'), files in out_dir/swanlog
    tracker_mode: Literal["auto", "online", "offline"] = "auto"  # auto: the tracker's own setting (WANDB_MODE, ...)
    project: str = checked("zhllm", nonblank=True)               # tracker project
    run_name: str = ""                 # tracker run name; empty: the out_dir's name
    progress: bool = True
    plots: bool = True                 # write plots/*.png at the end of the run


@dataclass
class StageConfig:
    """What every stage's recipe holds besides its data section; `validate` checks what the types cannot."""
    # `preset` (configs/model/ name or YAML path) and/or ModelConfig fields, or `init_from: DIR`
    model: dict[str, Any] = field(default_factory=dict)
    train: TrainSection = field(default_factory=TrainSection)
    eval: EvalSection = field(default_factory=EvalSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    log: LogSection = field(default_factory=LogSection)
    out_dir: str = checked("runs/train", nonblank=True)

    def validate(self, source: str) -> "StageConfig":
        if self.train.max_steps is None and self.train.max_tokens is None:
            raise ConfigError(f"{source}: set train.max_steps or train.max_tokens")
        if self.train.optimizer == "muon":
            import torch
            if self.train.zero1 or self.train.parallel == "fsdp":
                raise ConfigError(f"{source}: train.optimizer muon needs whole matrices on each process: use "
                                  "parallel none or ddp without zero1")
            if not hasattr(torch.optim, "Muon"):
                raise ConfigError(f"{source}: train.optimizer muon needs torch >= 2.9 (torch.optim.Muon); "
                                  f"this is torch {torch.__version__}")
        for tracker in ("wandb", "swanlab"):
            if getattr(self.log, tracker) and importlib.util.find_spec(tracker) is None:
                raise ConfigError(f"{source}: log.{tracker} is on but the {tracker} package is not installed "
                                  f"(pip install 'zhllm[{tracker}]')")
        return self


@dataclass
class RunConfig(StageConfig):
    """The pretraining recipe: the shared sections and token shards as data."""
    data: DataSection = field(default_factory=DataSection)
    out_dir: str = checked("runs/pretrain", nonblank=True)

    def validate(self, source: str) -> "RunConfig":
        super().validate(source)
        t = self.train
        if not self.data.path:
            raise ConfigError(f"{source}: data.path must name at least one shard directory")
        if self.data.weights is not None and len(self.data.weights) != len(self.data.path):
            raise ConfigError(f"{source}: data.weights has {len(self.data.weights)} entries "
                              f"for {len(self.data.path)} data.path entries")
        if self.data.weights is not None and not sum(self.data.weights) > 0:
            raise ConfigError(f"{source}: 'data.weights' must not all be 0")
        if t.bf16_weights and (t.precision not in ("bf16", "auto") or t.parallel == "fsdp"):
            raise ConfigError(f"{source}: train.bf16_weights needs precision bf16 or auto and parallel none or ddp "
                              "(FSDP has its own MixedPrecisionPolicy)")
        model_fields(self.model, source)  # fail at start-up on a typo in a model field
        return self


def check_continues_model(cfg: StageConfig, source: str, stage: str, model: str, data: str) -> None:
    """A stage that continues a trained model (DPO, reward model, GRPO, PPO): `model` is exactly `init_from: DIR`
    (`model` says which) and `data.path` names its files (`data` says what they hold)."""
    init_from = cfg.model.get("init_from")
    if set(cfg.model) != {"init_from"} or not isinstance(init_from, str) or not init_from.strip():
        raise ConfigError(f"{source}: the {stage} model section takes exactly `init_from: DIR` ({model}; "
                          f"got {cfg.model or 'nothing'})")
    if not cfg.data.path:
        raise ConfigError(f"{source}: data.path must name {data}")


def resolve_recipe(path: str | Path, stage: str = "pretrain") -> Path:
    """A recipe path, or a bare name like `tiny` looked up in the package's configs/<stage>/."""
    p = Path(path)
    if p.suffix in (".yaml", ".yml") or p.exists():
        return p
    packaged = PACKAGE_CONFIGS / stage / f"{path}.yaml"
    return packaged if packaged.is_file() else p


C = TypeVar("C", bound=StageConfig)


def load_stage_config(cls: type[C], path: str | Path, overrides: list[str] | None = None,
                      recipes: str = "pretrain") -> tuple[C, str]:
    """(validated config, source for messages) of a recipe path or a packaged name under configs/<recipes>/."""
    path = resolve_recipe(path, recipes)
    cfg = load_config(cls, path, overrides)
    source = str(path) + (" (with --set overrides)" if overrides else "")
    return cfg.validate(source), source


def load_run_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    return load_stage_config(RunConfig, path, overrides, "pretrain")[0]


def model_fields(section: dict, source: str, vocab_size: int | None = None):
    """The `model` section as (init_from, ModelConfig or None), checking every key against ModelConfig."""
    from ..config import from_dict, read_yaml
    from ..model.config import ModelConfig, preset_names
    rest = dict(section)
    preset, init_from = rest.pop("preset", None), rest.pop("init_from", None)
    if init_from is not None:
        if not str(init_from).strip():
            raise ConfigError(f"{source}: 'model.init_from' must not be empty")
        if preset is not None or rest:
            extra = "preset" if preset is not None else next(iter(rest))
            raise ConfigError(f"{source}: model.init_from takes the shape from the checkpoint; remove model.{extra}")
        return str(init_from), None
    if preset is None and not rest:
        raise ConfigError(f"{source}: set model.preset (and/or model fields) or model.init_from")
    base: dict = {}
    if preset is not None:
        path = Path(str(preset))
        if path.suffix not in (".yaml", ".yml"):
            path = PACKAGE_CONFIGS / "model" / f"{preset}.yaml"
            if not path.is_file():
                raise ConfigError(f"{source}: unknown model.preset {preset!r} (presets: {', '.join(preset_names())})")
        base = read_yaml(path)
    if vocab_size is not None:
        base["vocab_size"] = vocab_size  # a preset's vocab follows the data's tokenizer
    return None, from_dict(ModelConfig, {**base, **rest}, source, "model.")
