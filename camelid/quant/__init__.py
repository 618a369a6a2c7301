"""Weight-only quantization by module name: swap nn.Linear layers for quantized ones, write a quantized state dict.

    quantize_model(model, "int4", group_size=128)     # in place; lm_head and embeddings stay as they are
    quantization_config(model)                        # what config.json records, so loading can rebuild it
    prepare_quantized(model, config)                  # an (empty, meta-device) model shaped for that state dict

Formats: int8.py (per-channel symmetric), int4.py (grouped, asymmetric; gptq.py chooses the codes with
calibration data), nf4.py (NF4 + double quantization, the QLoRA base); linear.py holds what they share.
perplexity.py measures what quantizing cost; the `camelid quantize` workflow (folder in, folder out) is
camelid/quantize.py, above checkpoint.

`name_matches` is the module-name rule shared with camelid.peft (PEFT's target_modules rule), which may import
quant (QLoRA builds on it) while quant imports nothing of peft.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable

import torch
from torch import nn

from camelid.quant.int4 import Int4Linear
from camelid.quant.int8 import Int8Linear
from camelid.quant.linear import QuantLinear, dequant_linear
from camelid.quant.nf4 import NF4Linear

__all__ = ["FORMATS", "Int4Linear", "Int8Linear", "NF4Linear", "QuantLinear", "checked_linears", "dequant_linear",
           "dequantize_model",
           "float_dtype", "model_nbytes", "name_matches", "options_for", "prepare_quantized", "quantization_config",
           "quantize_model", "quantized_layers", "quant_tensor_keys", "select_linears"]

FORMATS: dict[str, type[QuantLinear]] = {"int8": Int8Linear, "int4": Int4Linear, "nf4": NF4Linear}
CONFIG_TAG = "camelid"  # quantization_config.quant_method: our own format (transformers has no loader for it)
# kept in float by default: lm_head (the logits are the most sensitive matmul, and often tied to the embeddings)
# and MoE routers (`...block_sparse_moe.gate`, tiny, and a changed routing decision changes the whole output)
DEFAULT_SKIP = re.compile(r"(^|\.)(lm_head|gate)$")


def options_for(method: str, group_size: int | None) -> dict:
    if method not in FORMATS:
        raise ValueError(f"unknown quantization method {method!r}; choose one of {', '.join(FORMATS)}")
    return {"group_size": 128 if group_size is None else group_size} if method == "int4" else {}


def name_matches(name: str, patterns: str | Iterable[str]) -> bool:
    """PEFT's target_modules rule: a string is a regex over the whole module name ("all-linear": anything but
    lm_head); a list matches a name equal to an entry or ending in "." + entry."""
    if isinstance(patterns, str):
        if patterns == "all-linear":
            return name != "lm_head"
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns)


def select_linears(model: nn.Module, modules: str | Iterable[str] | None = None) -> dict[str, nn.Linear]:
    """The nn.Linear layers to quantize: every one but lm_head and MoE routers by default; else those whose full
    name matches `modules` by PEFT's rule (`name_matches`)."""
    if modules is not None and not isinstance(modules, str):
        modules = list(modules)  # a generator would be used up by the first name
    found = {}
    for name, m in model.named_modules():
        if not isinstance(m, nn.Linear):
            continue
        chosen = DEFAULT_SKIP.search(name) is None if modules is None else name_matches(name, modules)
        if chosen:
            found[name] = m
    if not found:
        raise ValueError(f"modules {modules!r} match no nn.Linear layer of this model")
    shared = {id(p) for n, m in model.named_modules() if n not in found for p in m.parameters(recurse=False)}
    tied = [n for n, m in found.items() if id(m.weight) in shared]
    if tied:
        raise ValueError(f"{tied[0]} shares its weight with another module (tied embeddings); leave it out")
    return found


def checked_linears(model: nn.Module, method: str, group_size: int | None = 128,
                    modules: str | Iterable[str] | None = None) -> dict[str, nn.Linear]:
    """`select_linears`, each layer's shape checked against the format's options: quantize_model's layers, or a
    one-line error naming the first layer that does not fit."""
    options = options_for(method, group_size)
    layers = select_linears(model, modules)
    for name, linear in layers.items():
        try:
            FORMATS[method].check_options(linear.in_features, linear.out_features, **options)
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from None
    return layers


def quantize_model(model: nn.Module, method: str, group_size: int | None = 128,
                   modules: str | Iterable[str] | None = None, compute_dtype: torch.dtype | None = None,
                   quantizer: Callable[[str, nn.Linear], QuantLinear] | None = None,
                   progress: Callable[[str, int, int], None] | None = None) -> nn.Module:
    """Replace the selected nn.Linear layers of `model` by quantized ones (in place; returns the model).
    `group_size` is int4's group (int8 is per channel, nf4 uses QLoRA's 64 / 256 blocks). `quantizer`, when
    given, builds each layer instead (GPTQ passes its calibrated one). `progress(name, done, total)` is called
    after each layer."""
    options = options_for(method, group_size)
    layers = checked_linears(model, method, group_size, modules)  # every shape checked before changing anything
    for done, (name, linear) in enumerate(layers.items(), 1):
        if quantizer is not None:
            layer = quantizer(name, linear)
        else:
            layer = FORMATS[method].from_linear(linear, compute_dtype=compute_dtype, **options)
        model.set_submodule(name, layer, strict=True)
        if progress is not None:
            progress(name, done, len(layers))
    return model


def quantized_layers(model: nn.Module) -> dict[str, tuple[type[QuantLinear], dict]]:
    """name -> (format class, options) of every quantized layer, including the quantized base of a QLoRA
    LoRALinear (which adopts the base's buffers and records its `quant_format`)."""
    found = {}
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear):
            found[name] = (type(m), m.options)
        elif getattr(m, "quant_format", None) is not None:
            found[name] = m.quant_format
    return found


def quant_tensor_keys(model: nn.Module) -> set[str]:
    """State-dict keys that hold quantized data (never cast to another dtype when saving): the buffers of every
    quantized layer (a LoRALinear's only persistent buffers are the quantized base's)."""
    layers = quantized_layers(model)
    return {key for key, _ in _persistent_buffers(model) if key.rpartition(".")[0] in layers}


def quantization_config(model: nn.Module) -> dict | None:
    """config.json's `quantization_config` for this model, or None when nothing is quantized."""
    layers = quantized_layers(model)
    if not layers:
        return None
    kinds = {(cls.method, tuple(sorted(opts.items()))) for cls, opts in layers.values()}
    if len(kinds) > 1:
        raise ValueError(f"one checkpoint holds one quantization format; this model mixes {sorted(kinds)}")
    cls, options = next(iter(layers.values()))
    return {"quant_method": CONFIG_TAG, "method": cls.method, **options, "modules": sorted(layers)}


def prepare_quantized(model: nn.Module, config: dict, where: str = "config.json") -> nn.Module:
    """Swap the layers named in a `quantization_config` for empty quantized layers of the right shapes (on the
    model's device: meta while loading), so that loading fills them key by key."""
    if not isinstance(config, dict):
        raise ValueError(f"{where}: quantization_config must be an object, got {type(config).__name__}")
    method = config.get("method")
    if config.get("quant_method") != CONFIG_TAG or method not in FORMATS:
        raise ValueError(f"{where}: quantization_config {config.get('quant_method')!r} / method {method!r} is not "
                         f"one camelid writes (quant_method {CONFIG_TAG!r}, method one of {', '.join(FORMATS)})")
    options = {k: v for k, v in config.items() if k not in ("quant_method", "method", "modules")}
    modules = config.get("modules", [])
    if not isinstance(modules, list):
        raise ValueError(f"{where}: quantization_config's modules must be a list of module names")
    for name in modules:
        try:
            linear = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"{where}: quantization_config names module {name!r}, which this model lacks") from None
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"{where}: quantized module {name!r} is a {type(linear).__name__}, not a Linear")
        try:
            layer = FORMATS[method].shaped_like(linear, **options)
        except (TypeError, ValueError) as e:  # a hand-edited option: "group_size": "128"
            raise ValueError(f"{where}: quantization_config options {options} do not fit {name} ({e})") from None
        model.set_submodule(name, layer, strict=True)
    return model


def float_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's largest floating-point parameter (the embeddings, in a LLaMA): the dtype its
    activations flow in, so the one a dequantized Linear needs. A quantized layer cannot tell it alone: its
    codes and scales keep their own dtypes, and LLaMA's Linear layers have no bias."""
    floats = [p for p in model.parameters() if p.is_floating_point()]
    return max(floats, key=torch.Tensor.numel).dtype if floats else torch.float32


def dequantize_model(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Put plain nn.Linear layers (holding the dequantized weights, in `dtype`, default the model's
    `float_dtype`) back in place of quantized ones."""
    dtype = dtype or float_dtype(model)
    for name, m in list(model.named_modules()):
        if isinstance(m, QuantLinear):
            model.set_submodule(name, m.to_linear(dtype), strict=True)
    return model


def model_nbytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and persistent buffers (each shared tensor once): what its checkpoint
    holds and what its weights take in memory."""
    seen, total = set(), 0
    for t in list(model.parameters()) + [b for _, b in _persistent_buffers(model)]:
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def _persistent_buffers(model: nn.Module):
    for module_name, m in model.named_modules():
        for name, b in m.named_buffers(recurse=False):
            if b is not None and name not in m._non_persistent_buffers_set:
                yield (f"{module_name}.{name}" if module_name else name), b
