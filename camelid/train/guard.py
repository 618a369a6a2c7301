"""Stability guard: decide, after backward and before the optimizer step, whether an update is safe to apply.

A non-finite loss or grad norm, or a loss far above the recent ones, is skipped: its gradients are dropped and the
step counter still advances, so the data moves past the bad batch. Several skips close together mean the weights
themselves have gone bad; the loop then rolls back to the last checkpoint with a smaller learning rate (the
recovery PaLM and OPT describe doing by hand).
"""

from __future__ import annotations

import math
from collections import deque


class SpikeGuard:
    def __init__(self, sigma: float = 6.0, window: int = 50, min_history: int = 20, max_skips: int = 3):
        self.sigma, self.window, self.min_history, self.max_skips = sigma, window, min_history, max_skips
        self.losses: deque[float] = deque(maxlen=window)  # the last `window` accepted losses
        self.skips: list[int] = []  # steps skipped within the last `window` steps

    def check(self, loss: float, grad_norm: float) -> str | None:
        """Why this update must be skipped, or None to apply it."""
        if not math.isfinite(loss):
            return f"non-finite loss ({loss})"
        if not math.isfinite(grad_norm):
            return f"non-finite grad norm ({grad_norm})"
        if self.sigma > 0 and len(self.losses) >= self.min_history:
            mean = sum(self.losses) / len(self.losses)
            std = math.sqrt(sum((x - mean) ** 2 for x in self.losses) / len(self.losses))
            # a floor, so that a flat stretch of losses does not make a rounding-level wiggle a "spike"
            std = max(std, 1e-3 * abs(mean))
            if loss > mean + self.sigma * std:
                return f"loss spike ({loss:.4f} > mean {mean:.4f} + {self.sigma:g} x std {std:.4f})"
        return None

    def accept(self, loss: float) -> None:
        self.losses.append(loss)

    def skip(self, step: int) -> bool:
        """Record a skipped step; True when the skips within the window call for a rollback."""
        self.skips = [s for s in self.skips if s > step - self.window] + [step]
        return len(self.skips) >= self.max_skips

    def state_dict(self) -> dict:
        return {"losses": list(self.losses), "skips": list(self.skips)}

    def load_state_dict(self, state: dict) -> None:
        self.losses = deque(state["losses"], maxlen=self.window)
        self.skips = list(state["skips"])
