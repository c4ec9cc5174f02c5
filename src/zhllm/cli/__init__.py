"""`zhllm <command>`: parse arguments, call one library function. No logic lives here (ARCHITECTURE rule 3).

Each area registers its commands from its own module (`cli/model.py`, `cli/data.py`, ...), so the parser
for a command sits next to nothing but other parsers.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

from ..errors import ZhllmError

# Modules that register commands; each has `register(root, groups)`.
COMMAND_MODULES = ["model", "infer", "data", "shards", "tokenizer", "train", "sft", "pipeline", "dpo", "eval", "serve",
                   "export", "grpo", "rm", "distill", "ppo"]
GROUPS = {
    "model": "create, inspect and convert model checkpoints",
    "data": "clean corpora, pre-tokenise them into shards, inspect shards",
    "tokenizer": "train, extend and evaluate tokenizers",
    "dpo": "preference optimisation: train on preference pairs, make rejected answers with a model",
    "rm": "reward models: train one on preference pairs, score records with it",
    "export": "convert a checkpoint for other runtimes: GGUF for llama.cpp, Ollama, LM Studio",
}


def add_progress_flag(p: argparse.ArgumentParser) -> None:
    """--no-progress, the one name for hiding progress output; --quiet stays as a hidden alias for old scripts."""
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar (or progress lines)")
    p.add_argument("--quiet", dest="no_progress", action="store_true", help=argparse.SUPPRESS)


def add_overwrite_flag(p: argparse.ArgumentParser) -> None:
    """--overwrite, the same on every command that writes a directory (the policy is in zhllm/outputs.py)."""
    p.add_argument("--overwrite", action="store_true",
                   help="replace an output directory written by another zhllm command (a directory zhllm did "
                        "not write is never replaced)")


def add_recipe_options(p: argparse.ArgumentParser, what: str, names: str = "tiny, 26m",
                       example: str = "model.init_from=DIR", dest_prefix: str = "") -> None:
    """--config RECIPE, --set KEY=VALUE (repeatable), --resume auto|PATH: the options of every training command.
    dest_prefix: a command group that also trains without its subcommand (`zhllm dpo --config`) keeps them apart."""
    p.add_argument("--config", dest=f"{dest_prefix}config", required=not dest_prefix, metavar="RECIPE",
                   help=f"{what} recipe YAML, or a packaged name: {names}")
    p.add_argument("--set", dest=f"{dest_prefix}set", action="append", default=[], metavar="KEY=VALUE",
                   help=f"override a config value, e.g. --set {example} (repeatable)")
    p.add_argument("--resume", dest=f"{dest_prefix}resume", metavar="auto|PATH",
                   help="continue from the newest complete checkpoint of out_dir (auto) or a checkpoint directory")


def train_without_subcommand(root, groups, name: str, what: str, subcommands: str, train) -> None:
    """`zhllm NAME --config ...` runs `train` as `zhllm NAME train --config ...` does: the group takes the
    recipe options itself and its subcommand becomes optional."""
    group = root.choices[name]
    groups[name].required = False
    add_recipe_options(group, what, dest_prefix="group_")

    def run(args) -> None:
        if args.group_config is None:
            raise ZhllmError(f"zhllm {name}: name a subcommand ({subcommands}) or give --config RECIPE; see --help")
        args.config, args.set, args.resume = args.group_config, args.group_set, args.group_resume
        train(args)

    group.set_defaults(func=run)


def build_parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="zhllm", description="Train small Chinese language models end to end.")
    root.add_argument("--version", action="version", version=f"zhllm {_version()}")
    sub = root.add_subparsers(dest="command", metavar="COMMAND", required=True)
    groups = {}
    for name, help_text in GROUPS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        groups[name] = p.add_subparsers(dest="subcommand", metavar="SUBCOMMAND", required=True)
    for mod in COMMAND_MODULES:
        importlib.import_module(f"{__name__}.{mod}").register(sub, groups)
    return root


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("zhllm")
    except PackageNotFoundError:
        return "dev"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = args.func(args)
    except ZhllmError as e:
        print(f"zhllm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("zhllm: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `zhllm ... | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
