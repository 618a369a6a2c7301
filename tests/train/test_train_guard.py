"""The stability guard: NaN and spikes are skipped and logged; repeated skips roll back with a lower lr."""

from __future__ import annotations

import math

import pytest
import torch
from train_helpers import event_rows, optimizer_steps, step_rows, tiny_train_config

from camelid.train import lr_at, train
from camelid.train.guard import SpikeGuard
from camelid.train.state import latest_checkpoint


def inject(bad: dict[int, float]):
    """A loss hook that multiplies the loss of the given steps (nan -> a NaN loss and NaN gradients)."""
    def hook(step: int, loss: torch.Tensor) -> torch.Tensor:
        return loss * bad[step] if step in bad else loss
    return hook


def test_guard_unit():
    guard = SpikeGuard(sigma=3, window=5, min_history=3, max_skips=2)
    assert "non-finite loss" in guard.check(math.nan, 1.0)
    assert "non-finite grad norm" in guard.check(1.0, math.inf)
    for loss in (2.0, 2.1, 1.9):
        assert guard.check(loss, 1.0) is None
        guard.accept(loss)
    assert "loss spike" in guard.check(5.0, 1.0)
    assert guard.check(2.2, 1.0) is None
    assert not guard.skip(10) and guard.skip(14)  # two skips within 5 steps
    fresh = SpikeGuard(sigma=3, window=5, min_history=3, max_skips=2)
    assert not fresh.skip(10) and not fresh.skip(15)  # 5 steps apart: out of the window
    fresh.load_state_dict(guard.state_dict())
    assert list(fresh.losses) == [2.0, 2.1, 1.9] and fresh.skips == [10, 14]


def test_nan_and_spike_are_skipped_and_logged(prepared, tmp_path):
    out = tmp_path / "run"
    cfg = tiny_train_config(prepared, out, max_steps=14, spike_min_history=5, spike_window=10, save_every=14)
    result = train(cfg, loss_hook=inject({4: math.nan, 11: 1000.0}))
    events = event_rows(out)
    assert [(e["step"], e["event"]) for e in events] == [(4, "skip"), (11, "skip")]
    assert "non-finite loss" in events[0]["message"] and "loss spike" in events[1]["message"]
    rows = {r["step"]: r for r in step_rows(out)}
    assert rows[4]["skipped"] and rows[4]["loss"] is None  # NaN is written as null: JSON has no NaN
    assert rows[11]["skipped"] and rows[11]["loss"] > 1000
    assert [r["step"] for r in step_rows(out)] == list(range(1, 15))  # the step counter still advanced
    assert optimizer_steps(latest_checkpoint(out / "checkpoints")) == 14 - 2  # two updates never applied
    assert result.lr_scale == 1.0 and math.isfinite(result.losses[14])


def test_repeated_spikes_roll_back_with_lower_lr(prepared, tmp_path):
    out = tmp_path / "run"
    cfg = tiny_train_config(prepared, out, max_steps=12, save_every=5, spike_min_history=3, spike_window=10,
                            max_spikes_before_rollback=2, rollback_lr_factor=0.5)
    result = train(cfg, loss_hook=inject({8: 1000.0, 9: math.nan}))
    events = event_rows(out)
    assert [(e["step"], e["event"]) for e in events] == [(8, "skip"), (9, "skip"), (9, "rollback")]
    assert events[2]["checkpoint"] == "step_00000005" and events[2]["lr_scale"] == 0.5
    assert result.lr_scale == 0.5 and result.step == 12
    rows = {r["step"]: r for r in step_rows(out)}
    assert rows[10]["lr"] == pytest.approx(0.5 * lr_at(10, cfg))
    # the weights and optimizer went back to step 5 (5 updates), then steps 10, 11, 12 were applied
    assert optimizer_steps(latest_checkpoint(out / "checkpoints")) == 5 + 3


def test_rollback_without_a_checkpoint_only_lowers_lr(prepared, tmp_path):
    out = tmp_path / "run"
    cfg = tiny_train_config(prepared, out, max_steps=4, max_spikes_before_rollback=1, rollback_lr_factor=0.25)
    result = train(cfg, loss_hook=inject({2: math.nan}))
    rollback = event_rows(out)[-1]
    assert rollback["event"] == "rollback" and rollback["checkpoint"] is None
    assert result.lr_scale == 0.25
