"""`zhllm pretrain`: the causal-LM stage = CausalLM objective + packed token shards + a pretrain recipe."""
from __future__ import annotations

from pathlib import Path

import torch
import yaml

from ..config import to_dict
from ..errors import ConfigError, ZhllmError
from ..fsutil import atomic_write_text
from . import parallel as par
from .config import RunConfig, load_run_config, model_fields, resolve_recipe
from .objectives import STAGES
from .state import checkpoint_dirs, resolve_resume


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
    if cfg.train.seq_len > model.config.max_seq_len:
        raise ConfigError(f"{source}: train.seq_len={cfg.train.seq_len} exceeds the model's max_seq_len="
                          f"{model.config.max_seq_len}")
    return model


def run_pretrain(config: str | Path, overrides: list[str] | None = None, resume: str | None = None,
                 stage: str = "pretrain") -> dict:
    """Train from a recipe; returns the run summary. Works the same under torchrun (any world size)."""
    from .trainer import Trainer
    path = resolve_recipe(config, STAGES[stage].recipes)
    cfg = load_run_config(path, overrides, STAGES[stage].recipes)
    source = str(path)
    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)
    torch.manual_seed(cfg.train.seed)
    ckpt_root = Path(cfg.out_dir) / "checkpoints"
    resume_dir = resolve_resume(resume, ckpt_root)
    if resume is None and checkpoint_dirs(ckpt_root):
        raise ZhllmError(f"{cfg.out_dir} already holds checkpoints; pass --resume auto to continue, "
                         "or choose another out_dir")
    d = par.init_distributed(cfg.train.device)
    try:
        train, val = open_token_data(cfg)
        model = build_model(cfg, source, train.vocab_size, getattr(train, "eos_id", None), resume_dir)
        if d.is_main:
            Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
            atomic_write_text(Path(cfg.out_dir) / "config.yaml",
                              yaml.safe_dump(to_dict(cfg), allow_unicode=True, sort_keys=False))
        trainer = Trainer(cfg, STAGES[stage].objective(), model, train, val,
                          tokenizer_dir=getattr(train, "tokenizer_dir", None), resume_dir=resume_dir, dist=d)
        return trainer.fit()
    finally:
        par.shutdown(d)
