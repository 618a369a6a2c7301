"""Perplexity of a causal LM on a token stream: the yardstick for what quantization costs."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


@torch.no_grad()
def perplexity(model: nn.Module, ids: torch.Tensor | list[int], seq_len: int, batch_size: int = 8,
               progress: Callable[[int, int], None] | None = None) -> float:
    """exp(mean next-token NLL) over `ids` cut into non-overlapping windows of `seq_len` tokens (a trailing
    partial window is dropped so that every window sees the same context lengths, whichever model is measured).
    `progress(windows_done, windows)` is called after each batch."""
    ids = torch.as_tensor(ids, dtype=torch.long).flatten()
    n_windows = ids.numel() // seq_len
    if n_windows == 0 or seq_len < 2:
        raise ValueError(f"need at least one window of seq_len >= 2 tokens; have {ids.numel()} tokens, "
                         f"seq_len {seq_len}")
    device = next(model.parameters()).device
    windows = ids[: n_windows * seq_len].view(n_windows, seq_len)  # (N, T)
    total, count = 0.0, 0
    for start in range(0, n_windows, batch_size):
        batch = windows[start:start + batch_size].to(device)  # (B, T)
        logits = model(batch).float()  # (B, T, V)
        nll = F.cross_entropy(logits[:, :-1].flatten(0, 1), batch[:, 1:].flatten(), reduction="sum")
        total += nll.item()
        count += batch[:, 1:].numel()
        if progress is not None:
            progress(start + len(batch), n_windows)
    return math.exp(total / count)
