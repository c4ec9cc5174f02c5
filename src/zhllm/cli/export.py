"""`zhllm export gguf`: parser only; the work is in zhllm.export.gguf (see cli/__init__.py)."""
from __future__ import annotations

from ..export import GGUF_TYPES


def register(root, groups) -> None:
    p = groups["export"].add_parser(
        "gguf", help="write a checkpoint as one GGUF file (llama.cpp, Ollama, LM Studio)",
        description="Convert an HF Llama/Qwen2 checkpoint directory (zhllm's or any other) with its byte-level "
                    "BPE tokenizer and chat template into one GGUF file. Needs the gguf package: "
                    "pip install 'zhllm[gguf]'.")
    p.add_argument("dir", metavar="MODEL_DIR", help="checkpoint directory (a LoRA adapter must be merged first)")
    p.add_argument("--out", required=True, metavar="FILE", help="the GGUF file to write, e.g. model.gguf")
    p.add_argument("--type", default="f16", choices=GGUF_TYPES,
                   help="storage of the weight matrices (norms and biases stay f32): f32, f16 (default), bf16, "
                        "or q8_0 (8-bit blocks, about half the size of f16)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing GGUF file at --out")
    p.set_defaults(func=_gguf)


def _gguf(a) -> None:
    from ..export.gguf import export_gguf  # deferred: `zhllm --help` should not import torch
    print(export_gguf(a.dir, a.out, type=a.type, overwrite=a.overwrite).summary())
