"""The `camelid` CLI end to end, in subprocesses, as a user runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import camelid

FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures"


def run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "camelid", *args], input=stdin, capture_output=True, text=True,
                          timeout=120, env=env)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "tiny"
    result = run("init", "--preset", "tiny", "--out", str(out), "--seed", "3")
    assert result.returncode == 0, result.stderr
    return out


def test_init_writes_a_loadable_folder(tiny_dir):
    names = {p.name for p in tiny_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json"} <= names
    model, tokenizer = camelid.from_pretrained(tiny_dir), camelid.Tokenizer(tiny_dir)
    # the config's special ids are the tokenizer's, so EOS really stops generation
    assert model.config.bos_token_id == tokenizer.bos_id and model.config.eos_token_id == tokenizer.eos_id
    assert model.num_parameters() == camelid.config.num_parameters(model.config)


def test_generate_streams_the_same_text_as_the_library(tiny_dir):
    result = run("generate", "--model", str(tiny_dir), "--prompt", "Hello", "--max-new-tokens", "12",
                 "--temperature", "0.9", "--seed", "5")
    assert result.returncode == 0, result.stderr
    model, tokenizer = camelid.from_pretrained(tiny_dir), camelid.Tokenizer(tiny_dir)
    expected = camelid.generate(model, tokenizer, "Hello", max_new_tokens=12, temperature=0.9, seed=5)
    assert result.stdout == expected + "\n"


def test_chat_keeps_history_and_exits(tiny_dir):
    result = run("chat", "--model", str(tiny_dir), "--max-new-tokens", "4", stdin="hi there\nand again\n/exit\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("bot> ") == 2


def test_chat_survives_a_message_longer_than_the_context(tiny_dir):
    """One message too long for the model is skipped with a note; the chat and its history go on."""
    result = run("chat", "--model", str(tiny_dir), "--max-new-tokens", "4",
                 stdin="hi there\n" + "x" * 600 + "\nand again\n/exit\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("bot> ") == 2 and "prompt of 618 tokens" in result.stderr


def test_info_preset_and_folder(tiny_dir):
    result = run("info", "--model", "llama-2-7b", "--json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["parameters"] == 6_738_415_616  # Llama-2-7B's published count
    assert info["bytes"]["bf16"] == 2 * info["parameters"]
    result = run("info", "--model", str(tiny_dir))
    assert result.returncode == 0 and "on disk" in result.stdout


def test_info_says_a_folder_is_quantized(tiny_dir, tmp_path):
    """A `camelid quantize` folder has the config of its original: info must say what its weights are."""
    from camelid.quant import quantize_model

    camelid.save_pretrained(quantize_model(camelid.from_pretrained(tiny_dir), "int8"), tmp_path / "q")
    result = run("info", "--model", str(tmp_path / "q"))
    assert result.returncode == 0 and "quantized       int8, 14 Linear layers" in result.stdout, result.stdout
    result = run("info", "--model", str(tmp_path / "q"), "--json")
    assert json.loads(result.stdout)["quantization"] == {"method": "int8", "layers": 14}
    assert "quantized" not in run("info", "--model", str(tiny_dir)).stdout


def test_tokenizer_train(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog\n" * 200)
    out = tmp_path / "tok"
    result = run("tokenizer", "train", "--input", str(corpus), "--vocab-size", "300", "--out", str(out))
    assert result.returncode == 0, result.stderr
    tokenizer = camelid.Tokenizer(out)
    assert 259 < tokenizer.vocab_size <= 300  # merges stop early when the corpus has no more pairs to join
    assert tokenizer.decode(tokenizer.encode("the lazy fox")) == "the lazy fox"


def test_tokenizer_train_reads_documents_as_data_prepare_does(tmp_path):
    """The quick start trains the tokenizer and prepares the data from the same folder: a .jsonl line is its "text",
    not its JSON syntax, and files data prepare skips are skipped here too."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "docs.jsonl").write_text("".join(json.dumps({"text": f"the llama {i} eats grass"}) + "\n"
                                               for i in range(200)))
    (corpus / "notes.bin").write_bytes(b"\xff\xfe not text")
    result = run("tokenizer", "train", "--input", str(corpus), "--vocab-size", "300", "--out", str(tmp_path / "tok"))
    assert result.returncode == 0, result.stderr
    tokenizer = camelid.Tokenizer(tmp_path / "tok")
    vocab = [tokenizer.id_to_token(i) for i in range(tokenizer.vocab_size)]
    assert not [t for t in vocab if len(t) > 1 and '"' in t]  # no merges learned from {"text": "..."} syntax


@pytest.mark.parametrize("make, needle", [
    (lambda d: None, "no .txt, .md, .jsonl, .parquet files"),  # an empty folder: no tokenizer from nothing
    (lambda d: (d / "bad.txt").write_bytes(b"ok\n\xff\xfe\n"), "bad.txt:2: not UTF-8"),
])
def test_tokenizer_train_bad_corpus_is_one_line(make, needle, tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    make(corpus)
    result = run("tokenizer", "train", "--input", str(corpus), "--vocab-size", "300", "--out", str(tmp_path / "tok"))
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert needle in result.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "tok").exists()


@pytest.mark.parametrize("args, needle", [
    (("generate", "--model", "/nonexistent/model", "--prompt", "x"), "/nonexistent/model"),
    (("info", "--model", "no-such-preset"), "no-such-preset"),
    (("tokenizer", "train", "--input", "/nonexistent.txt", "--vocab-size", "300", "--out", "/tmp/x"), "/nonexistent.txt"),
    (("generate", "--prompt", "x"), "--model"),  # argparse: a required flag is missing
])
def test_bad_input_is_one_line_and_exit_code_2(args, needle):
    result = run(*args)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert needle in lines[-1] and "Traceback" not in result.stderr


@pytest.mark.parametrize("verb", [("init", "--preset", "tiny"),
                                  ("tokenizer", "train", "--input", "CORPUS", "--vocab-size", "300")])
def test_out_that_is_a_file_is_one_line(verb, tmp_path, capsys):
    from camelid.cli import main

    (tmp_path / "corpus.txt").write_text("the llama eats grass\n" * 50)
    taken = tmp_path / "notes.txt"
    taken.write_text("keep me")
    args = [str(tmp_path / "corpus.txt") if a == "CORPUS" else a for a in verb]
    assert main([*args, "--out", str(taken)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "notes.txt" in err[-1] and taken.read_text() == "keep me"


def test_corrupt_checkpoint_is_one_clear_line(tiny_dir, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in tiny_dir.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    result = run("generate", "--model", str(broken), "--prompt", "x")
    assert result.returncode == 2
    assert "model.safetensors" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_generate_bad_sampling_value(tiny_dir):
    result = run("generate", "--model", str(tiny_dir), "--prompt", "x", "--top-p", "0")
    assert result.returncode == 2 and "top_p" in result.stderr


@pytest.mark.skipif(not (FIXTURES / "tokenizers" / "llama2").is_dir(), reason="../shared/fixtures not present")
def test_init_with_a_real_tokenizer(tmp_path):
    # Llama 2's 32,000 tokens do not fit the tiny preset's 512: the random model's table grows to fit them (it was
    # refused, and nothing let a user pick a vocab size)
    out = tmp_path / "m"
    result = run("init", "--preset", "tiny", "--out", str(out), "--tokenizer", str(FIXTURES / "tokenizers" / "llama2"))
    assert result.returncode == 0, result.stderr
    assert "vocab_size 32000: the preset's 512 grown to fit it" in result.stdout
    model, tokenizer = camelid.from_pretrained(out), camelid.Tokenizer(out)
    assert model.config.vocab_size == tokenizer.vocab_size == 32000
    ids = tokenizer.encode("Bonjour, 世界")
    assert model(torch.tensor([ids])).shape == (1, len(ids), 32000)


def test_merge_folds_a_lora_adapter(tiny_dir, tmp_path):
    from camelid.peft import apply_lora, merge_lora, save_adapter

    model = camelid.from_pretrained(tiny_dir)
    apply_lora(model, r=4, alpha=8, target_modules=("q_proj", "v_proj"))
    for name, p in model.named_parameters():
        if "lora_B" in name:  # B starts at zero: give the adapter a real effect
            p.data.normal_(std=0.05)
    save_adapter(model, tmp_path / "adapter")
    result = run("merge", "--base", str(tiny_dir), "--adapter", str(tmp_path / "adapter"), "--out", str(tmp_path / "m"))
    assert result.returncode == 0, result.stderr
    merged = camelid.from_pretrained(tmp_path / "m")
    ids = torch.tensor([[1, 5, 9, 30]])
    with torch.no_grad():
        expected = model(ids)
        assert not torch.allclose(expected, camelid.from_pretrained(tiny_dir)(ids))
        torch.testing.assert_close(merged(ids), merge_lora(model)(ids), atol=1e-5, rtol=0)
        torch.testing.assert_close(merged(ids), expected, atol=1e-5, rtol=0)
    assert (tmp_path / "m" / "tokenizer.json").is_file()


@pytest.mark.parametrize("device, message", [("bogus", "device 'bogus' is not one torch knows"),
                                             ("cuda", "CUDA is not available here")])
def test_bad_device_is_one_line_exit_2(device, message, tmp_path, capsys):
    from camelid.cli import main

    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert main(["init", "--preset", "tiny", "--out", str(tmp_path / "m")]) == 0
    capsys.readouterr()
    assert main(["generate", "--model", str(tmp_path / "m"), "--prompt", "hi", "--device", device]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def _template_file(folder: Path, name: str) -> None:
    (folder / "camelid_template.json").write_text(json.dumps({"template": name, "method": "full"}) + "\n")


def test_chat_template_choice(tiny_dir, tmp_path):
    """An explicit --template wins; else the template recorded in the adapter, else in the model folder (a full
    fine-tune's final/ or a merged model); else the tokenizer's own."""
    from argparse import Namespace

    from camelid.cli.model_verbs import _chat_template

    tokenizer = camelid.Tokenizer(tiny_dir)
    adapter, full = tmp_path / "adapter", tmp_path / "full"
    adapter.mkdir(), full.mkdir()
    _template_file(adapter, "alpaca"), _template_file(full, "vicuna")

    def name(model, adapter=None, template=None):
        args = Namespace(model=str(model), adapter=adapter and str(adapter), template=template)
        tpl = _chat_template(args, tokenizer)
        return tpl and tpl.name

    assert name(full) == "vicuna"
    assert name(full, adapter) == "alpaca"
    assert name(full, adapter, template="mistral") == "mistral"
    assert name(tiny_dir) is None  # a byte tokenizer has no chat_template: the plain transcript


def test_merge_keeps_the_recorded_template(tiny_dir, tmp_path):
    from camelid.peft import apply_lora, save_adapter

    model = camelid.from_pretrained(tiny_dir)
    apply_lora(model, r=2, alpha=4, target_modules=("q_proj",))
    save_adapter(model, tmp_path / "adapter")
    _template_file(tmp_path / "adapter", "alpaca")
    result = run("merge", "--base", str(tiny_dir), "--adapter", str(tmp_path / "adapter"), "--out", str(tmp_path / "m"))
    assert result.returncode == 0, result.stderr
    # `camelid chat --model m` prompts as the adapter was trained
    assert camelid.templates.recorded_template(tmp_path / "m") == "alpaca"


def test_merge_onto_a_quantized_base_says_the_output_is_dequantized(tiny_dir, tmp_path):
    """The merge folds the adapter into the dequantized weights (the model the adapter ran on), so the output is
    a float folder, about twice an int8 one: the verb says so rather than leave it to be found on disk."""
    from camelid.peft import apply_lora, load_adapter, save_adapter
    from camelid.quant import quantize_model

    camelid.save_pretrained(quantize_model(camelid.from_pretrained(tiny_dir), "int8"), tmp_path / "q")
    model = apply_lora(camelid.from_pretrained(tiny_dir), r=2, alpha=4, target_modules=("q_proj",))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(std=0.05)
    save_adapter(model, tmp_path / "adapter")
    result = run("merge", "--base", str(tmp_path / "q"), "--adapter", str(tmp_path / "adapter"), "--out",
                 str(tmp_path / "m"))
    assert result.returncode == 0, result.stderr
    assert "dequantized" in result.stdout and "camelid quantize" in result.stdout, result.stdout
    ids = torch.tensor([[1, 5, 9, 30]])
    with torch.no_grad():
        expected = load_adapter(camelid.from_pretrained(tmp_path / "q"), tmp_path / "adapter").eval()(ids)
        torch.testing.assert_close(camelid.from_pretrained(tmp_path / "m")(ids), expected, atol=1e-5, rtol=0)
    # every layer is float, not only the adapter's (k_proj, the MLP ...): the folder quantizes again as the verb says
    assert "quantization_config" not in json.loads((tmp_path / "m" / "config.json").read_text())
    result = run("quantize", "--model", str(tmp_path / "m"), "--method", "int8", "--out", str(tmp_path / "m8"))
    assert result.returncode == 0, result.stderr


def test_merge_refuses_to_write_over_its_inputs(tiny_dir, tmp_path):
    from camelid.peft import apply_lora, save_adapter

    model = camelid.from_pretrained(tiny_dir)
    apply_lora(model, r=2, alpha=4, target_modules=("q_proj",))
    save_adapter(model, tmp_path / "adapter")
    weights = (tiny_dir / "model.safetensors").read_bytes()
    for out in (tiny_dir, tmp_path / "adapter"):
        result = run("merge", "--base", str(tiny_dir), "--adapter", str(tmp_path / "adapter"), "--out", str(out))
        assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert "choose another --out" in result.stderr
    assert (tiny_dir / "model.safetensors").read_bytes() == weights  # the base is untouched
    assert not (tmp_path / "adapter" / "model.safetensors").exists()


def test_merge_refuses_a_folder_that_holds_another_model_unless_overwrite(tiny_dir, tmp_path):
    """Like `camelid init`: a merged model written over another model's folder would make it vanish silently."""
    from camelid.peft import apply_lora, save_adapter

    model = camelid.from_pretrained(tiny_dir)
    apply_lora(model, r=2, alpha=4, target_modules=("q_proj",))
    save_adapter(model, tmp_path / "adapter")
    other = tmp_path / "other"
    other.mkdir()
    (other / "model.safetensors").write_bytes(b"another model")
    (other / "chat_template.jinja").write_text("{{ 'the replaced model's template' }}")
    args = ("merge", "--base", str(tiny_dir), "--adapter", str(tmp_path / "adapter"), "--out", str(other))
    result = run(*args)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "is not empty" in result.stderr and "--overwrite" in result.stderr
    assert (other / "model.safetensors").read_bytes() == b"another model"
    assert run(*args, "--overwrite").returncode == 0
    assert camelid.from_pretrained(other) is not None
    assert not (other / "chat_template.jinja").exists()  # it would have become the merged model's template


def test_ctrl_c_is_one_line_and_exit_130(monkeypatch, capsys):
    """Ctrl-C in any verb: a line saying so and the shell's 128 + SIGINT, not a traceback."""
    from camelid.cli import main, model_verbs

    def interrupted(args):
        raise KeyboardInterrupt
    monkeypatch.setattr(model_verbs, "cmd_info", interrupted)
    assert main(["info", "--model", "tiny"]) == 130
    assert capsys.readouterr().err.strip() == "camelid info: interrupted"


def test_init_refuses_a_non_empty_out_unless_overwrite(tmp_path, capsys):
    """A second `init` into a model folder (or any folder holding files) must not silently replace it."""
    from camelid.cli import main

    out = tmp_path / "m"
    assert main(["init", "--preset", "tiny", "--out", str(out), "--seed", "1"]) == 0
    weights = (out / "model.safetensors").read_bytes()
    capsys.readouterr()
    assert main(["init", "--preset", "tiny", "--out", str(out), "--seed", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--overwrite" in err[0] and str(out) in err[0], err
    assert (out / "model.safetensors").read_bytes() == weights
    assert main(["init", "--preset", "tiny", "--out", str(out), "--seed", "2", "--overwrite"]) == 0
    assert (out / "model.safetensors").read_bytes() != weights
    (tmp_path / "empty").mkdir()  # an empty folder is fine
    assert main(["init", "--preset", "tiny", "--out", str(tmp_path / "empty")]) == 0


def test_init_overwrite_leaves_none_of_the_old_models_tokenizer_or_template(tmp_path, capsys):
    """--overwrite writes a new model: the old folder's chat template (chat_template.jinja, camelid_template.json)
    or GPT-2 style vocab files must not stay behind for the new tokenizer to pick up."""
    from camelid.cli import main
    from camelid.templates import TEMPLATE_FILE
    from camelid.tokenizer import Tokenizer

    out = tmp_path / "m"
    assert main(["init", "--preset", "tiny", "--out", str(out)]) == 0
    (out / "chat_template.jinja").write_text("{% for m in messages %}OLD {{ m.content }}{% endfor %}")
    (out / TEMPLATE_FILE).write_text('{"template": "llama3"}')
    (out / "vocab.json").write_text("{}")
    assert main(["init", "--preset", "tiny", "--out", str(out), "--overwrite"]) == 0
    assert Tokenizer(out).chat_template is None
    assert not (out / TEMPLATE_FILE).exists() and not (out / "vocab.json").exists()
