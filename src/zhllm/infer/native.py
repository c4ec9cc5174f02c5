"""The native int8 decode step (`csrc/decode_int8.cpp`), compiled on first use with PyTorch's extension builder.

At batch 1 a decode step is 33 small products plus about 25 small ops per layer between them. As separate
PyTorch calls those ops cost more than the products; in one C++ function they almost vanish, and int8
decoding at batch 1 runs about 1.5-2x faster. The build needs a C++ compiler and ninja, takes about 40 s once
and is cached by PyTorch (~/.cache/torch_extensions, or TORCH_EXTENSIONS_DIR). Without them, or with
ZHLLM_NATIVE_DECODE=0, decoding uses the PyTorch step: same results to bf16 rounding, slower.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

DISABLE_ENV = "ZHLLM_NATIVE_DECODE"
_SOURCE = Path(__file__).with_name("csrc") / "decode_int8.cpp"
_FLAGS = ["-O3", "-march=native", "-fopenmp-simd", "-ffast-math", "-fno-finite-math-only"]
_VERSION = 1  # bump when csrc/decode_int8.cpp changes
_module: object | None = None
_tried = False


def native_decode():
    """The compiled module (`decode_step`), or None where it cannot be built (said once on stderr)."""
    global _module, _tried
    if os.environ.get(DISABLE_ENV, "1") == "0":
        return None
    if _tried:
        return _module
    _tried = True
    try:
        from torch.utils.cpp_extension import load
        if not _built():
            print("zhllm: compiling the native int8 decode step (once, about 40 s)", file=sys.stderr, flush=True)
        _module = load(name=_name(), sources=[str(_SOURCE)], extra_cflags=_FLAGS, verbose=False)
    except Exception as e:  # no compiler, no ninja, no headers: the PyTorch step still works
        reason = str(e).strip().splitlines()[-1][:200] if str(e).strip() else type(e).__name__
        print(f"zhllm: native int8 decode step unavailable ({reason}); using the PyTorch step",
              file=sys.stderr, flush=True)
        _module = None
    return _module


def _name() -> str:
    """Built with -march=native: the name carries the CPU's vector level, so a cache shared by different
    machines (a network home directory) never hands one CPU another's instructions."""
    import torch
    return f"zhllm_decode_int8_v{_VERSION}_{torch.backends.cpu.get_cpu_capability().lower()}"


def _built() -> bool:
    """Whether PyTorch's extension cache already holds the compiled step (so loading it is quick)."""
    try:
        from torch.utils.cpp_extension import _get_build_directory
        return (Path(_get_build_directory(_name(), verbose=False)) / f"{_name()}.so").is_file()
    except Exception:  # a private helper: if it moves, say nothing rather than something wrong
        return True
