"""Parsers for `zhllm rm ...` (reward models); see cli/__init__.py."""
from __future__ import annotations

from . import add_progress_flag, add_recipe_options, train_without_subcommand


def _train(args) -> None:
    from ..train.rm import run_rm

    summary = run_rm(args.config, args.set, resume=args.resume)
    print(f"rm finished at step {summary['step']}/{summary['max_steps']}; val loss {summary.get('val_loss')}")


def _score(args) -> None:
    from ..align.reward_scores import score_file

    stats = score_file(args.model, args.input, args.out, batch_size=args.batch_size, max_len=args.max_len,
                       strict=args.strict, progress=not args.no_progress)
    print(stats)
    print(f"wrote {args.out}")


def register(root, groups) -> None:
    train_without_subcommand(root, groups, "rm", "reward-model", "train, score", _train)

    p = groups["rm"].add_parser(
        "train", help="train a reward model on preference pairs (Bradley-Terry)",
        description="Train a reward model (the decoder plus a scalar head on the last token) on preference pairs "
                    "in DPO's formats: -log sigmoid(r_chosen - r_rejected - margin). Starts from an SFT checkpoint, "
                    "saves transformers' *ForSequenceClassification checkpoints, reports held-out pair accuracy. "
                    "Same loop, checkpoints, resume and torchrun support as the other stages.")
    add_recipe_options(p, "reward-model")
    p.set_defaults(func=_train)

    p = groups["rm"].add_parser(
        "score", help="score records with a reward model",
        description="Score every record with a reward model: preference records (any DPO format) get "
                    "chosen_score and rejected_score (and the summary counts how often chosen wins); chat records "
                    "({messages}, or {prompt, response}) get score. Writes the records with their scores as JSONL.")
    p.add_argument("--model", required=True, help="reward-model directory (zhllm rm output or any HF "
                                                  "Llama/Qwen2 sequence-classification checkpoint)")
    p.add_argument("--input", required=True, nargs="+", help="json, jsonl or parquet files")
    p.add_argument("--out", required=True, help="output .jsonl file (written atomically when complete)")
    p.add_argument("--batch-size", type=int, default=16, help="rows scored together (default 16)")
    p.add_argument("--max-len", type=int, default=None, help="tokens per row; longer rows keep their end "
                                                             "(default: the model's context)")
    p.add_argument("--strict", action="store_true", help="fail on the first bad record instead of skipping it")
    add_progress_flag(p)
    p.set_defaults(func=_score)
