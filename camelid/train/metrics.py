"""What a run reports: FLOPs and MFU, the metrics.jsonl file, TensorBoard, and the console (rich progress bar).

MFU (model FLOPs utilisation, PaLM appendix B) = achieved model FLOP/s / the hardware's peak FLOP/s, with

    FLOPs per token = 6 * N + 12 * n_layers * q_size * seq_len

N counts the weights that take part in a matmul for each token: every attention and MLP projection and the
lm_head (also when it is tied to the embeddings), but not the input embedding table (a lookup, no FLOPs), norms or
biases (negligible); a MoE layer counts its router and the top-k experts a token actually runs through. 6 = 2
(multiply + add) x 3 (forward, and backward's two matmuls). The second term is attention's QK^T and AV over the
context (q_size = heads x head_dim, the hidden size for most models), counted in full as PaLM does, not halved for
the causal mask. Activation checkpointing's recomputation is not counted: MFU measures useful work.
"""

from __future__ import annotations

import json
import math
import resource
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from camelid.config import ModelConfig
from camelid.files import atomic_write_text

# dense (no sparsity) bf16 tensor-core peaks, FLOP/s; first match of the name wins, so specific names go first
PEAK_FLOPS: list[tuple[str, float]] = [
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),  # SXM ("NVIDIA H100 80GB HBM3")
    ("H200", 989e12),  # also GH200
    ("B200", 2250e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("L40", 181e12),
    ("L4", 121e12),
    ("A10G", 70e12),
    ("A10", 125e12),
    ("V100", 125e12),  # fp16: V100 has no bf16
]


# camelid.monitor's per-step fields, also sent to TensorBoard
MONITOR_KEYS = ("gpu_util", "gpu_mem_used_gb", "gpu_power_w", "gpu_temp_c", "cpu_percent", "rss_gb")


def matmul_params(config: ModelConfig) -> int:
    """N of the FLOPs formula (see the module docstring)."""
    c = config
    attn = c.hidden_size * (c.q_size + 2 * c.kv_size) + c.q_size * c.hidden_size
    mlp = 3 * c.hidden_size * c.intermediate_size
    if c.num_local_experts:
        mlp = c.num_experts_per_tok * mlp + c.hidden_size * c.num_local_experts
    return c.num_hidden_layers * (attn + mlp) + c.vocab_size * c.hidden_size


def flops_per_token(config: ModelConfig, seq_len: int) -> int:
    """Training FLOPs (forward + backward) per token."""
    return 6 * matmul_params(config) + 12 * config.num_hidden_layers * config.q_size * seq_len


def peak_flops(device: torch.device) -> float | None:
    """bf16 peak FLOP/s of this device, or None when unknown (CPUs, unlisted GPUs): MFU is then not reported."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_FLOPS if key in name), None)


def memory_gb(device: torch.device) -> float:
    """Peak memory so far: the GPU's allocated bytes, or the process's resident set on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # Linux reports KiB


def _finite(value: Any) -> Any:
    # JSON has no NaN / Infinity: a bad value becomes null (the event row says what it was)
    return None if isinstance(value, float) and not math.isfinite(value) else value


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"no metrics.jsonl in {run_dir}: not a training run folder")
    return [row for _, row in _rows(path)]


def _rows(path: Path) -> list[tuple[str, dict]]:
    """(line, row) for every row of a metrics.jsonl. A last line that does not parse is the row a killed process was
    writing: it is dropped, so a crashed run still resumes and plots; a bad line elsewhere is an error."""
    lines = path.read_text(encoding="utf-8").split("\n")  # the last item is "" unless a row was cut off
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            if number < len(lines):
                raise ValueError(f"{path}:{number}: not a JSON row ({e})") from None
            continue
        if not isinstance(row, dict) or not isinstance(row.get("step"), int):  # plot and resume index rows by step
            raise ValueError(f"{path}:{number}: not a metrics row (a JSON object with a step): {line[:80]}")
        rows.append((line, row))
    return rows


class RunLog:
    """metrics.jsonl + TensorBoard + console for one process. Only rank 0 has enabled=True: the others call the
    same methods and nothing happens, so the loop has no `if rank == 0` around each log call."""

    def __init__(self, out: Path, enabled: bool = True, tensorboard: bool = True, log_every: int = 10):
        self.enabled, self.log_every = enabled, log_every
        self.console = Console(stderr=True, soft_wrap=True)  # log files: one line per message
        self.progress: Progress | None = None
        self._task = None
        self._file = None
        self._tb = None
        if not enabled:
            return
        out.mkdir(parents=True, exist_ok=True)
        self.path = out / "metrics.jsonl"
        self._file = open(self.path, "a", encoding="utf-8")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                self.note("tensorboard is not installed: logging to metrics.jsonl only (pip install tensorboard)")
            else:
                self._tb = SummaryWriter(str(out / "tensorboard"))

    # ---- rows ---------------------------------------------------------------------------------------------------
    def _write(self, row: dict) -> None:
        self._file.write(json.dumps({k: _finite(v) for k, v in row.items()}) + "\n")
        self._file.flush()

    def step(self, row: dict) -> None:
        """One optimizer step: step, loss, lr, grad_norm, tokens, tokens_per_s, mfu, mem, time, ..."""
        if not self.enabled:
            return
        self._write(row)
        step = row["step"]
        if self._tb is not None:
            for key in ("loss", "lr", "grad_norm", "tokens_per_s", "mfu", "mem", *MONITOR_KEYS):
                if row.get(key) is not None and math.isfinite(row[key]):
                    self._tb.add_scalar(f"train/{key}", row[key], step)
        stats = self._stats(row)
        if self.progress is not None:
            self.progress.update(self._task, completed=step, stats=stats)
        if step % self.log_every == 0:
            self.console.print(f"step {step}: {stats}", highlight=False)

    @staticmethod
    def _stats(row: dict) -> str:
        parts = [f"loss {row['loss']:.4f}" if row.get("loss") is not None else "loss -",
                 f"lr {row['lr']:.2e}", f"{row['tokens_per_s']:,.0f} tok/s"]
        if row.get("mfu") is not None:
            parts.append(f"MFU {100 * row['mfu']:.1f}%")
        mem = f"mem {row['mem']:.1f} GB"
        if row.get("gpu_mem_used_gb") is not None:  # camelid.monitor: the whole card, as nvidia-smi shows it
            mem += f" (card {row['gpu_mem_used_gb']:.1f}/{row['gpu_mem_total_gb']:.0f} GB"
            mem += f", util {row['gpu_util']:.0f}%)" if row.get("gpu_util") is not None else ")"
        elif row.get("rss_gb") is not None:
            mem += f" (RSS {row['rss_gb']:.2f} GB, CPU {row['cpu_percent']:.0f}%)"
        parts.append(mem)
        return " | ".join(parts)

    def eval(self, step: int, val_loss: float) -> None:
        if not self.enabled:
            return
        ppl = math.exp(min(val_loss, 80.0))  # exp overflows past ~709; a perplexity of e^80 says enough
        self._write({"step": step, "val_loss": val_loss, "val_ppl": ppl})
        if self._tb is not None:
            self._tb.add_scalar("val/loss", val_loss, step)
            self._tb.add_scalar("val/ppl", ppl, step)
        self.console.print(f"[bold]step {step}: val loss {val_loss:.4f}, ppl {ppl:.2f}[/]", highlight=False)

    def event(self, step: int, kind: str, message: str, **data: Any) -> None:
        """Something a person should see: a skipped update, a rollback, a note about the run's setup."""
        if not self.enabled:
            return
        self._write({"step": step, "event": kind, "message": message, **data})
        if self._tb is not None:
            self._tb.add_text(f"events/{kind}", message, step)
        self.console.print(f"[yellow]step {step}: {kind}: {message}[/]", highlight=False)

    def sample(self, step: int, prompt: str, text: str) -> None:
        if not self.enabled:
            return
        self._write({"step": step, "sample_prompt": prompt, "sample": text})
        if self._tb is not None:
            self._tb.add_text("samples", f"**{prompt}**{text}", step)
        self.console.print(f"[cyan]step {step} sample:[/] [bold]{prompt}[/]{text}", highlight=False, markup=True)

    def note(self, message: str) -> None:
        """Console only: setup information that is not a per-step metric."""
        if self.enabled:
            self.console.print(message, highlight=False, markup=False)

    def truncate_after(self, step: int) -> None:
        """On resume: drop rows of steps after the checkpoint; they are about to be run again."""
        if not self.enabled:
            return
        self._file.close()
        kept = [line for line, row in _rows(self.path) if row["step"] <= step]
        atomic_write_text(self.path, "".join(line + "\n" for line in kept))  # a crash must not lose the history
        self._file = open(self.path, "a", encoding="utf-8")
        if self._tb is not None:  # TensorBoard hides the earlier sessions' events from purge_step on
            from torch.utils.tensorboard import SummaryWriter

            self._tb.close()
            self._tb = SummaryWriter(self._tb.log_dir, purge_step=step + 1)

    # ---- progress bar -------------------------------------------------------------------------------------------
    def start(self, start_step: int, total: int) -> None:
        if not self.enabled:
            return
        self.progress = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[stats]}"), TimeRemainingColumn(), console=self.console)
        self.progress.start()
        self._task = self.progress.add_task("train", total=total, completed=start_step, stats="")

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._file is not None:
            self._file.close()
            self._file = None
