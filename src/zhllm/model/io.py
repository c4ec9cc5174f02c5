"""HF-native checkpoint directories: config.json + model.safetensors + generation_config.json + tokenizer.

A directory saved here loads with `AutoModelForCausalLM.from_pretrained`, and any HF Llama/Qwen2/Qwen2-MoE directory
(single or sharded safetensors, or a legacy `pytorch_model.bin`) loads here. Directories are written under a
temporary name and renamed when complete, so a crash never leaves a half-written checkpoint behind.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from ..errors import ZhllmError
from ..fsutil import atomic_directory
from ..pointers import resolve_model_dir
from ..tokenizer.load import TOKENIZER_FILES
from ..tokenizer.special import IM_END
from .config import ModelConfig
from .moe import split_expert_weights, stack_expert_weights, to_mixtral_names
from .transformer import Transformer, rope_frequencies

IGNORED_KEYS = ("rotary_emb.inv_freq",)


def read_model_config(path: str | Path) -> ModelConfig:
    path = resolve_model_dir(path)
    if not path.is_dir():
        raise ZhllmError(f"model directory not found: {path}")
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise ZhllmError(f"{path} is not a model directory (no config.json)")
    try:
        data = json.loads(cfg_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ZhllmError(f"{cfg_file}: invalid JSON ({e})") from None
    try:
        return ModelConfig.from_hf_dict(data, str(cfg_file))
    except KeyError as e:
        raise ZhllmError(f"{cfg_file}: missing key {e}") from None


def _weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [path / s for s in shards]
    for pattern in ("model.safetensors", "model-*.safetensors", "pytorch_model.bin"):
        found = sorted(path.glob(pattern))
        if found:
            return found
    raise ZhllmError(f"{path}: no weights found (expected model.safetensors, a sharded index or pytorch_model.bin)")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A checkpoint's tensors by name, MoE experts stacked as the model holds them (moe.py)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for f in _weight_files(resolve_model_dir(path)):
        try:
            part = (load_file(str(f)) if f.suffix == ".safetensors"
                    else torch.load(f, map_location="cpu", weights_only=True))
        except (SafetensorError, OSError, RuntimeError, EOFError) as e:
            raise ZhllmError(f"{f}: cannot read weights ({str(e).splitlines()[0]}); "
                             "the file is corrupted or incomplete") from None
        state.update(part)
    try:
        return stack_expert_weights(state)
    except ValueError as e:
        raise ZhllmError(f"{path}: {e}") from None


def load_model(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
               train: bool = False) -> Transformer:
    """Load any HF Llama/Qwen2 directory as a zhllm Transformer (eval mode unless `train`)."""
    path = resolve_model_dir(path)  # once: config and weights from the same checkpoint
    cfg = read_model_config(path)
    state = read_state_dict(path)
    state = {k: v for k, v in state.items() if not k.endswith(IGNORED_KEYS)}
    if cfg.tie_embeddings:
        state.pop("lm_head.weight", None)
    elif "lm_head.weight" not in state and "model.embed_tokens.weight" in state:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]  # untied config but one saved matrix
    with torch.device("meta"):
        model = Transformer(cfg)
    expected = {k for k in model.state_dict() if not (cfg.tie_embeddings and k == "lm_head.weight")}
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        what = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise ZhllmError(f"{path}: weights do not match config.json ({what})")
    for k, v in state.items():
        want = model.get_parameter(k).shape
        if tuple(v.shape) != tuple(want):
            raise ZhllmError(f"{path}: weight {k} has shape {tuple(v.shape)}, config.json implies {tuple(want)}")
    target = dtype or state["model.embed_tokens.weight"].dtype
    state = {k: v.to(device=device, dtype=target) for k, v in state.items()}
    return model_from_state_dict(cfg, state, model).train(train)


def model_from_state_dict(cfg: ModelConfig, state: dict[str, torch.Tensor],
                          model: Transformer | None = None) -> Transformer:
    """A Transformer that uses `state`'s tensors as its weights (no copy, no random init): built on the meta
    device (or `model`, an empty module holding one or more Transformers: PPO's policy and value), filled with
    assign, embeddings re-tied and the RoPE buffer rebuilt on the weights' device."""
    if model is None:
        with torch.device("meta"):
            model = Transformer(cfg)
    model.load_state_dict(state, strict=False, assign=True)
    for m in model.modules():
        if isinstance(m, Transformer):
            if m.config.tie_embeddings and m.lm_head is not None:  # a reward model has no vocabulary head
                m.lm_head.weight = m.model.embed_tokens.weight
            m.inv_freq = rope_frequencies(m.config)[0].to(m.model.embed_tokens.weight.device)
    return model


def new_model(cfg: ModelConfig, seed: int = 0, device: str | torch.device = "cpu") -> Transformer:
    return Transformer(cfg).to(device).init_weights(seed)


def save_model(model: Transformer, out_dir: str | Path, tokenizer=None, extra_files: dict[str, bytes] | None = None,
               dtype: torch.dtype | None = None, command: str | None = None) -> Path:
    """Write an HF-native checkpoint directory atomically.

    tokenizer: a transformers tokenizer (saved with save_pretrained) or a directory whose tokenizer files
    are copied. extra_files: name -> bytes written alongside (e.g. trainer state). command: the zhllm command
    whose output this is, recorded in the fsutil.MARKER file (callers check the directory first, see outputs.py).
    """
    from safetensors.torch import save_file

    cfg = model.config
    state = {k: v.detach().to("cpu", dtype=dtype or v.dtype).contiguous()
             for k, v in model.state_dict().items()}
    if cfg.tie_embeddings:
        state.pop("lm_head.weight", None)  # safetensors stores no aliases; transformers re-ties on load
    state = split_expert_weights(state)
    if cfg.arch == "mixtral":
        state = to_mixtral_names(state)
    hf = {**cfg.to_hf_dict(), **getattr(model, "hf_config_extra", {})}  # e.g. a reward model's head
    hf["torch_dtype"] = str(state["model.embed_tokens.weight"].dtype).replace("torch.", "")
    with atomic_directory(out_dir, marker=command) as tmp:
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(hf, indent=2, ensure_ascii=False) + "\n")
        gen = {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, "pad_token_id": cfg.pad_token_id}
        if tokenizer is not None:
            copy_tokenizer(tokenizer, tmp)
            gen.update(_generation_ids(tmp, cfg))
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        for name, data in (extra_files or {}).items():
            (tmp / name).write_bytes(data)
    return Path(out_dir)


def copy_tokenizer(tokenizer, dest: Path) -> None:
    if isinstance(tokenizer, (str, Path)):
        src = resolve_model_dir(tokenizer)
        found = [src / f for f in TOKENIZER_FILES if (src / f).is_file()]
        if not found:
            raise ZhllmError(f"{src}: no tokenizer files found")
        for f in found:
            shutil.copyfile(f, dest / f.name)
    else:
        tokenizer.save_pretrained(str(dest))


def _token_ids(tok_dir: Path) -> tuple[dict, dict] | None:
    """(added tokens, vocab) as token -> id maps, read from tokenizer.json without loading transformers (which
    costs over a second per checkpoint); None when the directory has no tokenizer.json."""
    f = tok_dir / "tokenizer.json"
    if not f.is_file():
        return None
    data = json.loads(f.read_text(encoding="utf-8"))
    ids = {t["content"]: t["id"] for t in data.get("added_tokens", [])}
    vocab = data.get("model", {}).get("vocab")
    return ids, (vocab if isinstance(vocab, dict) else {})


def _generation_ids(tok_dir: Path, cfg: ModelConfig) -> dict:
    """eos = the tokenizer's eos plus ChatML's <|im_end|>, so chat generation stops at end of turn."""
    found = _token_ids(tok_dir)
    tcfg_file = tok_dir / "tokenizer_config.json"
    if found is None or not tcfg_file.is_file():
        from ..tokenizer.load import load_tokenizer
        tok = load_tokenizer(tok_dir)
        names = {"eos": tok.eos_token, "pad": tok.pad_token, "bos": tok.bos_token}
        lookup = lambda t: (None if t is None or tok.convert_tokens_to_ids(t) == tok.unk_token_id  # noqa: E731
                            else tok.convert_tokens_to_ids(t))
    else:
        added, vocab = found
        tcfg = json.loads(tcfg_file.read_text(encoding="utf-8"))
        token = lambda v: v.get("content") if isinstance(v, dict) else v  # noqa: E731
        names = {k: token(tcfg.get(f"{k}_token")) for k in ("eos", "pad", "bos")}
        lookup = lambda t: added.get(t, vocab.get(t)) if t else None  # noqa: E731
    eos = []
    for t in (names["eos"], IM_END):
        i = lookup(t)
        if i is not None and i not in eos:
            eos.append(i)
    out = {"eos_token_id": eos[0] if len(eos) == 1 else (eos or cfg.eos_token_id)}
    for k in ("pad", "bos"):
        i = lookup(names[k])
        if i is not None:
            out[f"{k}_token_id"] = i
    return out
