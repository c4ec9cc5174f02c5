"""The pipeline's stages in order, and `run_pipeline`, which walks them.

Each stage body has the shape `body(run: PipelineRun) -> StageOutcome`: it calls the library function behind
the matching single command, in its own directory of the run, through `run.runner.run(name, its config, what it
reads, fn)`, which caches it. A new stage is a body here and its entry in STAGES (plus its section in config.py
and, if it reports anything, a part in report.py).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import yaml

from ..config import merge, to_dict
from ..errors import ConfigError, ZhllmError
from ..fsutil import atomic_write_text
from .config import (BUILTIN_DEMO, PipelineConfig, StageRecipes, dpo_paths, grpo_paths, grpo_recipe,
                     load_pipeline_config, pretrain_paths, sft_paths)
from .runner import STARTED_FILE, StageOutcome, StageRunner, files_fingerprint

PIPELINE_COMMAND = "pipeline"
# bumped when the corpus stage's summary changes shape, so runs cached by an older zhllm re-run from it
CORPUS_LAYOUT = 2


@dataclass
class PipelineRun:
    """What a stage body sees: the config, its typed recipes, the runner, and what the stages before it made."""
    cfg: PipelineConfig
    recipes: StageRecipes
    runner: StageRunner
    results: dict = field(default_factory=dict)         # stage name -> summary (paths of what it produced)
    upstream: list[str] = field(default_factory=list)   # fingerprints of the stages run so far


def corpus(run: PipelineRun) -> StageOutcome:
    """`files`: text to clean (the built-in prose, the user's inputs); `generated`: the demo's task documents,
    written by zhllm itself, so they skip cleaning and, unless `tokenizer.task_docs`, the tokenizer's text."""
    c, seed = run.cfg.corpus, run.cfg.seed

    def fn(d: Path) -> dict:
        files, generated = [], []
        if BUILTIN_DEMO in c.inputs:
            from ..demo import write_demo_corpus
            prose, tasks = write_demo_corpus(d, c.task_docs, seed)
            files, generated = [str(prose)], [str(tasks)]
        files += [i for i in c.inputs if i != BUILTIN_DEMO]
        return {"files": files, "generated": generated, "field": c.field}

    from ..demo.tasks import TASKS_VERSION  # every later stage's fingerprint chains from this one
    config = [to_dict(c), seed, CORPUS_LAYOUT, TASKS_VERSION]
    return run.runner.run("corpus", config, _input_fingerprint(c.inputs), fn)


def clean(run: PipelineRun) -> StageOutcome:
    from ..data.clean import clean_corpus, format_clean_report, load_clean_config
    c, corpus_out = run.cfg.clean, run.results["corpus"]

    def fn(d: Path) -> dict:
        out = d / "data"
        report = clean_corpus(corpus_out["files"], out, load_clean_config(c.config, c.set),
                              field=corpus_out["field"], workers=c.workers or os.cpu_count() or 1)
        run.runner.log(format_clean_report(report))
        return {"path": str(out), "report": report}

    return run.runner.run("clean", to_dict(c), run.upstream, fn)


def tokenizer(run: PipelineRun) -> StageOutcome:
    t = run.cfg.tokenizer

    def fn(d: Path) -> dict:
        if t.path:
            from ..tokenizer.load import load_tokenizer
            return {"path": t.path, "vocab_size": len(load_tokenizer(t.path)), "trained": False}
        from ..tokenizer.train import train_tokenizer
        rep = train_tokenizer(_pretraining_text(run, generated=t.task_docs), d / "tokenizer", t.vocab_size,
                              max_chars=t.max_chars, backend=t.backend, seed=run.cfg.seed)
        run.runner.log(rep.format() if hasattr(rep, "format") else str(rep))
        return {"path": str(d / "tokenizer"), "vocab_size": rep.vocab_size, "trained": True,
                "chars_per_token": rep.heldout_chars_per_token, "chars_trained": rep.chars_trained}

    return run.runner.run("tokenizer", to_dict(t), run.upstream + [run.cfg.seed], fn)


def tokenize(run: PipelineRun) -> StageOutcome:
    from ..data.tokenize import tokenize_corpus
    t = run.cfg.tokenize

    def fn(d: Path) -> dict:
        out = d / "shards"
        rep = tokenize_corpus(_pretraining_text(run), run.results["tokenizer"]["path"], out,
                              val_fraction=t.val_fraction, workers=t.workers or None)
        return {"path": str(out), "splits": rep.splits}

    return run.runner.run("tokenize", to_dict(t), run.upstream, fn)


def pretrain(run: PipelineRun) -> StageOutcome:
    from ..train.pretrain import run_pretrain

    def fn(d: Path) -> dict:
        run_dir = d / "run"
        recipe = _recipe_file(d, run.cfg.pretrain, pretrain_paths(run.results["tokenize"]["path"], str(run_dir)))
        summary = _finished("pretrain", run_pretrain(recipe, resume=_resume_flag(run_dir)))
        return {**summary, "run_dir": str(run_dir), "checkpoint": str(_final_checkpoint(run_dir))}

    return run.runner.run("pretrain", run.cfg.pretrain, run.upstream, fn)


def sft(run: PipelineRun) -> StageOutcome:
    from ..train.sft import run_sft
    s = run.cfg.sft

    def fn(d: Path) -> dict:
        inputs = [i for i in s.inputs if i != BUILTIN_DEMO]
        if BUILTIN_DEMO in s.inputs:
            from ..demo import write_demo_sft
            inputs.append(str(write_demo_sft(d / "demo_sft.jsonl", s.demo_conversations, run.cfg.seed)))
        run_dir = d / "run"
        recipe = _recipe_file(d, s.recipe, sft_paths(run.results["pretrain"]["checkpoint"], inputs, str(run_dir)))
        summary = _finished("sft", run_sft(recipe, resume=_resume_flag(run_dir)))
        return {**summary, "run_dir": str(run_dir), "checkpoint": str(_final_checkpoint(run_dir))}

    return run.runner.run("sft", to_dict(s), run.upstream + _input_fingerprint(s.inputs), fn)


def dpo(run: PipelineRun) -> StageOutcome:
    from ..train.dpo import run_dpo
    s = run.cfg.dpo

    def fn(d: Path) -> dict:
        sft_model = run.results["sft"]["checkpoint"]
        inputs, made = [], {}
        if BUILTIN_DEMO in s.inputs:
            from ..align.demo_pairs import write_demo_preferences
            made = write_demo_preferences(sft_model, d, s.prompts, s.samples, s.temperature, s.max_new_tokens,
                                          run.cfg.seed)
            run.runner.log(f"[dpo] pairs: {made['pairs']} from {made['prompts']} training tasks "
                           f"({made['wrong']} wrong sampled answers, {made['right']} right ones)")
            inputs.append(made["path"])
        files = [i for i in s.inputs if i != BUILTIN_DEMO]
        if files and s.make_rejected:
            from ..align.make_rejected import make_rejected
            out = d / "rejected.jsonl"
            if not out.is_file():  # a finished file survives a resumed stage; make_rejected resumes its own partial
                stats = make_rejected(sft_model, files, out, num=s.samples, temperature=s.temperature,
                                      max_new_tokens=s.max_new_tokens, seed=run.cfg.seed, progress=False)
                run.runner.log(f"[dpo] make-rejected: {stats.summary().splitlines()[0]}")
            inputs.append(str(out))
        elif files:
            inputs += files
        run_dir = d / "run"
        recipe = _recipe_file(d, s.recipe, dpo_paths(sft_model, inputs, str(run_dir)))
        summary = _finished("dpo", run_dpo(recipe, resume=_resume_flag(run_dir)))
        return {**summary, "run_dir": str(run_dir), "checkpoint": str(_final_checkpoint(run_dir)), "pairs": made}

    return run.runner.run("dpo", to_dict(s), run.upstream + _input_fingerprint(s.inputs), fn)


def grpo(run: PipelineRun) -> StageOutcome:
    from ..train.grpo import run_grpo
    s = run.cfg.grpo

    def fn(d: Path) -> dict:
        start = "dpo" if "dpo" in run.results else "sft"
        inputs = [i for i in s.inputs if i != BUILTIN_DEMO]
        if BUILTIN_DEMO in s.inputs:
            from ..demo import write_demo_rl_prompts
            inputs.append(str(write_demo_rl_prompts(d / "prompts.jsonl", s.prompts, run.cfg.seed)))
        run_dir = d / "run"
        recipe = _recipe_file(d, grpo_recipe(s), grpo_paths(run.results[start]["checkpoint"], inputs, str(run_dir)))
        summary = _finished("grpo", run_grpo(recipe, resume=_resume_flag(run_dir)))
        return {**summary, "run_dir": str(run_dir), "checkpoint": str(_final_checkpoint(run_dir)),
                "started_from": start}

    return run.runner.run("grpo", to_dict(s), run.upstream + _input_fingerprint(s.inputs), fn)


def evaluate(run: PipelineRun) -> StageOutcome:
    from ..eval.demo_tasks import evaluate_pipeline_models
    e, trained = run.cfg.eval, run.recipes.pretrain

    def fn(d: Path) -> dict:
        models = {"pretrain": run.results["pretrain"]["checkpoint"]}
        for stage in ("sft", "dpo", "grpo"):
            if stage in run.results:
                models[stage] = run.results[stage]["checkpoint"]
        # the windows of pretraining's periodic eval, so its last val loss and this one measure the same text
        return evaluate_pipeline_models(models, run.results["tokenize"]["path"], d, e, trained.train.seq_len,
                                        run.cfg.seed, trained.train.batch_size, e.val_batches or trained.eval.batches,
                                        log=run.runner.log)

    return run.runner.run("eval", to_dict(e), run.upstream, fn)


def report(run: PipelineRun) -> StageOutcome:
    from .report import write_report

    def fn(d: Path) -> dict:
        path = write_report(Path(run.cfg.out_dir), run.cfg, run.results, run.runner.outcomes)
        run.runner.log(f"report: {path}")
        return {"path": str(path)}

    return run.runner.run("report", [run.cfg.name], run.upstream, fn)


STAGES: dict[str, Callable[[PipelineRun], StageOutcome]] = {
    "corpus": corpus, "clean": clean, "tokenizer": tokenizer, "tokenize": tokenize, "pretrain": pretrain,
    "sft": sft, "dpo": dpo, "grpo": grpo, "eval": evaluate, "report": report}
STAGE_ORDER = list(STAGES)


def run_pipeline(config: str | Path, overrides: list[str] | None = None, force: bool = False,
                 until: str | None = None, log=print, overwrite: bool = False) -> dict:
    """Run (or resume) every stage up to `until`; returns {stage: summary}.
    `out_dir` follows outputs.py: a new or empty directory, or an earlier pipeline run (`overwrite`: also
    another zhllm command's output, which is replaced)."""
    from ..outputs import claim_output_dir
    cfg, recipes = load_pipeline_config(config, overrides)
    if until is not None and until not in STAGES:
        raise ConfigError(f"--until {until!r}: choose one of {', '.join(STAGE_ORDER)}")
    out = Path(cfg.out_dir)
    inputs = [i for i in cfg.corpus.inputs + cfg.sft.inputs + cfg.dpo.inputs + cfg.grpo.inputs if i != BUILTIN_DEMO]
    claim_output_dir(out, PIPELINE_COMMAND, inputs=[*inputs, cfg.tokenizer.path, cfg.clean.config],
                     overwrite=overwrite, flag="out_dir", recognise=_is_run_dir)
    last = STAGE_ORDER.index(until) if until else len(STAGE_ORDER) - 1
    # dpo starts from the SFT model and grpo from the DPO (or SFT) model: both run only after an SFT stage
    plan = [n for n in STAGE_ORDER[:last + 1] if (n != "sft" or cfg.sft.enabled)
            and (n != "dpo" or (cfg.dpo.enabled and cfg.sft.enabled))
            and (n != "grpo" or (cfg.grpo.enabled and cfg.sft.enabled))]
    run = PipelineRun(cfg, recipes, StageRunner(out, force=force, log=log, plan=plan))
    atomic_write_text(out / "pipeline.yaml", yaml.safe_dump(to_dict(cfg), allow_unicode=True, sort_keys=False))
    for name in plan:
        outcome = STAGES[name](run)
        run.results[name] = outcome.summary
        run.upstream = run.upstream + [outcome.fingerprint]
    return run.results


def _is_run_dir(d: Path) -> bool:
    """A run directory written before outputs carried a marker: its config plus a stage the runner started."""
    return (d / "pipeline.yaml").is_file() and any((d / s / STARTED_FILE).is_file() for s in STAGE_ORDER)


def _input_fingerprint(inputs: list[str]) -> list:
    from ..corpus.readers import expand_inputs
    real = [i for i in inputs if i != BUILTIN_DEMO]
    out: list = [i for i in inputs if i == BUILTIN_DEMO]
    if BUILTIN_DEMO in inputs:
        from ..demo import prose_files
        out.append(files_fingerprint(prose_files()))
    if real:
        out.append(files_fingerprint(expand_inputs(real)))
    return out


def _pretraining_text(run: PipelineRun, generated: bool = True) -> list[str]:
    """The cleaned corpus, and (unless `generated` is false) the task documents the corpus stage generated."""
    return [run.results["clean"]["path"]] + (run.results["corpus"]["generated"] if generated else [])


def _recipe_file(stage_dir: Path, recipe: dict, filled: dict) -> Path:
    """Write the stage's recipe with the pipeline's paths filled in; the stage reads it like any recipe."""
    path = stage_dir / "recipe.yaml"
    atomic_write_text(path, yaml.safe_dump(merge(recipe, filled), allow_unicode=True, sort_keys=False))
    return path


def _resume_flag(run_dir: Path) -> str | None:
    from ..train.state import checkpoint_dirs
    return "auto" if checkpoint_dirs(run_dir / "checkpoints") else None


def _finished(stage: str, summary: dict) -> dict:
    """A training run stopped early (SIGTERM, Ctrl-C) saved a checkpoint but is not done: the stage must not be
    marked finished, or the next run would skip it and go on with a half-trained model."""
    if summary.get("stopped_early"):
        raise ZhllmError(f"{stage} stopped at step {summary['step']}/{summary['max_steps']} (checkpoint saved); "
                         "re-run the same command to resume")
    return summary


def _final_checkpoint(run_dir: Path) -> Path:
    from ..train.state import resolve_resume
    ckpt = resolve_resume("auto", run_dir / "checkpoints")
    if ckpt is None:
        raise ZhllmError(f"{run_dir}: the run finished without a checkpoint")
    return ckpt
