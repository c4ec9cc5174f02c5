"""Parser for `zhllm distill` (knowledge distillation from a teacher's logits); see cli/__init__.py."""
from __future__ import annotations

from . import add_recipe_options


def _distill(args) -> None:
    from ..train.distill import run_distill

    summary = run_distill(args.config, args.set, resume=args.resume)
    print(f"distill finished at step {summary['step']}/{summary['max_steps']}; val loss {summary.get('val_loss')}")


def register(root, groups) -> None:
    p = root.add_parser(
        "distill", help="train a student on a teacher's next-token distributions",
        description="Knowledge distillation on token shards: the student (a preset or a checkpoint) minimises "
                    "alpha * T^2 * KL between its and the teacher's distributions at temperature T (forward or "
                    "reverse) plus (1 - alpha) * the data's cross-entropy. The teacher is any HF Llama/Qwen2 "
                    "checkpoint with the shards' tokenizer, run without gradients in bf16 where the hardware has "
                    "it. Same loop, checkpoints, resume and torchrun support as `zhllm pretrain`.")
    add_recipe_options(p, "distillation", example="teacher.path=DIR")
    p.set_defaults(func=_distill)
