"""The training loss, in one function so that a faster path (a fused lm_head + cross-entropy that never holds the
full (B, T, V) logits at all) can replace it without touching the loop."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100  # labels with this value are not predicted (padding, prompt tokens in fine-tuning)
CE_CHUNK = 4096  # tokens per fp32 cross-entropy chunk


def _ce_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    # fp32 log-softmax: in bf16 the normaliser over a 32k-128k vocabulary loses the small probabilities
    return F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX, reduction="sum")


def loss_fn(model: nn.Module, batch: dict[str, torch.Tensor], chunk: int = CE_CHUNK) -> torch.Tensor:
    """Summed (not averaged) next-token cross-entropy over the batch's target tokens, a 0-dim fp32 tensor.

    A sum, because the loop divides by the target-token count of the whole optimizer step: averaging here would
    weight a micro-batch with few targets as much as a full one, and 4 x 1 would differ from 1 x 4.
    `labels` are already aligned with the inputs (labels[:, t] is the token after input_ids[:, t]).

    The cross-entropy runs in chunks of `chunk` tokens under activation checkpointing: autograd then keeps only
    the model's (bf16) logits, and the fp32 copy and log-softmax exist for one chunk at a time, in forward and
    again in backward, instead of two fp32 (B*T, V) tensors for the whole batch.
    """
    logits = model(batch["input_ids"], attention_mask=batch.get("attention_mask"),
                   position_ids=batch.get("position_ids"))  # (B, T, V)
    logits, labels = logits.flatten(0, 1), batch["labels"].flatten()  # (N, V), (N,)
    if not torch.is_grad_enabled() or logits.shape[0] <= chunk:
        return _ce_sum(logits, labels)
    parts = [checkpoint(_ce_sum, logits[i:i + chunk], labels[i:i + chunk], use_reentrant=False)
             for i in range(0, logits.shape[0], chunk)]
    return torch.stack(parts).sum()


def count_targets(batch: dict[str, torch.Tensor]) -> int:
    return int((batch["labels"] != IGNORE_INDEX).sum())
