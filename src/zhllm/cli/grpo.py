"""Parser for `zhllm grpo` (reinforcement learning with group-relative advantages); see cli/__init__.py."""
from __future__ import annotations

from . import add_recipe_options


def _grpo(args) -> None:
    from ..train.grpo import run_grpo

    summary = run_grpo(args.config, args.set, resume=args.resume)
    print(f"grpo finished at step {summary['step']}/{summary['max_steps']}")


def register(root, groups) -> None:
    p = root.add_parser(
        "grpo", help="GRPO: reinforcement learning of a chat model from rule or function rewards",
        description="Sample several completions per prompt with the current policy, score them with rule rewards "
                    "(exact answer, numeric answer, format, length penalty), a reward model (`zhllm rm`) or your "
                    "own module:function, summed with weights, and "
                    "train on group-normalised advantages with a clipped objective and an optional KL to the "
                    "starting model (a frozen copy, or the LoRA base with adapters off). Same loop, checkpoints, "
                    "exact resume and metrics as `zhllm sft` and `zhllm dpo train`.")
    add_recipe_options(p, "GRPO", example="model.init_from=DIR")
    p.set_defaults(func=_grpo)
