"""`--profile` (a torch.profiler trace of a few steps), `--auto` (micro-batch, accumulation and checkpointing from
camelid.plan.fit), and the monitor's fields in metrics.jsonl."""

from __future__ import annotations

import json

import pytest
from train_helpers import TINY_MODEL, step_rows, tiny_train_config

from camelid.cli import main
from camelid.config import get_preset
from camelid.plan.fit import CONTEXT_BYTES, FRAGMENTATION, fit_training
from camelid.plan.memory import estimate
from camelid.train import train
from camelid.train.config import auto_fit

SEQ = 1024  # long enough that activations, not the 1 GB context margin's rounding, decide what fits
CONFIG = get_preset("tiny").replace(**TINY_MODEL, vocab_size=320, max_position_embeddings=SEQ)


def device_for(total_bytes: float, cuda: bool = True) -> float:
    """The device memory at which an estimate of total_bytes just fits (fit's margin included; a CPU keeps no
    CUDA context)."""
    return total_bytes * (1 + FRAGMENTATION) + (CONTEXT_BYTES if cuda else 0) + 1


def full(batch: int, checkpointing: bool, precision: str = "fp32") -> float:
    return estimate(CONFIG, "full", seq=SEQ, batch=batch, precision=precision, checkpointing=checkpointing).total


def test_fit_training_picks_the_largest_micro_batch_then_checkpointing():
    # room for micro-batch 4 without checkpointing, not 8: 4 x 4 steps of 16 sequences
    row = fit_training(CONFIG, device_for(full(4, False)), seq=SEQ, global_batch=16, precision="fp32")
    assert (row.micro_batch, row.grad_accum, row.checkpointing) == (4, 4, False)
    # less than micro-batch 1 needs without checkpointing: checkpointing on, and the largest batch that then fits
    device = device_for(full(1, False)) - 1e3
    assert device_for(full(1, True)) < device
    row = fit_training(CONFIG, device, seq=SEQ, global_batch=16, precision="fp32")
    assert row.checkpointing and row.micro_batch >= 1 and row.micro_batch * row.grad_accum == 16
    assert device_for(full(row.micro_batch, True)) <= device
    # the step keeps exactly global_batch sequences: 12 -> micro-batches of 4 at most (a power of two dividing 12)
    row = fit_training(CONFIG, 1e12, seq=SEQ, global_batch=12, precision="fp32")
    assert (row.micro_batch, row.grad_accum) == (4, 3)
    with pytest.raises(ValueError, match="does not fit in 1.0 GB: needs"):
        fit_training(CONFIG, 1e9, seq=SEQ, global_batch=16)


def test_auto_fit_sets_the_config(tmp_path):
    cfg = tiny_train_config(None, tmp_path, micro_batch=8, grad_accum=2, seq_len=SEQ)
    new, note = auto_fit(cfg, CONFIG, device_for(full(2, False)), "fp32")
    assert (new.micro_batch, new.grad_accum, new.activation_checkpointing) == (2, 8, False)
    assert "micro_batch 2 x grad_accum 8, activation checkpointing off" in note and "was micro_batch 8" in note
    with pytest.raises(ValueError, match="--auto: full training at seq 1024 does not fit in 0.5 GB"):
        auto_fit(cfg, CONFIG, 0.5e9, "fp32")
    # on a CPU no CUDA context takes its gigabyte: the same run fits in much less
    new, _ = auto_fit(cfg, CONFIG, device_for(full(2, False), cuda=False), "fp32", cuda=False)
    assert (new.micro_batch, new.grad_accum, new.activation_checkpointing) == (2, 8, False)
    assert device_for(full(2, False), cuda=False) < 0.5e9


def test_pretrain_auto_and_profile(prepared, tmp_path, capsys):
    out = tmp_path / "run"
    device = device_for(full(1, True, "fp32"), cuda=False) + 1e3  # fits only with checkpointing, at seq 1024
    cfg = tiny_train_config(prepared, out, max_steps=5, micro_batch=4, grad_accum=1, seq_len=SEQ,
                            auto_fit=True, device_memory=f"{device}B", profile_steps=2,
                            model_overrides={**TINY_MODEL, "max_position_embeddings": SEQ})
    result = train(cfg)
    err = capsys.readouterr().err
    assert "activation checkpointing on" in err and "profiler trace:" in err
    rows = step_rows(out)
    assert len(rows) == 5 and rows[-1]["tokens"] == 5 * 4 * SEQ  # the same 4 sequences per step, in pieces
    assert all(r["rss_gb"] > 0 and r["cpu_percent"] >= 0 for r in rows)  # the monitor's fields, every step
    trace = json.loads((out / "profile" / "trace.json").read_text())
    assert trace["traceEvents"] and (out / "profile" / "summary.txt").read_text().strip()
    assert result.step == 5


def test_cli_auto_needs_a_device_memory_on_cpu(prepared, tmp_path, capsys):
    code = main(["pretrain", "--model", "tiny", "--data", str(prepared.data), "--tokenizer", str(prepared.tok),
                 "--out", str(tmp_path / "x"), "--device", "cpu", "--auto", "--max-steps", "1"])
    assert code == 2 and "--auto on a CPU needs --device-memory" in capsys.readouterr().err
    code = main(["pretrain", "--model", "tiny", "--data", str(prepared.data), "--out", str(tmp_path / "y"),
                 "--auto", "--device-memory", "lots"])
    assert code == 2 and "cannot read a memory size from 'lots'" in capsys.readouterr().err


def test_cli_profile_flag(prepared, tmp_path):
    out = tmp_path / "run"
    shape = [arg for key, value in TINY_MODEL.items() for arg in ("--set", f"model_overrides.{key}={value}")]
    code = main(["pretrain", "--model", "tiny", "--data", str(prepared.data), "--tokenizer", str(prepared.tok),
                 "--out", str(out), "--device", "cpu", "--max-steps", "3", "--micro-batch", "2", "--seq-len", "32",
                 "--eval-every", "0", "--profile", "1", "--set", "tensorboard=false", "--set", "sample_every=0", *shape])
    assert code == 0 and (out / "profile" / "trace.json").is_file()


@pytest.mark.parametrize("max_steps, message", [
    (2, "profiler: the run has 2 step(s) to go, fewer than the 3 a trace needs"),
    (4, "profiler: 2 of the 5 steps asked for will be recorded"),
])
def test_profile_with_too_few_steps_says_so(prepared, tmp_path, capsys, max_steps, message):
    """The profiler skips one step and warms up on the next: a 2-step run recorded nothing but still reported a
    trace (an almost empty trace.json); a short run recorded fewer steps than asked without a word."""
    out = tmp_path / "run"
    train(tiny_train_config(prepared, out, max_steps=max_steps, profile_steps=5))
    err = capsys.readouterr().err
    assert message in err, err
    assert (out / "profile" / "trace.json").is_file() == (max_steps > 2)
    assert ("profiler trace:" in err) == (max_steps > 2)
