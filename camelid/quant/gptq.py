"""GPTQ (Frantar et al. 2022) for int4: choose the codes so that the layer's *outputs* on calibration data move as
little as possible, not just the weights.

For a Linear with inputs X (N, in), the error to minimise is ||X W^T - X Q^T||^2 = tr((W - Q) H (W - Q)^T), with
H = X^T X. GPTQ quantizes one input column at a time and spreads that column's rounding error over the columns not
yet quantized, weighted by the inverse Hessian (the Optimal Brain Surgeon update), in blocks of columns so the big
updates are matmuls:

    Hinv = upper Cholesky factor of (H + damp I)^-1
    for each column i:   q_i = quant(w_i);  e = (w_i - q_i) / Hinv[i, i];  w_j -= e * Hinv[i, j]  for j > i

The codes land in the same Int4Linear format as round-to-nearest (min/max groups; each group's scale and low are
taken from the weights as updated when the group starts), so loading and running need nothing new.

Blocks are quantized in order, as in the paper: the H of block N's layers is measured with blocks 0..N-1 already
quantized, so each block learns to correct the error of the ones before it. One calibration forward pass per block
(the paper runs each block alone on cached inputs; the whole model is simpler and fine at the sizes this package
trains). The H matrices of one block (in^2 floats each) are held at a time.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch
from torch import nn

from camelid.quant import select_linears
from camelid.quant.int4 import Int4Linear, group_codes, group_params, pack_int4


@torch.no_grad()
def input_hessians(model: nn.Module, ids: torch.Tensor, seq_len: int, names: list[str],
                   batch_size: int = 8) -> dict[str, torch.Tensor]:
    """H = X^T X / N over every token the named Linear layers see while the model reads `ids` in windows."""
    ids = ids.flatten()
    n_windows = ids.numel() // seq_len
    if n_windows == 0:
        raise ValueError(f"calibration text has {ids.numel()} tokens, fewer than one window of {seq_len}")
    windows = ids[: n_windows * seq_len].view(n_windows, seq_len)  # (N, T)
    hessians, counts, hooks = {}, dict.fromkeys(names, 0), []
    for name in names:
        layer = model.get_submodule(name)
        hessians[name] = torch.zeros(layer.in_features, layer.in_features, device=layer.weight.device)

        def hook(module, inputs, output, name=name):
            x = inputs[0].detach().flatten(0, -2).float()  # (tokens, in)
            hessians[name] += x.T @ x
            counts[name] += x.shape[0]

        hooks.append(layer.register_forward_hook(hook))
    try:
        device = next(model.parameters()).device
        for start in range(0, n_windows, batch_size):
            model(windows[start:start + batch_size].to(device))
    finally:
        for h in hooks:
            h.remove()
    return {name: hessians[name] / counts[name] for name in names}


@torch.no_grad()
def gptq_int4(weight: torch.Tensor, hessian: torch.Tensor, group_size: int = 128,
              damp: float = 0.01) -> dict[str, torch.Tensor]:
    """Int4Linear buffers for `weight` (out, in) chosen by GPTQ against `hessian` (in, in)."""
    W = weight.detach().float().clone()  # (out, in), updated as columns are quantized
    out_features, in_features = W.shape
    H = hessian.float().clone()
    dead = torch.diag(H) == 0  # inputs that were always zero: any code will do
    H[dead, dead] = 1
    W[:, dead] = 0
    H += damp * torch.diag(H).mean() * torch.eye(in_features, device=H.device)  # keeps H safely invertible
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)  # (in, in)

    codes = torch.zeros_like(W)
    scales = torch.zeros(out_features, in_features // group_size, dtype=torch.float16, device=W.device)
    lows = torch.zeros_like(scales)
    for start in range(0, in_features, group_size):  # one block = one group
        end = start + group_size
        block = W[:, start:end].clone()  # (out, G)
        errors = torch.zeros_like(block)
        hinv = Hinv[start:end, start:end]  # (G, G)
        g = start // group_size
        scales[:, g], lows[:, g] = group_params(block)
        scale, low = scales[:, g:g + 1], lows[:, g:g + 1]  # (out, 1)
        for i in range(group_size):
            w = block[:, i:i + 1]  # (out, 1)
            q = group_codes(w, scale, low)
            codes[:, start + i] = q[:, 0]
            err = (w - (q * scale.float() + low.float())) / hinv[i, i]  # (out, 1)
            block[:, i:] -= err @ hinv[i:i + 1, i:]  # spread over this block's later columns
            errors[:, i:i + 1] = err
        W[:, end:] -= errors @ Hinv[start:end, end:]  # and over every later block
    return {"weight": pack_int4(codes), "weight_scale": scales, "weight_low": lows}


def block_of(name: str) -> str:
    """"model.layers.3.mlp.up_proj" -> "model.layers.3.": the transformer block a layer belongs to."""
    match = re.match(r"(.*\.layers\.\d+\.)", name)
    return match.group(1) if match else name


def gptq_quantizer(model: nn.Module, ids: torch.Tensor, seq_len: int,
                   group_size: int = 128) -> Callable[[str, nn.Linear], Int4Linear]:
    """The per-layer builder `quantize_model` takes (`quantizer=`): each layer's Int4Linear with GPTQ codes.
    quantize_model swaps layers in model order, so when the first layer of a block is asked for, every earlier
    block is already quantized; that is when this block's H matrices are measured."""
    targets = list(select_linears(model))
    hessians: dict[str, torch.Tensor] = {}

    def quantize(name: str, linear: nn.Linear) -> Int4Linear:
        if name not in hessians:
            block = [n for n in targets if block_of(n) == block_of(name)
                     and isinstance(model.get_submodule(n), nn.Linear)]
            hessians.update(input_hessians(model, ids, seq_len, block))
        layer = Int4Linear.shaped_like(linear, group_size=group_size)
        return layer.fill(gptq_int4(linear.weight, hessians.pop(name), group_size), linear.bias)

    return quantize
