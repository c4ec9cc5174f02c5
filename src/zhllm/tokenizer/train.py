"""Byte-level BPE for Chinese + English + code, trained with HF `tokenizers` and saved as an HF directory.

Pre-tokenisation splits on the GPT-4/Qwen2 pattern: runs of letters (a CJK run is one piece, so BPE can
learn multi-character words inside it), single digits (numbers stay compositional, which helps arithmetic),
punctuation runs and whitespace. Bytes are the base alphabet, so nothing is ever unknown.
"""
from __future__ import annotations

import json
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from ..errors import ZhllmError
from ..fsutil import atomic_directory
from ..outputs import check_output_dir
from .special import CHATML_TEMPLATE, DEFAULT_NUM_RESERVED, EOS, special_tokens

TRAIN_COMMAND = "tokenizer train"
SPLIT_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def byte_level_pre_tokenizer():
    from tokenizers import Regex, pre_tokenizers

    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])


def train_bpe(texts: Iterable[str], vocab_size: int, num_reserved: int = DEFAULT_NUM_RESERVED, min_frequency: int = 2,
              show_progress: bool = False):
    """Train a byte-level BPE `tokenizers.Tokenizer` on texts: trained on characters and rewritten in bytes
    (byte_bpe.py, 3x faster than training on bytes, the same kind of model).

    `show_progress` runs the `tokenizers` trainer's own bars: only for a terminal on stdout and stderr
    (see progress.py)."""
    from collections import Counter

    from tokenizers import Regex, Tokenizer, decoders, pre_tokenizers

    from .byte_bpe import byte_level_model, train_char_level

    specials = special_tokens(num_reserved)
    smallest = 256 + len(specials)
    if vocab_size <= smallest:
        raise ZhllmError(f"vocab size {vocab_size} is too small: the 256 bytes and "
                         f"{len(specials)} special tokens alone need {smallest}")
    texts = texts if isinstance(texts, list) else list(texts)
    chars: Counter = Counter()
    for text in texts:
        chars.update(text)
    # The characters worth a token of their own: those seen at least once per 400k characters of text. Rarer ones
    # stay byte sequences, as a byte-level trainer leaves them when its vocabulary runs out before their merges
    # (on 50 MB of the shared prose at 32k: 1.727 chars/token held out, as byte-level training; keeping every
    # character seen twice spent 4,000 tokens on rare characters: 1.706).
    # Single-byte characters are free (they are bytes); at most half the free vocabulary goes to the others, so
    # small vocabularies still learn merges.
    floor = max(min_frequency, sum(chars.values()) // 400_000)
    ranked = sorted((c for c, n in chars.items() if n >= floor), key=lambda c: (-chars[c], c))
    ascii_chars = sorted(c for c in chars if ord(c) < 128)
    alphabet = ascii_chars + [c for c in ranked if ord(c) >= 128][:(vocab_size - smallest) // 2]
    split = pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated")
    merges = train_char_level(texts, vocab_size, split, min_frequency, show_progress, alphabet)
    tok = Tokenizer(byte_level_model(alphabet, merges, specials, vocab_size))
    tok.pre_tokenizer = byte_level_pre_tokenizer()
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(specials)
    return tok


def wrap_hf(tok, model_max_length: int = 32768, unk_token: str | None = None):
    """A `PreTrainedTokenizerFast` with ChatML template and EOS/pad set: what AutoTokenizer will load."""
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=EOS, unk_token=unk_token,
                                 bos_token=None, model_max_length=model_max_length, clean_up_tokenization_spaces=False)
    hf.chat_template = CHATML_TEMPLATE
    hf.add_special_tokens({"additional_special_tokens": [t for t in special_tokens(0) if t != EOS]})
    return hf


def save_hf_tokenizer(hf, out_dir: str | Path, command: str | None = None) -> Path:
    """save_pretrained, then make tokenizer_config.json readable by transformers 4.x as well as 5.x:
    the generic class name, the template inline, and the 4.x name for the extra special tokens.
    `command` names the zhllm command in the directory's output marker (see outputs.py)."""
    with atomic_directory(out_dir, marker=command) as tmp:
        hf.save_pretrained(str(tmp))
        cfg_file = tmp / "tokenizer_config.json"
        cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
        cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
        if hf.chat_template:
            cfg["chat_template"] = hf.chat_template
        extra = cfg.get("extra_special_tokens")
        if isinstance(extra, list):
            cfg["additional_special_tokens"] = extra
        cfg_file.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return Path(out_dir)


def train_tokenizer_from_texts(texts: Iterable[str], vocab_size: int, out_dir: str | Path,
                               num_reserved: int = DEFAULT_NUM_RESERVED, show_progress: bool = False) -> Path:
    """Train and save; the directory loads with `AutoTokenizer.from_pretrained(out_dir)`."""
    tok = train_bpe(texts, vocab_size, num_reserved=num_reserved, show_progress=show_progress)
    return save_hf_tokenizer(wrap_hf(tok), out_dir)


BACKENDS = ("bpe", "sentencepiece")


@dataclass
class TrainReport:
    out_dir: Path
    backend: str
    vocab_size: int
    docs_seen: int
    chars_seen: int
    chars_trained: int
    heldout_chars: int
    heldout_chars_per_token: float
    seconds: float
    read_summary: str = ""

    def __str__(self) -> str:
        return self.table()

    def table(self) -> str:
        rows = [("output", str(self.out_dir)), ("backend", self.backend), ("vocab size", f"{self.vocab_size:,}"),
                ("input", self.read_summary),
                ("input chars", f"{self.chars_seen:,}"),
                ("chars trained on", f"{self.chars_trained:,}"),
                ("held-out chars/token", f"{self.heldout_chars_per_token:.3f} (on {self.heldout_chars:,} chars)"),
                ("time", f"{self.seconds:.1f} s")]
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def train_tokenizer(inputs: list[str], out_dir: str | Path, vocab_size: int, max_chars: int = 10_000_000,
                    field: str | None = None, backend: str = "bpe", num_reserved: int = DEFAULT_NUM_RESERVED,
                    seed: int = 0, strict: bool = False, show_progress: bool = True,
                    overwrite: bool = False) -> TrainReport:
    """`zhllm tokenizer train`: stream `inputs`, sample at most `max_chars`, train, save an HF directory.

    Memory is set by `max_chars`, not by the input size: `tokenizers`' BPE trainer keeps every distinct
    pre-token as per-byte symbols, about 0.25 GB per million Chinese characters (measured in
    benchmarks/bench_tokenizer_train.py); SentencePiece needs far less."""
    from ..corpus.readers import ReadStats
    from .encode import encode_batch_texts
    from .progress import log, native_bars
    from .sample import sample_texts
    from .spm import UNK, sentencepiece_to_tokenizers, train_sentencepiece_model

    if backend not in BACKENDS:
        raise ZhllmError(f"unknown tokenizer backend {backend!r} (choose from {', '.join(BACKENDS)})")
    if max_chars <= 0:
        raise ZhllmError(f"--max-chars must be positive, got {max_chars}")
    if num_reserved < 0:
        raise ZhllmError(f"--num-reserved must be >= 0, got {num_reserved}")
    check_output_dir(out_dir, TRAIN_COMMAND, inputs=inputs, overwrite=overwrite)
    start, stats = time.perf_counter(), ReadStats()
    sample = sample_texts(read_texts(inputs, field, strict, stats), max_chars, seed=seed, progress=show_progress)
    if not sample.texts:
        raise ZhllmError(f"no text to train on in {', '.join(map(str, inputs))}")
    bars = show_progress and backend == "bpe" and native_bars()  # SentencePiece has no bars of its own
    lines = show_progress and not bars
    if lines:
        log(f"training {'BPE' if backend == 'bpe' else 'SentencePiece'} (vocab {vocab_size:,}) on "
            f"{sample.chars:,} characters ...")
    train_start = time.perf_counter()
    if backend == "bpe":
        tok, unk = train_bpe(sample.texts, vocab_size, num_reserved=num_reserved, show_progress=bars), None
    else:
        proto = train_sentencepiece_model(sample.texts, vocab_size, num_reserved=num_reserved)
        tok, unk = sentencepiece_to_tokenizers(proto), UNK
    if lines:
        log(f"trained in {time.perf_counter() - train_start:.1f} s")
    hf = wrap_hf(tok, unk_token=unk)
    save_hf_tokenizer(hf, out_dir, command=TRAIN_COMMAND)
    heldout = sample.heldout or sample.texts[:100]
    n_tokens = sum(map(len, encode_batch_texts(tok, heldout)))
    held_chars = sum(map(len, heldout))
    if lines:
        log(f"done in {time.perf_counter() - start:.1f} s")
    return TrainReport(Path(out_dir), backend, len(hf), sample.seen_docs, sample.seen_chars, sample.chars,
                       held_chars, held_chars / max(n_tokens, 1), time.perf_counter() - start, stats.summary())


def read_texts(inputs: list[str], field: str | None = None, strict: bool = False, stats=None) -> Iterator[str]:
    """Texts from files/directories/globs via the shared readers (bad records are counted in `stats`
    and skipped, or stop the run under `strict`)."""
    from ..corpus.readers import expand_inputs, iter_texts
    paths = expand_inputs(list(inputs))  # now, so a wrong path fails before any work starts
    return iter_texts(paths, field=field, strict=strict, stats=stats)
