"""Shared test models (imported by tests/conftest.py, which registers the fixtures): tiny random `transformers` models of every architecture camelid loads, saved as HF folders.

transformers is a test-time reference only: tests that compare against it take the `transformers` fixture,
which skips them when it is not installed, so the camelid-only tests still run without it.
"""

from __future__ import annotations

import os

# quiet, offline transformers: set before anything imports it
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tiny models gain nothing from intra-op threads, and on a busy machine OpenMP threads spin-waiting for a descheduled
# sibling made this suite ~8x slower (90 s vs 11 s on 2 cores). Set OMP_NUM_THREADS to override.
os.environ.setdefault("OMP_NUM_THREADS", "1")

from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

from camelid.checkpoint import from_pretrained  # noqa: E402
from camelid.config import ModelConfig  # noqa: E402
from camelid.model import Transformer  # noqa: E402

FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures"

VOCAB = 128
# 64 positions: room for a 7-token prompt + 32 new tokens (generation stops at the context length).
# A wide init keeps tiny random models from collapsing into repeating one token, so greedy comparisons mean something.
COMMON: dict[str, Any] = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                              bos_token_id=1, eos_token_id=2, initializer_range=0.1)
SLIDING_WINDOW = 4

# name -> (transformers config class name, extra kwargs). Every HF architecture and rope scaling camelid supports.
HF_ARCHS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", {}),
    "llama3": ("LlamaConfig", {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                "high_freq_factor": 4.0, "original_max_position_embeddings": 16}}),
    "linear": ("LlamaConfig", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}),
    "dynamic": ("LlamaConfig", {"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}),
    "mistral": ("MistralConfig", {"sliding_window": SLIDING_WINDOW}),
    "mixtral": ("MixtralConfig", {"num_local_experts": 4, "num_experts_per_tok": 2}),
    "qwen2": ("Qwen2Config", {}),
    # head_dim 32 != hidden_size // num_attention_heads (16); tied embeddings need a wider init not to echo the input
    "gemma": ("GemmaConfig", {"head_dim": 32, "initializer_range": 0.4}),
}


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA device")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def transformers():
    """The transformers module (the reference implementation); skips the test when it is not installed."""
    tf = pytest.importorskip("transformers")
    tf.utils.logging.set_verbosity_error()
    tf.utils.logging.disable_progress_bar()
    return tf


def hf_config(transformers, name: str):
    cls_name, extra = HF_ARCHS[name]
    return getattr(transformers, cls_name)(**{**COMMON, **extra})


def perturb_(model: torch.nn.Module, seed: int) -> None:
    """Add noise to every parameter so norms (1 or 0), biases (0) and routers are not at their trivial init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            std = 0.1 if p.dim() == 1 else 0.02  # norms and biases get a visible offset
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)


@pytest.fixture(scope="session")
def hf_checkpoint(transformers, tmp_path_factory):
    """hf_checkpoint(name) -> folder written by transformers' save_pretrained of a tiny random model (cached)."""
    made: dict[str, Path] = {}

    def make(name: str) -> Path:
        if name not in made:
            torch.manual_seed(0)
            model = transformers.AutoModelForCausalLM.from_config(hf_config(transformers, name)).eval()
            perturb_(model, seed=sorted(HF_ARCHS).index(name))
            path = tmp_path_factory.mktemp(f"hf-{name}")
            model.save_pretrained(path)
            made[name] = path
        return made[name]

    return make


@pytest.fixture(scope="module", params=list(HF_ARCHS))
def arch(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def pair(arch, hf_checkpoint, transformers):
    """(transformers model, camelid model) with the same weights, both fp32 and in eval mode."""
    path = hf_checkpoint(arch)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return hf, from_pretrained(path)


def tiny_config(**overrides: Any) -> ModelConfig:
    """A tiny camelid-native config (no transformers needed)."""
    return ModelConfig(**{**COMMON, "intermediate_size": 96, "rms_norm_eps": 1e-5, **overrides})


# camelid-only position encodings that no HF architecture expresses (saved as model_type "camelid")
NATIVE_CONFIGS: dict[str, dict[str, Any]] = {
    "alibi": dict(model_type="camelid", position_encoding="alibi", num_attention_heads=4),
    "learned": dict(model_type="camelid", position_encoding="learned"),
    "sinusoidal": dict(model_type="camelid", position_encoding="sinusoidal"),
}


def random_model(config: ModelConfig, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(config)
    perturb_(model, seed)
    return model.eval()


# camelid-native configs mirroring HF_ARCHS (same names), plus the native position encodings
ARCH_CONFIGS: dict[str, dict[str, Any]] = {
    "llama": {},
    "llama3": dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
    "linear": dict(rope_scaling={"rope_type": "linear", "factor": 2.0}),
    "dynamic": dict(rope_scaling={"rope_type": "dynamic", "factor": 2.0}),
    "mistral": dict(model_type="mistral", sliding_window=SLIDING_WINDOW),
    "mixtral": dict(model_type="mixtral", num_local_experts=4, num_experts_per_tok=2),
    "qwen2": dict(model_type="qwen2", qkv_bias=True),
    "gemma": dict(model_type="gemma", head_dim=32, hidden_act="gelu_pytorch_tanh", tie_word_embeddings=True,
                  scale_embeddings=True, norm_plus_one=True, initializer_range=0.4),
    **NATIVE_CONFIGS,
}


TEXT = """The quick brown fox jumps over the lazy dog. A camel walks across the desert, slowly, slowly.
Llamas and alpacas live in the mountains; they eat grass and hum softly to each other.
"""


def text_model(folder: Path, max_positions: int):
    """(a tiny random model, a byte-level BPE tokenizer trained on TEXT in `folder`) whose vocabularies agree: the
    engine's text tests (stop strings, streaming, detokenizing) need real words."""
    from camelid.tokenizer import Tokenizer

    corpus = folder / "text.txt"
    corpus.write_text(TEXT * 20)
    tok = Tokenizer.train([corpus], vocab_size=300, show_progress=False)
    model = random_model(tiny_config(vocab_size=tok.vocab_size, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id,
                                     max_position_embeddings=max_positions))
    return model, tok
