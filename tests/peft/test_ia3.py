"""IA3: checked against the real `peft` library on a tiny random Llama in both directions (folders and logits),
plus merge / exact unmerge, gradients, freezing, generation with a KV cache and the training loop."""

from __future__ import annotations

import json

import pytest
import torch
from method_helpers import (TOKENS, assert_cached_generation_matches_full_forward, logits, perturb_trainable_,
                            train_briefly)

from camelid.checkpoint import from_pretrained, save_pretrained
from camelid.peft import count_parameters
from camelid.quant import quantize_model
from camelid.peft.ia3 import apply_ia3, has_ia3, ia3_layers, ia3_state_dict, load_ia3, merge_ia3, save_ia3, unmerge_ia3

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")


@pytest.fixture(scope="module")
def peft():
    return pytest.importorskip("peft")


def hf_model(transformers, path):
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def hf_logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(TOKENS).logits


def perturb_peft_(model, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ia3_l" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)


def test_fresh_vectors_are_the_base_and_only_they_train(hf_checkpoint):
    model = from_pretrained(hf_checkpoint("llama"))
    before, total_before = logits(model), count_parameters(model)[1]
    apply_ia3(model)
    assert has_ia3(model) and len(ia3_layers(model)) == 2 * 3  # k_proj, v_proj, down_proj of both layers
    torch.testing.assert_close(logits(model), before, rtol=0, atol=0)
    c = model.config
    per_layer = 2 * c.kv_size + c.intermediate_size  # k, v scale outputs; down_proj scales its input
    trainable, total = count_parameters(model)
    assert trainable == c.num_hidden_layers * per_layer and total == total_before + trainable
    keys = model.state_dict().keys()
    assert "model.layers.0.self_attn.k_proj.weight" in keys and "model.layers.0.self_attn.k_proj.ia3_l" in keys
    assert set(ia3_state_dict(model)) == {k for k in keys if k.endswith(".ia3_l")}
    perturb_trainable_(model, 0.3)
    model(TOKENS).pow(2).mean().backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == name.endswith(".ia3_l"), name


def test_camelid_adapter_loads_into_peft(hf_checkpoint, transformers, peft, tmp_path):
    path = hf_checkpoint("llama")
    model = apply_ia3(from_pretrained(path))
    base = logits(model)
    perturb_trainable_(model, 0.3)
    assert (logits(model) - base).abs().max() > 0.05  # the vectors really change the output
    save_ia3(model, tmp_path / "ia3", base_model_name_or_path=str(path))
    config = json.loads((tmp_path / "ia3" / "adapter_config.json").read_text())
    assert config["peft_type"] == "IA3" and config["target_modules"] == ["down_proj", "k_proj", "v_proj"]
    assert config["feedforward_modules"] == ["down_proj"]
    reference = peft.PeftModel.from_pretrained(hf_model(transformers, path), tmp_path / "ia3").eval()
    torch.testing.assert_close(hf_logits(reference), logits(model), rtol=0, atol=1e-4)


def test_peft_adapter_loads_into_camelid(hf_checkpoint, transformers, peft, tmp_path):
    path = hf_checkpoint("llama")
    reference = peft.get_peft_model(hf_model(transformers, path), peft.IA3Config(task_type="CAUSAL_LM")).eval()
    perturb_peft_(reference, seed=1)
    reference.save_pretrained(tmp_path)
    model = load_ia3(from_pretrained(path), tmp_path)
    assert {n.rsplit(".", 1)[-1] for n, m in ia3_layers(model).items() if m.ia3_feedforward} == {"down_proj"}
    torch.testing.assert_close(logits(model), hf_logits(reference), rtol=0, atol=1e-4)
    save_ia3(model, tmp_path / "again")  # and back: the same vectors in the same shapes
    again = load_ia3(from_pretrained(path), tmp_path / "again")
    torch.testing.assert_close(logits(again), logits(model), rtol=0, atol=0)


def test_regex_targets_on_some_layers_round_trip_through_peft(hf_checkpoint, transformers, peft, tmp_path):
    """Layer 0's q_proj and up_proj only, up_proj as a feedforward module: target_modules is written as a regex
    and feedforward_modules by name, and peft builds exactly the same vectors."""
    path = hf_checkpoint("llama")
    model = apply_ia3(from_pretrained(path), target_modules=r"model\.layers\.0\.(self_attn\.q_proj|mlp\.up_proj)",
                      feedforward_modules=["up_proj"])
    assert sorted(ia3_layers(model)) == ["model.layers.0.mlp.up_proj", "model.layers.0.self_attn.q_proj"]
    perturb_trainable_(model, 0.3, seed=2)
    save_ia3(model, tmp_path)
    assert isinstance(json.loads((tmp_path / "adapter_config.json").read_text())["target_modules"], str)
    reference = peft.PeftModel.from_pretrained(hf_model(transformers, path), tmp_path).eval()
    torch.testing.assert_close(hf_logits(reference), logits(model), rtol=0, atol=1e-4)


def test_merge_matches_peft_and_unmerge_is_exact(hf_checkpoint, transformers, peft, tmp_path):
    path = hf_checkpoint("qwen2")  # q/k/v carry biases: merging must scale k/v biases too
    config = peft.IA3Config(task_type="CAUSAL_LM", target_modules=["k_proj", "v_proj", "down_proj"],
                            feedforward_modules=["down_proj"])
    reference = peft.get_peft_model(hf_model(transformers, path), config).eval()
    perturb_peft_(reference, seed=3)
    reference.save_pretrained(tmp_path / "adapter")
    merged_reference = hf_logits(reference.merge_and_unload())

    model = load_ia3(from_pretrained(path), tmp_path / "adapter")
    unmerged = logits(model)
    originals = {k: v.clone() for k, v in model.state_dict().items()}
    merge_ia3(model, keep=True)
    torch.testing.assert_close(logits(model), unmerged, rtol=0, atol=1e-5)
    torch.testing.assert_close(logits(model), merged_reference, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="merged"):
        save_ia3(model, tmp_path / "refused")
    unmerge_ia3(model)
    for key, value in model.state_dict().items():
        assert torch.equal(value, originals[key]), key  # bitwise: the kept copy, not a division
    torch.testing.assert_close(logits(model), unmerged, rtol=0, atol=0)

    merge_ia3(model)  # unload: plain Linear layers, no hooks, a plain HF checkpoint
    assert not has_ia3(model) and not any(k.endswith("ia3_l") for k in model.state_dict())
    assert not model.get_submodule("model.layers.0.self_attn.k_proj")._forward_hooks
    save_pretrained(model, tmp_path / "merged")
    torch.testing.assert_close(hf_logits(hf_model(transformers, tmp_path / "merged")), merged_reference,
                               rtol=0, atol=1e-5)


def test_gradients_match_peft(hf_checkpoint, transformers, peft, tmp_path):
    path = hf_checkpoint("llama")
    reference = peft.get_peft_model(hf_model(transformers, path), peft.IA3Config(task_type="CAUSAL_LM")).eval()
    perturb_peft_(reference, seed=4)
    reference.save_pretrained(tmp_path)
    model = load_ia3(from_pretrained(path), tmp_path)
    reference(TOKENS).logits.pow(2).mean().backward()
    model(TOKENS).pow(2).mean().backward()
    theirs = {n.removeprefix("base_model.model.").replace(".default", ""): p.grad.flatten()
              for n, p in reference.named_parameters() if p.requires_grad}
    ours = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert theirs.keys() == ours.keys()
    for name, grad in ours.items():
        torch.testing.assert_close(grad, theirs[name], rtol=1e-4, atol=1e-6, msg=name)


def test_generation_with_kv_cache(hf_checkpoint):
    model = apply_ia3(from_pretrained(hf_checkpoint("llama")))
    perturb_trainable_(model, 0.3, seed=5)
    assert_cached_generation_matches_full_forward(model)


def test_bad_options_and_folders(hf_checkpoint, tmp_path):
    path = hf_checkpoint("llama")
    model = from_pretrained(path)
    with pytest.raises(ValueError, match="match no module"):
        apply_ia3(model, target_modules=["qkv_proj"])
    with pytest.raises(ValueError, match="nn.Linear layers only"):
        apply_ia3(model, target_modules=["self_attn"])
    with pytest.raises(ValueError, match="subset"):
        apply_ia3(model, target_modules=["k_proj"], feedforward_modules=["down_proj"])
    with pytest.raises(ValueError, match="feedforward_modules .* match no module"):
        apply_ia3(model, target_modules="all-linear", feedforward_modules="nothing_here")
    assert not has_ia3(model) and all(p.requires_grad for p in model.parameters())  # nothing half-applied
    apply_ia3(model)
    with pytest.raises(ValueError, match="already has IA3"):
        apply_ia3(model)
    save_ia3(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    for change, message in [({"peft_type": "LORA"}, "peft_type"), ({"fan_in_fan_out": True}, "fan_in_fan_out")]:
        (tmp_path / "adapter_config.json").write_text(json.dumps({**config, **change}))
        with pytest.raises(ValueError, match=message):
            load_ia3(from_pretrained(path), tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "feedforward_modules": []}))
    with pytest.raises(ValueError, match=r"shape \(1, 96\)"):  # down_proj's (1, in) vector read as (out, 1)
        load_ia3(from_pretrained(path), tmp_path)
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_ia3(from_pretrained(path), tmp_path / "nowhere")


def test_loading_onto_a_quantized_base_names_the_quantization(hf_checkpoint, tmp_path):
    """IA3 scales nn.Linear layers only; a quantized one is a Linear to the user, so the error says what it is."""
    path = hf_checkpoint("llama")
    save_ia3(apply_ia3(from_pretrained(path)), tmp_path / "ia3")
    save_pretrained(quantize_model(from_pretrained(path), "int8"), tmp_path / "int8")
    with pytest.raises(ValueError, match="quantized .*int8.*load the adapter onto the unquantized model"):
        load_ia3(from_pretrained(tmp_path / "int8"), tmp_path / "ia3")


def test_train_loop_trains_only_the_vectors(hf_checkpoint, tmp_path):
    model = apply_ia3(from_pretrained(hf_checkpoint("llama")), target_modules="all-linear",
                      feedforward_modules=["down_proj"])
    losses = train_briefly(model, tmp_path, lr=3e-2)
    assert losses[-1] < losses[0] - 0.1, losses
    assert any((m.ia3_l - 1).abs().max() > 1e-3 for m in ia3_layers(model).values())


def test_a_bad_folder_leaves_the_model_unchanged(hf_checkpoint, tmp_path):
    """Shapes are checked before any vector or hook is attached: a refused folder leaves the model as it was."""
    from safetensors.torch import load_file, save_file

    path = hf_checkpoint("llama")
    save_ia3(apply_ia3(from_pretrained(path)), tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    tensors = load_file(weights)
    last = sorted(tensors)[-1]  # a vector checked after others would already have been attached before the fix
    save_file({**tensors, last: torch.ones(tensors[last].numel() + 1, 1)}, weights)
    model = from_pretrained(path)
    keys = set(model.state_dict())
    hooks = {n: len(m._forward_hooks) + len(m._forward_pre_hooks) for n, m in model.named_modules()}
    with pytest.raises(ValueError, match="shape"):
        load_ia3(model, tmp_path)
    assert set(model.state_dict()) == keys and not has_ia3(model)
    assert hooks == {n: len(m._forward_hooks) + len(m._forward_pre_hooks) for n, m in model.named_modules()}
    assert all(p.requires_grad for p in model.parameters())
