"""Elementwise pieces of a block that keep only their inputs for backward and recompute the rest there.

Under plain autograd, RMSNorm keeps an fp32 copy of its input, the inverse RMS and the normalised input, and the
gated MLP keeps gate, act(gate) and up: per token and layer 2 x (4h + 4) + 2 bh + 3 bi bytes. Kept inputs only,
that is 2 x (residual bytes) h + 2 bi: for TinyLlama at 4 x 2048 tokens in bf16, about 5 GB less (the memory
planner's activation term, camelid/plan/memory.py, counts it this way). Backward first recomputes these cheap
elementwise ops from the inputs, then differentiates them with autograd as before: outputs are bit for bit those
of plain autograd, gradients too up to the order in which an input's gradient contributions are summed (~1e-7
relative in fp32). Under torch.compile the plain ops run: its partitioner already decides what to recompute.

A trained, plain down projection does not keep its input either (gated_linear): the product act(gate) * up, which
its weight gradient needs, is rebuilt in backward from gate and up (kept anyway), and the matmul's gradients are
taken by hand, so no matmul reruns. Another bi bytes a token and layer: on the TinyLlama shape 19% of a block's
activations (the planner's estimate of eager bf16-true pretraining drops from 18.37 to 16.08 GB).

On a CPU plain autograd runs too, unless KEEP_INPUTS_ON_CPU is set: there memory is seldom what limits a run, and
the recompute costs ~2% of a small model's training step (446 vs 436 ms forward + backward, medians of 8
interleaved steps of benchmarks/pretrain.py's 4-layer 256-wide model on a 2-core box). The tests set it to check the
inputs-only path on the CPU against plain autograd, and the memory planner's counts (which model the GPU) with it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
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


class _GatedLinear(torch.autograd.Function):
    """linear(act(gate) * up, weight, bias) keeping gate and up only: the product, down_proj's input (i values a
    token), is rebuilt in backward, where act(gate) is recomputed anyway. The matmul is never rerun: its gradients are
    taken by hand, in the dtype the forward's matmul ran in (autocast's, else the inputs')."""

    @staticmethod
    def forward(ctx, act: Callable, gate: torch.Tensor, up: torch.Tensor, weight: torch.Tensor,
                bias: torch.Tensor | None) -> torch.Tensor:
        device = gate.device.type
        ctx.act, ctx.autocast = act, (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        ctx.save_for_backward(gate, up, weight, bias)
        return F.linear(act(gate) * up, weight, bias)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        gate, up, weight, bias = ctx.saved_tensors
        _, want_gate, want_up, want_weight, want_bias = ctx.needs_input_grad
        device, enabled, dtype = ctx.autocast
        g, u = gate.detach().requires_grad_(want_gate), up.detach().requires_grad_(want_up)
        with torch.enable_grad(), torch.autocast(device, dtype=dtype, enabled=enabled):
            product = ctx.act(g) * u  # (..., i), as the forward made it
        mm = dtype if enabled else product.dtype  # the matmul's dtype
        flat_grad = grad.reshape(-1, grad.shape[-1]).to(mm)  # (N, out)
        grad_weight = (flat_grad.T @ product.detach().reshape(-1, product.shape[-1]).to(mm)).to(weight.dtype) \
            if want_weight else None
        grad_bias = flat_grad.sum(0).to(bias.dtype) if want_bias else None
        grad_product = (grad.to(mm) @ weight.to(mm)).to(product.dtype)  # (..., i)
        wants = [t for t, want in ((g, want_gate), (u, want_up)) if want]
        grads = iter(torch.autograd.grad(product, wants, grad_product)) if wants else iter(())
        return (None, next(grads) if want_gate else None, next(grads) if want_up else None, grad_weight, grad_bias)


KEEP_INPUTS_ON_CPU = False  # see the module docstring: on a CPU the speed of plain autograd is worth more


def _inputs_only(inputs: tuple[torch.Tensor, ...]) -> bool:
    """Whether the inputs-only path applies: autograd on, not under torch.compile, something needs a gradient, and
    not a CPU (unless KEEP_INPUTS_ON_CPU)."""
    if torch.compiler.is_compiling() or not torch.is_grad_enabled() or not any(t.requires_grad for t in inputs):
        return False
    return inputs[0].device.type != "cpu" or KEEP_INPUTS_ON_CPU


def recomputed(fn: Callable[..., torch.Tensor], *inputs: torch.Tensor) -> torch.Tensor:
    """fn(*inputs), keeping only `inputs` for backward. Every tensor fn reads that needs a gradient (a norm's
    weight, say) must be among `inputs`."""
    if not _inputs_only(inputs):
        return fn(*inputs)
    return _KeepInputsOnly.apply(fn, *inputs)


def plain_linear(module: nn.Module) -> bool:
    """An nn.Linear itself (no adapter subclass or wrapper) without forward hooks: code may apply F.linear with its
    weight in its place (the fused loss's lm_head, gated_linear's down_proj, the model's stacked projections)."""
    return type(module) is nn.Linear and not module._forward_hooks and not module._forward_pre_hooks


def gated_linear(act: Callable, gate: torch.Tensor, up: torch.Tensor, linear: nn.Module) -> torch.Tensor:
    """linear(act(gate) * up): a gated MLP's down projection. When `linear` is a plain, hook-free nn.Linear whose
    weight trains, only gate and up are kept for backward (_GatedLinear); otherwise (a frozen weight keeps no input
    anyway; an adapter or a hook reads the product) the product is kept only by whoever needs it."""
    if plain_linear(linear) and linear.weight.requires_grad and _inputs_only((gate, up, linear.weight)):
        return _GatedLinear.apply(act, gate, up, linear.weight, linear.bias)
    return linear(recomputed(lambda g, u: act(g) * u, gate, up))
