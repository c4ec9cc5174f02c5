"""`zhllm data preview-sft`: render a few SFT samples with their trained spans marked, to check masks by eye."""
from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from ..corpus.readers import ReadStats, expand_inputs, iter_records
from ..errors import ZhllmError
from .chat import IGNORE, SFTStats, encode_records

ANSI_TRAINED, ANSI_RESET = "\x1b[1;32m", "\x1b[0m"


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
                color: bool | None = None, progress: bool = True) -> str:
    """The first n conversations rendered with trained spans marked, then counts over all of the input."""
    from ..tokenizer.load import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_dir)
    if not tokenizer.chat_template:
        raise ZhllmError(f"{tokenizer_dir}: tokenizer has no chat_template")
    color = sys.stdout.isatty() if color is None else color
    stats, read_stats = SFTStats(), ReadStats()
    paths = expand_inputs(inputs)  # a missing input fails here, before the progress bar starts
    examples = encode_records(tokenizer, iter_records(paths, strict=strict, stats=read_stats), fmt=fmt,
                              max_len=max_len, overflow=overflow, strict=strict, stats=stats, progress=progress)
    parts = []
    for k, (ids, labels) in enumerate(examples[:n]):
        trained = sum(label != IGNORE for label in labels)
        parts.append(f"=== sample {k + 1}: {len(ids)} tokens, {trained} trained ===")
        parts.append(highlight(tokenizer, ids, labels, color))
    marker = "green" if color else "[[...]]"
    parts.append(f"=== counts (trained spans shown {marker}) ===")
    parts.append(read_stats.summary())
    parts.append(stats.summary())
    return "\n".join(parts)
