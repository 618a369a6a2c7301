"""NF4 with double quantization (Dettmers et al. 2023, QLoRA), the base format of QLoRA fine-tuning.

    weight, flattened, in blocks of 64:   w ~= NF4_LEVELS[code] * absmax_block           (4-bit codes)
    the fp32 absmax values, in blocks of 256:  absmax ~= q8 / factor_block + mean          (int8 + one fp32 each)

NF4's 16 levels are the quantiles of a normal distribution (weights are roughly normal), so each level is used
about equally often; double quantization brings the scale cost from 32/64 = 0.5 to 8/64 + 32/(64*256) ~= 0.127
bits per weight: ~4.13 bits in all.

Quantization is torchao's `to_nf4` (torchao, not bitsandbytes: it is plain PyTorch, so the same code runs on CPU,
CUDA and any other device, it needs no compiled library, and it is already our dependency for the 8-bit
optimizer). Its output tensors are stored as our buffers and dequantized here in a few lines of PyTorch that
follow torchao's `NF4Tensor.get_original_weight` exactly (a test checks bit equality), so loading and running an
NF4 checkpoint does not import torchao at all.

torchao needs numel divisible by 64 * 256; a weight that is not (a small k_proj under GQA) is zero-padded at the end
of its flattened form, and the padding dropped after dequantizing.
"""

from __future__ import annotations

import torch
from torch import nn

from camelid.quant import triton_nf4
from camelid.quant.linear import QuantLinear

BLOCK_SIZE = 64  # weights per absmax (QLoRA paper)
SCALER_BLOCK_SIZE = 256  # absmax values per second-level scale (QLoRA paper)
# the NF4 code book, as torchao writes it (QLoRA appendix E, rounded to 4 decimals)
NF4_LEVELS = (-1.0000, -0.6962, -0.5251, -0.3949, -0.2844, -0.1848, -0.0911, 0.0000,
              0.0796, 0.1609, 0.2461, 0.3379, 0.4407, 0.5626, 0.7230, 1.0000)


_TABLES: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def _tables(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The code book on `device`: the 16 levels (16,) fp32, and (256, 2) fp32 the two values every packed byte holds
    (high nibble first, torchao's packing), so one lookup per byte dequantizes two weights. Made once per device:
    made per forward it would be a host-to-device copy in every layer (a sync, and forbidden inside CUDA-graph
    capture)."""
    tables = _TABLES.get(device)
    if tables is None:
        with torch.inference_mode(False):  # normal tensors, usable by training too
            levels = torch.tensor(NF4_LEVELS, dtype=torch.float32)
            byte = torch.arange(256)
            pairs = torch.stack([levels[byte >> 4], levels[byte & 0x0F]], dim=-1)
            tables = _TABLES[device] = (levels.to(device), pairs.to(device))
    return tables


def padded_numel(numel: int, block_size: int, scaler_block_size: int) -> int:
    unit = block_size * scaler_block_size
    return -(-numel // unit) * unit


class NF4Linear(QuantLinear):
    method = "nf4"

    @classmethod
    def check_options(cls, in_features, out_features, block_size: int = BLOCK_SIZE,
                      scaler_block_size: int = SCALER_BLOCK_SIZE, **options):
        if block_size <= 0 or block_size % 2 or scaler_block_size <= 0:
            raise ValueError(f"nf4 block_size must be even and positive and scaler_block_size positive, got "
                             f"{block_size} and {scaler_block_size}")
        return {"block_size": block_size, "scaler_block_size": scaler_block_size}

    @classmethod
    def buffer_shapes(cls, in_features, out_features, block_size: int = BLOCK_SIZE,
                      scaler_block_size: int = SCALER_BLOCK_SIZE, **options):
        numel = padded_numel(in_features * out_features, block_size, scaler_block_size)
        n_blocks = numel // block_size
        return {"weight": ((numel // 2,), torch.uint8),  # two codes per byte, flattened (torchao's layout)
                "weight_absmax": ((n_blocks,), torch.int8),  # the double-quantized absmax of each block
                "weight_absmax_factor": ((n_blocks // scaler_block_size,), torch.float32),
                "weight_absmax_mean": ((1,), torch.float32)}

    @classmethod
    def quantize(cls, weight: torch.Tensor, block_size: int = BLOCK_SIZE,
                 scaler_block_size: int = SCALER_BLOCK_SIZE, **options) -> dict[str, torch.Tensor]:
        try:
            from torchao.quantization import to_nf4  # imported when quantizing only: it is slow to import
        except ImportError:
            raise ValueError("nf4 quantization needs torchao: pip install 'camelid[quant]'") from None

        flat = weight.detach().float().flatten()
        numel = padded_numel(flat.numel(), block_size, scaler_block_size)
        flat = torch.cat([flat, flat.new_zeros(numel - flat.numel())])
        nf4 = to_nf4(flat, block_size, scaler_block_size)
        return {"weight": nf4.quantized_data, "weight_absmax": nf4.quantized_scalers,
                "weight_absmax_factor": nf4.quantization_factor, "weight_absmax_mean": nf4.scaler_mean.reshape(1)}

    @classmethod
    def dequantize_buffers(cls, holder: nn.Module, dtype: torch.dtype, options: dict) -> torch.Tensor:
        block_size, scaler_block_size = options["block_size"], options["scaler_block_size"]
        numel = holder.out_features * holder.in_features
        levels, pairs = _tables(holder.weight.device)
        if holder.weight.is_cuda and triton_nf4.available():  # one pass over memory instead of five
            w = triton_nf4.dequantize(holder.weight, holder.weight_absmax, holder.weight_absmax_factor,
                                      holder.weight_absmax_mean, levels, numel, dtype, block_size, scaler_block_size)
            return w.view(holder.out_features, holder.in_features)
        # byte i holds weights 2i (high nibble) and 2i + 1 (low): one lookup gives both. index_select, not
        # pairs[codes]: advanced indexing took 3x as long on the CPU, where this runs 3 times a QLoRA step per layer
        values = pairs.index_select(0, holder.weight.int())  # (numel / 2, 2)
        q8 = holder.weight_absmax.view(-1, scaler_block_size)  # (n_scaler_blocks, 256)
        absmax = (q8 / holder.weight_absmax_factor[:, None]).flatten() + holder.weight_absmax_mean  # (n_blocks,)
        w = values.view(-1, block_size) * absmax[:, None]  # (n_blocks, 64)
        return w.flatten()[:numel].view(holder.out_features, holder.in_features).to(dtype)
