"""Parsers for `zhllm data ...` commands owned by the data-cleaning area; see cli/__init__.py."""
from __future__ import annotations

import argparse
import os

from ..data.chat import FORMATS
from . import add_overwrite_flag, add_progress_flag


def add_input_arguments(p: argparse.ArgumentParser) -> None:
    """--input/--field/--strict/--txt-mode: how every data command reads a corpus (corpus/readers.py)."""
    p.add_argument("--input", "-i", nargs="+", required=True, metavar="PATH",
                   help="files, directories (recursive) or globs: .jsonl .json .parquet .csv .txt, each optionally .gz")
    p.add_argument("--field", default=None,
                   help="record field holding the text (default: text, else content, completion, ...)")
    p.add_argument("--strict", action="store_true",
                   help="stop at the first bad record (naming file:line) instead of counting and skipping it")
    p.add_argument("--txt-mode", choices=["line", "paragraph"], default="line",
                   help=".txt files: one document per line, or per blank-line separated paragraph (default: line)")


def register(root, groups) -> None:
    p = groups["data"].add_parser(
        "clean", help="normalise, filter and deduplicate a corpus into jsonl.gz shards",
        description="Normalise (NFKC keeping Chinese punctuation, optional traditional->simplified), drop "
                    "low-quality documents, remove exact and MinHash near duplicates. Writes "
                    "OUT/part-*.jsonl.gz and OUT/report.json and prints a summary table.")
    add_input_arguments(p)
    p.add_argument("--out", "-o", required=True, help="output directory (replaced atomically when done)")
    add_overwrite_flag(p)
    p.add_argument("--config", default=None, help="YAML file of CleanConfig settings (e.g. configs/clean/default.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a setting, e.g. --set t2s=true --set quality.min_chars=50 --set dedup.threshold=0.7")
    p.add_argument("--workers", type=int, default=None,
                   help="processes for normalisation, filters and MinHash (default: all cores)")
    p.add_argument("--num-shards", type=int, default=None,
                   help="split the job across this many machines: --out gets this machine's part, undecided; "
                        "`zhllm data clean-merge` then deduplicates all parts into the output")
    p.add_argument("--shard-index", type=int, default=None, help="which part this machine does (0-based)")
    add_progress_flag(p)
    p.set_defaults(func=_clean)

    p = groups["data"].add_parser(
        "clean-merge", help="merge the parts of a split `data clean` into its output",
        description="Deduplicate the parts written by `zhllm data clean --num-shards K --shard-index I` (all K "
                    "of them, same inputs and settings) over the whole input and write OUT/part-*.jsonl.gz and "
                    "OUT/report.json: the same bytes as one `zhllm data clean` of the inputs.")
    p.add_argument("--parts", nargs="+", required=True, metavar="DIR", help="the K part directories, any order")
    p.add_argument("--out", "-o", required=True, help="output directory (replaced atomically when done)")
    add_overwrite_flag(p)
    add_progress_flag(p)
    p.set_defaults(func=_clean_merge)

    p = groups["data"].add_parser(
        "tokenize-sft", help="encode chat files once into SFT shards that `zhllm sft` reads without encoding",
        description="Render alpaca / ShareGPT / messages / prompt-response records with the tokenizer's chat "
                    "template into OUT/{train,val}.{bin,mask,idx} + meta.json (ids, assistant-only loss mask, "
                    "offsets). Give OUT as data.path to `zhllm sft`. Output bytes do not depend on --workers.")
    p.add_argument("--tokenizer", required=True, help="tokenizer (or checkpoint) directory with a chat_template: "
                                                      "the model you will fine-tune")
    p.add_argument("--input", "-i", nargs="+", required=True, metavar="PATH", help="SFT files, directories or globs")
    p.add_argument("--out", "-o", required=True, help="output directory (written atomically)")
    add_overwrite_flag(p)
    p.add_argument("--max-len", type=int, required=True,
                   help="token limit per conversation; use the train.seq_len of your SFT recipe (or less)")
    p.add_argument("--format", default="auto", choices=FORMATS, help="record format (default: detect per record)")
    p.add_argument("--overflow", default="truncate", choices=("truncate", "skip"),
                   help="too long: drop whole earlier turns (default) or skip the conversation")
    p.add_argument("--val-fraction", type=float, default=0.0,
                   help="conversations held out as the val split, a seeded random subset (default 0); "
                        "`zhllm sft` then needs data.val_fraction 0 or this value")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the val choice; with train.seed equal, the split matches training from the files")
    p.add_argument("--strict", action="store_true", help="fail on the first bad record instead of skipping it")
    p.add_argument("--workers", type=int, default=None, help="encoding processes (default: all cores)")
    add_progress_flag(p)
    p.set_defaults(func=_tokenize_sft)

    p = groups["data"].add_parser(
        "self-instruct", help="generate SFT records from seed tasks with a model behind an OpenAI-compatible API",
        description="The self-instruct loop: seed tasks -> new Chinese instructions -> answers, from any "
                    "/v1/chat/completions endpoint. Drops near duplicates (of the seeds and of everything "
                    "generated), too short/long, non-Chinese and refusing replies, with counts. Appends "
                    "`messages` records to OUT one durable line at a time; re-run the same command to continue.")
    p.add_argument("--endpoint", required=True, help="base URL, e.g. http://127.0.0.1:8000 or https://host/v1")
    p.add_argument("--model", required=True, help="model name sent with each request")
    p.add_argument("--seeds", nargs="+", required=True, metavar="PATH",
                   help="seed SFT records (alpaca / ShareGPT / messages / prompt-response; files, dirs or globs)")
    p.add_argument("--out", "-o", required=True, help="output .jsonl (appended to; an existing one is continued)")
    p.add_argument("--num", type=int, required=True, help="records OUT should hold in the end")
    p.add_argument("--api-key-env", default="OPENAI_API_KEY",
                   help="environment variable holding the API key (default OPENAI_API_KEY; unset = no key)")
    p.add_argument("--concurrency", type=int, default=4, help="requests in flight at once (default 4)")
    p.add_argument("--max-retries", type=int, default=5, help="retries per request on errors, timeouts, "
                                                               "429 and 5xx, with exponential backoff (default 5)")
    p.add_argument("--retry-wait", type=float, default=1.0, help="seconds before the first retry (default 1)")
    p.add_argument("--max-failures", type=int, default=5,
                   help="stop after this many requests in a row fail even after their retries (default 5)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for one answer (default 120)")
    p.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (default 0.7)")
    p.add_argument("--max-tokens", type=int, default=1024, help="token limit of each answer (default 1024)")
    p.add_argument("--seed-examples", type=int, default=3, help="seed tasks shown per prompt (default 3)")
    p.add_argument("--generated-examples", type=int, default=2,
                   help="generated tasks shown per prompt, once there are some (default 2)")
    p.add_argument("--dedup-threshold", type=float, default=0.7,
                   help="instructions whose character 3-gram Jaccard similarity to an earlier one is above "
                        "this are near duplicates (default 0.7)")
    p.add_argument("--min-cjk", type=float, default=0.2,
                   help="least share of CJK characters in instruction and answer (default 0.2)")
    p.add_argument("--seed", type=int, default=0, help="seed of the prompt sampling and request seeds")
    add_progress_flag(p)
    p.set_defaults(func=_self_instruct)


def _clean(args) -> None:
    from ..data.clean import clean_corpus, format_clean_report, load_clean_config
    from ..errors import ZhllmError
    cfg = load_clean_config(args.config, args.overrides)
    workers = (os.cpu_count() or 1) if args.workers is None else args.workers
    if args.num_shards is None:
        if args.shard_index is not None:
            raise ZhllmError("--shard-index needs --num-shards (how many parts the job is split into)")
        report = clean_corpus(args.input, args.out, cfg, field=args.field, strict=args.strict,
                              txt_mode=args.txt_mode, workers=workers, progress=not args.no_progress,
                              overwrite=args.overwrite)
        print(format_clean_report(report))
        return
    from ..data.clean_split import clean_part, format_part_summary
    if args.shard_index is None:
        raise ZhllmError("--num-shards needs --shard-index (which part this machine does, 0-based)")
    info = clean_part(args.input, args.out, args.num_shards, args.shard_index, cfg, field=args.field,
                      strict=args.strict, txt_mode=args.txt_mode, workers=workers, progress=not args.no_progress,
                      overwrite=args.overwrite)
    print(format_part_summary(info, args.out))


def _clean_merge(args) -> None:
    from ..data.clean import format_clean_report
    from ..data.clean_split import merge_clean_parts
    print(format_clean_report(merge_clean_parts(args.parts, args.out, progress=not args.no_progress,
                                                overwrite=args.overwrite)))


def _tokenize_sft(a) -> None:
    from ..data.sft_shards import tokenize_sft
    report = tokenize_sft(a.input, a.tokenizer, a.out, max_len=a.max_len, fmt=a.format, overflow=a.overflow,
                          val_fraction=a.val_fraction, seed=a.seed, strict=a.strict, workers=a.workers,
                          progress=not a.no_progress, overwrite=a.overwrite)
    print(report.table())


def _self_instruct(a) -> None:
    from ..data.openai_client import ChatClient
    from ..data.self_instruct import SelfInstructConfig, SelfInstructStopped, self_instruct
    client = ChatClient(a.endpoint, a.model, api_key=os.environ.get(a.api_key_env) or None, timeout=a.timeout,
                        max_retries=a.max_retries, retry_wait=a.retry_wait)
    cfg = SelfInstructConfig(num=a.num, seed_examples=a.seed_examples, generated_examples=a.generated_examples,
                             temperature=a.temperature, max_tokens=a.max_tokens, concurrency=a.concurrency,
                             max_failures=a.max_failures, min_cjk=a.min_cjk, dedup_threshold=a.dedup_threshold,
                             seed=a.seed)
    try:
        report = self_instruct(client, a.seeds, a.out, cfg, progress=not a.no_progress)
    except SelfInstructStopped as e:
        print(e.report.table())  # the counts so far, then the one-line error
        raise
    print(report.table())
