"""`train.precision: auto`: the faster training precision for this device, decided once per run.

On a GPU: bf16 where the device supports it, else fp16. On a CPU it depends on the chip. With AMX a bf16
matmul is several times faster than fp32, but a CPU without bf16 units (most laptops, and virtual machines
that hide AMX) multiplies bf16 slower than fp32: 150 against 255 GFLOP/s on an AVX512-BF16 VM here, where
fp32 trained the 26m preset 1.4x faster than bf16. So `auto` measures both matmul peaks (about a second,
once per process) and picks bf16 only where it is at least as fast. In a distributed run rank 0 decides for
all ranks; a resumed run keeps the precision it started with, so resuming on another machine stays exact.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from .metrics import cpu_matmul_peak
from .parallel import Dist, all_reduce_sum

PRECISIONS = ("fp32", "bf16", "fp16")  # position + 1 is the code rank 0 broadcasts


def auto_precision(device: torch.device) -> tuple[str, str]:
    """(precision, why) for `auto` on this device."""
    if device.type == "cuda":
        return ("bf16", "CUDA with bf16") if torch.cuda.is_bf16_supported() else ("fp16", "CUDA without bf16")
    if device.type != "cpu":
        return "fp32", f"device {device.type}"
    bf16, fp32 = cpu_matmul_peak(torch.bfloat16), cpu_matmul_peak(torch.float32)
    choice = "bf16" if bf16 >= fp32 else "fp32"
    return choice, f"CPU matmul peak measured: bf16 {bf16 / 1e9:.0f}, fp32 {fp32 / 1e9:.0f} GFLOP/s"


def resolve_precision(requested: str, d: Dist, resumed: str | None = None,
                      echo: Callable[[str], None] = print) -> str:
    """The concrete precision (fp32, bf16 or fp16) a run trains in."""
    if requested != "auto":
        return requested
    if resumed in PRECISIONS:
        echo(f"precision auto: {resumed}, as the run being resumed")
        return resumed
    choice, why = auto_precision(d.device) if d.is_main else ("fp32", "")
    if d.enabled:  # every rank must train in the same precision: rank 0's measurement decides
        code = all_reduce_sum(d, [float(PRECISIONS.index(choice) + 1) if d.is_main else 0.0])[0]
        choice = PRECISIONS[int(code) - 1]
    echo(f"precision auto: {choice} ({why})" if why else f"precision auto: {choice}")
    return choice
