"""(IA)^3 (Liu et al. 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context
Learning"): learned vectors that rescale activations, initialised to ones so a fresh model is its base.

As PEFT's IA3 (peft/tuners/ia3/layer.py), with LLaMA's defaults target_modules = k_proj, v_proj, down_proj and
feedforward_modules = down_proj:
    attention projections  y = (W x + b) * l          l: (out,)  scales the output (keys and values)
    feedforward modules    y = W (x * l) + b          l: (in,)   scales the input of down_proj
Merging folds l into W (rows for outputs, columns for inputs; the bias too for outputs), as PEFT's merge.

The vector is a parameter `ia3_l` registered on the nn.Linear itself and applied by a forward hook, so the base
keeps its plain key and the vector's key is PEFT's minus its prefix:
    model.layers.0.self_attn.k_proj.ia3_l   <->   base_model.model.model.layers.0.self_attn.k_proj.ia3_l
PEFT stores it as (out, 1) or (1, in); we keep it 1-D, because the optimizer's decay groups (train/optim.py) decay
matrices only, and decaying a scale vector pulls it toward 0 (switching the layer off) rather than toward the base.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from camelid.peft.shared import (CONFIG_FILE, WEIGHTS_FILE, AdapterError, adapter_dtype, freeze, name_matches,
                                 read_adapter_folder, select_linears, short_or_regex, write_adapter_folder)
from camelid.quant import QuantLinear

PREFIX = "base_model.model."
DEFAULT_TARGETS = ("k_proj", "v_proj", "down_proj")
DEFAULT_FEEDFORWARD = ("down_proj",)
# adapter_config.json fields that would change what the adapter computes and that camelid does not implement
UNSUPPORTED = {"fan_in_fan_out": False, "modules_to_save": None, "exclude_modules": None,
               "layers_to_transform": None, "target_parameters": None}


def _scale_output(module: nn.Linear, args, output: torch.Tensor) -> torch.Tensor | None:
    if module.ia3_merged:
        return None
    return (output * module.ia3_l).to(output.dtype)


def _scale_input(module: nn.Linear, args) -> tuple | None:
    if module.ia3_merged:
        return None
    x = args[0]
    return ((x.to(module.ia3_l.dtype) * module.ia3_l).to(x.dtype), *args[1:])


def ia3_layers(model: nn.Module) -> dict[str, nn.Linear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear) and hasattr(m, "ia3_l")}


def has_ia3(model: nn.Module) -> bool:
    return bool(ia3_layers(model))


def _attach(linear: nn.Linear, feedforward: bool) -> None:
    size = linear.in_features if feedforward else linear.out_features
    dtype = adapter_dtype(linear.weight)
    linear.register_parameter("ia3_l", nn.Parameter(torch.ones(size, device=linear.weight.device, dtype=dtype)))
    linear.ia3_feedforward, linear.ia3_merged = feedforward, False
    # the original weight and bias while merged with keep=True: buffers, so they follow .to(device)
    linear.register_buffer("ia3_unmerged_weight", None, persistent=False)
    linear.register_buffer("ia3_unmerged_bias", None, persistent=False)
    if feedforward:
        linear.ia3_hook = linear.register_forward_pre_hook(_scale_input)
    else:
        linear.ia3_hook = linear.register_forward_hook(_scale_output)


def _detach(linear: nn.Linear) -> None:
    linear.ia3_hook.remove()
    del linear.ia3_l
    for attr in ("ia3_feedforward", "ia3_merged", "ia3_unmerged_weight", "ia3_unmerged_bias", "ia3_hook"):
        delattr(linear, attr)


def apply_ia3(model: nn.Module, target_modules: str | Iterable[str] = DEFAULT_TARGETS,
              feedforward_modules: str | Iterable[str] = DEFAULT_FEEDFORWARD) -> nn.Module:
    """Freeze the model and give every nn.Linear named by target_modules an IA3 vector (ones); those also named by
    feedforward_modules scale their input, the others their output. Names follow PEFT's matching rule."""
    if has_ia3(model):
        raise ValueError("this model already has IA3 vectors; merge_ia3 it first")
    targets = select_linears(model, target_modules, "IA3")
    if not isinstance(feedforward_modules, str):
        feedforward_modules = list(feedforward_modules)
    feedforward = {n for n in targets if _is_feedforward(n, feedforward_modules)}
    if isinstance(target_modules, (list, tuple)) and not isinstance(feedforward_modules, str) \
            and not set(feedforward_modules) <= set(target_modules):  # PEFT's IA3Config check
        raise ValueError(f"IA3: feedforward_modules {feedforward_modules!r} must be a subset of target_modules "
                         f"{list(target_modules)!r}")
    if feedforward_modules and not any(_is_feedforward(n, feedforward_modules) for n, _ in model.named_modules()):
        raise ValueError(f"IA3: feedforward_modules {feedforward_modules!r} match no module of this model")
    freeze(model)
    for name, linear in targets.items():
        _attach(linear, name in feedforward)
    return model


def _is_feedforward(name: str, feedforward_modules: str | list[str]) -> bool:
    """PEFT's _check_target_module_feedforward: a regex over the whole name, or a list of name endings."""
    if isinstance(feedforward_modules, str):
        return name_matches(name, feedforward_modules)
    return any(name.endswith(f) for f in feedforward_modules)


def ia3_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the IA3 vectors (1-D), under our module names."""
    return {f"{name}.ia3_l": m.ia3_l for name, m in ia3_layers(model).items()}


def save_ia3(model: nn.Module, folder: str | Path, base_model_name_or_path: str | None = None) -> Path:
    """The IA3 vectors as a PEFT folder (peft_type IA3) that `peft.PeftModel.from_pretrained` loads."""
    layers = ia3_layers(model)
    if not layers:
        raise ValueError("the model has no IA3 vectors to save (apply_ia3 or load_ia3 first)")
    if any(m.ia3_merged for m in layers.values()):
        raise ValueError("the IA3 vectors are merged into the weights; unmerge_ia3 before save_ia3")
    feedforward = [n for n, m in layers.items() if m.ia3_feedforward]
    config = {
        "peft_type": "IA3",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "target_modules": short_or_regex(model, layers),
        # PEFT matches feedforward_modules by name ending (list) or full regex (str), within the targets only
        "feedforward_modules": _feedforward_spec(layers, feedforward),
        "fan_in_fan_out": False,
        "init_ia3_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
    }
    tensors = {}
    for name, m in layers.items():  # PEFT's shapes: (1, in) for feedforward modules, (out, 1) otherwise
        vector = m.ia3_l.detach()
        tensors[f"{PREFIX}{name}.ia3_l"] = vector[None, :] if m.ia3_feedforward else vector[:, None]
    return write_adapter_folder(folder, config, tensors)


def _feedforward_spec(layers: dict[str, nn.Linear], feedforward: list[str]) -> list[str] | str:
    short = sorted({n.rsplit(".", 1)[-1] for n in feedforward})
    if {n for n in layers if any(n.endswith(s) for s in short)} == set(feedforward):
        return short
    return "^(" + "|".join(re.escape(n) for n in sorted(feedforward)) + ")$" if feedforward else []


def load_ia3(model: nn.Module, folder: str | Path) -> nn.Module:
    """Apply a PEFT IA3 folder (written by `peft` or by save_ia3) to `model`, in place; every base parameter is
    frozen. Which modules carry a vector is read from the file's keys; which are feedforward from the config.
    Every key and shape is checked before the model is changed."""
    config, tensors = read_adapter_folder(folder, "IA3")
    config_file, weights_file = Path(folder) / CONFIG_FILE, Path(folder) / WEIGHTS_FILE
    for field, default in UNSUPPORTED.items():
        value = config.get(field, default)
        if value not in (default, None, [], {}, False):
            raise AdapterError(f"{config_file}: {field}={value!r} is not supported by camelid's IA3")
    names = []
    for key in tensors:
        if not (key.startswith(PREFIX) and key.endswith(".ia3_l")):
            raise AdapterError(f"{weights_file}: unexpected tensor {key!r} (expected {PREFIX}<module>.ia3_l)")
        names.append(key[len(PREFIX):-len(".ia3_l")])
    modules = dict(model.named_modules())
    feedforward_modules = config.get("feedforward_modules") or []
    feedforward = [n for n in names if _is_feedforward(n, feedforward_modules)]
    for name in names:
        linear = modules.get(name)
        if isinstance(linear, QuantLinear):  # to the user it is a Linear: say why it is refused
            raise AdapterError(f"{weights_file}: IA3 vector for module {name!r}, which is quantized "
                               f"({linear.method}) in this model; load the adapter onto the unquantized model")
        if not isinstance(linear, nn.Linear):
            raise AdapterError(f"{weights_file}: IA3 vector for module {name!r}, which is not an nn.Linear of this "
                               "model")
        shape = tuple(tensors[f"{PREFIX}{name}.ia3_l"].shape)
        expected = (1, linear.in_features) if name in feedforward else (linear.out_features, 1)
        if shape != expected:
            raise AdapterError(f"{weights_file}: tensor {PREFIX}{name}.ia3_l has shape {shape}, the model expects "
                               f"{expected}")
    apply_ia3(model, target_modules="^(" + "|".join(re.escape(n) for n in names) + ")$",
              feedforward_modules=feedforward)
    with torch.no_grad():
        for name in names:
            modules[name].ia3_l.copy_(tensors[f"{PREFIX}{name}.ia3_l"].flatten())
    return model


@torch.no_grad()
def merge_ia3(model: nn.Module, keep: bool = False) -> nn.Module:
    """Fold every IA3 vector into its layer's weight (and, for output scaling, its bias). keep=False: remove the
    vectors and hooks, a plain model again (PEFT's merge_and_unload). keep=True: the vectors stay, with a copy of
    each original weight, so unmerge_ia3 restores the base bit for bit (dividing again would not)."""
    for m in ia3_layers(model).values():
        if not m.ia3_merged:
            if keep:
                m.ia3_unmerged_weight = m.weight.detach().clone()
                m.ia3_unmerged_bias = None if m.bias is None else m.bias.detach().clone()
            scale = m.ia3_l.to(torch.float32)
            w = m.weight.float() * (scale[None, :] if m.ia3_feedforward else scale[:, None])
            m.weight.copy_(w.to(m.weight.dtype))
            if m.bias is not None and not m.ia3_feedforward:
                m.bias.copy_((m.bias.float() * scale).to(m.bias.dtype))
            m.ia3_merged = True
        if not keep:
            _detach(m)
    return model


@torch.no_grad()
def unmerge_ia3(model: nn.Module) -> nn.Module:
    """Undo merge_ia3(model, keep=True): every base weight and bias is bitwise the one before merging."""
    for name, m in ia3_layers(model).items():
        if not m.ia3_merged:
            continue
        if m.ia3_unmerged_weight is None:
            raise RuntimeError(f"{name} was merged without keep=True; its original weight is gone")
        m.weight.copy_(m.ia3_unmerged_weight)
        if m.ia3_unmerged_bias is not None:
            m.bias.copy_(m.ia3_unmerged_bias)
        m.ia3_unmerged_weight = m.ia3_unmerged_bias = None
        m.ia3_merged = False
    return model
