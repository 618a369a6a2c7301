"""A tiny prepared dataset: a byte-level BPE tokenizer and the train/val token shards made with it."""

from __future__ import annotations

import json

import pytest
from train_helpers import Prepared

from camelid.data.pretrain import prepare
from camelid.tokenizer import Tokenizer


def _docs(n: int) -> list[str]:
    animals = ["llama", "alpaca", "vicuna", "guanaco", "camel"]
    return [f"The {animals[i % 5]} number {i} walks over the hill and eats {i % 7} apples. " * (1 + i % 3)
            for i in range(n)]


@pytest.fixture(scope="session")
def prepared(tmp_path_factory) -> Prepared:
    root = tmp_path_factory.mktemp("prepared")
    docs = _docs(300)
    (root / "corpus.txt").write_text("\n".join(docs), encoding="utf-8")
    Tokenizer.train([root / "corpus.txt"], 300, show_progress=False).save(root / "tok")
    (root / "in").mkdir()
    (root / "in" / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    prepare(root / "in", root / "tok", root / "data", val_fraction=0.1, workers=1, show_progress=False)
    return Prepared(root / "data", root / "tok")
