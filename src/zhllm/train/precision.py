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

from .metrics import cpu_matmul_peak, measure_matmul_peak
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
        if d.is_main:
            warn_if_emulated(requested, d.device, echo)
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


def warn_if_emulated(precision: str, device: torch.device, echo: Callable[[str], None]) -> None:
    """Warn when a CPU has no units for the low precision asked for. Its matmuls then run far slower than in
    fp32: fp16 at 2.5 against 180 GFLOP/s on an AMD EPYC with AVX512-BF16 but no AVX512-FP16. A 256-wide
    probe takes milliseconds even there (the 2048-wide peak measurement would take minutes)."""
    if device.type != "cpu" or precision == "fp32":
        return
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    low, fp32 = (measure_matmul_peak(dt, n=256, reps=3) for dt in (dtype, torch.float32))
    if low * 4 < fp32:
        echo(f"warning: train.precision {precision}: this CPU multiplies {precision} at {low / 1e9:.1f} GFLOP/s "
             f"against {fp32 / 1e9:.0f} in fp32; precision auto or fp32 will train far faster")
