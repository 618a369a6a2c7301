"""What the hardware is doing: GPU utilisation through NVML, the process's CPU and memory otherwise; the memory
bandwidth a decode achieves; a torch.profiler trace of a few training steps.

GPU numbers come from NVML (`pip install nvidia-ml-py`, imported only when a GPU is asked for). CPU numbers use no
extra package: CPU seconds from `os.times()`, the resident set from /proc/self/statm (Linux; elsewhere the peak
from `resource.getrusage`), system CPU and RAM from /proc/stat and /proc/meminfo. Every `sample()` reads a few
counters (microseconds on CPU, tens of microseconds per NVML query), so the training loop calls it every step.
"""

from __future__ import annotations

import os
import resource
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from camelid.config import ModelConfig

NVML_HINT = "GPU monitoring needs NVML bindings: pip install nvidia-ml-py"


def load_nvml() -> tuple[Any, str | None]:
    """(the initialised pynvml module, None), or (None, a one-line reason)."""
    try:
        import pynvml  # from the nvidia-ml-py package
    except ImportError:
        return None, NVML_HINT
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as e:  # no driver, no GPU, a container without libnvidia-ml
        return None, f"NVML is not usable ({e}): no GPU utilisation, power or temperature"
    return pynvml, None


def nvml_index(device: torch.device) -> int:
    """NVML numbers every GPU of the machine; CUDA only the visible ones (CUDA_VISIBLE_DEVICES). Match by UUID."""
    nvml, _ = load_nvml()
    index = device.index if device.index is not None else torch.cuda.current_device()
    uuid = str(getattr(torch.cuda.get_device_properties(index), "uuid", ""))
    if nvml is not None and uuid:
        for i in range(nvml.nvmlDeviceGetCount()):
            if uuid in _text(nvml.nvmlDeviceGetUUID(nvml.nvmlDeviceGetHandleByIndex(i))):
                return i
    return index


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


# ---- CPU counters (no dependency) ----------------------------------------------------------------------------------

def _cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system  # children: DataLoader workers, tokenizers


def rss_bytes() -> int:
    """The process's resident set now (Linux), else its peak so far."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024  # macOS reports bytes, Linux KiB


def _system_cpu_ticks() -> tuple[int, int] | None:
    """(busy, total) jiffies of all CPUs since boot, from the first line of /proc/stat."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields) - idle, sum(fields)


def _meminfo() -> dict[str, int]:
    """/proc/meminfo in bytes: MemTotal, MemAvailable, ... (empty off Linux)."""
    try:
        with open("/proc/meminfo") as f:
            return {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f if line.split()[1:]}
    except (OSError, ValueError):
        return {}


class Monitor:
    """One device's numbers as a flat dict, for metrics rows and `camelid monitor`.

    With `process=True` (default): `cpu_percent` (this process's CPU time over the wall time since the last
    sample, children included; 100 = one core busy) and `rss_gb`. With `gpu` (an NVML index): `gpu_util` (% of
    time a kernel ran), `gpu_mem_used_gb`, `gpu_mem_total_gb` (the whole card, every process, as nvidia-smi
    shows), `gpu_power_w`, `gpu_temp_c`. With `system=True`: `sys_cpu_percent` (all cores together, 100 = every
    core busy), `ram_used_gb`, `ram_total_gb`.
    A counter the device does not report is None. `note` says why GPU numbers are missing.
    """

    def __init__(self, gpu: int | None = None, system: bool = False, process: bool = True):
        self.system, self.process, self.note = system, process, None
        self._nvml = self._handle = None
        self.name = "cpu"
        if gpu is not None:
            self._nvml, self.note = load_nvml()
            if self._nvml is not None:
                self._handle = self._nvml.nvmlDeviceGetHandleByIndex(gpu)
                self.name = _text(self._nvml.nvmlDeviceGetName(self._handle))
        self._last = (time.perf_counter(), _cpu_seconds())
        self._last_sys = _system_cpu_ticks()

    @classmethod
    def for_device(cls, device: torch.device | str) -> Monitor:
        """The training loop's monitor: the GPU this process trains on, or just the process on CPU."""
        device = torch.device(device)
        return cls(nvml_index(device)) if device.type == "cuda" else cls()

    def sample(self) -> dict[str, float | None]:
        now, cpu = time.perf_counter(), _cpu_seconds()
        (then, cpu_then), self._last = self._last, (now, cpu)
        row: dict[str, float | None] = {}
        if self.process:
            row["cpu_percent"] = 100 * (cpu - cpu_then) / max(now - then, 1e-9)
            row["rss_gb"] = rss_bytes() / 1e9
        if self._handle is not None:
            row.update(self._gpu())
        if self.system:
            row.update(self._system())
        return row

    def _gpu(self) -> dict[str, float | None]:
        nvml, h = self._nvml, self._handle

        def read(fn, *args):
            try:
                return fn(h, *args)
            except nvml.NVMLError:  # e.g. power or utilisation on a MIG slice: "Not Supported"
                return None

        util, mem = read(nvml.nvmlDeviceGetUtilizationRates), read(nvml.nvmlDeviceGetMemoryInfo)
        power, temp = read(nvml.nvmlDeviceGetPowerUsage), read(nvml.nvmlDeviceGetTemperature, nvml.NVML_TEMPERATURE_GPU)
        return {"gpu_util": None if util is None else float(util.gpu),
                "gpu_mem_used_gb": None if mem is None else mem.used / 1e9,
                "gpu_mem_total_gb": None if mem is None else mem.total / 1e9,
                "gpu_power_w": None if power is None else power / 1000,  # NVML reports milliwatts
                "gpu_temp_c": None if temp is None else float(temp)}

    def _system(self) -> dict[str, float | None]:
        ticks, last, self._last_sys = _system_cpu_ticks(), self._last_sys, _system_cpu_ticks()
        busy = None
        if ticks is not None and last is not None and ticks[1] > last[1]:
            busy = 100 * (ticks[0] - last[0]) / (ticks[1] - last[1])
        mem = _meminfo()
        total, avail = mem.get("MemTotal"), mem.get("MemAvailable")
        used = None if total is None or avail is None else (total - avail) / 1e9
        return {"sys_cpu_percent": busy, "ram_used_gb": used, "ram_total_gb": None if total is None else total / 1e9}


def monitors() -> tuple[list[Monitor], str | None]:
    """`camelid monitor`'s view: one Monitor per GPU of the machine (NVML numbering), else one of the machine's
    CPU and RAM; plus a note when a GPU is there but NVML is not."""
    nvml, note = load_nvml()
    count = nvml.nvmlDeviceGetCount() if nvml is not None else 0
    if count:
        return [Monitor(i, process=False) for i in range(count)], None
    return [Monitor(system=True, process=False)], note if torch.cuda.is_available() else None


def format_sample(name: str, row: dict) -> str:
    """One line of `camelid monitor`."""
    def num(key: str, fmt: str) -> str:
        return "-" if row.get(key) is None else format(row[key], fmt)

    if "gpu_util" in row:
        return (f"{name}: util {num('gpu_util', '.0f')}% | mem {num('gpu_mem_used_gb', '.1f')}/"
                f"{num('gpu_mem_total_gb', '.1f')} GB | {num('gpu_power_w', '.0f')} W | {num('gpu_temp_c', '.0f')} C")
    return (f"{name}: CPU {num('sys_cpu_percent', '.0f')}% of {os.cpu_count()} cores | RAM "
            f"{num('ram_used_gb', '.1f')}/{num('ram_total_gb', '.1f')} GB")


# ---- decode bandwidth ----------------------------------------------------------------------------------------------

def weight_bytes(model: nn.Module) -> int:
    """Bytes of weights one decode step reads: every tensor of the state dict once (parameters and persistent
    buffers, so a quantized layer counts its codes and scales; a tied tensor counts once), less the input embedding
    table unless it is tied to lm_head (a lookup reads B rows of it, not the table; a tied table is read whole by
    lm_head). Constant for a model: compute it once, not on every step."""
    tensors = {id(t): t for t in model.state_dict(keep_vars=True).values()}  # keep_vars: the tensors themselves
    weights = sum(t.numel() * t.element_size() for t in tensors.values())
    embed = _input_embeddings(model)
    if embed is not None and not model.config.tie_word_embeddings:
        weights -= embed.numel() * embed.element_size()
    return weights


def kv_cache_bytes(config: ModelConfig, batch: int, context: int, kv_dtype: torch.dtype) -> int:
    """Bytes of the keys and values `batch` sequences of `context` cached tokens each attend to:
    2 (k, v) x L x kv_size x context x B x bytes per element."""
    element = torch.empty((), dtype=kv_dtype).element_size()
    return 2 * config.num_hidden_layers * config.kv_size * context * batch * element


def decode_bytes_per_step(model: nn.Module, batch: int, context: int, kv_dtype: torch.dtype | None = None
                          ) -> dict[str, int]:
    """Bytes one decode step reads from memory: every weight once (the step is a matrix-vector product per
    sequence, so the weights are read once for the whole batch; `weight_bytes`), and every sequence's KV cache
    (`kv_cache_bytes`). `context` is the number of cached tokens each sequence attends to (the mean over a decode
    is fine); `kv_dtype` defaults to the embedding table's dtype (that of the hidden states, as generate.py's
    KVCache)."""
    weights = weight_bytes(model)
    if kv_dtype is None:
        embed = _input_embeddings(model)
        kv_dtype = (embed if embed is not None else next(model.parameters())).dtype
    kv = kv_cache_bytes(model.config, batch, context, kv_dtype)
    return {"weights": weights, "kv_cache": kv, "total": weights + kv}


def _input_embeddings(model: nn.Module) -> torch.Tensor | None:
    """The input embedding table (`model.embed_tokens.weight`), or None for a model without one."""
    try:
        return model.get_submodule("model.embed_tokens").weight
    except AttributeError:
        return None


def decode_bandwidth(model: nn.Module, tokens_per_s: float, batch: int, context: int,
                     kv_dtype: torch.dtype | None = None) -> float:
    """Achieved memory bandwidth of a decode in bytes/s: bytes per step x steps per second, where one step makes
    one token for each of the `batch` sequences (steps/s = tokens_per_s / batch). Compare with the card's peak
    (e.g. 3.35e12 for an H100 SXM) to see how close to memory-bound a decode runs."""
    if tokens_per_s < 0 or batch < 1 or context < 0:
        raise ValueError(f"need tokens_per_s >= 0, batch >= 1, context >= 0; got {tokens_per_s}, {batch}, {context}")
    return decode_bytes_per_step(model, batch, context, kv_dtype)["total"] * tokens_per_s / batch


# ---- profiler ------------------------------------------------------------------------------------------------------

def step_profiler(out: Path, active: int, wait: int = 1, warmup: int = 1) -> torch.profiler.profile:
    """A torch.profiler over training steps (call `.step()` after each): skips `wait` steps (allocations, lazy
    init), warms up for `warmup`, records `active`, then writes out/trace.json (open it in chrome://tracing or
    https://ui.perfetto.dev) and out/summary.txt (the top ops by self time). CUDA activity is recorded when a GPU
    is present."""
    out.mkdir(parents=True, exist_ok=True)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)

    def write(prof: torch.profiler.profile) -> None:
        prof.export_chrome_trace(str(out / "trace.json"))
        key = "self_cuda_time_total" if len(activities) > 1 else "self_cpu_time_total"
        (out / "summary.txt").write_text(prof.key_averages().table(sort_by=key, row_limit=25) + "\n")

    schedule = torch.profiler.schedule(wait=wait, warmup=warmup, active=active, repeat=1)
    return torch.profiler.profile(activities=activities, schedule=schedule, on_trace_ready=write, record_shapes=True)
