"""A Triton NF4 dequantization kernel: the CUDA fast path of NF4Linear.dequantize_buffers (camelid/quant/nf4.py).

QLoRA dequantizes every NF4 weight for each matmul, three times a step under activation checkpointing. The PyTorch
path does it in five passes over memory (byte -> int32 index, a (256, 2) table lookup in fp32, the double-quantized
absmax, the product, the cast): about 25 bytes moved per weight. This kernel reads each packed byte and its block's
scale once and writes the two weights in the output dtype: about 3 bytes per weight.

Layout (torchao's, see nf4.py): byte i holds weights 2i (high nibble) and 2i + 1 (low nibble); weight j belongs to
block j // block_size, whose absmax is absmax_q[block] / factor[block // scaler_block_size] + mean (the second
level of quantization). A weight is NF4_LEVELS[code] * absmax, in fp32, then cast: the same operations, in the same
order, as the PyTorch path, so both give identical bits (the division rounds to nearest, as torch's does).

Set TRITON_INTERPRET=1 to run it on CPU tensors through Triton's interpreter (what the tests do).
"""

from __future__ import annotations

import contextlib

import torch

from camelid.triton_support import available, jit  # noqa: F401 (available: this kernel's callers ask here)

try:
    import triton
    import triton.language as tl
except ImportError:  # optional: callers check available() and keep the PyTorch path
    triton = tl = None

BYTES_PER_PROGRAM = 1024  # 2,048 weights per program


def _dequantize_kernel(packed_ptr, absmax_ptr, factor_ptr, mean_ptr, levels_ptr, out_ptr, num_bytes, numel,
                       BLOCK_SIZE: tl.constexpr, SCALER_BLOCK_SIZE: tl.constexpr, BYTES: tl.constexpr):
    byte = tl.program_id(0) * BYTES + tl.arange(0, BYTES)  # (BYTES,)
    in_range = byte < num_bytes
    codes = tl.load(packed_ptr + byte, mask=in_range, other=0).to(tl.int32)
    high = tl.load(levels_ptr + (codes >> 4))  # (BYTES,) fp32 levels of weights 2i
    low = tl.load(levels_ptr + (codes & 15))  # ... and 2i + 1
    block = (2 * byte) // BLOCK_SIZE  # both weights of a byte share a block: block_size is even
    absmax_q = tl.load(absmax_ptr + block, mask=in_range, other=0).to(tl.float32)
    factor = tl.load(factor_ptr + block // SCALER_BLOCK_SIZE, mask=in_range, other=1.0)
    scale = tl.math.div_rn(absmax_q, factor) + tl.load(mean_ptr)  # (BYTES,) each block's absmax
    first = 2 * byte
    # the casts round to nearest even on the GPU, as torch's .to() does
    tl.store(out_ptr + first, (high * scale).to(out_ptr.dtype.element_ty), mask=in_range & (first < numel))
    tl.store(out_ptr + first + 1, (low * scale).to(out_ptr.dtype.element_ty), mask=in_range & (first + 1 < numel))


def dequantize(packed: torch.Tensor, absmax_q: torch.Tensor, factor: torch.Tensor, mean: torch.Tensor,
               levels: torch.Tensor, numel: int, dtype: torch.dtype, block_size: int,
               scaler_block_size: int) -> torch.Tensor:
    """The first `numel` weights (numel,) in `dtype` from packed codes (n_bytes,) uint8, absmax_q (n_blocks,) int8,
    factor (n_scaler_blocks,) fp32, mean (1,) fp32 and the 16 fp32 levels."""
    if triton is None:
        raise ValueError("the NF4 kernel needs Triton, which is not installed (check available() first)")
    if block_size % 2:
        raise ValueError(f"block_size must be even, got {block_size}")
    out = torch.empty(numel, dtype=dtype, device=packed.device)
    grid = (triton.cdiv(packed.numel(), BYTES_PER_PROGRAM),)
    # Triton launches on the current CUDA device: make it the weights' (a model on cuda:1, say)
    on_device = torch.cuda.device(packed.device) if packed.is_cuda else contextlib.nullcontext()
    with on_device:
        jit(_dequantize_kernel)[grid](
            packed, absmax_q, factor, mean, levels, out, packed.numel(), numel,
            BLOCK_SIZE=block_size, SCALER_BLOCK_SIZE=scaler_block_size, BYTES=BYTES_PER_PROGRAM)
    return out
