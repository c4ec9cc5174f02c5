"""Parser for `zhllm eval MODEL... --task bpb|mc|gen|demo`; the work is in zhllm.eval.compare."""
from __future__ import annotations

import argparse

from . import add_overwrite_flag, add_progress_flag


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _above_zero(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def _eval(args) -> None:
    from ..eval.compare import EvalOptions, run_eval
    opts = EvalOptions(task=args.task, inputs=args.input or [], dev=args.dev or [], shots=args.shots,
                       score=args.score, chat=args.chat, text_field=args.field, max_docs=args.max_docs,
                       max_chars_per_doc=args.max_chars_per_doc, stride=args.stride, context=args.context,
                       batch_tokens=args.batch_tokens, batch_size=args.batch_size, match=args.match,
                       stop=args.stop or [], max_new_tokens=args.max_new_tokens, num=args.num, seed=args.seed,
                       samples=args.samples, temperature=args.temperature, top_p=args.top_p,
                       device=args.device, dtype=args.dtype, progress=not args.no_progress)
    run_eval(args.models, opts, out=args.out, overwrite=args.overwrite)


def register(root, groups) -> None:
    p = root.add_parser(
        "eval", help="evaluate checkpoints: bits per byte, multiple choice, generation tasks",
        description="Evaluate one or more checkpoints (zhllm or any HF Llama/Qwen2 directory) on the same inputs and "
                    "print a side-by-side table. bpb: bits per byte (tokenizer-independent) and per-token "
                    "perplexity on a corpus; mc: CMMLU/C-Eval multiple choice, accuracy per subject with a 95%% CI; "
                    "gen: greedy answers to JSONL prompts matched against references; demo: the held-out demo tasks; "
                    "gen and demo with --samples N: pass@k over N sampled answers per item.")
    p.add_argument("models", nargs="+", metavar="MODEL", help="checkpoint directories")
    p.add_argument("--task", required=True, choices=["bpb", "mc", "gen", "demo"])
    p.add_argument("--input", nargs="+", help="input files, directories or globs (jsonl/json/parquet/csv/txt, .gz)")
    p.add_argument("--out", default=None, help="write results.json, results.md and per-item rows here")
    p.add_argument("--batch-size", type=_positive, default=16,
                   help="mc: model rows per forward; gen/demo: prompts decoded together (default 16)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    p.add_argument("--dtype", default="auto", help="auto, float32, bfloat16, float16 (default auto)")
    g = p.add_argument_group("bpb")
    g.add_argument("--field", default=None, help="text field (default text, content, ...)")
    g.add_argument("--max-docs", type=_positive, default=None, help="score the first N documents")
    g.add_argument("--max-chars-per-doc", type=_positive, default=None, help="cut each document to N characters")
    g.add_argument("--context", type=_positive, default=None, help="window length in tokens (default the model's)")
    g.add_argument("--stride", type=_positive, default=None,
                   help="tokens between window starts in long documents (default half the context)")
    g.add_argument("--batch-tokens", type=_positive, default=8192, help="padded tokens per forward (default 8192)")
    g = p.add_argument_group("mc")
    g.add_argument("--dev", nargs="+", help="dev split: the k-shot examples (first K per subject)")
    g.add_argument("--shots", type=int, default=0, help="examples per prompt from --dev (default 0)")
    g.add_argument("--score", choices=["letter", "options"], default="letter",
                   help="letter: log-prob of the answer letter (default); options: length-normalised likelihood "
                        "of each option's text")
    g.add_argument("--chat", action="store_true", help="mc/gen: ask in the chat template (for SFT models)")
    g = p.add_argument_group("gen / demo")
    g.add_argument("--match", choices=["exact", "numeric", "contains"], default="exact", help="default exact")
    g.add_argument("--stop", action="append", help="stop string (repeatable)")
    g.add_argument("--max-new-tokens", type=_positive, default=64, help="default 64")
    g.add_argument("--num", type=_positive, default=100, help="demo: held-out tasks (default 100)")
    g.add_argument("--seed", type=int, default=0, help="demo: task seed; with --samples, the sampling seed too "
                                                         "(default 0)")
    g.add_argument("--samples", type=_positive, default=0,
                   help="N answers sampled per item instead of one greedy answer: accuracy is then pass@1 (the mean "
                        "over samples), with pass@2, pass@4, ... pass@N beside it")
    g.add_argument("--temperature", type=_above_zero, default=0.7, help="with --samples (default 0.7)")
    g.add_argument("--top-p", type=float, default=1.0, help="with --samples (default 1.0 = off)")
    add_overwrite_flag(p)
    add_progress_flag(p)
    p.set_defaults(func=_eval)
