"""The paged KV cache and a pure-PyTorch attention over it (the reference path; it runs on CPU and CUDA alike).

Keys and values live in fixed-size blocks: layer tensors of shape (num_blocks, block_size, nkv, hd). A sequence owns
a list of block ids (its block table); token i of the sequence sits in block table[i // block_size] at offset
i % block_size, i.e. in the flat slot table[i // bs] * bs + i % bs.

One forward packs the new tokens of every scheduled sequence into a single row (B = 1, N tokens). `PagedBatch` binds
the cache to that step's metadata (passed explicitly, never global) and is what the model receives as `cache`:
Attention calls `attend(layer, q, k, v)`, which writes the new keys/values to their slots and attends each query to
the keys of its own sequence only: causal by position, plus the sliding window and ALiBi bias when the model has them.
On CUDA with Triton the attention reads the blocks in place (triton_decode for decodes, triton_prefill for prefill
chunks); the PyTorch path here gathers each sequence's keys first.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from camelid.config import ModelConfig
from camelid.engine import triton_decode, triton_prefill
from camelid.model import alibi_slopes


@torch.library.custom_op("camelid::paged_decode", mutates_args=())
def paged_decode_op(q: torch.Tensor, k_blocks: torch.Tensor, v_blocks: torch.Tensor, block_tables: torch.Tensor,
                    context_lens: torch.Tensor, scale: float, sliding_window: int | None,
                    alibi_slopes: torch.Tensor | None) -> torch.Tensor:
    """triton_decode.paged_decode as one opaque operator, so that torch.compile keeps the Triton launch as it is
    (a call in its graph) instead of tracing into the kernel or breaking the graph at every layer."""
    return triton_decode.paged_decode(q, k_blocks, v_blocks, block_tables, context_lens, scale, sliding_window,
                                      alibi_slopes)


@paged_decode_op.register_fake
def _(q, k_blocks, v_blocks, block_tables, context_lens, scale, sliding_window, alibi_slopes):
    return torch.empty(q.shape, dtype=q.dtype, device=q.device)  # (D, nh, hd), contiguous like the kernel's output


log = logging.getLogger(__name__)
_prefill_kernel_failed: list[str] = []  # its first launch error, if it failed (e.g. out of shared memory): not retried


def use_triton(q: torch.Tensor, k_blocks: torch.Tensor) -> bool:
    """Whether attention over these blocks takes the Triton kernels (triton_decode, triton_prefill): on CUDA, with
    Triton installed and head_dim / block_size the kernels take."""
    return (q.is_cuda and triton_decode.available()
            and triton_decode.supports(q.shape[-1], k_blocks.shape[1], k_blocks.dtype))


class PagedKVCache:
    """Every layer's key and value blocks: (num_blocks, block_size, nkv, hd) each."""

    def __init__(self, config: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype,
                 device: torch.device):
        shape = (num_blocks, block_size, config.num_key_value_heads, config.head_dim)
        self.num_blocks, self.block_size = num_blocks, block_size
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.sliding_window = config.sliding_window
        alibi = config.position_encoding == "alibi"
        self.alibi = alibi_slopes(config.num_attention_heads).to(device) if alibi else None  # (nh,)

    @staticmethod
    def bytes_per_block(config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
        """Keys + values of one block over all layers: 2 * layers * block_size * nkv * hd * dtype size."""
        itemsize = torch.empty((), dtype=dtype).element_size()
        return 2 * config.num_hidden_layers * block_size * config.num_key_value_heads * config.head_dim * itemsize

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """Copy-on-write: block src -> block dst in every layer, before a sequence writes into its private copy."""
        if not copies:
            return
        src = torch.tensor([s for s, _ in copies], device=self.k[0].device)
        dst = torch.tensor([d for _, d in copies], device=self.k[0].device)
        for layer_k, layer_v in zip(self.k, self.v):
            layer_k[dst] = layer_k[src]
            layer_v[dst] = layer_v[src]


@dataclass
class AttentionMetadata:
    """Where the N packed tokens of one forward go, and which keys each sees. S = scheduled sequences.

    Sequences with one new token (decodes) are attended in one batched call; the others (prefill chunks) in one
    Triton launch on CUDA (triton_prefill), else one by one, since each has its own query length. Host-side copies of
    the lengths keep that loop free of device syncs."""

    slot_mapping: torch.Tensor  # (N,) flat cache slot of each new token
    block_tables: torch.Tensor  # (S, max_blocks) block ids per sequence, padded with 0
    context_lens: torch.Tensor  # (S,) tokens in the cache per sequence after this step (new ones included)
    context_lens_host: list[int]  # the same, on the host
    query_start_loc: list[int]  # S + 1 offsets into the N tokens: sequence s owns tokens [q[s], q[s+1])
    single_seqs: torch.Tensor  # (D,) the sequences with exactly one new token
    single_tokens: torch.Tensor  # (D,) the index of that token among the N
    single_width: int  # blocks needed by the longest of them
    multi_seqs: list[int]  # the sequences with more than one new token

    @classmethod
    def build(cls, block_tables: list[list[int]], num_computed: list[int], num_new: list[int], block_size: int,
              device: torch.device) -> AttentionMetadata:
        """From each sequence's block table, tokens already cached and new tokens this step. Vectorized over the
        step's tokens (a mixed step packs thousands: a per-token Python loop took ~3 ms of host time for 8k)."""
        def upload(array: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(array).to(device, non_blocking=True)

        S, width = len(block_tables), max(map(len, block_tables))
        tables = np.zeros((S, width), dtype=np.int64)  # padded with block 0, never read past a sequence's end
        lengths = np.empty(S, dtype=np.int64)
        for s, table in enumerate(block_tables):
            tables[s, :len(table)] = table
            lengths[s] = len(table)
        new = np.asarray(num_new, dtype=np.int64)
        first = np.asarray(num_computed, dtype=np.int64)
        starts = np.zeros(S + 1, dtype=np.int64)
        np.cumsum(new, out=starts[1:])
        owner = np.repeat(np.arange(S), new)  # (N,) the sequence of each packed token
        positions = first[owner] + np.arange(starts[-1]) - starts[owner]  # (N,) its position in that sequence
        blocks = positions // block_size  # (N,) each token's index into its sequence's table
        if (blocks >= lengths[owner]).any():  # the padding's block 0 would take another sequence's keys
            s = int(owner[np.argmax(blocks >= lengths[owner])])
            raise ValueError(f"sequence {s}'s block table ({lengths[s]} blocks of {block_size}) does not hold its "
                             f"{num_computed[s] + num_new[s]} tokens")
        slots = tables[owner, blocks] * block_size + positions % block_size
        context = first + new
        single = np.flatnonzero(new == 1)
        return cls(slot_mapping=upload(slots), block_tables=upload(tables), context_lens=upload(context),
                   context_lens_host=context.tolist(), query_start_loc=starts.tolist(),
                   single_seqs=upload(single), single_tokens=upload(starts[single]),
                   single_width=-(-int(context[single].max(initial=0)) // block_size),
                   multi_seqs=np.flatnonzero(new > 1).tolist())


class PagedBatch:
    """The cache as one forward sees it: what Attention's `cache.attend` hook calls (see camelid/model.py)."""

    def __init__(self, cache: PagedKVCache, meta: AttentionMetadata):
        self.cache, self.meta = cache, meta
        self._plan: triton_prefill.PrefillPlan | None = None  # the prefill kernel's tiles, once per step

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q (1, nh, N, hd), k / v (1, nkv, N, hd) for the N packed new tokens -> attention output (1, nh, N, hd)."""
        meta, cache = self.meta, self.cache
        k_blocks, v_blocks = cache.k[layer], cache.v[layer]  # (num_blocks, bs, nkv, hd)
        nkv, hd = k_blocks.shape[2], k_blocks.shape[3]
        k_blocks.view(-1, nkv, hd)[meta.slot_mapping] = k[0].transpose(0, 1)  # store first: a token sees itself
        v_blocks.view(-1, nkv, hd)[meta.slot_mapping] = v[0].transpose(0, 1)
        tables = meta.block_tables[:, :meta.single_width]
        if not meta.multi_seqs:  # decode only: every token is its own sequence's query, in order
            return self._decode(q, k_blocks, v_blocks, tables, meta.context_lens)
        out = torch.empty_like(q)
        if len(meta.single_seqs):
            rows, seqs = meta.single_tokens, meta.single_seqs
            out[:, :, rows] = self._decode(q[:, :, rows], k_blocks, v_blocks, tables[seqs], meta.context_lens[seqs])
        if use_triton(q, k_blocks) and not _prefill_kernel_failed:  # every chunk in one launch, blocks read in place
            try:
                triton_prefill.paged_prefill(q[0].transpose(0, 1), k_blocks, v_blocks, meta.block_tables,
                                             meta.context_lens, self._prefill_plan(q, k_blocks), q.shape[-1]**-0.5,
                                             cache.sliding_window, cache.alibi, out=out[0].transpose(0, 1))
                return out
            except (ValueError, torch.OutOfMemoryError):  # bad inputs and a full GPU are not the kernel's fault
                raise
            except Exception as error:  # noqa: BLE001 - a kernel that does not compile costs speed, never the engine
                _prefill_kernel_failed.append(f"{type(error).__name__}: {error}")
                log.warning("the Triton prefill kernel failed (%s); prefill chunks take the PyTorch path",
                            _prefill_kernel_failed[0])
        starts = meta.query_start_loc
        for s in meta.multi_seqs:  # prefill chunks have their own lengths: one call per sequence
            q_s = q[:, :, starts[s]:starts[s + 1]]  # (1, nh, T, hd)
            out[:, :, starts[s]:starts[s + 1]] = self._attend_one(q_s, k_blocks, v_blocks, s)
        return out

    def _prefill_plan(self, q: torch.Tensor, k_blocks: torch.Tensor) -> triton_prefill.PrefillPlan:
        """The prefill kernel's tiles for this step's chunks: listed at the first layer, reused by the others."""
        if self._plan is None:
            meta, starts = self.meta, self.meta.query_start_loc
            self._plan = triton_prefill.plan(meta.multi_seqs, [starts[s] for s in meta.multi_seqs],
                                             [starts[s + 1] - starts[s] for s in meta.multi_seqs], q.shape[1],
                                             k_blocks.shape[2], q.shape[-1], k_blocks.shape[1], q.element_size(),
                                             q.device)
        return self._plan

    def _gather(self, blocks: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        """(S, max_blocks) block ids -> (S, nkv, max_blocks * bs, hd): each sequence's keys (or values) in order."""
        S, nb = table.shape
        # index_select copies whole block rows (on the CPU ~3x faster than blocks[table]'s advanced indexing)
        gathered = blocks.index_select(0, table.flatten())  # (S * nb, bs, nkv, hd)
        return gathered.view(S, nb * blocks.shape[1], blocks.shape[2], blocks.shape[3]).transpose(1, 2)

    def _bias(self, q_pos: torch.Tensor, k_pos: torch.Tensor, k_valid: torch.Tensor,
              dtype: torch.dtype) -> torch.Tensor:
        """Additive mask (S, 1 or nh, Tq, Tk): causal, within the window, real keys only, ALiBi when the model has it.
        q_pos (S, Tq, 1), k_pos (1, 1, Tk), k_valid (S, 1, Tk)."""
        allowed = (k_pos <= q_pos) & k_valid  # (S, Tq, Tk)
        window = self.cache.sliding_window
        if window is not None:
            allowed = allowed & (k_pos > q_pos - window)
        bias = torch.zeros(allowed.shape, dtype=torch.float32, device=allowed.device)
        bias = bias.masked_fill(~allowed, float("-inf"))[:, None]  # (S, 1, Tq, Tk)
        if self.cache.alibi is not None:  # slope * (key position - query position), <= 0 for visible keys
            bias = bias + self.cache.alibi[None, :, None, None] * (k_pos - q_pos)[:, None].float()
        return bias.to(dtype)

    def _sdpa(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        if k.shape[1] != q.shape[1]:  # GQA: fused kernels take a mask or GQA, not both, so expand k / v
            k, v = k.repeat_interleave(q.shape[1] // k.shape[1], 1), v.repeat_interleave(q.shape[1] // k.shape[1], 1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)

    def _decode(self, q: torch.Tensor, k_blocks: torch.Tensor, v_blocks: torch.Tensor, tables: torch.Tensor,
                context_lens: torch.Tensor) -> torch.Tensor:
        """One new token for each of D sequences, q (1, nh, D, hd): gather every sequence's keys, padded to the
        longest, and attend in one batched product. The g = nh / nkv query heads of a KV group share one matmul
        against their keys, so GQA keys are never expanded (that copy would be g times the batch's keys, per layer).
        Without ALiBi the product is SDPA's under a boolean mask (real keys, within the window). On CUDA with Triton,
        triton_decode's kernel reads the blocks in place instead of gathering them."""
        hd = q.shape[-1]
        if use_triton(q, k_blocks):
            decode = paged_decode_op if torch.compiler.is_compiling() else triton_decode.paged_decode
            out = decode(q[0].transpose(0, 1), k_blocks, v_blocks, tables, context_lens, hd**-0.5,
                         self.cache.sliding_window, self.cache.alibi)  # (D, nh, hd)
            return out.transpose(0, 1)[None]  # (1, nh, D, hd)
        k, v = self._gather(k_blocks, tables), self._gather(v_blocks, tables)  # (D, nkv, Tk, hd)
        D, nkv, Tk, hd = k.shape
        nh = q.shape[1]
        q = q[0].transpose(0, 1).reshape(D, nkv, nh // nkv, hd)  # (D, nkv, g, hd): a group's heads as g queries
        k_pos = torch.arange(Tk, device=q.device)[None, None]  # (1, 1, Tk)
        q_pos = (context_lens - 1)[:, None, None]  # (D, 1, 1): the new token is the last one
        if self.cache.alibi is None:  # a boolean mask: SDPA's fused kernel (on the CPU about half the time of the
            # product below, 4-64 sequences of 30-380 keys measured)
            allowed = k_pos < context_lens[:, None, None]  # (D, 1, Tk)
            if self.cache.sliding_window is not None:
                allowed = allowed & (k_pos > q_pos - self.cache.sliding_window)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed[:, None])  # (D, nkv, g, hd)
            return out.reshape(D, nh, hd).transpose(0, 1)[None]  # (1, nh, D, hd)
        bias = self._bias(q_pos, k_pos, k_pos < context_lens[:, None, None], torch.float32)  # (D, 1|nh, 1, Tk)
        bias = bias.view(D, nkv, nh // nkv, Tk) if bias.shape[1] == nh else bias.view(D, 1, 1, Tk)
        scores = (q @ k.transpose(-1, -2)).float() * hd**-0.5 + bias  # (D, nkv, g, Tk)
        out = scores.softmax(-1).to(v.dtype) @ v  # (D, nkv, g, hd)
        return out.reshape(D, nh, hd).transpose(0, 1)[None]  # (1, nh, D, hd)

    def _attend_one(self, q: torch.Tensor, k_blocks: torch.Tensor, v_blocks: torch.Tensor, s: int) -> torch.Tensor:
        """Sequence s: its T new queries (1, nh, T, hd) against its whole context."""
        meta = self.meta
        ctx = meta.context_lens_host[s]
        table = meta.block_tables[s:s + 1, :(ctx + k_blocks.shape[1] - 1) // k_blocks.shape[1]]
        k = self._gather(k_blocks, table)[:, :, :ctx]  # (1, nkv, ctx, hd)
        v = self._gather(v_blocks, table)[:, :, :ctx]
        T = q.shape[2]
        q_pos = torch.arange(ctx - T, ctx, device=q.device)[None, :, None]  # (1, T, 1)
        k_pos = torch.arange(ctx, device=q.device)[None, None]  # (1, 1, ctx)
        if self.cache.sliding_window is None and self.cache.alibi is None:
            if T == ctx:  # a whole prompt from scratch: the plain causal fast path (flash on GPU, GQA native)
                return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=k.shape[1] != q.shape[1])
            # a later chunk: causal aligned to the last key (query i sees keys up to ctx - T + i); SDPA takes this
            # without a dense mask (a fused kernel on GPU, where a (T, ctx) float mask made each chunk ~10x slower).
            # GQA: the CPU kernel takes the groups as they are (identical output, 10-20% faster than expanding, a
            # (256, 1024) chunk measured); elsewhere k / v are expanded, as this path always did
            gqa = k.shape[1] != q.shape[1]
            if gqa and not q.device.type == "cpu":
                k, v = k.repeat_interleave(q.shape[1] // k.shape[1], 1), v.repeat_interleave(q.shape[1] // k.shape[1], 1)
                gqa = False
            return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(T, ctx), enable_gqa=gqa)
        return self._sdpa(q, k, v, self._bias(q_pos, k_pos, torch.ones_like(k_pos, dtype=torch.bool), q.dtype))
