"""Quantized folders: save -> from_pretrained gives back the same tensors bit for bit and the same logits, the
config records what was quantized, and generation runs from the folder (what the engine loads)."""

from __future__ import annotations

import json

import pytest
import torch
from model_zoo import random_model, tiny_config
from torch import nn

from camelid.checkpoint import from_pretrained, save_pretrained
from camelid.config import ModelConfig
from camelid.generate import generate_ids
from camelid.quant import FORMATS, QuantLinear, dequantize_model, model_nbytes, quantize_model

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # torchao import noise
TOKENS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
# hidden 128 / intermediate 256: groups of 128 everywhere; 2 KV heads: k_proj / v_proj take NF4's padding path
CONFIG = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2)


def quantized(method: str, **overrides) -> nn.Module:
    model = random_model(tiny_config(**{**CONFIG, **overrides}))
    return quantize_model(model, method, group_size=128)


@pytest.mark.parametrize("method", list(FORMATS))
def test_save_then_load_is_bit_exact(method, tmp_path):
    model = quantized(method)
    save_pretrained(model, tmp_path)
    loaded = from_pretrained(tmp_path)
    want, got = model.state_dict(), loaded.state_dict()
    assert want.keys() == got.keys()
    for key in want:
        assert want[key].dtype == got[key].dtype and torch.equal(want[key], got[key]), key
    with torch.no_grad():
        assert torch.equal(model(TOKENS), loaded(TOKENS))
    assert isinstance(loaded.model.layers[1].mlp.down_proj, FORMATS[method])
    assert type(loaded.lm_head) is nn.Linear

    config = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "camelid" and config["method"] == method
    linears = [f"model.layers.{i}.{m}" for i in range(2) for m in
               ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
    assert config["modules"] == sorted(linears)  # lm_head and embeddings are not quantized
    assert config.get("group_size") == (128 if method == "int4" else None)


def test_bf16_model_keeps_quantized_dtypes_and_sharding_works(tmp_path):
    model = quantized("int4")
    save_pretrained(model, tmp_path, dtype=torch.bfloat16, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    loaded = from_pretrained(tmp_path)
    layer = loaded.model.layers[0].self_attn.q_proj
    assert layer.weight.dtype == torch.uint8 and layer.weight_scale.dtype == torch.float16
    assert loaded.model.embed_tokens.weight.dtype == torch.bfloat16
    assert ModelConfig.from_hf(tmp_path).dtype == "bfloat16"
    for key, value in model.state_dict().items():
        if "proj.weight" in key:  # packed codes: untouched by the dtype
            assert torch.equal(value, loaded.state_dict()[key]), key


def test_memory_saved(tmp_path):
    model = random_model(tiny_config(**CONFIG))
    before = model_nbytes(model)
    linear_bytes = sum(m.weight.numel() * 4 for n, m in model.named_modules()
                       if isinstance(m, nn.Linear) and n != "lm_head")
    after = {method: model_nbytes(quantized(method)) for method in FORMATS}
    # int8 1 byte + fp32 row scale; int4 half a byte + 2 fp16 per 128; nf4 ~4.13 bits (+ padding on k/v)
    assert after["int8"] < before - linear_bytes * 0.74
    assert after["int4"] < before - linear_bytes * 0.86
    assert after["nf4"] < before - linear_bytes * 0.85


def test_generation_from_a_quantized_folder_matches_the_in_memory_model(tmp_path):
    model = quantized("int4").eval()
    save_pretrained(model, tmp_path)
    loaded = from_pretrained(tmp_path)
    prompts = [TOKENS[0, :5].tolist(), TOKENS[1, :3].tolist()]
    assert generate_ids(loaded, prompts, 8) == generate_ids(model, prompts, 8)


def test_a_quantization_config_naming_a_missing_module_is_a_clear_error(tmp_path):
    save_pretrained(quantized("int8"), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization_config"]["modules"].append("model.layers.9.self_attn.q_proj")
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"names module 'model.layers.9.self_attn.q_proj'"):
        from_pretrained(tmp_path)
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="'gptq'"):
        from_pretrained(tmp_path)


@pytest.mark.parametrize("change, needle", [
    (lambda q: "int4", "object"),  # not an object: was an AttributeError traceback
    (lambda q: {**q, "group_size": "128"}, "group_size"),  # an option of the wrong type: was a TypeError traceback
    (lambda q: {**q, "modules": q["modules"][0]}, "list"),  # one name, not a list: was "names module 'm'"
])
def test_a_hand_edited_quantization_config_is_one_clear_error(tmp_path, change, needle):
    save_pretrained(quantized("int4"), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization_config"] = change(config["quantization_config"])
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="config.json: quantization_config") as e:
        from_pretrained(tmp_path)
    assert needle in str(e.value)


def test_quantized_layers_are_frozen():
    model = quantized("nf4")
    for m in model.modules():
        if isinstance(m, QuantLinear):
            assert not any(p.requires_grad for p in m.parameters())


@pytest.mark.parametrize("method", list(FORMATS))
def test_casting_a_quantized_model_keeps_codes_and_scales_exact(method):
    """`model.to(torch.bfloat16)` (the engine's dtype=...) casts the float weights; the scales must not be rounded."""
    model = quantized(method)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.to(torch.bfloat16)
    after = model.state_dict()
    layer = model.model.layers[0].mlp.down_proj
    quant_keys = {f"model.layers.0.mlp.down_proj.{name}" for name, _ in layer.named_buffers()}
    for key in quant_keys:
        assert after[key].dtype == before[key].dtype and torch.equal(after[key], before[key]), key
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    with torch.no_grad():
        logits = model(TOKENS)
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()


@pytest.mark.parametrize("method", list(FORMATS))
def test_dequantize_model_gives_linears_in_the_model_dtype(method):
    # LLaMA's Linear layers have no bias, so a quantized layer alone cannot tell the model's dtype
    model = quantized(method).to(torch.bfloat16)
    want_weight = model.model.layers[0].self_attn.q_proj.dequantize(torch.bfloat16)
    with torch.no_grad():
        want = model(TOKENS).float()
        dequantize_model(model)
        got = model(TOKENS).float()
    layer = model.model.layers[0].self_attn.q_proj
    assert type(layer) is nn.Linear and torch.equal(layer.weight, want_weight)
    # int4 / nf4 run the same bf16 matmul (equal); int8 scales after its matmul: bf16 rounding differs (~2%)
    assert (got - want).norm() / want.norm() < 0.05
