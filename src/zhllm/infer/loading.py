"""Loading a checkpoint for inference: the tokenizer check and the stop ids (device and dtype `auto`: zhllm.device)."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..device import resolve_device, resolve_dtype
from ..errors import ZhllmError
from ..tokenizer.special import IM_END


def check_quantize(quantize: str, device: torch.device) -> None:
    from .linear import QUANTIZE
    if quantize not in QUANTIZE:
        raise ZhllmError(f"unknown quantization {quantize!r} (use {', '.join(QUANTIZE)})")
    if quantize == "int8" and device.type != "cpu":
        raise ZhllmError("int8 decoding runs on the CPU; on a GPU use bfloat16 (memory bandwidth is not the limit)")


def load_checkpoint(path: str | Path, device: str | torch.device = "auto",
                    dtype: str | torch.dtype | None = "auto") -> tuple[torch.nn.Module, object, list[int]]:
    """(model in eval mode, tokenizer, eos ids of generation_config.json) from a checkpoint directory,
    checked to fit together."""
    from ..model.io import TOKENIZER_FILES, load_model
    from ..pointers import resolve_model_dir
    from ..tokenizer.load import load_tokenizer

    path = resolve_model_dir(path)  # a run's checkpoints/latest: once, so every file comes from one step
    dev = resolve_device(device)
    model = load_model(path, device=dev, dtype=resolve_dtype(dtype, dev))
    if not any((Path(path) / f).is_file() for f in TOKENIZER_FILES):
        raise ZhllmError(f"{path} has no tokenizer files (tokenizer.json, tokenizer_config.json, ...); "
                         "a checkpoint for generation needs its tokenizer")
    tokenizer = load_tokenizer(path)
    check_vocab(model, tokenizer)
    return model, tokenizer, generation_config_eos(Path(path))


def check_vocab(model, tokenizer) -> None:
    vocab = model_limits(model)[0]
    if len(tokenizer) > vocab:
        raise ZhllmError(f"the tokenizer has {len(tokenizer)} tokens but the model's vocabulary has only "
                         f"{vocab}; they do not belong together")


def model_limits(model) -> tuple[int, int]:
    """(vocabulary size, context length) from a zhllm ModelConfig or a transformers config."""
    cfg = getattr(model, "config", None)
    vocab = getattr(cfg, "vocab_size", None)
    ctx = getattr(cfg, "max_seq_len", None) or getattr(cfg, "max_position_embeddings", None)
    if not isinstance(vocab, int) or not isinstance(ctx, int):
        raise ZhllmError(f"{type(model).__name__} has no config with vocab_size and max_seq_len "
                         "(or max_position_embeddings); the engine needs both")
    return vocab, ctx


def generation_config_eos(path: Path) -> list[int]:
    f = path / "generation_config.json"
    try:
        eos = json.loads(f.read_text(encoding="utf-8")).get("eos_token_id") if f.is_file() else None
    except (json.JSONDecodeError, AttributeError):
        raise ZhllmError(f"{f}: invalid JSON") from None
    eos = [eos] if isinstance(eos, int) else (eos or [])
    return [i for i in eos if isinstance(i, int)]


def stop_ids_for(tokenizer, extra: list[int] | tuple[int, ...] = ()) -> list[int]:
    """The tokenizer's EOS, ChatML's end of turn, and `extra` (the eos list of generation_config.json)."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    im_end = tokenizer.convert_tokens_to_ids(IM_END)
    if isinstance(im_end, int) and im_end != tokenizer.unk_token_id:
        ids.append(im_end)
    ids += list(extra)
    return list(dict.fromkeys(ids))
