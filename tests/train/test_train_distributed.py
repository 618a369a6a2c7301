"""The distributed seam: 2 CPU processes under torchrun (gloo) train exactly like one process."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from train_helpers import step_rows, tiny_train_config

from camelid.train import train
from camelid.train.distributed import setup, unwrap


def test_single_process_setup():
    assert setup("cpu")[:2] == (0, 1)


@pytest.mark.slow
def test_ddp_two_processes_match_one(prepared, tmp_path):
    """2 ranks x micro_batch 1 x grad_accum 2 (no_sync on the first micro-batch) == 1 process x micro_batch 4."""
    steps = 5
    single = train(tiny_train_config(prepared, tmp_path / "single", max_steps=steps, eval_every=5))
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "camelid",
           "pretrain", "--model", "tiny", "--data", str(prepared.data), "--tokenizer", str(prepared.tok),
           "--out", str(out), "--max-steps", str(steps), "--micro-batch", "1", "--grad-accum", "2", "--seq-len", "32",
           "--lr", "3e-3", "--warmup-steps", "2", "--eval-every", "5", "--device", "cpu",
           "--set", "model_overrides.hidden_size=32", "--set", "model_overrides.intermediate_size=64",
           "--set", "model_overrides.num_attention_heads=2", "--set", "model_overrides.num_key_value_heads=1",
           "--set", "tensorboard=false"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("wrote") == 1  # rank 0 alone reports and saves
    ddp = {r["step"]: r for r in step_rows(out)}
    assert sorted(ddp) == list(range(1, steps + 1))  # one row per step: rank 0 alone writes metrics
    for step, loss in single.losses.items():
        assert abs(ddp[step]["loss"] - loss) < 1e-5
        assert ddp[step]["tokens"] == step * 4 * 32


def test_unwrap_plain_module():
    lin = torch.nn.Linear(2, 2)
    assert unwrap(lin) is lin
