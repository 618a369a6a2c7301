"""Which fine-tuning methods fit a device, and with what micro-batch, accumulation and checkpointing.

A configuration fits when  estimate.total * (1 + FRAGMENTATION) + CONTEXT_BYTES <= device memory:
`memory.estimate` counts what torch allocates, not the CUDA context, cuBLAS workspaces or the caching allocator's
fragmentation, so a margin covers those. Checkpointing costs ~30% more compute, so it is used only when the
method does not fit at micro-batch 1 without it.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass

from camelid.config import ModelConfig
from camelid.plan.memory import METHODS, estimate

FRAGMENTATION = 0.05  # the caching allocator's overhead on top of live tensors
CONTEXT_BYTES = 1e9  # CUDA context + cuBLAS/cuDNN workspaces, outside torch.cuda.max_memory_allocated
_UNITS = {"": 1e9, "b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12, "kib": 2**10, "mib": 2**20, "gib": 2**30,
          "tib": 2**40, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}


def parse_memory(text: str) -> float:
    """'24GB' -> 24e9 bytes, '24GiB' -> 24 * 2^30, a bare number is GB. GB is decimal: a card sold as "24 GB"
    has 24 GiB (25.8e9 bytes), so reading it as 24e9 leaves a little headroom."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"cannot read a memory size from {text!r}; write e.g. 24GB, 80GiB or 48")
    value = float(m.group(1)) * _UNITS[m.group(2).lower()]
    if not 0 < value < math.inf:  # 1e400GB reads as inf
        raise ValueError(f"the device memory must be a finite positive size, got {text!r}")
    return value


@dataclass
class Fit:
    method: str
    fits: bool
    micro_batch: int = 0
    grad_accum: int = 0
    checkpointing: bool = False
    bytes_needed: float = 0.0  # the estimate (before the margin) at the chosen micro-batch
    reason: str = ""


def size_text(nbytes: float) -> str:
    """Bytes as GB, or MB below 0.1 GB (a tiny model's "0.0 GB" says nothing)."""
    return f"{nbytes / 1e9:.1f} GB" if nbytes >= 1e8 else f"{nbytes / 1e6:.1f} MB"


def _needed(est_total: float, context_bytes: float = CONTEXT_BYTES) -> float:
    return est_total * (1 + FRAGMENTATION) + context_bytes


def _largest_micro_batch(config: ModelConfig, method: str, device_bytes: float, cap: int, context_bytes: float,
                         **kw) -> tuple[int, float]:
    """The largest power of two <= cap that fits (0 if even 1 does not), and its estimate."""
    best, best_total, b = 0, 0.0, 1
    while b <= cap:
        total = estimate(config, method, batch=b, **kw).total
        if _needed(total, context_bytes) > device_bytes:
            break
        best, best_total, b = b, total, b * 2
    return best, best_total


def fit(config: ModelConfig, device_memory: float, seq: int = 512, global_batch: int = 64, precision: str = "bf16",
        optimizer: str = "adamw", methods: tuple[str, ...] = METHODS, compiled: bool = False,
        context_bytes: float = CONTEXT_BYTES) -> list[Fit]:
    """One Fit per method. Training methods get the micro-batch (a power of two dividing `global_batch` when it is
    one) and grad_accum = ceil(global_batch / micro_batch); inference gets the largest batch at a `seq` context.
    `compiled`: training runs under torch.compile with camelid's activation memory budget (estimate's `compiled`).
    `context_bytes`: memory the device holds outside torch's tensors (the CUDA context; 0 for a CPU)."""
    if not (isinstance(global_batch, int) and global_batch > 0):
        raise ValueError(f"--global-batch must be a positive integer, got {global_batch!r}")
    if device_memory <= 0:
        raise ValueError(f"the device memory must be positive, got {device_memory!r}")
    rows = []
    for method in methods:
        kw = dict(seq=seq, precision=precision, optimizer=optimizer, compiled=compiled)
        if method == "inference":
            kw.pop("optimizer")
            kw.pop("compiled")
        cap = global_batch if method != "inference" else 1024
        for ckpt in ((False,) if method == "inference" else (False, True)):
            micro, total = _largest_micro_batch(config, method, device_memory, cap, context_bytes,
                                                checkpointing=ckpt, **kw)
            if micro:
                accum = 0 if method == "inference" else math.ceil(global_batch / micro)
                rows.append(Fit(method, True, micro, accum, ckpt, total))
                break
        else:
            need = estimate(config, method, batch=1, checkpointing=method != "inference", **kw).total
            rows.append(Fit(method, False, bytes_needed=need,
                            reason=f"needs {size_text(_needed(need, context_bytes))} at micro-batch 1"
                                   + (" with checkpointing" if method != "inference" else "")))
    return rows


def fit_training(config: ModelConfig, device_memory: float, seq: int, global_batch: int, precision: str = "bf16",
                 optimizer: str = "adamw", method: str = "full", compiled: bool = False,
                 context_bytes: float = CONTEXT_BYTES) -> Fit:
    """What `--auto` trains with: `fit`'s row for one method, its micro-batch lowered to a power of two that divides
    global_batch (so the step keeps exactly global_batch sequences). Raises ValueError when nothing fits."""
    (row,) = fit(config, device_memory, seq=seq, global_batch=global_batch, precision=precision, optimizer=optimizer,
                 methods=(method,), compiled=compiled, context_bytes=context_bytes)
    if not row.fits:
        raise ValueError(f"{method} training at seq {seq} does not fit in {size_text(device_memory)}: {row.reason}")
    micro = min(row.micro_batch, global_batch & -global_batch)  # x & -x: the largest power of two dividing x
    if micro != row.micro_batch:
        row.bytes_needed = estimate(config, method, seq=seq, batch=micro, precision=precision, optimizer=optimizer,
                                    checkpointing=row.checkpointing, compiled=compiled).total
    row.micro_batch, row.grad_accum = micro, global_batch // micro
    return row


def to_dicts(rows: list[Fit]) -> list[dict]:
    return [asdict(r) for r in rows]
