"""A small model trained by our own pretraining pipeline (prepare -> train), once per session, and held-out text:
quantization is judged on weights that learned something, not on random ones (whose perplexity is the vocab)."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import pytest
from model_zoo import FIXTURES

from camelid.data.pretrain import prepare
from camelid.tokenizer import Tokenizer
from camelid.train import TrainConfig
from camelid.train.loop import train

SHAKESPEARE = FIXTURES / "data" / "shakespeare_gutenberg.txt"
# hidden 128 and intermediate 384 so that int4 groups of 128 exist on every layer; 2 KV heads make k_proj / v_proj
# 64 x 128, which NF4 must pad (8,192 weights, less than one 64 x 256 double-quantization unit)
SHAPE = dict(hidden_size=128, intermediate_size=384, num_attention_heads=4, num_key_value_heads=2,
             num_hidden_layers=2, max_position_embeddings=256)


@dataclass
class TrainedModel:
    folder: Path  # a HF-style folder with tokenizer.json
    heldout: Path  # text the model never saw


def _texts() -> tuple[str, str]:
    """(training text, held-out text): Shakespeare when the fixtures are here, else structured synthetic prose."""
    if SHAKESPEARE.is_file():
        text = SHAKESPEARE.read_text(encoding="utf-8")
        return text[100_000:700_000], text[3_000_000:3_040_000]  # held out: other plays
    rng = random.Random(0)
    names, verbs, things = ["Anna", "Bo", "Cleo", "Dan"], ["sees", "takes", "gives", "finds"], ["a cup", "the key",
                                                                                                "two apples", "bread"]
    sentences = [f"{rng.choice(names)} {rng.choice(verbs)} {rng.choice(things)} in room {rng.randrange(9)}."
                 for _ in range(24_000)]
    return " ".join(sentences[:20_000]), " ".join(sentences[20_000:])


@pytest.fixture(scope="session")
def trained_model(tmp_path_factory) -> TrainedModel:
    root = tmp_path_factory.mktemp("quant_trained")
    train_text, heldout = _texts()
    (root / "in").mkdir()
    (root / "in" / "train.txt").write_text(train_text, encoding="utf-8")
    (root / "heldout.txt").write_text(heldout, encoding="utf-8")
    Tokenizer.train([], 256 + 3, show_progress=False).save(root / "tok")  # byte-level: no training needed
    prepare(root / "in", root / "tok", root / "data", val_fraction=0.0, workers=1, show_progress=False)
    cfg = TrainConfig(model="tiny", model_overrides=dict(SHAPE), data=str(root / "data"), tokenizer=str(root / "tok"),
                      out=str(root / "run"), max_steps=200, micro_batch=8, seq_len=128, lr=4e-3, warmup_steps=20,
                      eval_every=0, sample_every=0, save_every=0, tensorboard=False, log_every=1000, device="cpu",
                      precision="fp32")
    result = train(cfg)
    return TrainedModel(result.final_dir, root / "heldout.txt")
