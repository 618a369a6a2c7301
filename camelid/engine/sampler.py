"""The engine's batched sampler: one step's logits (N, V) for N sequences, each with its own SamplingParams.

Per row, in this order (transformers' order, so each stage can be checked against its logits processors):
  1. repetition_penalty (Hugging Face / CTRL) over the prompt and the output tokens: a seen token's logit is divided by
     the penalty when positive and multiplied by it when negative, once however often it was seen;
  2. presence_penalty and frequency_penalty (OpenAI) over the output tokens only:
     logit -= presence * (count > 0) + frequency * count;
  3. logit_bias (OpenAI): each listed token's bias is added to its logit;
  4. temperature 0 (anything below camelid.sampling.GREEDY_TEMPERATURE): argmax of the penalized, biased logits, and
     no filter matters;
  5. otherwise logits / temperature, then top-k, top-p and min-p (keep prob >= min_p * max prob), then one draw
     (camelid.sampling.filter_logits: the same chain as camelid.generate's sampler).

Logprobs are the model's own distribution: log_softmax of the raw logits in float32, before penalties, temperature
and filters (vLLM's default). So they say how likely the model found a token, whatever the request's sampling
settings, and a greedy token's logprob is the largest of its row when no penalty applies.

Randomness: a row with a torch.Generator draws from it and from nothing else, so a seeded request gives the same
tokens whichever other requests share its batch (given the same logits). Rows without one share the batch generator.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from camelid.engine.sampling_params import SamplingParams
from camelid.sampling import apply_presence_frequency_penalties, filter_logits, penalize_seen


def sample_seed(seed: int, index: int) -> int:
    """The seed of completion `index` of a request seeded with `seed`: index 0 uses the seed itself (so n=1 matches
    camelid.generate with the same seed), the others a hash of (seed, index), so each of the n streams differs."""
    if index == 0:
        return seed % 2**64
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def make_generator(seed: int | None, index: int, device: torch.device | str) -> torch.Generator | None:
    """The random stream of completion `index` of a request (None when the request has no seed)."""
    if seed is None:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(sample_seed(seed, index))
    return generator


@dataclass
class RowGroups:
    """Which rows of a batch take which path; an all-greedy batch is one argmax."""

    greedy: list[int]  # SamplingParams.greedy: temperature below GREEDY_TEMPERATURE
    random: list[int]  # every sampled row, in batch order
    seeded: list[int]  # the sampled rows with their own generator (a subset of random)

    @property
    def all_greedy(self) -> bool:
        return not self.random


def group_rows(params: Sequence[SamplingParams], generators: Sequence[torch.Generator | None]) -> RowGroups:
    greedy = [i for i, p in enumerate(params) if p.greedy]
    random = [i for i, p in enumerate(params) if not p.greedy]
    return RowGroups(greedy, random, [i for i in random if generators[i] is not None])


@dataclass
class SampleResult:
    token_ids: torch.Tensor  # (N,) long, the next token of each row
    logprobs: torch.Tensor | None = None  # (N,) raw log-softmax of the chosen tokens; None when no row asked
    top_ids: torch.Tensor | None = None  # (N, K) the K most likely tokens, K = the largest `logprobs` asked for
    top_logprobs: torch.Tensor | None = None  # (N, K) their raw log-softmax values, most likely first
    num_top: list[int | None] | None = None  # per row: the `logprobs` it asked for (None: none)

    def logprob_entries(self) -> list[dict | None]:
        """Per row, the CompletionOutput.logprobs entry: {"token_id", "logprob", "top": {token_id: logprob}} holding
        the row's own number of most likely tokens (the chosen one may or may not be among them), or None."""
        token_ids = self.token_ids.tolist()
        if self.logprobs is None:
            return [None] * len(token_ids)
        chosen = self.logprobs.tolist()
        top_ids = self.top_ids.tolist() if self.top_ids is not None else [[] for _ in token_ids]
        top_values = self.top_logprobs.tolist() if self.top_logprobs is not None else [[] for _ in token_ids]
        return [None if k is None else
                {"token_id": token, "logprob": value, "top": dict(zip(ids[:k], values[:k]))}
                for token, value, ids, values, k in zip(token_ids, chosen, top_ids, top_values, self.num_top)]


def _padded(rows: Sequence[Sequence[int]], pad: int, device: torch.device) -> torch.Tensor:
    """Ragged token id lists -> (R, L) long, padded with `pad` (a column past the vocabulary, dropped later)."""
    width = max((len(r) for r in rows), default=0)
    return torch.tensor([list(r) + [pad] * (width - len(r)) for r in rows], dtype=torch.long, device=device)


def token_counts(rows: Sequence[Sequence[int]], vocab_size: int, device: torch.device) -> torch.Tensor:
    """(R, V) how often each token occurs in each row's list."""
    ids = _padded(rows, vocab_size, device)  # (R, L)
    counts = torch.zeros(len(rows), vocab_size + 1, dtype=torch.long, device=device)
    counts.scatter_add_(1, ids, torch.ones_like(ids))
    return counts[:, :vocab_size]


def apply_penalties(logits: torch.Tensor, params: Sequence[SamplingParams], prompt_ids: Sequence[Sequence[int]],
                    output_ids: Sequence[Sequence[int]]) -> torch.Tensor:
    """Repetition, presence and frequency penalties on the rows that ask for them; logits (N, V) float."""
    rows = [i for i, p in enumerate(params) if p.uses_penalties]
    if not rows:
        return logits
    vocab, device = logits.shape[-1], logits.device
    index = torch.tensor(rows, device=device)
    sub = logits[index]  # (R, V)
    chosen = [params[i] for i in rows]
    output_counts = token_counts([output_ids[i] for i in rows], vocab, device)  # (R, V)
    if any(p.repetition_penalty != 1.0 for p in chosen):
        seen = token_counts([prompt_ids[i] for i in rows], vocab, device).bool() | (output_counts > 0)
        sub = penalize_seen(sub, seen, torch.tensor([p.repetition_penalty for p in chosen]))
    if any(p.presence_penalty != 0.0 or p.frequency_penalty != 0.0 for p in chosen):
        sub = apply_presence_frequency_penalties(sub, output_counts, torch.tensor([p.presence_penalty for p in chosen]),
                                                 torch.tensor([p.frequency_penalty for p in chosen]))
    return logits.index_copy(0, index, sub)


def apply_logit_bias(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """Each row's logit_bias added to its logits (N, V) float; a new tensor, so the raw logits stay for logprobs."""
    entries = [(i, token, bias) for i, p in enumerate(params) for token, bias in p.logit_bias.items()]
    if not entries:
        return logits
    rows, tokens, biases = zip(*entries)
    device = logits.device
    return logits.index_put((torch.tensor(rows, device=device), torch.tensor(tokens, device=device)),
                            torch.tensor(biases, dtype=logits.dtype, device=device), accumulate=True)


def filter_rows(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """camelid.sampling.filter_logits (temperature, top-k, top-p, min-p) with each row's own settings; logits (R, V)
    float, one SamplingParams per row."""
    return filter_logits(logits, temperature=torch.tensor([p.temperature for p in params]),
                         top_k=torch.tensor([p.top_k for p in params]),
                         top_p=torch.tensor([p.top_p for p in params], dtype=torch.float64),
                         min_p=torch.tensor([p.min_p for p in params]))


def sample(logits: torch.Tensor, params: Sequence[SamplingParams],
           generators: Sequence[torch.Generator | None] | None = None,
           prompt_ids: Sequence[Sequence[int]] | None = None, output_ids: Sequence[Sequence[int]] | None = None,
           generator: torch.Generator | None = None) -> SampleResult:
    """The next token of each of N sequences.

    logits (N, V) at each sequence's last position (any float dtype; sampling runs in float32). params[i],
    generators[i] (None: draw from `generator`, itself None for torch's default), prompt_ids[i] and output_ids[i]
    (the tokens generated so far) describe row i; the token ids are read only for rows with a penalty."""
    num_rows = logits.shape[0]
    generators = [None] * num_rows if generators is None else list(generators)
    if len(params) != num_rows or len(generators) != num_rows:
        raise ValueError(f"got {num_rows} rows of logits, {len(params)} SamplingParams, {len(generators)} generators")
    raw = logits.float()  # (N, V)
    logits = raw
    if any(p.uses_penalties for p in params):
        if prompt_ids is None or output_ids is None:
            raise ValueError("prompt_ids and output_ids are needed when a row uses a penalty")
        logits = apply_penalties(raw, params, prompt_ids, output_ids)
    logits = apply_logit_bias(logits, params)

    groups = group_rows(params, generators)
    if groups.all_greedy:
        token_ids = logits.argmax(-1)  # (N,)
    elif not groups.greedy:
        token_ids = _draw(logits, params, generators, groups, generator)
    else:  # a mixed batch: one argmax over the greedy rows, one draw over the others
        token_ids = torch.empty(num_rows, dtype=torch.long, device=logits.device)
        greedy = torch.tensor(groups.greedy, device=logits.device)
        token_ids[greedy] = logits[greedy].argmax(-1)
        token_ids[torch.tensor(groups.random, device=logits.device)] = _draw(logits, params, generators, groups,
                                                                              generator)
    return with_logprobs(raw, token_ids, [p.logprobs for p in params])


def _draw(logits: torch.Tensor, params: Sequence[SamplingParams], generators: Sequence[torch.Generator | None],
          groups: RowGroups, generator: torch.Generator | None) -> torch.Tensor:
    """One draw for each sampled row (in groups.random order): unseeded rows in one multinomial, seeded rows one by
    one from their own generator, so their draws never depend on the rest of the batch."""
    rows = groups.random
    if len(rows) < logits.shape[0]:
        logits = logits[torch.tensor(rows, device=logits.device)]
    probs = filter_rows(logits, [params[i] for i in rows]).softmax(-1)  # (R, V)
    drawn = torch.empty(len(rows), dtype=torch.long, device=logits.device)
    seeded = set(groups.seeded)
    shared = [j for j, i in enumerate(rows) if i not in seeded]
    if shared:
        index = torch.tensor(shared, device=logits.device)
        drawn[index] = torch.multinomial(probs[index], 1, generator=generator).squeeze(-1)
    for j, i in enumerate(rows):
        if i in seeded:
            drawn[j] = torch.multinomial(probs[j:j + 1], 1, generator=generators[i]).squeeze()
    return drawn


def with_logprobs(raw: torch.Tensor, token_ids: torch.Tensor, num_top: list[int | None]) -> SampleResult:
    """token_ids (N,) with their logprobs under raw (N, V) fp32 logits, and each row's num_top[i] most likely
    tokens (None: the row asked for no logprobs). Sampled tokens use it, and so do the prompt tokens a request
    scores (SamplingParams.prompt_logprobs)."""
    result = SampleResult(token_ids)
    if all(k is None for k in num_top):
        return result
    logprobs = raw.log_softmax(-1)  # (N, V) the model's distribution, before any penalty or filter
    result.num_top = num_top
    result.logprobs = logprobs.gather(1, result.token_ids[:, None]).squeeze(1)
    k = min(max(k or 0 for k in num_top), logprobs.shape[-1])
    if k > 0:
        result.top_logprobs, result.top_ids = logprobs.topk(k, dim=-1)
    return result
