"""Device and dtype `auto`, for training and inference alike, and moving a batch onto a device.

A leaf module (torch and zhllm.errors only), so train/, eval/ and infer/ all depend on it and not on each
other. Training's `precision: auto` is decided in train/precision.py instead: it measures matmul speed,
because a CPU that reports bf16 support can still train slower in bf16 than in fp32.
"""
from __future__ import annotations

import torch

from .errors import ZhllmError

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """`auto`: CUDA when available, else the CPU; or any torch device string (cpu, cuda, cuda:N)."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ZhllmError(f"unknown device {device!r} (use auto, cpu, cuda, cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ZhllmError(f"device {device!r} requested but CUDA is not available")
    return dev


def pick_device(requested: str, local_rank: int) -> torch.device:
    """A training process's device (`train.device`): on CUDA the GPU of its torchrun local rank."""
    if requested == "cuda" and not torch.cuda.is_available():
        raise ZhllmError("train.device is cuda but no CUDA device is available")
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """Inference dtype. `auto`: bf16 on CUDA, and on CPUs with native bf16 (AVX512-BF16/AMX), where decoding
    streams half the bytes of fp32 through oneDNN (benchmarks/bench_decode.py); fp32 on other CPUs, where bf16
    is emulated."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if cpu_has_bf16() else torch.float32
    if dtype not in DTYPES:
        raise ZhllmError(f"unknown dtype {dtype!r} (use auto, {', '.join(DTYPES)})")
    return DTYPES[dtype]


def cpu_has_bf16() -> bool:
    """The CPU reports native bf16 instructions to oneDNN (it may still multiply bf16 slower than fp32)."""
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def to_device(batch, device: torch.device):
    """A batch is a tensor (packed pretraining windows) or a dict of tensors (SFT rows with masks)."""
    if isinstance(batch, dict):
        return {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    return batch.to(device, non_blocking=True)
