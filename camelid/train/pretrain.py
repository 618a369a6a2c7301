"""What pretraining adds to the loop: the token-shard batch source, and a model and tokenizer that match the data.

Everything here is checked before training starts: a missing or empty data folder, an unknown preset, a model
whose vocabulary cannot hold the data's token ids, a tokenizer that is not the data's.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import torch

from camelid.checkpoint import from_pretrained
from camelid.config import ModelConfig, get_preset
from camelid.data.pretrain import TokenData, read_meta, window_starts
from camelid.model import Transformer
from camelid.plan.fit import parse_memory
from camelid.tokenizer import Tokenizer
from camelid.train.config import TrainConfig, auto_fit

VOCAB_MULTIPLE = 64  # a vocab padded to a multiple of 64 keeps the lm_head matmul on fast tensor-core tiles


class PretrainBatches:
    """Random windows of the train split, drawn from (seed, step) alone.

    Step s draws micro_batch * grad_accum * world window starts at once; micro-batch m of rank r takes chunk
    r * grad_accum + m. So a step's global batch is the same set of windows however it is split into
    micro-batches and ranks, and the data position to resume from is just the step number.
    """

    def __init__(self, train: TokenData, val: TokenData | None, seed: int, micro_batch: int, grad_accum: int,
                 seq_len: int, eval_batches: int, world: int = 1):
        self.train, self.val, self.world = train, val, world
        self.seed, self.micro_batch, self.grad_accum = seed, micro_batch, grad_accum
        self.seq_len, self.n_eval = seq_len, eval_batches

    def batch(self, step: int, micro: int, rank: int = 0, world: int = 1) -> dict[str, torch.Tensor]:
        count = self.micro_batch * self.grad_accum * world
        starts = window_starts(self.seed, step, count, len(self.train), self.seq_len)  # (count,)
        chunk = rank * self.grad_accum + micro
        x, y = self.train.window(starts[chunk * self.micro_batch:(chunk + 1) * self.micro_batch], self.seq_len)
        return {"input_ids": x, "labels": y}  # (B, T) each: y is x shifted by one token

    def eval_batches(self) -> Iterator[dict[str, torch.Tensor]]:
        """The first eval_batches * (micro_batch * grad_accum * world) non-overlapping windows of the val split, in
        micro_batch-sized pieces: the same set at every eval, however the global batch is split into micro-batches
        and ranks. Every rank yields all of it; the loop splits the batches over the ranks."""
        if self.val is None:
            return
        windows = self.n_eval * self.micro_batch * self.grad_accum * self.world
        for x, y in self.val.sequential_windows(self.seq_len, self.micro_batch, windows):
            yield {"input_ids": x, "labels": y}


def open_data(cfg: TrainConfig) -> tuple[TokenData, TokenData | None, list[str]]:
    """(train, val or None, notes). Raises when there is nothing to train on."""
    path = Path(cfg.data)
    if not path.is_dir():
        raise FileNotFoundError(f"no data folder at {path}: prepare one with `camelid data prepare`")
    read_meta(path)  # a clear "run camelid data prepare" error for an empty folder
    train = TokenData(path, "train")
    if len(train) < cfg.seq_len + 1:
        raise ValueError(f"{path}: the train split has {len(train)} tokens, fewer than seq_len + 1 = {cfg.seq_len + 1}")
    notes = []
    val = TokenData(path, "val") if "val" in train.meta["splits"] else None
    if val is not None and len(val) < cfg.seq_len + 1:
        notes.append(f"the val split has {len(val)} tokens, fewer than seq_len + 1: no evaluation")
        val = None
    return train, val, notes


def model_config(cfg: TrainConfig, data_vocab: int) -> tuple[ModelConfig, list[str]]:
    """The ModelConfig to train, checked against the data; (config, notes)."""
    source = Path(cfg.model)
    if source.is_dir():
        if cfg.model_overrides:
            raise ValueError(f"model_overrides apply to presets only; {source} is a model folder with fixed shapes")
        config = ModelConfig.from_hf(source)
        quantized = json.loads((source / "config.json").read_text()).get("quantization_config")
        if quantized:  # its Linear weights are frozen codes: only the embeddings, norms and lm_head would train
            raise ValueError(f"{source} is quantized ({quantized.get('method')}): pretraining needs float weights; "
                             "continue from the folder it was quantized from")
        if data_vocab > config.vocab_size:
            raise ValueError(f"tokenizer/model vocabulary mismatch: the data's tokenizer has {data_vocab} tokens, "
                             f"the model at {source} only {config.vocab_size} embeddings")
        notes = [f"model: {source} ({config.model_type}, vocab {config.vocab_size})"]
    else:
        config = get_preset(cfg.model)
        vocab = -(-data_vocab // VOCAB_MULTIPLE) * VOCAB_MULTIPLE
        config = config.replace(**{**cfg.model_overrides, "vocab_size": vocab})  # head_dim follows new sizes
        notes = [f"model: preset {cfg.model}" + (f" with {cfg.model_overrides}" if cfg.model_overrides else "")
                 + f", vocab_size {vocab} (the data's {data_vocab} rounded up to a multiple of {VOCAB_MULTIPLE})"]
    return config, notes


def find_tokenizer(cfg: TrainConfig, meta: dict) -> tuple[Tokenizer, list[str]]:
    """The tokenizer the data was prepared with: cfg.tokenizer, else the model folder's, else the data folder's."""
    candidates = [cfg.tokenizer] if cfg.tokenizer else [cfg.model, cfg.data]
    found = next((Path(c) for c in candidates if (Path(c) / "tokenizer.json").is_file() or Path(c).is_file()), None)
    if found is None:
        where = cfg.tokenizer or " or ".join(c for c in candidates if Path(c).is_dir())
        raise FileNotFoundError(f"no tokenizer.json in {where}: pass --tokenizer DIR, the tokenizer the data was "
                                "prepared with (it is saved with every checkpoint)")
    tokenizer = Tokenizer(found)
    if tokenizer.vocab_size != meta["vocab_size"] or tokenizer.eos_id != meta["eos_id"]:
        raise ValueError(f"tokenizer/data mismatch: {found} has {tokenizer.vocab_size} tokens "
                         f"(EOS {tokenizer.eos_id}), "
                         f"the data was prepared with {meta['vocab_size']} tokens (EOS {meta['eos_id']})")
    notes = [f"tokenizer: {found} ({tokenizer.vocab_size} tokens)"]
    file = found / "tokenizer.json" if found.is_dir() else found
    if meta.get("tokenizer_sha256") not in (None, hashlib.sha256(file.read_bytes()).hexdigest()):
        notes.append(f"{file} differs byte-wise from the tokenizer the data was prepared with (same vocabulary size "
                     "and EOS): make sure it is the same tokenizer")
    return tokenizer, notes


def setup(cfg: TrainConfig, model: Transformer | None = None, tokenizer: Tokenizer | None = None, world: int = 1
          ) -> tuple[Transformer, PretrainBatches, Tokenizer | None, list[str]]:
    """The batch source of a pretraining run, and the model (fp32 master weights) and tokenizer when not given;
    plus notes to log. Every check against the data happens here, before training."""
    train, val, notes = open_data(cfg)
    if model is None:
        config, model_notes = model_config(cfg, train.vocab_size)
    else:
        config, model_notes = model.config, []
        if train.vocab_size > config.vocab_size:
            raise ValueError(f"tokenizer/model vocabulary mismatch: the data's tokenizer has {train.vocab_size} "
                             f"tokens, the model only {config.vocab_size} embeddings")
    if cfg.seq_len > config.max_position_embeddings:
        raise ValueError(f"seq_len {cfg.seq_len} is longer than the model's context ({config.max_position_embeddings} "
                         "positions); lower seq_len or raise max_position_embeddings in model_overrides")
    if tokenizer is None:
        tokenizer, tok_notes = find_tokenizer(cfg, train.meta)
        notes = tok_notes + notes
    if model is None and Path(cfg.model).is_dir():
        model = from_pretrained(cfg.model, dtype="float32")
    elif model is None:
        config = config.replace(bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id,
                                pad_token_id=tokenizer.pad_id)
        torch.manual_seed(cfg.seed)
        model = Transformer(config)
    batches = PretrainBatches(train, val, cfg.seed, cfg.micro_batch, cfg.grad_accum, cfg.seq_len, cfg.eval_batches,
                              world)
    notes = model_notes + notes + [f"data: {cfg.data} ({len(train):,} train tokens, "
                                   f"{len(val) if val else 0:,} val tokens)"]
    return model, batches, tokenizer, notes


def device_memory_bytes(cfg: TrainConfig, device: torch.device) -> float:
    """What `--auto` fits into: --device-memory when given, else the GPU's own memory."""
    if cfg.device_memory is not None:
        return parse_memory(cfg.device_memory)
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    raise ValueError("--auto on a CPU needs --device-memory (e.g. 24GB): there is no GPU memory to read")


def auto_fit_config(cfg: TrainConfig, model: Transformer | None, device: torch.device, precision: str
                    ) -> tuple[TrainConfig, str]:
    """`--auto`: cfg with the micro-batch, accumulation and checkpointing that fit the device (train/config.py's
    auto_fit), for the model this run will train: the given one, else cfg.model sized to the data's vocabulary."""
    device_bytes = device_memory_bytes(cfg, device)
    if model is not None and hasattr(model, "config"):
        config = model.config
    else:
        train, _, _ = open_data(cfg)
        config, _ = model_config(cfg, train.vocab_size)
    return auto_fit(cfg, config, device_bytes, precision, cuda=device.type == "cuda")
