"""A bounded, deterministic sample of a text stream, spread over the whole input.

Tokenizer trainers hold every training text in memory (the users of other toolkits run out of RAM
here), so we stream the corpus once and keep a random subset of at most `max_chars` characters.
Bottom-k sampling: every chunk gets a pseudo-random key from (seed, position); we keep the chunks with
the smallest keys that fit the budget. That is a uniform sample of the whole stream, needs one pass and
memory proportional to the budget, and is a pure function of (input, seed, budget).
A small, disjoint held-out slice is drawn the same way, for the chars/token summary.
"""
from __future__ import annotations

import hashlib
import heapq
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from .progress import log, on_terminal

# Long documents (a book as one .txt record) are cut so one document cannot eat the whole budget.
CHUNK_CHARS = 20_000
HELDOUT_EVERY = 50  # about 2% of chunks go to the held-out slice, never to training


@dataclass
class TextSample:
    texts: list[str]
    heldout: list[str]
    seen_docs: int = 0
    seen_chars: int = 0
    chars: int = field(init=False)

    def __post_init__(self):
        self.chars = sum(map(len, self.texts))


class _BudgetReservoir:
    """The chunks with the smallest keys whose total length fits `budget` characters."""

    def __init__(self, budget: int):
        self.budget, self.used = budget, 0
        self.heap: list[tuple[float, int, str]] = []  # (-key, position, text): max-heap on key

    def offer(self, key: float, pos: int, text: str) -> None:
        if len(text) > self.budget:
            return
        if self.used + len(text) > self.budget and self.heap and -self.heap[0][0] < key:
            return  # the reservoir is full of smaller keys
        heapq.heappush(self.heap, (-key, pos, text))
        self.used += len(text)
        while self.used > self.budget:
            _, _, dropped = heapq.heappop(self.heap)
            self.used -= len(dropped)

    def texts(self) -> list[str]:
        return [t for _, _, t in sorted(self.heap, key=lambda e: e[1])]  # stream order, for determinism


def chunk_text(text: str, size: int = CHUNK_CHARS) -> Iterator[str]:
    """Cut at line breaks where possible, so chunks end on natural boundaries."""
    while len(text) > size:
        cut = text.rfind("\n", size // 2, size)
        cut = size if cut < 0 else cut + 1
        yield text[:cut]
        text = text[cut:]
    if text:
        yield text


def _key(seed: int, pos: int) -> float:
    digest = hashlib.blake2b(f"{seed}:{pos}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def sample_texts(texts: Iterable[str], max_chars: int, seed: int = 0,
                 heldout_chars: int | None = None, progress: bool = False) -> TextSample:
    """Stream `texts` once; return up to `max_chars` characters of training text and a disjoint
    held-out slice (default: 2% of the budget, at most 1M characters).

    With `progress`: a running count of characters read on a terminal, else a line at the start and one
    at the end (the stream's length is unknown until it ends, so there is no total to show)."""
    if heldout_chars is None:
        heldout_chars = min(max_chars // 50, 1_000_000)
    train, heldout = _BudgetReservoir(max_chars), _BudgetReservoir(heldout_chars)
    chunk_size = max(1, min(CHUNK_CHARS, max_chars // 10))  # a small budget still holds many chunks
    docs = chars = pos = 0
    bar = None
    start = time.perf_counter()
    for text in texts:
        if docs == 0 and progress:  # started late, so an input error is not preceded by an empty bar
            if on_terminal():
                bar = _progress()
            else:
                log(f"sampling up to {max_chars:,} characters ...")
        docs += 1
        chars += len(text)
        for chunk in chunk_text(text, chunk_size):
            key = _key(seed, pos)
            # the held-out choice uses a different bit of the key space than the ranking does
            (heldout if int(key * 2**32) % HELDOUT_EVERY == 0 else train).offer(key, pos, chunk)
            pos += 1
        if bar is not None:
            bar.update(len(text))
    if bar is not None:
        bar.close()
    sample = TextSample(train.texts(), heldout.texts(), seen_docs=docs, seen_chars=chars)
    if progress and docs and bar is None:
        log(f"sampled {sample.chars:,} of {chars:,} characters ({docs:,} documents) "
            f"in {time.perf_counter() - start:.1f} s")
    return sample


def _progress():
    from tqdm import tqdm
    return tqdm(desc="sampling", unit="char", unit_scale=True, mininterval=1.0)
