"""The shared shape of a weight-only quantized Linear: packed integer weights + scales as buffers, dequantized
on the fly to the input's dtype for each matmul.

A quantized layer keeps the HF module name, and its buffers are named after the weight they replace
(`q_proj.weight` holds the packed codes, `q_proj.weight_scale` ... the scales), so a quantized model's state dict
is the quantized checkpoint, and `load_weights` fills it key by key like any other folder.

Backward (QLoRA trains adapters *through* a frozen quantized base): `dequant_linear` saves nothing but the packed
buffers and dequantizes again in backward, so autograd never holds a full-precision copy of a frozen weight.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

Dequantize = Callable[[torch.dtype], torch.Tensor]  # dtype -> the (out, in) weight in that dtype


class _DequantLinear(torch.autograd.Function):
    """y = x W^T with W rebuilt from its quantized form in forward and again in backward (no grad for W)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, dequantize: Dequantize) -> torch.Tensor:
        ctx.dequantize = dequantize
        return F.linear(x, dequantize(x.dtype))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad @ ctx.dequantize(grad.dtype), None  # (..., out) @ (out, in) -> (..., in)


def dequant_linear(x: torch.Tensor, dequantize: Dequantize, bias: torch.Tensor | None = None,
                   compute_dtype: torch.dtype | None = None) -> torch.Tensor:
    """F.linear over a quantized weight; `compute_dtype` (QLoRA: bf16) is the dtype of the matmul, the result
    comes back in x's dtype."""
    dtype = x.dtype
    xc = x if compute_dtype is None else x.to(compute_dtype)
    if torch.is_grad_enabled() and xc.requires_grad:
        y = _DequantLinear.apply(xc, dequantize)
    else:
        y = F.linear(xc, dequantize(xc.dtype))
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.to(dtype)


def apply_keeping_dtypes(module: nn.Module, fn: Callable[[torch.Tensor], torch.Tensor],
                         apply: Callable[[Callable], nn.Module]) -> nn.Module:
    """Module._apply for a module holding quantized buffers: `apply` (the parent class's _apply) handles the
    parameters (the float bias) and children, and each buffer goes through `fn` only when that keeps its dtype.
    So `model.to(torch.bfloat16)` or `.half()` moves codes and scales but never rounds an fp32 / fp16 scale."""
    held = {k: b for k, b in module._buffers.items() if b is not None}
    for k in held:
        module._buffers[k] = None
    try:
        apply(fn)
    finally:
        for k, b in held.items():
            moved = fn(b)  # a device move, or a cast (then only the device is taken from it)
            module._buffers[k] = moved if moved.dtype == b.dtype else b.to(moved.device)
    return module


class QuantLinear(nn.Module):
    """Base of Int8Linear / Int4Linear / NF4Linear. A subclass defines `method`, `quantize` (the buffers from a
    float weight), `buffer_shapes` (the buffers' shapes and dtypes, to build an empty layer for loading) and
    `dequantize_buffers`. Dequantization is a classmethod over any module holding the buffers, because a QLoRA
    LoRALinear adopts the buffers of the layer it wraps under the same names (so the keys stay put)."""

    method: str = ""

    def __init__(self, in_features: int, out_features: int, bias: bool, device=None,
                 bias_dtype: torch.dtype | None = None, compute_dtype: torch.dtype | None = None, **options):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.compute_dtype = compute_dtype  # None: the input's dtype
        self.options = self.check_options(in_features, out_features, **options)
        for name, (shape, dtype) in self.buffer_shapes(in_features, out_features, **self.options).items():
            self.register_buffer(name, torch.empty(shape, dtype=dtype, device=device))
        # the bias stays in float, frozen (weight-only quantization)
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=bias_dtype),
                                 requires_grad=False) if bias else None

    # ---- what a format defines ----
    @classmethod
    def check_options(cls, in_features: int, out_features: int, **options) -> dict:
        return options

    @classmethod
    def buffer_shapes(cls, in_features: int, out_features: int, **options) -> dict[str, tuple[tuple, torch.dtype]]:
        raise NotImplementedError

    @classmethod
    def quantize(cls, weight: torch.Tensor, **options) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    @classmethod
    def dequantize_buffers(cls, holder: nn.Module, dtype: torch.dtype, options: dict) -> torch.Tensor:
        raise NotImplementedError

    # ---- shared ----
    @classmethod
    def shaped_like(cls, linear: nn.Linear, compute_dtype: torch.dtype | None = None, **options) -> QuantLinear:
        """An empty layer to take `linear`'s place: its shape, bias, device and (for the float bias) dtype."""
        return cls(linear.in_features, linear.out_features, linear.bias is not None, device=linear.weight.device,
                   bias_dtype=linear.weight.dtype, compute_dtype=compute_dtype, **options)

    def fill(self, buffers: dict[str, torch.Tensor], bias: torch.Tensor | None) -> QuantLinear:
        """Copy quantized `buffers` (name -> tensor) and the float bias in; returns self."""
        with torch.no_grad():
            for name, tensor in buffers.items():
                getattr(self, name).copy_(tensor)
            if bias is not None:
                self.bias.copy_(bias)
        return self

    @classmethod
    def from_linear(cls, linear: nn.Linear, compute_dtype: torch.dtype | None = None, **options) -> QuantLinear:
        layer = cls.shaped_like(linear, compute_dtype, **options)
        return layer.fill(cls.quantize(linear.weight.detach(), **layer.options), linear.bias)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The (out, in) float weight this layer computes with."""
        return self.dequantize_buffers(self, dtype or self.bias_dtype(), self.options)

    def bias_dtype(self) -> torch.dtype:
        return self.bias.dtype if self.bias is not None else torch.float32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dequant_linear(x, lambda dtype: self.dequantize(dtype), self.bias, self.compute_dtype)

    def to_linear(self, dtype: torch.dtype | None = None) -> nn.Linear:
        """A plain nn.Linear holding the dequantized weight."""
        weight = self.dequantize(dtype)
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        linear.weight = nn.Parameter(weight, requires_grad=False)
        if self.bias is not None:
            linear.bias = nn.Parameter(self.bias.detach().to(weight.dtype), requires_grad=False)
        return linear

    def _apply(self, fn, recurse=True):
        return apply_keeping_dtypes(self, fn, lambda f: super(QuantLinear, self)._apply(f, recurse))

    def extra_repr(self) -> str:
        opts = "".join(f", {k}={v}" for k, v in self.options.items())
        return f"{self.in_features}, {self.out_features}, {self.method}{opts}, bias={self.bias is not None}"
