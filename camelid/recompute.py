"""Elementwise pieces of a block that keep only their inputs for backward and recompute the rest there.

Under plain autograd, RMSNorm keeps an fp32 copy of its input, the inverse RMS and the normalised input, and the
gated MLP keeps gate, act(gate) and up: per token and layer 2 x (4h + 4) + 2 bh + 3 bi bytes. Kept inputs only,
that is 2 x (residual bytes) h + 2 bi: for TinyLlama at 4 x 2048 tokens in bf16, about 5 GB less (the memory
planner's activation term, camelid/plan/memory.py, counts it this way). Backward first recomputes these cheap
elementwise ops from the inputs, then differentiates them with autograd as before: outputs are bit for bit those
of plain autograd, gradients too up to the order in which an input's gradient contributions are summed (~1e-7
relative in fp32). Under torch.compile the plain ops run: its partitioner already decides what to recompute.

On a CPU plain autograd runs too, unless KEEP_INPUTS_ON_CPU is set: there memory is seldom what limits a run, and
the recompute costs ~2% of a small model's training step (446 vs 436 ms forward + backward, medians of 8
interleaved steps of benchmarks/pretrain.py's 4-layer 256-wide model on a 2-core box). The tests set it to check the
inputs-only path on the CPU against plain autograd, and the memory planner's counts (which model the GPU) with it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.autograd.function import once_differentiable


class _KeepInputsOnly(torch.autograd.Function):
    @staticmethod
    def forward(ctx, fn: Callable[..., torch.Tensor], *inputs: torch.Tensor) -> torch.Tensor:
        device = inputs[0].device.type
        # backward runs outside the caller's autocast region: recompute under the same autocast state
        ctx.fn, ctx.autocast = fn, (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        ctx.save_for_backward(*inputs)
        return fn(*inputs)  # a Function's forward records no graph: nothing but `inputs` is kept

    @staticmethod
    @once_differentiable  # the recompute builds no graph of the gradients: say so rather than give wrong 2nd ones
    def backward(ctx, grad: torch.Tensor):
        wants = ctx.needs_input_grad[1:]
        inputs = [t.detach().requires_grad_(want) for t, want in zip(ctx.saved_tensors, wants)]
        device, enabled, dtype = ctx.autocast
        with torch.enable_grad(), torch.autocast(device, dtype=dtype, enabled=enabled):
            out = ctx.fn(*inputs)
        grads = iter(torch.autograd.grad(out, [t for t, want in zip(inputs, wants) if want], grad))
        return (None, *(next(grads) if want else None for want in wants))


KEEP_INPUTS_ON_CPU = False  # see the module docstring: on a CPU the speed of plain autograd is worth more


def recomputed(fn: Callable[..., torch.Tensor], *inputs: torch.Tensor) -> torch.Tensor:
    """fn(*inputs), keeping only `inputs` for backward. Every tensor fn reads that needs a gradient (a norm's
    weight, say) must be among `inputs`."""
    if torch.compiler.is_compiling() or not torch.is_grad_enabled() or not any(t.requires_grad for t in inputs):
        return fn(*inputs)
    if inputs[0].device.type == "cpu" and not KEEP_INPUTS_ON_CPU:
        return fn(*inputs)
    return _KeepInputsOnly.apply(fn, *inputs)
