"""`camelid pretrain` end to end in a subprocess, `camelid plot`, FLOPs and MFU."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from torch import nn
from train_helpers import step_rows, tiny_train_config

from camelid.checkpoint import from_pretrained
from camelid.cli import main
from camelid.config import get_preset
from camelid.model import Transformer
from camelid.tokenizer import Tokenizer
from camelid.train import train
from camelid.train.metrics import flops_per_token, matmul_params, peak_flops


def run_cli(*args: str, cwd=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "camelid", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=120)


def test_cli_pretrain_then_generate(prepared, tmp_path):
    out = tmp_path / "run"
    (tmp_path / "run.yaml").write_text("seq_len: 32\nmicro_batch: 2\neval_every: 3\nlr: 3e-3\ntensorboard: false\n"
                                       "model_overrides: {hidden_size: 32, intermediate_size: 64}\n")
    proc = run_cli("pretrain", "--config", str(tmp_path / "run.yaml"), "--model", "tiny", "--data", str(prepared.data),
                   "--tokenizer", str(prepared.tok), "--out", str(out), "--max-steps", "6", "--warmup-steps", "2",
                   "--device", "cpu", "--set", "model_overrides.num_attention_heads=2", "--set", "sample_every=6")
    assert proc.returncode == 0, proc.stderr
    assert f"wrote {out / 'final'}" in proc.stdout
    assert "sample:" in proc.stderr and "val loss" in proc.stderr
    model = from_pretrained(out / "final")
    assert (model.config.hidden_size, model.config.num_attention_heads, model.config.vocab_size) == (32, 2, 320)
    assert Tokenizer(out / "final").vocab_size == 300
    assert len(step_rows(out)) == 6
    assert main(["generate", "--model", str(out / "final"), "--prompt", "The llama", "--max-new-tokens", "4"]) == 0



def test_cli_bad_input_is_one_line(prepared, tmp_path, capsys):
    code = main(["pretrain", "--data", str(prepared.data), "--out", str(tmp_path / "x"), "--set", "warmup_step=3"])
    err = capsys.readouterr().err
    assert code == 2 and err.strip() == ("camelid pretrain: error: unknown config key 'warmup_step'; "
                                         "did you mean 'warmup_steps'?")
    assert main(["pretrain", "--model", "tiny", "--data", str(tmp_path / "none"), "--out", str(tmp_path / "x")]) == 2
    assert "no data folder" in capsys.readouterr().err and not (tmp_path / "x").exists()


@pytest.mark.parametrize("device, message", [("bogus", "device 'bogus' is not one torch knows"),
                                             ("cuda", "CUDA is not available here")])
def test_cli_bad_device_is_one_line(device, message, prepared, tmp_path, capsys):
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    code = main(["pretrain", "--data", str(prepared.data), "--out", str(tmp_path / "x"), "--device", device])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], err


def test_plot_writes_pngs(prepared, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "run"
    train(tiny_train_config(prepared, out, max_steps=6, eval_every=3))
    assert main(["plot", str(out)]) == 0
    printed = capsys.readouterr().out.split()
    assert sorted(os.path.basename(p) for p in printed) == ["loss.png", "lr.png", "throughput.png"]
    for path in printed:
        assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert main(["plot", str(tmp_path / "nothing")]) == 2


def test_flops_formula():
    config = get_preset("tiny")
    model = Transformer(config)
    # N = every Linear weight (lm_head included), no embedding table; tiny has no biases
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    assert matmul_params(config) == linear
    assert flops_per_token(config, 128) == 6 * linear + 12 * 2 * 64 * 128
    tied = config.replace(tie_word_embeddings=True)  # the tied table still does the lm_head matmul
    assert matmul_params(tied) == linear
    assert peak_flops(torch.device("cpu")) is None  # MFU is left out on CPU


def test_tensorboard_events_when_installed(prepared, tmp_path):
    pytest.importorskip("tensorboard")
    out = tmp_path / "run"
    train(tiny_train_config(prepared, out, max_steps=2, tensorboard=True))
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))


def test_finetune_takes_the_distributed_and_memory_flags(monkeypatch):
    """`camelid finetune --strategy/--compile/--activation-checkpointing` reach its TrainConfig (as for pretrain)."""
    from camelid.cli import build_parser, train_verbs

    seen = {}
    monkeypatch.setattr(train_verbs, "finetune", lambda cfg, spec: seen.update(cfg=cfg) or _NoResult())
    args = build_parser().parse_args(["finetune", "--base", "b", "--data", "d.json", "--strategy", "fsdp",
                                      "--compile", "--activation-checkpointing"])
    monkeypatch.setattr(train_verbs, "load_config", lambda path, spec, train: (None, train))
    args.func(args)
    assert seen["cfg"]["strategy"] == "fsdp" and seen["cfg"]["compile"] and seen["cfg"]["activation_checkpointing"]


class _NoResult:
    final_dir = None


def _finetune_cli(monkeypatch, *argv, result=None):
    """Run `camelid finetune ARGV` with the training replaced: (the FinetuneSpec and TrainConfig it got)."""
    from camelid.cli import build_parser, train_verbs

    seen = {}
    fake = lambda cfg, spec: seen.update(cfg=cfg, spec=spec) or result or _NoResult()  # noqa: E731
    monkeypatch.setattr(train_verbs, "finetune", fake)
    args = build_parser().parse_args(["finetune", "--base", "b", "--data", "d.json", *argv])
    args.func(args)
    return seen["spec"], seen["cfg"]


def test_finetune_set_takes_finetuning_keys(monkeypatch):
    """--set reaches the fine-tuning keys as --config does (lora_r, pack, ...), not only the TrainConfig ones."""
    spec, cfg = _finetune_cli(monkeypatch, "--set", "lora_r=4", "--set", "pack=true", "--set", "eval_every=3")
    assert spec.lora_r == 4 and spec.pack and cfg.eval_every == 3
    spec, _ = _finetune_cli(monkeypatch, "--set", "lora_r=4", "--lora-r", "2")  # the named flag wins
    assert spec.lora_r == 2


def test_finetune_full_points_chat_at_the_tuned_model(monkeypatch, capsys, tmp_path):
    from camelid.train.loop import TrainResult

    final = tmp_path / "run" / "final"
    result = TrainResult(step=2, tokens_seen=10, lr_scale=1.0, best_val_loss=None, out=tmp_path / "run",
                         final_dir=final, losses={2: 1.5})
    _finetune_cli(monkeypatch, "--method", "full", result=result)
    assert f"camelid chat --model {final})" in capsys.readouterr().out


@pytest.mark.parametrize("row", ["[1, 2]", '"text"', '{"loss": 1.0}'])
def test_plot_of_a_metrics_file_with_a_foreign_row_is_one_line(tmp_path, capsys, row):
    """A row that is JSON but not a metrics row (an object with a step) was a traceback (AttributeError)."""
    (tmp_path / "metrics.jsonl").write_text(row + '\n{"step": 1, "loss": 1.0, "lr": 1e-3, "tokens_per_s": 5.0}\n')
    assert main(["plot", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "metrics.jsonl:1: not a metrics row" in err[0], err
