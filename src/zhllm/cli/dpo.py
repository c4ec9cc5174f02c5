"""Parsers for `zhllm dpo ...` (preference optimisation); see cli/__init__.py."""
from __future__ import annotations

from . import add_overwrite_flag, add_progress_flag, add_recipe_options, train_without_subcommand


def _make_rejected(args) -> None:
    from ..align.make_rejected import make_rejected

    stats = make_rejected(args.model, args.input, args.out, num=args.num, temperature=args.temperature,
                          top_p=args.top_p, max_new_tokens=args.max_new_tokens, seed=args.seed,
                          batch_size=args.batch_size, strict=args.strict, overwrite=args.overwrite,
                          progress=not args.no_progress)
    print(stats.summary())
    print(f"wrote {args.out}")


def _train(args) -> None:
    from ..train.dpo import run_dpo

    summary = run_dpo(args.config, args.set, resume=args.resume)
    print(f"dpo finished at step {summary['step']}/{summary['max_steps']}; val loss {summary.get('val_loss')}")


def register(root, groups) -> None:
    train_without_subcommand(root, groups, "dpo", "DPO", "train, make-rejected", _train)

    p = groups["dpo"].add_parser(
        "train", help="preference optimisation (DPO, IPO, hinge, robust, SimPO, ORPO) of a chat model",
        description="Train a model on preference pairs (prompt/chosen/rejected strings, OpenAI message lists or "
                    "ShareGPT, detected per record) rendered with its chat template; chosen and rejected go through "
                    "the model in one forward pass. Reference: a frozen copy, the LoRA base with adapters off, or "
                    "log-probs precomputed into the run directory. Same loop, checkpoints, resume and torchrun "
                    "support as `zhllm pretrain` and `zhllm sft`.")
    add_recipe_options(p, "DPO")
    p.set_defaults(func=_train)

    p = groups["dpo"].add_parser(
        "make-rejected", help="sample the model's own answers as rejected replies",
        description="For every record with a prompt and a chosen answer (preference or SFT records), sample answers "
                    "from the model and write preference records (prompt/chosen/rejected, plus system/history when "
                    "the source has them). Answers equal to the chosen one are skipped and counted. A killed run "
                    "re-run with the same command continues and gives the same file.")
    p.add_argument("--model", required=True, help="SFT checkpoint directory")
    p.add_argument("--input", required=True, nargs="+", help="preference or SFT files (json, jsonl, parquet)")
    p.add_argument("--out", required=True, help="output .jsonl file (written atomically when complete)")
    p.add_argument("--num", type=int, default=1, help="answers sampled per prompt (default 1)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature, 0 = greedy (default 1.0)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold (default 1.0 = off)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="answer length limit (default 256)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--batch-size", type=int, default=8, help="prompts decoded together (default 8)")
    p.add_argument("--strict", action="store_true", help="fail on the first bad record instead of skipping it")
    add_overwrite_flag(p)
    add_progress_flag(p)
    p.set_defaults(func=_make_rejected)
