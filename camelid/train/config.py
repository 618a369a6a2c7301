"""TrainConfig: every knob of a training run, with a default, readable from YAML and overridable from the CLI.

Unknown keys are errors that name the closest valid key, raised before anything is built: a typo such as
`warmup_step: 2000` must not silently train with the default warmup.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from camelid.config import ConfigError, ModelConfig
from camelid.plan.fit import CONTEXT_BYTES, fit_training, parse_memory, size_text
from camelid.train.compile import DEFAULT_ACTIVATION_MEMORY_BUDGET, check_budget

OPTIMIZERS = ("adamw", "lion", "adamw8bit", "paged_adamw8bit")  # the 8-bit two: CUDA only (optim.py)
PRECISIONS = ("auto", "fp32", "bf16", "fp16", "bf16-true")
STRATEGIES = ("none", "ddp", "fsdp", "zero2")  # see camelid/train/distributed.py


@dataclass
class TrainConfig:
    # what to train, on what, and where to write
    model: str = "tiny"  # a preset name (random init) or a Hugging Face-style model folder
    model_overrides: dict[str, Any] = field(default_factory=dict)  # ModelConfig fields changed on a preset
    tokenizer: str | None = None  # saved next to checkpoints; default: the model folder's, else the data folder's
    data: str = "data"  # a folder written by `camelid data prepare`
    out: str = "out"
    # batch: micro_batch * grad_accum * world sequences of seq_len tokens per optimizer step
    max_steps: int = 1000
    micro_batch: int = 8
    grad_accum: int = 1
    seq_len: int = 256
    # optimizer and schedule: linear warmup to lr, cosine decay to lr * min_lr_ratio at max_steps
    optimizer: str = "adamw"
    lr: float = 3e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global grad norm; 0 = no clipping (the norm is still logged)
    # speed and memory
    # bf16 / fp16: fp32 master weights, matmuls under autocast (mixed precision); bf16-true: the weights, gradients
    # and optimizer states themselves in bf16 (half the memory of the static state, litgpt's "bf16-true");
    # auto = bf16 on a GPU that has it, else fp32
    precision: str = "auto"
    compile: bool = False
    # torch.compile only: how much of what the forward keeps for backward the partitioner may drop and recompute
    # (camelid/train/compile.py); 0.9 recomputes norm outputs and the gated product, never a matmul; 1 = torch's cut
    activation_memory_budget: float = DEFAULT_ACTIVATION_MEMORY_BUDGET
    activation_checkpointing: bool = False
    measure_gns: bool = False  # log the gradient noise scale (gns.py) and a critical batch; needs grad_accum >= 2
    profile_steps: int = 0  # > 0: a torch.profiler trace of this many steps (after 2) in out/profile/trace.json
    # auto_fit: choose micro_batch, grad_accum and activation_checkpointing with camelid.plan.fit (method "full"),
    # keeping micro_batch * grad_accum sequences per step; device_memory e.g. "24GB" (default: the GPU's own)
    auto_fit: bool = False
    device_memory: str | None = None
    device: str = "auto"  # auto = cuda when present (cuda:LOCAL_RANK under torchrun), else cpu
    strategy: str = "ddp"  # how to wrap the model when WORLD_SIZE > 1: none, ddp, fsdp (ZeRO-3), zero2
    # evaluation, samples, checkpoints, logs
    eval_every: int = 200  # 0 = never (a final eval still runs when there is a validation split)
    eval_batches: int = 20
    sample_every: int = 500  # greedy completion of sample_prompt every N steps and at the end; 0 = never
    sample_prompt: str = "Once upon a time"
    sample_tokens: int = 32
    save_every: int = 500  # 0 = only at the end
    keep_last: int = 3  # checkpoints kept besides the best one (by val loss)
    seed: int = 0
    resume: bool = False
    log_every: int = 10  # console lines; metrics.jsonl gets every step
    tensorboard: bool = True  # when the tensorboard package is installed
    # stability guard (see guard.py): skip bad updates, roll back after repeated ones
    spike_sigma: float = 6.0  # 0 = only non-finite losses / grad norms are skipped
    spike_window: int = 50
    spike_min_history: int = 20
    max_spikes_before_rollback: int = 3
    rollback_lr_factor: float = 0.5

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)
        self.validate()

    def validate(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(msg)

        for name in ("max_steps", "micro_batch", "grad_accum", "seq_len", "keep_last", "log_every", "spike_window",
                     "spike_min_history", "max_spikes_before_rollback", "sample_tokens"):
            need(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "eval_every", "eval_batches", "sample_every", "save_every", "seed",
                     "weight_decay", "grad_clip", "spike_sigma", "profile_steps"):
            need(getattr(self, name) >= 0, f"{name} must be >= 0, got {getattr(self, name)}")
        # an infinite lr, eps or weight decay trains on, every weight turning NaN
        need(0 < self.lr < math.inf, f"lr must be > 0 and finite, got {self.lr}")
        need(self.weight_decay < math.inf, f"weight_decay must be finite, got {self.weight_decay}")
        need(0 <= self.min_lr_ratio <= 1, f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        need(0 < self.eps < math.inf, f"eps must be > 0 and finite, got {self.eps}")
        need(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
             f"betas must be two numbers in [0, 1), got {list(self.betas)}")
        need(self.optimizer in OPTIMIZERS, f"unknown optimizer {self.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
        need(self.precision in PRECISIONS,
             f"unknown precision {self.precision!r}; choose one of {', '.join(PRECISIONS)}")
        need(self.strategy in STRATEGIES, f"unknown strategy {self.strategy!r}; choose one of {', '.join(STRATEGIES)}")
        need(not (self.strategy in ("fsdp", "zero2") and self.precision == "fp16"),
             f"strategy {self.strategy} trains in bf16 or fp32, not fp16 (the fp16 loss scaler would see only "
             "each rank's gradient shard); use precision bf16")
        need(not self.measure_gns or self.grad_accum >= 2,
             "measure_gns compares one micro-batch's gradient with the step's: it needs grad_accum >= 2")
        if self.device_memory is not None:
            parse_memory(self.device_memory)
        need(self.spike_min_history <= self.spike_window,
             f"spike_min_history ({self.spike_min_history}) must be <= spike_window ({self.spike_window})")
        check_budget(self.activation_memory_budget)
        need(0 < self.rollback_lr_factor <= 1, f"rollback_lr_factor must be in (0, 1], got {self.rollback_lr_factor}")
        need(isinstance(self.model_overrides, dict), "model_overrides must be a mapping of ModelConfig fields")
        check_keys(self.model_overrides, {f.name for f in dataclasses.fields(ModelConfig)}, "model_overrides key")

    @property
    def min_lr(self) -> float:
        return self.lr * self.min_lr_ratio

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """Build from plain values (YAML, JSON, CLI): unknown keys are errors, numbers written as strings
        (YAML reads `3e-4` as a string) are converted."""
        if not isinstance(values, dict):
            raise ConfigError(f"a training config is a mapping of keys to values, got {type(values).__name__}")
        hints = typing.get_type_hints(cls)
        check_keys(values, set(hints), "config key")
        return cls(**{k: coerce_value(k, v, hints[k]) for k, v in values.items()})

    @classmethod
    def from_yaml(cls, path: str | Path | None = None, **overrides: Any) -> TrainConfig:
        """The YAML file's values (none when path is None), then `overrides` on top (CLI flags)."""
        values: dict[str, Any] = {}
        if path is not None:
            values = read_yaml_mapping(path, "a training config")
            try:
                check_keys(values, set(typing.get_type_hints(cls)), "config key")
            except ConfigError as e:
                raise ConfigError(f"{path}: {e}") from None
        merged = {**values, **overrides}
        if "model_overrides" in values and "model_overrides" in overrides:  # the flags add to the file's, key by key
            merged["model_overrides"] = {**values["model_overrides"], **overrides["model_overrides"]}
        return cls.from_dict(merged)

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))  # plain JSON types: tuples become lists


def read_yaml_mapping(path: str | Path, what: str) -> dict[str, Any]:
    """A YAML file that must hold a mapping; every failure is one line naming the file."""
    import yaml  # only config files need it

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no config file at {path}")
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: {what} is a mapping of keys to values")
    return values


def auto_fit(cfg: TrainConfig, config: ModelConfig, device_bytes: float, precision: str,
             method: str = "full", cuda: bool = True) -> tuple[TrainConfig, str]:
    """cfg with micro_batch, grad_accum and activation_checkpointing chosen by camelid.plan.fit for training `config`
    with `method` (a camelid.plan.memory method) at cfg.seq_len on `device_bytes` per device, keeping
    micro_batch * grad_accum sequences per step; and a line saying what was chosen. `precision` is resolved (bf16,
    fp16 or fp32); `cuda`: the device keeps a CUDA context besides the tensors (a CPU does not). Raises when nothing
    fits."""
    per_step = cfg.micro_batch * cfg.grad_accum
    try:
        chosen = fit_training(config, device_bytes, seq=cfg.seq_len, global_batch=per_step, precision=precision,
                              optimizer=cfg.optimizer, method=method, compiled=cfg.compile,
                              context_bytes=CONTEXT_BYTES if cuda else 0)
    except ValueError as e:
        raise ValueError(f"--auto: {e}; lower seq_len or choose a smaller model") from None
    new = dataclasses.replace(cfg, micro_batch=chosen.micro_batch, grad_accum=chosen.grad_accum,
                              activation_checkpointing=chosen.checkpointing)
    note = (f"auto-fit for {size_text(device_bytes)} ({method}, {precision}, {cfg.optimizer}, seq {cfg.seq_len}): "
            f"micro_batch {chosen.micro_batch} x grad_accum {chosen.grad_accum}, activation checkpointing "
            f"{'on' if chosen.checkpointing else 'off'} (estimated {size_text(chosen.bytes_needed)} + margin; "
            f"was micro_batch {cfg.micro_batch} x grad_accum {cfg.grad_accum})")
    return new, note


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """`--set` values: ["eval_every=100", "betas=[0.9, 0.99]", "model_overrides.num_hidden_layers=4"] -> a dict.
    Values are read as YAML, so numbers, booleans and lists need no quoting."""
    if not pairs:
        return {}
    import yaml

    values: dict[str, Any] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--set expects KEY=VALUE, got {pair!r}")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            value = text
        if key.startswith("model_overrides."):
            values.setdefault("model_overrides", {})[key.removeprefix("model_overrides.")] = value
        else:
            values[key] = value
    return values


def check_keys(values: dict[str, Any], valid: set[str], what: str) -> None:
    for key in values:
        if key not in valid:
            close = difflib.get_close_matches(str(key), sorted(valid), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(sorted(valid))}"
            raise ConfigError(f"unknown {what} {key!r}{hint}")


def coerce_value(name: str, value: Any, kind: Any) -> Any:
    """value as the field's type, or a ValueError that names the field."""
    def bad() -> ValueError:
        return ValueError(f"{name} must be {getattr(kind, '__name__', kind)}, got {value!r}")

    optional = type(None) in typing.get_args(kind)
    if optional and value is None:
        return None
    if optional:
        kind = next(a for a in typing.get_args(kind) if a is not type(None))
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise bad()
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise bad()
        try:
            number = float(value) if isinstance(value, str) else value  # YAML reads 1e5 as the string "1e5"
        except ValueError:
            raise bad() from None
        if isinstance(number, float) and not number.is_integer():
            raise bad()
        return int(number)
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise bad()
        try:
            return float(value)
        except ValueError:
            raise bad() from None
    if kind is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise bad()
        return str(value)
    if typing.get_origin(kind) is tuple:
        if not isinstance(value, (list, tuple)):
            raise bad()
        return tuple(coerce_value(name, v, float) for v in value)
    if typing.get_origin(kind) is dict and not isinstance(value, dict):
        raise bad()
    return value
