"""Add vocabulary learnt on a corpus to an existing BPE tokenizer, keeping every old id unchanged.

Why real merges rather than "added tokens": added tokens are matched greedily before the model runs, so a
new token `中国` would split `中国人` or `一中国画` at the wrong place and ignore the base tokenizer's
pre-tokenisation. New *merges* appended after the base merges keep BPE semantics: the base tokenizer runs
exactly as before, and only afterwards can two adjacent pieces fuse into a new one. Old ids, old merges
and their order are untouched, so a model trained on the base tokenizer sees the same ids for any text
that contains none of the new words.

How: train a candidate BPE on (a sample of) the corpus with the base's own normaliser and pre-tokenizer;
take its tokens in the order it learnt them (most frequent pairs first). For each candidate not yet in the
vocabulary, tokenise it with the base merges (plus those added so far); when it comes out as exactly two
pieces, append the merge `left right -> candidate` with the next free id. Candidates that would need
several new merges at once are skipped (their parts usually arrive as candidates of their own first).
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import ZhllmError
from ..outputs import check_output_dir
from .encode import encode_batch_texts
from .load import load_tokenizer
from .progress import native_bars
from .sample import sample_texts
from .train import read_texts, save_hf_tokenizer

MAX_CANDIDATE_ROUNDS = 6
EXTEND_COMMAND = "tokenizer extend"


@dataclass
class ExtendReport:
    out_dir: Path
    old_size: int
    new_size: int
    added: int
    first_new_id: int
    heldout_chars: int
    tokens_before: int
    tokens_after: int
    seconds: float
    examples: list[str]
    requested: int = 0

    def __str__(self) -> str:
        return self.table()

    def table(self) -> str:
        rows = [("output", str(self.out_dir)), ("vocab", f"{self.old_size:,} -> {self.new_size:,}"),
                ("new tokens", f"{self.added:,} (ids from {self.first_new_id:,})" + (
                    f"; the corpus offered only these, not {self.requested:,}" if self.added < self.requested else "")),
                ("held-out chars/token", f"{self.heldout_chars / max(self.tokens_before, 1):.3f} -> "
                                         f"{self.heldout_chars / max(self.tokens_after, 1):.3f}"),
                ("examples", " ".join(self.examples)), ("time", f"{self.seconds:.1f} s")]
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def extend_tokenizer(base_dir: str | Path, inputs: list[str], add: int, out_dir: str | Path,
                     max_chars: int = 5_000_000, field: str | None = None, seed: int = 0,
                     strict: bool = False, show_progress: bool = True, overwrite: bool = False,
                     model: str | Path | None = None, model_out: str | Path | None = None) -> ExtendReport:
    """`zhllm tokenizer extend`: learn up to `add` new tokens on `inputs` and save the extended tokenizer.

    `model`/`model_out` name the checkpoint the caller will resize to the result (model/resize.py, which
    sits above this package) and where it goes: checked here, so a bad pair fails before the slow part."""
    if add <= 0:
        raise ZhllmError(f"--add must be positive, got {add}")
    check_model_outputs(base_dir, inputs, out_dir, model, model_out, overwrite)
    check_output_dir(out_dir, EXTEND_COMMAND, inputs=[base_dir, *inputs], overwrite=overwrite)
    start = time.perf_counter()
    base = load_tokenizer(base_dir)
    if max_chars <= 0:
        raise ZhllmError(f"--max-chars must be positive, got {max_chars}")
    sample = sample_texts(read_texts(inputs, field, strict), max_chars, seed=seed, progress=show_progress)
    if not sample.texts:
        raise ZhllmError(f"no text to learn from in {', '.join(map(str, inputs))}")
    new_backend, new_tokens = add_merges(base.backend_tokenizer, sample.texts, add, show_progress)
    hf = rewrap_like(base, new_backend)
    save_hf_tokenizer(hf, out_dir, command=EXTEND_COMMAND)
    heldout = sample.heldout or sample.texts[:100]
    before = sum(map(len, encode_batch_texts(base, heldout)))
    after = sum(map(len, encode_batch_texts(new_backend, heldout)))
    first = new_backend.token_to_id(new_tokens[0]) if new_tokens else len(base)
    readable = (hf.convert_tokens_to_string([t]) for t in new_tokens)
    examples = [t for t in readable if "\ufffd" not in t and t.strip()][:12]
    return ExtendReport(Path(out_dir), len(base), len(hf), len(new_tokens), first, sum(map(len, heldout)),
                        before, after, time.perf_counter() - start, examples, requested=add)


def check_model_outputs(base_dir: str | Path, inputs: list[str], out_dir: str | Path,
                        model: str | Path | None, model_out: str | Path | None, overwrite: bool = False) -> None:
    """--model and --model-out: both or neither, the copy apart from the original and from --out, and
    --model-out a directory zhllm may write (outputs.py)."""
    if (model is None) != (model_out is None):
        raise ZhllmError("--model and --model-out go together: the checkpoint to resize and where to write it")
    if model is None:
        return
    if Path(model).resolve() == Path(model_out).resolve():
        raise ZhllmError("--model-out must differ from --model (the original checkpoint is kept)")
    a, b = Path(out_dir).resolve(), Path(model_out).resolve()
    if a == b or a.is_relative_to(b) or b.is_relative_to(a):
        raise ZhllmError("--out and --model-out must be separate directories, neither inside the other")
    check_output_dir(model_out, EXTEND_COMMAND, inputs=[model, base_dir, *inputs], overwrite=overwrite,
                     flag="--model-out")


def add_merges(backend, texts: list[str], add: int, show_progress: bool = False):
    """A copy of the `tokenizers.Tokenizer` `backend` with up to `add` new BPE merges learnt on `texts`.

    Returns (new tokenizer, new token strings in id order)."""
    from tokenizers import Tokenizer

    data = json.loads(backend.to_str())
    model = data["model"]
    if model.get("type") != "BPE":
        raise ZhllmError(f"only BPE tokenizers can be extended (this one is {model.get('type')})")
    if model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        raise ZhllmError("BPE tokenizers with word prefixes/suffixes (WordPiece-style) are not supported")
    vocab: dict[str, int] = model["vocab"]
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    ranks = {pair: r for r, pair in enumerate(merges)}
    # Added tokens living above the model vocabulary (Qwen's specials) must enter it: `tokenizers` gives an
    # added token that the model lacks the id len(model vocab) + k on load, which would collide with ours.
    for tok in data.get("added_tokens", []):
        if tok["content"] not in vocab:
            vocab[tok["content"]] = tok["id"]
    next_id = max(vocab.values()) + 1
    byte_level = "ByteLevel" in json.dumps(data.get("pre_tokenizer"))
    added: list[str] = []
    for candidate in candidate_tokens(backend, texts, add, byte_level, show_progress):
        if len(added) >= add:
            break
        if candidate in vocab:
            continue
        if len(candidate) == 1:  # a character the base lacks (char-level BPE): a new base symbol
            vocab[candidate] = next_id
        else:
            pieces = bpe_pieces(list(candidate), ranks)
            if len(pieces) != 2 or any(p not in vocab for p in pieces):
                continue
            ranks[(pieces[0], pieces[1])] = len(merges)
            merges.append((pieces[0], pieces[1]))
            vocab[candidate] = next_id
        added.append(candidate)
        next_id += 1
    model["merges"] = [list(m) for m in merges]
    return Tokenizer.from_str(json.dumps(data, ensure_ascii=False)), added


def candidate_tokens(backend, texts: list[str], add: int, byte_level: bool, show_progress: bool):
    """Tokens of a BPE trained on `texts` with the base's normaliser and pre-tokenizer, most useful first.

    The candidate vocabulary grows (x4 per round) until it yields enough tokens unknown to the base."""
    from tokenizers import Tokenizer, models, trainers
    from tokenizers.pre_tokenizers import ByteLevel

    base_vocab = backend.get_vocab()
    size, yielded, previous_size = 1024 + 4 * add, set(), -1
    for _ in range(MAX_CANDIDATE_ROUNDS):
        cand = Tokenizer(models.BPE())
        cand.normalizer, cand.pre_tokenizer = backend.normalizer, backend.pre_tokenizer
        trainer = trainers.BpeTrainer(vocab_size=size, min_frequency=2, show_progress=show_progress and native_bars(),
                                      initial_alphabet=ByteLevel.alphabet() if byte_level else [])
        cand.train_from_iterator(texts, trainer=trainer)
        learnt = json.loads(cand.to_str())["model"]
        # single characters first (only matters for char-level bases), then merge results in learnt order
        ordered = [t for t, _ in sorted(learnt["vocab"].items(), key=lambda kv: kv[1]) if len(t) == 1]
        ordered += [(m.replace(" ", "", 1) if isinstance(m, str) else "".join(m)) for m in learnt["merges"]]
        fresh = [t for t in ordered if t not in base_vocab and t not in yielded]
        yield from fresh
        yielded.update(fresh)
        if cand.get_vocab_size() <= previous_size or cand.get_vocab_size() < size:
            return  # the corpus has no more pairs to learn
        previous_size, size = cand.get_vocab_size(), size * 4


def bpe_pieces(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Apply BPE merges to one pre-token, lowest rank first (leftmost on ties), as `tokenizers` does."""
    while len(symbols) > 1:
        best = min(((ranks[pair], i) for i, pair in enumerate(zip(symbols, symbols[1:])) if pair in ranks),
                   default=None)
        if best is None:
            break
        i = best[1]
        symbols = symbols[:i] + [symbols[i] + symbols[i + 1]] + symbols[i + 2:]
    return symbols


def rewrap_like(base, backend):
    """A PreTrainedTokenizerFast around `backend` with the base's special tokens, template and length."""
    from transformers import PreTrainedTokenizerFast

    specials = {k: getattr(base, k, None) for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
    hf = PreTrainedTokenizerFast(tokenizer_object=backend, model_max_length=base.model_max_length,
                                 clean_up_tokenization_spaces=False, **{k: v for k, v in specials.items() if v})
    extra = [t for t in getattr(base, "additional_special_tokens", None) or [] if t not in specials.values()]
    if extra:
        hf.add_special_tokens({"additional_special_tokens": extra})
    hf.chat_template = base.chat_template
    return hf
