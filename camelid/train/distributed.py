"""The seam for multi-process training: process-group setup from torchrun's environment, model wrapping, and the
few collectives the loop needs. A single process (no WORLD_SIZE) runs every function here as a no-op.

    torchrun --nproc-per-node 8 -m camelid pretrain --model tinyllama-1.1b --data data/corpus --out out/tl

Strategies: "none" and "ddp" (DistributedDataParallel). FSDP2 (`fully_shard`) and torch.distributed.checkpoint
plug in here: the loop already treats the wrapped model only through `sync_gradients`, keeps the unwrapped module
for saving and sampling, and logs and saves on rank 0 only.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP


def setup(device: str = "auto") -> tuple[int, int, torch.device]:
    """(rank, world size, device) for this process; joins the process group when torchrun started several.

    gloo on CPU, nccl on CUDA. Each process takes the GPU of its LOCAL_RANK.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local_rank if world > 1 else torch.cuda.current_device())
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", rank=rank, world_size=world)
    return rank, world, dev


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def wrap(model: nn.Module, strategy: str, device: torch.device) -> nn.Module:
    """The model as the training step sees it; with one process, the model itself."""
    if not dist.is_initialized() or dist.get_world_size() == 1 or strategy == "none":
        return model
    if strategy == "ddp":
        # a MoE batch may route no token to some expert: DDP must then not wait for that expert's gradients
        moe = bool(getattr(getattr(model, "config", None), "num_local_experts", 0))
        return DDP(model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=moe)
    raise ValueError(f"unknown distributed strategy {strategy!r}; supported: none, ddp")


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under DDP (`.module`) and torch.compile (`._orig_mod`) wrappers."""
    while True:
        if isinstance(model, DDP):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


@contextlib.contextmanager
def sync_gradients(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Whether backward inside this block all-reduces gradients: only the last micro-batch of a step needs to."""
    if enabled:
        yield
    elif hasattr(model, "no_sync"):  # DDP
        with model.no_sync():
            yield
    elif hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum of `t` over all processes, in place; `t` itself in a single process."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
