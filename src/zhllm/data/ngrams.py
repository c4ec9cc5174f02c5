"""Hashes of all character n-grams of a text, vectorised with numpy (the hot loop of dedup and filters).

A polynomial hash over Unicode code points with uint64 wrap-around: n vector operations per text instead
of one Python object per n-gram. Stable across runs and processes (unlike `hash()`), so dedup decisions
are reproducible.
"""
from __future__ import annotations

import numpy as np

_BASE = np.uint64(0x100000001B3)  # FNV-1 64-bit prime: odd and large, mixes code points well


def code_points(text: str) -> np.ndarray:
    """The text's Unicode code points as a uint32 array (one cheap C-level conversion)."""
    return np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)


def ngram_hashes(codes: np.ndarray, n: int) -> np.ndarray:
    """uint64 hash of every n-code-point window (one window of everything if there are fewer than n)."""
    if len(codes) == 0:
        return np.zeros(1, dtype=np.uint64)
    n = min(n, len(codes))
    codes = codes.astype(np.uint64)
    windows = len(codes) - n + 1
    h = np.zeros(windows, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for j in range(n):
            h = h * _BASE + codes[j:j + windows]
    return h


def char_ngram_hashes(text: str, n: int) -> np.ndarray:
    return ngram_hashes(code_points(text), n)


def fold32(h: np.ndarray) -> np.ndarray:
    """64-bit hashes -> 32-bit ones (xor of the halves), for MinHash's 32-bit scheme."""
    return (h ^ (h >> np.uint64(32))) & np.uint64(0xFFFFFFFF)
