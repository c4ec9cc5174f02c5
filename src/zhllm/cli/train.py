"""Parsers for training commands (`zhllm pretrain`, `zhllm plot`); see cli/__init__.py."""
from __future__ import annotations

import argparse

from . import add_recipe_options


def _pretrain(args: argparse.Namespace) -> int:
    from ..train.pretrain import run_pretrain
    run_pretrain(args.config, args.set, args.resume)
    return 0


def _plot(args: argparse.Namespace) -> int:
    from ..train.metrics import plot_run
    for path in plot_run(args.run_dir):
        print(path)
    return 0


def register(root, groups) -> None:
    p = root.add_parser("pretrain", help="pretrain a causal language model on token shards",
                        description="Pretrain (or continue pretraining) a model on token shards. Launch with "
                                    "torchrun for DDP/FSDP; the same command resumes with --resume auto.")
    add_recipe_options(p, "pretraining", names="tiny, 26m, 1.4b", example="train.lr=1e-3")
    p.set_defaults(func=_pretrain)
    p = root.add_parser("plot", help="write PNG plots (loss, lr, throughput) of a run directory",
                        description="Write plots/loss.png, plots/lr.png and plots/throughput.png from metrics.jsonl.")
    p.add_argument("run_dir", help="a run directory (the out_dir of a training run)")
    p.set_defaults(func=_plot)
