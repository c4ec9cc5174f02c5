"""The pipeline's eval stage: val loss / bits per byte per model on the pretraining val windows, and
exact-match accuracy of greedy answers on held-out demo tasks (the pretrained model is asked in its
documents' "问：…\\n答：" form, the SFT model in chat form, so each is asked the way it was trained)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch

from ..fsutil import atomic_write_text
from .loss import NextTokenLoss, evaluate_loss
from .tasks import Item, Task, accuracy, run_task


class DemoTasks(Task):
    """Held-out demo tasks (arithmetic, dates, ...), generative, scored by exact match of the final answer."""
    name = "demo"
    kind = "generative"

    def __init__(self, n: int, seed: int = 0):
        from ..demo import eval_tasks
        self._tasks = eval_tasks(n, seed)

    def items(self) -> Sequence[Item]:
        return [Item(t.question, t.answer, meta={"task": t}) for t in self._tasks]

    def prompt(self, item: Item, chat: bool) -> str | list[dict]:
        from ..demo import pretrain_prompt
        return [{"role": "user", "content": item.question}] if chat else pretrain_prompt(item.meta["task"])

    def stop_strings(self, chat: bool) -> tuple[str, ...]:
        return () if chat else ("\n\n", "问：")  # where the pretraining documents start their next item

    def score(self, item: Item, output: str) -> bool:
        from ..demo import is_correct
        return bool(is_correct(item.meta["task"], output))


def open_val_windows(shards_dir: str, seq_len: int):
    """(dataset, split name): the val split read in order, or the train split when there is no val split."""
    from ..data.shards import PackedTokenDataset
    from ..errors import ZhllmError
    try:
        data = PackedTokenDataset([shards_dir], seq_len, split="val", shuffle=False)
        if len(data) > 0:
            return data, "val"
    except ZhllmError:
        pass
    return PackedTokenDataset([shards_dir], seq_len, split="train", shuffle=False), "train"


def evaluate_pipeline_models(models: dict[str, str], shards_dir: str, out_dir: Path, cfg, seq_len: int,
                             seed: int, batch_size: int, batches: int, log=print) -> dict:
    """Every model on the same windows (the first `batches * batch_size` of the val split, in fp32 from its
    checkpoint) and the same held-out tasks; writes eval.json and answers_<stage>.jsonl (each answer with its
    task kind)."""
    from ..model.io import load_model
    from ..tokenizer.load import load_tokenizer
    data, split = open_val_windows(shards_dir, seq_len)
    task = DemoTasks(cfg.tasks, seed)
    table = {}
    for stage, path in models.items():
        model, tok = load_model(path, dtype=torch.float32), load_tokenizer(path)
        metrics = evaluate_loss(model, NextTokenLoss(), data, batch_size, batches)
        metrics["val_split"] = split
        rows = run_task(task, model, tok, chat=stage != "pretrain", max_new_tokens=cfg.max_new_tokens)
        for row, item in zip(rows, task.items()):
            row["kind"] = item.meta["task"].kind
        metrics["task_accuracy"] = accuracy(rows)
        metrics["tasks"] = len(rows)
        metrics["tasks_right_by_kind"] = right_by_kind(rows)
        atomic_write_text(out_dir / f"answers_{stage}.jsonl",
                          "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        log(f"[eval] {stage}: val_loss {metrics['val_loss']:.4f}  bpb {metrics['val_bpb']:.4f} "
            f"({metrics['val_windows']} {split} windows)  task accuracy {metrics['task_accuracy']:.1%} "
            f"({len(rows)} held-out tasks)")
        table[stage] = {**metrics, "checkpoint": path}
    atomic_write_text(out_dir / "eval.json", json.dumps(table, indent=2, ensure_ascii=False))
    return table


def right_by_kind(rows: list[dict]) -> dict[str, list[int]]:
    """{task kind: [answers right, tasks]}, kinds in the order they first appear: where a stage gains."""
    out: dict[str, list[int]] = {}
    for row in rows:
        tally = out.setdefault(row["kind"], [0, 0])
        tally[0] += bool(row["correct"])
        tally[1] += 1
    return out


def pretrain_eval_windows(run_dir: str | Path) -> tuple[int, int, int]:
    """(seq_len, batch_size, eval batches) of a pretraining run, from the resolved config.yaml it wrote."""
    import yaml
    from ..errors import ZhllmError
    path = Path(run_dir) / "config.yaml"
    try:
        cfg = yaml.safe_load(path.read_text(encoding="utf-8"))
        return int(cfg["train"]["seq_len"]), int(cfg["train"]["batch_size"]), int(cfg["eval"]["batches"])
    except (OSError, KeyError, TypeError, ValueError, yaml.YAMLError) as e:
        raise ZhllmError(f"{path}: cannot read the pretraining run's eval windows ({e})") from None
