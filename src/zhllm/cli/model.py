"""`zhllm model init|info|resize`: parsers only; the work is in zhllm.model.init (see cli/__init__.py)."""
from . import add_overwrite_flag


def register(root, groups) -> None:
    model = groups["model"]

    p = model.add_parser("init", help="write a randomly initialised HF-native checkpoint",
                         description="Create a new model directory (config.json, model.safetensors, "
                                     "generation_config.json, tokenizer files) with random weights. The vocabulary "
                                     "size is the tokenizer's size rounded up to a multiple of 64 unless "
                                     "--set vocab_size=N is given.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--preset", help="model preset: tiny, 26m, 100m, 0.5b, 1.4b")
    src.add_argument("--config", metavar="FILE", help="model config YAML (same keys as the presets)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a model config field, e.g. --set n_layers=4 (repeatable)")
    p.add_argument("--tokenizer", required=True, metavar="TOKDIR", help="tokenizer directory to copy in")
    p.add_argument("--out", required=True, metavar="DIR", help="output checkpoint directory (new or empty)")
    add_overwrite_flag(p)
    p.add_argument("--seed", type=int, default=0, help="weight initialisation seed (default 0)")
    p.set_defaults(func=lambda a: _init(a))

    p = model.add_parser("info", help="summarise a checkpoint directory",
                         description="Print architecture, parameter count, shape, vocabulary and tokenizer of a "
                                     "checkpoint directory (any HF Llama/Qwen2 directory).")
    p.add_argument("dir", help="checkpoint directory")
    p.set_defaults(func=lambda a: print(_model_init().model_info(a.dir)))


    p = model.add_parser("resize", help="grow a checkpoint's embeddings to an extended tokenizer",
                         description="Add embedding (and untied output) rows for the tokens a new tokenizer adds "
                                     "to the model's own (see `zhllm tokenizer extend`); each new row starts as the "
                                     "mean of the old rows of the pieces its text encoded to before.")
    p.add_argument("dir", help="checkpoint directory")
    p.add_argument("--tokenizer", required=True, metavar="TOKDIR", help="the extended tokenizer")
    p.add_argument("--old-tokenizer", metavar="TOKDIR", help="the tokenizer the model was trained with "
                   "(default: the one inside DIR)")
    p.add_argument("--out", required=True, metavar="DIR", help="output checkpoint directory")
    add_overwrite_flag(p)
    p.set_defaults(func=lambda a: print(_resize(a)))


def _resize(a):
    from ..model.resize import resize_embeddings
    return resize_embeddings(a.dir, a.tokenizer, a.out, old_tokenizer_dir=a.old_tokenizer, overwrite=a.overwrite)


def _model_init():
    from ..model import init  # deferred: `zhllm --help` should not import torch
    return init


def _init(a) -> None:
    _model_init().init_model(a.out, a.tokenizer, preset=a.preset, config_file=a.config, sets=a.set, seed=a.seed,
                             overwrite=a.overwrite)
