"""The issue's criterion, on a model trained by our pretraining pipeline: held-out perplexity rises by at most 1%
(int8) and 5% (int4 group 128, NF4); and the `camelid quantize` verb that reports it."""

from __future__ import annotations

import pytest
import torch
from model_zoo import random_model, tiny_config

from camelid.checkpoint import save_pretrained
from camelid.cli import main
from camelid.quant import quantize_model
from camelid.quantize import quantize_folder
from camelid.templates import TEMPLATE_FILE, recorded_template
from camelid.tokenizer import Tokenizer

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # torchao import noise

# bytes after / before for this model: its unquantized embeddings and lm_head (320 x 128 each, fp32) are a quarter
# of it, so the whole-model ratios sit well above the per-layer 1/4 (int8) and ~1/7.5 (4-bit)
BOUNDS = {"int8": (0.01, 0.40), "int4": (0.05, 0.30), "nf4": (0.05, 0.30)}


@pytest.mark.parametrize("method", list(BOUNDS))
def test_perplexity_rises_within_the_issue_bound(method, trained_model, tmp_path):
    max_rise, max_ratio = BOUNDS[method]
    report = quantize_folder(trained_model.folder, tmp_path / method, method, group_size=128,
                             eval_text=trained_model.heldout, eval_tokens=16384)
    print("\n".join(report.lines()))
    assert report.ppl_before < 20, "the fixture model did not learn (a byte-level model starts near 320)"
    assert report.ppl_after <= report.ppl_before * (1 + max_rise), report.lines()
    assert report.bytes_after < report.bytes_before * max_ratio
    assert report.layers == 14


def test_quantize_verb_reports_bytes_and_perplexity(trained_model, tmp_path, capsys):
    code = main(["quantize", "--model", str(trained_model.folder), "--method", "int4", "--group-size", "64",
                 "--out", str(tmp_path / "q"), "--eval-text", str(trained_model.heldout), "--eval-tokens", "4096",
                 "--quiet"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "int4, group_size=64, 14 Linear layers quantized" in out
    assert "bytes" in out and "saved" in out and "perplexity on the eval text" in out
    assert (tmp_path / "q" / "tokenizer.json").is_file()


@pytest.mark.parametrize("args,message", [
    (["--method", "int4", "--group-size", "100"], "group_size 100 must be an even number dividing"),
    (["--method", "int8", "--calibration", "x.txt"], "applies to int4 only"),
    (["--method", "nf4", "--group-size", "64"], "--group-size applies to int4 only"),
    (["--method", "int8", "--eval-text", "missing.txt"], "no eval text file at missing.txt"),
    (["--method", "int4", "--calibration", "missing.txt"], "no calibration text file at missing.txt"),
    (["--method", "int8", "--eval-text", "BINARY"], "BINARY is not UTF-8 text"),
    (["--method", "int4", "--calibration", "BINARY"], "BINARY is not UTF-8 text"),
])
def test_quantize_verb_bad_input_is_one_line_and_exit_2(args, message, trained_model, tmp_path, capsys):
    (tmp_path / "BINARY").write_bytes(b"\xff\xfe not text")
    args = [str(tmp_path / a) if a == "BINARY" else a for a in args]
    code = main(["quantize", "--model", str(trained_model.folder), "--out", str(tmp_path / "q"), "--quiet", *args])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1, err


def test_quantize_verb_missing_model_folder(tmp_path, capsys):
    code = main(["quantize", "--model", str(tmp_path / "none"), "--method", "int8", "--out", str(tmp_path / "q")])
    assert code == 2 and "no model folder" in capsys.readouterr().err


@pytest.mark.parametrize("args,message", [
    (["--out", "FILE"], "is a file, not a folder"),
    (["--device", "bogus"], "device 'bogus' is not one torch knows"),
    pytest.param(["--device", "cuda"], "CUDA is not available",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is here")),
    (["--model", "QUANTIZED"], "is already quantized (int8)"),
])
def test_quantize_verb_bad_out_or_device_is_one_line_and_exit_2(args, message, tmp_path, capsys):
    save_pretrained(random_model(tiny_config()), tmp_path / "model")
    save_pretrained(quantize_model(random_model(tiny_config()), "int8"), tmp_path / "QUANTIZED")
    (tmp_path / "FILE").write_text("not a folder")
    flags = {"--model": str(tmp_path / "model"), "--out": str(tmp_path / "q")}
    flags.update({k: str(tmp_path / v) if v in ("FILE", "QUANTIZED") else v for k, v in zip(args[::2], args[1::2])})
    code = main(["quantize", "--method", "int8", "--quiet", *(x for kv in flags.items() for x in kv)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1, err


@pytest.mark.parametrize("args", [["--eval-tokens", "100"], ["--eval-text", "SHORT"]])
def test_quantize_verb_too_little_eval_text_names_the_minimum(args, tmp_path, capsys):
    """Perplexity reads whole windows of 256 tokens (the model's context when shorter): fewer is a plain error."""
    assert main(["init", "--preset", "tiny", "--out", str(tmp_path / "model")]) == 0
    (tmp_path / "long.txt").write_text("To be, or not to be, that is the question. " * 40)
    (tmp_path / "SHORT").write_text("To be, or not to be.")
    flags = {"--eval-text": str(tmp_path / "long.txt")}
    flags.update({k: str(tmp_path / v) if v == "SHORT" else v for k, v in zip(args[::2], args[1::2])})
    capsys.readouterr()
    code = main(["quantize", "--model", str(tmp_path / "model"), "--method", "int8", "--out", str(tmp_path / "q"),
                 "--quiet", *(x for kv in flags.items() for x in kv)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "at least 256 tokens" in err and "--eval-tokens" in err, err


def test_quantize_refuses_a_non_empty_out_unless_overwrite(tmp_path, capsys):
    """As `camelid init`: another model's weights in --out must not vanish silently (they were replaced, exit 0)."""
    save_pretrained(random_model(tiny_config()), tmp_path / "model")
    save_pretrained(random_model(tiny_config()), tmp_path / "other")
    before = (tmp_path / "other" / "model.safetensors").read_bytes()
    args = ["quantize", "--model", str(tmp_path / "model"), "--method", "int8", "--out", str(tmp_path / "other"),
            "--quiet"]
    code = main(args)
    err = capsys.readouterr().err.strip()
    assert code == 2 and "is not empty" in err and len(err.splitlines()) == 1, err
    assert (tmp_path / "other" / "model.safetensors").read_bytes() == before
    (tmp_path / "other" / TEMPLATE_FILE).write_text('{"template": "llama3", "method": "full"}\n')
    assert main([*args, "--overwrite"]) == 0
    assert not (tmp_path / "other" / TEMPLATE_FILE).exists()  # the replaced model's template went with it
    (tmp_path / "empty").mkdir()  # an empty folder is a fine --out
    assert main(["quantize", "--model", str(tmp_path / "model"), "--method", "int8", "--out", str(tmp_path / "empty"),
                 "--quiet"]) == 0


def test_quantize_crash_while_copying_the_tokenizer_leaves_no_loadable_folder(tmp_path, monkeypatch):
    """config.json is written last: a folder that loads as a model is never one still missing its tokenizer."""
    import camelid.quantize

    save_pretrained(random_model(tiny_config()), tmp_path / "model")
    (tmp_path / "model" / TEMPLATE_FILE).write_text('{"template": "alpaca", "method": "full"}\n')

    def crash(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(camelid.quantize.shutil, "copyfile", crash)
    with pytest.raises(KeyboardInterrupt):
        quantize_folder(tmp_path / "model", tmp_path / "q", "int8")
    assert not (tmp_path / "q" / "config.json").exists()


def test_quantize_keeps_the_recorded_chat_template(tmp_path, capsys):
    """A full fine-tune's final/ or a `camelid merge` output names its chat template; the quantized copy must keep
    it, or `camelid chat --model QUANT` renders prompts with another template than the one the model learned."""
    save_pretrained(random_model(tiny_config()), tmp_path / "model")
    (tmp_path / "model" / TEMPLATE_FILE).write_text('{"template": "alpaca", "method": "full"}\n')
    assert main(["quantize", "--model", str(tmp_path / "model"), "--method", "int8", "--out", str(tmp_path / "q"),
                 "--quiet"]) == 0
    assert recorded_template(tmp_path / "q") == "alpaca"


@pytest.mark.parametrize("extra,message", [
    (dict(group_size=128), "group_size 128 must be an even number dividing"),  # tiny's layers have 64 inputs
    (dict(group_size=16, calibration="SHORT"), "GPTQ needs at least 64"),  # tiny_config: context 64
])
def test_quantize_refuses_bad_options_before_measuring_perplexity(extra, message, tmp_path, monkeypatch):
    """The perplexity pass before quantizing is the slow part on a big model: an int4 group that does not divide
    a layer, or too little calibration text, must fail before it, as too little eval text does."""
    import camelid.quantize

    save_pretrained(random_model(tiny_config()), tmp_path / "model")
    Tokenizer.train([], 256 + 3, show_progress=False).save(tmp_path / "model")
    (tmp_path / "long.txt").write_text("To be, or not to be, that is the question. " * 40)
    (tmp_path / "SHORT").write_text("To be, or not to be.")
    monkeypatch.setattr(camelid.quantize, "perplexity", lambda *a: pytest.fail("perplexity ran before the check"))
    extra = {k: str(tmp_path / v) if v == "SHORT" else v for k, v in extra.items()}
    with pytest.raises(ValueError, match=message):
        quantize_folder(tmp_path / "model", tmp_path / "q", "int4", eval_text=tmp_path / "long.txt", **extra)


def test_quantize_verb_shows_progress_while_measuring_perplexity(tmp_path, capsys):
    """The perplexity passes before and after are the long part on a big model (minutes on a CPU): each has its
    bar, as the layers have theirs."""
    assert main(["init", "--preset", "tiny", "--out", str(tmp_path / "model")]) == 0
    (tmp_path / "long.txt").write_text("To be, or not to be, that is the question. " * 120)
    capsys.readouterr()
    assert main(["quantize", "--model", str(tmp_path / "model"), "--method", "int8", "--out", str(tmp_path / "q"),
                 "--eval-text", str(tmp_path / "long.txt")]) == 0
    err = capsys.readouterr().err
    for bar in ("perplexity before", "quantizing to int8", "perplexity after"):
        assert bar in err, err
