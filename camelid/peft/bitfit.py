"""BitFit (Ben Zaken et al. 2022): train the bias terms only, everything else frozen.

LLaMA's Linear layers have no biases, so BitFit adds zero biases (the model starts as its base) to the chosen
nn.Linear modules with register_parameter("bias", ...): nn.Linear's own forward then adds them, no hook needed.
Layers that already have a bias (Qwen2's q/k/v) train it as it is. Biases only: norm weights stay frozen.

Unlike the other methods' adapters (fp32 over a half-precision base, shared.adapter_dtype), a BitFit bias has the
weight's dtype, bf16 over a bf16 base: F.linear takes one dtype for weight and bias, and an fp32 bias added by a
hook instead would need another key than `<module>.bias`, losing the Hugging Face layout below. To train biases
in fp32, load the base in fp32 (`from_pretrained(path, dtype=torch.float32)`): the training loop's bf16 autocast
still computes in bf16, and the optimizer updates fp32 biases.

PEFT has no BitFit, so the folder is ours: adapter_config.json with peft_type "CAMELID_BITFIT" and
adapter_model.safetensors holding each trained bias under its module's name (`model.layers.0.mlp.up_proj.bias`).
A LLaMA with biases on every projection is what transformers' Llama computes with attention_bias=True and
mlp_bias=True, which the tests use as the reference.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from camelid.peft.shared import WEIGHTS_FILE, freeze, read_adapter_folder, select_linears, write_adapter_folder

PEFT_TYPE = "CAMELID_BITFIT"


def bitfit_layers(model: nn.Module) -> dict[str, nn.Linear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear) and hasattr(m, "bitfit_added")}


def has_bitfit(model: nn.Module) -> bool:
    return bool(bitfit_layers(model))


def apply_bitfit(model: nn.Module, target_modules: str | Iterable[str] = "all-linear") -> nn.Module:
    """Freeze the model, then make the bias of every nn.Linear named by target_modules trainable, adding a zero
    bias where there is none. Default: every Linear but lm_head (PEFT's "all-linear")."""
    if has_bitfit(model):
        raise ValueError("this model already has BitFit biases")
    targets = select_linears(model, target_modules, "BitFit")
    freeze(model)
    for linear in targets.values():
        linear.bitfit_added = linear.bias is None  # whether removing BitFit would delete the bias again
        if linear.bias is None:
            w = linear.weight  # the bias in the weight's dtype: F.linear takes one dtype for both
            linear.register_parameter(
                "bias", nn.Parameter(torch.zeros(linear.out_features, device=w.device, dtype=w.dtype)))
        linear.bias.requires_grad_(True)
    return model


def bitfit_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the trained biases, under our module names."""
    return {f"{name}.bias": m.bias for name, m in bitfit_layers(model).items()}


def save_bitfit(model: nn.Module, folder: str | Path, base_model_name_or_path: str | None = None) -> Path:
    layers = bitfit_layers(model)
    if not layers:
        raise ValueError("the model has no BitFit biases to save (apply_bitfit or load_bitfit first)")
    config = {"peft_type": PEFT_TYPE, "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
              "target_modules": sorted(layers), "added_biases": sorted(n for n, m in layers.items() if m.bitfit_added)}
    return write_adapter_folder(folder, config, bitfit_state_dict(model))


def load_bitfit(model: nn.Module, folder: str | Path) -> nn.Module:
    """Apply a CAMELID_BITFIT folder to `model`: the same layers get biases, set to the saved values."""
    _, tensors = read_adapter_folder(folder, PEFT_TYPE)
    file = Path(folder) / WEIGHTS_FILE
    modules = dict(model.named_modules())
    names = []
    for key, tensor in tensors.items():
        name = key.removesuffix(".bias")
        if name == key:
            raise ValueError(f"{file}: unexpected tensor {key!r} (expected <module>.bias)")
        if not isinstance(modules.get(name), nn.Linear):
            raise ValueError(f"{file}: bias for {name!r}, which is not an nn.Linear of this model")
        if tuple(tensor.shape) != (modules[name].out_features,):
            raise ValueError(f"{file}: tensor {key!r} has shape {tuple(tensor.shape)}, the model expects "
                             f"({modules[name].out_features},)")
        names.append(name)
    apply_bitfit(model, target_modules=names)
    with torch.no_grad():
        for name in names:
            modules[name].bias.copy_(tensors[f"{name}.bias"])
    return model

