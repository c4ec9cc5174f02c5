"""Parsers for `zhllm tokenizer train|extend|eval`; see cli/__init__.py."""
from __future__ import annotations

from ..tokenizer.special import DEFAULT_NUM_RESERVED, special_tokens
from . import add_overwrite_flag, add_progress_flag


def _input_args(p) -> None:
    p.add_argument("--input", nargs="+", required=True, metavar="PATH",
                   help="corpus files, directories or globs (jsonl, json, parquet, csv, txt, optionally .gz)")
    p.add_argument("--field", default=None, help="text field of each record (default: text, with fallbacks)")
    p.add_argument("--strict", action="store_true", help="stop at the first bad record instead of skipping it")
    p.add_argument("--seed", type=int, default=0, help="seed of the document sample (default 0)")


def register(root, groups) -> None:
    sub = groups["tokenizer"]
    p = sub.add_parser("train", help="train a byte-level BPE (or SentencePiece) tokenizer on a corpus",
                       description="Stream the corpus, sample up to --max-chars characters spread over all of it, "
                                   "train, and write a directory that AutoTokenizer.from_pretrained loads.")
    _input_args(p)
    p.add_argument("--vocab-size", type=int, required=True, help="vocabulary size including special tokens")
    p.add_argument("--out", required=True, help="output tokenizer directory")
    add_overwrite_flag(p)
    p.add_argument("--max-chars", type=int, default=10_000_000,
                   help="characters sampled for training, spread over the whole input; bounds memory: the bpe "
                        "backend needs about 0.25 GB of RAM per million Chinese characters (default 10M)")
    p.add_argument("--backend", choices=["bpe", "sentencepiece"], default="bpe",
                   help="bpe: byte-level BPE with `tokenizers` (default); sentencepiece: SentencePiece BPE "
                        "with byte fallback, saved in the same HF format")
    p.add_argument("--num-reserved", type=int, default=DEFAULT_NUM_RESERVED,
                   help=f"reserved special-token slots after {', '.join(special_tokens(0))} "
                        f"(default {DEFAULT_NUM_RESERVED})")
    add_progress_flag(p)
    p.set_defaults(func=_train)

    p = sub.add_parser("extend", help="add vocabulary learnt on a corpus to an existing tokenizer",
                       description="Learn up to --add new BPE merges on the corpus and append them to the base "
                                   "tokenizer (old ids unchanged). With --model, also grow a checkpoint's "
                                   "embeddings, each new row the mean of the old pieces it replaces.")
    p.add_argument("--base", required=True, help="tokenizer directory to extend (an HF BPE tokenizer)")
    _input_args(p)
    p.add_argument("--add", type=int, required=True, help="number of new tokens")
    p.add_argument("--out", required=True, help="output tokenizer directory")
    p.add_argument("--max-chars", type=int, default=5_000_000,
                   help="characters sampled to learn the new tokens (default 5M)")
    p.add_argument("--model", default=None, help="checkpoint using the base tokenizer, to resize")
    p.add_argument("--model-out", default=None, help="where to write the resized checkpoint")
    add_overwrite_flag(p)
    add_progress_flag(p)
    p.set_defaults(func=_extend)

    p = sub.add_parser("eval", help="chars/token, bytes/token and byte-fallback rate on held-out text",
                       description="Encode the same documents with each tokenizer and print a markdown table. "
                                   "Accepts HF tokenizer directories and SentencePiece .model files.")
    p.add_argument("--tokenizer", required=True, help="tokenizer directory (or SentencePiece .model)")
    p.add_argument("--input", nargs="+", required=True, metavar="PATH",
                   help="held-out corpus files, directories or globs")
    p.add_argument("--compare", nargs="*", default=[], metavar="DIR", help="more tokenizers to compare")
    p.add_argument("--field", default=None, help="text field of each record (default: text, with fallbacks)")
    p.add_argument("--max-docs", type=int, default=None, help="use only the first N documents (of all inputs)")
    p.set_defaults(func=_eval)


def _train(a) -> None:
    from ..tokenizer.train import train_tokenizer

    print(train_tokenizer(a.input, a.out, a.vocab_size, max_chars=a.max_chars, field=a.field, backend=a.backend,
                          num_reserved=a.num_reserved, seed=a.seed, strict=a.strict, show_progress=not a.no_progress,
                          overwrite=a.overwrite).table())


def _extend(a) -> None:
    from ..tokenizer.extend import EXTEND_COMMAND, extend_tokenizer

    print(extend_tokenizer(a.base, a.input, a.add, a.out, max_chars=a.max_chars, field=a.field, seed=a.seed,
                           strict=a.strict, show_progress=not a.no_progress, overwrite=a.overwrite,
                           model=a.model, model_out=a.model_out).table())
    if a.model is not None:  # tokenizer/ sits below model/, so the resize is the second step, not part of extend
        from ..model.resize import resize_embeddings

        print(resize_embeddings(a.model, a.out, a.model_out, old_tokenizer_dir=a.base, overwrite=a.overwrite,
                                command=EXTEND_COMMAND, flag="--model-out").table())


def _eval(a) -> None:
    from ..tokenizer.evaluate import evaluate_tokenizers, stats_table

    print(stats_table(evaluate_tokenizers([a.tokenizer, *a.compare], a.input, field=a.field, max_docs=a.max_docs)))
