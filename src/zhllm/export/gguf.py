"""`zhllm export gguf`: an HF Llama/Qwen2 checkpoint as one GGUF file for llama.cpp, Ollama and LM Studio.

Tensors get llama.cpp's names (token_embd, blk.N.attn_q, ..., output_norm, output; tied embeddings write no
output tensor, llama.cpp reuses token_embd), hyper-parameters its per-architecture keys, and the tokenizer
comes from gguf_vocab. One layout difference needs care: HF's Llama applies RoPE to the two halves of each
head (rotate_half), llama.cpp's "llama" architecture to adjacent pairs, so the q/k rows of every head are
interleaved here (half i, element j -> row 2j+i). llama.cpp runs Qwen2 in the half-split (NEOX) layout
already, so Qwen2 needs no such reordering. The `gguf` package is optional (extra `gguf`).

Weights are converted one tensor at a time and streamed to a staging file renamed over `--out` at the end,
so the file appears complete or not at all.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import ZhllmError
from ..fsutil import atomic_file
from ..model.config import ModelConfig
from ..model.io import IGNORED_KEYS, read_model_config, read_state_dict
from ..pointers import resolve_model_dir
from . import GGUF_TYPES
from .gguf_vocab import GGUFVocab, read_vocab

GGUF_MAGIC = b"GGUF"
# per-layer HF module -> llama.cpp tensor name
LAYER_NAMES = {
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}


@dataclass
class ExportResult:
    path: Path
    arch: str
    type: str
    tensors: int
    bytes: int

    def summary(self) -> str:
        return (f"wrote {self.path}: {self.arch}, {self.type}, {self.tensors} tensors, "
                f"{self.bytes / 1e6:.1f} MB")


def export_gguf(model_dir: str | Path, out: str | Path, type: str = "f16", overwrite: bool = False) -> ExportResult:
    """Write the checkpoint in `model_dir` to the GGUF file `out` with 2-D weights stored as `type`.

    Norms and biases stay f32 whatever `type` (llama.cpp's own convention); with q8_0 a matrix whose rows are
    not a multiple of the 32-value block is stored as f16."""
    gguf = _import_gguf()
    if type not in GGUF_TYPES:
        raise ZhllmError(f"unknown GGUF type {type!r}; choose one of {', '.join(GGUF_TYPES)}")
    model_dir = _check_model_dir(model_dir)
    out = _check_out_file(Path(out).expanduser(), model_dir, overwrite)
    cfg = read_model_config(model_dir)
    _check_expressible(cfg, model_dir)
    vocab = read_vocab(model_dir, cfg.vocab_size)
    tensors = gguf_tensors(cfg, read_state_dict(model_dir), model_dir)

    plan = [(name, t, _storage_type(gguf, t, type)) for name, t in tensors]
    total = 0
    with atomic_file(out) as tmp:
        writer = gguf.GGUFWriter(str(tmp), arch=cfg.arch)
        try:
            _add_hyper_parameters(writer, gguf, cfg, type, model_dir.resolve().name)
            _add_vocab(writer, vocab)
            for name, t, qtype in plan:
                shape, dtype, nbytes = _stored_layout(gguf, t, qtype)
                writer.add_tensor_info(name, shape, dtype, nbytes, raw_dtype=qtype)
                total += nbytes
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            for name, t, qtype in plan:
                writer.write_tensor_data(_convert(gguf, t, qtype))
        finally:
            writer.close()
    return ExportResult(out, cfg.arch, type, len(plan), total)


def _import_gguf():
    try:
        import gguf
    except ImportError:
        raise ZhllmError("GGUF export needs the gguf package: pip install 'zhllm[gguf]'") from None
    return gguf


def _check_model_dir(model_dir: str | Path) -> Path:
    path = resolve_model_dir(model_dir)
    if path.is_dir() and (path / "adapter_config.json").is_file() and not (path / "config.json").is_file():
        raise ZhllmError(f"{path} is a LoRA adapter, not a whole model, and GGUF holds whole models; merge it "
                         f"first: zhllm lora merge --base BASE --adapter {path} --out merged, then export merged")
    return path


def _check_out_file(out: Path, model_dir: Path, overwrite: bool) -> Path:
    """The output policy for one file: never a directory, never inside the checkpoint read from, and an
    existing file is replaced only with --overwrite and only when it is a GGUF file (nothing else is ours)."""
    if out.is_dir():
        raise ZhllmError(f"--out {out} is a directory; give a file name, e.g. --out {out / 'model.gguf'}")
    if model_dir.is_dir() and out.resolve().is_relative_to(model_dir.resolve()):
        raise ZhllmError(f"--out {out} lies inside the model directory {model_dir}; write the GGUF file elsewhere")
    if out.exists():
        if not overwrite:
            raise ZhllmError(f"--out {out} exists; pass --overwrite to replace it, or choose another --out")
        with open(out, "rb") as fh:
            if fh.read(4) != GGUF_MAGIC:
                raise ZhllmError(f"--out {out} exists and is not a GGUF file; zhllm does not replace it "
                                 "(not even with --overwrite)")
    return out


def _check_expressible(cfg: ModelConfig, model_dir: Path) -> None:
    if cfg.moe is not None:
        raise ZhllmError(f"{model_dir}: mixture-of-experts models are not exported to GGUF yet; llama.cpp reads the "
                         "checkpoint as it is with its own convert_hf_to_gguf.py (Qwen2MoeForCausalLM)")
    rs = cfg.rope_scaling
    if rs is not None and rs.type != "linear":
        raise ZhllmError(f"{model_dir}: {rs.type} rope scaling is not exported to GGUF (only linear is); "
                         "llama.cpp would compute different positions")


def gguf_tensors(cfg: ModelConfig, state: dict[str, torch.Tensor], source: Path) -> list[tuple[str, torch.Tensor]]:
    """The checkpoint's tensors under llama.cpp's names, q/k rows in llama.cpp's RoPE order, checked against
    config.json (a leftover LoRA weight or a wrong shape is an error here, not a broken file later)."""
    state = {k: v for k, v in state.items() if not k.endswith(IGNORED_KEYS)}
    lora = sorted(k for k in state if "lora_" in k)
    if lora:
        raise ZhllmError(f"{source}: holds unmerged LoRA weights ({lora[0]}, ...); merge them first with "
                         "`zhllm lora merge` and export the merged directory")
    if cfg.tie_embeddings:
        state.pop("lm_head.weight", None)
    elif "lm_head.weight" not in state and "model.embed_tokens.weight" in state:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    expected = _expected_shapes(cfg)
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        what = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise ZhllmError(f"{source}: weights do not match config.json ({what})")
    out = []
    for hf_name, shape in expected.items():
        t = state[hf_name]
        if tuple(t.shape) != shape:
            raise ZhllmError(f"{source}: weight {hf_name} has shape {tuple(t.shape)}, config.json implies {shape}")
        if cfg.arch == "llama" and (".q_proj." in hf_name or ".k_proj." in hf_name):
            t = _interleave_rope_halves(t, cfg.head_dim)
        out.append((_gguf_name(hf_name), t))
    return out


def _expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    d, hd, f = cfg.dim, cfg.head_dim, cfg.ffn_dim
    q, kv = cfg.n_heads * hd, cfg.n_kv_heads * hd
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (cfg.vocab_size, d)}
    for i in range(cfg.n_layers):
        p = f"model.layers.{i}."
        layer = {"input_layernorm.weight": (d,), "post_attention_layernorm.weight": (d,),
                 "self_attn.q_proj.weight": (q, d), "self_attn.k_proj.weight": (kv, d),
                 "self_attn.v_proj.weight": (kv, d), "self_attn.o_proj.weight": (d, q),
                 "mlp.gate_proj.weight": (f, d), "mlp.up_proj.weight": (f, d), "mlp.down_proj.weight": (d, f)}
        if cfg.attention_bias:
            layer.update({"self_attn.q_proj.bias": (q,), "self_attn.k_proj.bias": (kv,),
                          "self_attn.v_proj.bias": (kv,)})
            if cfg.arch == "llama":
                layer["self_attn.o_proj.bias"] = (d,)
        if cfg.mlp_bias:
            layer.update({"mlp.gate_proj.bias": (f,), "mlp.up_proj.bias": (f,), "mlp.down_proj.bias": (d,)})
        shapes.update({p + k: v for k, v in layer.items()})
    shapes["model.norm.weight"] = (d,)
    if not cfg.tie_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, d)
    return shapes


def _gguf_name(hf_name: str) -> str:
    if hf_name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf_name == "model.norm.weight":
        return "output_norm.weight"
    if hf_name == "lm_head.weight":
        return "output.weight"
    _, _, layer, rest = hf_name.split(".", 3)  # model.layers.N.<module>.<weight|bias>
    module, kind = rest.rsplit(".", 1)
    return f"blk.{layer}.{LAYER_NAMES[module]}.{kind}"


def _interleave_rope_halves(t: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Rows of each head from [x0..x(h/2-1), y0..y(h/2-1)] (rotate_half pairs xj with yj) to
    [x0, y0, x1, y1, ...] (llama.cpp's normal RoPE pairs adjacent rows)."""
    heads = t.shape[0] // head_dim
    return t.reshape(heads, 2, head_dim // 2, *t.shape[1:]).transpose(1, 2).reshape(t.shape).contiguous()


def _storage_type(gguf, t: torch.Tensor, type: str):
    q = gguf.GGMLQuantizationType
    if t.dim() < 2 or type == "f32":
        return q.F32
    if type == "q8_0":
        block = gguf.GGML_QUANT_SIZES[q.Q8_0][0]
        return q.Q8_0 if t.shape[-1] % block == 0 else q.F16
    return {"f16": q.F16, "bf16": q.BF16}[type]


def _stored_layout(gguf, t: torch.Tensor, qtype):
    """(shape as given to the writer, numpy dtype, bytes) of `t` stored as `qtype`."""
    import numpy as np
    q = gguf.GGMLQuantizationType
    shape = tuple(t.shape)
    if qtype in (q.F32, q.F16):
        dtype = np.dtype(np.float32 if qtype == q.F32 else np.float16)
        return shape, dtype, t.numel() * dtype.itemsize
    byte_shape = gguf.quant_shape_to_byte_shape(shape, qtype)
    n = 1
    for s in byte_shape:
        n *= s
    return byte_shape, np.dtype(np.uint8), n


def _convert(gguf, t: torch.Tensor, qtype):
    q = gguf.GGMLQuantizationType
    t = t.detach().cpu().contiguous()
    if qtype == q.F32:
        return t.float().numpy()
    if qtype == q.F16:
        return t.half().numpy()
    if qtype == q.BF16:  # numpy has no bfloat16: its bytes, two per value
        return t.to(torch.bfloat16).view(torch.uint8).numpy()
    return gguf.quants.quantize(t.float().numpy(), qtype)


def _add_hyper_parameters(writer, gguf, cfg: ModelConfig, type: str, name: str) -> None:
    file_types = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                  "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
    writer.add_name(name)
    writer.add_file_type(int(file_types[type]))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_context_length(cfg.max_seq_len)
    writer.add_embedding_length(cfg.dim)
    writer.add_block_count(cfg.n_layers)
    writer.add_feed_forward_length(cfg.ffn_dim)
    writer.add_head_count(cfg.n_heads)
    writer.add_head_count_kv(cfg.n_kv_heads)
    writer.add_key_length(cfg.head_dim)
    writer.add_value_length(cfg.head_dim)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_layer_norm_rms_eps(cfg.norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    if cfg.rope_scaling is not None:  # linear only (checked before)
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(cfg.rope_scaling.factor)


def _add_vocab(writer, vocab: GGUFVocab) -> None:
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    writer.add_token_merges(vocab.merges)
    adders = {"bos": writer.add_bos_token_id, "eos": writer.add_eos_token_id, "pad": writer.add_pad_token_id,
              "unk": writer.add_unk_token_id, "eot": writer.add_eot_token_id}
    for key, token_id in vocab.special_ids.items():
        adders[key](token_id)
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(False)
    if vocab.chat_template:
        writer.add_chat_template(vocab.chat_template)
