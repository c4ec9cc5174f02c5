"""`zhllm eval`: one task over one or more models, a side-by-side table, and (with `--out`) results.json,
results.md and each model's per-item rows, written under the output policy (zhllm/outputs.py)."""
from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ZhllmError

COMMAND = "eval"
TASKS = ("bpb", "mc", "gen", "demo")


@dataclass
class EvalOptions:
    task: str
    inputs: list[str] = field(default_factory=list)
    dev: list[str] = field(default_factory=list)
    shots: int = 0
    score: str = "letter"
    chat: bool = False
    text_field: str | None = None     # bpb: the text field
    max_docs: int | None = None
    max_chars_per_doc: int | None = None
    stride: int | None = None
    context: int | None = None
    batch_tokens: int = 8192
    batch_size: int = 16
    match: str = "exact"
    stop: list[str] = field(default_factory=list)
    max_new_tokens: int = 64
    num: int = 100                    # demo: how many held-out tasks
    seed: int = 0                     # demo: the tasks' seed; with samples, the sampling seed too
    samples: int = 0                  # gen/demo: answers sampled per item for pass@k (0: one greedy answer)
    temperature: float = 0.7          # with samples
    top_p: float = 1.0
    device: str = "auto"
    dtype: str = "auto"
    progress: bool = True


def run_eval(models: list[str], opts: EvalOptions, out: str | None = None, overwrite: bool = False,
             log=print) -> dict:
    """Evaluate every model on the same inputs; print the table; write `out` when given."""
    if opts.task not in TASKS:
        raise ZhllmError(f"unknown task {opts.task!r} (use {', '.join(TASKS)})")
    if opts.task in ("bpb", "mc", "gen") and not opts.inputs:
        raise ZhllmError(f"--task {opts.task} needs --input FILE...")
    if not models:
        raise ZhllmError("name at least one model directory")
    if out is not None:
        from ..outputs import check_output_dir
        check_output_dir(out, COMMAND, inputs=[*models, *opts.inputs, *opts.dev], overwrite=overwrite)
    shared = _read_shared(opts, log)
    results, rows = {}, {}
    for k, path in enumerate(models):
        metrics, model_rows = _evaluate_one(path, opts, shared)
        label = path if path not in results else f"{path} (#{k + 1})"  # the same model twice: two rows
        results[label] = metrics
        rows[label] = model_rows
        if metrics.get("skipped_too_long"):
            log(f"[eval] {path}: {metrics['skipped_too_long']} items skipped: their prompt does not fit the "
                "model's context even without examples")
    table = markdown_table(opts.task, results)
    log(table)
    report = {"task": opts.task, "options": {k: v for k, v in vars(opts).items() if k != "progress"},
              "models": results}
    if out is not None:
        _write(out, report, table, rows)
        log(f"wrote {out}/results.json, results.md")
    return report


def _read_shared(opts: EvalOptions, log) -> dict:
    """Items read once for all models (mc, gen, demo); bpb streams its corpus per model instead."""
    from ..corpus.read_stats import ReadStats
    if opts.task == "mc":
        from .mc import read_items
        stats, dev_stats = ReadStats(), ReadStats()
        items = read_items(opts.inputs, stats)
        dev = read_items(opts.dev, dev_stats) if opts.dev else []
        for name, s in (("input", stats), ("dev", dev_stats)):
            if s.bad_total:
                log(f"[eval] {name}: {s.summary()}")
        if not items:
            raise ZhllmError(f"no multiple-choice items in {' '.join(opts.inputs)} ({stats.why_empty()})")
        return {"items": items, "dev": dev, "read": stats.to_dict(), "dev_read": dev_stats.to_dict()}
    if opts.task == "gen":
        from .gen import JsonlGenTask
        task = JsonlGenTask(opts.inputs, opts.match, opts.stop)
        if task.stats.bad_total:
            log(f"[eval] input: {task.stats.summary()}")
        if not task.items():
            raise ZhllmError(f"no generation items in {' '.join(opts.inputs)} ({task.stats.why_empty()})")
        return {"task": task, "read": task.stats.to_dict()}
    if opts.task == "demo":
        from .demo_tasks import DemoTasks
        return {"task": DemoTasks(opts.num, opts.seed), "read": {}}
    return {}


def _bar(total: int | None, unit: str, enabled: bool, desc: str):
    from tqdm import tqdm
    return tqdm(total=total, unit=unit, disable=not enabled, file=sys.stderr, desc=desc, leave=False)


def _evaluate_one(path: str, opts: EvalOptions, shared: dict) -> tuple[dict, list[dict]]:
    from ..infer.engine import Engine
    engine = Engine.load(path, device=opts.device, dtype=opts.dtype)
    started = time.perf_counter()
    name = Path(path).name
    if opts.task == "bpb":
        from ..corpus.read_stats import ReadStats
        from ..corpus.readers import iter_texts
        from .bpb import bits_per_byte, limited_texts
        stats = ReadStats()
        texts = limited_texts(iter_texts(opts.inputs, field=opts.text_field, stats=stats), opts.max_docs,
                              opts.max_chars_per_doc)
        with _bar(opts.max_docs, "doc", opts.progress, name) as bar:
            res = bits_per_byte(engine, texts, stride=opts.stride, context=opts.context,
                                batch_tokens=opts.batch_tokens, progress=lambda d, b: bar.update(d - bar.n))
        if res.docs == 0:
            raise ZhllmError(f"no documents in {' '.join(opts.inputs)} ({stats.why_empty()})")
        res.read = stats.to_dict()
        seconds = time.perf_counter() - started
        return {**res.to_dict(), "seconds": seconds, "tokens_per_s": res.tokens / max(seconds, 1e-9)}, []
    if opts.task == "mc":
        from .mc import evaluate_mc
        with _bar(len(shared["items"]), "item", opts.progress, name) as bar:
            res = evaluate_mc(engine, shared["items"], dev=shared["dev"], shots=opts.shots, chat=opts.chat,
                              score=opts.score, batch_size=opts.batch_size, progress=bar.update)
        res.read = shared["read"]
        seconds = time.perf_counter() - started
        return {**res.to_dict(), "seconds": seconds, "items_per_s": res.overall.total / max(seconds, 1e-9)}, res.rows
    from .mc import Tally
    from .tasks import Sampling, run_task, sampled_metrics
    task = shared["task"]
    chat = opts.chat if opts.task == "gen" else _is_chat_model(engine)
    sampling = Sampling(opts.samples, opts.temperature, opts.top_p, opts.seed) if opts.samples else None
    with _bar(len(task.items()), "item", opts.progress, name) as bar:
        rows = run_task(task, engine.model, engine.tokenizer, chat=chat, max_new_tokens=opts.max_new_tokens,
                        batch_size=opts.batch_size, engine=engine, progress=bar.update, sampling=sampling)
    seconds = time.perf_counter() - started
    if sampling is not None:
        return {**sampled_metrics(rows, sampling.n), "chat": chat, "read": shared["read"], "seconds": seconds}, rows
    tally = Tally()
    for r in rows:
        tally.add(r["correct"], 1)
    metrics = tally.to_dict()
    metrics.pop("chance")  # open answers have no chance level
    return {**metrics, "chat": chat, "read": shared["read"], "seconds": seconds}, rows


def _is_chat_model(engine) -> bool:
    """The demo tasks ask an SFT model in chat form and a pretrained one in its documents' form: a tokenizer
    with a chat template and a model whose generation config stops at the end of a turn is a chat model."""
    return bool(getattr(engine.tokenizer, "chat_template", None)) and len(engine.stop_ids) > 1


# ------------------------------------------------------------------------------------------------- output

def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def markdown_table(task: str, results: dict[str, dict]) -> str:
    if task == "bpb":
        lines = ["| model | bits/byte | ppl (per token) | docs | bytes | tokens | tokens/s |",
                 "|---|---:|---:|---:|---:|---:|---:|"]
        lines += [f"| {m} | {r['bpb']:.4f} | {r['ppl']:.2f} | {r['docs']} | {r['bytes']} | {r['tokens']} | "
                  f"{r['tokens_per_s']:.0f} |" for m, r in results.items()]
        return "\n".join(lines)
    # sampled answers: accuracy is pass@1 (the mean over samples), then a column per pass@k
    passes = sorted({k for r in results.values() for k in r if k.startswith("pass@")}, key=lambda k: int(k[5:]))
    lines = ["| model | accuracy | 95% CI | chance | n |" + "".join(f" {k} |" for k in passes),
             "|---|---:|---:|---:|---:|" + "---:|" * len(passes)]
    for m, r in results.items():
        chance = _pct(r["chance"]) if "chance" in r else "-"
        cells = "".join(f" {_pct(r[k]) if k in r else '-'} |" for k in passes)
        lines.append(f"| {m} | {_pct(r['acc'])} | {_pct(r['ci95'][0])}–{_pct(r['ci95'][1])} | {chance} | {r['n']} |"
                     + cells)
    if task == "mc":
        subjects = sorted({s for r in results.values() for s in r["subjects"]})
        if len(subjects) > 1:
            models = list(results)
            lines += ["", "| subject | n | " + " | ".join(models) + " |", "|---|---:|" + "---:|" * len(models)]
            for s in subjects:
                n = next(r["subjects"][s]["n"] for r in results.values() if s in r["subjects"])
                cells = [_pct(results[m]["subjects"][s]["acc"]) if s in results[m]["subjects"] else "-"
                         for m in models]
                lines.append(f"| {s} | {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _write(out: str, report: dict, table: str, rows: dict[str, list[dict]]) -> None:
    from ..fsutil import atomic_directory
    with atomic_directory(out, marker=COMMAND) as tmp:
        (tmp / "results.json").write_text(json.dumps(report, indent=2, ensure_ascii=False), encoding="utf-8")
        (tmp / "results.md").write_text(f"# zhllm eval: {report['task']}\n\n{table}\n", encoding="utf-8")
        for k, (model, model_rows) in enumerate(rows.items()):
            if model_rows:
                text = "".join(json.dumps({"model": model, **r}, ensure_ascii=False) + "\n" for r in model_rows)
                (tmp / f"rows-{k}-{Path(model).name}.jsonl").write_text(text, encoding="utf-8")
