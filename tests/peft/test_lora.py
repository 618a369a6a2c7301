"""LoRA / rsLoRA / DoRA: checked against the real `peft` library on a tiny random Llama, both directions, plus merge,
exact unmerge, freezing and a few training steps."""

from __future__ import annotations

import json

import pytest
import torch

from method_helpers import RepeatBatches

from camelid.checkpoint import from_pretrained, save_pretrained
from camelid.checkpoint import merge_adapter_folder
from camelid.peft import (LoRALinear, apply_lora, count_parameters, load_adapter, lora_layers,
                          merge_lora, save_adapter, unmerge_lora)
from camelid.peft.adapter_io import AdapterError

VARIANTS = {
    "lora": dict(r=4, alpha=8),
    "rslora": dict(r=4, alpha=8, use_rslora=True),
    "dora": dict(r=4, alpha=8, use_dora=True),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # transformers deprecation noise
TOKENS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def peft():
    return pytest.importorskip("peft")


def perturb_adapters_(model: torch.nn.Module, seed: int = 0) -> None:
    """Random non-zero adapters (B starts at zero, which would make every comparison vacuous)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)


def peft_config(peft, variant: str, target_modules=None):
    v = VARIANTS[variant]
    return peft.LoraConfig(r=v["r"], lora_alpha=v["alpha"], target_modules=target_modules or TARGETS,
                           use_rslora=v.get("use_rslora", False), use_dora=v.get("use_dora", False),
                           task_type="CAUSAL_LM")


def hf_model(transformers, path):
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def hf_logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(TOKENS).logits


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(TOKENS)


def test_fresh_adapter_is_the_base_and_only_adapters_train(hf_checkpoint):
    model = from_pretrained(hf_checkpoint("llama"))
    before = logits(model)
    total_before = count_parameters(model)[1]
    apply_lora(model, r=4, alpha=8, target_modules="all-linear", use_dora=True)
    assert len(lora_layers(model)) == 2 * 7  # every projection of both layers, not lm_head
    torch.testing.assert_close(logits(model), before, rtol=0, atol=1e-6)
    trainable, total = count_parameters(model)
    adapter = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert trainable == adapter and total == total_before + adapter
    # plain keys for the base, PEFT's names for the adapter
    keys = model.state_dict().keys()
    assert "model.layers.0.self_attn.q_proj.weight" in keys
    assert "model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert "model.layers.0.self_attn.q_proj.lora_magnitude_vector" in keys
    perturb_adapters_(model)
    model(TOKENS).float().pow(2).mean().backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == ("lora_" in name), name


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_peft_adapter_loads_into_camelid(variant, hf_checkpoint, transformers, peft, tmp_path):
    path = hf_checkpoint("llama")
    reference = peft.get_peft_model(hf_model(transformers, path), peft_config(peft, variant)).eval()
    perturb_adapters_(reference)
    reference.save_pretrained(tmp_path)
    model = load_adapter(from_pretrained(path), tmp_path)
    assert all(layer.use_dora == (variant == "dora") for layer in lora_layers(model).values())
    torch.testing.assert_close(logits(model), hf_logits(reference), rtol=0, atol=1e-5)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_camelid_adapter_loads_into_peft(variant, hf_checkpoint, transformers, peft, tmp_path):
    path = hf_checkpoint("llama")
    v = VARIANTS[variant]
    model = apply_lora(from_pretrained(path), r=v["r"], alpha=v["alpha"], target_modules=TARGETS,
                       use_rslora=v.get("use_rslora", False), use_dora=v.get("use_dora", False))
    perturb_adapters_(model)
    save_adapter(model, tmp_path, base_model_name_or_path=str(path))
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["target_modules"] == sorted(TARGETS) and config["task_type"] == "CAUSAL_LM"
    reference = peft.PeftModel.from_pretrained(hf_model(transformers, path), tmp_path).eval()
    torch.testing.assert_close(hf_logits(reference), logits(model), rtol=0, atol=1e-5)


def test_some_layers_and_mixed_ranks_round_trip_through_peft(hf_checkpoint, transformers, peft, tmp_path):
    """A regex that picks layer 0 only, and one layer with its own rank and alpha: target_modules is written as a
    regex and rank_pattern / alpha_pattern carry the exceptions, so peft builds exactly the same adapters."""
    path = hf_checkpoint("llama")
    name = "model.layers.0.self_attn.v_proj"
    model = apply_lora(from_pretrained(path), r=4, alpha=8, target_modules=r"model\.layers\.0\..*_proj",
                       ranks={name: 2}, alphas={name: 3.0})
    assert len(lora_layers(model)) == 7 and model.get_submodule(name).r == 2
    perturb_adapters_(model)
    save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert isinstance(config["target_modules"], str) and config["rank_pattern"] and config["alpha_pattern"]
    reference = peft.PeftModel.from_pretrained(hf_model(transformers, path), tmp_path).eval()
    torch.testing.assert_close(hf_logits(reference), logits(model), rtol=0, atol=1e-5)
    again = load_adapter(from_pretrained(path), tmp_path)  # and back into camelid
    assert again.get_submodule(name).alpha == 3.0
    torch.testing.assert_close(logits(again), logits(model), rtol=0, atol=0)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_merge_matches_peft_and_transformers_and_unmerge_is_exact(variant, hf_checkpoint, transformers, peft,
                                                                  tmp_path):
    path = hf_checkpoint("llama")
    reference = peft.get_peft_model(hf_model(transformers, path), peft_config(peft, variant)).eval()
    perturb_adapters_(reference, seed=1)
    reference.save_pretrained(tmp_path / "adapter")
    merged_reference = hf_logits(reference.merge_and_unload())

    model = load_adapter(from_pretrained(path), tmp_path / "adapter")
    unmerged = logits(model)
    originals = {n: m.weight.detach().clone() for n, m in lora_layers(model).items()}
    merge_lora(model, keep=True)
    torch.testing.assert_close(logits(model), unmerged, rtol=0, atol=1e-5)
    torch.testing.assert_close(logits(model), merged_reference, rtol=0, atol=1e-5)
    unmerge_lora(model)
    for n, m in lora_layers(model).items():
        assert torch.equal(m.weight, originals[n]), n  # bitwise: the kept copy, not a subtraction
    torch.testing.assert_close(logits(model), unmerged, rtol=0, atol=0)

    merge_lora(model)  # unload: plain nn.Linear again, a plain HF checkpoint
    assert not lora_layers(model) and isinstance(model.get_submodule("model.layers.0.self_attn.q_proj"),
                                                 torch.nn.Linear)
    assert all(p.requires_grad is False for p in model.parameters())
    save_pretrained(model, tmp_path / "merged")
    torch.testing.assert_close(hf_logits(hf_model(transformers, tmp_path / "merged")), merged_reference,
                               rtol=0, atol=1e-5)


def test_merge_adapter_folder(hf_checkpoint, transformers, peft, tmp_path):
    path = hf_checkpoint("llama")
    reference = peft.get_peft_model(hf_model(transformers, path), peft_config(peft, "dora")).eval()
    perturb_adapters_(reference, seed=2)
    reference.save_pretrained(tmp_path / "adapter")
    out = merge_adapter_folder(path, tmp_path / "adapter", tmp_path / "merged")
    torch.testing.assert_close(hf_logits(hf_model(transformers, out)), hf_logits(reference.merge_and_unload()),
                               rtol=0, atol=1e-5)


def test_target_module_errors(hf_checkpoint):
    model = from_pretrained(hf_checkpoint("llama"))
    with pytest.raises(ValueError, match="match no module"):
        apply_lora(model, target_modules=["qkv_proj"])
    with pytest.raises(ValueError, match="nn.Linear and nn.Embedding layers only"):
        apply_lora(model, target_modules=["self_attn"])
    assert not lora_layers(model) and all(p.requires_grad for p in model.parameters())  # nothing half-applied
    apply_lora(model, target_modules=["q_proj"])
    with pytest.raises(ValueError, match="already has LoRA"):
        apply_lora(model, target_modules=["v_proj"])


def test_bad_adapter_folders(hf_checkpoint, tmp_path):
    path = hf_checkpoint("llama")
    model = apply_lora(from_pretrained(path), target_modules=["q_proj"])
    save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    for change, message in [({"peft_type": "LOHA"}, "peft_type"),
                            ({"layer_replication": [[0, 2]]}, "layer_replication"),
                            ({"lora_bias": True}, "lora_bias")]:
        (tmp_path / "adapter_config.json").write_text(json.dumps({**config, **change}))
        with pytest.raises(AdapterError, match=message):
            load_adapter(from_pretrained(path), tmp_path)
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_adapter(from_pretrained(path), tmp_path / "nowhere")


@pytest.mark.parametrize("use_dora", [False, True])
def test_train_loop_trains_only_the_adapters(use_dora, hf_checkpoint, tmp_path):
    from camelid.train import TrainConfig
    from camelid.train.loop import train

    model = apply_lora(from_pretrained(hf_checkpoint("llama")), r=4, alpha=8, target_modules="all-linear",
                       use_dora=use_dora)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    cfg = TrainConfig(out=str(tmp_path), max_steps=8, micro_batch=4, seq_len=16, lr=1e-2, warmup_steps=0,
                      eval_every=0, save_every=0, sample_every=0, tensorboard=False, log_every=1000, device="cpu",
                      spike_sigma=0)
    result = train(cfg, model=model, batches=RepeatBatches())
    losses = [result.losses[s] for s in sorted(result.losses)]
    assert losses[-1] < losses[0] - 0.1, losses
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    assert all(isinstance(m, LoRALinear) for m in lora_layers(model).values())


@pytest.mark.parametrize("variant", ["lora", "dora"])
def test_gradients_match_peft(variant, hf_checkpoint, transformers, peft, tmp_path):
    """Same adapter gradients as peft: for DoRA this checks that the row norm is treated as a constant."""
    path = hf_checkpoint("llama")
    reference = peft.get_peft_model(hf_model(transformers, path), peft_config(peft, variant)).eval()
    perturb_adapters_(reference, seed=4)
    reference.save_pretrained(tmp_path)
    model = load_adapter(from_pretrained(path), tmp_path)
    reference(TOKENS).logits.pow(2).mean().backward()
    model(TOKENS).pow(2).mean().backward()
    theirs = {n.removeprefix("base_model.model.").replace(".default", ""): p.grad
              for n, p in reference.named_parameters() if p.requires_grad}
    ours = {n.replace("lora_magnitude_vector", "lora_magnitude_vector.weight"): p.grad
            for n, p in model.named_parameters() if p.requires_grad}
    assert theirs.keys() == ours.keys()
    for name, grad in ours.items():
        torch.testing.assert_close(grad, theirs[name], rtol=1e-4, atol=1e-6, msg=name)


def test_half_precision_base_keeps_fp32_adapters(hf_checkpoint, tmp_path):
    path = hf_checkpoint("llama")
    full = apply_lora(from_pretrained(path), r=4, alpha=8, target_modules=TARGETS, use_dora=True)
    perturb_adapters_(full)
    save_adapter(full, tmp_path)
    half = load_adapter(from_pretrained(path, dtype="bfloat16"), tmp_path)
    layer = half.get_submodule("model.layers.0.self_attn.q_proj")
    assert layer.weight.dtype == torch.bfloat16 and layer.lora_A.weight.dtype == torch.float32
    assert layer.lora_magnitude_vector.dtype == torch.float32
    out = logits(half)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), logits(full), rtol=0.05, atol=0.05)
    merge_lora(half)
    assert half.get_submodule("model.layers.0.self_attn.q_proj").weight.dtype == torch.bfloat16
    torch.testing.assert_close(logits(half).float(), logits(full), rtol=0.05, atol=0.05)


@pytest.mark.parametrize("variant", ["lora", "dora"])
def test_dropout_in_training_matches_peft(variant, hf_checkpoint, transformers, peft, tmp_path):
    """In train mode with dropout, both draw one mask per layer in the same order: same seed, same logits
    (for DoRA the rescaled base term then sees the dropped-out input too)."""
    path = hf_checkpoint("llama")
    config = peft_config(peft, variant)
    config.lora_dropout = 0.3
    reference = peft.get_peft_model(hf_model(transformers, path), config)
    perturb_adapters_(reference, seed=5)
    reference.save_pretrained(tmp_path)
    model = load_adapter(from_pretrained(path), tmp_path)
    assert model.get_submodule("model.layers.0.mlp.up_proj").dropout_p == 0.3
    reference.train(), model.train()
    torch.manual_seed(7)
    theirs = reference(TOKENS).logits.detach()
    torch.manual_seed(7)
    ours = model(TOKENS).detach()
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    model.eval()
    assert (logits(model) - ours).abs().max() > 1e-3  # dropout really was on


def test_tied_lm_head_is_refused(tmp_path):
    from model_zoo import random_model, tiny_config

    model = random_model(tiny_config(tie_word_embeddings=True))
    with pytest.raises(ValueError, match="tied"):
        apply_lora(model, target_modules=["lm_head", "q_proj"])
    apply_lora(model, target_modules="all-linear")  # all-linear leaves lm_head out, as in PEFT


# adapter_config.json features that `peft` writes and Hub adapters use; each loads and merges as peft does
PEFT_FEATURES = {
    "modules_to_save": dict(target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head", "embed_tokens"]),
    "embedding_lora": dict(target_modules=["q_proj", "embed_tokens"]),
    "lm_head_lora": dict(target_modules=["v_proj", "lm_head"]),
    "rank_alpha_patterns": dict(target_modules=TARGETS, rank_pattern={"v_proj": 2, r"layers\.1\.mlp\.down_proj": 6},
                                alpha_pattern={"q_proj": 3}),
    "layers_to_transform": dict(target_modules=TARGETS, layers_to_transform=[1], layers_pattern="layers"),
    "all_linear": dict(target_modules="all-linear"),
    "regex": dict(target_modules=r".*\.self_attn\.(q|v)_proj"),
    "rslora": dict(target_modules=TARGETS, use_rslora=True, r=8, lora_alpha=4),
    "exclude_modules": dict(target_modules=TARGETS, exclude_modules=["model.layers.0.mlp.down_proj"]),
    "rslora_embedding_and_modules_to_save": dict(target_modules=["embed_tokens", "o_proj"], use_rslora=True,
                                                 modules_to_save=["model.norm"]),
    # Qwen2 has q/k/v biases: "all" saves every bias, "lora_only" those of the targeted layers
    "bias_all": dict(arch="qwen2", target_modules=["q_proj", "o_proj"], bias="all"),
    "bias_lora_only": dict(arch="qwen2", target_modules=["q_proj", "o_proj"], bias="lora_only"),
    "trainable_tokens": dict(target_modules=["q_proj"], trainable_token_indices=[3, 5, 7]),
    "trainable_tokens_by_module": dict(target_modules=["q_proj"],
                                       trainable_token_indices={"embed_tokens": [1, 2], "lm_head": [4, 9, 3]}),
    # tied embeddings (Gemma): peft gives lm_head the embedding's rows too (its tied_adapter), saving them once
    "trainable_tokens_tied": dict(arch="gemma", target_modules=["q_proj"], trainable_token_indices=[3, 5, 7]),
}


def peft_feature_adapter(peft, transformers, path, folder, **config):
    """A peft LoRA with every trainable tensor (adapters and modules_to_save copies) randomly moved off its init,
    saved to `folder`; returns the peft model."""
    torch.manual_seed(0)
    reference = peft.get_peft_model(hf_model(transformers, path),
                                    peft.LoraConfig(**{"r": 4, "lora_alpha": 8, "task_type": "CAUSAL_LM", **config}))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in reference.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    reference.eval().save_pretrained(folder)
    return reference


@pytest.mark.parametrize("feature", list(PEFT_FEATURES))
def test_peft_features_load_and_merge_as_peft(feature, hf_checkpoint, transformers, peft, tmp_path):
    config = dict(PEFT_FEATURES[feature])
    path = hf_checkpoint(config.pop("arch", "llama"))
    reference = peft_feature_adapter(peft, transformers, path, tmp_path / "adapter", **config)
    want, want_merged = hf_logits(reference), hf_logits(reference.merge_and_unload())
    model = load_adapter(from_pretrained(path), tmp_path / "adapter")
    torch.testing.assert_close(logits(model), want, rtol=0, atol=1e-5)
    merge_lora(model)
    assert not lora_layers(model)
    torch.testing.assert_close(logits(model), want_merged, rtol=0, atol=1e-5)
    out = merge_adapter_folder(path, tmp_path / "adapter", tmp_path / "merged")  # `camelid merge`
    torch.testing.assert_close(hf_logits(hf_model(transformers, out)), want_merged, rtol=0, atol=1e-5)


@pytest.mark.parametrize("config, message", [
    (dict(target_modules=["q_proj"], lora_bias=True), "lora_bias=True"),
    (dict(target_modules=["q_proj", "embed_tokens"], use_dora=True), "DoRA on .*embed_tokens"),
])
def test_unsupported_peft_features_are_refused_in_one_line(config, message, hf_checkpoint, transformers, peft,
                                                            tmp_path):
    path = hf_checkpoint("llama")
    peft_feature_adapter(peft, transformers, path, tmp_path, **config)
    model = from_pretrained(path)
    before = logits(model)
    with pytest.raises(AdapterError, match=message) as error:
        load_adapter(model, tmp_path)
    assert "\n" not in str(error.value)
    assert not lora_layers(model)
    torch.testing.assert_close(logits(model), before, rtol=0, atol=0)  # nothing half-loaded


def test_kasa_config_is_refused(hf_checkpoint, tmp_path):
    path = hf_checkpoint("llama")
    save_adapter(apply_lora(from_pretrained(path), target_modules=["q_proj"]), tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "kasa_config": {"r": 4}}))
    with pytest.raises(AdapterError, match="kasa_config"):
        load_adapter(from_pretrained(path), tmp_path)


def test_modules_to_save_on_tied_embeddings_is_refused(tmp_path):
    """Changing lm_head alone would change the tied embed_tokens too (peft keeps two copies): refused."""
    from model_zoo import random_model, tiny_config
    from safetensors.torch import load_file, save_file

    model = random_model(tiny_config(tie_word_embeddings=True))
    save_adapter(apply_lora(random_model(tiny_config(tie_word_embeddings=True)), target_modules=["q_proj"]), tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "modules_to_save": ["lm_head"]}))
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    tensors["base_model.model.lm_head.weight"] = model.lm_head.weight.detach() + 1
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    with pytest.raises(AdapterError, match="lm_head.weight .*tied"):
        load_adapter(model, tmp_path)


def test_camelid_embedding_lora_loads_into_peft(hf_checkpoint, transformers, peft, tmp_path):
    path = hf_checkpoint("llama")
    model = apply_lora(from_pretrained(path), r=4, alpha=8, target_modules=["embed_tokens", "q_proj"])
    torch.testing.assert_close(logits(model), logits(from_pretrained(path)), rtol=0, atol=0)  # a fresh one is the base
    perturb_adapters_(model)
    save_adapter(model, tmp_path)
    reference = peft.PeftModel.from_pretrained(hf_model(transformers, path), tmp_path).eval()
    torch.testing.assert_close(hf_logits(reference), logits(model), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="DoRA on an embedding"):
        apply_lora(from_pretrained(path), target_modules=["embed_tokens"], use_dora=True)


def test_fan_in_fan_out_loads_as_peft_does(hf_checkpoint, transformers, peft, tmp_path):
    """fan_in_fan_out=True describes Conv1D weights (GPT-2); over nn.Linear peft warns and loads the adapter as usual."""
    path = hf_checkpoint("llama")
    reference = peft_feature_adapter(peft, transformers, path, tmp_path, target_modules=["q_proj", "v_proj"])
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "fan_in_fan_out": True}))
    with pytest.warns(UserWarning, match="fan_in_fan_out"):
        again = peft.PeftModel.from_pretrained(hf_model(transformers, path), tmp_path).eval()
    torch.testing.assert_close(hf_logits(again), hf_logits(reference), rtol=0, atol=0)
    torch.testing.assert_close(logits(load_adapter(from_pretrained(path), tmp_path)), hf_logits(reference),
                               rtol=0, atol=1e-5)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_inits_that_change_the_base_are_refused_and_their_conversion_loads(init, hf_checkpoint, transformers, peft,
                                                                            tmp_path):
    """A PiSSA / OLoRA folder holds adapters for a base its init changed (peft redoes the init when it loads it);
    loaded onto the plain base it would give other logits, so it is refused. Converted by peft into a plain LoRA
    (path_initial_model_for_weight_conversion) it loads as the trained model."""
    path = hf_checkpoint("llama")
    torch.manual_seed(0)
    reference = peft.get_peft_model(hf_model(transformers, path), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=init, task_type="CAUSAL_LM"))
    reference.save_pretrained(tmp_path / "initial")
    perturb_adapters_(reference, seed=3)
    reference.eval().save_pretrained(tmp_path / "adapter")
    want = hf_logits(reference)
    with pytest.raises(AdapterError, match=f"init_lora_weights='{init}'.*path_initial_model_for_weight_conversion"):
        load_adapter(from_pretrained(path), tmp_path / "adapter")
    reference.save_pretrained(tmp_path / "converted", path_initial_model_for_weight_conversion=tmp_path / "initial")
    torch.testing.assert_close(logits(load_adapter(from_pretrained(path), tmp_path / "converted")), want,
                               rtol=0, atol=1e-4)


@pytest.mark.parametrize("change, message", [
    ({"lora_alpha": "abc"}, "lora_alpha='abc' is not a number"),
    ({"lora_alpha": None}, "lora_alpha=None is not a number"),
    ({"lora_dropout": "x"}, "lora_dropout='x' is not a number"),
    ({"alpha_pattern": ["q_proj"]}, r"alpha_pattern=\['q_proj'\] is not an object of pattern: number"),
    ({"alpha_pattern": {"q_proj": "3"}}, "alpha_pattern=.* is not an object of pattern: number"),
    ({"alpha_pattern": {"(": 3}}, r"alpha_pattern key '\(' is not a regular expression"),
    # named the weights file (nn.Dropout's message), or loaded and computed NaN logits
    ({"lora_dropout": 2}, r"lora_dropout=2 is not in \[0, 1\)"),
    ({"lora_alpha": float("nan")}, "lora_alpha=nan is not a number"),
    ({"alpha_pattern": {"q_proj": float("inf")}}, "alpha_pattern=.* is not an object of pattern: number"),
    ({"use_rslora": "no"}, "use_rslora='no' is not true or false"),  # bool("no") turned rsLoRA's scaling on
    ({"use_dora": 1}, "use_dora=1 is not true or false"),
])
def test_malformed_adapter_config_is_one_line_error(change, message, hf_checkpoint, tmp_path):
    path = hf_checkpoint("llama")
    save_adapter(apply_lora(from_pretrained(path), target_modules=["q_proj"]), tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(AdapterError, match="adapter_config.json: " + message):
        load_adapter(from_pretrained(path), tmp_path)


def test_an_adapter_for_another_model_size_changes_nothing(hf_checkpoint, transformers, peft, tmp_path):
    """Shapes are checked before the model is touched: a failed load leaves neither LoRA layers nor replaced
    modules_to_save weights behind."""
    from safetensors.torch import load_file, save_file

    path = hf_checkpoint("llama")
    peft_feature_adapter(peft, transformers, path, tmp_path, target_modules=["q_proj"], modules_to_save=["lm_head"])
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    key = "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"
    save_file({**tensors, key: torch.zeros(4, 65)}, tmp_path / "adapter_model.safetensors")
    model = from_pretrained(path)
    before = logits(model)
    with pytest.raises(AdapterError, match=r"q_proj.lora_A.weight has shape \(4, 65\), the model expects \(4, 64\)"):
        load_adapter(model, tmp_path)
    assert not lora_layers(model)
    torch.testing.assert_close(logits(model), before, rtol=0, atol=0)


def test_modules_to_save_over_a_quantized_layer_says_so(hf_checkpoint, transformers, peft, tmp_path):
    from camelid.quant import quantize_model

    path = hf_checkpoint("llama")
    peft_feature_adapter(peft, transformers, path, tmp_path, target_modules=["q_proj"],
                         modules_to_save=["model.layers.0.mlp.down_proj"])
    model = quantize_model(from_pretrained(path), "int8")
    with pytest.raises(AdapterError, match="replaces 'model.layers.0.mlp.down_proj.weight', which is quantized "
                                           "in this model"):
        load_adapter(model, tmp_path)
    model = load_adapter(from_pretrained(path), tmp_path)  # the float base takes it


def test_save_adapter_refuses_a_model_whose_base_tensors_an_adapter_replaced(hf_checkpoint, transformers, peft,
                                                                             tmp_path):
    """save_adapter writes LoRA tensors only: after loading a folder with modules_to_save it would write an adapter
    that loads with other logits (the lm_head copy lost). Refused, naming the tensor, with nothing written."""
    path = hf_checkpoint("llama")
    peft_feature_adapter(peft, transformers, path, tmp_path / "a", target_modules=["q_proj"], modules_to_save=["lm_head"])
    model = load_adapter(from_pretrained(path), tmp_path / "a")
    with pytest.raises(ValueError, match="lm_head.weight .*replaced by the adapter folder"):
        save_adapter(model, tmp_path / "b")
    assert not (tmp_path / "b").exists()
    save_adapter(apply_lora(from_pretrained(path), target_modules=["q_proj"]), tmp_path / "c")  # plain LoRA saves
