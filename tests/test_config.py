"""ModelConfig: config.json round trips, both rope layouts, validation, and parameter counts vs transformers."""

import json

import pytest
import torch

from camelid.config import PRESETS, ConfigError, ModelConfig, get_preset, num_parameters
from camelid.model import Transformer
from model_zoo import NATIVE_CONFIGS, tiny_config

# Published parameter counts; test_preset_counts_match_transformers checks them independently.
KNOWN_COUNTS = {
    "tinyllama-1.1b": 1_100_048_384,
    "llama-2-7b": 6_738_415_616,
    "mistral-7b": 7_241_732_096,
    "mixtral-8x7b": 46_702_792_704,
    "llama-3-8b": 8_030_261_248,
    "gemma-2b": 2_506_172_416,
    "qwen2-7b": 7_615_616_512,
}


@pytest.mark.parametrize("name", list(PRESETS))
def test_hf_round_trip_every_preset(name):
    config = get_preset(name)
    assert ModelConfig.from_hf(config.to_hf()) == config
    # and through JSON text, as on disk
    assert ModelConfig.from_hf(json.loads(json.dumps(config.to_hf()))) == config


def test_from_hf_path_and_folder(tmp_path):
    config = get_preset("llama-3.1-8b")
    config.save(tmp_path / "config.json")
    assert ModelConfig.from_hf(tmp_path) == config
    assert ModelConfig.from_hf(tmp_path / "config.json") == config


LLAMA3_SCALING = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 8192}
BASE = dict(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
            num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072, rms_norm_eps=1e-5)


@pytest.mark.parametrize("layout", ["old-type", "old-rope_type", "new"])
def test_from_hf_reads_both_rope_layouts(layout):
    if layout == "old-type":  # transformers < 4.45
        hf = {**BASE, "rope_theta": 500000.0, "rope_scaling": {"type": "llama3", **LLAMA3_SCALING}}
    elif layout == "old-rope_type":  # transformers 4.45 .. 4.x
        hf = {**BASE, "rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", **LLAMA3_SCALING}}
    else:  # transformers 5: theta inside rope_parameters
        hf = {**BASE, "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, **LLAMA3_SCALING}}
    config = ModelConfig.from_hf(hf)
    assert config.rope_theta == 500000.0
    assert config.rope_scaling == {"rope_type": "llama3", **LLAMA3_SCALING}


@pytest.mark.parametrize("hf_rope", [
    {"rope_theta": 1e6},
    {"rope_theta": 1e6, "rope_scaling": None},
    {"rope_parameters": {"rope_type": "default", "rope_theta": 1e6}},
    {"rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 1e6}}},
])
def test_from_hf_default_rope_has_no_scaling(hf_rope):
    config = ModelConfig.from_hf({**BASE, **hf_rope})
    assert config.rope_theta == 1e6 and config.rope_scaling is None


def test_from_hf_linear_old_layout():
    config = ModelConfig.from_hf({**BASE, "rope_scaling": {"type": "linear", "factor": 4.0}})
    assert config.rope_scaling == {"rope_type": "linear", "factor": 4.0}
    assert config.rope_theta == 10000.0


def test_to_hf_writes_both_layouts():
    hf = get_preset("llama-3.1-8b").to_hf()
    assert hf["rope_theta"] == 500000.0
    assert hf["rope_parameters"] == {"rope_type": "llama3", "rope_theta": 500000.0, **LLAMA3_SCALING}
    assert hf["rope_scaling"]["rope_type"] == "llama3"


def test_model_specific_fields():
    assert ModelConfig.from_hf({**BASE, "model_type": "qwen2"}).qkv_bias
    gemma = ModelConfig.from_hf({**BASE, "model_type": "gemma", "head_dim": 256,
                                 "hidden_activation": "gelu_pytorch_tanh"})
    assert gemma.tie_word_embeddings and gemma.scale_embeddings and gemma.norm_plus_one and gemma.head_dim == 256
    assert ModelConfig.from_hf({**BASE, "model_type": "mistral", "sliding_window": 4096}).sliding_window == 4096
    mixtral = ModelConfig.from_hf({**BASE, "model_type": "mixtral", "num_local_experts": 8, "num_experts_per_tok": 2})
    assert (mixtral.num_local_experts, mixtral.num_experts_per_tok) == (8, 2)
    llama = ModelConfig.from_hf({**BASE, "attention_bias": True})
    assert llama.qkv_bias and llama.o_bias and not llama.mlp_bias
    assert ModelConfig.from_hf({**BASE, "torch_dtype": "bfloat16"}).dtype == "bfloat16"


def test_unknown_model_type_names_the_file(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({**BASE, "model_type": "gpt2"}))
    with pytest.raises(ConfigError, match="config.json") as e:
        ModelConfig.from_hf(tmp_path)
    assert "gpt2" in str(e.value) and "\n" not in str(e.value)


def test_bad_json_and_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        ModelConfig.from_hf(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="config.json"):
        ModelConfig.from_hf(tmp_path)


@pytest.mark.parametrize("text, needle", [
    (json.dumps({k: v for k, v in BASE.items() if k != "hidden_size"}), "hidden_size"),  # was a KeyError traceback
    ("[1, 2]", "JSON object"),  # was a TypeError traceback
    (json.dumps({**BASE, "rope_scaling": "linear"}), "rope_scaling"),  # was dict()'s own ValueError
    # hand-edited token ids and windows: TypeError tracebacks from camelid generate (sorted / > on a str)
    (json.dumps({**BASE, "eos_token_id": "</s>"}), "eos_token_id"),
    (json.dumps({**BASE, "eos_token_id": [1, "a"]}), "eos_token_id"),
    (json.dumps({**BASE, "bos_token_id": 1.5}), "bos_token_id"),
    (json.dumps({**BASE, "pad_token_id": [0]}), "pad_token_id"),
    (json.dumps({**BASE, "model_type": "mistral", "sliding_window": "4096"}), "sliding_window"),
    # float()'s bare 'could not convert string to float', naming neither the file nor the key
    (json.dumps({**BASE, "rope_parameters": {"rope_type": "default", "rope_theta": "x"}}), "rope_theta"),
    (json.dumps({**BASE, "rope_scaling": {"rope_type": "linear", "factor": "x"}}), "factor"),
])
def test_a_config_json_camelid_cannot_read_is_one_line_naming_file_and_key(tmp_path, text, needle):
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(ConfigError, match="config.json") as e:
        ModelConfig.from_hf(tmp_path)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_unsupported_variants_are_refused():
    with pytest.raises(ConfigError, match="sliding"):
        ModelConfig.from_hf({**BASE, "model_type": "qwen2", "use_sliding_window": True})
    with pytest.raises(ConfigError, match="rope_scaling"):
        ModelConfig.from_hf({**BASE, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})


@pytest.mark.parametrize("bad", [
    dict(num_attention_heads=6, num_key_value_heads=4),
    dict(hidden_size=0),
    dict(position_encoding="xpos"),
    dict(hidden_act="relu"),
    dict(head_dim=15),
    dict(sliding_window=0),
    dict(num_local_experts=4, num_experts_per_tok=5),
    dict(rope_scaling={"rope_type": "llama3", "factor": 8.0}),
    dict(rope_scaling={"rope_type": "linear", "factor": 0}),
    dict(model_type="gpt2"),
    # wrong types or zeros (a typo in --set model_overrides.NAME=VALUE): a ConfigError, not a TypeError or a
    # ZeroDivisionError from computing head_dim
    dict(num_attention_heads=0),
    dict(hidden_size="abc"),
    dict(rope_scaling=3),
    dict(rope_theta="abc"),
    dict(rms_norm_eps=0),
])
def test_validation(bad):
    with pytest.raises(ConfigError):
        tiny_config(**bad)


def test_get_preset_returns_a_copy():
    c = get_preset("tiny")
    c.vocab_size = 7
    assert PRESETS["tiny"].vocab_size == 512
    with pytest.raises(ConfigError, match="unknown preset"):
        get_preset("nope")


@pytest.mark.parametrize("name,count", list(KNOWN_COUNTS.items()))
def test_known_parameter_counts(name, count):
    assert num_parameters(PRESETS[name]) == count


@pytest.mark.parametrize("name", [n for n in PRESETS if n != "tiny"])
def test_preset_counts_match_transformers(name, transformers):
    """Count what transformers builds for the same config.json, on the meta device (no memory)."""
    hf = PRESETS[name].to_hf()
    hf_config = transformers.AutoConfig.for_model(hf.pop("model_type"), **hf)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(hf_config)
    assert sum(p.numel() for p in model.parameters()) == num_parameters(PRESETS[name])
    if name in KNOWN_COUNTS:
        assert num_parameters(PRESETS[name]) == KNOWN_COUNTS[name]


@pytest.mark.parametrize("overrides", [
    {},
    dict(tie_word_embeddings=True),
    dict(qkv_bias=True, o_bias=True, mlp_bias=True),
    dict(model_type="mixtral", num_local_experts=4, num_experts_per_tok=2),
    dict(model_type="gemma", head_dim=32, hidden_act="gelu_pytorch_tanh", tie_word_embeddings=True,
         scale_embeddings=True, norm_plus_one=True),
    *NATIVE_CONFIGS.values(),
], ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items())[:60] or "llama")
def test_module_count_equals_formula(overrides):
    config = tiny_config(**overrides)
    with torch.device("meta"):
        model = Transformer(config)
    assert model.num_parameters() == num_parameters(config)


@pytest.mark.parametrize("name", list(NATIVE_CONFIGS))
def test_non_hf_configs_write_camelid_model_type(name):
    config = tiny_config(**NATIVE_CONFIGS[name])
    hf = config.to_hf()
    assert hf["model_type"] == "camelid" and not config.hf_compatible()
    assert ModelConfig.from_hf(json.loads(json.dumps(hf))) == config


def test_hf_compatible():
    assert tiny_config().hf_compatible()
    assert not tiny_config(model_type="llama", sliding_window=8).hf_compatible()  # llama has no window
    assert not tiny_config(model_type="qwen2").hf_compatible()  # qwen2 always has q/k/v bias
    assert tiny_config(model_type="qwen2", qkv_bias=True).hf_compatible()
    hf = tiny_config(model_type="llama", sliding_window=8).to_hf()
    assert hf["model_type"] == "camelid"
