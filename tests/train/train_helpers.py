"""Helpers shared by the training tests (a module with a unique name: tests/ has several conftest.py files)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
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


def torchrun_pretrain(prepared: Prepared, out: Path, *flags: str, nproc: int = 2) -> subprocess.CompletedProcess:
    """`torchrun --nproc-per-node N -m camelid pretrain` on CPU (gloo), with tiny_train_config's settings as flags;
    `flags` add to them or override them (a later flag wins). Fails the test with the tail of stderr on an error."""
    shape = [arg for key, value in TINY_MODEL.items() for arg in ("--set", f"model_overrides.{key}={value}")]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           "-m", "camelid", "pretrain", "--model", "tiny", "--data", str(prepared.data),
           "--tokenizer", str(prepared.tok),
           "--out", str(out), "--max-steps", "10", "--micro-batch", "4", "--seq-len", "32", "--lr", "3e-3",
           "--warmup-steps", "2", "--eval-every", "0", "--save-every", "0", "--device", "cpu", *shape,
           "--set", "tensorboard=false", "--set", "log_every=1000", *flags]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def step_rows(out: Path) -> list[dict]:
    """The per-step rows of a run's metrics.jsonl."""
    return [r for r in _rows(out) if "loss" in r and "event" not in r]


def event_rows(out: Path) -> list[dict]:
    return [r for r in _rows(out) if "event" in r]


def eval_rows(out: Path) -> dict[int, float]:
    """step -> val_loss of a run's evaluations."""
    return {r["step"]: r["val_loss"] for r in _rows(out) if "val_loss" in r}


def sample_rows(out: Path) -> list[dict]:
    return [r for r in _rows(out) if "sample" in r]


def optimizer_steps(checkpoint: Path) -> int:
    """How many updates AdamW applied, from a checkpoint's optimizer state."""
    state = torch.load(checkpoint / "optimizer.pt", weights_only=True)["state"]
    return int(next(iter(state.values()))["step"])


def write_finetune_base(root: Path) -> tuple[Path, Path]:
    """A tiny random LLaMA with a byte-level BPE trained here (root/base), and 40 Alpaca records (root/alpaca.json):
    (model folder, data file)."""
    from camelid.checkpoint import save_pretrained
    from camelid.config import PRESETS
    from camelid.model import Transformer
    from camelid.tokenizer import Tokenizer

    corpus = root / "corpus.txt"
    corpus.write_text("Below is an instruction that describes a task. Write a response that appropriately completes "
                      "the request.\n\n### Instruction:\nWhat is 2+3?\n\n### Response:\n5\n\n" * 20)
    tokenizer = Tokenizer.train([corpus], 300, show_progress=False)
    config = PRESETS["tiny"].replace(vocab_size=320, bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id,
                                     pad_token_id=tokenizer.pad_id)
    torch.manual_seed(0)
    model = Transformer(config)
    with torch.no_grad():  # at init, logits are too flat for adapters (lm_head is not one) to sharpen them quickly
        model.lm_head.weight.mul_(10)
    folder = save_pretrained(model, root / "base")
    tokenizer.save(folder)
    records = [{"instruction": f"What is {a}+{b}?", "input": "", "output": str(a + b)}
               for a in range(8) for b in range(5)]
    data = root / "alpaca.json"
    data.write_text(json.dumps(records))
    return folder, data
