"""Gradient noise scale (McCandlish et al. 2018, "An Empirical Model of Large-Batch Training", appendix A.1).

The simple noise scale B_simple = tr(Sigma) / |G|^2 (Sigma: the per-example gradient covariance, G: the true
gradient) estimates the critical batch size: below it, doubling the batch nearly halves the steps needed; above
it, returns diminish. Gradient accumulation gives two batch sizes for free each step: one micro-batch (B_small
examples, gradient norm |G_small|^2) and the whole step (B_big, |G_big|^2). Since E|G_B|^2 = |G|^2 + tr(Sigma) / B,

    |G|^2     = (B_big |G_big|^2 - B_small |G_small|^2) / (B_big - B_small)
    tr(Sigma) = (|G_small|^2 - |G_big|^2) / (1 / B_small - 1 / B_big)

are unbiased. Each is noisy (often negative for one step), so both are smoothed by an EMA before the ratio is
taken, as the paper recommends. Here an "example" is a target token, so B_simple is in tokens.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch


def grad_sq_norm(params: Iterable[torch.nn.Parameter]) -> float:
    """|g|^2 over every parameter's .grad (fp32 accumulation)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    return float(torch.nn.utils.get_total_norm(grads, 2.0, foreach=True)) ** 2


def unbiased_estimates(g_small_sq: float, g_big_sq: float, b_small: float, b_big: float) -> tuple[float, float]:
    """(|G|^2, tr(Sigma)) from one step's small- and big-batch squared gradient norms."""
    if not 0 < b_small < b_big:
        raise ValueError(f"need 0 < B_small < B_big, got {b_small} and {b_big}")
    g_sq = (b_big * g_big_sq - b_small * g_small_sq) / (b_big - b_small)
    trace = (g_small_sq - g_big_sq) / (1 / b_small - 1 / b_big)
    return g_sq, trace


class NoiseScale:
    """EMA of |G|^2 and tr(Sigma); `update` returns the current B_simple (None until |G|^2's EMA is positive).
    The two EMAs share a start-up bias (1 - decay^n), which cancels in the ratio."""

    def __init__(self, decay: float = 0.95):
        self.decay = decay
        self.g_sq = self.trace = 0.0

    def update(self, g_small_sq: float, g_big_sq: float, b_small: float, b_big: float) -> float | None:
        g_sq, trace = unbiased_estimates(g_small_sq, g_big_sq, b_small, b_big)
        if not (math.isfinite(g_sq) and math.isfinite(trace)):
            return self.value
        self.g_sq = self.decay * self.g_sq + (1 - self.decay) * g_sq
        self.trace = self.decay * self.trace + (1 - self.decay) * trace
        return self.value

    @property
    def value(self) -> float | None:
        return self.trace / self.g_sq if self.g_sq > 0 else None
