"""Sequence: one completion being generated (a request with n > 1 has n of them, sharing the prompt's blocks).

It holds its tokens (prompt + output), how many of them already have keys/values in the cache, its block table, and
its own sampling state (params, random generator). The scheduler moves it WAITING -> RUNNING -> FINISHED, and back
to WAITING when it is preempted (its blocks are freed and its tokens recomputed later).
"""

from __future__ import annotations

import enum

import torch

from camelid.engine.sampler import make_generator
from camelid.engine.sampling_params import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    def __init__(self, seq_id: int, request_id: str, index: int, prompt_token_ids: list[int], params: SamplingParams,
                 adapter: str | None = None, adapter_key: str | None = None, arrival: int = 0,
                 device: torch.device | str = "cpu"):
        self.seq_id, self.request_id, self.index = seq_id, request_id, index
        self.token_ids = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.params = params
        self.adapter = adapter  # LoRA adapter name, None = base model
        self.adapter_key = adapter_key  # what the prefix cache keys this adapter's blocks by (unique per load)
        self.arrival = arrival  # order of admission: the newest running sequence is preempted first
        self.status = Status.WAITING
        self.block_table: list[int] = []
        self.num_computed_tokens = 0  # tokens whose keys/values are in the cache
        self.num_cached_tokens = 0  # of those, found in the prefix cache at admission (never computed by us)
        self.num_hashed_blocks = 0  # leading full blocks already entered in the prefix cache
        self.finish_reason: str | None = None
        self.forks: list[Sequence] = []  # n > 1: siblings that branch off once the prompt is computed
        self.logprobs: list[dict] | None = [] if params.logprobs is not None else None
        # per prompt token, as `logprobs` per output token; the first has none (nothing precedes it). Only the
        # request's first sequence scores the prompt: the others share its prompt blocks
        self.prompt_logprobs: list[dict | None] | None = [None] if params.prompt_logprobs is not None and index == 0 \
            else None
        self.generator = make_generator(params.seed, index, device)  # its own random stream (None: unseeded)

    def __len__(self) -> int:
        return len(self.token_ids)

    def __repr__(self) -> str:
        return (f"Sequence({self.seq_id}, {self.status.value}, tokens={len(self)}, "
                f"computed={self.num_computed_tokens}, blocks={self.block_table})")

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def scores_prompt(self) -> bool:
        """Whether some prompt token still needs its logprob: then every prompt position needs its logits."""
        return self.prompt_logprobs is not None and len(self.prompt_logprobs) < self.num_prompt_tokens

    @property
    def num_uncomputed_tokens(self) -> int:
        """1 for a sequence in decode; more while its prompt (or its recompute after preemption) is prefilled."""
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status == Status.FINISHED

    def append(self, token_id: int) -> None:
        self.token_ids.append(int(token_id))
