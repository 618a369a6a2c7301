"""The one training loop: pretraining uses it with the token-shard batch source, fine-tuning with its own.

One optimizer step:

    for micro in range(grad_accum):            forward under autocast, backward (gradient sync on the last only)
    unscale, clip (total grad norm)            fp16: GradScaler; bf16 and fp32 need none
    guard: skip or apply the update            a skipped step still advances the data
    optimizer.step, zero_grad

Loss normalisation: each micro-batch's summed token cross-entropy is divided by the number of target tokens in the
whole step (every micro-batch, every rank), so micro_batch 4 x grad_accum 1, 1 x 4 and 2 ranks x 2 all compute the
same gradient. The step number is the whole data cursor (see PretrainBatches) and the schedule is a pure function
of it, so resuming from a checkpoint continues bit for bit.
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import nn

from camelid.generate import generate
from camelid.monitor import Monitor, step_profiler
from camelid.tokenizer import Tokenizer
from camelid.train import distributed, pretrain
from camelid.train.compile import compile_for_training
from camelid.train.config import TrainConfig
from camelid.train.gns import NoiseScale, grad_sq_norm
from camelid.train.guard import SpikeGuard
from camelid.train.loss import count_targets, loss_fn
from camelid.train.metrics import RunLog, flops_per_token, memory_gb, peak_flops
from camelid.train.optim import build_optimizer, lr_at
from camelid.train.state import (latest_checkpoint, list_checkpoints, load_checkpoint, prune, read_trainer,
                                 remove_partial, save_checkpoint, save_final)

Batch = dict[str, torch.Tensor]
PROFILE_SKIPPED = 2  # steps of a session the profiler waits and warms up on (monitor.step_profiler) before recording
LossHook = Callable[[int, torch.Tensor], torch.Tensor]  # (step, micro-batch loss) -> loss; tests inject NaN / spikes


class BatchSource(Protocol):
    def batch(self, step: int, micro: int, rank: int, world: int) -> Batch:
        """input_ids (B, T) long, labels (B, T) long with -100 = ignore; optionally attention_mask, position_ids.
        Must depend on (step, micro, rank, world) only: that is what makes resume exact."""

    def eval_batches(self) -> Iterable[Batch]:
        """The whole eval set, the same on every rank: the loop splits it over the ranks."""


@dataclass
class TrainResult:
    step: int
    tokens_seen: int
    lr_scale: float
    best_val_loss: float | None
    out: Path
    final_dir: Path | None
    losses: dict[int, float] = field(default_factory=dict)  # step -> loss, for the steps this call ran
    events: list[dict] = field(default_factory=list)


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    return precision


def train(cfg: TrainConfig, model: nn.Module | None = None, batches: BatchSource | None = None,
          tokenizer: Tokenizer | None = None, loss_hook: LossHook | None = None,
          fixed_settings: dict | None = None) -> TrainResult:
    """Train `model` on `batches` as `cfg` says. Without a model or batch source, pretraining builds them from
    cfg.model (preset or folder) and cfg.data (prepared token shards). Under torchrun, every process calls this.
    `fixed_settings`: what else defines the run (fine-tuning's method, its options, the template, the data mix),
    saved with the config in each checkpoint and, like FIXED_ON_RESUME, refused on --resume when changed."""
    cfg.validate()
    owns_group = not torch.distributed.is_initialized()
    rank, world, device = distributed.setup(cfg.device)
    try:
        return Trainer(cfg, rank, world, device, model, batches, tokenizer, loss_hook, fixed_settings).run()
    finally:
        if owns_group:
            gc.collect()  # the trainer's FSDP / DDP state (held in reference cycles) goes while its group still lives
            distributed.teardown()


# what a resumed run must keep: they decide the model, each step's data windows, or what the optimizer state means.
# The global batch (micro_batch x grad_accum x processes) must stay too; its split, max_steps, lr and the rest may
# change (the run notes what did).
FIXED_ON_RESUME = ("model", "model_overrides", "seq_len", "seed", "optimizer")


def check_resumable(checkpoint: Path, trainer: dict, cfg: TrainConfig, world: int,
                    fixed_settings: dict | None = None) -> None:
    """Refuse, in one line naming the old and new values, a resume that could not continue the checkpoint's run
    (`trainer`: the checkpoint's trainer.json; `fixed_settings`: as for `train`, in JSON types)."""
    if trainer["step"] > cfg.max_steps:  # nothing would run, and final/ would hold the later step
        raise ValueError(f"--resume: {checkpoint.name} is at step {trainer['step']}, past max_steps "
                         f"{cfg.max_steps}; raise --max-steps to continue that run, or start a new run in another "
                         "--out for a shorter one")
    old = trainer.get("config")
    if not old:  # a checkpoint from before configs were saved in it
        return
    fixed_settings = fixed_settings or {}
    new = {**cfg.to_dict(), **fixed_settings}
    # a setting the checkpoint lacks (written before it was saved, or by another method) is not compared
    fixed = [k for k in (*FIXED_ON_RESUME, *fixed_settings) if k in old and not same_setting(old[k], new[k])]
    if fixed:
        diff = ", ".join(f"{k} {old[k]!r} -> {new[k]!r}" for k in fixed)
        raise ValueError(f"--resume: {diff} since {checkpoint.name}, which would not continue that run; set "
                         f"{'it' if len(fixed) == 1 else 'them'} back, or start a new run in another --out")
    old_world = trainer.get("world", 1)
    old_batch, new_batch = old["micro_batch"] * old["grad_accum"] * old_world, cfg.micro_batch * cfg.grad_accum * world
    if old_batch != new_batch:
        raise ValueError(f"--resume: the global batch was {old['micro_batch']} x {old['grad_accum']} x {old_world} "
                         f"process(es) = {old_batch} sequences per step at {checkpoint.name}, now {cfg.micro_batch} x "
                         f"{cfg.grad_accum} x {world} = {new_batch}, so each step would draw other data; keep "
                         f"micro_batch x grad_accum x processes = {old_batch}")


def same_setting(old, new) -> bool:
    """Equal values, or two spellings of one existing path (./tiny and tiny, or an absolute path)."""
    if old == new:
        return True
    return isinstance(old, str) and isinstance(new, str) and Path(old).exists() and Path(new).exists() \
        and Path(old).resolve() == Path(new).resolve()


class Trainer:
    def __init__(self, cfg: TrainConfig, rank: int, world: int, device: torch.device, model: nn.Module | None,
                 batches: BatchSource | None, tokenizer: Tokenizer | None, loss_hook: LossHook | None,
                 fixed_settings: dict | None = None):
        self.cfg, self.rank, self.world, self.device = cfg, rank, world, device
        # JSON types, as trainer.json gives them back: a tuple compares equal to the list it is saved as
        self.fixed_settings = json.loads(json.dumps(fixed_settings or {}))
        self.out = Path(cfg.out)
        self.ckpt_root = self.out / "checkpoints"
        if list_checkpoints(self.ckpt_root) and not cfg.resume:
            raise ValueError(f"{self.out} already holds checkpoints: pass --resume to continue that run, "
                             "or choose another --out")
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)

        notes: list[str] = []
        if cfg.auto_fit:  # before anything is sized by micro_batch
            if batches is not None:
                raise ValueError("auto_fit chooses micro_batch before the batch source is built: call "
                                 "train/config.py's auto_fit first when passing your own batches")
            given = distributed.unwrap(model) if model is not None else None
            cfg, note = pretrain.auto_fit_config(cfg, given, device, resolve_precision(cfg.precision, device))
            self.cfg = cfg
            notes.append(note)
        if model is None or batches is None:  # pretraining: everything is checked here, before any step
            given = distributed.unwrap(model) if model is not None else None
            built, batches, tokenizer, setup_notes = pretrain.setup(cfg, given, tokenizer, world)
            notes += setup_notes
            model = model if model is not None else built
        self.batches, self.tokenizer, self.loss_hook = batches, tokenizer, loss_hook
        self.precision = resolve_precision(cfg.precision, device)

        self.raw = distributed.unwrap(model)  # what is saved and sampled from: plain parameter names
        if tokenizer is not None and cfg.sample_every and hasattr(self.raw, "config"):
            prompt_len = len(tokenizer.encode(cfg.sample_prompt))
            if prompt_len >= self.raw.config.max_position_embeddings:
                raise ValueError(f"sample_prompt is {prompt_len} tokens, as long as the model's context: shorten it")
        if self.raw is model:  # ours to place and wrap; a model passed in already wrapped is used as it is
            if self.precision == "bf16-true":  # before the optimizer exists: its states follow the weights' dtype
                self.raw.to(torch.bfloat16)
            if cfg.activation_checkpointing:
                self.raw.set_activation_checkpointing(True)
            model = distributed.wrap(self.raw, cfg.strategy, device, self.precision)  # moves it to the device
        self.sync_target = model  # the DDP / FSDP module that owns gradient sync
        # FSDP2 shards in place: self.raw is then the sharded module, and saving, loading, the final folder and
        # sampling become collective (every rank takes part). Checkpoints of fsdp / zero2 runs are DCP folders
        # even in one process, so that any of them can resume on another number of processes.
        self.sharded = distributed.is_sharded(self.raw)
        self.dcp_checkpoints = self.sharded or cfg.strategy in distributed.SHARDED
        if cfg.measure_gns and self.sharded:
            raise ValueError("measure_gns needs whole per-micro-batch gradients: use strategy ddp, not fsdp / zero2")
        self.gns = NoiseScale() if cfg.measure_gns else None
        # what the training step calls
        self.model = compile_for_training(model, cfg.activation_memory_budget) if cfg.compile else model
        self.optimizer = build_optimizer(self.raw, cfg, device)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.precision == "fp16")
        self.guard = SpikeGuard(cfg.spike_sigma, cfg.spike_window, cfg.spike_min_history,
                                cfg.max_spikes_before_rollback)
        self.flops_per_token = flops_per_token(self.raw.config, cfg.seq_len) if hasattr(self.raw, "config") else None
        self.peak = peak_flops(device)
        self.monitor = Monitor.for_device(device) if rank == 0 else None  # GPU util / power, or CPU % and RSS

        self.step, self.tokens_seen, self.lr_scale = 0, 0, 1.0
        self.best_val_loss: float | None = None
        self.elapsed_before = 0.0  # seconds spent in earlier sessions of a resumed run
        self.losses: dict[int, float] = {}
        self.events: list[dict] = []
        self.log = RunLog(self.out, enabled=rank == 0, tensorboard=cfg.tensorboard, log_every=cfg.log_every)
        if self.monitor is not None and self.monitor.note:
            notes.append(self.monitor.note)
        for note in notes:
            self.log.note(note)
        self.log.note(f"precision {self.precision} on {device}, {world} process(es)"
                      + (f" ({cfg.strategy})" if world > 1 else "") + ", "
                      f"{sum(p.numel() for p in self.raw.parameters()) / 1e6:.2f} M parameters, global batch "
                      f"{cfg.micro_batch * cfg.grad_accum * world} x {cfg.seq_len} tokens")
        if rank == 0:
            remove_partial(self.ckpt_root)
        distributed.barrier()
        self._resume()

    # ---- resume -------------------------------------------------------------------------------------------------
    def settings(self) -> dict:
        """What a checkpoint records of the run, and what a resume compares: the config and the fixed settings."""
        return {**self.cfg.to_dict(), **self.fixed_settings}

    def _resume(self) -> None:
        latest = latest_checkpoint(self.ckpt_root) if self.cfg.resume else None
        if latest is None:
            if self.cfg.resume:
                self.log.note(f"--resume: no checkpoint in {self.ckpt_root}, starting from scratch")
            self.log.truncate_after(0)
            return
        check_resumable(latest, read_trainer(latest), self.cfg, self.world, self.fixed_settings)  # before any load
        trainer = load_checkpoint(latest, self.raw, self.optimizer, self.scaler, self.guard, rng=True)
        self.step, self.tokens_seen, self.lr_scale = trainer["step"], trainer["tokens_seen"], trainer["lr_scale"]
        self.best_val_loss, self.elapsed_before = trainer["best_val_loss"], trainer["elapsed"]
        self.log.truncate_after(self.step)
        self.log.note(f"resumed from {latest} (step {self.step}, {self.tokens_seen:,} tokens)")
        old, new = trainer.get("config", {}), self.settings()
        changed = sorted(k for k in new if k != "resume" and k in old and old[k] != new[k])
        if changed:
            diff = ", ".join(f"{k} {old[k]!r} -> {new[k]!r}" for k in changed)
            self.log.note(f"changed since the checkpoint: {diff}")

    # ---- the loop -----------------------------------------------------------------------------------------------
    def run(self) -> TrainResult:
        cfg = self.cfg
        self.start_time = time.perf_counter()
        self.log.start(self.step, cfg.max_steps)
        # rank 0 profiles steps 3 .. 2 + profile_steps of this session (the first ones allocate and warm up)
        profiler = None
        if cfg.profile_steps and self.rank == 0:
            to_go = cfg.max_steps - self.step
            recorded = min(cfg.profile_steps, to_go - PROFILE_SKIPPED)
            if recorded <= 0:  # the profiler would write a trace of its warm-up step alone
                self.log.note(f"profiler: the run has {to_go} step(s) to go, fewer than the {PROFILE_SKIPPED + 1} "
                              f"a trace needs (recording starts at the third): no trace; raise --max-steps")
            else:
                if recorded < cfg.profile_steps:
                    self.log.note(f"profiler: {recorded} of the {cfg.profile_steps} steps asked for will be "
                                  f"recorded (the run has {to_go} step(s) to go)")
                profiler = step_profiler(self.out / "profile", cfg.profile_steps)
        try:
            with profiler if profiler is not None else contextlib.nullcontext():
                self._steps(profiler)
        finally:
            self.log.close()
        if profiler is not None:
            trace = self.out / "profile" / "trace.json"
            self.log.note(f"profiler trace: {trace} (open in https://ui.perfetto.dev)" if trace.is_file() else
                          "profiler: the run ended before a step was recorded (recording starts at step 3)")
        final = save_final(self.out / "final", self.raw, self.tokenizer, self.rank,  # None on ranks > 0
                           base=str(self.cfg.model))
        if final is not None:
            self.log.note(f"final model: {final}")
        distributed.barrier()
        return TrainResult(self.step, self.tokens_seen, self.lr_scale, self.best_val_loss, self.out, final,
                           self.losses, self.events)

    def _steps(self, profiler: torch.profiler.profile | None) -> None:
        cfg = self.cfg
        while self.step < cfg.max_steps:
            self.step += 1
            self.train_step(self.step)
            last = self.step == cfg.max_steps
            val_loss = self.evaluate() if last or (cfg.eval_every and self.step % cfg.eval_every == 0) else None
            if cfg.sample_every and (last or self.step % cfg.sample_every == 0):
                self.sample()
            if last or (cfg.save_every and self.step % cfg.save_every == 0):
                self.save(val_loss)
            if profiler is not None:
                profiler.step()

    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16-true autocasts too: a no-op over bf16 weights, and it keeps fp32 leftovers (QLoRA adapters over NF4
        weights keep their dtype) working."""
        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.float16 if self.precision == "fp16" else torch.bfloat16
        return torch.autocast(self.device.type, dtype=dtype)

    def _fetch(self, step: int) -> list[Batch]:
        micro = [self.batches.batch(step, m, self.rank, self.world) for m in range(self.cfg.grad_accum)]
        return [{k: v.to(self.device, non_blocking=True) for k, v in b.items()} for b in micro]

    def train_step(self, step: int) -> None:
        cfg, t0 = self.cfg, time.perf_counter()
        lr = lr_at(step, cfg) * self.lr_scale
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        micro = self._fetch(step)
        # one all_reduce for both counts: target tokens normalise the loss, input tokens measure throughput
        counts = torch.tensor([sum(count_targets(b) for b in micro), sum(b["input_ids"].numel() for b in micro)],
                              dtype=torch.float64, device=self.device)
        n_targets, n_inputs = (int(c) for c in distributed.all_reduce_sum(counts).tolist())
        # DDP / FSDP average gradients over ranks; * world turns that average back into the global sum / n_targets
        scale = self.world / max(n_targets, 1)

        self.model.train()
        total = torch.zeros((), device=self.device)
        for m, batch in enumerate(micro):
            with distributed.sync_gradients(self.sync_target, m == len(micro) - 1):
                with self.autocast():
                    loss = loss_fn(self.model, batch) * scale
                if self.loss_hook is not None:
                    loss = self.loss_hook(step, loss)
                self.scaler.scale(loss).backward()
            total += loss.detach()
            if self.gns is not None and m == 0:  # the gradient so far is micro-batch 0's alone (not yet synced)
                small_targets = max(count_targets(batch), 1)
                # grad = (sum of its token gradients) * world / n_targets: rescale to the mean over its own tokens
                g_small_sq = grad_sq_norm(self.raw.parameters()) / self.scaler.get_scale() ** 2 \
                    * (n_targets / (self.world * small_targets)) ** 2

        self.scaler.unscale_(self.optimizer)  # no-op unless fp16
        max_norm = cfg.grad_clip if cfg.grad_clip > 0 else math.inf
        # sharded (DTensor) gradients: the norm is a replicated DTensor of the global norm, over every rank's shards
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.raw.parameters(), max_norm, foreach=True))
        loss_value = float(distributed.all_reduce_sum(total)) / self.world  # the step's mean token loss
        overflow = self.scaler.is_enabled() and math.isfinite(loss_value) and not math.isfinite(grad_norm)
        reason = None if overflow else self.guard.check(loss_value, grad_norm)
        if overflow or reason:
            self.scaler.update()  # fp16 overflow: lowers the loss scale; the step was never applied
        else:
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.guard.accept(loss_value)
        self.optimizer.zero_grad(set_to_none=True)

        self.tokens_seen += n_inputs
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # honest step times (loss_value already waited for the forward)
        dt = max(time.perf_counter() - t0, 1e-9)
        row = {"step": step, "loss": loss_value, "lr": lr, "grad_norm": grad_norm, "tokens": self.tokens_seen,
               "tokens_per_s": n_inputs / dt, "mem": memory_gb(self.device),
               "time": self.elapsed_before + time.perf_counter() - self.start_time}
        if self.monitor is not None:
            row.update(self.monitor.sample())
        if self.peak is not None and self.flops_per_token is not None:
            row["mfu"] = self.flops_per_token * n_inputs / dt / (self.peak * self.world)
        if self.gns is not None and math.isfinite(grad_norm) and n_targets > small_targets:
            # the step's gradient (pre-clipping norm) is the mean over all n_targets tokens: B_big = n_targets
            gns = self.gns.update(g_small_sq, grad_norm**2, small_targets, n_targets)
            if gns is not None:  # in tokens; the critical batch in sequences of this run's length
                row["gns"] = gns
                row["critical_batch"] = gns * cfg.micro_batch * cfg.grad_accum * self.world / n_targets
        if overflow or reason:
            row["skipped"] = True
        self.losses[step] = loss_value
        self.log.step(row)
        if overflow:
            self._event(step, "fp16_overflow", "non-finite fp16 gradients: step skipped, loss scale lowered to "
                                               f"{self.scaler.get_scale():g}")
        elif reason:
            self._event(step, "skip", f"update skipped: {reason}", loss=loss_value, grad_norm=grad_norm)
            if self.guard.skip(step):
                self.rollback(step)

    def _event(self, step: int, kind: str, message: str, **data) -> None:
        self.events.append({"step": step, "event": kind, "message": message, **data})
        self.log.event(step, kind, message, **data)

    def rollback(self, step: int) -> None:
        """Repeated skips: the weights have drifted somewhere bad. Reload the last checkpoint's model, optimizer and
        guard, lower the learning rate, and carry on from this step, so the data that led here is not replayed."""
        cfg = self.cfg
        self.lr_scale *= cfg.rollback_lr_factor
        distributed.barrier()  # rank 0 may still be writing the checkpoint we are about to read
        latest = latest_checkpoint(self.ckpt_root)
        if latest is None:
            message = f"{cfg.max_spikes_before_rollback} skips, no checkpoint to roll back to yet: lr scale now "
        else:
            load_checkpoint(latest, self.raw, self.optimizer, guard=self.guard)
            message = (f"{cfg.max_spikes_before_rollback} skips within {cfg.spike_window} steps: reloaded "
                       f"{latest.name}, lr scale now ")
        self.guard.skips.clear()
        self._event(step, "rollback", message + f"{self.lr_scale:g}", checkpoint=latest.name if latest else None,
                    lr_scale=self.lr_scale)

    # ---- eval, samples, checkpoints -----------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Mean token loss over the batch source's eval batches, split over the ranks (batch i on rank i % world):
        the (loss sum, targets) pair is summed over ranks, so the number is the one a single process computes.
        Under DDP a rank runs its share on the plain module (a DDP forward broadcasts buffers: a collective). Under
        FSDP every forward is collective, so a rank one batch short runs one more forward and drops its result."""
        model = self.model if self.sharded or self.world == 1 else self.raw
        model.eval()
        total = torch.zeros(2, dtype=torch.float64, device=self.device)  # (loss sum, targets)
        n, first = 0, None  # every rank walks the whole list, so all know n
        for i, batch in enumerate(self.batches.eval_batches()):
            n, first = i + 1, first or batch
            if i % self.world != self.rank:
                continue
            batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
            with self.autocast():
                total[0] += loss_fn(model, batch).double()
            total[1] += count_targets(batch)
        if self.sharded and len(range(self.rank, n, self.world)) < len(range(0, n, self.world)):
            with self.autocast():  # the all-gathers of the forwards the other ranks run; the loss is dropped
                loss_fn(model, {k: v.to(self.device) for k, v in first.items()})
        model.train()
        distributed.all_reduce_sum(total)
        if total[1] == 0:
            return None
        val_loss = float(total[0] / total[1])
        if self.best_val_loss is None or val_loss < self.best_val_loss:
            self.best_val_loss = val_loss
        self.log.eval(self.step, val_loss)
        return val_loss

    def sample(self) -> None:
        """A greedy completion, logged by rank 0. Unsharded, rank 0 alone generates from its full copy of the
        weights. Sharded, every rank runs the decode (each forward's all-gathers need every rank), and each forward
        hands all ranks rank 0's logits, so they pick the same tokens and stop together. Autocast: under bf16 the
        gathered weights are bf16, the KV cache as well."""
        if (self.rank != 0 and not self.sharded) or self.tokenizer is None or not hasattr(self.raw, "config"):
            return
        self.raw.eval()
        with self.autocast(), distributed.rank0_outputs(self.raw) if self.sharded else contextlib.nullcontext():
            text = generate(self.raw, self.tokenizer, self.cfg.sample_prompt, self.cfg.sample_tokens)
        self.raw.train()
        self.log.sample(self.step, self.cfg.sample_prompt, text)

    def save(self, val_loss: float | None) -> None:
        if self.rank == 0 or self.dcp_checkpoints:  # a DCP save is collective: each rank writes its shards
            trainer = {"tokens_seen": self.tokens_seen, "lr_scale": self.lr_scale, "val_loss": val_loss,
                       "best_val_loss": self.best_val_loss, "world": self.world,
                       "elapsed": self.elapsed_before + time.perf_counter() - self.start_time,
                       "config": self.settings()}
            path = save_checkpoint(self.ckpt_root, self.step, self.raw, self.optimizer, self.scaler, self.guard,
                                   trainer, self.tokenizer, sharded=self.dcp_checkpoints, rank=self.rank)
        if self.rank == 0:
            deleted = prune(self.ckpt_root, self.cfg.keep_last)
            self.log.note(f"saved {path}" + (f" (removed {', '.join(p.name for p in deleted)})" if deleted else ""))
        distributed.barrier()
