"""Parsers for `zhllm data tokenize` and `zhllm data inspect`; see cli/__init__.py."""
from __future__ import annotations

from . import add_overwrite_flag, add_progress_flag


def register(root, groups) -> None:
    data = groups["data"]
    p = data.add_parser("tokenize", help="pre-tokenise a corpus into binary token shards (parallel, resumable)",
                        description="Tokenise text files into train/val .bin/.idx shards plus meta.json. "
                                    "Output bytes do not depend on --workers; rerun the same command to resume.")
    p.add_argument("--input", "-i", nargs="+", required=True, help="files, directories or globs")
    p.add_argument("--tokenizer", required=True, help="tokenizer directory (HF format)")
    p.add_argument("--out", "-o", required=True, help="output shard directory")
    add_overwrite_flag(p)
    p.add_argument("--field", default=None, help="text field of json/jsonl/parquet/csv records (default: text, ...)")
    p.add_argument("--val-fraction", type=float, default=0.0,
                   help="fraction of documents in the val split, chosen by a stable hash of the text")
    p.add_argument("--workers", type=int, default=None, help="worker processes (default: all cores)")
    p.add_argument("--num-shards", type=int, default=1, help="split the job across this many machines")
    p.add_argument("--shard-index", type=int, default=0, help="which part this machine does (0-based)")
    p.add_argument("--shard-tokens", type=int, default=None, help="training tokens per shard file")
    p.add_argument("--strict", action="store_true", help="stop at the first bad record instead of skipping it")
    add_progress_flag(p)
    p.set_defaults(func=_tokenize)

    p = data.add_parser("inspect", help="print a shard directory's meta and decode a sample document",
                        description="Verify a shard directory, print its totals and decode one document per split.")
    p.add_argument("dir", help="shard directory")
    p.add_argument("--doc", type=int, default=0, help="which document to decode (default 0)")
    p.set_defaults(func=lambda a: print(_inspect()(a.dir, sample=a.doc)))


def _tokenize(a) -> None:
    from ..data.tokenize import DEFAULT_SHARD_TOKENS, tokenize_corpus

    report = tokenize_corpus(a.input, a.tokenizer, a.out, field=a.field, val_fraction=a.val_fraction,
                             workers=a.workers, num_shards=a.num_shards, shard_index=a.shard_index,
                             shard_tokens=a.shard_tokens or DEFAULT_SHARD_TOKENS, strict=a.strict,
                             progress=not a.no_progress, overwrite=a.overwrite)
    print(report.table())


def _inspect():
    from ..data.shard_inspect import inspect_shards
    return inspect_shards
