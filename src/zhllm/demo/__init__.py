"""Built-in demo data, written for this project: an original Chinese prose corpus and task generators.

The demo pipeline trains on `write_demo_corpus` (prose + task documents), fine-tunes on `write_demo_sft`
(task conversations) and scores greedy answers on `write_demo_eval` (held-out tasks) with `is_correct`.
"""
from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path

from ..errors import ZhllmError
from ..fsutil import atomic_write_text
from .smalltalk import smalltalk_conversations
from .tasks import (TASK_KINDS, Task, answer_text, eval_tasks, extract_answer, is_correct, pretrain_prompt,
                    sample_tasks, task_conversations, task_documents)

__all__ = ["DATA_DIR", "prose_files", "iter_prose", "write_demo_corpus", "write_demo_sft", "write_demo_eval",
           "load_eval_tasks", "Task", "TASK_KINDS", "sample_tasks", "eval_tasks", "task_documents",
           "task_conversations", "smalltalk_conversations", "extract_answer", "is_correct", "pretrain_prompt",
           "answer_text"]

DATA_DIR = Path(__file__).resolve().parent / "data"


def prose_files() -> list[Path]:
    """The shipped prose files (`prose_<topic>.jsonl`), in a stable order."""
    return sorted(DATA_DIR.glob("prose_*.jsonl"))


def iter_prose() -> Iterator[dict]:
    """Every prose document as {"text": ..., "topic": ...}."""
    for path in prose_files():
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                if line.strip():
                    yield json.loads(line)


def _jsonl(records) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def _check_count(name: str, n: int) -> None:
    if not isinstance(n, int) or n < 0:
        raise ZhllmError(f"{name} must be a whole number >= 0, got {n!r}")


def write_demo_corpus(out_dir: str | Path, n_task_docs: int, seed: int = 0) -> tuple[Path, Path]:
    """Write `prose.jsonl` and `tasks.jsonl` ({"text", "topic"} per line) for pretraining; return (prose, tasks).
    `n_task_docs` has no default here: the pipeline's `corpus.task_docs` is the one place that sets it."""
    _check_count("n_task_docs", n_task_docs)
    out_dir = Path(out_dir)
    prose_path, tasks_path = out_dir / "prose.jsonl", out_dir / "tasks.jsonl"
    atomic_write_text(prose_path, _jsonl(iter_prose()))
    atomic_write_text(tasks_path, _jsonl({"text": t, "topic": "tasks"} for t in task_documents(n_task_docs, seed)))
    return prose_path, tasks_path


def write_demo_sft(out_path: str | Path, n: int = 2000, seed: int = 0, smalltalk_fraction: float = 0.05) -> Path:
    """Write `n` conversations as {"messages": [...]} lines for SFT: task conversations, plus a small share of
    everyday small talk (greetings, what the model is) so the chat demo does not answer "你好" with a number."""
    _check_count("n", n)
    if not 0.0 <= smalltalk_fraction <= 1.0:
        raise ZhllmError(f"smalltalk_fraction must be between 0 and 1, got {smalltalk_fraction}")
    n_smalltalk = round(n * smalltalk_fraction)
    conversations = task_conversations(n - n_smalltalk, seed) + smalltalk_conversations(n_smalltalk, seed)
    random.Random(f"sft-order-{seed}").shuffle(conversations)
    out_path = Path(out_path)
    atomic_write_text(out_path, _jsonl({"messages": m} for m in conversations))
    return out_path


def write_demo_rl_prompts(out_path: str | Path, n: int = 256, seed: int = 0) -> Path:
    """Write `n` training tasks (never held-out ones) as {"prompt", "answer"} lines for an RL stage's prompts."""
    _check_count("n", n)
    out_path = Path(out_path)
    tasks = sample_tasks(n, seed + 3_000_017)  # a stream of its own: not the SFT, DPO or document tasks
    atomic_write_text(out_path, _jsonl({"prompt": t.question, "answer": t.answer} for t in tasks))
    return out_path


def write_demo_eval(out_path: str | Path, n: int = 200, seed: int = 0) -> Path:
    """Write `n` held-out tasks as {"kind", "question", "answer"} lines; read back with `load_eval_tasks`."""
    _check_count("n", n)
    out_path = Path(out_path)
    records = ({"kind": t.kind, "question": t.question, "answer": t.answer} for t in eval_tasks(n, seed))
    atomic_write_text(out_path, _jsonl(records))
    return out_path


def load_eval_tasks(path: str | Path) -> list[Task]:
    """Read a file written by `write_demo_eval`."""
    path = Path(path)
    if not path.is_file():
        raise ZhllmError(f"eval task file not found: {path}")
    tasks = []
    with open(path, encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                tasks.append(Task(record["kind"], record["question"], record["answer"]))
            except (ValueError, KeyError, TypeError) as exc:
                raise ZhllmError(f"{path}:{line_no}: not an eval task record ({exc})") from None
    return tasks
