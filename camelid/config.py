"""ModelConfig: one dataclass for every LLaMA-family architecture camelid runs.

The field names follow Hugging Face `config.json` where one exists, so `from_hf` / `to_hf` are mostly renames.
Imports nothing from camelid.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A config.json camelid cannot express, or a ModelConfig with inconsistent fields."""


# model types whose config.json transformers reads; "camelid" holds what none of them can express (ALiBi, ...)
HF_MODEL_TYPES = ("llama", "mistral", "mixtral", "qwen2", "gemma")
MODEL_TYPES = HF_MODEL_TYPES + ("camelid",)
POSITION_ENCODINGS = ("rope", "alibi", "learned", "sinusoidal")
ROPE_TYPES = ("default", "linear", "dynamic", "llama3")
ACTIVATIONS = ("silu", "gelu_pytorch_tanh", "gelu")
HF_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and value > 0


def _number(value: Any) -> Any:
    """float(value) for an int or float; anything else as it is, for validate() to refuse naming its key."""
    return float(value) if isinstance(value, (int, float)) else value


@dataclass
class ModelConfig:
    model_type: str = "llama"
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None  # None: same as num_attention_heads (no GQA)
    head_dim: int | None = None  # None: hidden_size // num_attention_heads (Gemma sets it explicitly)
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    hidden_act: str = "silu"  # gated MLP activation: silu = SwiGLU, gelu_pytorch_tanh = GeGLU-tanh (Gemma)
    qkv_bias: bool = False  # Qwen2: bias on q/k/v only
    o_bias: bool = False  # LLaMA's attention_bias puts a bias on o_proj too
    mlp_bias: bool = False
    position_encoding: str = "rope"
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # {"rope_type": "llama3"|"linear"|"dynamic", "factor": ..., ...}
    sliding_window: int | None = None  # Mistral: each token sees at most this many keys (itself included)
    num_local_experts: int = 0  # 0: dense MLP; > 0: Mixtral sparse MoE
    num_experts_per_tok: int = 2
    tie_word_embeddings: bool = False
    scale_embeddings: bool = False  # Gemma: embeddings * sqrt(hidden_size)
    norm_plus_one: bool = False  # Gemma: RMSNorm scales by (1 + weight), weight initialised at 0
    initializer_range: float = 0.02
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = None
    dtype: str = "float32"  # the dtype the weights are stored in on disk

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None and _positive_int(self.hidden_size) and _positive_int(self.num_attention_heads):
            self.head_dim = self.hidden_size // self.num_attention_heads  # else validate() names the bad field
        if isinstance(self.rope_scaling, dict) and self.rope_scaling.get("rope_type", "default") == "default":
            self.rope_scaling = None
        self.validate()

    def validate(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ConfigError(msg)

        need(self.model_type in MODEL_TYPES, f"unknown model_type {self.model_type!r}; supported: {', '.join(MODEL_TYPES)}")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            need(_positive_int(value), f"{name} must be a positive integer, got {value!r}")
        for name in ("rope_theta", "rms_norm_eps"):
            value = getattr(self, name)
            need(isinstance(value, (int, float)) and value > 0, f"{name} must be a positive number, got {value!r}")
        need(self.num_attention_heads % self.num_key_value_heads == 0,
             f"num_attention_heads ({self.num_attention_heads}) must be a multiple of num_key_value_heads "
             f"({self.num_key_value_heads})")
        need(self.position_encoding in POSITION_ENCODINGS,
             f"unknown position_encoding {self.position_encoding!r}; supported: {', '.join(POSITION_ENCODINGS)}")
        need(self.position_encoding != "rope" or self.head_dim % 2 == 0, f"RoPE needs an even head_dim, got {self.head_dim}")
        need(self.position_encoding != "sinusoidal" or self.hidden_size % 2 == 0, "sinusoidal positions need an even hidden_size")
        need(self.hidden_act in ACTIVATIONS, f"unknown hidden_act {self.hidden_act!r}; supported: {', '.join(ACTIVATIONS)}")
        need(self.rope_scaling is None or isinstance(self.rope_scaling, dict),
             f"rope_scaling must be a mapping such as {{'rope_type': 'linear', 'factor': 2.0}}, "
             f"got {self.rope_scaling!r}")
        if self.rope_scaling is not None:
            rope_type = self.rope_scaling.get("rope_type")
            need(rope_type in ROPE_TYPES, f"unknown rope_scaling type {rope_type!r}; supported: {', '.join(ROPE_TYPES)}")
            factor = self.rope_scaling.get("factor")
            need(isinstance(factor, (int, float)) and factor > 0, "rope_scaling needs a positive 'factor'")
            if rope_type == "llama3":
                for key in ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
                    need(key in self.rope_scaling, f"rope_scaling of type llama3 needs {key!r}")
        need(self.sliding_window is None or _positive_int(self.sliding_window),
             f"sliding_window must be a positive integer or None, got {self.sliding_window!r}")
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):  # eos may be a list of ids
            value = getattr(self, name)
            ids = value if name == "eos_token_id" and isinstance(value, (list, tuple)) else [value]
            need(value is None or all(isinstance(i, int) for i in ids),
                 f"{name} must be a token id (an integer){', a list of them' if name == 'eos_token_id' else ''} "
                 f"or null, got {value!r}")
        if self.num_local_experts:
            need(0 < self.num_experts_per_tok <= self.num_local_experts,
                 f"num_experts_per_tok must be in 1..{self.num_local_experts}, got {self.num_experts_per_tok}")

    # ---- derived sizes ----------------------------------------------------------------------------------------
    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    @property
    def eos_token_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return list(self.eos_token_id) if isinstance(self.eos_token_id, (list, tuple)) else [self.eos_token_id]

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with `changes`. Derived defaults follow their inputs: a new hidden_size or head count recomputes
        head_dim (and a new head count the KV heads) unless those were set explicitly or differ from the default."""
        if "head_dim" not in changes and self.head_dim == self.hidden_size // self.num_attention_heads:
            changes["head_dim"] = None
        if "num_key_value_heads" not in changes and self.num_key_value_heads == self.num_attention_heads:
            changes["num_key_value_heads"] = None
        return dataclasses.replace(self, **changes)

    # ---- Hugging Face config.json ----------------------------------------------------------------------------
    @classmethod
    def from_hf(cls, source: str | Path | dict[str, Any]) -> ModelConfig:
        """Read a Hugging Face config.json (path, folder or dict). Both `rope_theta`/`rope_scaling` and the newer
        `rope_parameters` layouts are understood."""
        where = "config"
        if not isinstance(source, dict):
            path = Path(source)
            if path.is_dir():
                path = path / "config.json"
            where = str(path)
            if not path.is_file():
                raise FileNotFoundError(f"no config.json at {path}")
            try:
                source = json.loads(path.read_text())
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(source, dict):
            raise ConfigError(f"{where}: expected a JSON object of settings, got {type(source).__name__}")
        hf = dict(source)
        model_type = hf.get("model_type")
        if model_type not in MODEL_TYPES:
            raise ConfigError(f"{where}: unknown model_type {model_type!r}; supported: {', '.join(MODEL_TYPES)}")
        if model_type == "camelid":  # our own layout: field names are the dataclass's
            names = {f.name for f in dataclasses.fields(cls)}
            return cls(**{k: v for k, v in hf.items() if k in names})
        missing = [key for key in HF_REQUIRED if key not in hf]
        if missing:
            raise ConfigError(f"{where}: no {missing[0]!r}; a {model_type} config.json needs {', '.join(HF_REQUIRED)}")

        rope_theta, rope_scaling = _read_rope(hf)
        kw: dict[str, Any] = dict(
            model_type=model_type,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_hidden_layers=hf["num_hidden_layers"],
            num_attention_heads=hf["num_attention_heads"],
            num_key_value_heads=hf.get("num_key_value_heads"),
            head_dim=hf.get("head_dim"),
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            hidden_act=hf.get("hidden_activation") or hf.get("hidden_act", "silu"),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            tie_word_embeddings=hf.get("tie_word_embeddings", model_type == "gemma"),
            initializer_range=hf.get("initializer_range", 0.02),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=hf.get("eos_token_id"),
            pad_token_id=hf.get("pad_token_id"),
            dtype=hf.get("dtype") or hf.get("torch_dtype") or "float32",
        )
        if model_type == "llama":
            kw.update(qkv_bias=hf.get("attention_bias", False), o_bias=hf.get("attention_bias", False),
                      mlp_bias=hf.get("mlp_bias", False))
        elif model_type in ("mistral", "mixtral"):
            kw.update(sliding_window=hf.get("sliding_window"))
        elif model_type == "qwen2":
            if hf.get("use_sliding_window"):
                raise ConfigError(f"{where}: Qwen2 with use_sliding_window=true (per-layer windows) is not supported")
            kw.update(qkv_bias=True)
        elif model_type == "gemma":
            if hf.get("attention_bias"):
                raise ConfigError(f"{where}: Gemma with attention_bias=true is not supported")
            kw.update(scale_embeddings=True, norm_plus_one=True)
        if model_type == "mixtral":
            kw.update(num_local_experts=hf.get("num_local_experts", 8), num_experts_per_tok=hf.get("num_experts_per_tok", 2))
        try:
            return cls(**kw)
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None

    def hf_compatible(self) -> bool:
        """Whether transformers can load this architecture under `self.model_type` exactly."""
        t = self.model_type
        if t not in HF_MODEL_TYPES or self.position_encoding != "rope" or self.hidden_act != ("gelu_pytorch_tanh" if t == "gemma" else "silu"):
            return False
        if (self.scale_embeddings or self.norm_plus_one) != (t == "gemma") or self.scale_embeddings != self.norm_plus_one:
            return False
        if bool(self.num_local_experts) != (t == "mixtral"):
            return False
        if self.sliding_window is not None and t not in ("mistral", "mixtral"):
            return False
        biases = (self.qkv_bias, self.o_bias, self.mlp_bias)
        allowed = {"llama": {(False,) * 3, (True, True, False), (False, False, True), (True,) * 3},
                   "qwen2": {(True, False, False)}}.get(t, {(False,) * 3})
        return biases in allowed

    def to_hf(self) -> dict[str, Any]:
        """The config.json dict. Architectures transformers cannot express are written as model_type "camelid"."""
        if not self.hf_compatible():
            return {"architectures": ["CamelidForCausalLM"], **dataclasses.asdict(self), "model_type": "camelid"}
        arch = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "mixtral": "MixtralForCausalLM",
                "qwen2": "Qwen2ForCausalLM", "gemma": "GemmaForCausalLM"}[self.model_type]
        rope_parameters = {"rope_type": "default", "rope_theta": self.rope_theta, **(self.rope_scaling or {})}
        hf: dict[str, Any] = {
            "architectures": [arch],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "hidden_act": self.hidden_act,
            "rope_theta": self.rope_theta,  # older readers (transformers < 5, vLLM) look here
            "rope_parameters": rope_parameters,
            "tie_word_embeddings": self.tie_word_embeddings,
            "initializer_range": self.initializer_range,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "dtype": self.dtype,
            "use_cache": True,
        }
        if self.rope_scaling is not None:
            hf["rope_scaling"] = dict(self.rope_scaling)
        if self.model_type == "llama":
            hf.update(attention_bias=self.qkv_bias, mlp_bias=self.mlp_bias)
        if self.model_type in ("mistral", "mixtral"):
            hf["sliding_window"] = self.sliding_window
        if self.model_type == "qwen2":
            hf.update(use_sliding_window=False, sliding_window=None)
        if self.model_type == "mixtral":
            hf.update(num_local_experts=self.num_local_experts, num_experts_per_tok=self.num_experts_per_tok)
        return hf

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_hf(), indent=2) + "\n")


def _read_rope(hf: dict[str, Any]) -> tuple[float, Any]:
    """(rope_theta, rope_scaling or None) from either config layout; a rope_scaling that is not a mapping comes back
    as it is, for validate() to refuse."""
    params = hf.get("rope_parameters")
    if isinstance(params, dict) and "full_attention" in params:  # per-layer-type layout: take the global one
        params = params["full_attention"]
    scaling = params if isinstance(params, dict) else hf.get("rope_scaling") or {}
    if not isinstance(scaling, dict):  # validate() refuses it, naming the field
        return _number(hf.get("rope_theta", 10000.0)), scaling
    scaling = dict(scaling)
    theta = _number(scaling.pop("rope_theta", hf.get("rope_theta", 10000.0)))
    if "type" in scaling and "rope_type" not in scaling:  # transformers < 4.45 spelling
        scaling["rope_type"] = scaling.pop("type")
    scaling.pop("type", None)
    if scaling.get("rope_type", "default") == "default":
        return theta, None
    return theta, scaling


def _llama(**kw: Any) -> ModelConfig:
    return ModelConfig(**{"rms_norm_eps": 1e-5, **kw})


# Shapes of well-known checkpoints (weights are random when built from a preset).
PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(vocab_size=512, hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5, bos_token_id=0,
                        eos_token_id=1),
    "tinyllama-1.1b": _llama(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                             num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048),
    "llama-2-7b": _llama(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                         max_position_embeddings=4096),
    "llama-2-13b": _llama(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                          max_position_embeddings=4096),
    "llama-65b": _llama(hidden_size=8192, intermediate_size=22016, num_hidden_layers=80, num_attention_heads=64,
                        max_position_embeddings=2048),
    "llama-3-8b": _llama(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192, rope_theta=500000.0,
                         bos_token_id=128000, eos_token_id=128001),
    "llama-3.1-8b": _llama(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                           num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
                           rope_theta=500000.0, bos_token_id=128000, eos_token_id=[128001, 128008, 128009],
                           rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    "mistral-7b": _llama(model_type="mistral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=32768, sliding_window=4096),
    "mixtral-8x7b": _llama(model_type="mixtral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                           num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=32768,
                           rope_theta=1e6, num_local_experts=8, num_experts_per_tok=2),
    "qwen2-7b": ModelConfig(model_type="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                            num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                            max_position_embeddings=32768, rope_theta=1e6, qkv_bias=True, bos_token_id=None,
                            eos_token_id=151643),
    "gemma-2b": ModelConfig(model_type="gemma", vocab_size=256000, hidden_size=2048, intermediate_size=16384,
                            num_hidden_layers=18, num_attention_heads=8, num_key_value_heads=1, head_dim=256,
                            max_position_embeddings=8192, hidden_act="gelu_pytorch_tanh", tie_word_embeddings=True,
                            scale_embeddings=True, norm_plus_one=True, bos_token_id=2, eos_token_id=1, pad_token_id=0),
}


def get_preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        if "/" in name or name.startswith("."):  # meant as a folder: say that, not "unknown preset"
            raise FileNotFoundError(f"no model folder at {name}")
        raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return dataclasses.replace(PRESETS[name])


def config_of(model: str | Path) -> ModelConfig:
    """`--model` of the planning verbs: a model folder's config.json, else a preset's config."""
    return ModelConfig.from_hf(model) if Path(model).is_dir() else get_preset(str(model))


def num_parameters(config: ModelConfig) -> int:
    """Parameter count from shapes alone (no model built): what `camelid info` prints for the 65B preset."""
    c = config
    attn = c.hidden_size * (c.q_size + 2 * c.kv_size) + c.q_size * c.hidden_size
    attn += (c.q_size + 2 * c.kv_size) * c.qkv_bias + c.hidden_size * c.o_bias
    mlp = 3 * c.hidden_size * c.intermediate_size + (2 * c.intermediate_size + c.hidden_size) * c.mlp_bias
    if c.num_local_experts:
        mlp = c.num_local_experts * mlp + c.hidden_size * c.num_local_experts
    per_layer = attn + mlp + 2 * c.hidden_size
    embed = c.vocab_size * c.hidden_size * (1 if c.tie_word_embeddings else 2)
    positions = c.max_position_embeddings * c.hidden_size if c.position_encoding == "learned" else 0
    return c.num_hidden_layers * per_layer + embed + positions + c.hidden_size

