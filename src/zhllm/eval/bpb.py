"""Bits per byte and perplexity of a model on any corpus zhllm reads, comparable across tokenizers.

A document's bits are the summed -log2 p of every one of its tokens, the first predicted after the tokenizer's
BOS (or its EOS where it has no BOS: zhllm's token shards separate documents with EOS, so that is what a zhllm
model saw before a document starts). Dividing by the document's UTF-8 bytes, not its tokens, makes a model
with a coarser tokenizer neither better nor worse for it. Documents are cut (`max_chars_per_doc`) and counted
(`max_docs`) on their text, before tokenization, so every model sees the very same bytes.

A document longer than the context is scored in windows of at most `context` tokens that start `stride`
tokens apart; each token is scored once, in the first window that holds it with at least `context - stride`
tokens before it (all tokens of the first window). Windows of many documents are batched by length.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from ..errors import ZhllmError
from .tasks import score_continuations


@dataclass
class Window:
    doc: int            # index of the document it belongs to
    tokens: list[int]   # model input plus the final target: tokens[0] is only context
    scored: int         # how many of its last tokens are scored (the rest is context)


@dataclass
class BpbResult:
    docs: int = 0
    bytes: int = 0
    tokens: int = 0            # scored tokens (the document's own tokens)
    nll_nats: float = 0.0
    windows: int = 0
    read: dict = field(default_factory=dict)  # ReadStats.to_dict() of the input

    @property
    def bits_per_byte(self) -> float:
        return self.nll_nats / math.log(2) / max(self.bytes, 1)

    @property
    def perplexity(self) -> float:
        """Per token of this model's tokenizer: comparable only between models that share a tokenizer."""
        return math.exp(min(self.nll_nats / max(self.tokens, 1), 50.0))

    def to_dict(self) -> dict:
        return {"bpb": self.bits_per_byte, "ppl": self.perplexity, "nll_nats": self.nll_nats, "docs": self.docs,
                "bytes": self.bytes, "tokens": self.tokens, "windows": self.windows, "read": self.read}


def start_token(tokenizer) -> int:
    """The token a document is predicted after: BOS, or EOS when the tokenizer has no BOS."""
    for name in ("bos_token_id", "eos_token_id"):
        tid = getattr(tokenizer, name, None)
        if isinstance(tid, int):
            return tid
    raise ZhllmError("the tokenizer has neither a BOS nor an EOS token, so a document's first token cannot be "
                     "scored; bits per byte needs one of them")


def document_windows(doc: int, ids: list[int], context: int, stride: int) -> Iterator[Window]:
    """Windows over `ids` (starting with the start token) that together score ids[1:] once each."""
    if not 0 < stride <= context - 1:
        raise ZhllmError(f"stride must be between 1 and the context minus 1 ({context - 1}), got {stride}")
    done = 1  # ids[:done] are scored or pure context
    begin = 0
    while done < len(ids):
        end = min(begin + context + 1, len(ids))  # `context` inputs predict up to `context` targets
        yield Window(doc, ids[begin:end], end - done)
        done = end
        begin += stride


def limited_texts(texts: Iterable[str], max_docs: int | None, max_chars: int | None) -> Iterator[str]:
    """The first `max_docs` texts, each cut to `max_chars` characters: the same bytes for every tokenizer."""
    for n, text in enumerate(texts):
        if max_docs is not None and n >= max_docs:
            return
        yield text[:max_chars] if max_chars else text


def bits_per_byte(engine, texts: Iterable[str], *, stride: int | None = None, context: int | None = None,
                  batch_tokens: int = 8192, progress=None) -> BpbResult:
    """Score every text with `engine` (an infer.engine.Engine) and sum; `progress(docs, bytes)` after each batch.

    `context` defaults to the model's; `stride` to half of it. Batches hold about `batch_tokens` tokens."""
    from ..tokenizer.encode import encode_batch_texts
    tokenizer = engine.tokenizer
    if tokenizer is None:
        raise ZhllmError("bits per byte needs the model's tokenizer; this engine has none")
    context = min(context or engine.max_seq_len, engine.max_seq_len - 1)
    stride = stride or max(1, context // 2)
    first = start_token(tokenizer)
    result = BpbResult()
    pending: list[Window] = []
    pending_tokens = 0
    chunk: list[str] = []

    def flush() -> None:
        nonlocal pending, pending_tokens
        result.nll_nats += _score_windows(engine, pending, batch_tokens)
        result.windows += len(pending)
        pending, pending_tokens = [], 0

    def encode_chunk() -> None:
        nonlocal pending_tokens
        for text, ids in zip(chunk, encode_batch_texts(tokenizer, chunk)):
            result.bytes += len(text.encode("utf-8"))
            result.tokens += len(ids)
            for w in document_windows(result.docs, [first] + ids, context, stride):
                pending.append(w)
                pending_tokens += len(w.tokens)
            result.docs += 1
        chunk.clear()

    for text in texts:
        chunk.append(text)
        if len(chunk) >= 64:
            encode_chunk()
        # Several batches' worth of windows sorted together keep padding low.
        if pending_tokens >= 8 * batch_tokens:
            flush()
            if progress is not None:
                progress(result.docs, result.bytes)
    encode_chunk()
    if pending:
        flush()
    if progress is not None:
        progress(result.docs, result.bytes)
    return result


def _score_windows(engine, windows: list[Window], batch_tokens: int) -> float:
    """Summed nats of the scored tokens of `windows`, in batches of about `batch_tokens` padded tokens."""
    windows = sorted(windows, key=lambda w: len(w.tokens))
    total, i = 0.0, 0
    while i < len(windows):
        # sorted ascending, so the batch's last window sets its padded width
        j = i + 1
        while j < len(windows) and (j - i + 1) * len(windows[j].tokens) <= batch_tokens:
            j += 1
        batch = windows[i:j]
        prompts = [w.tokens[:len(w.tokens) - w.scored] for w in batch]
        targets = [w.tokens[len(w.tokens) - w.scored:] for w in batch]
        total -= sum(score_continuations(engine, prompts, targets, batch_size=len(batch)))
        i = j
    return total
