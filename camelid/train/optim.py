"""Optimizers (AdamW, Lion), weight-decay parameter groups, and the learning-rate schedule.

The schedule is a pure function of the step, not a torch LRScheduler: there is no scheduler state to save, and a
resumed run cannot disagree with an uninterrupted one about the learning rate.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from camelid.train.config import TrainConfig


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of optimizer step `step` (1-based): linear warmup from lr / warmup_steps to lr at
    warmup_steps, then a cosine from lr down to min_lr at max_steps (and min_lr after it)."""
    if step <= cfg.warmup_steps:
        return cfg.lr * step / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: matrices of Linear layers decay; norms, biases and embeddings do not.

    Decay pulls weights toward 0. For a norm's gain that means toward a zero output, and for a bias toward no
    offset: neither is a simpler model, only a different one. An embedding row would decay at every step, even
    while its token is absent from the batch (decoupled decay ignores the gradient), so rare tokens would shrink
    toward zero between their occurrences. A tied lm_head is the embedding table, so it does not decay either.
    """
    no_decay = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, other, seen = [], [], set()
    for p in model.parameters():  # parameters() yields a shared (tied) tensor once
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 and id(p) not in no_decay else other).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": other, "weight_decay": 0.0}]


class Lion(torch.optim.Optimizer):
    """Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms"):

        update = sign(beta1 * m + (1 - beta1) * g)
        p      = p * (1 - lr * wd) - lr * update     (decoupled weight decay, as AdamW)
        m      = beta2 * m + (1 - beta2) * g

    One moment instead of Adam's two (half the optimizer memory). Every coordinate moves by exactly lr, so it
    wants an lr 3-10x smaller than AdamW's and a weight decay 3-10x larger for the same effective decay.
    """

    def __init__(self, params, lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.99), weight_decay: float = 0.0):
        if lr <= 0 or not all(0 <= b < 1 for b in betas) or weight_decay < 0:
            raise ValueError(f"invalid Lion settings: lr={lr}, betas={betas}, weight_decay={weight_decay}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (beta1, beta2), wd = group["lr"], group["betas"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                m, g = state["exp_avg"], p.grad
                update = (m * beta1 + g * (1 - beta1)).sign_()
                p.mul_(1 - lr * wd).add_(update, alpha=-lr)
                m.mul_(beta2).add_(g, alpha=1 - beta2)
        return loss


# QLoRA's low-memory optimizers: 8-bit Adam moments (block-wise quantized state, a quarter of AdamW's 8 bytes per
# parameter). CUDA only: torchao's step is compiled with torch.compile, bitsandbytes' paging uses CUDA unified memory.
LOW_MEMORY_OPTIMIZERS = {"adamw8bit": "torchao.optim.AdamW8bit", "paged_adamw8bit": "bitsandbytes PagedAdamW8bit"}


def build_low_memory_optimizer(name: str, params, lr: float, betas: tuple[float, float], eps: float,
                               device: torch.device) -> torch.optim.Optimizer:
    """An 8-bit AdamW by name: "adamw8bit" (torchao) or "paged_adamw8bit" (bitsandbytes: optimizer state paged
    to CPU memory when the GPU runs short). A clear ValueError on a device or an install that cannot run it."""
    if name not in LOW_MEMORY_OPTIMIZERS:
        raise ValueError(f"unknown 8-bit optimizer {name!r}; choose one of {', '.join(LOW_MEMORY_OPTIMIZERS)}")
    if device.type != "cuda":
        raise ValueError(f"optimizer {name!r} ({LOW_MEMORY_OPTIMIZERS[name]}) needs a CUDA device, and this run is "
                         f"on {device.type}: use adamw")
    if name == "adamw8bit":
        from torchao.optim import AdamW8bit

        return AdamW8bit(params, lr=lr, betas=betas, eps=eps)
    try:
        import bitsandbytes
    except ImportError:
        raise ValueError("optimizer 'paged_adamw8bit' needs bitsandbytes (pip install bitsandbytes), or use "
                         "adamw8bit (torchao)") from None
    return bitsandbytes.optim.PagedAdamW8bit(params, lr=lr, betas=betas, eps=eps)


def build_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg.weight_decay)
    if cfg.optimizer in LOW_MEMORY_OPTIMIZERS:
        return build_low_memory_optimizer(cfg.optimizer, groups, cfg.lr, cfg.betas, cfg.eps, device)
    if cfg.optimizer == "lion":
        return Lion(groups, lr=cfg.lr, betas=cfg.betas)
    # fused: one kernel for the whole update on CUDA; foreach (batched over tensors) is the fast path elsewhere
    fast = dict(fused=True) if device.type == "cuda" else dict(foreach=True)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, **fast)
