"""TrainConfig parsing and the checks that refuse bad input before a single training step."""

from __future__ import annotations

import shutil

import pytest
import torch
from train_helpers import tiny_train_config

from camelid.checkpoint import save_pretrained
from camelid.config import ConfigError, get_preset
from camelid.data.pretrain import prepare
from camelid.model import Transformer
from camelid.tokenizer import Tokenizer
from camelid.train import TrainConfig, train
from camelid.train.config import parse_overrides
from camelid.train.pretrain import model_config


def test_defaults_are_valid_and_serialisable():
    cfg = TrainConfig()
    assert cfg.to_dict()["betas"] == [0.9, 0.95]
    assert cfg.min_lr == pytest.approx(cfg.lr * cfg.min_lr_ratio)


def test_yaml_typo_names_the_closest_key(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("max_steps: 10\nwarmup_step: 3\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'warmup_step'; did you mean 'warmup_steps'\?"):
        TrainConfig.from_yaml(path)
    with pytest.raises(ConfigError, match="did you mean 'hidden_size'"):
        TrainConfig(model_overrides={"hiden_size": 64})


def test_yaml_that_is_not_utf8_names_the_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_bytes(b"max_steps: 10\nsample_prompt: caf\xe9\n")  # Latin-1, as some editors save
    with pytest.raises(ConfigError, match=r"run\.yaml: not UTF-8 text"):
        TrainConfig.from_yaml(path)


def test_yaml_values_flags_and_set(tmp_path):
    path = tmp_path / "run.yaml"
    # YAML 1.1 reads 3e-4 (no dot) as a string: it must still become a float
    path.write_text("lr: 3e-4\nmax_steps: 1e3\nbetas: [0.9, 0.99]\nmodel_overrides: {num_hidden_layers: 4}\n")
    cfg = TrainConfig.from_yaml(path)
    assert (cfg.lr, cfg.max_steps, cfg.betas) == (3e-4, 1000, (0.9, 0.99))
    sets = parse_overrides(["eval_every=7", "model_overrides.hidden_size=32", "compile=true"])
    cfg = TrainConfig.from_yaml(path, **{**sets, "lr": 1e-2})  # flags override the file
    assert (cfg.lr, cfg.eval_every, cfg.compile) == (1e-2, 7, True)
    assert cfg.model_overrides == {"num_hidden_layers": 4, "hidden_size": 32}
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_overrides(["eval_every"])


@pytest.mark.parametrize("bad, match", [
    (dict(max_steps=-1), "max_steps must be >= 1"),
    (dict(precision="fp64"), "unknown precision 'fp64'"),
    (dict(optimizer="sgd"), "unknown optimizer 'sgd'"),
    (dict(lr=0), "lr must be > 0"),
    (dict(lr=float("inf")), "lr must be > 0 and finite, got inf"),  # trained on, every weight turning NaN
    (dict(eps=float("inf")), "eps must be > 0 and finite"),
    (dict(weight_decay=float("inf")), "weight_decay must be finite"),
    (dict(betas=(0.9, 1.0)), "betas"),
    (dict(spike_min_history=60, spike_window=50), "spike_min_history"),
])
def test_invalid_values(bad, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**bad)


def test_wrong_types_name_the_field():
    with pytest.raises(ValueError, match="lr must be float"):
        TrainConfig.from_dict({"lr": "fast"})
    with pytest.raises(ValueError, match="max_steps must be int"):
        TrainConfig.from_dict({"max_steps": 2.5})


# ---- bad input: a clear error, and nothing written (no training started) --------------------------------------

def _refused(cfg: TrainConfig, error: type[Exception], match: str, out) -> None:
    with pytest.raises(error, match=match):
        train(cfg)
    assert not out.exists()


def test_missing_and_empty_data_folder(prepared, tmp_path):
    out = tmp_path / "out"
    _refused(tiny_train_config(prepared, out, data=str(tmp_path / "nowhere")), FileNotFoundError, "no data folder", out)
    (tmp_path / "empty").mkdir()
    _refused(tiny_train_config(prepared, out, data=str(tmp_path / "empty")), FileNotFoundError,
             "camelid data prepare", out)
    _refused(tiny_train_config(prepared, out, seq_len=100_000, model_overrides={"max_position_embeddings": 200_000}),
             ValueError, "fewer than seq_len", out)


def test_unknown_preset(prepared, tmp_path):
    out = tmp_path / "out"
    _refused(tiny_train_config(prepared, out, model="tinny", model_overrides={}), ConfigError, "unknown preset", out)
    _refused(tiny_train_config(prepared, out, model="./no/such/folder", model_overrides={}), FileNotFoundError,
             "no model folder", out)


def test_quantized_model_folder_is_refused(prepared, tmp_path):
    """A `camelid quantize` folder's Linear weights are frozen codes: pretraining it trained only the embeddings,
    norms and lm_head while saying nothing."""
    from camelid.quant import quantize_model

    torch.manual_seed(0)
    config = get_preset("tiny").replace(vocab_size=320, **tiny_train_config(prepared, tmp_path).model_overrides)
    save_pretrained(quantize_model(Transformer(config), "int8"), tmp_path / "int8")
    out = tmp_path / "out"
    _refused(tiny_train_config(prepared, out, model=str(tmp_path / "int8"), model_overrides={}), ValueError,
             "int8 is quantized \\(int8\\): pretraining needs float weights", out)


def test_vocab_mismatch(prepared, tmp_path):
    """A model folder whose embeddings cannot hold the data's token ids (vocab 128 < 300)."""
    torch.manual_seed(0)
    config = tiny_train_config(prepared, tmp_path).model_overrides
    model = Transformer(get_preset("tiny").replace(vocab_size=128, **config))
    save_pretrained(model, tmp_path / "small")
    out = tmp_path / "out"
    _refused(tiny_train_config(prepared, out, model=str(tmp_path / "small"), model_overrides={}), ValueError,
             "vocabulary mismatch", out)


def test_tokenizer_mismatch_and_missing(prepared, tmp_path):
    other = tmp_path / "other"
    (tmp_path / "t.txt").write_text("a few words " * 50)
    Tokenizer.train([tmp_path / "t.txt"], 280, show_progress=False).save(other)
    out = tmp_path / "out"
    _refused(tiny_train_config(prepared, out, tokenizer=str(other)), ValueError, "tokenizer/data mismatch", out)
    bare = tmp_path / "bare"  # a prepared folder without the tokenizer copy that prepare() puts beside the shards
    shutil.copytree(prepared.data, bare)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (bare / name).unlink()
    _refused(tiny_train_config(prepared, out, tokenizer=None, data=str(bare)), FileNotFoundError, "--tokenizer", out)


def test_the_data_folders_tokenizer_is_found(prepared, tmp_path):
    result = train(tiny_train_config(prepared, tmp_path / "out", tokenizer=None, max_steps=1))
    assert (result.final_dir / "tokenizer.json").read_bytes() == (prepared.data / "tokenizer.json").read_bytes()


def test_existing_run_needs_resume(prepared, tmp_path):
    out = tmp_path / "out"
    train(tiny_train_config(prepared, out, max_steps=2))
    with pytest.raises(ValueError, match="--resume"):
        train(tiny_train_config(prepared, out, max_steps=2))


def test_data_without_val_split_trains_without_eval(prepared, tmp_path):
    data = tmp_path / "noval"
    prepare(prepared.data.parent / "in", prepared.tok, data, val_fraction=0.0, workers=1, show_progress=False)
    cfg = tiny_train_config(prepared, tmp_path / "out", data=str(data), max_steps=2, eval_every=1)
    assert train(cfg).best_val_loss is None


def test_preset_overrides_derive_head_dim_and_vocab(prepared, tmp_path):
    cfg = tiny_train_config(prepared, tmp_path, model_overrides={"hidden_size": 256, "num_attention_heads": 8,
                                                                  "intermediate_size": 704})
    config, notes = model_config(cfg, 300)
    assert (config.head_dim, config.q_size, config.vocab_size) == (32, 256, 320)
    assert "vocab_size 320" in notes[0]
