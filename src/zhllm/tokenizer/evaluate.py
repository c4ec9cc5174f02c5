"""`zhllm tokenizer eval`: compression and byte-fallback rate of tokenizers on the same held-out text.

Metrics per tokenizer, over all documents: characters per token, UTF-8 bytes per token, and the byte-fallback
rate = share of tokens that are not whole characters: `<0xNN>` byte pieces (SentencePiece-style byte
fallback) or, for byte-level BPE, tokens whose bytes are not a complete UTF-8 sequence (a character the
vocabulary has no token for, spelled in raw bytes). A high rate means the vocabulary does not cover the text.

Besides zhllm/HF directories it reads a bare SentencePiece model (a `.model` file, or a directory holding only
`tokenizer.model`, e.g. ChatGLM2 whose HF class needs custom code) through `sentencepiece` itself.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import ZhllmError
from ..pointers import resolve_model_dir
from .byte_bpe import byte_symbols
from .encode import encode_batch_texts
from .load import load_tokenizer

BYTE_PIECE = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")
BATCH_DOCS = 256


@dataclass
class TokenizerStats:
    name: str
    vocab_size: int
    docs: int = 0
    chars: int = 0
    bytes: int = 0
    tokens: int = 0
    fallback_tokens: int = 0

    @property
    def chars_per_token(self) -> float:
        return self.chars / max(self.tokens, 1)

    @property
    def bytes_per_token(self) -> float:
        return self.bytes / max(self.tokens, 1)

    @property
    def fallback_rate(self) -> float:
        return self.fallback_tokens / max(self.tokens, 1)


class HFEncoder:
    def __init__(self, path: Path):
        self.tok = load_tokenizer(path)
        self.vocab_size = len(self.tok)
        self.fallback = _fallback_mask(self.tok.backend_tokenizer)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return encode_batch_texts(self.tok, texts)


class SentencePieceEncoder:
    def __init__(self, model_file: Path):
        import sentencepiece as spm

        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(str(model_file))
        except (OSError, RuntimeError) as e:
            raise ZhllmError(f"{model_file}: cannot load sentencepiece model ({str(e).splitlines()[0]})") from None
        self.vocab_size = self.sp.get_piece_size()
        self.fallback = np.array([self.sp.is_byte(i) for i in range(self.vocab_size)], dtype=bool)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.sp.encode(texts)


def open_encoder(path: str | Path):
    """An encoder for an HF tokenizer directory or a SentencePiece model file/directory."""
    path = resolve_model_dir(path)  # a run's checkpoints/latest pointer
    if path.is_file() and path.suffix == ".model":
        return SentencePieceEncoder(path)
    if path.is_dir() and not any((path / f).is_file() for f in ("tokenizer.json", "vocab.json")) \
            and (path / "tokenizer.model").is_file():
        return SentencePieceEncoder(path / "tokenizer.model")
    return HFEncoder(path)


def _fallback_mask(backend) -> np.ndarray:
    """True for ids whose token is a raw byte rather than whole characters."""
    vocab = backend.get_vocab(with_added_tokens=True)
    mask = np.zeros(max(vocab.values(), default=-1) + 1, dtype=bool)
    byte_level = "ByteLevel" in f"{backend.pre_tokenizer!r} {backend.decoder!r}"
    byte_of = {c: i for i, c in enumerate(byte_symbols())} if byte_level else {}
    added = set(backend.get_added_tokens_decoder())
    for token, i in vocab.items():
        if BYTE_PIECE.match(token):
            mask[i] = True
        elif byte_level and i not in added and all(c in byte_of for c in token):
            try:
                bytes(byte_of[c] for c in token).decode("utf-8")
            except UnicodeDecodeError:
                mask[i] = True
    return mask


def measure(encoder, name: str, texts: list[str]) -> TokenizerStats:
    stats = TokenizerStats(name, encoder.vocab_size)
    for start in range(0, len(texts), BATCH_DOCS):
        batch = texts[start:start + BATCH_DOCS]
        for text, ids in zip(batch, encoder.encode_batch(batch)):
            stats.docs += 1
            stats.chars += len(text)
            stats.bytes += len(text.encode("utf-8"))
            stats.tokens += len(ids)
            if ids:
                arr = np.asarray(ids)
                stats.fallback_tokens += int(encoder.fallback[arr[arr < len(encoder.fallback)]].sum())
    return stats


def evaluate_tokenizers(tokenizers: list[str | Path], inputs: list[str] | str, field: str | None = None,
                        max_docs: int | None = None) -> list[TokenizerStats]:
    """`zhllm tokenizer eval`: the same held-out documents (of files, directories or globs) through every
    tokenizer."""
    from itertools import islice

    from ..corpus.readers import ReadStats
    from .train import read_texts

    if max_docs is not None and max_docs <= 0:
        raise ZhllmError(f"--max-docs must be positive, got {max_docs}")
    encoders = [(open_encoder(t), _display_name(t)) for t in tokenizers]  # fail fast on a bad path
    inputs = [inputs] if isinstance(inputs, (str, Path)) else list(inputs)
    stats = ReadStats()
    texts = list(islice(read_texts(inputs, field, stats=stats), max_docs))
    if not texts:
        raise ZhllmError(f"no documents in {', '.join(map(str, inputs))}: {stats.summary().splitlines()[0]}")
    return [measure(encoder, name, texts) for encoder, name in encoders]


def _display_name(path: str | Path) -> str:
    p = Path(path)
    return p.parent.name + "/" + p.name if p.is_file() else p.name


def stats_table(rows: list[TokenizerStats]) -> str:
    """A markdown table, one line per tokenizer."""
    lines = ["| tokenizer | vocab | docs | chars | tokens | chars/token | bytes/token | byte-fallback |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for s in rows:
        lines.append(f"| {s.name} | {s.vocab_size:,} | {s.docs:,} | {s.chars:,} | {s.tokens:,} | "
                     f"{s.chars_per_token:.3f} | {s.bytes_per_token:.3f} | {100 * s.fallback_rate:.2f}% |")
    return "\n".join(lines)
