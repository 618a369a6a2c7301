"""Multi-LoRA: one forward over a batch that mixes three adapters written by the real `peft` library (different ranks,
alphas, target modules, one rsLoRA, one with rank_pattern / alpha_pattern) and the base model equals, row by row,
each row run alone with that adapter loaded by camelid.peft.load_adapter (itself checked against peft in
tests/peft); bad adapters are refused with one clear ValueError and leave the model untouched."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from camelid.checkpoint import from_pretrained
from camelid.engine.multi_lora import MultiLoRA, MultiLoRALinear
from camelid.peft import load_adapter
from camelid.quant import quantization_config, quantize_model

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # transformers deprecation noise
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# three different adapters: ranks 4 / 8 / 2 (+ one module at rank 6), alphas, targets, one rsLoRA
ADAPTERS = {
    "a1": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "a2": dict(r=8, lora_alpha=16, target_modules=ALL, use_rslora=True),
    "a3": dict(r=2, lora_alpha=4, target_modules=["o_proj", "gate_proj", "down_proj"],
               rank_pattern={"down_proj": 6}, alpha_pattern={"gate_proj": 3.0}),
}
T = 10
# rows: a1, a2, base, a3, a1 again (one adapter on rows that are not next to each other)
ROW_ADAPTERS = ["a1", "a2", None, "a3", "a1"]
TOKENS = torch.randint(0, 128, (len(ROW_ADAPTERS), T), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def peft():
    return pytest.importorskip("peft")


def make_peft_adapter(peft, transformers, base_path, out, seed: int, **config) -> None:
    """Save a PEFT LoRA adapter with random non-zero weights (B starts at zero, which would make the test vacuous).
    Seeded whole (peft draws A from the global generator), so the adapter does not depend on which tests ran first."""
    torch.manual_seed(seed)
    hf = transformers.AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32).eval()
    model = peft.get_peft_model(hf, peft.LoraConfig(task_type="CAUSAL_LM", **config))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    model.save_pretrained(out)


@pytest.fixture(scope="module")
def setup(hf_checkpoint, transformers, peft, tmp_path_factory):
    """(base checkpoint folder, {name: adapter folder}, {name: expected logits of every row run alone})."""
    base = hf_checkpoint("llama")
    root = tmp_path_factory.mktemp("multi-lora")
    folders = {}
    for i, (name, config) in enumerate(ADAPTERS.items()):
        folders[name] = root / name
        make_peft_adapter(peft, transformers, base, folders[name], seed=i, **config)
    folders["dora"] = root / "dora"
    make_peft_adapter(peft, transformers, base, folders["dora"], seed=9, r=4, lora_alpha=8,
                      target_modules=["q_proj"], use_dora=True)
    expected = {}
    with torch.no_grad():
        for name in [None, *ADAPTERS]:
            model = from_pretrained(base) if name is None else load_adapter(from_pretrained(base), folders[name])
            expected[name] = model(TOKENS)  # (rows, T, V): each row alone with this adapter (or the base)
    return base, folders, expected


def mixed_forward(model, ml: MultiLoRA, row_adapters=ROW_ADAPTERS) -> torch.Tensor:
    ml.set_token_slots(ml.token_slots_for(row_adapters, [T] * len(row_adapters)))
    with torch.no_grad():
        return model(TOKENS)


def check_rows(logits, expected, row_adapters=ROW_ADAPTERS) -> None:
    for i, name in enumerate(row_adapters):
        torch.testing.assert_close(logits[i], expected[name][i], rtol=0, atol=1e-5, msg=f"row {i} ({name})")


def test_mixed_batch_equals_each_adapter_alone(setup):
    base, folders, expected = setup
    model = from_pretrained(base)
    keys = set(model.state_dict())
    ml = MultiLoRA(model, max_adapters=4)
    assert not any(isinstance(m, MultiLoRALinear) for m in model.modules())  # wrapped lazily
    for name in ADAPTERS:
        ml.add(name, folders[name])
    assert [ml.slot(n) for n in ADAPTERS] == [0, 1, 2] and ml.slot(None) == -1
    assert set(model.state_dict()) == keys  # same module names, adapters kept out of the checkpoint
    assert isinstance(model.get_submodule("model.layers.1.mlp.up_proj"), MultiLoRALinear)  # a2 only
    # the rows differ from each other: the adapters really change the logits
    assert (expected["a1"][0] - expected[None][0]).abs().max() > 1e-2
    assert (expected["a3"][3] - expected[None][3]).abs().max() > 1e-2

    check_rows(mixed_forward(model, ml), expected)
    # one adapter on every row (the no-gather path), and a batch with no adapter rows
    check_rows(mixed_forward(model, ml, ["a2"] * 5), expected, ["a2"] * 5)
    check_rows(mixed_forward(model, ml, [None] * 5), expected, [None] * 5)
    ml.set_token_slots(None)  # cleared: the plain model again
    with torch.no_grad():
        torch.testing.assert_close(model(TOKENS), expected[None], rtol=0, atol=1e-5)

    # slots per flattened row: a packed (1, N) batch sees the same rows
    ml.set_token_slots(ml.token_slots_for(ROW_ADAPTERS, [T] * 5))
    with torch.no_grad():
        packed = model(TOKENS.reshape(1, -1))
    torch.testing.assert_close(packed[0, :T], expected["a1"][0], rtol=0, atol=1e-5)  # row 0: no context before it
    with torch.no_grad(), pytest.raises(RuntimeError, match="set_token_slots gave 50 rows"):
        model(TOKENS[:2])


def test_remove_then_add_again(setup):
    base, folders, expected = setup
    model = from_pretrained(base)
    ml = MultiLoRA(model, max_adapters=3)
    for name in ADAPTERS:
        ml.add(name, folders[name])
    ml.remove("a2")
    assert (ml.slot("a1"), ml.slot("a3")) == (0, 2)
    with pytest.raises(ValueError, match="unknown adapter 'a2'"):
        ml.slot("a2")
    with pytest.raises(ValueError, match="token slot 1 holds no adapter"):
        ml.set_token_slots(torch.tensor([1, 0, -1]))
    check_rows(mixed_forward(model, ml, ["a1", "a3", None, "a3", "a1"]), expected, ["a1", "a3", None, "a3", "a1"])
    # the freed slot is reused, here by the rank-4 adapter where the rank-8 one was (stale padding must not leak)
    assert ml.add("a1-again", folders["a1"]) == 1
    ml.remove("a1")
    assert ml.add("a2", folders["a2"]) == 0
    expected_again = {**expected, "a1-again": expected["a1"]}
    rows = ["a1-again", "a2", None, "a3", "a1-again"]
    check_rows(mixed_forward(model, ml, rows), expected_again, rows)


def test_bad_adapters_raise_one_clear_error(setup, tmp_path):
    base, folders, expected = setup
    model = from_pretrained(base)
    ml = MultiLoRA(model, max_adapters=2)
    ml.add("a1", folders["a1"])

    def broken(name: str, config_change=None, tensors_change=None):
        folder = tmp_path / name
        folder.mkdir()
        config = json.loads((folders["a3"] / "adapter_config.json").read_text())
        (folder / "adapter_config.json").write_text(json.dumps({**config, **(config_change or {})}))
        tensors = load_file(folders["a3"] / "adapter_model.safetensors")
        save_file(tensors_change(tensors) if tensors_change else tensors, folder / "adapter_model.safetensors")
        return folder

    def truncated(name: str):  # a download cut short
        folder = broken(name)
        weights = folder / "adapter_model.safetensors"
        weights.write_bytes(weights.read_bytes()[:100])
        return folder

    def rename(tensors):  # layer 7 does not exist in a 2-layer model
        return {k.replace("layers.1.", "layers.7."): v for k, v in tensors.items()}

    def widen(tensors):
        key = "base_model.model.model.layers.0.self_attn.o_proj.lora_A.weight"
        return {**tensors, key: torch.zeros(2, 65)}

    cases = [
        ("a1", folders["a2"], "'a1' is already loaded"),
        ("dora", folders["dora"], "DoRA adapter .*unsupported for multi-LoRA"),
        ("ia3", broken("ia3", {"peft_type": "IA3"}), "cannot be loaded for multi-LoRA: .*peft_type 'IA3'"),
        ("cut", truncated("cut"), "cannot be loaded for multi-LoRA: .*adapter_model.safetensors"),
        ("absent", broken("absent", tensors_change=rename), "targets 'model.layers.7.*which this model does not have"),
        ("shape", broken("shape", tensors_change=widen), r"o_proj has lora_A \(2, 65\).*needs \(r, 64\)"),
    ]
    state = {n: m.lora_A.clone() for n, m in model.named_modules() if isinstance(m, MultiLoRALinear)}
    for name, folder, message in cases:
        with pytest.raises(ValueError, match=message):
            ml.add(name, folder)
    # nothing half-applied: the same adapters, the same wrapped layers, holding the same tensors
    assert ml.slot("a1") == 0
    for name in ("dora", "ia3", "cut", "absent", "shape"):
        with pytest.raises(ValueError, match=f"unknown adapter '{name}'"):
            ml.slot(name)
    assert {n: m.lora_A for n, m in model.named_modules() if isinstance(m, MultiLoRALinear)}.keys() == state.keys()
    for n, before in state.items():
        assert torch.equal(model.get_submodule(n).lora_A, before), n
    ml.add("a3", folders["a3"])
    with pytest.raises(ValueError, match="all 2 adapter slots are in use"):
        ml.add("a2", folders["a2"])
    with pytest.raises(ValueError, match="unknown adapter 'nope'"):
        ml.token_slots_for(["a1", "nope"], [1, 1])


def test_adapters_follow_the_base_dtype(setup):
    base, folders, expected = setup
    model = from_pretrained(base).to(torch.bfloat16)
    ml = MultiLoRA(model)
    ml.add("a2", folders["a2"])
    layer = model.get_submodule("model.layers.0.self_attn.q_proj")
    assert layer.lora_A.dtype == layer.lora_B.dtype == torch.bfloat16
    logits = mixed_forward(model, ml, [None, "a2", None, "a2", None]).float()
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
    # bf16 keeps ~3 significant digits, compounded over the layers: close to the fp32 reference on average (measured
    # 0.015 mean, 0.1 max here, against a mean adapter effect of 0.93), and far closer to a2's row than to the base's
    for row, name in ((1, "a2"), (2, None)):
        error = (logits[row] - expected[name][row]).abs()
        assert error.mean() < 0.05 and error.max() < 0.5, (name, error.mean(), error.max())
    assert (logits[1] - expected["a2"][1]).abs().mean() < 0.1 * (logits[1] - expected[None][1]).abs().mean()


def quantized(base, method: str = "int8"):
    return quantize_model(from_pretrained(base), method)


@pytest.mark.parametrize("method", ["int8", "nf4"])
def test_adapters_over_a_quantized_base(setup, method):
    """Serving QLoRA-style: adapters on a `camelid quantize`d base; each row equals that adapter loaded alone with
    load_adapter on the same quantized model, and the quantized checkpoint (keys, codes, config) is untouched."""
    base, folders, _ = setup
    rows = ["a1", "a2", None, "a2", "a1"]
    with torch.no_grad():
        expected = {name: (quantized(base, method) if name is None
                           else load_adapter(quantized(base, method), folders[name]))(TOKENS)
                    for name in [None, "a1", "a2"]}
    model = quantized(base, method)
    before = model.state_dict()
    config = quantization_config(model)
    ml = MultiLoRA(model, max_adapters=2)
    ml.add("a1", folders["a1"])
    ml.add("a2", folders["a2"])
    layer = model.get_submodule("model.layers.0.self_attn.q_proj")
    assert isinstance(layer, MultiLoRALinear) and layer.quant_format[0].method == method
    after = model.state_dict()
    assert list(after) == list(before)
    for key, tensor in before.items():
        assert after[key].dtype == tensor.dtype and torch.equal(after[key], tensor), key
    assert quantization_config(model) == config  # save_pretrained still writes the same quantized folder
    # the comparison has teeth: the adapters change the quantized model's logits
    assert (expected["a1"][0] - expected[None][0]).abs().max() > 1e-2
    check_rows(mixed_forward(model, ml, rows), expected, rows)
    check_rows(mixed_forward(model, ml, ["a2"] * 5), expected, ["a2"] * 5)


@pytest.mark.parametrize("config, message", [
    (dict(target_modules=["q_proj"], modules_to_save=["lm_head"]), r"replaces the base tensor lm_head\.weight"),
    (dict(target_modules=["q_proj"], modules_to_save=["model.norm"]), r"replaces the base tensor model\.norm\.weight"),
    (dict(target_modules=["q_proj", "embed_tokens"]), "LoRA on the embedding 'model.embed_tokens'"),
    (dict(target_modules=["q_proj", "lm_head"]), "targets 'lm_head'"),
    (dict(target_modules=["q_proj"], trainable_token_indices=[3, 5]),
     r"replaces the base tensor model\.embed_tokens\.trainable_tokens_delta"),
])
def test_adapters_that_change_the_base_for_everyone_are_refused(config, message, setup, transformers, peft, tmp_path):
    """They load with load_adapter (and merge), but a batch's other requests would see them: refused at add."""
    base, folders, expected = setup
    make_peft_adapter(peft, transformers, base, tmp_path, seed=3, r=4, lora_alpha=8, **config)
    model = from_pretrained(base)
    ml = MultiLoRA(model, max_adapters=2)
    with pytest.raises(ValueError, match=message):
        ml.add("x", tmp_path)
    assert not any(isinstance(m, MultiLoRALinear) for m in model.modules())
    with torch.no_grad():
        torch.testing.assert_close(model(TOKENS), expected[None], rtol=0, atol=0)


def test_an_adapter_with_trained_biases_is_refused(hf_checkpoint, transformers, peft, tmp_path):
    """bias="lora_only" on Qwen2 (q/k/v biases): the biases ride with the LoRA tensors of q_proj; serving only the
    LoRA part would silently drop them."""
    base = hf_checkpoint("qwen2")
    make_peft_adapter(peft, transformers, base, tmp_path, seed=4, r=4, lora_alpha=8, target_modules=["q_proj"],
                      bias="lora_only")
    with pytest.raises(ValueError, match=r"replaces the base tensor model\.layers\.0\.self_attn\.q_proj\.bias"):
        MultiLoRA(from_pretrained(base)).add("x", tmp_path)
