"""Turning logits into the next token: penalties, temperature, top-k, top-p, min-p, seeded sampling.

The order and the tie-breaking follow transformers' logits processors (repetition penalty, then temperature, top-k,
top-p, min-p), so results can be compared with it. Each filter takes one value for the whole batch or one per row,
and `filter_logits` chains them: `next_token` below (camelid.generate's sampler) calls it with one setting for
the batch, the engine's batched sampler (camelid/engine/sampler.py) with one per row, so both run the same code.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

GREEDY_TEMPERATURE = 1e-5  # below this, logits / temperature overflows float32: such a setting samples greedily


@dataclass
class Sampling:
    temperature: float = 0.0  # 0 (anything below GREEDY_TEMPERATURE): greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    min_p: float = 0.0  # 0: off; keep tokens with prob >= min_p * (prob of the most likely token)
    repetition_penalty: float = 1.0  # 1: off; > 1 discourages tokens already in the sequence (CTRL, Keskar et al.)
    seed: int | None = None

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE

    def generator(self, device: torch.device) -> torch.Generator | None:
        if self.seed is None:
            return None
        g = torch.Generator(device=device)
        g.manual_seed(self.seed % 2**64)  # any int, as the engine takes it (torch overflows past 64 bits)
        return g


def per_row(value: float | torch.Tensor, logits: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A scalar or a (B,) tensor of settings -> (B, 1) on the logits' device, ready to broadcast over the vocabulary."""
    value = torch.as_tensor(value, dtype=dtype or logits.dtype, device=logits.device)
    return value.reshape(-1, 1).expand(logits.shape[0], 1)


def penalize_seen(logits: torch.Tensor, seen: torch.Tensor, penalty: float | torch.Tensor) -> torch.Tensor:
    """Hugging Face's repetition penalty (CTRL): each token in `seen` (B, V) bool, however often it occurred, has its
    logit divided by the penalty when positive and multiplied by it when negative, so penalty > 1 always demotes it."""
    penalty = per_row(penalty, logits)  # (B, 1)
    penalized = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalized, logits)


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float | torch.Tensor) -> torch.Tensor:
    """logits (B, V); seen (B, S) token ids already in each sequence (prompt included)."""
    seen_mask = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, seen, True)  # (B, V)
    return penalize_seen(logits, seen_mask, penalty)


def apply_presence_frequency_penalties(logits: torch.Tensor, counts: torch.Tensor, presence: float | torch.Tensor,
                                       frequency: float | torch.Tensor) -> torch.Tensor:
    """OpenAI's penalties: logit -= presence * (count > 0) + frequency * count, with `counts` (B, V) how often each
    token occurs in the output generated so far (the prompt does not count)."""
    counts = counts.to(logits.dtype)
    return logits - per_row(presence, logits) * (counts > 0) - per_row(frequency, logits) * counts


def apply_top_k(logits: torch.Tensor, top_k: int | torch.Tensor) -> torch.Tensor:
    """Keep the k largest logits of each row (and any tied with the k-th, like transformers); k <= 0 or >= V: off."""
    vocab = logits.shape[-1]
    k = torch.as_tensor(top_k, dtype=torch.long).reshape(-1, 1).expand(logits.shape[0], 1)  # (B, 1) where given
    k = torch.where((k <= 0) | (k > vocab), vocab, k)
    if int(k.min()) == vocab:  # read where k lives (the CPU for Python settings), so CUDA logits need no sync
        return logits
    largest = torch.topk(logits, int(k.max()), dim=-1).values  # (B, largest) sorted, so column k-1 is the k-th
    kth = largest.gather(1, k.to(logits.device) - 1)  # (B, 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def apply_top_p(logits: torch.Tensor, top_p: float | torch.Tensor) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches top_p (nucleus sampling); 1: off."""
    # the cut is computed in float64 and then rounded, as transformers does with its Python float top_p (and where
    # top_p lives, the CPU for Python settings: some accelerators have no float64)
    top_p = torch.as_tensor(top_p, dtype=torch.float64)
    cut = torch.where(top_p < 1, 1 - top_p, -1.0).to(logits.dtype)  # -1 drops nothing
    cut = per_row(cut, logits)  # (B, 1)
    sorted_logits, order = torch.sort(logits, descending=False, dim=-1)
    cumulative = sorted_logits.softmax(-1).cumsum(-1)  # (B, V) ascending, so the tail to drop comes first
    drop_sorted = cumulative <= cut
    drop_sorted[:, -1] = False  # always keep the most likely token
    drop = drop_sorted.scatter(1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def apply_min_p(logits: torch.Tensor, min_p: float | torch.Tensor) -> torch.Tensor:
    """Keep tokens whose probability is at least min_p times that of the most likely token (Nguyen et al.); 0: off."""
    probs = logits.softmax(-1)  # (B, V)
    threshold = per_row(min_p, logits) * probs.amax(-1, keepdim=True)  # (B, 1)
    drop = probs < threshold
    drop.scatter_(1, probs.argmax(-1, keepdim=True), False)  # never empty a row, whatever the rounding
    return logits.masked_fill(drop, float("-inf"))


def filter_logits(logits: torch.Tensor, temperature: float | torch.Tensor = 1.0, top_k: int | torch.Tensor = 0,
                  top_p: float | torch.Tensor = 1.0, min_p: float | torch.Tensor = 0.0) -> torch.Tensor:
    """logits / temperature, then top-k, top-p and min-p: every token a filter drops is set to -inf. Each setting is
    one value for the whole batch or a (B,) tensor with one per row (on the CPU: the checks below read it there, so
    CUDA logits need no sync). A filter runs only when some row uses it; rows that do not are left unchanged by it.
    The one filter chain of camelid.generate and of the engine's batched sampler."""
    if isinstance(temperature, torch.Tensor):
        temperature = per_row(temperature, logits)  # (B, 1)
    logits = logits / temperature
    top_k = torch.as_tensor(top_k)
    if bool(((0 < top_k) & (top_k < logits.shape[-1])).any()):
        logits = apply_top_k(logits, top_k)
    if bool((torch.as_tensor(top_p) < 1.0).any()):
        logits = apply_top_p(logits, top_p)
    if bool((torch.as_tensor(min_p) > 0.0).any()):
        logits = apply_min_p(logits, min_p)
    return logits


def next_token(logits: torch.Tensor, seen: torch.Tensor | None, sampling: Sampling,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """logits (B, V) for the last position -> next token ids (B,). `seen` (B, S) feeds the repetition penalty."""
    logits = logits.float()
    if sampling.repetition_penalty != 1.0:
        logits = apply_repetition_penalty(logits, seen, sampling.repetition_penalty)
    if sampling.greedy:
        return logits.argmax(-1)
    logits = filter_logits(logits, sampling.temperature, sampling.top_k, sampling.top_p, sampling.min_p)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)
