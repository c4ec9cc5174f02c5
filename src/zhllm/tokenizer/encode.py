"""Encode raw text (corpora, user input) so it can never produce a special-token id (ARCHITECTURE rule 8).

Everyone who turns *data* into ids goes through `encode_text` / `encode_batch_texts`. Control tokens such as
`<|im_start|>` come only from the chat template; the same characters inside a document are ordinary text.

The fast path is the backend `tokenizers.Tokenizer` with `encode_special_tokens=True`. We work on a private
copy of it: flipping the flag on the tokenizer's own backend would also split the special tokens that
`apply_chat_template` emits on purpose. Non-special added tokens (e.g. vocabulary added by
`zhllm tokenizer extend`) are still matched, which is what we want.
"""
from __future__ import annotations

from collections.abc import Sequence

from ..errors import ZhllmError

_SAFE_ATTR = "_zhllm_text_backend"
_RAW_CACHE: dict[int, tuple] = {}


def text_backend(tokenizer):
    """A `tokenizers.Tokenizer` that splits special tokens and adds no BOS/EOS, cached on `tokenizer`.

    Accepts a transformers fast tokenizer or a raw `tokenizers.Tokenizer`; returns None for tokenizers
    without a Rust backend (slow/sentencepiece-only), which `encode_text` handles separately.
    """
    from tokenizers import Tokenizer

    if isinstance(tokenizer, Tokenizer):
        if tokenizer.encode_special_tokens and tokenizer.truncation is None and tokenizer.padding is None:
            return tokenizer  # already safe: e.g. the result of an earlier text_backend() call
        hit = _RAW_CACHE.get(id(tokenizer))
        if hit is not None and hit[0] is tokenizer:
            return hit[1]
        safe = _safe_copy(tokenizer)
        if len(_RAW_CACHE) >= 8:
            _RAW_CACHE.pop(next(iter(_RAW_CACHE)))
        _RAW_CACHE[id(tokenizer)] = (tokenizer, safe)  # holds the key object, so its id is never reused
        return safe
    cached = getattr(tokenizer, _SAFE_ATTR, None)
    if cached is not None:
        return cached
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    safe = _safe_copy(backend)
    try:
        setattr(tokenizer, _SAFE_ATTR, safe)
    except AttributeError:  # objects that refuse attributes: no cache, still correct
        pass
    return safe


def _safe_copy(backend):
    from tokenizers import Tokenizer

    safe = Tokenizer.from_str(backend.to_str())
    safe.encode_special_tokens = True
    # Truncation/padding configured for model inputs would silently cut or pad documents.
    safe.no_truncation()
    safe.no_padding()
    return safe


def encode_text(tokenizer, text: str) -> list[int]:
    """Token ids of `text` as plain text: no special-token ids, no BOS/EOS added."""
    if not isinstance(text, str):
        raise ZhllmError(f"encode_text expects a str, got {type(text).__name__}")
    backend = text_backend(tokenizer)
    if backend is None:
        return _encode_slow(tokenizer, text)
    return backend.encode(text, add_special_tokens=False).ids


def encode_batch_texts(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """`encode_text` over many texts, parallelised inside `tokenizers` (no offsets computed)."""
    texts = list(texts)
    bad = next((i for i, t in enumerate(texts) if not isinstance(t, str)), None)
    if bad is not None:
        raise ZhllmError(f"encode_batch_texts expects strings, item {bad} is {type(texts[bad]).__name__}")
    backend = text_backend(tokenizer)
    if backend is None:
        return [_encode_slow(tokenizer, t) for t in texts]
    return [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=False)]


def special_token_ids(tokenizer) -> set[int]:
    """Ids of every special (control) token: what data text must never produce."""
    from tokenizers import Tokenizer

    if isinstance(tokenizer, Tokenizer):
        return {i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special}
    return set(getattr(tokenizer, "all_special_ids", []) or []) | {
        i for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items() if getattr(t, "special", False)}


def _encode_slow(tokenizer, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True))
