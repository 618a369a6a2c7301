"""LoRA / DoRA adapters as PEFT folders: `adapter_config.json` + `adapter_model.safetensors`, readable and writable
by the `peft` library (`PeftModel.from_pretrained`, `save_pretrained`).

A PEFT file key is ours with "base_model.model." in front (see lora.py): the adapter name ("default") is not in
saved files. Which modules carry an adapter is read from the file's keys, not re-derived from target_modules, so a
folder loads exactly as it was saved whatever matching rule wrote it; the rank comes from the tensors' shapes.
A folder is written by shared.py's write_adapter_folder, as every method's is.

Besides LoRA / DoRA tensors on Linear layers, a PEFT folder may hold LoRA on embeddings (`lora_embedding_A` / `_B`)
and whole tensors that replace the base's: `modules_to_save` copies (saved under the module's own name), biases
trained with bias="all" / "lora_only", the base weight of a targeted embedding layer (`...base_layer.weight`,
PEFT's save_embedding_layers) and the token rows `trainable_token_indices` trains (`...trainable_tokens_delta`).
PEFT loads those over the base weights, and so does load_adapter. Every other feature that changes what the adapter
computes is refused by name (UNSUPPORTED), never ignored.

A LoRA folder also loads onto a quantized model folder (`camelid quantize`): that is QLoRA, which builds on
camelid.quant (the deliberate peft -> quant edge described in lora.py).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from pathlib import Path

import torch
from torch import nn

from camelid.peft.lora import LoRAEmbedding, LoRALinear, apply_lora, lora_layers, lora_state_dict
from camelid.peft.shared import (CONFIG_FILE, WEIGHTS_FILE, AdapterError, name_matches, read_config,
                                 read_tensors, short_or_regex, write_adapter_folder)
from camelid.quant import QuantLinear

PREFIX = "base_model.model."
# adapter_config.json fields that change what the adapter computes and that camelid does not implement.
# (fan_in_fan_out is not one: it describes Conv1D weights, and over nn.Linear peft warns and ignores it.)
UNSUPPORTED = {"lora_bias": False, "use_qalora": False,
               "target_parameters": None, "layer_replication": None, "alora_invocation_tokens": None,
               "use_bdlora": None, "arrow_config": None, "monteclora_config": None, "kasa_config": None}
BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq")  # init_lora_weights that rewrite the base weights
LORA_PARTS = ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector", "lora_embedding_A", "lora_embedding_B")
# PEFT's wrappers in a saved key: a LoRA layer's base (embedding layers are saved whole), a modules_to_save copy
# and trainable_token_indices' rows
WRAPPERS = re.compile(r"\.(base_layer|modules_to_save\.default|token_adapter)(?=\.)")
TOKEN_ROWS = "trainable_tokens_delta"  # (n, dim): rows trainable_token_indices gives a module's weight
# the model attribute where load_adapter lists the base tensors a folder replaced (save_adapter cannot write them)
REPLACED_ATTR = "adapter_replaced_tensors"


def _pattern_value(patterns: dict, name: str, default):
    """PEFT's get_pattern_key: the first pattern whose regex matches the end of the module name."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def save_adapter(model: nn.Module, path: str | Path, base_model_name_or_path: str | None = None) -> Path:
    """Write the model's LoRA / DoRA adapters as a PEFT folder. Per-module ranks or alphas that differ from the most
    common one go to rank_pattern / alpha_pattern, as PEFT writes them."""
    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA layers to save (apply_lora or load_adapter first)")
    if any(layer.merged for layer in layers.values()):
        raise ValueError("the adapters are merged into the weights; unmerge_lora before save_adapter")
    replaced = getattr(model, REPLACED_ATTR, None)
    if replaced:  # written without them, the folder would load with other logits
        raise ValueError(f"the model's {replaced[0]} was replaced by the adapter folder it was loaded from "
                         "(modules_to_save, a trained bias or trainable tokens), which save_adapter does not write; "
                         "keep that folder as it is")
    first = next(iter(layers.values()))
    for name, layer in layers.items():
        for attr in ("use_rslora", "use_dora", "dropout_p"):
            if getattr(layer, attr) != getattr(first, attr):
                raise ValueError(f"{name}: {attr} differs between LoRA layers; one PEFT config cannot express it")
    r = Counter(layer.r for layer in layers.values()).most_common(1)[0][0]
    alpha = Counter(layer.alpha for layer in layers.values()).most_common(1)[0][0]
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": first.dropout_p,
        "target_modules": short_or_regex(model, layers),
        "rank_pattern": {re.escape(n): layer.r for n, layer in layers.items() if layer.r != r},
        "alpha_pattern": {re.escape(n): layer.alpha for n, layer in layers.items() if layer.alpha != alpha},
        "use_rslora": first.use_rslora,
        "use_dora": first.use_dora,
        "bias": "none",
        "lora_bias": False,
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
    }
    return write_adapter_folder(path, config, {PREFIX + k: v for k, v in lora_state_dict(model).items()})


def read_adapter_config(path: str | Path) -> dict:
    config, file = read_config(path, "LORA"), Path(path) / CONFIG_FILE
    for field, default in UNSUPPORTED.items():
        value = config.get(field, default)
        if value not in (default, None, [], {}, False, "none"):
            raise AdapterError(f"{file}: {field}={value!r} is not supported by camelid's LoRA")
    _check_numbers(config, file)
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(BASE_CHANGING_INITS):
        # its adapters pair with the residual base the init made (peft redoes the init on load); the plain base
        # would give other logits
        raise AdapterError(f"{file}: init_lora_weights={init!r} adapters need the base weights that init changed; "
                           "convert the folder to a plain LoRA with peft's save_pretrained(..., "
                           "path_initial_model_for_weight_conversion=...) to load it in camelid")
    return config


def _check_numbers(config: dict, file: Path) -> None:
    """The fields camelid computes with, as a hand-edited config may get them wrong: one line, not a traceback."""
    def number(value) -> bool:  # finite: a NaN or infinite alpha loads and computes NaN logits
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

    for field in ("lora_alpha", "lora_dropout"):
        if field in config and not number(config[field]):
            raise AdapterError(f"{file}: {field}={config[field]!r} is not a number")
    for field in ("use_rslora", "use_dora"):  # bool("no") is True: a string would switch the scaling on
        if config.get(field) is not None and not isinstance(config[field], bool):
            raise AdapterError(f"{file}: {field}={config[field]!r} is not true or false")
    if not 0 <= config.get("lora_dropout", 0) < 1:  # else nn.Dropout's message, naming the weights file
        raise AdapterError(f"{file}: lora_dropout={config['lora_dropout']!r} is not in [0, 1)")
    patterns = config.get("alpha_pattern") or {}
    if not isinstance(patterns, dict) or not all(number(v) for v in patterns.values()):
        raise AdapterError(f"{file}: alpha_pattern={patterns!r} is not an object of pattern: number")
    for key in patterns:
        try:
            re.compile(rf"(.*\.)?({key})$")  # as _pattern_value uses it
        except re.error as e:
            raise AdapterError(f"{file}: alpha_pattern key {key!r} is not a regular expression ({e})") from None


def module_alpha(config: dict, name: str) -> float:
    """The lora_alpha that applies to module `name`: alpha_pattern's first match, else lora_alpha (PEFT's rule)."""
    return _pattern_value(config.get("alpha_pattern") or {}, name, config.get("lora_alpha", 8))


def read_adapter(path: str | Path) -> tuple[dict, dict[str, dict[str, torch.Tensor]]]:
    """A PEFT LoRA / DoRA folder, read and checked but applied to nothing: (adapter_config.json, {module name:
    {"lora_A.weight": (r, in), "lora_B.weight": (out, r)[, "lora_magnitude_vector": (out,)]}}), on the CPU.
    An embedding's parts are "lora_embedding_A" (r, num) and "lora_embedding_B" (dim, r); a whole tensor that
    replaces the base's (modules_to_save, a trained bias, ...) is the part named as the module's own parameter
    ("weight", "bias")."""
    path = Path(path)
    config = read_adapter_config(path)
    file = path / WEIGHTS_FILE
    if not file.is_file():
        raise FileNotFoundError(f"no {WEIGHTS_FILE} in {path} (pickled adapter_model.bin files are never loaded)")
    tensors = read_tensors(file)

    per_module: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        suffix = next((s for s in LORA_PARTS if key.endswith("." + s)), None)
        if not key.startswith(PREFIX) or (suffix is None and "." not in key[len(PREFIX):]):
            raise AdapterError(f"{file}: unexpected tensor {key!r} (expected {PREFIX}<module>.lora_A.weight, ...)")
        if suffix is None:  # a whole tensor: `module.param` once PEFT's wrapper names are taken out
            module, suffix = WRAPPERS.sub("", key[len(PREFIX):]).rsplit(".", 1)
        else:
            module = key[len(PREFIX):-len(suffix) - 1]
        per_module.setdefault(module, {})[suffix] = tensor
    if not any(set(parts) & set(LORA_PARTS) for parts in per_module.values()):
        raise AdapterError(f"{file}: no LoRA tensors")
    for name, parts in per_module.items():
        if "lora_embedding_A" in parts or "lora_embedding_B" in parts:
            need = ["lora_embedding_A", "lora_embedding_B"]
            if "lora_magnitude_vector" in parts:
                raise AdapterError(f"{file}: DoRA on the embedding {name} (use_dora with embed_tokens targeted) is "
                                   "not supported by camelid's LoRA")
        elif "lora_A.weight" in parts or "lora_B.weight" in parts:
            need = [*LORA_PARTS[:3]] if config.get("use_dora", False) else [*LORA_PARTS[:2]]
        else:
            need = []
        missing = [s for s in need if s not in parts]
        if missing:
            raise AdapterError(f"{file}: missing tensor {PREFIX + name}.{missing[0]}")
    return config, per_module


def load_adapter(model: nn.Module, path: str | Path) -> nn.Module:
    """Apply a PEFT LoRA / DoRA folder (written by `peft` or by `save_adapter`) to `model`, in place; every other
    parameter is frozen. Adapters sit on the base weights' device, in fp32 over a half-precision base."""
    path = Path(path)
    file = path / WEIGHTS_FILE
    config, per_module = read_adapter(path)
    use_dora = bool(config.get("use_dora", False))
    modules = dict(model.named_modules())
    replaced = _replaced_tensors(model, file, config, per_module)  # checked before the model is touched
    ranks, alphas = {}, {}
    for name, parts in per_module.items():
        if not set(parts) & set(LORA_PARTS):
            continue
        if name not in modules:
            raise AdapterError(f"{file}: adapter for module {name!r}, which this model does not have")
        embedding = "lora_embedding_A" in parts
        kinds = (nn.Embedding,) if embedding else (nn.Linear, QuantLinear)  # a `camelid quantize` folder's too
        if not isinstance(modules[name], kinds):
            raise AdapterError(f"{file}: adapter for {name!r}, a {type(modules[name]).__name__}, not an "
                               f"{'nn.Embedding' if embedding else 'nn.Linear'}")
        module = modules[name]
        ranks[name] = r = parts.get("lora_A.weight", parts.get("lora_embedding_A")).shape[0]
        alphas[name] = module_alpha(config, name)
        if embedding:
            expected = {"lora_embedding_A": (r, module.num_embeddings), "lora_embedding_B": (module.embedding_dim, r)}
        else:
            expected = {"lora_A.weight": (r, module.in_features), "lora_B.weight": (module.out_features, r),
                        "lora_magnitude_vector": (module.out_features,)}
        for suffix, tensor in parts.items():  # every shape checked before the model is touched
            if suffix in expected and tuple(tensor.shape) != expected[suffix]:
                raise AdapterError(f"{file}: tensor {PREFIX + name}.{suffix} has shape {tuple(tensor.shape)}, "
                                   f"the model expects {expected[suffix]}")

    try:
        apply_lora(model, r=config.get("r", 8), alpha=config.get("lora_alpha", 8),
                   dropout=float(config.get("lora_dropout", 0.0)),
                   target_modules="^(" + "|".join(re.escape(n) for n in ranks) + ")$",
                   use_rslora=bool(config.get("use_rslora", False)), use_dora=use_dora, ranks=ranks, alphas=alphas)
    except ValueError as e:  # a tied lm_head, ...: the adapter is what cannot load
        raise AdapterError(f"{file}: {e}") from None
    with torch.no_grad():
        for name, tensor in replaced.items():
            model.get_parameter(name).copy_(tensor)
        if replaced:
            setattr(model, REPLACED_ATTR, sorted(replaced))
        for name in ranks:
            parts = per_module[name]
            layer = model.get_submodule(name)
            if isinstance(layer, LoRAEmbedding):
                targets = {"lora_embedding_A": layer.lora_embedding_A, "lora_embedding_B": layer.lora_embedding_B}
            else:
                targets = {"lora_A.weight": layer.lora_A.weight, "lora_B.weight": layer.lora_B.weight}
            if use_dora and isinstance(layer, LoRALinear):
                targets["lora_magnitude_vector"] = layer.lora_magnitude_vector
            for suffix, target in targets.items():
                target.copy_(parts[suffix])
    return model


def _replaced_tensors(model: nn.Module, file: Path, config: dict, per_module: dict) -> dict[str, torch.Tensor]:
    """{parameter name: tensor} of the folder's whole tensors (modules_to_save, trained biases, a LoRA embedding's
    base, a weight with its trainable_token_indices rows put in), each checked against the model: it must exist
    with that shape, and a tied weight (lm_head and embed_tokens) may not change on one side only, since PEFT keeps
    the two apart (except for the embedding's trainable token rows, which PEFT gives the tied lm_head as well)."""
    params, buffers = dict(model.named_parameters(remove_duplicate=False)), dict(model.named_buffers())
    replaced = {f"{module}.{part}": tensor for module, parts in per_module.items()
                for part, tensor in parts.items() if part not in (*LORA_PARTS, TOKEN_ROWS)}
    # the input embedding's token rows reach a tied lm_head too: peft gives it the same rows (its tied_adapter)
    tied_rows = set()
    for module, parts in per_module.items():
        if TOKEN_ROWS in parts:
            replaced[f"{module}.weight"] = _with_token_rows(params, file, config, module, parts[TOKEN_ROWS])
            if module.rsplit(".", 1)[-1] == "embed_tokens":
                tied_rows.add(f"{module}.weight")
    for name, tensor in replaced.items():
        if name not in params:
            held = "is quantized in this model (load it onto the float base)" if name in buffers else \
                "this model does not have"
            raise AdapterError(f"{file}: tensor {PREFIX + name} replaces {name!r}, which {held}")
        if tensor.shape != params[name].shape:
            raise AdapterError(f"{file}: tensor {PREFIX + name} has shape {tuple(tensor.shape)}, the model's "
                               f"{name} is {tuple(params[name].shape)} (a resized vocabulary is not supported)")
        for other in [n for n, p in params.items() if p is params[name] and n != name]:
            if name in tied_rows and other not in replaced:
                continue
            if not torch.equal(replaced.get(other, params[other].detach()).to(tensor), tensor):
                raise AdapterError(f"{file}: tensor {PREFIX + name} would change {name}, which is tied to {other} "
                                   "(tie_word_embeddings); an adapter that changes one side only is not supported")
    return replaced


def _with_token_rows(params: dict, file: Path, config: dict, module: str, rows: torch.Tensor) -> torch.Tensor:
    """`module`'s weight with rows[i] in row indices[i], as PEFT's trainable tokens compute it (index_copy). A list
    of indices is the input embedding's; a dict gives them per module name (PEFT's name-suffix rule)."""
    given = config.get("trainable_token_indices")
    if isinstance(given, list):
        given = {"embed_tokens": given}
    indices = next((v for k, v in (given or {}).items() if name_matches(module, [k])), None)
    weight = params.get(f"{module}.weight")
    if weight is None or indices is None or len(indices) != rows.shape[0] or weight.shape[1:] != rows.shape[1:] \
            or not all(isinstance(i, int) and 0 <= i < weight.shape[0] for i in indices):
        raise AdapterError(f"{file}: tensor {PREFIX}{module}.token_adapter.{TOKEN_ROWS} {tuple(rows.shape)} does not "
                           f"fit trainable_token_indices={config.get('trainable_token_indices')!r} on this model")
    return weight.detach().to(rows.dtype).index_copy(0, torch.tensor(indices), rows)
