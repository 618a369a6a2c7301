"""Checkpoints: atomic under a crash mid-save, pruning keeps the last K and the best, RNG round trip."""

from __future__ import annotations

import json
import os
import random

import numpy as np
import pytest
import torch
from train_helpers import tiny_train_config

from camelid.config import get_preset
from camelid.model import Transformer
from camelid.train import state, train
from camelid.train.guard import SpikeGuard
from camelid.train.optim import build_optimizer
from camelid.train.state import latest_checkpoint, list_checkpoints, load_checkpoint, prune


@pytest.mark.parametrize("where", ["rename", "write"])
def test_crash_mid_save_keeps_the_previous_checkpoint(prepared, tmp_path, monkeypatch, where):
    out = tmp_path / "run"
    cfg = tiny_train_config(prepared, out, max_steps=10, save_every=5)
    real_rename, real_rng = os.rename, state.rng_state

    def rename(src, dst):
        if str(src).endswith(".tmp-step_00000010"):
            raise OSError("disk full")  # the process dies before the folder gets its final name
        return real_rename(src, dst)

    def rng():  # dies half-way through writing the folder: weights and optimizer are there, the rest is not
        if (out / "checkpoints" / ".tmp-step_00000010").exists():
            raise OSError("killed")
        return real_rng()

    if where == "rename":
        monkeypatch.setattr(os, "rename", rename)
    else:
        monkeypatch.setattr(state, "rng_state", rng)
    with pytest.raises(OSError):
        train(cfg)
    monkeypatch.undo()

    root = out / "checkpoints"
    assert (root / ".tmp-step_00000010").is_dir()
    assert [p.name for p in list_checkpoints(root)] == ["step_00000005"]
    assert latest_checkpoint(root).name == "step_00000005"
    config = get_preset("tiny").replace(vocab_size=320, **cfg.model_overrides)
    model = Transformer(config)
    optimizer = build_optimizer(model, cfg, torch.device("cpu"))
    assert load_checkpoint(root / "step_00000005", model, optimizer)["step"] == 5

    resumed = train(tiny_train_config(prepared, out, max_steps=10, save_every=5, resume=True))
    assert resumed.step == 10 and not (root / ".tmp-step_00000010").exists()
    assert [p.name for p in list_checkpoints(root)] == ["step_00000005", "step_00000010"]


def test_a_crash_between_the_two_renames_of_a_resave_keeps_the_old_copy(tmp_path):
    """Saving a step that already has a checkpoint (a finished run resumed) renames the old copy aside, then the new
    one into place: a crash between the two leaves no step_N, a complete .old-step_N and a .tmp-step_N. The next run
    puts the old copy back (the new one may be partial), instead of deleting both."""
    root = tmp_path / "checkpoints"
    for name, marker in ((".old-step_00000010", "old"), (".tmp-step_00000010", "new"), (".tmp-step_00000015", "x"),
                         ("step_00000005", "five"), (".old-step_00000005", "stale")):
        (root / name).mkdir(parents=True)
        (root / name / "marker").write_text(marker)
    state.remove_partial(root)
    assert sorted(p.name for p in root.iterdir()) == ["step_00000005", "step_00000010"]
    assert (root / "step_00000010" / "marker").read_text() == "old"
    assert (root / "step_00000005" / "marker").read_text() == "five"


def test_prune_keeps_last_k_and_best(tmp_path):
    for step, val in [(1, 3.0), (2, 1.5), (3, 2.0), (4, None), (5, 2.5)]:
        folder = tmp_path / state.step_dir_name(step)
        folder.mkdir()
        (folder / "trainer.json").write_text(json.dumps({"step": step, "val_loss": val}))
    (tmp_path / "step_00000009").mkdir()  # no trainer.json: not a checkpoint, never touched
    deleted = prune(tmp_path, keep_last=2)
    assert sorted(p.name for p in deleted) == ["step_00000001", "step_00000003"]
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000002", "step_00000004", "step_00000005"]
    assert (tmp_path / "step_00000009").is_dir()


def test_rng_round_trip_through_weights_only_load(tmp_path):
    torch.save(state.rng_state(), tmp_path / "rng.pt")
    want = (random.random(), np.random.rand(), torch.rand(1))
    random.random(), np.random.rand(), torch.rand(3)  # move every generator on
    state.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert (random.random(), np.random.rand()) == want[:2] and torch.equal(torch.rand(1), want[2])


def test_tied_weights_round_trip(tmp_path):
    config = get_preset("tiny").replace(hidden_size=32, intermediate_size=64, num_attention_heads=2,
                                        num_key_value_heads=1, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = Transformer(config)
    cfg = tiny_train_config(None, tmp_path)
    optimizer = build_optimizer(model, cfg, torch.device("cpu"))
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    path = state.save_checkpoint(tmp_path, 3, model, optimizer, scaler, SpikeGuard(), {"tokens_seen": 0})
    torch.manual_seed(1)
    other = Transformer(config)
    load_checkpoint(path, other, build_optimizer(other, cfg, torch.device("cpu")))
    assert other.lm_head.weight is other.model.embed_tokens.weight  # still tied, in place
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), other.state_dict().values()))
