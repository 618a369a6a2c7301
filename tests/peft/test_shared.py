"""shared.py: the one adapter-folder writer every method saves with (its crash behaviour), PEFT's module-name
rule shared with camelid.quant, and the dependency rule of both packages (imports point down)."""

from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest
from model_zoo import random_model, tiny_config

import camelid
from camelid.peft import apply_lora, load_adapter, lora_layers, save_adapter, shared
from camelid.quant import name_matches, quantize_model
from camelid.quant import select_linears as quant_select_linears

# camelid subpackages each package may import; peft -> quant is QLoRA's deliberate edge (see peft/lora.py);
# triton_support and files are leaves (they import nothing of camelid): the Triton kernels share one, atomic
# writes with the usual permissions the other
ALLOWED = {"quant": {"config", "quant", "triton_support"}, "peft": {"config", "files", "peft", "quant"}}


def test_a_crash_while_overwriting_never_pairs_the_old_config_with_new_weights(tmp_path, monkeypatch):
    """A training run's final/ folder already holds an adapter and a tokenizer; the process dies between the two
    renames of the next save. The folder must then fail to load, not load the new weights with the old alpha."""
    folder = tmp_path / "final"
    folder.mkdir()
    (folder / "tokenizer.json").write_text("{}")
    save_adapter(apply_lora(random_model(tiny_config()), r=2, alpha=4), folder)
    newer = apply_lora(random_model(tiny_config(), seed=1), r=2, alpha=8)
    replace, calls = os.replace, []

    def crash_on_second_rename(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise OSError("simulated crash")
        replace(src, dst)

    monkeypatch.setattr(os, "replace", crash_on_second_rename)
    with pytest.raises(OSError, match="simulated crash"):
        save_adapter(newer, folder)
    monkeypatch.undo()
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_adapter(random_model(tiny_config()), folder)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]  # no temporary folder left behind
    save_adapter(newer, folder)  # the next save repairs it, and keeps the tokenizer
    assert {p.name for p in folder.iterdir()} == {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"}
    loaded = load_adapter(random_model(tiny_config()), folder)
    assert {layer.alpha for layer in lora_layers(loaded).values()} == {8}


@pytest.mark.parametrize("quantized", [False, True])
def test_load_adapter_keeps_an_eval_model_in_eval(quantized, tmp_path):
    """The new LoRA layers came in training mode: their dropout stayed on in a model loaded for inference, so
    `from_pretrained` + `load_adapter` + `generate_ids` (examples/demo.py) gave other logits than `camelid chat`,
    and other ones on each call, as PEFT's PeftModel.from_pretrained (eval by default) never does."""
    save_adapter(apply_lora(random_model(tiny_config()), r=2, alpha=4, dropout=0.5), tmp_path / "a")
    base = random_model(tiny_config()).eval()
    model = load_adapter(quantize_model(base, "int8") if quantized else base, tmp_path / "a")
    assert not any(m.training for m in model.modules())


def test_peft_and_quant_select_modules_by_one_rule():
    assert shared.name_matches is name_matches
    model = random_model(tiny_config())
    for patterns in (["q_proj", "down_proj"], r"model\.layers\.0\.mlp\..*", "all-linear"):
        assert set(quant_select_linears(model, patterns)) == set(shared.select_linears(model, patterns, "test"))


def _camelid_imports(file: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(file.read_text())):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module == "camelid":
            names += [f"camelid.{a.name}" for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.append(node.module)
    return [n for n in names if n.startswith("camelid.")]


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_imports_point_down(package):
    files = sorted((Path(camelid.__file__).parent / package).glob("*.py"))
    assert files
    for file in files:
        for name in _camelid_imports(file):
            assert name.split(".")[1] in ALLOWED[package], f"camelid/{package}/{file.name} imports {name}"


@pytest.mark.parametrize("method", ["lora", "ia3"])
def test_a_truncated_weights_file_is_one_line_error(method, tmp_path):
    """A half-downloaded adapter_model.safetensors: an AdapterError naming the file, not a SafetensorError."""
    from camelid.peft import ia3

    model = random_model(tiny_config())
    if method == "lora":
        save_adapter(apply_lora(model, r=2, alpha=4), tmp_path)
    else:
        ia3.save_ia3(ia3.apply_ia3(model), tmp_path)
    weights = tmp_path / shared.WEIGHTS_FILE
    for size in (weights.stat().st_size - 10, 3):
        os.truncate(weights, size)
        with pytest.raises(shared.AdapterError, match=f"{weights}: .*truncated or corrupt"):
            load_adapter(random_model(tiny_config()), tmp_path)
