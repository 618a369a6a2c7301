"""The training loss: summed next-token cross-entropy, computed without ever holding the whole (B*T, V) logits.

Two paths, the same numbers:
- fused (the default whenever lm_head is a plain bias-free nn.Linear the loss can reach: no PEFT wrapper or hook on
  it, not FSDP-sharded): the model returns its final hidden states, and `LinearCrossEntropy` applies lm_head chunk by
  chunk. Once a chunk's logits exist, its gradients are known in closed form (d loss / d logits = softmax - one-hot),
  so the forward computes them right away, the gradient of the hidden states (N, H) and of the weight (V, H), and
  frees the logits; backward only scales them. Peak extra memory: one fp32 chunk of logits, not (N, V) logits kept
  for backward plus their gradient (the Liger / torchtune "fused linear cross-entropy" idea). On CUDA a chunk's loss
  and gradient come from one Triton kernel, in place, in two passes over the logits (camelid/train/triton_ce.py).
- chunked: for anything else (LoRA or IA3 on lm_head, a quantized head, FSDP shards, fp16), the model's logits,
  then an fp32 cross-entropy over chunks of tokens under activation checkpointing.
Both run the lm_head matmul in the compute dtype (autocast's, else the weight's) and the log-softmax in fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable
from torch.utils.checkpoint import checkpoint

from camelid.recompute import plain_linear
from camelid.templates import IGNORE_INDEX  # labels with this value are not predicted (padding, prompts)
from camelid.train import triton_ce
from camelid.train.distributed import is_sharded, wrappers

CE_CHUNK = 4096  # tokens per fp32 cross-entropy chunk (the chunked path)
FUSED_CHUNK_BYTES = 2**28  # the fused path's fp32 logits chunk: 256 MiB (2,048 tokens of a 32k vocabulary)


def _ce_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    # fp32 log-softmax: in bf16 the normaliser over a 32k-128k vocabulary loses the small probabilities
    return F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX, reduction="sum")


def fused_chunk_rows(vocab_size: int) -> int:
    """Tokens per chunk of the fused path: as many as fit FUSED_CHUNK_BYTES of fp32 logits."""
    return max(1, FUSED_CHUNK_BYTES // (4 * vocab_size))


class LinearCrossEntropy(torch.autograd.Function):
    """sum over valid rows of CE(hidden @ weight^T, labels), gradients computed in the forward, chunk by chunk.
    hidden (N, H), weight (V, H), labels (N,); the matmuls run in `compute_dtype`, the softmax in fp32."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, compute_dtype: torch.dtype,
                chunk: int) -> torch.Tensor:
        want_hidden, want_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        w = weight.to(compute_dtype)  # (V, H): autocast would make this copy too
        exact = torch.promote_types(compute_dtype, torch.float32)  # softmax and sums: fp32 at least
        grad_hidden = torch.empty_like(hidden) if want_hidden else None  # (N, H)
        grad_weight = torch.zeros(weight.shape, dtype=exact, device=weight.device) if want_weight else None
        total = torch.zeros((), dtype=exact, device=hidden.device)
        for i in range(0, hidden.shape[0], chunk):
            h = hidden[i:i + chunk].to(compute_dtype)  # (n, H)
            y = labels[i:i + chunk]  # (n,)
            if triton_ce.usable(hidden):  # CUDA: loss and softmax - one-hot in two passes, in place (triton_ce.py)
                logits = h @ w.T  # (n, V) in the compute dtype
                losses = triton_ce.cross_entropy_grad_(logits, y, IGNORE_INDEX, want_hidden or want_weight)
                if losses is not None:
                    total += losses.sum()
                    if want_hidden:
                        grad_hidden[i:i + chunk] = logits @ w
                    if want_weight:
                        grad_weight += logits.T @ h
                    continue
            valid = y != IGNORE_INDEX
            target = y.masked_fill(~valid, 0)
            logits = (h @ w.T).to(exact)  # (n, V)
            picked = logits.gather(1, target[:, None]).squeeze(1)  # (n,) the targets' logits
            # log-sum-exp and softmax from one exp pass, in place of the logits (no second (n, V) tensor)
            peak = logits.amax(dim=-1, keepdim=True)  # (n, 1)
            probs = logits.sub_(peak).exp_()  # (n, V) unnormalised
            norm = probs.sum(dim=-1, keepdim=True)  # (n, 1)
            total += ((peak.squeeze(1) + norm.squeeze(1).log() - picked) * valid).sum()
            if want_hidden or want_weight:
                # softmax - one-hot, zero on rows without a target: one pass (the mask rides on the normaliser)
                keep = valid.to(probs.dtype)  # (n,)
                grad = probs.mul_(keep[:, None] / norm)
                grad[torch.arange(len(y), device=y.device), target] -= keep
                grad = grad.to(compute_dtype)
                if want_hidden:
                    grad_hidden[i:i + chunk] = grad @ w
                if want_weight:
                    grad_weight += grad.T @ h
        ctx.grads = (grad_hidden, grad_weight.to(weight.dtype) if want_weight else None)
        return total

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output: torch.Tensor):
        grad_hidden, grad_weight = ctx.grads
        ctx.grads = None

        def scaled(grad: torch.Tensor | None) -> torch.Tensor | None:
            # in fp32: the loop's world / n_targets factor would lose up to 0.4% rounded to bf16 first
            return None if grad is None else (grad.float() * grad_output.float()).to(grad.dtype)

        return scaled(grad_hidden), scaled(grad_weight), None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         chunk: int | None = None) -> torch.Tensor:
    """Summed CE of the logits hidden @ weight^T (N, V) against labels (N,), never holding more than `chunk` rows
    of logits. Under autocast the matmuls run in autocast's dtype, as nn.Linear's would."""
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        compute_dtype = torch.get_autocast_dtype(device_type)
    else:
        compute_dtype = torch.promote_types(hidden.dtype, weight.dtype)
    if not torch.is_grad_enabled():  # a Function still reports a parameter input as needing a gradient
        hidden, weight = hidden.detach(), weight.detach()
    with torch.autocast(device_type, enabled=False):
        return LinearCrossEntropy.apply(hidden, weight, labels, compute_dtype,
                                        chunk or fused_chunk_rows(weight.shape[0]))


def fusable_head(model: nn.Module) -> nn.Linear | None:
    """The model's lm_head when the fused loss may apply it itself: a plain bias-free nn.Linear with no hooks,
    on a model that is not FSDP-sharded (a shard's weight is not the whole matrix outside the forward) nor under a
    DDP that finds unused parameters, computing
    in bf16 or fp32. Not in fp16: the fused loss forms its gradients before the GradScaler's factor reaches them,
    and probabilities near 1 / vocab are subnormal in fp16; the chunked path scales them first."""
    *outer, plain = wrappers(model)
    if is_sharded(plain):
        return None
    # DDP that looks for unused parameters (MoE) would mark lm_head unused in its forward, then see its gradient
    if any(getattr(m, "find_unused_parameters", False) for m in outer):
        return None
    head = getattr(plain, "lm_head", None)
    if not plain_linear(head) or head.bias is not None:
        return None
    device = head.weight.device.type
    autocast = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
    if torch.float16 in (autocast, head.weight.dtype):
        return None
    return head


def loss_fn(model: nn.Module, batch: dict[str, torch.Tensor], chunk: int = CE_CHUNK,
            fused: bool = True) -> torch.Tensor:
    """Summed (not averaged) next-token cross-entropy over the batch's target tokens, a 0-dim fp32 tensor.

    A sum, because the loop divides by the target-token count of the whole optimizer step: averaging here would
    weight a micro-batch with few targets as much as a full one, and 4 x 1 would differ from 1 x 4.
    `labels` are already aligned with the inputs (labels[:, t] is the token after input_ids[:, t]).
    `fused=False` forces the chunked path (see the module docstring).
    """
    inputs = dict(attention_mask=batch.get("attention_mask"), position_ids=batch.get("position_ids"))
    labels = batch["labels"].flatten()  # (N,)
    head = fusable_head(model) if fused else None
    if head is not None:
        hidden = model(batch["input_ids"], **inputs, return_hidden=True)  # (B, T, H)
        return linear_cross_entropy(hidden.flatten(0, 1), head.weight, labels)
    logits = model(batch["input_ids"], **inputs).flatten(0, 1)  # (N, V)
    if not torch.is_grad_enabled() or logits.shape[0] <= chunk:
        return _ce_sum(logits, labels)
    # checkpointed chunks: autograd keeps only the model's logits; the fp32 copy and log-softmax exist for one
    # chunk at a time, in forward and again in backward
    parts = [checkpoint(_ce_sum, logits[i:i + chunk], labels[i:i + chunk], use_reentrant=False)
             for i in range(0, logits.shape[0], chunk)]
    return torch.stack(parts).sum()


def count_targets(batch: dict[str, torch.Tensor]) -> int:
    return int((batch["labels"] != IGNORE_INDEX).sum())
