"""Scheduler: continuous batching over a waiting and a running queue.

Each step fills a token budget (max_num_batched_tokens): first one token for every running sequence in decode, then
the rest of unfinished prefills, then new (or preempted) sequences from the waiting queue, their prompts cut into
chunks that fit the budget (chunked prefill). When the cache runs out of blocks, the newest running sequence is
preempted: its blocks are freed and it goes back to the front of the waiting queue, to be recomputed later (often
mostly from the prefix cache). Nothing fails for lack of memory.

`postprocess` appends the sampled tokens and ends sequences at a stop token, max_tokens, or the context length.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from camelid.engine.block_manager import BlockManager
from camelid.engine.sequence import Sequence, Status


@dataclass
class ScheduledBatch:
    """One step's work. Sequence seqs[i] computes its next num_new_tokens[i] tokens; each entry of `samples`
    (sequence, i) gets a new token sampled from the logits of the last token of seqs[i] (a forked sibling samples
    from its parent's row). `copies` are copy-on-write block copies to do before the forward."""

    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    samples: list[tuple[Sequence, int]] = field(default_factory=list)
    copies: list[tuple[int, int]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.seqs)

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 max_model_len: int, eos_token_ids: set[int]):
        if max_num_seqs < 1 or max_num_batched_tokens < 1:
            raise ValueError(f"need max_num_seqs >= 1 and max_num_batched_tokens >= 1, "
                             f"got {max_num_seqs} and {max_num_batched_tokens}")
        self.block_manager = block_manager
        self.max_num_seqs, self.max_num_batched_tokens = max_num_seqs, max_num_batched_tokens
        self.max_model_len, self.eos_token_ids = max_model_len, set(eos_token_ids)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.prefix_cache_hit_tokens = 0
        self.prompt_tokens_computed = 0
        self.generated_tokens = 0

    def add(self, seq: Sequence) -> None:
        """Queue a sequence (with its forks, the other completions of an n > 1 request)."""
        if 1 + len(seq.forks) > self.max_num_seqs:  # it could never be admitted
            raise ValueError(f"n={1 + len(seq.forks)} completions exceed max_num_seqs={self.max_num_seqs}")
        self.waiting.append(seq)

    def num_seqs(self) -> int:
        """Running sequences, counting the forks a running parent will branch off once its prompt is computed:
        what max_num_seqs caps."""
        return sum(1 + len(seq.forks) for seq in self.running)

    # ---- scheduling -----------------------------------------------------------------------------------------

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.max_num_batched_tokens
        # decodes first (one token each, the cheapest progress), then unfinished prefills; oldest first in each
        candidates = sorted(self.running, key=lambda s: (s.num_uncomputed_tokens > 1, s.arrival))
        self.running = []
        preemptions_before = self.num_preemptions
        while candidates:
            seq = candidates.pop(0)
            if budget == 0:
                self.running.append(seq)
                continue
            n = min(seq.num_uncomputed_tokens, budget)
            while (copies := self.block_manager.reserve(seq, n)) is None:
                victim = max(candidates + [seq], key=lambda s: s.arrival)  # the newest not yet scheduled
                self._preempt(victim)
                if victim is seq:
                    break
                candidates.remove(victim)
            else:
                budget -= n
                self._add_to_batch(batch, seq, n, copies)

        # admit waiting sequences, unless memory was just short enough to preempt (they would thrash); a sequence
        # with forks takes a place for each of them, so an n > 1 request never pushes past max_num_seqs
        just_preempted = self.num_preemptions > preemptions_before
        while self.waiting and budget > 0 and not just_preempted:
            seq = self.waiting[0]
            if self.num_seqs() + 1 + len(seq.forks) > self.max_num_seqs:
                break
            hit = self.block_manager.allocate_cached_prefix(seq)
            n = min(seq.num_uncomputed_tokens, budget)
            copies = self.block_manager.reserve(seq, n)
            if copies is None:  # no room: wait until running sequences finish (never preempt for a newcomer)
                self.block_manager.free(seq)
                break
            self.waiting.popleft()
            self.prefix_cache_hit_tokens += hit
            seq.status = Status.RUNNING
            budget -= n
            self._add_to_batch(batch, seq, n, copies)
        return batch

    def _add_to_batch(self, batch: ScheduledBatch, seq: Sequence, n: int, copies: list[tuple[int, int]]) -> None:
        index = len(batch.seqs)
        batch.seqs.append(seq)
        batch.num_new_tokens.append(n)
        batch.copies.extend(copies)
        self.running.append(seq)
        self.prompt_tokens_computed += max(0, min(seq.num_computed_tokens + n, seq.num_prompt_tokens)
                                           - seq.num_computed_tokens)
        if seq.num_computed_tokens + n < len(seq):
            return  # a prefill chunk that does not reach the last token: nothing to sample yet
        batch.samples.append((seq, index))
        if seq.forks:  # n > 1: the siblings branch off here, sharing the prompt's blocks (written by this step)
            for child in seq.forks:
                self.block_manager.fork(seq, child)
                child.num_computed_tokens = seq.num_computed_tokens + n
                child.status = Status.RUNNING
                self.running.append(child)
                batch.samples.append((child, index))
            seq.forks = []

    def _preempt(self, seq: Sequence) -> None:
        """Free the sequence's blocks and queue it first to run again; its tokens are recomputed then."""
        self.block_manager.free(seq)
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    # ---- after the forward --------------------------------------------------------------------------------------

    def postprocess(self, batch: ScheduledBatch, tokens: list[int]) -> None:
        """Count the computed tokens, cache the blocks they filled, append the sampled tokens, end finished ones."""
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            seq.num_computed_tokens += n
            self.block_manager.register_full_blocks(seq)
        for (seq, _), token in zip(batch.samples, tokens):
            if seq.is_finished:  # aborted while the step ran
                continue
            self._append(seq, token)

    def _append(self, seq: Sequence, token: int) -> None:
        seq.append(token)
        self.generated_tokens += 1
        params = seq.params
        if token in params.stop_token_ids or (not params.ignore_eos and token in self.eos_token_ids):
            self.finish(seq, "stop")
        elif seq.num_output_tokens >= params.max_tokens or len(seq) >= self.max_model_len:
            self.finish(seq, "length")

    # ---- several decode steps at once (LLM(decode_steps=K)) --------------------------------------------------

    def reserve_steps(self, batch: ScheduledBatch, steps: int) -> list[int] | None:
        """Blocks for up to `steps` tokens of each sequence of a decode-only batch (schedule reserved one): per
        sequence the steps it may take before its max_tokens or the context ends it. None when free blocks run
        short: the batch then takes its one scheduled step (blocks reserved here stay with their sequences)."""
        limits = []
        for seq in batch.seqs:
            limit = min(steps, seq.params.max_tokens - seq.num_output_tokens, self.max_model_len - len(seq))
            copies = self.block_manager.reserve(seq, limit)
            if copies is None:
                return None
            batch.copies.extend(copies)  # none in practice: schedule's reserve already made the block private
            limits.append(limit)
        return limits

    def postprocess_steps(self, batch: ScheduledBatch, rows: list[list[int]]) -> None:
        """postprocess for several decode steps: row i holds sequence i's tokens step by step; each is taken as a
        one-token step would take it, and a sequence's tokens after the one that ended it are dropped."""
        for seq, tokens in zip(batch.seqs, rows):
            for token in tokens:
                if seq.is_finished:
                    break
                seq.num_computed_tokens += 1
                self.block_manager.register_full_blocks(seq)
                self._append(seq, token)

    def finish(self, seq: Sequence, reason: str) -> None:
        """End a sequence now (stop, length, abort): its blocks are free at once."""
        if seq.is_finished:
            return
        seq.status, seq.finish_reason = Status.FINISHED, reason
        self.block_manager.free(seq)
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        for child in seq.forks:  # siblings that never branched off end with it
            child.status, child.finish_reason = Status.FINISHED, reason
        seq.forks = []
