"""Runner: turns one ScheduledBatch into one forward of the model over the paged KV cache, then samples.

The new tokens of every scheduled sequence (a prefill chunk or one decode token) are packed into one row (B = 1, N)
with their positions; `AttentionMetadata` says where each token's keys go (slot mapping) and which keys each
sequence reads (block tables, context lengths, query start locations). The model gets it bound to the cache as a
`PagedBatch` (see camelid/model.py's docstring), and computes logits only at the last new token of each sequence
that samples this step. Decode-only steps of the base model replay a CUDA graph instead when the runner has them
(camelid/engine/cuda_graphs.py).
"""

from __future__ import annotations

import contextlib
import logging

import torch

from camelid.engine.cuda_graphs import DecodeGraphs, unsupported_reason
from camelid.engine.multi_lora import MultiLoRA
from camelid.engine.paged_attention import AttentionMetadata, PagedBatch, PagedKVCache
from camelid.engine.sampler import SampleResult, sample, with_logprobs
from camelid.engine.scheduler import ScheduledBatch
from camelid.generate import activation_dtype
from camelid.model import Transformer

log = logging.getLogger(__name__)


class Runner:
    def __init__(self, model: Transformer, num_blocks: int, block_size: int, lora: MultiLoRA | None = None,
                 graph_batch: int = 0, max_blocks_per_seq: int = 0, compile: bool = False):
        """`graph_batch` > 0: decode steps of up to that many sequences replay CUDA graphs (on CUDA, when the model
        allows; see cuda_graphs.py), or on CPU run the same padded static-buffer path eagerly. The cache then gets
        one scratch block beyond `num_blocks` for the padding rows."""
        self.model, self.lora = model, lora
        self.device, self.dtype = model.lm_head.weight.device, activation_dtype(model)
        self.block_size = block_size
        self.cache = PagedKVCache(model.config, num_blocks + (graph_batch > 0), block_size, self.dtype, self.device)
        with self.on_device():
            self.graphs = self._decode_graphs(graph_batch, max_blocks_per_seq, compile) if graph_batch > 0 else None

    def on_device(self) -> contextlib.AbstractContextManager:
        """Make the model's GPU the current one: Triton launches and graph captures use the current device (per
        thread), which is not the model's for LLM(device="cuda:1") or a server's engine thread."""
        return torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext()

    def _decode_graphs(self, graph_batch: int, max_blocks_per_seq: int, compile: bool) -> DecodeGraphs | None:
        if self.device.type != "cuda":
            return DecodeGraphs(self.model, self.cache, graph_batch, max_blocks_per_seq, capture=False,
                                compile=compile)
        reason = unsupported_reason(self.model, self.cache)
        if reason is not None:
            log.info("decode runs without CUDA graphs: %s", reason)
            return None
        for compiled in dict.fromkeys((compile, False)):  # a compiled capture that fails: plain graphs next
            try:
                return DecodeGraphs(self.model, self.cache, graph_batch, max_blocks_per_seq, compile=compiled)
            except Exception as error:  # noqa: BLE001 - a capture that fails costs speed, never the engine
                # torch.cuda.graph leaves its capture stream current when the capture fails: back to the default one
                torch.cuda.set_stream(torch.cuda.default_stream(self.device))
                log.warning("CUDA graph capture%s failed: %s", " of the compiled forward" if compiled else "", error)
        log.warning("decode runs eagerly")
        return None

    def prepare(self, batch: ScheduledBatch, targets: list[tuple[object, int, int]] = ()
                ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, torch.Tensor]:
        """(input_ids (1, N), position_ids (1, N), metadata, logits_at (R + Q,)): the packed inputs of one step.
        logits_at: the last new token of each sequence that reaches its end (R), then the prompt positions whose
        logits score the next prompt token (Q: `targets`, from prompt_targets)."""
        ids, positions, logits_at, end = [], [], [], 0
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            first = seq.num_computed_tokens
            ids.extend(seq.token_ids[first:first + n])
            positions.extend(range(first, first + n))
            end += n
            if first + n == len(seq):  # its last token: the one whose logits give the next token
                logits_at.append(end - 1)
        logits_at += [row for _, row, _ in targets]
        meta = AttentionMetadata.build([s.block_table for s in batch.seqs], [s.num_computed_tokens for s in batch.seqs],
                                       batch.num_new_tokens, self.block_size, self.device)

        def tensor(values: list[int]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.long).to(self.device, non_blocking=True)

        return tensor(ids)[None], tensor(positions)[None], meta, tensor(logits_at)

    @staticmethod
    def prompt_targets(batch: ScheduledBatch) -> list[tuple[object, int, int]]:
        """(sequence, packed row, token id) for each prompt token after the first that this step's tokens predict
        and whose logprob is still missing: row p of a sequence predicts its token p + 1."""
        targets, start = [], 0
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            if seq.scores_prompt:
                first = seq.num_computed_tokens
                for p in range(max(first, len(seq.prompt_logprobs) - 1), min(first + n, seq.num_prompt_tokens - 1)):
                    targets.append((seq, start + p - first, seq.token_ids[p + 1]))
            start += n
        return targets

    @torch.inference_mode()
    def forward(self, batch: ScheduledBatch, targets: list[tuple[object, int, int]] = ()) -> torch.Tensor:
        """Logits (R + Q, V) at the last new token of every sequence of the batch that reached its end, then at the
        Q prompt positions of `targets` (prompt_targets)."""
        self.cache.copy_blocks(batch.copies)
        if self.graphs is not None and self.graphs.can_run(batch):
            if self.lora is not None:
                self.lora.set_token_slots(None)  # as at capture: every layer is its base
            return self.graphs.run(batch)
        input_ids, position_ids, meta, logits_at = self.prepare(batch, targets)
        if self.lora is not None:
            self.lora.set_token_slots(self.lora.token_slots_for([s.adapter for s in batch.seqs], batch.num_new_tokens))
        logits = self.model(input_ids, position_ids=position_ids, cache=PagedBatch(self.cache, meta),
                            logits_at=logits_at)
        return logits[0]

    def can_run_steps(self, batch: ScheduledBatch) -> bool:
        """Whether several decode steps of this batch can run back to back on the device (run_steps): a batch the
        decode graphs serve, whose rows sample without reading their tokens on the host (no penalties) and report
        no logprobs."""
        return (self.graphs is not None and self.graphs.can_run(batch)
                and len(batch.samples) == len(batch.seqs)
                and not any(s.params.uses_penalties or s.params.logprobs is not None for s in batch.seqs))

    def run_steps(self, batch: ScheduledBatch, steps: int, limits: list[int]) -> list[list[int]]:
        """`steps` decode steps of a batch that can_run_steps, synced once at the end: per sequence its `steps`
        sampled tokens (those past its limits[i] are filler for the scheduler to drop)."""
        params, generators = [s.params for s in batch.seqs], [s.generator for s in batch.seqs]
        with self.on_device():
            self.cache.copy_blocks(batch.copies)
            if self.lora is not None:
                self.lora.set_token_slots(None)  # as at capture: every layer is its base
            tokens = self.graphs.run_steps(batch, steps, limits,
                                           lambda logits: sample(logits, params, generators).token_ids)
            return tokens.T.tolist()  # (D, steps)

    def run(self, batch: ScheduledBatch) -> SampleResult:
        """One step: the forward, then one token for each entry of batch.samples (in that order)."""
        with self.on_device():
            return self._run(batch)

    def _run(self, batch: ScheduledBatch) -> SampleResult:
        targets = self.prompt_targets(batch)
        logits = self.forward(batch, targets)  # (R + Q, V)
        if targets:  # the last Q rows score prompt tokens
            logits, scored = logits[:len(logits) - len(targets)], logits[len(logits) - len(targets):]
            ids = torch.tensor([token for _, _, token in targets], device=scored.device)
            entries = with_logprobs(scored.float(), ids, [s.params.prompt_logprobs for s, _, _ in targets])
            for (seq, _, _), entry in zip(targets, entries.logprob_entries()):
                seq.prompt_logprobs.append(entry)
        if not batch.samples:  # only prefill chunks that stop short of their last token
            return SampleResult(torch.empty(0, dtype=torch.long))
        # logits row r belongs to the r-th sequence of the batch that reached its last token; a sample entry names
        # its sequence's index in the batch (a forked sibling names its parent's)
        reaching = [i for i, (seq, n) in enumerate(zip(batch.seqs, batch.num_new_tokens))
                    if seq.num_computed_tokens + n == len(seq)]
        row_of = {index: row for row, index in enumerate(reaching)}
        rows = [row_of[index] for _, index in batch.samples]
        if rows != list(range(len(logits))):  # forks share a row, or rows are skipped: gather (else no copy at all)
            logits = logits[torch.tensor(rows, dtype=torch.long, device=logits.device)]
        seqs = [seq for seq, _ in batch.samples]
        penalties = any(s.params.uses_penalties for s in seqs)  # only then are the token lists read
        return sample(logits, [s.params for s in seqs], [s.generator for s in seqs],
                      prompt_ids=[s.token_ids[:s.num_prompt_tokens] for s in seqs] if penalties else None,
                      output_ids=[s.output_token_ids for s in seqs] if penalties else None)
