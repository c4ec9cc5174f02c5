"""`zhllm pipeline CONFIG`: corpus -> clean -> tokenizer -> tokenize -> pretrain -> sft -> eval -> report.

Each stage calls the same library function as its single command, in its own directory of the run, and is
cached by `stages.StageRunner`: a finished stage is skipped, a changed config or input re-runs it and what
follows, and an interrupted stage resumes (pretraining and SFT from their last checkpoint).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from .config import load_config, merge, to_dict
from .errors import ConfigError, ZhllmError
from .fsutil import atomic_write_text
from .stages import STARTED_FILE, StageRunner, files_fingerprint

BUILTIN_DEMO = "builtin:demo"
STAGE_ORDER = ["corpus", "clean", "tokenizer", "tokenize", "pretrain", "sft", "eval", "report"]
PIPELINE_COMMAND = "pipeline"


@dataclass
class CorpusSection:
    inputs: list[str] = field(default_factory=lambda: [BUILTIN_DEMO])  # files/dirs/globs, or builtin:demo
    field: Optional[str] = None
    task_docs: int = 3000          # built-in demo only: task documents added to the prose


@dataclass
class CleanSection:
    config: Optional[str] = None   # a clean recipe (configs/clean/*.yaml); default filters otherwise
    set: list[str] = field(default_factory=list)
    workers: int = 1


@dataclass
class TokenizerSection:
    path: Optional[str] = None     # use this tokenizer instead of training one
    vocab_size: int = 4096
    max_chars: int = 50_000_000
    backend: str = "bpe"


@dataclass
class TokenizeSection:
    val_fraction: float = 0.02
    workers: int = 0               # 0 = all cores


@dataclass
class SftSection:
    enabled: bool = True
    inputs: list[str] = field(default_factory=lambda: [BUILTIN_DEMO])  # chat files, or builtin:demo tasks
    demo_conversations: int = 3000
    recipe: dict[str, Any] = field(default_factory=dict)  # an SFT recipe (configs/sft/*.yaml shape)


@dataclass
class PipelineEvalSection:
    tasks: int = 100               # held-out demo tasks answered greedily by each model
    max_new_tokens: int = 40
    val_batches: Optional[int] = None  # of pretraining's batch size; None: the windows of its periodic eval
    samples: int = 3               # sample chats shown in the report


@dataclass
class PipelineConfig:
    name: str = "demo"
    out_dir: str = "runs/demo"
    seed: int = 0
    corpus: CorpusSection = field(default_factory=CorpusSection)
    clean: CleanSection = field(default_factory=CleanSection)
    tokenizer: TokenizerSection = field(default_factory=TokenizerSection)
    tokenize: TokenizeSection = field(default_factory=TokenizeSection)
    pretrain: dict[str, Any] = field(default_factory=dict)  # a pretrain recipe (configs/pretrain/*.yaml shape)
    sft: SftSection = field(default_factory=SftSection)
    eval: PipelineEvalSection = field(default_factory=PipelineEvalSection)


def load_pipeline_config(path: str | Path, overrides: list[str] | None = None) -> PipelineConfig:
    from .train.config import resolve_recipe
    return load_config(PipelineConfig, resolve_recipe(path, "."), overrides)


def _recipe_file(stage_dir: Path, recipe: dict, filled: dict) -> Path:
    """Write the stage's recipe with the pipeline's paths filled in; the stage reads it like any recipe."""
    path = stage_dir / "recipe.yaml"
    atomic_write_text(path, yaml.safe_dump(merge(recipe, filled), allow_unicode=True, sort_keys=False))
    return path


def _resume_flag(out_dir: Path) -> str | None:
    from .train.state import checkpoint_dirs
    return "auto" if checkpoint_dirs(out_dir / "checkpoints") else None


def final_checkpoint(run_dir: Path) -> Path:
    from .train.state import resolve_resume
    ckpt = resolve_resume("auto", run_dir / "checkpoints")
    if ckpt is None:
        raise ZhllmError(f"{run_dir}: the run finished without a checkpoint")
    return ckpt


def run_pipeline(config: str | Path, overrides: list[str] | None = None, force: bool = False,
                 until: str | None = None, log=print, overwrite: bool = False) -> dict:
    """Run (or resume) every stage up to `until`; returns {stage: summary}.
    `out_dir` follows outputs.py: a new or empty directory, or an earlier pipeline run (`overwrite`: also
    another zhllm command's output, which is replaced)."""
    cfg = load_pipeline_config(config, overrides)
    if until is not None and until not in STAGE_ORDER:
        raise ConfigError(f"--until {until!r}: choose one of {', '.join(STAGE_ORDER)}")
    from . import pipeline_stages as ps
    from .outputs import claim_output_dir
    run = Path(cfg.out_dir)
    inputs = [i for i in cfg.corpus.inputs + cfg.sft.inputs if i != BUILTIN_DEMO]
    claim_output_dir(run, PIPELINE_COMMAND, inputs=[*inputs, cfg.tokenizer.path, cfg.clean.config],
                     overwrite=overwrite, flag="out_dir", recognise=_is_run_dir)
    last = STAGE_ORDER.index(until) if until else len(STAGE_ORDER) - 1
    plan = [n for n in STAGE_ORDER[:last + 1] if n != "sft" or cfg.sft.enabled]
    runner = StageRunner(run, force=force, log=log, plan=plan)
    atomic_write_text(run / "pipeline.yaml", yaml.safe_dump(to_dict(cfg), allow_unicode=True, sort_keys=False))
    steps = [ps.corpus, ps.clean, ps.tokenizer, ps.tokenize, ps.pretrain, ps.sft, ps.evaluate, ps.report]
    upstream: list[str] = []
    results: dict = {}
    for name, step in zip(STAGE_ORDER[:last + 1], steps):
        if name == "sft" and not cfg.sft.enabled:
            continue
        outcome = step(runner, cfg, upstream, results)
        results[name] = outcome.summary
        upstream = upstream + [outcome.fingerprint]
    return results


def _is_run_dir(d: Path) -> bool:
    """A run directory written before outputs carried a marker: its config plus a stage the runner started."""
    return (d / "pipeline.yaml").is_file() and any((d / s / STARTED_FILE).is_file() for s in STAGE_ORDER)


def input_fingerprint(inputs: list[str]) -> list:
    from .corpus.readers import expand_inputs
    real = [i for i in inputs if i != BUILTIN_DEMO]
    out: list = [i for i in inputs if i == BUILTIN_DEMO]
    if BUILTIN_DEMO in inputs:
        from .demo import prose_files
        out.append(files_fingerprint(prose_files()))
    if real:
        out.append(files_fingerprint(expand_inputs(real)))
    return out

