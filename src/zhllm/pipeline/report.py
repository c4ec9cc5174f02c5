"""`runs/NAME/report.md`: what the pipeline ran, what it produced, how well it does, what to run next."""
from __future__ import annotations

import json
import os
from pathlib import Path

from ..fsutil import atomic_write_text


def _rel(path: str | Path, base: Path) -> str:
    return os.path.relpath(Path(path).resolve(), base.resolve())


def _fmt(x, digits: int = 4) -> str:
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return "—" if x is None else str(x)


def _model_line(checkpoint: str) -> str:
    from ..model.io import read_model_config
    c = read_model_config(checkpoint)
    return (f"{c.arch}, {c.num_params() / 1e6:.2f}M parameters (dim {c.dim}, {c.n_layers} layers, "
            f"{c.n_heads} heads / {c.n_kv_heads} KV heads, FFN {c.ffn_dim}, vocab {c.vocab_size})")


def _last_eval(summary: dict) -> dict | None:
    """The training run's last periodic eval (step, val_loss, val_windows) and the precision it ran in."""
    from ..errors import ZhllmError
    from ..train.metrics import read_metrics
    from ..train.state import load_trainer_state
    try:
        evals = [r for r in read_metrics(summary["run_dir"]) if r.get("kind") == "eval" and "val_loss" in r]
        precision = load_trainer_state(Path(summary["checkpoint"])).precision
    except (ZhllmError, OSError, KeyError, ValueError):
        return None
    return {**evals[-1], "precision": precision or "?"} if evals else None


def _eval_notes(ev: dict, results: dict) -> list[str]:
    """What the Evaluation table measures, and why its figures differ from the training section's."""
    pre, sft = ev.get("pretrain", {}), ev.get("sft")
    notes = [f"Validation loss on the first {pre.get('val_windows', '?')} windows of the pretraining text's "
             f"{pre.get('val_split', 'val')} split, every model loaded in fp32 from its "
             "checkpoint; bits per byte = loss / ln 2 / (UTF-8 bytes per token of that split). Task accuracy = "
             "exact match of greedy answers on held-out demo tasks."]
    trained = _last_eval(results["pretrain"]) if "pretrain" in results else None
    if trained and pre:
        if trained.get("val_windows") == pre.get("val_windows") and trained["step"] == results["pretrain"].get("step"):
            notes.append(f"The pretrain row re-measures the training section's last val loss (same checkpoint, same "
                         f"windows): {_fmt(pre['val_loss'])} here in fp32 against {_fmt(trained['val_loss'])} "
                         f"during training in {trained['precision']}.")
        else:
            why = (f"training last evaluated at step {trained['step']}, not on the final checkpoint "
                   f"(step {results['pretrain'].get('step')})" if trained["step"] != results["pretrain"].get("step")
                   else f"training evaluated {trained.get('val_windows') or 'other'} windows, this table "
                        f"{pre.get('val_windows')} (eval.val_batches)")
            notes.append(f"The pretrain row is not the training section's last val loss: {why}.")
    if sft and pre and sft["val_bpb"] > pre["val_bpb"]:
        notes.append(f"The SFT model's bits per byte on this text rises from {_fmt(pre['val_bpb'])} to "
                     f"{_fmt(sft['val_bpb'])}: fine-tuning on chat-formatted conversations alone moves it away from "
                     "plain pretraining text; what SFT gains shows in task accuracy and its own val loss above.")
    return notes


def _dpo_lines(r: dict, last: dict | None) -> list[str]:
    """Where the pairs came from, and the held-out preference figures of the run's last periodic eval."""
    out = []
    made = r.get("pairs") or {}
    if made:
        out.append(f"- pairs: {made['pairs']} (chosen = the correct answer, rejected = the SFT model's own sampled "
                   f"answer; {made['wrong']} of its {made['sampled']} samples to {made['prompts']} training tasks "
                   "were wrong" + (", only those kept)" if made["wrong"] else "; none wrong, so its right ones)"))
    if last and "val_rewards/accuracy" in last:
        out.append(f"- held-out pairs at step {last['step']}: preference accuracy {last['val_rewards/accuracy']:.1%}, "
                   f"reward margin {_fmt(last['val_rewards/margins'])}, DPO loss {_fmt(last['val_loss'])} "
                   f"(ln 2 = {_fmt(0.6931)} at the start)")
    return out


def _grpo_lines(r: dict) -> list[str]:
    """What GRPO started from and was rewarded for, and the mean reward of its first and last log windows."""
    import yaml

    from ..errors import ZhllmError
    from ..train.metrics import read_metrics
    try:
        recipe = yaml.safe_load((Path(r["run_dir"]) / "config.yaml").read_text(encoding="utf-8"))
        rewards = ", ".join(f"{x.get('name') or x.get('function') or x['type']} × {x.get('weight', 1.0):g}"
                            for x in recipe["rewards"])
        means = [x["reward"] for x in read_metrics(r["run_dir"]) if x.get("kind", "train") == "train" and "reward" in x]
    except (ZhllmError, OSError, KeyError, TypeError, yaml.YAMLError):
        return []
    out = [f"- started from the {r.get('started_from', '?')} model; rewards: {rewards}"]
    if means:
        out.append(f"- mean reward of the sampled answers: {means[0]:.3f} in the first log window, "
                   f"{means[-1]:.3f} in the last")
    return out


def _kind_table(ev: dict) -> list[str]:
    """Held-out answers right per task kind and model: which skills each stage adds (empty for an eval made
    before the breakdown existed)."""
    stages = [s for s, m in ev.items() if m.get("tasks_right_by_kind")]
    if not stages:
        return []
    kinds = list(dict.fromkeys(k for s in stages for k in ev[s]["tasks_right_by_kind"]))
    lines = ["Right answers per task kind:", "", "| kind | tasks | " + " | ".join(stages) + " |",
             "|---|---:|" + "---:|" * len(stages)]
    for kind in kinds:
        counts = [ev[s]["tasks_right_by_kind"].get(kind, [0, 0]) for s in stages]
        lines.append(f"| {kind} | {max(n for _, n in counts)} | " + " | ".join(str(r) for r, _ in counts) + " |")
    return lines + [""]


def write_report(run_dir: Path, cfg, results: dict, outcomes: list) -> Path:
    from ..train.metrics import plot_run
    lines = [f"# zhllm pipeline report: {cfg.name}", ""]
    lines += ["## What ran", "", f"Config: `{_rel(run_dir / 'pipeline.yaml', run_dir)}` (resolved).", "",
              "| stage | status | time (s) |", "|---|---|---:|"]
    for o in outcomes:
        lines.append(f"| {o.name} | {'cached' if o.skipped else 'ran'} | {o.seconds:.1f} |")
    total = sum(o.seconds for o in outcomes)
    lines += [f"| **total** | | {total:.1f} |", ""]

    clean = results.get("clean", {}).get("report", {})
    if clean:
        lines += ["## Data", "", f"- records read: {clean.get('records_read')}, kept after cleaning and dedup: "
                  f"{clean.get('docs_kept')} ({clean.get('chars_out')} characters)",
                  "- removed: " + (", ".join(f"{k} {v}" for k, v in clean.get("removed", {}).items()) or "none")]
        if results.get("corpus", {}).get("generated"):
            learned = results.get("tokenizer", {}).get("trained") and not cfg.tokenizer.task_docs
            lines.append(f"- generated task documents: {cfg.corpus.task_docs} (not cleaned"
                         + ("; left out of the tokenizer's training text)" if learned else ")"))
        splits = results.get("tokenize", {}).get("splits") or {}
        for name, s in splits.items():
            if isinstance(s, dict):
                lines.append(f"- {name} split: {s.get('tokens', s.get('num_tokens'))} tokens, "
                             f"{s.get('documents', s.get('docs'))} documents")
        lines.append("")
    tok = results.get("tokenizer", {})
    if tok:
        lines += ["## Tokenizer", "", f"- `{_rel(tok['path'], run_dir)}`: vocabulary {tok.get('vocab_size')}"
                  + (f", {tok['chars_per_token']:.2f} characters per token on held-out text"
                     if tok.get("chars_per_token") else ""), ""]

    lines += ["## Training", ""]
    for stage in ("pretrain", "sft", "dpo", "grpo"):
        r = results.get(stage)
        if not r:
            continue
        lines += [f"### {stage}", "", f"- model: {_model_line(r['checkpoint'])}",
                  f"- steps {r.get('step')}, tokens seen {r.get('tokens_seen')}, {r.get('seconds', 0):.0f} s"]
        last = _last_eval(r)
        if stage == "dpo":
            lines += _dpo_lines(r, last)
        elif stage == "grpo":
            lines += _grpo_lines(r)
        elif last:
            windows = f"first {last['val_windows']} windows" if last.get("val_windows") else "first windows"
            what = ("the assistant replies of held-out conversations, not the text of the Evaluation table"
                    if stage == "sft" else f"the {windows} of the val split")
            lines.append(f"- last periodic val loss {_fmt(last['val_loss'])} at step {last['step']} "
                         f"(in {last['precision']}, on {what})")
        lines += [f"- checkpoint: `{_rel(r['checkpoint'], run_dir)}`", ""]
        try:
            for png in plot_run(r["run_dir"]):
                lines.append(f"![{stage} {png.stem}]({_rel(png, run_dir)})")
        except Exception as e:  # plots are a convenience; a report without them is still a report
            lines.append(f"(plots unavailable: {e})")
        lines.append("")

    ev = results.get("eval")
    if ev:
        lines += ["## Evaluation", "", *_eval_notes(ev, results), "",
                  "| model | val loss | perplexity | bits/byte | task accuracy |", "|---|---:|---:|---:|---:|"]
        for stage, m in ev.items():
            lines.append(f"| {stage} | {_fmt(m['val_loss'])} | {_fmt(m['val_ppl'], 2)} | {_fmt(m['val_bpb'])} | "
                         f"{m['task_accuracy']:.1%} ({m['tasks']} tasks) |")
        lines += ["", *_kind_table(ev)]
        chat_stage = next((s for s in ("grpo", "dpo", "sft")
                           if (run_dir / "eval" / f"answers_{s}.jsonl").is_file()), None)
        answers = run_dir / "eval" / f"answers_{chat_stage}.jsonl"
        if chat_stage:
            rows = [json.loads(line) for line in answers.read_text(encoding="utf-8").splitlines()[:cfg.eval.samples]]
            lines += [f"## Sample chats ({chat_stage.upper()} model, held-out questions)", ""]
            for row in rows:
                mark = "✓" if row["correct"] else "✗"
                lines += [f"> **用户**：{row['question']}", ">",
                          "> **助手**：" + row["output"].strip().replace("\n", "\n> "), "",
                          f"{mark} expected answer: {row['answer']}", ""]
    final = next((results[s] for s in ("grpo", "dpo", "sft", "pretrain") if s in results), None)
    if final:
        lines += ["## Next", "", f"- chat with the model: `zhllm chat {_rel(final['checkpoint'], Path.cwd())}`",
                  f"- plots and metrics: `zhllm plot {_rel(final['run_dir'], Path.cwd())}`, TensorBoard in `tb/`",
                  "- scale up: `configs/pipeline-26m.yaml` (real corpora, one GPU), torchrun for many (README)", ""]
    path = run_dir / "report.md"
    atomic_write_text(path, "\n".join(lines))
    return path
