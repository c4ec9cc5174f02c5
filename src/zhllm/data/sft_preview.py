"""`zhllm data preview-sft`: render a few SFT samples with their trained spans marked, so masks can be checked by eye."""
from __future__ import annotations

import json
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ZhllmError
from .chat import IGNORE, SFTStats, encode_records

ANSI_TRAINED, ANSI_RESET = "\x1b[1;32m", "\x1b[0m"


@dataclass
class _Record:
    data: Any
    path: str
    line: int


def read_sft_records(inputs: Sequence[str | Path], strict: bool = False) -> Iterator[Any]:
    """Records of json/jsonl/parquet files via `zhllm.data.readers`, or a minimal json/jsonl reader without it."""
    try:
        from .readers import iter_records
    except ImportError:
        yield from _read_json_records(inputs)
        return
    yield from iter_records(inputs, strict=strict, stats=None)


def _read_json_records(inputs: Sequence[str | Path]) -> Iterator[_Record]:
    for name in inputs:
        path = Path(name)
        if not path.is_file():
            raise ZhllmError(f"input file not found: {path}")
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".json":
            try:
                items = json.loads(text)
            except json.JSONDecodeError as e:
                raise ZhllmError(f"{path}: invalid JSON ({e})") from None
            for i, item in enumerate(items if isinstance(items, list) else [items]):
                yield _Record(item, str(path), i + 1)  # 1-based item number within the array
            continue
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    yield _Record(json.loads(line), str(path), n)
                except json.JSONDecodeError:
                    yield _Record(None, str(path), n)  # counted as a bad record downstream


def highlight(tokenizer, ids: list[int], labels: list[int], color: bool) -> str:
    """The rendered text with trained runs in green (tty) or wrapped in [[...]]."""
    out, run, trained = [], [], None
    for tok, lab in zip(ids + [None], labels + [None]):
        is_trained = lab is not None and lab != IGNORE
        if run and (tok is None or is_trained != trained):
            text = tokenizer.decode(run, skip_special_tokens=False)
            if trained:
                text = f"{ANSI_TRAINED}{text}{ANSI_RESET}" if color else f"[[{text}]]"
            out.append(text)
            run = []
        run.append(tok)
        trained = is_trained
    return "".join(out)


def preview_sft(tokenizer_dir: str | Path, inputs: Sequence[str | Path], n: int = 2, fmt: str = "auto",
                max_len: int | None = None, overflow: str = "truncate", strict: bool = False,
                color: bool | None = None) -> str:
    """The first n conversations rendered with trained spans marked, then counts over all of the input."""
    from ..tokenizer.load import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_dir)
    if not tokenizer.chat_template:
        raise ZhllmError(f"{tokenizer_dir}: tokenizer has no chat_template")
    color = sys.stdout.isatty() if color is None else color
    stats = SFTStats()
    examples = encode_records(tokenizer, read_sft_records(inputs, strict), fmt=fmt, max_len=max_len,
                              overflow=overflow, strict=strict, stats=stats, progress=True)
    parts = []
    for k, (ids, labels) in enumerate(examples[:n]):
        trained = sum(label != IGNORE for label in labels)
        parts.append(f"=== sample {k + 1}: {len(ids)} tokens, {trained} trained ===")
        parts.append(highlight(tokenizer, ids, labels, color))
    marker = "green" if color else "[[...]]"
    parts.append(f"=== counts (trained spans shown {marker}) ===")
    parts.append(stats.summary())
    return "\n".join(parts)
