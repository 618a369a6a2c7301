"""Bottleneck adapters (Houlsby / Pfeiffer): a fresh model is its base, the placement and the math are checked
against a forward pass written out by hand, save / load round trip, freezing, parameter counts, errors,
generation with a KV cache and the training loop."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from method_helpers import (TOKENS, assert_cached_generation_matches_full_forward, logits, perturb_trainable_,
                            train_briefly)

from camelid.checkpoint import from_pretrained, save_pretrained
from camelid.model import rope_cos_sin
from camelid.peft import count_parameters
from camelid.quant import quantize_model
from camelid.peft.adapters import (apply_bottleneck, bottleneck_adapters, bottleneck_state_dict, has_bottleneck,
                                   load_bottleneck, save_bottleneck)

PLACEMENTS = {"houlsby": ("attn_adapter", "mlp_adapter"), "pfeiffer": ("mlp_adapter",)}


def reference_logits(model, adapters: dict[str, dict[str, torch.Tensor]], placement: str) -> torch.Tensor:
    """The adapted forward spelled out: sublayers are called through .forward (hooks bypassed), and each adapter
    h + up(relu(down(h))) is applied from the saved tensors before the residual add."""
    def adapter(i: int, kind: str, h: torch.Tensor) -> torch.Tensor:
        if f"{kind}_adapter" not in PLACEMENTS[placement]:
            return h
        t = {k.split(f"model.layers.{i}.{kind}_adapter.")[1]: v for k, v in adapters.items()
             if k.startswith(f"model.layers.{i}.{kind}_adapter.")}
        return h + F.linear(F.relu(F.linear(h, t["down.weight"], t["down.bias"])), t["up.weight"], t["up.bias"])

    with torch.no_grad():
        x = model.model.embed_tokens(TOKENS)
        rope = rope_cos_sin(model.config, torch.arange(TOKENS.shape[1])[None], x.dtype)
        for i, block in enumerate(model.model.layers):
            x = x + adapter(i, "attn", block.self_attn.forward(block.input_layernorm(x), rope, None, True, None, 0))
            x = x + adapter(i, "mlp", block.mlp.forward(block.post_attention_layernorm(x)))
        return model.lm_head(model.model.norm(x))


@pytest.mark.parametrize("placement", list(PLACEMENTS))
def test_fresh_adapters_are_the_base_and_only_they_train(placement, hf_checkpoint):
    model = from_pretrained(hf_checkpoint("llama"))
    before, total_before = logits(model), count_parameters(model)[1]
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    apply_bottleneck(model, bottleneck_size=8, placement=placement)
    assert has_bottleneck(model)
    assert sorted(bottleneck_adapters(model)) == sorted(f"model.layers.{i}.{a}" for i in range(2)
                                                        for a in PLACEMENTS[placement])
    torch.testing.assert_close(logits(model), before, rtol=0, atol=0)  # up starts at zero: exactly the base
    H, m = model.config.hidden_size, 8
    per_adapter = H * m + m + m * H + H  # down weight + bias, up weight + bias
    trainable, total = count_parameters(model)
    assert trainable == 2 * len(PLACEMENTS[placement]) * per_adapter and total == total_before + trainable
    assert "model.layers.0.mlp_adapter.down.weight" in bottleneck_state_dict(model)
    assert weights.keys() <= model.state_dict().keys()  # base keys unchanged
    perturb_trainable_(model, 0.1)
    model(TOKENS).pow(2).mean().backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == ("_adapter." in name), name
        if name in weights:
            assert torch.equal(p, weights[name]) and not p.requires_grad, name


@pytest.mark.parametrize("placement", list(PLACEMENTS))
def test_placement_and_math_match_a_hand_written_forward(placement, hf_checkpoint):
    model = apply_bottleneck(from_pretrained(hf_checkpoint("llama")), bottleneck_size=8, placement=placement)
    perturb_trainable_(model, 0.2, seed=1)
    ours = logits(model)
    assert (ours - logits(from_pretrained(hf_checkpoint("llama")))).abs().max() > 0.05  # the adapters matter
    reference = reference_logits(model, bottleneck_state_dict(model), placement)
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-5)


@pytest.mark.parametrize("placement", list(PLACEMENTS))
def test_save_load_round_trip(placement, hf_checkpoint, tmp_path):
    path = hf_checkpoint("llama")
    model = apply_bottleneck(from_pretrained(path), bottleneck_size=4, placement=placement, nonlinearity="gelu")
    perturb_trainable_(model, 0.2, seed=2)
    save_bottleneck(model, tmp_path / "adapter", base_model_name_or_path=str(path))
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config == {"peft_type": "CAMELID_BOTTLENECK", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(path),
                      "bottleneck_size": 4, "placement": placement, "nonlinearity": "gelu"}
    again = load_bottleneck(from_pretrained(path), tmp_path / "adapter")
    torch.testing.assert_close(logits(again), logits(model), rtol=0, atol=0)
    assert count_parameters(again) == count_parameters(model)
    save_bottleneck(again, tmp_path / "adapter")  # over an existing folder: files replaced, nothing left behind
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_adapters_over_a_quantized_base_are_float_and_round_trip(hf_checkpoint, tmp_path):
    """A quantized o_proj's `weight` holds integer codes: the adapters take the model's float dtype, not theirs
    (it raised "Only Tensors of floating point ... can require gradients" from `camelid finetune --method adapter`)."""
    quantized = tmp_path / "int8"
    save_pretrained(quantize_model(from_pretrained(hf_checkpoint("llama")), "int8"), quantized)
    model = apply_bottleneck(from_pretrained(quantized), bottleneck_size=4)
    assert {p.dtype for p in bottleneck_state_dict(model).values()} == {torch.float32}
    perturb_trainable_(model, 0.2, seed=4)
    save_bottleneck(model, tmp_path / "adapter")
    torch.testing.assert_close(logits(load_bottleneck(from_pretrained(quantized), tmp_path / "adapter")),
                               logits(model), rtol=0, atol=0)


def test_mixtral_adapter_follows_the_moe_layer(tmp_path):
    from model_zoo import ARCH_CONFIGS, random_model, tiny_config

    model = apply_bottleneck(random_model(tiny_config(**ARCH_CONFIGS["mixtral"])), bottleneck_size=4,
                             placement="pfeiffer")
    before = logits(model)
    adapter = model.get_submodule("model.layers.0.mlp_adapter")
    with torch.no_grad():
        adapter.up.bias.add_(0.5)
    assert (logits(model) - before).abs().max() > 0.01  # the hook sits on block_sparse_moe


def test_generation_with_kv_cache(hf_checkpoint):
    model = apply_bottleneck(from_pretrained(hf_checkpoint("llama")), bottleneck_size=8)
    perturb_trainable_(model, 0.2, seed=3)
    assert_cached_generation_matches_full_forward(model)


def test_bad_options_and_folders(hf_checkpoint, tmp_path):
    path = hf_checkpoint("llama")
    model = from_pretrained(path)
    for options, message in [(dict(bottleneck_size=0), "bottleneck_size"), (dict(bottleneck_size=2.5), "positive"),
                             (dict(placement="parallel"), "placement 'parallel'"),
                             (dict(nonlinearity="swish"), "nonlinearity 'swish'")]:
        with pytest.raises(ValueError, match=message):
            apply_bottleneck(model, **options)
    assert not has_bottleneck(model) and all(p.requires_grad for p in model.parameters())  # nothing half-applied
    apply_bottleneck(model, bottleneck_size=4)
    with pytest.raises(ValueError, match="already has bottleneck"):
        apply_bottleneck(model)
    save_bottleneck(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "bottleneck_size": 5}))
    with pytest.raises(ValueError, match="shape"):
        load_bottleneck(from_pretrained(path), tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "placement": "pfeiffer"}))
    with pytest.raises(ValueError, match="unexpected tensor 'model.layers.0.attn_adapter"):
        load_bottleneck(from_pretrained(path), tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "IA3"}))
    with pytest.raises(ValueError, match="peft_type"):
        load_bottleneck(from_pretrained(path), tmp_path)


@pytest.mark.parametrize("placement", list(PLACEMENTS))
def test_train_loop_trains_only_the_adapters(placement, hf_checkpoint, tmp_path):
    model = apply_bottleneck(from_pretrained(hf_checkpoint("llama")), bottleneck_size=8, placement=placement)
    losses = train_briefly(model, tmp_path)
    assert losses[-1] < losses[0] - 0.1, losses


def _hooks(model) -> dict[str, int]:
    return {n: len(m._forward_hooks) + len(m._forward_pre_hooks) for n, m in model.named_modules()}


def test_a_bad_folder_leaves_the_model_unchanged(hf_checkpoint, tmp_path):
    """Every key and shape is checked before anything is applied: a refused folder leaves no adapter, hook or
    frozen parameter behind. And each applied hook's handle is kept (it removes the hook)."""
    path = hf_checkpoint("llama")
    save_bottleneck(apply_bottleneck(from_pretrained(path), bottleneck_size=4), tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    model = from_pretrained(path)
    keys, hooks = set(model.state_dict()), _hooks(model)
    for change, message in [({"bottleneck_size": 5}, "shape"), ({"placement": "pfeiffer"}, "unexpected tensor")]:
        (tmp_path / "adapter_config.json").write_text(json.dumps({**config, **change}))
        with pytest.raises(ValueError, match=message):
            load_bottleneck(model, tmp_path)
        assert set(model.state_dict()) == keys and _hooks(model) == hooks
        assert not has_bottleneck(model) and all(p.requires_grad for p in model.parameters())
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    load_bottleneck(model, tmp_path)
    mlp = model.model.layers[0].mlp
    assert len(mlp._forward_hooks) == 1
    mlp.bottleneck_adapter.hook.remove()
    assert len(mlp._forward_hooks) == 0
