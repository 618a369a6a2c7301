from __future__ import annotations

import json

import pytest

from camelid.cli import main
from camelid.config import get_preset
from camelid.plan.fit import fit, parse_memory


def _by_method(rows):
    return {r.method: r for r in rows}


@pytest.mark.parametrize("seq", [512, 1024])
def test_llama2_7b_lora_and_qlora_fit_24gb(seq):
    rows = _by_method(fit(get_preset("llama-2-7b"), parse_memory("24GB"), seq=seq, methods=("lora", "qlora", "full")))
    for method in ("lora", "qlora"):
        assert rows[method].fits and rows[method].micro_batch >= 1
        assert rows[method].micro_batch * rows[method].grad_accum >= 64
    # full fine-tuning of 7B with AdamW: 16 B/param of weights + gradients + states alone is ~108 GB
    assert not rows["full"].fits


def test_llama_65b_qlora_fits_48gb():
    rows = _by_method(fit(get_preset("llama-65b"), parse_memory("48GB"), seq=512, methods=("qlora", "lora")))
    assert rows["qlora"].fits and rows["qlora"].micro_batch >= 1  # the QLoRA paper's claim
    assert not rows["lora"].fits  # 65B bf16 weights alone are 130 GB
    # longer sequences need checkpointing, as the paper ran with
    (longer,) = fit(get_preset("llama-65b"), parse_memory("48GB"), seq=2048, methods=("qlora",))
    assert longer.fits and longer.checkpointing


def test_fp32_plans_qlora_and_bitfit():
    rows = _by_method(fit(get_preset("llama-2-7b"), 80e9, precision="fp32", methods=("qlora", "bitfit")))
    assert rows["qlora"].fits  # a CPU's precision: NF4 matmuls in bf16, the rest fp32 (it was refused)
    assert rows["bitfit"].fits  # zero biases are added where LLaMA has none


@pytest.mark.parametrize("text, value", [("24GB", 24e9), ("80GiB", 80 * 2**30), ("48", 48e9), ("1.5TB", 1.5e12)])
def test_parse_size(text, value):
    assert parse_memory(text) == value


def test_cli_plan_verbs_json(capsys, tmp_path):
    assert main(["plan", "fit", "--device-memory", "24GB", "--model", "llama-2-7b", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {m["method"]: m["fits"] for m in out["methods"]}["qlora"] is True
    assert main(["plan", "memory", "--model", "tiny", "--method", "lora", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["terms"]["weights"]["bytes"] > 0
    assert main(["plan", "scaling", "--params", "1B", "--json"]) == 0
    laws = {r["law"]: r for r in json.loads(capsys.readouterr().out)["laws"]}
    assert laws["20x"]["tokens"] == pytest.approx(2e10)


def test_cli_plot(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    assert main(["plan", "scaling", "--flops", "1e21", "--plot", str(tmp_path / "f.png")]) == 0
    assert (tmp_path / "f.png").stat().st_size > 1000
    # no extension: matplotlib adds .png, and the message names the file it wrote
    assert main(["plan", "scaling", "--flops", "1e21", "--plot", str(tmp_path / "frontier")]) == 0
    assert f"wrote {tmp_path / 'frontier.png'}\n" in capsys.readouterr().out
    assert (tmp_path / "frontier.png").is_file()


@pytest.mark.parametrize("args, needle", [
    (["plan", "memory", "--model", "nope", "--method", "lora"], "unknown preset"),
    (["plan", "memory", "--model", "./models/typo", "--method", "lora"], "no model folder at ./models/typo"),
    (["info", "--model", "./typo"], "no model folder at ./typo"),
    (["plan", "memory", "--model", "tiny", "--method", "full", "--seq", "0"], "--seq must be a positive"),
    (["plan", "memory", "--model", "tiny", "--method", "lora", "--kv-context", "64"], "--kv-context is for"),
    (["plan", "fit", "--device-memory=-3GB", "--model", "tiny"], "cannot read a memory size"),
    (["plan", "fit", "--device-memory", "1e400GB", "--model", "tiny"], "must be a finite positive"),
    (["plan", "scaling", "--flops", "1e20", "--tokens", "1e9"], "exactly one"),
    (["plan", "fit", "--device-memory", "24GB", "--model", "tiny", "--seq", "100000"], "positions end at 512"),
])
def test_bad_input_is_one_line_and_exit_2(args, needle, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1


def test_compiled_training_fits_a_larger_micro_batch():
    """Under torch.compile the norm outputs and the gated product are recomputed: a larger micro-batch fits the
    same device without checkpointing (the `compile: true` + `--auto` path plans with it)."""
    config, device = get_preset("tinyllama-1.1b"), parse_memory("24GB")
    (eager,) = fit(config, device, seq=2048, global_batch=64, precision="bf16-true", methods=("full",))
    (compiled,) = fit(config, device, seq=2048, global_batch=64, precision="bf16-true", methods=("full",),
                      compiled=True)
    assert compiled.fits and eager.fits and not compiled.checkpointing
    assert compiled.micro_batch >= eager.micro_batch
    assert compiled.bytes_needed / compiled.micro_batch < eager.bytes_needed / eager.micro_batch


def test_sizes_below_a_tenth_of_a_gigabyte_read_in_megabytes():
    from camelid.plan.fit import size_text

    assert (size_text(24e9), size_text(0.5e9), size_text(41e6)) == ("24.0 GB", "0.5 GB", "41.0 MB")
