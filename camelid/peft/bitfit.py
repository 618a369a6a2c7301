"""BitFit (Ben Zaken et al. 2022): train the bias terms only, everything else frozen.

LLaMA's Linear layers have no biases, so BitFit adds zero biases (the model starts as its base) to the chosen
nn.Linear modules. Layers that already have a bias (Qwen2's q/k/v) train it as it is. Biases only: norm weights
stay frozen.

Each chosen layer is swapped (model.set_submodule) for a BitFitLinear: still an nn.Linear holding the base's own
weight Parameter, so keys stay `<module>.weight` / `<module>.bias` (the Hugging Face layout below), but its bias is
kept in the adapter dtype of the other methods (shared.adapter_dtype: fp32 over a half-precision base, as LoRA's
adapters) and cast to the weight's dtype in forward, F.linear taking one dtype for weight and bias. A bf16 bias
would lose every AdamW update below its resolution (about 2^-8 of its value).

PEFT has no BitFit, so the folder is ours: adapter_config.json with peft_type "CAMELID_BITFIT" and
adapter_model.safetensors holding each trained bias under its module's name (`model.layers.0.mlp.up_proj.bias`).
A LLaMA with biases on every projection is what transformers' Llama computes with attention_bias=True and
mlp_bias=True, which the tests use as the reference.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from camelid.peft.shared import (WEIGHTS_FILE, adapter_dtype, freeze, read_adapter_folder, select_linears,
                                 write_adapter_folder)
from camelid.quant import QuantLinear

PEFT_TYPE = "CAMELID_BITFIT"


class BitFitLinear(nn.Linear):
    """`base`'s weight Parameter (frozen, not copied) and a trainable bias in the adapter dtype: the base's own bias
    Parameter when it already has that dtype, else a copy of it (exact: fp32 holds every bf16 / fp16 value), else
    zeros. `bitfit_added` records whether the base had no bias."""

    def __init__(self, base: nn.Linear):
        super().__init__(base.in_features, base.out_features, bias=False, device="meta")
        w = base.weight
        self.weight = w
        dtype = adapter_dtype(w)
        self.bitfit_added = base.bias is None
        if base.bias is None:
            self.bias = nn.Parameter(torch.zeros(self.out_features, device=w.device, dtype=dtype))  # (out,)
        elif base.bias.dtype == dtype:
            self.bias = base.bias
        else:
            self.bias = nn.Parameter(base.bias.detach().to(dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias.to(self.weight.dtype))


def bitfit_layers(model: nn.Module) -> dict[str, BitFitLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, BitFitLinear)}


def has_bitfit(model: nn.Module) -> bool:
    return bool(bitfit_layers(model))


def apply_bitfit(model: nn.Module, target_modules: str | Iterable[str] = "all-linear") -> nn.Module:
    """Freeze the model, then make the bias of every nn.Linear named by target_modules trainable, adding a zero
    bias where there is none. Default: every Linear but lm_head (PEFT's "all-linear")."""
    if has_bitfit(model):
        raise ValueError("this model already has BitFit biases")
    targets = select_linears(model, target_modules, "BitFit")
    freeze(model)
    for name, linear in targets.items():
        layer = BitFitLinear(linear)
        layer.bias.requires_grad_(True)
        model.set_submodule(name, layer, strict=True)
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
        if isinstance(modules.get(name), QuantLinear):  # to the user it is a Linear: say why it is refused
            raise ValueError(f"{file}: bias for {name!r}, which is quantized ({modules[name].method}) in this model; "
                             "load the adapter onto the unquantized model")
        if not isinstance(modules.get(name), nn.Linear):
            raise ValueError(f"{file}: bias for {name!r}, which is not an nn.Linear of this model")
        if tuple(tensor.shape) != (modules[name].out_features,):
            raise ValueError(f"{file}: tensor {key!r} has shape {tuple(tensor.shape)}, the model expects "
                             f"({modules[name].out_features},)")
        names.append(name)
    apply_bitfit(model, target_modules=names)
    with torch.no_grad():
        for name in names:
            model.get_submodule(name).bias.copy_(tensors[f"{name}.bias"])  # the swapped-in layer, not `modules`
    return model

