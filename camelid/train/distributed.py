"""The seam for multi-process training: process-group setup from torchrun's environment, model wrapping, and the
few collectives the loop needs. A single process (no WORLD_SIZE) runs every function here as a no-op.

    torchrun --nproc-per-node 8 -m camelid pretrain --model tinyllama-1.1b --data data/corpus --out out/tl

Strategies (`wrap`), when WORLD_SIZE > 1:

    none    every process trains its own copy; nothing is synchronised (debugging only)
    ddp     DistributedDataParallel: a full copy of weights, gradients and optimizer state per process;
            gradients are all-reduced once per step (on the last micro-batch)
    fsdp    FSDP2 `fully_shard`, ZeRO-3 style: weights, gradients and optimizer state are sharded over the
            processes; each block's weights are all-gathered for its forward, freed, and gathered again for backward
    zero2   the same, but a block keeps its gathered weights from forward until its backward
            (`reshard_after_forward=False`): one all-gather per micro-batch instead of two, more memory

Under fsdp / zero2 the model's parameters become DTensor shards, so checkpoints go through
torch.distributed.checkpoint (state.py) and the final model folder is gathered to rank 0.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from camelid.checkpoint import parse_device
from camelid.model import SparseMoE

if TYPE_CHECKING:
    from torch.distributed.fsdp import MixedPrecisionPolicy

# torch.distributed.fsdp and .checkpoint take ~0.7 s to import: they are imported where used, so that every other
# `camelid` verb (which imports camelid.train through the CLI) starts without them

SHARDED = ("fsdp", "zero2")  # the FSDP2 strategies: parameters are DTensor shards


def setup(device: str = "auto") -> tuple[int, int, torch.device]:
    """(rank, world size, device) for this process; joins the process group when torchrun started several.

    gloo on CPU, nccl on CUDA. Each process takes the GPU of its LOCAL_RANK.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = parse_device(device)  # a one-line error for an unknown name or a CUDA this machine lacks
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local_rank if world > 1 else torch.cuda.current_device())
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", rank=rank, world_size=world)
    return rank, world, dev


def teardown() -> None:
    """Leave the process group, together: a rank that destroys its gloo group while another still talks to it can
    take that one down at exit (seen in CI: SIGABRT, "terminate called without an active exception"; it was seen
    again with this barrier in place, after a finished run, so camelid/__main__.py also skips interpreter
    finalization in torchrun workers)."""
    if dist.is_initialized():
        if dist.get_world_size() > 1:
            dist.barrier()
        dist.destroy_process_group()


def wrap(model: nn.Module, strategy: str, device: torch.device, precision: str = "fp32") -> nn.Module:
    """The model on `device`, as the training step sees it; with one process, the model itself. `precision` is
    the resolved training precision (fp32, bf16, fp16): FSDP takes its mixed-precision policy from it."""
    multi = dist.is_initialized() and dist.get_world_size() > 1
    if multi and strategy in SHARDED:  # fully_shard moves each unit's shard to the device: never the whole model
        return shard(model, device, reshard_after_forward=strategy == "fsdp", precision=precision)
    model.to(device)
    if not multi or strategy == "none":
        return model
    if strategy == "ddp":
        # a MoE batch may route no token to some expert: DDP must then not wait for that expert's gradients
        moe = bool(getattr(getattr(model, "config", None), "num_local_experts", 0))
        return DDP(model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=moe)
    raise ValueError(f"unknown distributed strategy {strategy!r}; supported: none, ddp, {', '.join(SHARDED)}")


def mixed_precision(precision: str) -> MixedPrecisionPolicy:
    """bf16: gathered weights and compute in bf16, gradients reduced and kept in fp32 (the sharded fp32 weights
    are the master copy the optimizer updates). fp32: no casts."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if precision in ("bf16", "bf16-true"):  # bf16-true: the shards are bf16 already; gradients still reduced in fp32
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if precision == "fp16":  # TrainConfig.validate refuses this earlier; here for a direct caller
        raise ValueError("fsdp / zero2 train in fp32 or bf16: fp16's GradScaler sees only this rank's gradient "
                         "shard, so ranks could disagree on skipping a step")
    return MixedPrecisionPolicy()


def shard(model: nn.Module, device: torch.device, reshard_after_forward: bool, precision: str = "fp32") -> nn.Module:
    """FSDP2 in place: one unit per transformer block, then the root unit (embeddings, final norm, lm_head).

    The model stays the same object (its class becomes FSDPTransformer); its parameters become DTensor shards
    (dim 0 split over the ranks) on `device`. A tied lm_head is the embedding table itself, one parameter in the
    root unit. The mesh is explicit: FSDP's default is the accelerator's, wrong for `--device cpu` on a GPU host.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    policy = mixed_precision(precision)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    config = getattr(model, "config", None)
    if getattr(config, "num_local_experts", 0):
        _keep_every_expert_in_the_graph(model)
    for block in getattr(getattr(model, "model", None), "layers", []):
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard_after_forward, mp_policy=policy)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward, mp_policy=policy)
    if getattr(config, "tie_word_embeddings", False) and model.lm_head.weight is not model.model.embed_tokens.weight:
        raise RuntimeError("FSDP untied lm_head from embed_tokens: the tied pair must stay one parameter")
    return model


def _keep_every_expert_in_the_graph(model: nn.Module) -> None:
    """FSDP reduce-scatters the gradients of those of a unit's parameters that have one. An expert that got no
    token on this rank has none, so the ranks would disagree on what to reduce (a hang, or a gloo size error).
    Adding 0 * (sum of the MoE block's weights) to its output gives every expert a gradient, zero when unused."""
    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        return output + 0.0 * sum(p.sum() for p in module.parameters()).to(output.dtype)

    for module in model.modules():
        if isinstance(module, SparseMoE):
            module.register_forward_hook(hook)


def is_sharded(model: nn.Module) -> bool:
    """Whether the model's parameters are FSDP2 shards: then saving and loading are collective."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def wrappers(model: nn.Module) -> Iterator[nn.Module]:
    """The model and every module under its DDP (`.module`) and torch.compile (`._orig_mod`) wrappers, outermost
    first; the last is the plain module."""
    while True:
        yield model
        if isinstance(model, DDP):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under DDP and torch.compile wrappers."""
    *_, plain = wrappers(model)
    return plain


@contextlib.contextmanager
def sync_gradients(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Whether backward inside this block all-reduces gradients: only the last micro-batch of a step needs to.

    DDP defers (`no_sync`): its gradients are full-size on every rank anyway. FSDP2 is left syncing on every
    micro-batch, on purpose: deferring (`set_requires_gradient_sync(False)`) would keep each rank's full unsharded
    fp32 gradients until the last micro-batch, the memory that sharding exists to save. Synced, each backward
    reduce-scatters, and the fp32 gradient shards accumulate over the step's micro-batches.
    """
    if enabled or not hasattr(model, "no_sync"):
        yield
    else:
        with model.no_sync():
            yield


@contextlib.contextmanager
def whole_trainable(model: nn.Module) -> Iterator[None]:
    """Inside this block the trainable parameters of a sharded model are whole plain tensors, so that an adapter's
    save function reads them as in one process. Collective: every rank gathers each one, in the same order. The
    frozen base stays sharded (gathering it would put the whole model on every rank, the memory FSDP saves).
    The shards are put back on exit; nothing happens to an unsharded model."""
    from torch.distributed.tensor import DTensor

    swapped: list[tuple[nn.Module, str, nn.Parameter]] = []  # (module, name, its sharded parameter)
    whole: dict[int, nn.Parameter] = {}  # a parameter shared by several modules is gathered once
    with torch.no_grad():
        for module in model.modules():
            for name, p in list(module._parameters.items()):
                if isinstance(p, DTensor) and p.requires_grad:
                    if id(p) not in whole:
                        whole[id(p)] = nn.Parameter(p.full_tensor())  # all-gather: the global shape
                    swapped.append((module, name, p))
                    module._parameters[name] = whole[id(p)]
    try:
        yield
    finally:
        for module, name, p in swapped:
            module._parameters[name] = p


@contextlib.contextmanager
def rank0_outputs(model: nn.Module) -> Iterator[None]:
    """Inside this block every rank's forward returns rank 0's output (broadcast after each call), so that ranks
    decoding together pick rank 0's tokens and stop together, even where their logits differ in the last bit: a
    sharded model's generation is collective, and ranks that disagreed on a token or on stopping would hang."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        yield
        return

    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        output = output.contiguous()  # (B, T, V) logits; prompt tuning's are a slice
        dist.broadcast(output, src=0)  # in place: rank 0's values everywhere
        return output

    handle = model.register_forward_hook(hook)  # after any adapter's own output hook (prompt tuning's)
    try:
        yield
    finally:
        handle.remove()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum of `t` over all processes, in place; `t` itself in a single process."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
