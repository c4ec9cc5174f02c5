"""`zhllm pretrain`: the causal-LM stage = CausalLM objective + packed token shards + a pretrain recipe
(configs/pretrain/); train/run.py launches it."""
from __future__ import annotations

from pathlib import Path

import torch

from ..errors import ZhllmError
from .config import RunConfig, model_fields
from .objectives import CausalLM
from .run import Stage, run_stage


def open_token_data(cfg: RunConfig):
    """(train, val or None) PackedTokenDataset over the configured shard directories."""
    try:
        from ..data.shards import PackedTokenDataset
    except ImportError as e:
        raise ZhllmError(f"token shards support is not installed ({e})") from None
    t, paths = cfg.train, [str(p) for p in cfg.data.path]
    for p in paths:
        if not Path(p).is_dir():
            raise ZhllmError(f"data.path {p}: no such shard directory (make one with `zhllm data tokenize`)")
    train = PackedTokenDataset(paths, t.seq_len, split="train", weights=cfg.data.weights, seed=t.seed, shuffle=True)
    try:
        val = PackedTokenDataset(paths, t.seq_len, split="val", weights=cfg.data.weights, seed=t.seed, shuffle=False)
        val = val if len(val) > 0 else None
    except (ZhllmError, ValueError, FileNotFoundError):
        val = None  # shards without a val split: train without periodic eval loss
    return train, val


def build_model(cfg: RunConfig, source: str, vocab_size: int, eos_id: int | None, resume_dir: Path | None):
    """The model to train: the resumed checkpoint's weights, an HF checkpoint (`init_from`), or a fresh preset."""
    from ..model.io import load_model, new_model
    init_from, model_cfg = model_fields(cfg.model, source, vocab_size=vocab_size)
    if resume_dir is not None:
        model = load_model(resume_dir, dtype=torch.float32, train=True)
    elif init_from is not None:
        model = load_model(init_from, dtype=torch.float32, train=True)
        if model.config.vocab_size < vocab_size:
            raise ZhllmError(f"model.init_from {init_from}: the model's vocabulary ({model.config.vocab_size}) is "
                             f"smaller than the shards' tokenizer ({vocab_size}); extend the model or re-tokenise")
    else:
        if model_cfg.eos_token_id is None:
            model_cfg.eos_token_id = eos_id
            model_cfg.pad_token_id = eos_id
        model = new_model(model_cfg, seed=cfg.train.seed).train()
    return model


PRETRAIN = Stage(
    name="pretrain", config=RunConfig, objective=lambda run, model: CausalLM(),
    open_data=lambda run: open_token_data(run.cfg),
    build_model=lambda run, train: build_model(run.cfg, run.source, train.vocab_size,
                                               getattr(train, "eos_id", None), run.resume_dir))


def run_pretrain(config: str | Path, overrides: list[str] | None = None, resume: str | None = None) -> dict:
    """Train from a recipe; returns the run summary. Works the same under torchrun (any world size)."""
    return run_stage(PRETRAIN, config, overrides, resume)
