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
