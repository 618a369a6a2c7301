"""What the benchmarks share: one set of weights in camelid and transformers, a fair timer, the device's name, and
the JSON record under benchmarks/results/.

Run the benchmarks as scripts (`python benchmarks/forward.py`): the script's folder is then on sys.path, which is how
they import this file.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import importlib.metadata
import json
import os
import platform
import re
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from camelid.checkpoint import save_pretrained
from camelid.config import ModelConfig, get_preset
from camelid.model import Transformer
from camelid.train.compile import DEFAULT_ACTIVATION_MEMORY_BUDGET

RESULTS = Path(__file__).parent / "results"

# LLaMA's vocabulary and layout (GQA, SwiGLU, RoPE) at sizes two CPU cores run in seconds
SMALL = ModelConfig(vocab_size=32000, hidden_size=512, intermediate_size=1408, num_hidden_layers=4,
                    num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=2048, rms_norm_eps=1e-5)
TINY = SMALL.replace(hidden_size=256, intermediate_size=704)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        model = re.search(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text()).group(1).strip()
    except (OSError, AttributeError):
        pass
    return f"{model} ({len(os.sched_getaffinity(0))} cores, {torch.get_num_threads()} torch threads)"


def device_slug(device: torch.device) -> str:
    """"cpu", or the GPU's name in file-name form ("nvidia-h100-80gb-hbm3")."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def parser(doc: str, cpu_shape: str = "a tiny llama-shaped config", cuda_preset: str = "tinyllama-1.1b"
           ) -> argparse.ArgumentParser:
    """The arguments every model benchmark takes (--preset, --layers, --device), with the script's docstring as help."""
    p = argparse.ArgumentParser(description=doc.split("\n")[0], epilog=doc.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", help=f"a camelid.config.PRESETS name (default: {cuda_preset} on CUDA, {cpu_shape} "
                                    "otherwise)")
    p.add_argument("--layers", type=int, help="override num_hidden_layers (run a big shape on CPU)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="default: cuda if present")
    return p


def add_budget_argument(p: argparse.ArgumentParser) -> None:
    """--activation-memory-budget: the partitioner budget of camelid's compiled model (camelid/train/compile.py)."""
    p.add_argument("--activation-memory-budget", type=float, default=DEFAULT_ACTIVATION_MEMORY_BUDGET,
                   help="camelid compiled: what the partitioner may recompute in backward (default "
                        f"{DEFAULT_ACTIVATION_MEMORY_BUDGET}, as `camelid pretrain/finetune --compile`; 1 = torch's cut)")


def start(device_name: str) -> tuple[torch.device, bool, float]:
    """(device, whether glibc keeps freed memory (keep_freed_memory, CPU only), the 1-minute load average now)."""
    device = torch.device(device_name)
    return device, device.type == "cpu" and keep_freed_memory(), os.getloadavg()[0]


def model_shape(args: argparse.Namespace, positions: int, cuda: bool, cpu_default: ModelConfig = TINY,
                cuda_preset: str = "tinyllama-1.1b") -> tuple[ModelConfig, str]:
    """(config, preset name) from --preset (`cuda_preset` on CUDA, `cpu_default` otherwise) and --layers, with room
    for `positions` positions."""
    preset = args.preset or (cuda_preset if cuda else None)
    config = get_preset(preset) if preset else cpu_default.replace()
    if args.layers:
        config = config.replace(num_hidden_layers=args.layers)
    return config.replace(max_position_embeddings=max(positions, config.max_position_embeddings)), preset


def liger_patch(cuda: bool) -> tuple[Callable | None, str | None]:
    """(transformers' apply_liger_kernel_to_llama, None), or (None, why there is no Liger column)."""
    try:
        from liger_kernel.transformers import apply_liger_kernel_to_llama
    except ImportError as e:
        return None, f"liger_kernel is not installed ({e.msg}): pip install liger-kernel"
    if not cuda:
        return None, "Liger's kernels are Triton kernels: CUDA only"
    return apply_liger_kernel_to_llama, None


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory in the process (no mmap for big blocks, no trimming) so that every step reuses
    the same pages. Otherwise each step's activations are fresh mmaps, and on a VM whose memory the host backs lazily
    the first touch of a page cost ~25x a warm one (2.8 s vs 0.1 s per GiB on our CI box), swamping the model."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(-4, 0) and libc.mallopt(-1, 2**31 - 1))  # M_MMAP_MAX = 0, M_TRIM_THRESHOLD = 2 GiB
    except (OSError, AttributeError):
        return False


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds one call of fn takes, with the device queue drained on both sides."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def compare(fns: dict[str, Callable[[], object]], device: torch.device, warmup: int,
            repeats: int) -> dict[str, list[float]]:
    """Seconds per call of each fn, `repeats` times; the fns take turns so that drift in machine load hits all alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(timed(fn, device))
    return times


def same_weights(config: ModelConfig, device: torch.device, dtype: torch.dtype, copies: int = 1,
                 attn_implementation: str = "sdpa") -> tuple[Transformer, list[torch.nn.Module]]:
    """A camelid model and `copies` transformers models holding the same weights, all in `dtype` on `device`.

    The camelid model is built in fp32 from a fixed seed and saved with camelid's save_pretrained; transformers loads
    that folder (and casts it to dtype itself, as it would a downloaded checkpoint). Activation checkpointing is off.
    """
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        ours = Transformer(config)
    with tempfile.TemporaryDirectory() as tmp:
        save_pretrained(ours, tmp)
        theirs = [AutoModelForCausalLM.from_pretrained(tmp, dtype=dtype, attn_implementation=attn_implementation)
                  .to(device) for _ in range(copies)]
    ours.to(dtype)
    ours.set_activation_checkpointing(False)
    for model in theirs:
        # transformers >= 5.2x renamed gradient_checkpointing_disable; the GPU machine's 5.17 has only the old name
        (getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable)()
        model.config.use_cache = False  # training and plain forwards: no KV cache built
    return ours, theirs


def check_same_logits(ours: Transformer, theirs: torch.nn.Module, ids: torch.Tensor, low_precision: bool) -> float:
    """Max |logits difference| of the two models on ids (B, T); stops the benchmark when they disagree, because the
    timings would then not compare equivalent computations."""
    was_training = ours.training, theirs.training
    ours.eval(), theirs.eval()
    with torch.inference_mode():
        a, b = ours(ids).float(), theirs(input_ids=ids).logits.float()
    ours.train(was_training[0]), theirs.train(was_training[1])
    diff, scale = (a - b).abs().max().item(), a.abs().max().item()
    if diff > (0.1 if low_precision else 1e-3) * max(1.0, scale):
        raise SystemExit(f"the two models disagree (max |logits diff| {diff:.3g} at logit scale {scale:.3g}); "
                         "the timings would not compare equivalent computations")
    return diff


def record_header(benchmark: str, device: torch.device) -> dict:
    """The first keys of every result file: what ran, where, with which versions."""
    versions = {"torch": torch.__version__, "python": platform.python_version()}
    for package in ("camelid", "transformers", "liger_kernel", "triton"):
        try:
            versions[package] = importlib.metadata.version(package.replace("_", "-"))
        except importlib.metadata.PackageNotFoundError:
            pass
    return {"benchmark": benchmark, "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "device": device_name(device), "device_type": device.type, "versions": versions}


def write_result(record: dict, name: str, out: Path | None = None) -> Path:
    """Write record as JSON to out, or to benchmarks/results/<name>-<date>.json."""
    out = out or RESULTS / f"{name}-{datetime.date.today()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    return out
