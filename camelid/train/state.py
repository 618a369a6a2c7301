"""Training checkpoints: everything a run needs to continue bit for bit, written atomically.

    out/checkpoints/step_00000100/
        config.json, generation_config.json, model.safetensors   a Hugging Face model folder (+ tokenizer files)
        optimizer.pt     optimizer.state_dict(): tensors and numbers only, loaded with weights_only=True
        scaler.pt        GradScaler state (fp16 only)
        rng.pt           python, numpy, torch CPU and CUDA generator states
        trainer.json     step, tokens_seen, lr_scale, val_loss, best_val_loss, elapsed, guard state, config

Under the sharded strategies (fsdp, zero2) the weights and optimizer state are instead one
torch.distributed.checkpoint (DCP) folder, written by every rank at once, each its own shards:

    out/checkpoints/step_00000100/
        config.json, tokenizer files       what the model is (no weights: export_checkpoint() makes a model folder)
        dcp/.metadata, dcp/__0_0.distcp ... {"model": model state dict, "optimizer": optimizer state dict}, keyed
                                           by parameter name; each tensor is stored as its shards + global shape
        rng.pt, trainer.json               as above, written by rank 0

DCP reads back into any layout: 2 ranks' shards load into 1 process's full tensors, or into 4 ranks' shards, or
into DDP copies; a safetensors checkpoint also loads into a sharded model. So a run may resume on another number of
processes or strategy. Every rank seeds its RNGs alike and draws the same numbers, so rank 0's rng.pt restores
every rank, whatever the world size (the data windows depend on (seed, step) only, not on any RNG state).

A checkpoint is written into .tmp-step_N/ and renamed to step_N/ only once complete; rename is atomic, so a crash
mid-save leaves the previous checkpoints as they were and a .tmp folder that nothing reads. The data position is
the step number itself (batches are drawn from (seed, step)), so no data-loader state is saved.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn

from camelid.checkpoint import CheckpointError, load_weights, save_pretrained, weight_files
from camelid.config import ModelConfig
from camelid.model import Transformer
from camelid.peft import applied_kinds, save_adapter
from camelid.tokenizer import Tokenizer
from camelid.train import distributed
from camelid.train.guard import SpikeGuard

STEP_DIR = re.compile(r"step_(\d{8})")
TRAINER_FILE = "trainer.json"
DCP_DIR = "dcp"  # the torch.distributed.checkpoint folder inside a sharded checkpoint
DCP_ONE_PROCESS = "torch.distributed is disabled"  # DCP's warning without a process group: one process is intended


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoint folders under root, oldest first. Half-written ones are .tmp-* folders: never listed."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if STEP_DIR.fullmatch(p.name) and (p / TRAINER_FILE).is_file()]
    return sorted(found, key=lambda p: p.name)


def latest_checkpoint(root: str | Path) -> Path | None:
    found = list_checkpoints(root)
    return found[-1] if found else None


def read_trainer(path: Path) -> dict:
    try:
        return json.loads((path / TRAINER_FILE).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path / TRAINER_FILE}: unreadable ({e})") from None


def remove_partial(root: str | Path) -> None:
    """Delete what an interrupted save left behind. An .old-step_N whose step_N is missing is the complete copy a
    re-save had moved aside when it died before renaming the new one in: it goes back to its name."""
    root = Path(root)
    if root.is_dir():
        for p in sorted(root.iterdir()):  # ".old-" before ".tmp-"
            if not p.is_dir():
                continue
            if p.name.startswith(".old-") and not (root / p.name.removeprefix(".old-")).exists():
                os.rename(p, root / p.name.removeprefix(".old-"))
            elif p.name.startswith((".tmp-", ".old-")):
                shutil.rmtree(p)


# ---- RNG ----------------------------------------------------------------------------------------------------------

def rng_state() -> dict:
    np_state = np.random.get_state(legacy=False)
    np_state["state"]["key"] = torch.from_numpy(np_state["state"]["key"].astype(np.int64))  # tensors load safely
    return {"python": random.getstate(), "numpy": np_state, "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np_state = dict(state["numpy"])
    np_state["state"] = {**np_state["state"], "key": np_state["state"]["key"].numpy().astype(np.uint32)}
    np.random.set_state(np_state)
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():  # a resume may see fewer GPUs than the save did
        for index, cuda_state in enumerate(state["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, index)


# ---- save / load --------------------------------------------------------------------------------------------------

def save_checkpoint(root: str | Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                    scaler: torch.amp.GradScaler, guard: SpikeGuard, trainer: dict,
                    tokenizer: Tokenizer | None = None, sharded: bool = False, rank: int = 0) -> Path:
    """Write step_N atomically; `model` is the unwrapped Transformer (no DDP / compile prefixes in its keys).

    sharded=False: a model folder with safetensors; only rank 0 calls this. sharded=True: weights and optimizer as
    a DCP folder; every rank calls this (the save is collective), and rank 0 writes the rest and renames.
    """
    root = Path(root)
    final, tmp = root / step_dir_name(step), root / f".tmp-{step_dir_name(step)}"
    if rank == 0:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    if sharded:
        import torch.distributed.checkpoint as dcp  # slow imports, only when used (see distributed.py)
        from torch.distributed.checkpoint.state_dict import get_state_dict

        distributed.barrier()  # the folder exists before any rank writes into it
        model_state, optimizer_state = get_state_dict(model, optimizer)  # DTensor shards (plain tensors at world 1)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", DCP_ONE_PROCESS)
            dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=tmp / DCP_DIR)
        distributed.barrier()  # every rank's files are written before rank 0 renames the folder
        if rank != 0:
            return final
        _save_config(model, tmp)
    else:
        save_pretrained(model, tmp, adapters=True)  # with any PEFT tensors; a tied lm_head stored once
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    if tokenizer is not None:
        tokenizer.save(tmp)  # with safetensors: `camelid generate --model out/checkpoints/step_N` works
    if scaler.is_enabled():
        torch.save(scaler.state_dict(), tmp / "scaler.pt")
    torch.save(rng_state(), tmp / "rng.pt")
    trainer = {**trainer, "step": step, "guard": guard.state_dict()}
    (tmp / TRAINER_FILE).write_text(json.dumps(trainer, indent=2) + "\n")
    old = None
    if final.exists():  # the same step saved again (a finished run resumed): swap, never delete first
        old = root / f".old-{final.name}"
        os.rename(final, old)
    os.rename(tmp, final)
    if old is not None:
        shutil.rmtree(old)
    return final


def _save_config(model: nn.Module, folder: Path) -> None:
    """config.json (with the dtype of the stored weights) and generation_config.json, as save_pretrained writes."""
    config, dtype = model.config, str(next(model.parameters()).dtype).removeprefix("torch.")
    (folder / "config.json").write_text(json.dumps(config.replace(dtype=dtype).to_hf(), indent=2) + "\n")
    generation = {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id,
                  "pad_token_id": config.pad_token_id}
    (folder / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    scaler: torch.amp.GradScaler | None = None, guard: SpikeGuard | None = None,
                    rng: bool = False) -> dict:
    """Restore what is asked for from step_N; returns trainer.json. Collective when the checkpoint is a DCP folder
    or the model is sharded: every rank calls it."""
    trainer = read_trainer(path)
    fresh = [{k: g[k] for k in ("foreach", "fused") if k in g} for g in optimizer.param_groups] if optimizer else []
    if (path / DCP_DIR).is_dir():
        _load_dcp(path / DCP_DIR, model, optimizer)
    elif distributed.is_sharded(model):
        _load_full_into_shards(path, model, optimizer)
    else:
        load_weights(model, path)
        if optimizer is not None:
            optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True))
    for group, flags in zip(optimizer.param_groups if optimizer else [], fresh):  # this machine's kernels
        group.update(flags)
    if scaler is not None and scaler.is_enabled() and (path / "scaler.pt").is_file():
        scaler.load_state_dict(torch.load(path / "scaler.pt", weights_only=True))
    if guard is not None:
        guard.load_state_dict(trainer["guard"])
    if rng:
        set_rng_state(torch.load(path / "rng.pt", weights_only=True))
    return trainer


def _load_dcp(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
    """Load a DCP checkpoint into the model (and optimizer) as they are laid out now: sharded or whole, on any
    number of ranks. DCP fills the tensors of the state dicts we hand it, reading just the pieces each one needs."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_state_dict, set_model_state_dict,
                                                         set_state_dict)

    if optimizer is None:
        state = {"model": get_model_state_dict(model)}
    else:  # an optimizer without state gets it here (a zero-lr step), so that there are tensors to fill
        model_state, optimizer_state = get_state_dict(model, optimizer)
        state = {"model": model_state, "optimizer": optimizer_state}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", DCP_ONE_PROCESS)
        dcp.load(state, checkpoint_id=folder)
    if optimizer is None:
        set_model_state_dict(model, state["model"])
    else:
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def _load_full_into_shards(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
    """A safetensors checkpoint (a none / ddp run's) into a sharded model: each rank reads the full tensors and
    keeps its shards. optimizer.pt is keyed by parameter index; DCP's loader wants parameter names."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    full = {k: v for file in weight_files(path) for k, v in load_file(file).items()}
    if getattr(model.config, "tie_word_embeddings", False):
        full["lm_head.weight"] = full["model.embed_tokens.weight"]
    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, full, options=options)
    if optimizer is not None:
        saved = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
        names = {id(p): n for n, p in model.named_parameters()}
        order = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
        by_name = {"state": {order[i]: s for i, s in saved["state"].items()},
                   "param_groups": [{**g, "params": [order[i] for i in g["params"]]} for g in saved["param_groups"]]}
        set_optimizer_state_dict(model, optimizer, by_name, options=options)


def export_checkpoint(path: str | Path, out: str | Path) -> Path:
    """A training checkpoint (a sharded DCP one too) as a plain model folder, in one process:
    `export_checkpoint("out/run/checkpoints/step_00000500", "out/step500")`, then `camelid generate --model ...`."""
    path = Path(path)
    with torch.device("meta"):
        model = Transformer(ModelConfig.from_hf(path / "config.json"))
    model.to_empty(device="cpu")
    model.tie_weights()
    model.reset_buffers()
    load_checkpoint(path, model)
    out = save_pretrained(model, out)
    if (path / "tokenizer.json").is_file():
        Tokenizer(path).save(out)
    return out


def prune(root: str | Path, keep_last: int) -> list[Path]:
    """Delete all but the newest `keep_last` checkpoints and the best one (lowest val_loss). Returns the deleted."""
    found = list_checkpoints(root)
    scored = [(v, p) for p in found if (v := read_trainer(p).get("val_loss")) is not None]
    keep = set(found[-keep_last:]) | ({min(scored, key=lambda vp: vp[0])[1]} if scored else set())
    deleted = [p for p in found if p not in keep]
    for p in deleted:
        shutil.rmtree(p)
    return deleted


def save_final(path: str | Path, model: nn.Module, tokenizer: Tokenizer | None, rank: int = 0,
               base: str | None = None) -> Path | None:
    """The trained model as a plain Hugging Face folder: `camelid generate --model out/final` loads it. A model with
    an adapter applied (LoRA, DoRA, prefix, prompt, IA3, BitFit, bottleneck: camelid.peft.KINDS) is written as that
    adapter's folder instead (its base weights are frozen, unchanged), naming `base` as base_model_name_or_path.
    Every rank calls this (a sharded model is gathered collectively); rank 0 writes and returns the path, the
    others None."""
    if applied_kinds(model):
        with distributed.whole_trainable(model):  # sharded: every rank gathers the adapter's tensors
            if rank != 0:
                return None
            out = save_adapter(model, path, base_model_name_or_path=base)
        if tokenizer is not None:
            tokenizer.save(out)
        return out
    if distributed.is_sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        # every rank sends its shards; rank 0 alone receives the full tensors, in CPU memory
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if rank == 0:
            model = unsharded_copy(model.config, full)
    if rank != 0:
        return None
    out = save_pretrained(model, path)
    if tokenizer is not None:
        tokenizer.save(out)
    return out


def unsharded_copy(config: ModelConfig, state: dict[str, torch.Tensor]) -> Transformer:
    """A plain Transformer that adopts the tensors of a full state dict (no copy)."""
    with torch.device("meta"):
        model = Transformer(config)
    model.load_state_dict(state, assign=True)
    model.tie_weights()
    model.reset_buffers()
    return model
