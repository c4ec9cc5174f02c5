"""Text normalisation for a Chinese corpus: Unicode form, control characters, whitespace, optional t2s.

Why not plain NFKC: NFKC maps the full-width punctuation Chinese prose is written with (，！？：；（）～)
to ASCII while leaving 。、「」“” alone, so "你好，世界。" would become the mixed "你好,世界。", the
tokenizer would split its vocabulary between two forms of every comma, and the model would learn a
punctuation style no Chinese writer uses. It also rewrites "……" as "......", "m²" as "m2", "℃" as "°C"
and "①" as "1", losing meaning. We apply NFKC to everything else: full-width letters and digits
(ＡＢＣ１２３ -> ABC123), the ideographic space, half-width katakana, CJK compatibility ideographs and
Kangxi radicals all become their ordinary forms, which is what a corpus wants.
"""
from __future__ import annotations

import re
import unicodedata
from functools import lru_cache

# Characters NFKC would change but Chinese text means literally (see module docstring).
PROTECTED_CHARS = (
    "，！？：；（）～"      # full-width punctuation of Chinese prose
    "…‥￥"                   # ellipsis (……), two-dot leader, full-width yuan sign
    "¹²³⁰⁴⁵⁶⁷⁸⁹₀₁₂₃₄₅₆₇₈₉"   # super/subscripts: m², H₂O
    "℃℉"
)
_PROTECTED_RANGES = "\u2460-\u24ff\u3200-\u33ff"  # circled/parenthesised numbers, ㈠, ㎡, ㎏ ...
_PROTECTED_RE = re.compile(f"([{re.escape(PROTECTED_CHARS)}{_PROTECTED_RANGES}]+)")

# C0/C1 controls except \t and \n, zero-width and BOM characters, soft hyphen: invisible noise that
# splits words for the tokenizer and for dedup.
_INVISIBLE_RE = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u00ad\u200b-\u200f\u202a-\u202e"
                           "\u2060-\u2064\ufeff]")
_NEWLINES_RE = re.compile("\r\n?|[\u2028\u2029\x85]")
_SPACES_RE = re.compile(r"[^\S\n]+")              # any whitespace run without a newline
_SPACE_AROUND_NEWLINE_RE = re.compile(r" *\n *")
_MANY_NEWLINES_RE = re.compile(r"\n{3,}")         # keep paragraph breaks, drop layout gaps
_CJK = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_SPACE_BETWEEN_CJK_RE = re.compile(f"(?<=[{_CJK}]) (?=[{_CJK}])")


def nfkc_keep_cjk_punct(text: str) -> str:
    """NFKC, except for the characters in PROTECTED_CHARS / _PROTECTED_RANGES, which stay as written."""
    if unicodedata.is_normalized("NFKC", text):
        return text
    parts = _PROTECTED_RE.split(text)
    # split() with a capturing group alternates [unprotected, protected, unprotected, ...]
    parts[::2] = [unicodedata.normalize("NFKC", p) for p in parts[::2]]
    return "".join(parts)


def clean_whitespace(text: str, join_cjk_spaces: bool = False) -> str:
    """Unify newlines, drop invisible characters, collapse spaces, keep at most one blank line."""
    text = _NEWLINES_RE.sub("\n", text)
    text = _INVISIBLE_RE.sub("", text)
    text = _SPACES_RE.sub(" ", text)
    text = _SPACE_AROUND_NEWLINE_RE.sub("\n", text)
    text = _MANY_NEWLINES_RE.sub("\n\n", text)
    if join_cjk_spaces:  # word-segmented corpora ("我 爱 北京") -> ordinary prose
        text = _SPACE_BETWEEN_CJK_RE.sub("", text)
    return text.strip()


@lru_cache(maxsize=4)
def _opencc(config: str):
    import opencc
    return opencc.OpenCC(config)


def to_simplified(text: str, config: str = "t2s") -> str:
    """Traditional -> simplified Chinese with OpenCC (`t2s`, or e.g. `tw2sp` for Taiwan phrases)."""
    return _opencc(config).convert(text)


def normalize_text(text: str, nfkc: bool = True, t2s: bool = False, opencc_config: str = "t2s",
                   join_cjk_spaces: bool = False) -> str:
    """The full normalisation used by `zhllm data clean`: Unicode form, t2s, then whitespace."""
    if nfkc:
        text = nfkc_keep_cjk_punct(text)
    if t2s:
        text = to_simplified(text, opencc_config)
    return clean_whitespace(text, join_cjk_spaces)
