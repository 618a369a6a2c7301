"""BitFit: zero biases added where LLaMA has none, only biases train, a save / load round trip, and the logits of a
BitFit model checked against transformers' Llama with attention_bias / mlp_bias holding the same biases."""

from __future__ import annotations

import json

import pytest
import torch
from method_helpers import (TOKENS, assert_cached_generation_matches_full_forward, logits, perturb_trainable_,
                            train_briefly)

from camelid.checkpoint import from_pretrained, save_pretrained
from camelid.peft import count_parameters
from camelid.peft.bitfit import apply_bitfit, bitfit_layers, bitfit_state_dict, has_bitfit, load_bitfit, save_bitfit

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def test_fresh_biases_are_zero_and_only_they_train(hf_checkpoint):
    model = from_pretrained(hf_checkpoint("llama"))
    before, total_before = logits(model), count_parameters(model)[1]
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    apply_bitfit(model)
    layers = bitfit_layers(model)
    assert has_bitfit(model) and len(layers) == 2 * 7 and "lm_head" not in layers  # all-linear, as PEFT
    torch.testing.assert_close(logits(model), before, rtol=0, atol=0)
    trainable, total = count_parameters(model)
    assert trainable == sum(m.out_features for m in layers.values()) and total == total_before + trainable
    assert set(bitfit_state_dict(model)) == {f"{n}.bias" for n in layers}
    perturb_trainable_(model, 0.1)
    model(TOKENS).pow(2).mean().backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == name.endswith(".bias"), name
        if name in weights:
            assert torch.equal(p, weights[name]) and not p.requires_grad, name  # the base is unchanged and frozen


def test_matches_transformers_llama_with_biases(hf_checkpoint, transformers, tmp_path):
    """transformers' Llama with attention_bias=True and mlp_bias=True adds a bias to every projection, which is
    exactly a BitFit model over all linear layers: same weights + same biases, same logits."""
    path = hf_checkpoint("llama")
    model = apply_bitfit(from_pretrained(path))
    perturb_trainable_(model, 0.1, seed=1)
    config = transformers.AutoConfig.from_pretrained(path)
    config.attention_bias, config.mlp_bias = True, True
    reference = transformers.AutoModelForCausalLM.from_config(config).eval()
    missing, unexpected = reference.load_state_dict(model.state_dict(), strict=False)
    assert not missing and not unexpected
    with torch.no_grad():
        theirs = reference(TOKENS).logits
    assert (theirs - logits(from_pretrained(path))).abs().max() > 0.05  # the biases matter
    torch.testing.assert_close(logits(model), theirs, rtol=0, atol=1e-5)


def test_save_load_round_trip(hf_checkpoint, tmp_path):
    path = hf_checkpoint("llama")
    model = apply_bitfit(from_pretrained(path), target_modules=["q_proj", "down_proj"])
    perturb_trainable_(model, 0.1, seed=2)
    save_bitfit(model, tmp_path / "bitfit", base_model_name_or_path=str(path))
    config = json.loads((tmp_path / "bitfit" / "adapter_config.json").read_text())
    assert config["peft_type"] == "CAMELID_BITFIT" and len(config["target_modules"]) == 4
    again = load_bitfit(from_pretrained(path), tmp_path / "bitfit")
    assert sorted(bitfit_layers(again)) == sorted(bitfit_layers(model))
    torch.testing.assert_close(logits(again), logits(model), rtol=0, atol=0)
    assert count_parameters(again) == count_parameters(model)
    assert not list(tmp_path.glob(".*"))  # no temporary folder left behind


def test_existing_biases_train_and_round_trip(hf_checkpoint, tmp_path):
    """Qwen2's q/k/v already have biases: BitFit trains them in place and saves their trained values."""
    path = hf_checkpoint("qwen2")
    model = from_pretrained(path)
    q_bias = model.get_submodule("model.layers.0.self_attn.q_proj").bias
    apply_bitfit(model, target_modules=PROJECTIONS)
    assert model.get_submodule("model.layers.0.self_attn.q_proj").bias is q_bias and q_bias.requires_grad
    perturb_trainable_(model, 0.1, seed=3)
    save_bitfit(model, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["added_biases"] == sorted(
        f"model.layers.{i}.{kind}.{p}" for i in range(2) for kind, p in
        [("self_attn", "o_proj"), ("mlp", "gate_proj"), ("mlp", "up_proj"), ("mlp", "down_proj")])
    again = load_bitfit(from_pretrained(path), tmp_path)  # the base's q/k/v biases are replaced by the trained ones
    torch.testing.assert_close(logits(again), logits(model), rtol=0, atol=0)


def test_biases_are_fp32_over_a_bf16_base_so_tiny_updates_survive(hf_checkpoint, tmp_path):
    """As LoRA's adapters (shared.adapter_dtype), BitFit's biases over a bf16 base are fp32, cast in forward: an
    AdamW step far below bf16's resolution still moves them, and the model runs in bf16 without autocast."""
    from safetensors.torch import load_file

    path = hf_checkpoint("llama")
    before = logits(from_pretrained(path, dtype=torch.bfloat16))
    model = apply_bitfit(from_pretrained(path, dtype=torch.bfloat16))
    layers = bitfit_layers(model)
    assert all(m.bias.dtype == torch.float32 and m.weight.dtype == torch.bfloat16 for m in layers.values())
    assert logits(model).dtype == torch.bfloat16 and torch.equal(logits(model), before)  # zero biases: the base
    biases = [m.bias for m in layers.values()]
    with torch.no_grad():
        for b in biases:
            b.fill_(1.0)
    step = 1e-3
    assert torch.ones(1, dtype=torch.bfloat16) + step == 1.0  # bf16 spacing at 1.0 is 2^-7: a bf16 bias stays put
    optimizer = torch.optim.AdamW(biases, lr=step, weight_decay=0.0)
    model(TOKENS).float().pow(2).mean().backward()
    optimizer.step()  # Adam's first step moves every coordinate with a non-zero gradient by ~lr
    assert min(float((b.detach() - 1.0).abs().min()) for b in biases) > step / 2
    save_bitfit(model, tmp_path)
    assert all(t.dtype == torch.float32 for t in load_file(tmp_path / "adapter_model.safetensors").values())
    again = load_bitfit(from_pretrained(path, dtype=torch.bfloat16), tmp_path)
    for name, m in bitfit_layers(again).items():
        assert torch.equal(m.bias, layers[name].bias), name  # fp32 on disk and back: the update is not rounded
    torch.testing.assert_close(logits(again), logits(model), rtol=0, atol=0)


def test_an_existing_bf16_bias_trains_as_an_fp32_copy(hf_checkpoint):
    model = from_pretrained(hf_checkpoint("qwen2"), dtype=torch.bfloat16)
    before, base_bias = logits(model), model.get_submodule("model.layers.0.self_attn.q_proj").bias.detach().clone()
    apply_bitfit(model, target_modules=["q_proj"])
    bias = model.get_submodule("model.layers.0.self_attn.q_proj").bias
    assert bias.dtype == torch.float32 and bias.requires_grad and torch.equal(bias, base_bias.float())
    assert torch.equal(logits(model), before)


def test_generation_with_kv_cache(hf_checkpoint):
    model = apply_bitfit(from_pretrained(hf_checkpoint("llama")))
    perturb_trainable_(model, 0.1, seed=4)
    assert_cached_generation_matches_full_forward(model)


def test_bad_options_and_folders(hf_checkpoint, tmp_path):
    path = hf_checkpoint("llama")
    model = from_pretrained(path)
    with pytest.raises(ValueError, match="match no module"):
        apply_bitfit(model, target_modules=["qkv_proj"])
    with pytest.raises(ValueError, match="nn.Linear layers only"):
        apply_bitfit(model, target_modules=["mlp"])
    assert not has_bitfit(model) and all(p.requires_grad for p in model.parameters())
    apply_bitfit(model, target_modules=["q_proj"])
    with pytest.raises(ValueError, match="already has BitFit"):
        apply_bitfit(model)
    save_bitfit(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "LORA"}))
    with pytest.raises(ValueError, match="peft_type"):
        load_bitfit(from_pretrained(path), tmp_path)
    with pytest.raises(ValueError, match="no BitFit biases"):
        save_bitfit(from_pretrained(path), tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_bitfit(from_pretrained(path), tmp_path / "nowhere")


def test_bias_of_another_width_is_refused(hf_checkpoint, tmp_path):
    from safetensors.torch import save_file

    path = hf_checkpoint("llama")
    save_bitfit(apply_bitfit(from_pretrained(path), target_modules=["q_proj"]), tmp_path)
    save_file({"model.layers.0.self_attn.q_proj.bias": torch.zeros(3)}, tmp_path / "adapter_model.safetensors")
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        load_bitfit(from_pretrained(path), tmp_path)


def test_train_loop_trains_only_the_biases(hf_checkpoint, tmp_path):
    model = apply_bitfit(from_pretrained(hf_checkpoint("llama")))
    losses = train_briefly(model, tmp_path, lr=3e-2)
    assert losses[-1] < losses[0] - 0.1, losses


def test_loading_onto_a_quantized_base_names_the_quantization(hf_checkpoint, tmp_path):
    """A quantized layer is a Linear to the user: 'not an nn.Linear of this model' did not say what was wrong."""
    from camelid.quant import quantize_model

    path = hf_checkpoint("llama")
    save_bitfit(apply_bitfit(from_pretrained(path)), tmp_path / "bitfit")
    save_pretrained(quantize_model(from_pretrained(path), "int8"), tmp_path / "int8")
    with pytest.raises(ValueError, match="quantized .*int8.*load the adapter onto the unquantized model"):
        load_bitfit(from_pretrained(tmp_path / "int8"), tmp_path / "bitfit")
