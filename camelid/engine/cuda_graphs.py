"""CUDA graphs for decode steps: one captured forward per padded batch size, replayed instead of launching kernels.

A decode step of a small model is a few hundred tiny kernels; launching them from Python costs more than running
them (TinyLlama at batch 1: ~1 ms of GPU work behind several ms of launches). A CUDA graph records the launches of one
forward once and replays them with one call. A graph replays fixed addresses and shapes, so:

- its inputs live in static buffers (token ids, positions, slot mapping, block tables, context lengths), filled
  before each replay; its logits land in a static buffer too;
- there is one graph per batch size in `capture_sizes` (1, 2, 4, 8, then multiples of 16); a batch of D sequences
  replays the smallest size b >= D, and rows D..b are padding: token 0 at position 0, whose key/value go to a
  scratch block that no sequence owns (the block manager never hands it out), reading one key of that block;
- block tables are as wide as the longest sequence the engine allows (the attention kernel stops at each
  sequence's own length, so the width costs nothing);
- the graphs share one memory pool, captured largest first so the smaller ones reuse its memory.

Only decode-only steps of the base model replay (multi-LoRA batches group rows by adapter on the host, which a graph
cannot repeat); everything else runs eagerly. Graphs need the Triton paged-decode kernel (the PyTorch reference would
gather the whole table width every step) and models whose forward has no host-dependent shapes (not MoE routing, not
dynamic RoPE). A capture that fails anyway leaves the engine eager, with a warning (camelid/engine/runner.py).

Without CUDA (`capture=False`) the same padded static-buffer path runs eagerly: that is what the CPU tests check.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from camelid.engine import triton_decode
from camelid.engine.paged_attention import AttentionMetadata, PagedBatch, PagedKVCache
from camelid.engine.scheduler import ScheduledBatch
from camelid.model import Transformer

MAX_GRAPH_BATCH = 512  # larger decode batches are compute-bound: launches no longer dominate, run them eagerly


def capture_sizes(max_batch: int) -> list[int]:
    """Padded batch sizes that get a graph: 1, 2, 4, 8, then every multiple of 16, ending at max_batch."""
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    sizes = [b for b in (1, 2, 4, 8) if b < max_batch] + list(range(16, max_batch, 16))
    return sizes + [max_batch]


def unsupported_reason(model: Transformer, cache: PagedKVCache) -> str | None:
    """Why decode graphs cannot run for this model and cache on CUDA (None: they can)."""
    c = model.config
    if c.num_local_experts:
        return "MoE routing has data-dependent shapes"
    if c.rope_scaling and c.rope_scaling.get("rope_type") == "dynamic":
        return "dynamic RoPE scaling reads the longest position on the host"
    if not triton_decode.available():
        return "the Triton paged-decode kernel is not available"
    if not triton_decode.supports(c.head_dim, cache.block_size, cache.k[0].dtype):
        return (f"the Triton kernel does not take head_dim {c.head_dim}, block_size {cache.block_size} in "
                f"{cache.k[0].dtype} (powers of two, a key tile of at most {triton_decode.MAX_TILE_BYTES} bytes)")
    return None


class DecodeGraphs:
    """Replays decode steps of up to `max_batch` sequences. `cache` must hold one block more than the block manager
    gives out: its last block is the padding rows' scratch block."""

    def __init__(self, model: Transformer, cache: PagedKVCache, max_batch: int, max_blocks_per_seq: int,
                 capture: bool = True, compile: bool = False):
        self.model, self.cache = model, cache
        self.sizes = capture_sizes(min(max_batch, MAX_GRAPH_BATCH))
        self.max_batch = self.sizes[-1]
        self.scratch_block = cache.num_blocks - 1
        device, n = model.lm_head.weight.device, self.max_batch

        def buffer(*shape: int, fill: int) -> torch.Tensor:
            return torch.full(shape, fill, dtype=torch.long, device=device)

        # the static inputs: graphs read these addresses; `_fill` writes each step's values into them
        self.input_ids = buffer(1, n, fill=0)  # (1, n)
        self.position_ids = buffer(1, n, fill=0)  # (1, n)
        self.slot_mapping = buffer(n, fill=self.scratch_block * cache.block_size)  # (n,)
        self.block_tables = buffer(n, max_blocks_per_seq, fill=self.scratch_block)  # (n, max_blocks)
        # their host side: rows written through numpy (a nested list -> tensor took ~1 ms at batch 256 on the
        # H100's host), pinned on CUDA so the upload is one asynchronous copy
        self._host_tables = torch.full((n, max_blocks_per_seq), self.scratch_block, dtype=torch.long,
                                       pin_memory=device.type == "cuda")
        self._host_tables_np = self._host_tables.numpy()
        self.context_lens = buffer(n, fill=1)  # (n,)
        self.rows = torch.arange(n, device=device)  # (n,) decode row r is sequence r
        # torch.compile: the whole padded forward becomes one graph whose elementwise work (norms, RoPE, SwiGLU,
        # residuals) fuses into a few kernels; the paged attention stays one opaque operator (paged_attention.py).
        # The batch size is symbolic (dynamic=True), so the sizes share a compilation (batch 1 gets its own).
        self.compiled = compile
        self._call = torch.compile(self._model_logits, dynamic=True) if compile else self._model_logits
        self.logits: torch.Tensor | None = None  # (n, V), allocated by the first forward
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.replays = 0  # decode steps served here (graph or, without CUDA, the same path eagerly)
        if capture:
            self._capture()

    def _model_logits(self, input_ids: torch.Tensor, position_ids: torch.Tensor, slot_mapping: torch.Tensor,
                      block_tables: torch.Tensor, context_lens: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Logits (b, V) of b decode rows: input_ids / position_ids (1, b), the rest (b,) or (b, max_blocks)."""
        meta = AttentionMetadata(slot_mapping=slot_mapping, block_tables=block_tables, context_lens=context_lens,
                                 context_lens_host=[], query_start_loc=[], single_seqs=rows, single_tokens=rows,
                                 single_width=block_tables.shape[1], multi_seqs=[])
        return self.model(input_ids, position_ids=position_ids, cache=PagedBatch(self.cache, meta))[0]

    @torch.inference_mode()
    def _forward(self, b: int) -> None:
        """The forward of padded size b over the static buffers, logits into self.logits[:b]."""
        logits = self._call(self.input_ids[:, :b], self.position_ids[:, :b], self.slot_mapping[:b],
                            self.block_tables[:b], self.context_lens[:b], self.rows[:b])  # (b, V)
        if self.logits is None:
            self.logits = logits.new_empty(self.max_batch, logits.shape[-1])
        self.logits[:b].copy_(logits)

    def _capture(self) -> None:
        """One graph per size, largest first, into one shared pool. The buffers hold padding only, so warm-up and
        capture write nothing but the scratch block."""
        torch.cuda.synchronize()
        pool = None
        for b in reversed(self.sizes):
            self._forward(b)  # warm-up outside the graph: Triton compiles, cuBLAS settles on its kernels
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self._forward(b)
            pool = graph.pool()
            self.graphs[b] = graph
        torch.cuda.synchronize()

    def can_run(self, batch: ScheduledBatch) -> bool:
        """Decode-only (one new token per sequence, its last), base model only, and no more rows than the graphs."""
        if not 0 < len(batch.seqs) <= self.max_batch:
            return False
        width = self.block_tables.shape[1]
        return all(n == 1 and s.num_computed_tokens + 1 == len(s) and s.adapter is None and len(s.block_table) <= width
                   for s, n in zip(batch.seqs, batch.num_new_tokens))

    def _fill(self, batch: ScheduledBatch, b: int) -> None:
        """Write the step's inputs into rows 0..D-1 and padding into rows D..b-1."""
        D, bs = len(batch.seqs), self.cache.block_size
        positions = [s.num_computed_tokens for s in batch.seqs]
        tokens = [s.token_ids[p] for s, p in zip(batch.seqs, positions)]
        slots = [s.block_table[p // bs] * bs + p % bs for s, p in zip(batch.seqs, positions)]
        tables = self._host_tables_np
        for row, seq in enumerate(batch.seqs):  # the rest of a row is the scratch block (never read: past ctx)
            table = seq.block_table
            tables[row, :len(table)] = table
            tables[row, len(table):] = self.scratch_block
        host = torch.tensor([tokens, positions, slots, [p + 1 for p in positions]], dtype=torch.long)  # (4, D)
        device = self.input_ids.device
        host = host.to(device, non_blocking=True)
        self.input_ids[0, :D], self.position_ids[0, :D], self.slot_mapping[:D], self.context_lens[:D] = host
        # whole rows: one contiguous copy; the host rows are not touched again before the step's tokens come back
        self.block_tables[:D].copy_(self._host_tables[:D], non_blocking=True)
        if D < b:  # padding rows: token 0 at position 0, stored in and reading the scratch block
            self.input_ids[0, D:b] = 0
            self.position_ids[0, D:b] = 0
            self.slot_mapping[D:b] = self.scratch_block * bs
            self.context_lens[D:b] = 1
            self.block_tables[D:b, 0] = self.scratch_block

    def _replay(self, b: int) -> None:
        graph = self.graphs.get(b)
        if graph is not None:
            graph.replay()
        else:
            self._forward(b)
        self.replays += 1

    def run(self, batch: ScheduledBatch) -> torch.Tensor:
        """Logits (D, V) of the batch's D sequences (a view of the static buffer: use it before the next run)."""
        D = len(batch.seqs)
        b = next(size for size in self.sizes if size >= D)
        self._fill(batch, b)
        self._replay(b)
        return self.logits[:D]

    @torch.inference_mode()
    def run_steps(self, batch: ScheduledBatch, steps: int, limits: list[int],
                  sample: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """`steps` decode steps in a row: each samples on the device (`sample`: logits (D, V) -> tokens (D,)) and
        feeds its tokens to the next, with no host sync in between. Returns the tokens (steps, D), on the device.

        Every step's positions, slots and context lengths are known now: uploaded at once, then copied into the
        static buffers on the device between replays. Row i has blocks for its first limits[i] steps (what its
        max_tokens and the context allow); after those it repeats its last position, writes to the scratch block and
        reads no further, and the scheduler drops its extra tokens."""
        D, bs = len(batch.seqs), self.cache.block_size
        b = next(size for size in self.sizes if size >= D)
        tokens = torch.empty(steps, D, dtype=torch.long, device=self.input_ids.device)
        self._fill(batch, b)  # step 0, the block tables (reserved for every step), the padding rows
        self._replay(b)
        tokens[0] = sample(self.logits[:D])
        # the later steps' inputs, written on the host while the GPU runs step 0
        later = []  # per row (3, steps - 1): positions, slots, context lengths of steps 1..steps-1
        for seq, limit in zip(batch.seqs, limits):
            first = seq.num_computed_tokens
            positions = [first + min(j, limit - 1) for j in range(1, steps)]
            slots = [seq.block_table[p // bs] * bs + p % bs if j < limit else self.scratch_block * bs
                     for j, p in zip(range(1, steps), positions)]
            later.append((positions, slots, [p + 1 for p in positions]))
        plan = torch.tensor(later, dtype=torch.long).permute(1, 2, 0).contiguous()  # (3, steps - 1, D)
        plan = plan.to(self.input_ids.device, non_blocking=True)
        for j in range(1, steps):
            self.input_ids[0, :D] = tokens[j - 1]
            self.position_ids[0, :D], self.slot_mapping[:D], self.context_lens[:D] = plan[:, j - 1]
            self._replay(b)
            tokens[j] = sample(self.logits[:D])
        return tokens
