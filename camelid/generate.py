"""Reference generation with a static KV cache: `generate_ids` (tokens), `generate` (text), `stream` (text pieces).

Plain functions in the gpt-fast style: left-pad the batch, prefill once, then decode one token per step. This is the
oracle the batched engine is tested against, so it favours being obviously right over being fast.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING

import torch

from camelid.model import KVCache, Transformer
from camelid.sampling import Sampling, next_token

if TYPE_CHECKING:
    from camelid.tokenizer import Tokenizer


def activation_dtype(model: Transformer) -> torch.dtype:
    """The dtype of the model's hidden states, hence of its keys and values (the KV cache's dtype). Read from the
    input embedding table, which is never quantized: a quantized lm_head (camelid.quant) holds int8 / packed codes,
    yet computes in the dtype of its input."""
    return model.model.embed_tokens.weight.dtype


@torch.inference_mode()
def iter_tokens(model: Transformer, prompts: Sequence[Sequence[int]], max_new_tokens: int, sampling: Sampling,
                stop_ids: Iterable[int] = ()) -> Iterator[list[int | None]]:
    """Yield, per decoding step, the new token of every prompt (None once that row has stopped).

    A row stops after emitting one of `stop_ids` (that token is still yielded), after `max_new_tokens`, or when it
    reaches the model's context length.
    """
    if not prompts:
        raise ValueError("no prompts given")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    context = model.config.max_position_embeddings
    longest = max(len(p) for p in prompts)
    if longest >= context:
        raise ValueError(f"prompt of {longest} tokens does not fit the context of {context} tokens")
    max_new_tokens = min(max_new_tokens, context - longest)
    device = model.lm_head.weight.device
    B, total = len(prompts), longest + max_new_tokens

    tokens = torch.zeros(B, total, dtype=torch.long, device=device)  # left-padded prompts, then new tokens
    real = torch.zeros(B, total, dtype=torch.long, device=device)  # 1 where a slot holds a real token
    for row, prompt in enumerate(prompts):
        tokens[row, longest - len(prompt):longest] = torch.tensor(list(prompt), device=device)
        real[row, longest - len(prompt):] = 1
    padded = any(len(p) != longest for p in prompts)
    cache = KVCache(model.config, B, total, device=device, dtype=activation_dtype(model))
    generator = sampling.generator(device)
    stop = torch.tensor(sorted(set(stop_ids)), dtype=torch.long, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)

    pos, step_ids = 0, tokens[:, :longest]  # prefill: the whole prompt at once
    for step in range(max_new_tokens):
        end = pos + step_ids.shape[1]
        mask = real[:, :end] if padded else None
        logits = model(step_ids, attention_mask=mask, cache=cache, start=pos, last_only=True)[:, -1]  # (B, V)
        seen = None
        if sampling.repetition_penalty != 1.0:  # padding slots hold token 0: point them at a real token instead
            seen = torch.where(real[:, :end].bool(), tokens[:, :end], tokens[:, longest - 1:longest])
        new = next_token(logits, seen, sampling, generator)  # (B,)
        tokens[:, end] = new
        yield [None if d else int(t) for t, d in zip(new.tolist(), done.tolist())]
        done |= torch.isin(new, stop)
        if bool(done.all()):
            return
        pos, step_ids = end, new[:, None]


def generate_ids(model: Transformer, prompts: Sequence[Sequence[int]], max_new_tokens: int = 128,
                 stop_ids: Iterable[int] = (), **sampling) -> list[list[int]]:
    """New token ids for each prompt (a stop token, when one ends the row, is included)."""
    out: list[list[int]] = [[] for _ in prompts]
    for step in iter_tokens(model, prompts, max_new_tokens, Sampling(**sampling), stop_ids):
        for row, token in enumerate(step):
            if token is not None:
                out[row].append(token)
    return out


class StopStrings:
    """Holds back the tail of the text that could still become a stop string, and cuts at the earliest one in the
    whole text (OpenAI's rule), so the result never depends on how the text arrives in pieces."""

    def __init__(self, stops: str | Sequence[str] | None):
        if isinstance(stops, str):  # one stop string (as OpenAI and SamplingParams take it), not its characters
            stops = [stops]
        self.stops = [s for s in stops or () if s]
        self.pending = ""
        self.stopped = False

    def feed(self, piece: str) -> str:
        """Text that is safe to show now."""
        if self.stopped:
            return ""
        self.pending += piece
        hit = self._first_hit()
        # the earliest start of a stop string that the next text could still complete (a held prefix is no longer
        # than the held text: trying every prefix of a megabyte stop string took seconds per piece)
        keep = max((next((k for k in range(min(len(s) - 1, len(self.pending)), 0, -1)
                          if self.pending.endswith(s[:k])), 0) for s in self.stops), default=0)
        partial = len(self.pending) - keep
        if hit is not None and hit <= partial:  # no longer stop string (["b", "abc"] after "ab") can start before it
            return self._cut(hit)
        out, self.pending = self.pending[:partial], self.pending[partial:]
        return out

    def flush(self) -> str:
        """The held text at the end of generation: cut at a stop string found in it, if any."""
        hit = None if self.stopped else self._first_hit()
        if hit is not None:
            return self._cut(hit)
        out, self.pending = ("" if self.stopped else self.pending), ""
        return out

    def _first_hit(self) -> int | None:
        return min((i for i in (self.pending.find(s) for s in self.stops) if i >= 0), default=None)

    def _cut(self, at: int) -> str:
        self.stopped = True
        out, self.pending = self.pending[:at], ""
        return out


def _stream_rows(model: Transformer, tokenizer: Tokenizer, prompts: Sequence[str], max_new_tokens: int,
                 stop: str | Sequence[str], sampling: Sampling, bos: bool,
                 extra_stop_ids: Iterable[int] = ()) -> Iterator[tuple[int, str]]:
    """(row, text piece) events for a batch of text prompts."""
    ids = [tokenizer.encode(p, bos=bos) for p in prompts]
    stop_ids = set(tokenizer.stop_ids) | set(model.config.eos_token_ids) | set(extra_stop_ids)
    decoders = [tokenizer.stream_decoder() for _ in prompts]
    stoppers = [StopStrings(stop) for _ in prompts]
    finished = [False] * len(prompts)
    for step in iter_tokens(model, ids, max_new_tokens, sampling, stop_ids):
        for row, token in enumerate(step):
            if token is None or finished[row]:
                continue
            if token in stop_ids:
                finished[row] = True
                continue
            piece = stoppers[row].feed(decoders[row].push(token))
            finished[row] = stoppers[row].stopped
            if piece:
                yield row, piece
        if all(finished):
            break
    for row in range(len(prompts)):
        tail = stoppers[row].feed(decoders[row].flush())
        tail += stoppers[row].flush()
        if tail:
            yield row, tail


def stream(model: Transformer, tokenizer: Tokenizer, prompt: str, max_new_tokens: int = 128,
           stop: str | Sequence[str] = (), bos: bool = True, stop_ids: Iterable[int] = (), **sampling) -> Iterator[str]:
    """Yield the completion of `prompt` as text pieces, as soon as each is decoded (never broken UTF-8).
    `stop_ids`: token ids that end generation besides EOS (a chat template's end-of-turn tokens)."""
    for _, piece in _stream_rows(model, tokenizer, [prompt], max_new_tokens, stop, Sampling(**sampling), bos,
                                 stop_ids):
        yield piece


def generate(model: Transformer, tokenizer: Tokenizer, prompt: str | Sequence[str], max_new_tokens: int = 128,
             stop: str | Sequence[str] = (), bos: bool = True, **sampling) -> str | list[str]:
    """The completion of one prompt, or of each prompt in a list (batched). Sampling keywords: temperature, top_k,
    top_p, min_p, repetition_penalty, seed. Generation ends at EOS (or another stop token), a stop string, or the
    limit."""
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if not prompts:  # as LLM.generate([]): nothing to do
        return []
    texts = [""] * len(prompts)
    for row, piece in _stream_rows(model, tokenizer, prompts, max_new_tokens, stop, Sampling(**sampling), bos):
        texts[row] += piece
    return texts[0] if isinstance(prompt, str) else texts
