"""SamplingParams: how one request turns logits into tokens, and when it stops.

The names and ranges follow vLLM's SamplingParams and OpenAI's completion parameters, so the server maps the request
body onto it field by field. Every field is checked once here, so the engine never sees a bad value: a bad request
fails alone, with a one-line ValueError that names the field and the allowed range.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from camelid.sampling import GREEDY_TEMPERATURE

PENALTY_LIMIT = 2.0  # OpenAI's range for presence_penalty and frequency_penalty: [-2, 2]
BIAS_LIMIT = 100.0  # OpenAI's range for a logit_bias value: [-100, 100]


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass
class SamplingParams:
    n: int = 1  # completions per prompt; they share the prompt's KV blocks
    max_tokens: int = 16  # generated tokens at most (the context length may stop a request earlier)
    temperature: float = 1.0  # 0 (anything below GREEDY_TEMPERATURE): greedy argmax
    top_k: int = 0  # 0 or -1: off
    top_p: float = 1.0  # 1: off
    min_p: float = 0.0  # 0: off; keep tokens with prob >= min_p * (prob of the most likely token)
    repetition_penalty: float = 1.0  # 1: off; Hugging Face / CTRL, over prompt + output tokens
    presence_penalty: float = 0.0  # 0: off; OpenAI, over output tokens
    frequency_penalty: float = 0.0  # 0: off; OpenAI, over output tokens
    stop: list[str] = field(default_factory=list)  # the text stops before the first of these strings
    stop_token_ids: list[int] = field(default_factory=list)  # generating one of these ends the request (kept in token_ids)
    ignore_eos: bool = False  # keep going past EOS (benchmarks)
    seed: int | None = None  # the request's own random stream, independent of the other requests in the batch
    logprobs: int | None = None  # None: off; k >= 0: the chosen token's logprob and the k most likely alternatives
    prompt_logprobs: int | None = None  # the same for each prompt token after the first (scoring a text, echo)
    # token id -> value added to its logit before sampling (OpenAI's logit_bias; -100 bans a token, +100 forces it)
    logit_bias: dict[int, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):  # OpenAI accepts null, one string or a list
            self.stop = [self.stop]
        for name in ("stop", "stop_token_ids"):  # a private copy, so the caller's list can change freely
            value = getattr(self, name)
            if value is None:
                value = []
            if not isinstance(value, (list, tuple)):
                raise ValueError(f"{name} must be a list, got {value!r}")
            setattr(self, name, list(value))
        bias = {} if self.logit_bias is None else self.logit_bias
        if not isinstance(bias, dict):
            raise ValueError(f"logit_bias must be a dict of token id -> bias, got {bias!r}")
        # JSON (the OpenAI body, a worker's params) spells the token ids as strings
        self.logit_bias = {int(k) if isinstance(k, str) and k.isascii() and k.isdigit() else k: v
                           for k, v in bias.items()}
        self._validate()

    def _validate(self) -> None:
        def bad(name: str, allowed: str) -> ValueError:
            return ValueError(f"{name} must be {allowed}, got {getattr(self, name)!r}")

        if not _is_int(self.n) or self.n < 1:
            raise bad("n", "an integer >= 1")
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            raise bad("max_tokens", "an integer >= 1")
        if not _is_number(self.temperature) or not 0 <= self.temperature < math.inf:  # `not` also rejects NaN
            raise bad("temperature", "a number >= 0 (0 = greedy)")
        if not _is_int(self.top_k) or self.top_k < -1:
            raise bad("top_k", "an integer >= 1, or 0 / -1 for off")
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            raise bad("top_p", "in (0, 1]")
        if not _is_number(self.min_p) or not 0 <= self.min_p <= 1:
            raise bad("min_p", "in [0, 1]")
        if not _is_number(self.repetition_penalty) or not 0 < self.repetition_penalty < math.inf:
            raise bad("repetition_penalty", "a number > 0 (1 = off)")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not _is_number(value) or not -PENALTY_LIMIT <= value <= PENALTY_LIMIT:
                raise bad(name, f"in [-{PENALTY_LIMIT:g}, {PENALTY_LIMIT:g}]")
        if not all(isinstance(s, str) and s for s in self.stop):
            raise bad("stop", "a list of non-empty strings")
        if not all(_is_int(t) and t >= 0 for t in self.stop_token_ids):
            raise bad("stop_token_ids", "a list of integers >= 0")
        if not all(_is_int(t) and t >= 0 for t in self.logit_bias):
            raise bad("logit_bias", "a dict whose keys are token ids (integers >= 0)")
        if not all(_is_number(v) and -BIAS_LIMIT <= v <= BIAS_LIMIT for v in self.logit_bias.values()):
            raise bad("logit_bias", f"a dict whose values are in [-{BIAS_LIMIT:g}, {BIAS_LIMIT:g}]")
        if not isinstance(self.ignore_eos, bool):
            raise bad("ignore_eos", "true or false")
        if self.seed is not None and not _is_int(self.seed):
            raise bad("seed", "an integer or None")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or value < 0):
                raise bad(name, "None or an integer >= 0")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE

    @property
    def uses_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
