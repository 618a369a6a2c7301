"""Helpers shared by the virtual-token PEFT tests (prefix, prompt, P-tuning): the reference models, camelid's logits,
a padded batch, and a synthetic instruction task the training loop can learn with a frozen base."""

from __future__ import annotations

import torch

from camelid.train import TrainConfig

P = 3  # virtual tokens
TOKENS = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(0))
LENGTHS = (12, 7)  # row 1 of a padded batch is shorter


def hf_model(transformers, path):
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def logits(model: torch.nn.Module, ids: torch.Tensor = TOKENS, **kw) -> torch.Tensor:
    """camelid's logits on the real tokens (a virtual-token method drops its own rows)."""
    with torch.no_grad():
        return model(ids, **kw)


def randomize_(module: torch.nn.Module, seed: int, std: float = 0.5) -> None:
    """Non-trivial random values on every parameter of a PEFT prompt encoder."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)


def padded(side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """TOKENS with row 1 cut to LENGTHS[1] real tokens, padded (token 0) on `side`: (ids, mask), both (2, 12)."""
    ids, mask = TOKENS.clone(), torch.ones_like(TOKENS)
    n = LENGTHS[1]
    if side == "left":
        ids[1, :12 - n], mask[1, :12 - n] = 0, 0
        ids[1, 12 - n:] = TOKENS[1, :n]
    else:
        ids[1, n:], mask[1, n:] = 0, 0
    return ids, mask


def default_positions(mask: torch.Tensor) -> torch.Tensor:
    """camelid's default positions for a padding mask: the count of real tokens before each one."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


class InstructionBatches:
    """A synthetic instruction task: "<random instruction tokens> SEP <answer> EOS", the answer a fixed response
    whatever the instruction; labels only on the answer and EOS (as SFT masks them)."""

    SEP, ANSWER, EOS = 3, (10, 11, 12, 13), 2

    def __init__(self, micro_batch: int = 4, seq_len: int = 10, vocab: int = 128):
        self.micro_batch, self.seq_len, self.vocab = micro_batch, seq_len, vocab

    def _batch(self, seed: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        answer = torch.tensor((self.SEP, *self.ANSWER, self.EOS)).expand(self.micro_batch, -1)
        instr = torch.randint(20, self.vocab, (self.micro_batch, self.seq_len - answer.shape[1]), generator=g)
        x = torch.cat((instr, answer), dim=1)
        labels = torch.full_like(x, -100)
        start = instr.shape[1]  # the SEP position predicts the first answer token
        labels[:, start:-1] = x[:, start + 1:]
        return {"input_ids": x, "labels": labels, "attention_mask": torch.ones_like(x)}

    def batch(self, step: int, micro: int, rank: int = 0, world: int = 1) -> dict[str, torch.Tensor]:
        return self._batch(step * 1000 + micro * 10 + rank)

    def eval_batches(self):
        yield self._batch(10**6)


def train_config(out, **overrides) -> TrainConfig:
    values = dict(out=str(out), max_steps=30, micro_batch=4, seq_len=10, lr=3e-2, warmup_steps=2, eval_every=0,
                  save_every=0, sample_every=0, tensorboard=False, log_every=1000, device="cpu", precision="fp32",
                  weight_decay=0.0)
    return TrainConfig(**{**values, **overrides})


def mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs)
