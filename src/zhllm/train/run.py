"""The one stage launcher: `run_stage(stage, recipe)` does every step a training stage shares.

A stage is a record (`Stage`): its config class (train/config.py's StageConfig plus its own data section),
how it opens its data, how it builds its model, its objective (train/objectives.py; made from the run and
the model, as DPO's reference needs the model) and, optionally, checks
to make before any process group exists and checkpoint hooks. The launcher owns the rest, once: loading and
validating the recipe, threads and seed, the out_dir policy (outputs.py), the resume guard, distributed
init, the seq_len check, the resolved config.yaml and the Trainer. Adding a stage = a record + an objective +
a recipe folder (configs/<name>/) + a CLI line calling `run_stage`.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable

import torch
import yaml

from ..config import from_dict, to_dict
from ..errors import ConfigError, ZhllmError
from ..fsutil import atomic_write_text
from ..outputs import check_output_dir, claim_output_dir, read_marker
from . import parallel as par
from .config import StageConfig, load_stage_config
from .objectives import Objective
from .state import checkpoint_dirs, resolve_resume


@dataclass
class StageRun:
    """One launch of a stage, as its hooks see it. `prepare` and `open_data` may fill the model directory the
    stage starts from, its tokenizer, and the tokenizer directory each checkpoint copies."""
    cfg: StageConfig
    source: str                       # the recipe, for messages
    resume_dir: Path | None
    dist: par.Dist | None = None      # set once the process group exists (before open_data)
    echo: Callable[..., None] = print  # prints on rank 0 only
    init_from: str | None = None
    tokenizer: Any = None
    tokenizer_dir: str | None = None


def default_inputs(cfg: StageConfig) -> list[str]:
    """The paths a run reads: its data paths and the model it starts from (its out_dir must not overlap them)."""
    data = getattr(getattr(cfg, "data", None), "path", None) or []
    init_from = cfg.model.get("init_from")
    return [str(p) for p in (data if isinstance(data, list) else [data])] + ([str(init_from)] if init_from else [])


@dataclass(frozen=True)
class Stage:
    name: str                                               # command, configs/<name>/ recipes, out_dir marker
    config: type[StageConfig]
    objective: Callable[[StageRun, torch.nn.Module], Objective]  # (run, the model built) -> its objective
    open_data: Callable[[StageRun], tuple[Any, Any]]        # (train, val or None): datasets with .batch()
    build_model: Callable[[StageRun, Any], torch.nn.Module]  # (run, train data) -> the model to train
    prepare: Callable[[StageRun], None] | None = None       # checks and loads before the process group
    # (export_model, checkpoint_extra) for the Trainer, e.g. LoRA: save the merged model plus the adapter
    checkpoint_hooks: Callable[[StageRun], tuple[Callable | None, Callable | None]] | None = None
    inputs: Callable[[StageConfig], list[str]] = default_inputs


def run_stage(stage: Stage, recipe: str | Path, overrides: list[str] | None = None,
              resume: str | None = None) -> dict:
    """Train `stage` from a recipe (a path or a packaged name); returns the run summary. Works the same under
    torchrun, any world size."""
    from .trainer import Trainer
    cfg, source = load_stage_config(stage.config, recipe, overrides, stage.name)
    t = cfg.train
    if t.threads > 0:
        torch.set_num_threads(t.threads)
    torch.manual_seed(t.seed)
    out = Path(cfg.out_dir)
    # Read-only on every rank, before rank 0 writes anything (it only writes after the process group's
    # rendezvous), so all ranks decide alike.
    check_run_dir(stage, cfg)
    ckpt_root = out / "checkpoints"
    resume_dir = resolve_resume(resume, ckpt_root)
    if resume is None and checkpoint_dirs(ckpt_root):
        raise ZhllmError(f"{cfg.out_dir} already holds checkpoints; pass --resume auto to continue, "
                         "or choose another out_dir")
    run = StageRun(cfg, source, resume_dir)
    if stage.prepare is not None:
        stage.prepare(run)
    run.dist = d = par.init_distributed(t.device)
    try:
        if not d.is_main:
            run.echo = lambda *_: None
        train, val = stage.open_data(run)
        if run.tokenizer_dir is None:
            run.tokenizer_dir = getattr(train, "tokenizer_dir", None)
        model = stage.build_model(run, train)
        if t.seq_len > model.config.max_seq_len:
            raise ConfigError(f"{source}: train.seq_len={t.seq_len} exceeds the model's max_seq_len="
                              f"{model.config.max_seq_len}")
        if d.is_main:
            claim_output_dir(out, stage.name, flag="out_dir", recognise=lambda p: _earlier_run(stage, p))
            atomic_write_text(out / "config.yaml", yaml.safe_dump(_dump(cfg), allow_unicode=True, sort_keys=False))
        export, extra = stage.checkpoint_hooks(run) if stage.checkpoint_hooks else (None, None)
        trainer = Trainer(cfg, stage.objective(run, model), model, train, val, tokenizer_dir=run.tokenizer_dir,
                          resume_dir=resume_dir, dist=d, export_model=export, checkpoint_extra=extra)
        return trainer.fit()
    finally:
        par.shutdown(d)


def check_run_dir(stage: Stage, cfg: StageConfig) -> None:
    """Refuse (one line) an out_dir this stage may not train into: anything but a missing or empty directory
    or this stage's earlier run, and any directory overlapping the run's inputs (outputs.py's policy)."""
    marker = read_marker(cfg.out_dir)
    if marker is not None and marker["command"] != stage.name:
        raise ZhllmError(f"out_dir {cfg.out_dir} holds the output of `zhllm {marker['command']}`; a `zhllm "
                         f"{stage.name}` run writes into its out_dir, so choose another out_dir")
    check_output_dir(cfg.out_dir, stage.name, inputs=stage.inputs(cfg), flag="out_dir",
                     recognise=lambda p: _earlier_run(stage, p))


def _earlier_run(stage: Stage, d: Path) -> bool:
    """A run of this stage from before out_dirs carried a marker: its resolved config.yaml (which must read as
    this stage's config) with checkpoints/ or metrics.jsonl."""
    if not (d / "config.yaml").is_file() or not ((d / "checkpoints").is_dir() or (d / "metrics.jsonl").is_file()):
        return False
    try:
        from_dict(stage.config, yaml.safe_load((d / "config.yaml").read_text(encoding="utf-8")), str(d))
    except (ZhllmError, OSError, yaml.YAMLError, TypeError, ValueError, AttributeError):
        return False
    return True


def _dump(cfg: StageConfig) -> dict:
    """The resolved config for config.yaml, with `model` and `data` first as in the recipes."""
    d = to_dict(cfg)
    first = [k for k in ("model", "data") if k in d]
    return {**{k: d[k] for k in first}, **{f.name: d[f.name] for f in fields(cfg) if f.name not in first}}
