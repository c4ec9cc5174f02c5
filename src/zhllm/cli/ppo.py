"""Parser for `zhllm ppo` (PPO with a learned value model); see cli/__init__.py."""
from __future__ import annotations

from . import add_recipe_options


def _ppo(args) -> None:
    from ..train.ppo import run_ppo

    summary = run_ppo(args.config, args.set, resume=args.resume)
    print(f"ppo finished at step {summary['step']}/{summary['max_steps']}")


def register(root, groups) -> None:
    p = root.add_parser(
        "ppo", help="PPO: reinforcement learning of a chat model with a learned value model",
        description="Sample completions with the current policy, score them with rule, reward-model or function "
                    "rewards, add a per-token KL penalty to a frozen copy of the starting model (fixed or adaptive "
                    "coefficient), estimate advantages with GAE against a value model (a copy of the policy's "
                    "backbone or a reward model, with a scalar head) and train both with clipped policy and value "
                    "losses over ppo_epochs passes. Same loop, checkpoints, exact resume and metrics as `zhllm "
                    "grpo`; the value model is saved under value/ in each checkpoint.")
    add_recipe_options(p, "PPO", example="model.init_from=DIR")
    p.set_defaults(func=_ppo)
