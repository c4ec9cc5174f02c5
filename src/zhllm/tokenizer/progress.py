"""How tokenizer training reports progress: bars on a terminal, a few plain lines on stderr otherwise.

The `tokenizers` trainer draws its bars on stderr but prints a newline on stdout after each, so with
output redirected a run printed nothing but blank lines; its bars only run when both streams are terminals.
"""
from __future__ import annotations

import sys


def on_terminal() -> bool:
    """Bars (redrawn in place) make sense: stderr is a terminal."""
    return sys.stderr.isatty()


def native_bars() -> bool:
    """The `tokenizers` trainer's own bars may run: they draw on stderr and end with newlines on stdout."""
    return sys.stderr.isatty() and sys.stdout.isatty()


def log(message: str) -> None:
    """One plain progress line on stderr (stdout carries the command's report)."""
    print(message, file=sys.stderr, flush=True)
