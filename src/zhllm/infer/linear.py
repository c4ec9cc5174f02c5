"""Matrix-vector products for the decode step, in the fastest form the device offers for a weight format.

Decoding one token reads every weight once, so its speed is set by how many bytes the weights take and how
well the kernel streams them. Each function here takes a weight (out, in) and an optional bias and returns
`f(x) = x @ weight.T + bias` for x of shape (B, in):

- `dense`: `F.linear`, for fp32 and for any device without a better kernel (CUDA: cuBLAS).
- bf16 on a CPU with oneDNN: the weight is reordered once into oneDNN's blocked layout, which streams it
  about 1.7x faster than `F.linear` on the same bf16 weight (benchmarks/bench_decode.py).
- `Int8Linear`: weight-only int8 with one fp scale per output row (symmetric, round to nearest), multiplied by
  PyTorch's `_weight_int8pack_mm` kernel: a quarter of the fp32 bytes. Activations stay in the model's dtype.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..errors import ZhllmError

LinearFn = Callable[[torch.Tensor], torch.Tensor]
QUANTIZE = ("none", "int8")


def dense(weight: torch.Tensor, bias: torch.Tensor | None) -> LinearFn:
    return lambda x: F.linear(x, weight, bias)


def _onednn_available(weight: torch.Tensor) -> bool:
    return (weight.device.type == "cpu" and weight.dtype == torch.bfloat16 and torch.backends.mkldnn.is_available()
            and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def prepacked(weight: torch.Tensor, bias: torch.Tensor | None) -> LinearFn:
    """bf16 on CPU: oneDNN's reordered weight (built once); anything else: `dense`."""
    if not _onednn_available(weight):
        return dense(weight, bias)
    try:
        packed = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), 1)
    except (RuntimeError, AttributeError):  # a PyTorch build without this oneDNN entry point
        return dense(weight, bias)
    linear = torch.ops.mkldnn._linear_pointwise
    return lambda x: linear(x, packed, bias, "none", [], "")


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 weight (out, in), fp32 scale (out,)) with weight ~= q * scale[:, None], per output row."""
    w = weight.float()
    scale = (w.abs().amax(dim=1) / 127).clamp(min=torch.finfo(torch.float32).tiny)
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q.contiguous(), scale


class Int8Linear:
    """x @ (q * scale[:, None]).T + bias with `_weight_int8pack_mm`; q and scale are read by the native step."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        if weight.device.type != "cpu":
            raise ZhllmError("int8 decoding runs on the CPU; on a GPU use bfloat16 (memory bandwidth is not the limit)")
        self.q, scale = quantize_int8(weight)
        self.bias = bias
        # PyTorch's int8 kernel is several times faster with bf16 activations than with fp32 ones.
        self.upcast = weight.dtype == torch.float32 and _onednn_available(weight.bfloat16())
        self.scale = scale.to(torch.bfloat16 if self.upcast else weight.dtype)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.upcast:
            y = torch._weight_int8pack_mm(x.bfloat16(), self.q, self.scale).float()
        else:
            y = torch._weight_int8pack_mm(x, self.q, self.scale)
        return y if self.bias is None else y + self.bias



class Int8Module(torch.nn.Module):
    """An nn.Linear's weight-only int8 stand-in for a whole model's forward (a distillation teacher too large for
    memory otherwise): a quarter of fp32's bytes, but on a CPU a batched product runs ~3x slower than bf16."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        bias = None if linear.bias is None else linear.bias.detach()
        self.fn = Int8Linear(linear.weight.detach(), bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x.reshape(-1, x.shape[-1])).reshape(*x.shape[:-1], -1)


def quantize_linears_int8(model: torch.nn.Module, skip: tuple[str, ...] = ("lm_head",)) -> torch.nn.Module:
    """Every nn.Linear of `model` but those named in `skip` (a tied lm_head shares the embedding) becomes an
    `Int8Module`, in place; for inference only."""
    for name, module in list(model.named_modules()):
        if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] not in skip:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, Int8Module(module))
    return model


def decode_linear(quantize: str) -> Callable[[torch.Tensor, torch.Tensor | None], LinearFn]:
    """The builder of decode-step products for a quantization mode (`none` or `int8`)."""
    if quantize not in QUANTIZE:
        raise ZhllmError(f"unknown quantization {quantize!r} (use {', '.join(QUANTIZE)})")
    return Int8Linear if quantize == "int8" else prepacked
