"""Heuristic quality filters for Chinese documents (after normalisation).

Each filter is a cheap statistic compared with a threshold; `quality_reason` returns the name of the
first filter a document fails (the key counted in the clean report) or None. The statistics follow the
Gopher/RefinedWeb rules adapted to Chinese: lengths and n-grams are counted in characters, because
Chinese has no spaces to count words by.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from .ngrams import code_points, ngram_hashes

# CJK ideograph blocks (extension A, unified, compatibility, extensions B-F) as code point ranges.
_CJK_RANGES = ((0x3400, 0x4DBF), (0x4E00, 0x9FFF), (0xF900, 0xFAFF), (0x20000, 0x2FFFF))
_WHITESPACE_RE = re.compile(r"\s+")
# Symbols that flood spam and boilerplate (box drawing, emoji, currency, math, markup leftovers).
# Ordinary prose punctuation, Chinese or ASCII, is not a symbol here.
_SYMBOL_RE = re.compile(r"[#*|_~^`<>\[\]{}\\@$%&=+]|[\u2190-\u21ff\u2200-\u23ff\u2500-\u27bf\u2b00-\u2bff"
                        r"\ufffd\U0001f000-\U0001faff]")
_CHAR_RUN_RE = re.compile(r"(.)\1{4,}", re.S)   # the same character 5+ times: 哈哈哈哈哈, !!!!!!, -----


@dataclass
class QualityThresholds:
    """Thresholds of the quality filters; 0 (or a ratio of 1.0) switches a filter off."""
    min_chars: int = 10
    max_chars: int = 200_000
    min_cjk_ratio: float = 0.3          # CJK characters / non-space characters
    max_symbol_ratio: float = 0.2       # symbol characters / non-space characters
    max_dup_line_ratio: float = 0.3     # characters in lines that repeat an earlier line / all characters
    max_char_run_ratio: float = 0.2     # characters inside runs of one repeated character
    max_dup_ngram_ratio: float = 0.5    # character n-grams occurring more than once / all n-grams
    dup_ngram_size: int = 10            # ~5 Chinese words: long enough that normal prose rarely repeats one


def cjk_ratio(compact: str, codes: np.ndarray | None = None) -> float:
    codes = code_points(compact) if codes is None else codes
    if not len(codes):
        return 0.0
    is_cjk = np.zeros(len(codes), dtype=bool)
    for lo, hi in _CJK_RANGES:
        is_cjk |= (codes >= lo) & (codes <= hi)
    return float(is_cjk.sum()) / len(codes)


def symbol_ratio(compact: str) -> float:
    return len(_SYMBOL_RE.findall(compact)) / len(compact) if compact else 0.0


def dup_line_ratio(text: str) -> float:
    """Share of characters in lines that are copies of an earlier line (menus, footers, repeated ads)."""
    seen: set[str] = set()
    dup = total = 0
    for line in text.split("\n"):
        line = line.strip()
        if not line:
            continue
        total += len(line)
        if line in seen:
            dup += len(line)
        else:
            seen.add(line)
    return dup / total if total else 0.0


def char_run_ratio(compact: str) -> float:
    if not compact:
        return 0.0
    return sum(m.end() - m.start() for m in _CHAR_RUN_RE.finditer(compact)) / len(compact)


def dup_ngram_ratio(compact: str, n: int, codes: np.ndarray | None = None) -> float:
    """Share of character n-grams that occur more than once (copy-pasted sentences, keyword stuffing)."""
    codes = code_points(compact) if codes is None else codes
    if len(codes) - n + 1 <= 1:
        return 0.0
    _, counts = np.unique(ngram_hashes(codes, n), return_counts=True)
    return float(counts[counts > 1].sum()) / counts.sum()


def quality_reason(text: str, t: QualityThresholds) -> str | None:
    """Name of the first filter `text` fails, or None if it passes them all. Cheapest checks first."""
    n = len(text)
    if n < t.min_chars:
        return "too_short"
    if t.max_chars and n > t.max_chars:
        return "too_long"
    compact = _WHITESPACE_RE.sub("", text)
    codes = code_points(compact)
    if t.min_cjk_ratio > 0 and cjk_ratio(compact, codes) < t.min_cjk_ratio:
        return "low_cjk_ratio"
    if t.max_symbol_ratio < 1 and symbol_ratio(compact) > t.max_symbol_ratio:
        return "high_symbol_ratio"
    if t.max_dup_line_ratio < 1 and dup_line_ratio(text) > t.max_dup_line_ratio:
        return "repeated_lines"
    if t.max_char_run_ratio < 1 and char_run_ratio(compact) > t.max_char_run_ratio:
        return "repeated_chars"
    if t.max_dup_ngram_ratio < 1 and dup_ngram_ratio(compact, t.dup_ngram_size, codes) > t.max_dup_ngram_ratio:
        return "repeated_ngrams"
    return None
