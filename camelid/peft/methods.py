"""Every kind of adapter folder camelid writes and reads, by the `peft_type` its adapter_config.json records.

The training loop saves whichever kind is applied to the model (`save_adapter`), and `camelid chat --adapter`,
`camelid merge` and the engine load any folder (`load_adapter`) without being told its kind. PEFT's own types
(LORA, PREFIX_TUNING, PROMPT_TUNING, P_TUNING, IA3) load in `peft` too; CAMELID_* types are ours (PEFT has no BitFit
or bottleneck adapters).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from camelid.peft import adapter_io, adapters, bitfit, ia3, prefix, prompt
from camelid.peft.adapter_io import CONFIG_FILE, AdapterError
from camelid.peft.lora import lora_layers, merge_lora


@dataclass(frozen=True)
class AdapterKind:
    peft_type: str
    has: Callable[[nn.Module], bool]  # whether this kind is applied to a model
    save: Callable[..., Path]  # (model, folder, base_model_name_or_path=None) -> folder
    load: Callable[[nn.Module, str | Path], nn.Module]  # apply to a base model and fill from a folder
    merge: Callable[[nn.Module], nn.Module] | None = None  # fold into the base weights, where that is exact


KINDS: dict[str, AdapterKind] = {
    "lora": AdapterKind("LORA", lambda m: bool(lora_layers(m)), adapter_io.save_adapter, adapter_io.load_adapter,
                        merge_lora),
    "prefix": AdapterKind("PREFIX_TUNING", prefix.has_prefix, prefix.save_prefix, prefix.load_prefix),
    "prompt": AdapterKind("PROMPT_TUNING", prompt.has_prompt, prompt.save_prompt, prompt.load_prompt),
    "ptuning": AdapterKind("P_TUNING", prompt.has_ptuning, prompt.save_ptuning, prompt.load_ptuning),
    "ia3": AdapterKind("IA3", ia3.has_ia3, ia3.save_ia3, ia3.load_ia3, ia3.merge_ia3),
    "bitfit": AdapterKind(bitfit.PEFT_TYPE, bitfit.has_bitfit, bitfit.save_bitfit, bitfit.load_bitfit),
    "bottleneck": AdapterKind(adapters.PEFT_TYPE, adapters.has_bottleneck, adapters.save_bottleneck,
                              adapters.load_bottleneck),
}


def applied_kinds(model: nn.Module) -> list[str]:
    return [name for name, kind in KINDS.items() if kind.has(model)]


def save_adapter(model: nn.Module, folder: str | Path, base_model_name_or_path: str | None = None) -> Path | None:
    """Write the adapter applied to `model` as its folder kind; None when no adapter is applied (full fine-tuning)."""
    found = applied_kinds(model)
    if len(found) > 1:
        raise ValueError(f"the model carries several adapter kinds ({', '.join(found)}); one folder holds one kind")
    if not found:
        return None
    return KINDS[found[0]].save(model, folder, base_model_name_or_path=base_model_name_or_path)


def folder_kind(folder: str | Path) -> str:
    """The KINDS name of an adapter folder, from its adapter_config.json's peft_type."""
    file = Path(folder) / CONFIG_FILE
    if not file.is_file():
        raise FileNotFoundError(f"no {CONFIG_FILE} in {folder}: not an adapter folder")
    try:
        peft_type = json.loads(file.read_text()).get("peft_type")
    except (json.JSONDecodeError, AttributeError):
        raise AdapterError(f"{file}: not a JSON object") from None
    for name, kind in KINDS.items():
        if kind.peft_type == peft_type:
            return name
    known = ", ".join(k.peft_type for k in KINDS.values())
    raise AdapterError(f"{file}: peft_type {peft_type!r} is not one camelid reads ({known})")


def load_adapter(model: nn.Module, folder: str | Path) -> nn.Module:
    """Apply any adapter folder camelid or `peft` wrote (LoRA, DoRA, prefix, prompt, P-tuning, IA3, BitFit,
    bottleneck) to `model`, in place; the model keeps its train / eval mode (new layers come in training mode, and
    an inference model would run their dropout)."""
    training = model.training
    KINDS[folder_kind(folder)].load(model, folder)
    return model.train(training)


def merge_adapter(model: nn.Module) -> nn.Module:
    """Fold the applied adapter into the base weights (LoRA / DoRA / IA3); an error for kinds that cannot fold."""
    found = applied_kinds(model)
    for name in found:
        merge = KINDS[name].merge
        if merge is None:
            raise ValueError(f"a {name} adapter cannot be folded into the weights (only lora, dora and ia3 can); "
                             "load it at run time with --adapter instead")
        merge(model)
    return model
