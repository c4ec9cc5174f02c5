"""SentencePiece BPE backend, saved as a plain `tokenizers` JSON so AutoTokenizer loads it without custom code.

SentencePiece is trained with byte fallback (nothing is unknown), single digits, 99.95% character coverage
(lowered when the vocabulary is too small to hold those characters and some merges: the rarest characters
then become UTF-8 byte pieces instead of failing) and *identity* normalisation with whitespace kept,
so decoding gives back exactly the input text (the
default NFKC rule would turn full-width `！` into `!`). Our special tokens are its first control symbols,
so ids 0, 1, 2 mean the same as in the byte-level backend.

Conversion: a BPE model whose vocabulary is the piece list and whose merges are every split of a piece into
two pieces, ranked by the piece's id (the order SentencePiece learnt them) - the construction transformers
uses for LLaMA's fast tokenizer. Spaces become `▁` and start a new word, as in SentencePiece; the
result encodes exactly like SentencePiece on our tests and on 499/500 real documents.
"""
from __future__ import annotations

import io
import re
from collections import Counter
from collections.abc import Iterable, Iterator

from ..errors import ZhllmError
from .sample import chunk_text
from .special import DEFAULT_NUM_RESERVED, special_tokens

UNK = "<unk>"
# SentencePiece's words (with allow_whitespace_only_pieces): a run of spaces starts a word and the
# non-space text after it belongs to the same word. Pieces never cross these boundaries.
SP_WORD = "▁+[^▁]*|[^▁]+"
# SentencePiece skips longer sentences silently; we cut instead, at line breaks.
MAX_SENTENCE_CHARS = 8192
BYTE_PIECES = 256
# Share of the learnable vocabulary (after specials, <unk> and the byte pieces) kept for multi-character
# pieces when the characters alone would crowd them out: the vocabulary still compresses, and the rarest
# characters fall back to bytes. Measured at vocab 6400 on 2M characters of web_wiki_news_zh: held-out
# chars/token 1.135 with 10% kept, 1.188 with 25%, 1.228 with 50% (but 2.8% byte-fallback tokens against
# 0.3% with 10%); 25% is the middle ground.
MIN_MERGE_SHARE = 0.25
MIN_COVERAGE = 0.98  # SentencePiece refuses a lower character_coverage


def _sentences(texts: Iterable[str]) -> Iterator[str]:
    # Newlines stay inside sentences, so the vocabulary learns them (e.g. `。\n`) like any character.
    for text in texts:
        yield from chunk_text(text, MAX_SENTENCE_CHARS)


def train_sentencepiece_model(texts: Iterable[str], vocab_size: int, num_reserved: int = DEFAULT_NUM_RESERVED,
                              character_coverage: float = 0.9995, num_threads: int | None = None) -> bytes:
    """Train a SentencePiece BPE model; returns the serialized model proto.

    If the characters that `character_coverage` asks for leave less than MIN_MERGE_SHARE of the vocabulary
    for merges, the coverage is lowered to the most frequent characters that do fit (rarer ones are
    spelled in byte pieces), instead of SentencePiece refusing the vocabulary size."""
    import os

    import sentencepiece as spm

    texts = texts if isinstance(texts, list) else list(texts)  # read twice: character counts, then training
    specials = special_tokens(num_reserved)
    fixed = len(specials) + 1 + BYTE_PIECES  # control symbols, <unk>, byte pieces
    if vocab_size <= fixed:
        raise ZhllmError(f"vocab size {vocab_size} is too small: the {BYTE_PIECES} byte pieces, {len(specials)} "
                         f"special tokens and {UNK} alone need {fixed}; use a larger --vocab-size")
    coverage = fitting_coverage(char_counts(texts), vocab_size - fixed, character_coverage)
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_sentences(texts), model_writer=model, model_type="bpe", vocab_size=vocab_size,
            byte_fallback=True, split_digits=True, character_coverage=coverage,
            normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False,
            allow_whitespace_only_pieces=True, control_symbols=specials, unk_id=len(specials), unk_piece=UNK,
            bos_id=-1, eos_id=-1, pad_id=-1, max_sentence_length=4 * MAX_SENTENCE_CHARS,
            num_threads=num_threads or os.cpu_count() or 1, minloglevel=2)
    except RuntimeError as e:
        msg = str(e).strip().splitlines()[-1].split("] ")[-1] or str(e).strip()
        too_small = re.search(r"smaller than required_chars\. (\d+) vs (\d+)", msg)
        if too_small:
            raise ZhllmError(f"vocab size {vocab_size} is smaller than the {too_small.group(2)} pieces SentencePiece "
                             f"needs for the characters of this corpus (coverage {coverage:.6f}); use a "
                             "larger --vocab-size or the bpe backend") from None
        raise ZhllmError(f"sentencepiece training failed: {msg}") from None
    return model.getvalue()


def char_counts(texts: Iterable[str]) -> Counter:
    """Character frequencies as SentencePiece counts them: spaces are `▁`, line breaks are characters."""
    counts: Counter = Counter()
    for text in texts:
        counts.update(text)
    if " " in counts:
        counts["▁"] += counts.pop(" ")
    return counts


def fitting_coverage(counts: Counter, free_slots: int, coverage: float) -> float:
    """`coverage`, or a lower one whose characters leave MIN_MERGE_SHARE of `free_slots` for merges.

    SentencePiece keeps the most frequent characters until their share of all occurrences reaches the
    coverage; to keep exactly k of them we ask for a share between the first k-1 and the first k."""
    max_chars = max(1, int(free_slots * (1 - MIN_MERGE_SHARE)))
    freqs = sorted(counts.values(), reverse=True)
    total = sum(freqs)
    if len(freqs) <= max_chars or total == 0:
        return coverage
    covered = sum(freqs[:max_chars - 1])
    # the midpoint, as SentencePiece compares in float32: rounding moves the cut by a character at most,
    # which the merge share absorbs
    fit = (covered + freqs[max_chars - 1] / 2) / total
    return max(MIN_COVERAGE, min(coverage, fit))


def sentencepiece_to_tokenizers(model_proto: bytes):
    """A `tokenizers.Tokenizer` (BPE with byte fallback) that encodes like the SentencePiece BPE model."""
    import sentencepiece as spm
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    sp = spm.SentencePieceProcessor(model_proto=model_proto)
    if sp.get_piece_size() == 0:
        raise ZhllmError("empty sentencepiece model")
    pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    vocab = {p: i for i, p in enumerate(pieces)}
    mergeable = [i for i in range(len(pieces)) if not (sp.is_control(i) or sp.is_byte(i) or sp.is_unknown(i))]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=_merges_from_pieces(pieces, vocab, mergeable),
                               unk_token=pieces[sp.unk_id()], byte_fallback=True, fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=False),
        pre_tokenizers.Split(Regex(SP_WORD), behavior="isolated")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens([AddedToken(pieces[i], special=True, normalized=False)
                            for i in range(len(pieces)) if sp.is_control(i)])
    return tok


def _merges_from_pieces(pieces: list[str], vocab: dict[str, int], mergeable: list[int]) -> list[tuple[str, str]]:
    """Every (left, right) with left+right a piece, ranked by (id of the result, id of left)."""
    ranked = []
    for i in mergeable:
        piece = pieces[i]
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                ranked.append((i, vocab[left], left, right))
    ranked.sort()
    return [(left, right) for _, _, left, right in ranked]
