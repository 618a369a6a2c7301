"""Training checkpoints: everything a run needs to continue bit for bit, written atomically.

    out/checkpoints/step_00000100/
        config.json, generation_config.json, model.safetensors   a Hugging Face model folder (+ tokenizer files)
        optimizer.pt     optimizer.state_dict(): tensors and numbers only, loaded with weights_only=True
        scaler.pt        GradScaler state (fp16 only)
        rng.pt           python, numpy, torch CPU and CUDA generator states
        trainer.json     step, tokens_seen, lr_scale, val_loss, best_val_loss, elapsed, guard state, config

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
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn

from camelid.checkpoint import CheckpointError, save_pretrained, weight_files
from camelid.tokenizer import Tokenizer
from camelid.train.guard import SpikeGuard

STEP_DIR = re.compile(r"step_(\d{8})")
TRAINER_FILE = "trainer.json"


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
    """Delete what an interrupted save left behind."""
    root = Path(root)
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith((".tmp-", ".old-")) and p.is_dir():
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
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---- save / load --------------------------------------------------------------------------------------------------

def save_checkpoint(root: str | Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                    scaler: torch.amp.GradScaler, guard: SpikeGuard, trainer: dict,
                    tokenizer: Tokenizer | None = None) -> Path:
    """Write step_N atomically; `model` is the unwrapped Transformer (no DDP / compile prefixes in its keys)."""
    root = Path(root)
    final, tmp = root / step_dir_name(step), root / f".tmp-{step_dir_name(step)}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_pretrained(model, tmp)  # safetensors; a tied lm_head is stored once, as embed_tokens
    if tokenizer is not None:
        tokenizer.save(tmp)  # so `camelid generate --model out/checkpoints/step_N` works
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
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


def load_weights(model: nn.Module, path: Path) -> None:
    """Copy a checkpoint's safetensors into an existing model, in place (its optimizer keeps pointing at it)."""
    expected = model.state_dict()
    config = getattr(model, "config", None)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    loaded: set[str] = set()
    with torch.no_grad():
        for file in weight_files(path):
            for key, tensor in load_file(file).items():
                if key not in expected or expected[key].shape != tensor.shape:
                    shape = tuple(expected[key].shape) if key in expected else "no such tensor"
                    raise CheckpointError(f"{file}: tensor {key!r} {tuple(tensor.shape)} does not fit the model "
                                          f"being trained ({shape}): was the checkpoint made with another model?")
                expected[key].copy_(tensor)
                loaded.add(key)
    missing = sorted(set(expected) - loaded - tied)
    if missing:
        raise CheckpointError(f"{path}: missing tensor {missing[0]!r}" + (f" and {len(missing) - 1} more"
                                                                            if len(missing) > 1 else ""))


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    scaler: torch.amp.GradScaler | None = None, guard: SpikeGuard | None = None,
                    rng: bool = False) -> dict:
    """Restore what is asked for from step_N; returns trainer.json."""
    trainer = read_trainer(path)
    load_weights(model, path)
    if optimizer is not None:
        fresh = [{k: g[k] for k in ("foreach", "fused") if k in g} for g in optimizer.param_groups]
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True))
        for group, flags in zip(optimizer.param_groups, fresh):  # this machine's kernels, not the saver's
            group.update(flags)
    if scaler is not None and scaler.is_enabled() and (path / "scaler.pt").is_file():
        scaler.load_state_dict(torch.load(path / "scaler.pt", weights_only=True))
    if guard is not None:
        guard.load_state_dict(trainer["guard"])
    if rng:
        set_rng_state(torch.load(path / "rng.pt", weights_only=True))
    return trainer


def prune(root: str | Path, keep_last: int) -> list[Path]:
    """Delete all but the newest `keep_last` checkpoints and the best one (lowest val_loss). Returns the deleted."""
    found = list_checkpoints(root)
    scored = [(v, p) for p in found if (v := read_trainer(p).get("val_loss")) is not None]
    keep = set(found[-keep_last:]) | ({min(scored, key=lambda vp: vp[0])[1]} if scored else set())
    deleted = [p for p in found if p not in keep]
    for p in deleted:
        shutil.rmtree(p)
    return deleted


def save_final(path: str | Path, model: nn.Module, tokenizer: Tokenizer | None) -> Path:
    """The trained model as a plain Hugging Face folder: `camelid generate --model out/final` loads it."""
    out = save_pretrained(model, path)
    if tokenizer is not None:
        tokenizer.save(out)
    return out
