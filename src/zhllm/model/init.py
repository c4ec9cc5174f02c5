"""`zhllm model init` and `zhllm model info`: a new random checkpoint from a preset, and a summary of one.

Vocabulary size: the tokenizer decides, not the preset. A preset's `vocab_size` describes the tokenizer it was
designed with; the model gets `len(tokenizer)` rounded up to a multiple of 64 (matmul-friendly shapes, and
spare rows for tokens added later by `zhllm tokenizer extend`). An explicit `--set vocab_size=N` wins, but
must hold the whole tokenizer.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..config import apply_overrides
from ..errors import ConfigError
from .config import ModelConfig, model_config_from

VOCAB_MULTIPLE = 64
INIT_COMMAND = "model init"


def round_up(n: int, multiple: int = VOCAB_MULTIPLE) -> int:
    return -(-n // multiple) * multiple


def init_config(preset: str | None, config_file: str | None, sets: list[str] | None, tokenizer) -> ModelConfig:
    """The model config for a new checkpoint: preset or YAML file, `--set` overrides, vocab from `tokenizer`."""
    if bool(preset) == bool(config_file):
        raise ConfigError("give exactly one of --preset NAME or --config FILE")
    if config_file and not Path(config_file).is_file():
        raise ConfigError(f"config file not found: {config_file}")
    overrides = apply_overrides({}, sets)
    n_tokens = len(tokenizer)
    if "vocab_size" in overrides:
        if not isinstance(overrides["vocab_size"], int) or overrides["vocab_size"] < n_tokens:
            raise ConfigError(f"vocab_size={overrides['vocab_size']!r} cannot hold the tokenizer's {n_tokens} tokens")
    else:
        overrides["vocab_size"] = round_up(n_tokens)
    for key, token_id in (("eos_token_id", tokenizer.eos_token_id), ("pad_token_id", tokenizer.pad_token_id),
                          ("bos_token_id", tokenizer.bos_token_id)):
        overrides.setdefault(key, token_id)
    return model_config_from(preset or config_file, overrides)


def init_model(out_dir: str | Path, tokenizer_dir: str | Path, preset: str | None = None,
               config_file: str | None = None, sets: list[str] | None = None, seed: int = 0,
               overwrite: bool = False) -> Path:
    """Write a randomly initialised HF-native checkpoint (weights, config, tokenizer) to `out_dir`."""
    from ..outputs import check_output_dir
    from ..tokenizer.load import load_tokenizer
    from .io import new_model, save_model

    out = Path(out_dir)
    check_output_dir(out, INIT_COMMAND, inputs=[tokenizer_dir, config_file], overwrite=overwrite)
    tokenizer = load_tokenizer(tokenizer_dir)
    cfg = init_config(preset, config_file, sets, tokenizer)
    save_model(new_model(cfg, seed=seed), out, tokenizer=tokenizer_dir, command=INIT_COMMAND)
    print(f"wrote {out}: {cfg.arch}, {format_count(cfg.num_params())} parameters, vocab {cfg.vocab_size} "
          f"(tokenizer {len(tokenizer)})")
    return out


def format_count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def model_info(path: str | Path) -> str:
    """A human-readable summary of a checkpoint directory (reads config.json and the tokenizer only)."""
    from ..pointers import resolve_model_dir
    from .io import read_model_config

    path = resolve_model_dir(path)  # checkpoints/best of a run: describe the step it names
    cfg = read_model_config(path)
    hf = json.loads((path / "config.json").read_text(encoding="utf-8"))
    lines = [
        f"directory      {path}",
        f"architecture   {hf.get('architectures', ['?'])[0]} ({cfg.arch})",
        f"parameters     {format_count(cfg.num_params())} total, "
        f"{format_count(cfg.num_params(include_embeddings=False))} without embeddings",
        f"shape          dim {cfg.dim}, layers {cfg.n_layers}, heads {cfg.n_heads} (kv {cfg.n_kv_heads}), "
        f"head_dim {cfg.head_dim}, ffn {cfg.ffn_dim}",
        *([f"experts        {m.n_experts} routed (top {m.top_k}, ffn {m.expert_ffn_dim}) + a shared expert "
           f"(ffn {m.shared_expert_ffn_dim}); {format_count(cfg.num_params(active=True))} parameters active per token"
           + (f"; dense layers {m.dense_layers}" if m.dense_layers else "")] if (m := cfg.moe) else []),
        f"vocabulary     {cfg.vocab_size}, tied embeddings: {'yes' if cfg.tie_embeddings else 'no'}",
        f"context        {cfg.max_seq_len} tokens, rope theta {cfg.rope_theta:g}"
        + (f", {cfg.rope_scaling.type} scaling x{cfg.rope_scaling.factor:g}" if cfg.rope_scaling else ""),
        f"dtype          {hf.get('torch_dtype') or hf.get('dtype') or '?'}",
    ]
    lines.append(f"tokenizer      {_tokenizer_summary(path, cfg)}")
    gen = path / "generation_config.json"
    if gen.is_file():
        lines.append(f"stop tokens    {json.loads(gen.read_text(encoding='utf-8')).get('eos_token_id')}")
    return "\n".join(lines)


def _tokenizer_summary(path: Path, cfg: ModelConfig) -> str:
    if not (path / "tokenizer.json").is_file() and not (path / "tokenizer_config.json").is_file():
        return "none in this directory"
    from ..tokenizer.load import load_tokenizer
    from ..tokenizer.special import IM_START
    tok = load_tokenizer(path)
    note = "" if len(tok) <= cfg.vocab_size else f"  (LARGER than the model's vocabulary {cfg.vocab_size}!)"
    template = "ChatML chat template" if IM_START in (tok.chat_template or "") else (
        "chat template" if tok.chat_template else "no chat template")
    return f"{len(tok)} tokens, {template}{note}"
