"""Checkpoint folders: camelid -> transformers, sharding, tied embeddings, dtypes, and one clear error per bad input."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from camelid.checkpoint import CheckpointError, from_pretrained, load_weights, parse_dtype, parse_size, save_pretrained
from camelid.config import ConfigError, ModelConfig
from camelid.model import Transformer
from camelid.peft import apply_lora, load_adapter, merge_adapter, save_adapter
from camelid.peft.adapters import apply_bottleneck
from camelid.peft.bitfit import apply_bitfit
from camelid.peft.ia3 import apply_ia3
from camelid.peft.lora import apply_qlora
from camelid.peft.prefix import apply_prefix
from camelid.peft.prompt import apply_prompt, apply_ptuning
from model_zoo import ARCH_CONFIGS, HF_ARCHS, NATIVE_CONFIGS, VOCAB, random_model, tiny_config

# every layout transformers reads, plus LLaMA's attention_bias / mlp_bias
HF_SAVES = {**{name: ARCH_CONFIGS[name] for name in HF_ARCHS},
            "llama-bias": dict(qkv_bias=True, o_bias=True, mlp_bias=True)}


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(3, VOCAB, (2, 10), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    return ids, mask


def assert_same_logits(hf, model) -> None:
    ids, mask = batch()
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        ours = model(ids, attention_mask=mask)
    real = mask.bool()
    torch.testing.assert_close(ours[real], ref[real], atol=1e-5, rtol=0)


def one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg, msg
    return msg


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A camelid llama saved once; tests copy it before breaking it."""
    model = random_model(tiny_config())
    path = save_pretrained(model, tmp_path_factory.mktemp("saved"))
    return model, path


@pytest.fixture
def broken(saved, tmp_path):
    path = tmp_path / "ckpt"
    shutil.copytree(saved[1], path)
    return path


# ---- round trips -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(HF_SAVES))
def test_transformers_loads_what_we_save(name, transformers, tmp_path):
    model = random_model(tiny_config(**HF_SAVES[name]))
    save_pretrained(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == model.config.model_type != "camelid"
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert type(hf).__name__ == config["architectures"][0]
    assert_same_logits(hf, model)


@pytest.mark.parametrize("name", list(ARCH_CONFIGS))
def test_save_load_round_trip(name, tmp_path):
    model = random_model(tiny_config(**ARCH_CONFIGS[name]))
    save_pretrained(model, tmp_path)
    loaded = from_pretrained(tmp_path)
    assert loaded.config == model.config
    assert not loaded.training
    expected = model.state_dict()
    assert loaded.state_dict().keys() == expected.keys()
    for key, value in loaded.state_dict().items():
        torch.testing.assert_close(value, expected[key], atol=0, rtol=0, msg=key)
    ids, mask = batch()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids, attention_mask=mask), model(ids, attention_mask=mask), atol=0, rtol=0)


@pytest.mark.parametrize("name", list(NATIVE_CONFIGS))
def test_native_configs_save_as_camelid(name, tmp_path):
    save_pretrained(random_model(tiny_config(**NATIVE_CONFIGS[name])), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "camelid" and config["position_encoding"] == name


def test_sharded_round_trip(saved, transformers, tmp_path):
    model, _ = saved
    save_pretrained(model, tmp_path, max_shard_size="20KB")
    shards = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    assert len(shards) > 2 and not (tmp_path / "model.safetensors").exists()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == shards
    assert set(index["weight_map"]) == set(model.state_dict())
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in model.state_dict().values())
    for shard in shards:  # no shard over the limit unless it holds a single larger tensor
        tensors = load_file(tmp_path / shard)
        assert len(tensors) == 1 or sum(t.numel() * t.element_size() for t in tensors.values()) <= 20_000
    loaded = from_pretrained(tmp_path)
    for key, value in loaded.state_dict().items():
        torch.testing.assert_close(value, model.state_dict()[key], atol=0, rtol=0, msg=key)
    assert_same_logits(transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval(), model)

    save_pretrained(model, tmp_path)  # unsharded again: stale shards and index must go
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == ["model.safetensors"]
    assert not (tmp_path / "model.safetensors.index.json").exists()
    assert not list(tmp_path.glob(".*.tmp"))
    from_pretrained(tmp_path)


def test_save_keeps_unrelated_safetensors(saved, tmp_path):
    """Only earlier model shards are stale: an adapter (or any other file) in the folder stays."""
    save_file({"x": torch.zeros(2)}, tmp_path / "adapter_model.safetensors")
    save_file({"x": torch.zeros(2)}, tmp_path / "model-00001-of-00009.safetensors")
    save_pretrained(saved[0], tmp_path)
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == ["adapter_model.safetensors", "model.safetensors"]


def test_tied_embeddings_survive(transformers, tmp_path):
    model = random_model(tiny_config(**ARCH_CONFIGS["gemma"]))
    save_pretrained(model, tmp_path)
    assert "lm_head.weight" not in load_file(tmp_path / "model.safetensors")
    loaded = from_pretrained(tmp_path)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    torch.testing.assert_close(loaded.lm_head.weight, model.lm_head.weight, atol=0, rtol=0)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    assert_same_logits(hf, loaded)


def test_dtypes(saved, tmp_path):
    model, _ = saved
    save_pretrained(model, tmp_path, dtype="bf16")
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    assert all(t.dtype == torch.bfloat16 for t in load_file(tmp_path / "model.safetensors").values())
    assert from_pretrained(tmp_path).lm_head.weight.dtype == torch.bfloat16  # the stored dtype by default
    upcast = from_pretrained(tmp_path, dtype="float32")
    assert upcast.lm_head.weight.dtype == torch.float32
    torch.testing.assert_close(upcast.lm_head.weight, model.lm_head.weight.bfloat16().float(), atol=0, rtol=0)


def test_generation_config_written(saved):
    _, path = saved
    gen = json.loads((path / "generation_config.json").read_text())
    assert gen["eos_token_id"] == tiny_config().eos_token_id and gen["bos_token_id"] == tiny_config().bos_token_id


def test_meta_model_gets_its_buffers_back():
    """reset_buffers recomputes the ALiBi slopes a meta-device build (as in from_pretrained) leaves empty."""
    config = tiny_config(**NATIVE_CONFIGS["alibi"])
    with torch.device("meta"):
        model = Transformer(config)
    model.to_empty(device="cpu")
    model.reset_buffers()
    torch.testing.assert_close(model.alibi_slopes, Transformer(config).alibi_slopes)


def test_parse_helpers():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 * 2**30 and parse_size(123) == 123
    assert parse_size("20KB") == 20_000 and parse_size("1.5MB") == 1_500_000
    with pytest.raises(ValueError, match="cannot read size"):
        parse_size("big")
    assert parse_dtype("bf16") is torch.bfloat16 and parse_dtype(None) is None
    with pytest.raises(ValueError, match="unknown dtype"):
        parse_dtype("int8")


# ---- bad input: one clear line naming the file and the key -------------------------------------------------------

def test_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        from_pretrained(tmp_path / "nope")
    assert "nope" in one_line(e)


def test_missing_config(broken):
    (broken / "config.json").unlink()
    with pytest.raises(FileNotFoundError) as e:
        from_pretrained(broken)
    assert "config.json" in one_line(e)


def test_unknown_model_type(broken):
    config = json.loads((broken / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps({**config, "model_type": "bert"}))
    with pytest.raises(ConfigError) as e:
        from_pretrained(broken)
    msg = one_line(e)
    assert "config.json" in msg and "bert" in msg


def rewrite(path, change) -> None:
    tensors = load_file(path / "model.safetensors")
    change(tensors)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def test_shape_mismatch(broken):
    key = "model.layers.1.mlp.up_proj.weight"
    rewrite(broken, lambda t: t.update({key: t[key][:-1]}))
    with pytest.raises(CheckpointError) as e:
        from_pretrained(broken)
    msg = one_line(e)
    assert "model.safetensors" in msg and key in msg and "(95, 64)" in msg and "(96, 64)" in msg


def test_config_disagrees_with_weights(broken):
    config = json.loads((broken / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps({**config, "intermediate_size": 128}))
    with pytest.raises(CheckpointError) as e:
        from_pretrained(broken)
    msg = one_line(e)
    assert "model.safetensors" in msg and "mlp" in msg


def test_unexpected_key(broken):
    rewrite(broken, lambda t: t.update({"model.layers.0.self_attn.extra.weight": torch.zeros(2)}))
    with pytest.raises(CheckpointError) as e:
        from_pretrained(broken)
    msg = one_line(e)
    assert "model.safetensors" in msg and "model.layers.0.self_attn.extra.weight" in msg


def test_missing_key(broken):
    rewrite(broken, lambda t: t.pop("model.norm.weight"))
    with pytest.raises(CheckpointError) as e:
        from_pretrained(broken)
    msg = one_line(e)
    assert "model.norm.weight" in msg and str(broken) in msg


def test_ignored_inv_freq_is_skipped(broken):
    rewrite(broken, lambda t: t.update({"model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(8)}))
    from_pretrained(broken)


@pytest.mark.parametrize("where", ["header", "data"])
def test_truncated_file(broken, where):
    file = broken / "model.safetensors"
    data = file.read_bytes()
    header = 8 + int.from_bytes(data[:8], "little")
    file.write_bytes(data[:header // 2] if where == "header" else data[:header + (len(data) - header) // 2])
    with pytest.raises(CheckpointError) as e:
        from_pretrained(broken)
    assert "model.safetensors" in one_line(e)


def test_index_names_a_missing_shard(saved, tmp_path):
    save_pretrained(saved[0], tmp_path, max_shard_size="20KB")
    victim = sorted(tmp_path.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(FileNotFoundError) as e:
        from_pretrained(tmp_path)
    msg = one_line(e)
    assert victim.name in msg and "index" in msg


@pytest.mark.parametrize("index", ["{}", '{"weight_map": ["model-00001-of-00002.safetensors"]}',
                                   '{"weight_map": {"lm_head.weight": 1}}'])
def test_broken_index(saved, tmp_path, index):
    """No weight_map, a list for one (was an AttributeError traceback), a file name that is not a string (TypeError)."""
    save_pretrained(saved[0], tmp_path, max_shard_size="20KB")
    (tmp_path / "model.safetensors.index.json").write_text(index)
    with pytest.raises(CheckpointError) as e:
        from_pretrained(tmp_path)
    assert "model.safetensors.index.json" in one_line(e)


def test_pickled_weights_are_never_loaded(broken):
    (broken / "model.safetensors").unlink()
    torch.save({"x": torch.zeros(1)}, broken / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError) as e:
        from_pretrained(broken)
    msg = one_line(e)
    assert "pytorch_model.bin" in msg and "pickled weights are never loaded" in msg


def test_no_weights_at_all(broken):
    (broken / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError) as e:
        from_pretrained(broken)
    assert "safetensors" in one_line(e)


def test_config_round_trips_through_folder(saved):
    model, path = saved
    assert ModelConfig.from_hf(path) == model.config


# ---- models with a PEFT method applied ---------------------------------------------------------------------------

# methods whose adapter folds into the weights (merge_adapter), and those that only run alongside the model
FOLDABLE = {"lora": lambda m: apply_lora(m, target_modules="all-linear"),
            "dora": lambda m: apply_lora(m, use_dora=True),
            "qlora": apply_qlora,
            "ia3": apply_ia3}
RUNTIME_ONLY = {"prefix": lambda m: apply_prefix(m, num_virtual_tokens=3),
                "prompt": lambda m: apply_prompt(m, num_virtual_tokens=3),
                "ptuning": lambda m: apply_ptuning(m, num_virtual_tokens=3),
                "bottleneck": apply_bottleneck,
                "bitfit": apply_bitfit}


def adapted(model: Transformer, apply, seed: int = 0) -> Transformer:
    """`apply`(model) with random non-trivial adapter values (every method's init leaves the model equal to its
    base, which would make the comparisons vacuous)."""
    model = apply(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * 0.1)
    return model.eval()


def logits(model, ids: torch.Tensor | None = None) -> torch.Tensor:
    with torch.no_grad():
        return model(batch()[0] if ids is None else ids)


@pytest.mark.parametrize("kind", list(FOLDABLE))
def test_an_unmerged_adapter_is_refused_and_the_merged_model_round_trips(kind, tmp_path):
    base = random_model(tiny_config())
    base_logits = logits(base)
    model = adapted(base, FOLDABLE[kind])
    live = logits(model)
    with pytest.raises(ValueError, match="merge_adapter") as e:
        save_pretrained(model, tmp_path / "out")
    assert "save_adapter" in one_line(e) and not (tmp_path / "out").exists()  # refused before writing anything
    merge_adapter(model)
    merged = logits(model)
    assert (merged - base_logits).abs().max() > 0.05  # the adapter is in the weights
    # QLoRA's live forward ran its base matmul in bf16; the merged weight is fp32
    torch.testing.assert_close(merged, live, rtol=0, atol=5e-2 if kind == "qlora" else 1e-5)
    again = from_pretrained(save_pretrained(model, tmp_path / "out"))
    torch.testing.assert_close(logits(again), merged, rtol=0, atol=0)


@pytest.mark.parametrize("kind", list(RUNTIME_ONLY))
def test_a_runtime_adapter_is_refused_and_its_adapter_folder_round_trips(kind, tmp_path):
    base = save_pretrained(random_model(tiny_config()), tmp_path / "base")
    model = adapted(from_pretrained(base), RUNTIME_ONLY[kind])
    with pytest.raises(ValueError, match="save_adapter") as e:
        save_pretrained(model, tmp_path / "out")
    assert "merge_adapter" not in one_line(e) and not (tmp_path / "out").exists()
    save_adapter(model, tmp_path / "adapter")
    again = load_adapter(from_pretrained(base), tmp_path / "adapter").eval()
    assert (logits(model) - logits(from_pretrained(base))).abs().max() > 0.05
    torch.testing.assert_close(logits(again), logits(model), rtol=0, atol=0)


def test_bitfit_on_existing_biases_is_a_plain_model(tmp_path):
    """Qwen2's q/k/v biases are checkpoint tensors already: trained by BitFit, the model saves as it is."""
    base = random_model(tiny_config(**ARCH_CONFIGS["qwen2"]))
    before = logits(base)
    model = adapted(base, lambda m: apply_bitfit(m, target_modules=["q_proj", "k_proj", "v_proj"]))
    assert (logits(model) - before).abs().max() > 0.05
    again = from_pretrained(save_pretrained(model, tmp_path))
    torch.testing.assert_close(logits(again), logits(model), rtol=0, atol=0)


def test_adapters_true_writes_a_step_folder_that_load_weights_restores(tmp_path):
    """The training loop's step folders keep the adapter tensors, read back into a model with the same adapter."""
    model = adapted(random_model(tiny_config()), FOLDABLE["lora"])
    save_pretrained(model, tmp_path, adapters=True)
    fresh = FOLDABLE["lora"](random_model(tiny_config(), seed=1))
    load_weights(fresh, tmp_path)
    torch.testing.assert_close(logits(fresh.eval()), logits(model), rtol=0, atol=0)


def test_saved_files_get_the_usual_permissions(tmp_path):
    """safetensors and temporary files are private (0600); a saved model folder must be readable as any new file
    is under the umask (a server under another account, a shared cluster folder)."""
    import os
    import stat

    from camelid.files import _UMASK
    from camelid.tokenizer import Tokenizer

    model = Transformer(tiny_config())
    save_pretrained(model, tmp_path / "m", max_shard_size="100KB")
    Tokenizer.train([], 300, show_progress=False, texts=["hello there"] * 10).save(tmp_path / "m")
    apply_lora(model, r=2, target_modules=["q_proj"])
    save_adapter(model, tmp_path / "adapter")
    expected = 0o666 & ~_UMASK
    files = [p for p in (tmp_path / "m").iterdir()] + [p for p in (tmp_path / "adapter").iterdir()]
    assert any(p.suffix == ".safetensors" for p in files) and any(p.name == "tokenizer.json" for p in files)
    for path in files:
        assert stat.S_IMODE(os.stat(path).st_mode) == expected, path
    assert stat.S_IMODE(os.stat(tmp_path / "adapter").st_mode) == 0o777 & ~_UMASK


def test_merge_copies_a_vocab_and_merges_tokenizer(tmp_path):
    """A base whose tokenizer is GPT-2's vocab + merges files (no tokenizer.json; camelid.Tokenizer reads them) keeps
    it through `camelid merge`: the merged folder was left with no tokenizer at all."""
    from camelid.checkpoint import merge_adapter_folder
    from camelid.tokenizer import Tokenizer

    base = save_pretrained(random_model(tiny_config()), tmp_path / "base")
    (base / "vocab.json").write_text(json.dumps({"a": 0, "b": 1, "ab": 2}))
    (base / "merges.txt").write_text("#version: 0.2\na b\n")
    model = from_pretrained(base)
    apply_lora(model)
    save_adapter(model, tmp_path / "adapter")
    out = merge_adapter_folder(base, tmp_path / "adapter", tmp_path / "merged")
    assert Tokenizer(out).encode("ab", bos=False) == [2]
