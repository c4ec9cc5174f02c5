"""The bodies of the pipeline's stages. Each calls the library function behind the matching single command.

Every function has the shape `stage(runner, cfg, upstream, results) -> StageOutcome`: `upstream` holds the
fingerprints of the stages before it, `results` their summaries (paths of what they produced).
"""
from __future__ import annotations

from pathlib import Path

from .config import to_dict
from .pipeline import (BUILTIN_DEMO, PipelineConfig, _recipe_file, _resume_flag, final_checkpoint,
                       input_fingerprint)
from .stages import StageRunner


def corpus(runner: StageRunner, cfg: PipelineConfig, upstream: list[str], results: dict):
    c = cfg.corpus

    def fn(d: Path) -> dict:
        files = []
        if BUILTIN_DEMO in c.inputs:
            from .demo import write_demo_corpus
            files += [str(p) for p in write_demo_corpus(d, c.task_docs, cfg.seed)]
        files += [i for i in c.inputs if i != BUILTIN_DEMO]
        return {"files": files, "field": c.field}

    return runner.run("corpus", [to_dict(c), cfg.seed], input_fingerprint(c.inputs), fn)


def clean(runner: StageRunner, cfg: PipelineConfig, upstream: list[str], results: dict):
    from .data.clean import clean_corpus, format_clean_report, load_clean_config

    def fn(d: Path) -> dict:
        ccfg = load_clean_config(cfg.clean.config, cfg.clean.set)
        out = d / "data"
        report = clean_corpus(results["corpus"]["files"], out, ccfg, field=results["corpus"]["field"],
                              workers=cfg.clean.workers)
        runner.log(format_clean_report(report))
        return {"path": str(out), "report": report}

    return runner.run("clean", to_dict(cfg.clean), upstream, fn)


def tokenizer(runner: StageRunner, cfg: PipelineConfig, upstream: list[str], results: dict):
    t = cfg.tokenizer

    def fn(d: Path) -> dict:
        if t.path:
            from .tokenizer.load import load_tokenizer
            return {"path": t.path, "vocab_size": len(load_tokenizer(t.path)), "trained": False}
        from .tokenizer.train import train_tokenizer
        rep = train_tokenizer([results["clean"]["path"]], d / "tokenizer", t.vocab_size, max_chars=t.max_chars,
                              backend=t.backend, seed=cfg.seed)
        runner.log(rep.format() if hasattr(rep, "format") else str(rep))
        return {"path": str(d / "tokenizer"), "vocab_size": rep.vocab_size, "trained": True,
                "chars_per_token": rep.heldout_chars_per_token, "chars_trained": rep.chars_trained}

    return runner.run("tokenizer", to_dict(t), upstream + [cfg.seed], fn)


def tokenize(runner: StageRunner, cfg: PipelineConfig, upstream: list[str], results: dict):
    from .data.tokenize import tokenize_corpus

    def fn(d: Path) -> dict:
        out = d / "shards"
        rep = tokenize_corpus([results["clean"]["path"]], results["tokenizer"]["path"], out,
                              val_fraction=cfg.tokenize.val_fraction, workers=cfg.tokenize.workers or None)
        return {"path": str(out), "splits": rep.splits}

    return runner.run("tokenize", to_dict(cfg.tokenize), upstream, fn)


def pretrain(runner: StageRunner, cfg: PipelineConfig, upstream: list[str], results: dict):
    from .train.pretrain import run_pretrain

    def fn(d: Path) -> dict:
        run_dir = d / "run"
        recipe = _recipe_file(d, cfg.pretrain, {"data": {"path": [results["tokenize"]["path"]]},
                                                "out_dir": str(run_dir)})
        summary = run_pretrain(recipe, resume=_resume_flag(run_dir))
        return {**summary, "run_dir": str(run_dir), "checkpoint": str(final_checkpoint(run_dir))}

    return runner.run("pretrain", cfg.pretrain, upstream, fn)


def sft(runner: StageRunner, cfg: PipelineConfig, upstream: list[str], results: dict):
    from .train.sft import run_sft
    s = cfg.sft

    def fn(d: Path) -> dict:
        inputs = [i for i in s.inputs if i != BUILTIN_DEMO]
        if BUILTIN_DEMO in s.inputs:
            from .demo import write_demo_sft
            inputs.append(str(write_demo_sft(d / "demo_sft.jsonl", s.demo_conversations, cfg.seed)))
        run_dir = d / "run"
        recipe = _recipe_file(d, s.recipe, {"model": {"init_from": results["pretrain"]["checkpoint"]},
                                            "data": {"path": inputs}, "out_dir": str(run_dir)})
        summary = run_sft(recipe, resume=_resume_flag(run_dir))
        return {**summary, "run_dir": str(run_dir), "checkpoint": str(final_checkpoint(run_dir))}

    return runner.run("sft", to_dict(s), upstream + input_fingerprint([i for i in s.inputs]), fn)


def evaluate(runner: StageRunner, cfg: PipelineConfig, upstream: list[str], results: dict):
    from .eval.demo_tasks import evaluate_pipeline_models, pretrain_eval_windows

    def fn(d: Path) -> dict:
        models = {"pretrain": results["pretrain"]["checkpoint"]}
        if "sft" in results:
            models["sft"] = results["sft"]["checkpoint"]
        # the windows of pretraining's periodic eval, so its last val loss and this one measure the same text
        seq_len, batch_size, batches = pretrain_eval_windows(results["pretrain"]["run_dir"])
        return evaluate_pipeline_models(models, results["tokenize"]["path"], d, cfg.eval, seq_len, cfg.seed,
                                        batch_size, cfg.eval.val_batches or batches, log=runner.log)

    return runner.run("eval", to_dict(cfg.eval), upstream, fn)


def report(runner: StageRunner, cfg: PipelineConfig, upstream: list[str], results: dict):
    from .report import write_report

    def fn(d: Path) -> dict:
        path = write_report(Path(cfg.out_dir), cfg, results, runner.outcomes)
        runner.log(f"report: {path}")
        return {"path": str(path)}

    return runner.run("report", [cfg.name], upstream, fn)
