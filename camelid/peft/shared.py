"""What the PEFT methods share: choosing modules by name with PEFT's matching rule, the one writer and reader of
an adapter folder (`adapter_config.json` + `adapter_model.safetensors`) that every method saves with, and the
prompt-learning folder layout of prefix.py and prompt.py. The lowest module of camelid.peft: it imports none of
the others.

A new folder is built in a temporary sibling folder and renamed into place, so it appears whole or not at all.
When the folder already exists (a training run's `final/` that also holds a tokenizer), the two files are moved in
one by one with os.replace, each atomically, keeping the other files. The old config is removed first and the new
one moved in last, so a crash part-way leaves weights without a config (which fails to load with a clear error),
never a config next to weights it does not describe.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from camelid.files import make_usual
from camelid.quant import name_matches  # the one module-name rule, shared with quant (see lora.py on peft -> quant)

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_KEY = "prompt_embeddings"  # the one tensor in every PEFT prompt-learning file

class AdapterError(ValueError):
    """An adapter folder that cannot be loaded onto this model; the message names the file and the key or field."""


def select_linears(model: nn.Module, target_modules: str | Iterable[str], method: str) -> dict[str, nn.Linear]:
    """The nn.Linear modules named by target_modules, in model order; a ValueError when they name nothing or
    something that is not an nn.Linear."""
    if not isinstance(target_modules, str):
        target_modules = list(target_modules)
    if target_modules == "all-linear":
        found = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"}
    else:
        found = {n: m for n, m in model.named_modules() if n and name_matches(n, target_modules)}
    if not found:
        example = next((n for n, m in model.named_modules() if isinstance(m, nn.Linear)), "?")
        raise ValueError(f"{method}: target_modules {target_modules!r} match no module of this model "
                         f"(Linear layers are named like {example!r})")
    wrong = [f"{n} ({type(m).__name__})" for n, m in found.items() if not isinstance(m, nn.Linear)]
    if wrong:
        raise ValueError(f"{method} acts on nn.Linear layers only; target_modules {target_modules!r} also match "
                         f"{', '.join(wrong[:3])}")
    return found


def short_or_regex(model: nn.Module, names: Iterable[str]) -> list[str] | str:
    """target_modules that select exactly these module names under PEFT's rule: the sorted short names ("k_proj")
    when they pick nothing else, otherwise a regex over the full names."""
    names = set(names)
    short = sorted({n.rsplit(".", 1)[-1] for n in names})
    selected = {n for n, _ in model.named_modules() if n and name_matches(n, short)}
    if selected == names:
        return short
    return "^(" + "|".join(re.escape(n) for n in sorted(names)) + ")$"


def write_adapter_folder(folder: str | Path, config: dict, tensors: dict[str, torch.Tensor]) -> Path:
    """adapter_config.json + adapter_model.safetensors, written atomically (see the module docstring)."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp / WEIGHTS_FILE,
                  metadata={"format": "pt"})
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        make_usual(tmp / WEIGHTS_FILE)  # safetensors writes 0600
        if folder.exists():
            (folder / CONFIG_FILE).unlink(missing_ok=True)  # never the old config over the new weights
            os.replace(tmp / WEIGHTS_FILE, folder / WEIGHTS_FILE)
            os.replace(tmp / CONFIG_FILE, folder / CONFIG_FILE)
        else:
            make_usual(tmp)  # mkdtemp makes it private
            os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def read_config(folder: str | Path, peft_type: str) -> dict:
    """adapter_config.json of a folder whose config says `peft_type`; FileNotFoundError / AdapterError (a
    ValueError) naming the file otherwise."""
    config_file = Path(folder) / CONFIG_FILE
    if not config_file.is_file():
        raise FileNotFoundError(f"no {CONFIG_FILE} in {folder}: not an adapter folder")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise AdapterError(f"{config_file}: not valid JSON ({e})") from None
    if not isinstance(config, dict) or config.get("peft_type") != peft_type:
        found = config.get("peft_type") if isinstance(config, dict) else None
        raise AdapterError(f"{config_file}: peft_type {found!r}, expected {peft_type!r}")
    return config


def read_adapter_folder(folder: str | Path, peft_type: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config, tensors) of an adapter folder whose config says `peft_type` (read_config's errors, and the same
    for a missing or empty weights file)."""
    folder = Path(folder)
    config, weights_file = read_config(folder, peft_type), folder / WEIGHTS_FILE
    if not weights_file.is_file():
        raise FileNotFoundError(f"no {WEIGHTS_FILE} in {folder} (pickled adapter_model.bin files are never loaded)")
    tensors = read_tensors(weights_file)
    if not tensors:
        raise AdapterError(f"{weights_file}: no tensors")
    return config, tensors


def read_tensors(file: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file, on the CPU; an AdapterError naming it when it is truncated or corrupt (a
    half-finished download), not the library's traceback."""
    try:
        with safe_open(file, framework="pt", device="cpu") as handle:
            return {k: handle.get_tensor(k) for k in handle.keys()}
    except (SafetensorError, OSError, RuntimeError) as e:
        raise AdapterError(f"{file}: cannot read it, truncated or corrupt ({e})") from None


def adapter_dtype(weight: torch.Tensor) -> torch.dtype:
    """New trainable tensors are fp32 over a half-precision base (as PEFT's autocast_adapter_dtype), so small
    updates survive the optimizer; otherwise the base's dtype."""
    return torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype


def freeze(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)


# ---- PEFT prompt-learning folders (prefix.py and prompt.py) --------------------------------------------------

def write_peft_folder(folder: str | Path, config: dict, prompt_embeddings: torch.Tensor) -> Path:
    """adapter_config.json + adapter_model.safetensors holding {"prompt_embeddings": (P, D) fp32}, atomically."""
    return write_adapter_folder(folder, config, {PEFT_KEY: prompt_embeddings.detach().float()})


def read_peft_folder(folder: str | Path, peft_type: str) -> tuple[dict, torch.Tensor, Path]:
    """(adapter_config.json, prompt_embeddings tensor on the CPU, the weights file) of a PEFT prompt-learning folder."""
    config, tensors = read_adapter_folder(folder, peft_type)
    file = Path(folder) / WEIGHTS_FILE
    if config.get("modules_to_save"):
        raise AdapterError(f"{Path(folder) / CONFIG_FILE}: modules_to_save={config['modules_to_save']!r} is not "
                           "supported")
    if list(tensors) != [PEFT_KEY]:
        raise AdapterError(f"{file}: expected exactly one tensor {PEFT_KEY!r}, found {sorted(tensors)}")
    tensor = tensors[PEFT_KEY]
    if tensor.dim() != 2:
        raise AdapterError(f"{file}: {PEFT_KEY} must be 2-D, got shape {tuple(tensor.shape)}")
    if config.get("num_virtual_tokens") not in (None, tensor.shape[0]):
        raise AdapterError(f"{file}: {tensor.shape[0]} virtual tokens, adapter_config.json says "
                           f"{config['num_virtual_tokens']}")
    return config, tensor, file


def check_position_table(model: nn.Module, last_position: int, P: int) -> None:
    """Virtual tokens move the real ones P positions on: a learned position table must still cover them."""
    limit = model.config.max_position_embeddings
    if model.config.position_encoding == "learned" and last_position >= limit:
        raise ValueError(f"{P} virtual tokens push position {last_position} past the model's learned position "
                         f"table ({limit} positions); use shorter inputs or fewer virtual tokens")
