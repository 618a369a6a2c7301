"""Helpers shared by the training tests (a module with a unique name: tests/ has several conftest.py files)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from camelid.train import TrainConfig

# a narrow model: 2 layers, hidden 32, so a training step takes milliseconds on one CPU thread
TINY_MODEL = dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_key_value_heads=1)


@dataclass
class Prepared:
    data: Path  # the prepared folder (meta.json + shards)
    tok: Path  # the tokenizer it was prepared with


def tiny_train_config(prepared: Prepared | None, out: Path, **overrides) -> TrainConfig:
    """A fast config; prepared=None for runs that bring their own model and batch source."""
    data = dict(data=str(prepared.data), tokenizer=str(prepared.tok)) if prepared else {}
    values = dict(model="tiny", model_overrides=dict(TINY_MODEL), **data, out=str(out), max_steps=10, micro_batch=4,
                  seq_len=32, lr=3e-3, warmup_steps=2, eval_every=0, save_every=0, tensorboard=False, log_every=1000,
                  device="cpu")
    return TrainConfig(**{**values, **overrides})


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def step_rows(out: Path) -> list[dict]:
    """The per-step rows of a run's metrics.jsonl."""
    return [r for r in _rows(out) if "loss" in r and "event" not in r]


def event_rows(out: Path) -> list[dict]:
    return [r for r in _rows(out) if "event" in r]


def optimizer_steps(checkpoint: Path) -> int:
    """How many updates AdamW applied, from a checkpoint's optimizer state."""
    state = torch.load(checkpoint / "optimizer.pt", weights_only=True)["state"]
    return int(next(iter(state.values()))["step"])
