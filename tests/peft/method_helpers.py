"""What the tests of the hook-based PEFT methods (bottleneck adapters, BitFit, IA3) share: fixed tokens, logits,
a cached-vs-uncached generation check and a short run of the real training loop."""

from __future__ import annotations

from pathlib import Path

import torch

from camelid.generate import generate_ids

TOKENS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))


def logits(model: torch.nn.Module, ids: torch.Tensor = TOKENS) -> torch.Tensor:
    with torch.no_grad():
        return model(ids)


def perturb_trainable_(model: torch.nn.Module, std: float, seed: int = 0) -> None:
    """Random non-trivial values for the method's parameters (their init leaves the model equal to its base,
    which would make every comparison vacuous)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype) * std)


def assert_cached_generation_matches_full_forward(model: torch.nn.Module, new_tokens: int = 8) -> None:
    """generate_ids (KV cache, one token per step after the prefill) picks the same greedy tokens as re-running the
    whole sequence without a cache: the method acts the same on cached and uncached positions."""
    prompt = TOKENS[0, :6].tolist()
    cached = generate_ids(model, [prompt], max_new_tokens=new_tokens)[0]
    ids = list(prompt)
    for _ in range(new_tokens):
        ids.append(int(logits(model, torch.tensor([ids]))[0, -1].argmax()))
    assert cached == ids[len(prompt):]


class RepeatBatches:
    """One fixed tiny batch: the loss must fall when only the method's parameters train."""

    def __init__(self):
        self.ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(3))

    def batch(self, step, micro, rank, world):
        return {"input_ids": self.ids, "labels": self.ids.clone()}

    def eval_batches(self):
        return []


def train_briefly(model: torch.nn.Module, out: Path, steps: int = 8, lr: float = 1e-2) -> list[float]:
    """Run camelid.train.loop.train on RepeatBatches; check that frozen parameters did not move and return the
    per-step losses."""
    from camelid.train import TrainConfig
    from camelid.train.loop import train

    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    cfg = TrainConfig(out=str(out), max_steps=steps, micro_batch=4, seq_len=16, lr=lr, warmup_steps=0,
                      eval_every=0, save_every=0, sample_every=0, tensorboard=False, log_every=1000, device="cpu",
                      spike_sigma=0)
    result = train(cfg, model=model, batches=RepeatBatches())
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), f"{n} changed although it is frozen"
    return [result.losses[s] for s in sorted(result.losses)]
