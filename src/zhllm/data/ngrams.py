"""Hashes of all character n-grams of a text, vectorised with numpy (the hot loop of dedup and filters).

A polynomial hash over Unicode code points with uint64 wrap-around: n vector operations per text instead
of one Python object per n-gram. Stable across runs and processes (unlike `hash()`), so dedup decisions
are reproducible.
"""
from __future__ import annotations

import numpy as np

_BASE = np.uint64(0x100000001B3)  # FNV-1 64-bit prime: odd and large, mixes code points well


def char_ngram_hashes(text: str, n: int) -> np.ndarray:
    """uint64 hash of every n-character window of `text` (one window of the whole text if it is shorter)."""
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
    if len(codes) <= n:
        n = max(len(codes), 1)
        if not len(codes):
            return np.zeros(1, dtype=np.uint64)
    windows = len(codes) - n + 1
    h = np.zeros(windows, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for j in range(n):
            h = h * _BASE + codes[j:j + windows]
    return h


def fold32(h: np.ndarray) -> np.ndarray:
    """64-bit hashes -> 32-bit ones (xor of the halves), for MinHash's 32-bit scheme."""
    return (h ^ (h >> np.uint64(32))) & np.uint64(0xFFFFFFFF)
