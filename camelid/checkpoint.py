"""Hugging Face checkpoint folders <-> camelid models. Safetensors only: nothing is ever unpickled.

Our module names are the HF ones, so the key map is the identity; what this file does is sharding, dtype, meta-device
loading (one copy of the weights in memory, ever) and clear errors that name the file and the key.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
from torch import nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from camelid.config import ModelConfig
from camelid.files import atomic_write_text, make_usual
from camelid.model import Transformer
from camelid.peft import KINDS, applied_kinds, load_adapter, merge_adapter
from camelid.quant import dequantize_model, prepare_quantized, quant_tensor_keys, quantization_config
from camelid.templates import TEMPLATE_FILE
from camelid.tokenizer import FILES as TOKENIZER_FILES

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# tensors some older checkpoints carry that the model recomputes; skipping them is safe
IGNORED_KEYS = re.compile(r"rotary_emb\.inv_freq$")


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be loaded as it is; the message names the file and the key."""


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    names = {"fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16", "float": "float32"}
    value = getattr(torch, names.get(dtype, dtype), None)
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise ValueError(f"unknown dtype {dtype!r}; use float32, bfloat16 or float16")
    return value


def parse_device(device: str | torch.device) -> torch.device:
    """`device` as a torch.device, or a one-line error for a name torch does not know or a CUDA it lacks."""
    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise ValueError(f"device {device!r} is not one torch knows (cpu, cuda, cuda:1 ...)") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: CUDA is not available here")
    return parsed


def weight_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint folder, from the index when sharded."""
    index = path / INDEX_FILE
    if index.is_file():
        try:  # {"weight_map": {tensor key: file name}}; any other shape is an error naming the index
            files = [path / name for name in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
    elif (path / SINGLE_FILE).is_file():
        files = [path / SINGLE_FILE]
    else:
        files = sorted(path.glob("*.safetensors"))
    if not files:
        pickled = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.pt*")]
        hint = f" (found {', '.join(pickled)}: pickled weights are never loaded; convert them to safetensors)" if pickled else ""
        if (path / "dcp" / ".metadata").is_file():  # written by `camelid pretrain --strategy fsdp | zero2`
            hint = (" (a sharded training checkpoint: make a model folder of it with "
                    "camelid.train.state.export_checkpoint(checkpoint, out))")
        raise FileNotFoundError(f"no *.safetensors weights in {path}{hint}")
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(f"{f}: listed in {INDEX_FILE} but missing")
    return files


def load_weights(model: nn.Module, path: str | Path, files: list[Path] | None = None) -> None:
    """Copy a folder's safetensors into `model`'s existing tensors, in place (an optimizer keeps pointing at them),
    one tensor at a time from the memory-mapped file. Unknown, missing or misshapen tensors are errors naming the
    file and the key."""
    path = Path(path)
    files = files if files is not None else weight_files(path)
    config = getattr(model, "config", None)
    expected = model.state_dict()  # tied lm_head shares storage with embed_tokens: one entry fills both
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    kind = f"a {config.model_type} model of this config" if config is not None else "this model"
    loaded: set[str] = set()
    with torch.no_grad():
        for file in files:
            try:
                handle = safe_open(file, framework="pt", device="cpu")
                keys = list(handle.keys())
            except (SafetensorError, OSError) as e:
                raise CheckpointError(f"{file}: cannot read safetensors header ({e})") from None
            for key in keys:
                if IGNORED_KEYS.search(key) or key in tied:
                    continue
                if key not in expected:
                    raise CheckpointError(f"{file}: unexpected tensor {key!r} for {kind}")
                try:
                    tensor = handle.get_tensor(key)
                except (SafetensorError, OSError, RuntimeError) as e:
                    raise CheckpointError(f"{file}: cannot read tensor {key!r} (file truncated or corrupt: {e})") from None
                if tensor.shape != expected[key].shape:
                    raise CheckpointError(f"{file}: tensor {key!r} has shape {tuple(tensor.shape)}, "
                                          f"the config expects {tuple(expected[key].shape)}")
                expected[key].copy_(tensor)
                loaded.add(key)
    missing = sorted(set(expected) - loaded - tied)
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise CheckpointError(f"{path}: missing tensor {missing[0]!r}{more}")


def from_pretrained(path: str | Path, device: str | torch.device | None = None,
                    dtype: str | torch.dtype | None = None) -> Transformer:
    """Load a HF-style folder (config.json + safetensors, sharded or not) into a camelid Transformer.

    The model is built on the meta device and materialised once; each tensor then streams from the memory-mapped
    file straight into its parameter, so peak memory is the model plus one tensor. `dtype` defaults to the dtype
    the checkpoint was saved in.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"no model folder at {path}")
    config = ModelConfig.from_hf(path / "config.json")
    files = weight_files(path)
    dtype = parse_dtype(dtype) or parse_dtype(config.dtype)
    device = torch.device(device or "cpu")
    quantized = json.loads((path / "config.json").read_text()).get("quantization_config")

    with torch.device("meta"):
        model = Transformer(config)
    model.to(dtype)  # on meta: free; quantized layers below keep their own buffer dtypes
    if quantized:  # `camelid quantize` output: swap in empty quantized layers, filled by load_weights
        prepare_quantized(model, quantized, where=str(path / "config.json"))
    model.to_empty(device=device)
    model.tie_weights()  # to_empty made separate tensors of the tied pair
    model.reset_buffers()
    load_weights(model, path, files)
    model.eval()
    return model


def parse_size(size: int | str) -> int:
    """'5GB' -> 5 * 10**9, '2GiB' -> 2 * 2**30, as Hugging Face counts shard sizes."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B)?\s*", size, re.IGNORECASE)
    if not match:
        raise ValueError(f"cannot read size {size!r}; write it like 5GB, 500MB or 2GiB")
    number, unit = float(match.group(1)), (match.group(2) or "B").upper()
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[unit]
    return int(number * scale)


def split_shards(state: dict[str, torch.Tensor], limit: int) -> dict[str, dict[str, torch.Tensor]]:
    """File name -> its tensors, HF's way: in key order, a new shard when the next tensor would pass `limit` bytes
    (a tensor larger than `limit` gets a shard of its own); one shard is model.safetensors, else
    model-0000i-of-0000n.safetensors."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][key] = tensor
        size += nbytes
    if len(shards) == 1:
        return {SINGLE_FILE: shards[0]}
    return {f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors": shard for i, shard in enumerate(shards)}


def adapter_keys(model: Transformer) -> list[str]:
    """The state-dict keys of `model` that a plain model of its config (quantized as it is) lacks: the tensors of
    an applied PEFT method (`...lora_A.weight`, `...ia3_l`, `prompt_encoder...`, a bias BitFit added)."""
    with torch.device("meta"):
        plain = Transformer(model.config)
    quantized = quantization_config(model)
    if quantized is not None:
        prepare_quantized(plain, quantized)
    expected = plain.state_dict()
    return [k for k in model.state_dict() if k not in expected]


def check_plain(model: Transformer, path: Path) -> None:
    """A one-line error when `model` carries adapter tensors that from_pretrained (and transformers) would refuse."""
    extra = adapter_keys(model)
    if not extra:
        return
    kinds = applied_kinds(model) or ["unknown"]
    hint = "save the adapter alone with camelid.peft.save_adapter(model, folder)"
    if all(kind in KINDS and KINDS[kind].merge is not None for kind in kinds):
        hint += ", or fold it into the weights first with camelid.peft.merge_adapter(model)"
    raise ValueError(f"{path}: the model carries an adapter ({' + '.join(kinds)}; tensor {extra[0]!r} is not part of "
                     f"a {model.config.model_type} checkpoint); {hint}")


def save_pretrained(model: Transformer, path: str | Path, max_shard_size: int | str = "5GB",
                    dtype: str | torch.dtype | None = None, adapters: bool = False) -> Path:
    """Write a folder that `transformers.AutoModelForCausalLM.from_pretrained` loads (for HF architectures).

    A model with a PEFT method applied (unmerged LoRA / DoRA / QLoRA, IA3, prefix, prompt, bottleneck, added BitFit
    biases) is refused with the two ways out (save_adapter, merge_adapter): silently merging would save a model
    other than the live one (a QLoRA base would come back dequantized), and writing the adapter tensors would give
    a folder that neither from_pretrained nor transformers loads. `adapters=True` writes them anyway, under their
    own keys: a training step folder, read back by `load_weights` into a model with the same method applied.

    Every file is written under a temporary name and renamed into place, so a crash never leaves a half-written
    checkpoint where a good one was; shards of an earlier save that are no longer referenced are removed.
    """
    path = Path(path)
    if not adapters:
        check_plain(model, path)
    path.mkdir(parents=True, exist_ok=True)
    dtype = parse_dtype(dtype)
    config = model.config
    state = {k: v.detach() for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # HF re-ties it from embed_tokens; safetensors refuses shared storage
    packed = quant_tensor_keys(model)  # quantized codes and scales keep their own dtypes
    if dtype is not None:
        state = {k: v if k in packed else v.to(dtype) for k, v in state.items()}
    stored_dtype = next(v.dtype for k, v in state.items() if k not in packed)

    shards = split_shards(state, parse_size(max_shard_size))
    written = []
    for name, shard in shards.items():
        tmp = path / f".{name}.tmp"
        save_file({k: v.contiguous().cpu() for k, v in shard.items()}, tmp, metadata={"format": "pt"})
        make_usual(tmp)  # safetensors writes 0600: a server under another account could not read it
        written.append((tmp, path / name))
    for tmp, final in written:
        os.replace(tmp, final)

    index = path / INDEX_FILE
    if len(shards) > 1:
        weight_map = {key: name for name, shard in shards.items() for key in shard}
        total = sum(t.numel() * t.element_size() for t in state.values())
        atomic_write_text(index, json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    elif index.exists():
        index.unlink()
    for stale in path.glob("model*.safetensors"):  # our own earlier shards only, never e.g. adapter_model.safetensors
        if stale.name not in shards and re.fullmatch(r"model(-\d+-of-\d+)?\.safetensors", stale.name):
            stale.unlink()

    hf = config.replace(dtype=str(stored_dtype).removeprefix("torch.")).to_hf()
    quantized = quantization_config(model)
    if quantized is not None:
        hf["quantization_config"] = quantized
    atomic_write_text(path / "config.json", json.dumps(hf, indent=2) + "\n")
    generation = {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id,
                  "pad_token_id": config.pad_token_id}
    atomic_write_text(path / "generation_config.json", json.dumps(generation, indent=2) + "\n")
    return path



def refuse_non_empty(out: Path, overwrite: bool, what: str) -> None:
    """`--out` of init, merge and quantize: another model's weights must not vanish silently."""
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"--out {out} is not empty: choose another --out, or pass --overwrite to write the "
                              f"{what} over it")


def remove_model_files(out: Path) -> None:
    """Before writing a model over another (--overwrite): the old one's tokenizer and chat-template files go, or a
    file the new model lacks (a chat_template.jinja, camelid_template.json) would outlive it and be used for it."""
    for name in (*TOKENIZER_FILES, TEMPLATE_FILE):
        (out / name).unlink(missing_ok=True)


def merge_adapter_folder(base: str | Path, adapter: str | Path, out: str | Path, overwrite: bool = False) -> Path:
    """`camelid merge`: base HF folder + a LoRA / DoRA / IA3 adapter folder -> a merged HF folder (tokenizer files
    and the adapter's recorded chat template copied along). The merge is done in fp32 and saved in the base checkpoint's dtype.
    A non-empty `out` is refused unless `overwrite`, as `camelid init` does."""
    base, out = Path(base), Path(out)
    for folder, what in ((base, "the base model"), (Path(adapter), "the adapter")):
        if out.resolve() == folder.resolve():  # writing there would replace the weights it reads (and mix folders)
            raise ValueError(f"--out {out} is {what}'s folder: choose another --out")
    refuse_non_empty(out, overwrite, "merged model")
    stored = parse_dtype(ModelConfig.from_hf(base / "config.json").dtype)
    model = from_pretrained(base, dtype=torch.float32)
    load_adapter(model, adapter)
    merge_adapter(model)
    dequantize_model(model)  # the layers the adapter left quantized too: the output is a float folder throughout
    remove_model_files(out)
    save_pretrained(model, out, dtype=stored)
    for name in TOKENIZER_FILES:
        if (base / name).is_file():
            shutil.copyfile(base / name, out / name)
    if (Path(adapter) / TEMPLATE_FILE).is_file():  # the chat template it was tuned with: `camelid chat` keeps using it
        shutil.copyfile(Path(adapter) / TEMPLATE_FILE, out / TEMPLATE_FILE)
    return out
