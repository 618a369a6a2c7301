"""A Triton paged-prefill attention kernel: the CUDA fast path for the prefill chunks of a step (PagedBatch.attend).

A step that mixes decodes with prefill chunks packs every sequence's new tokens into one row (paged_attention.py).
Each chunk's T queries sit at the last T positions of its sequence, ctx - T .. ctx - 1, and attend causally to all
ctx keys, the earlier chunks' included, which live in the paged cache (the new keys are written there first). The
PyTorch path takes the chunks one at a time: gather the sequence's keys out of its blocks, expand the GQA groups,
call SDPA; a dozen launches per chunk and layer, and a copy of every key. This kernel takes all the chunks of a step
in one launch and reads the keys in place through the block tables.

Work split: one program per (tile, kv head). A tile is up to QUERIES consecutive queries of one sequence; the host
lists the tiles of the step once (`plan`), every layer reuses them. A program scores its QUERIES queries times the
g = nh / nkv query heads sharing the kv head as the rows of one matrix (row r: query r // GROUP_PAD, head
r % GROUP_PAD), so each key tile is read once for all of them and both products are tl.dot on tensor cores (rows
>= 16). It walks the keys from the first one any of its queries may see (0, or the window's start) to its last
query's position, KEYS at a time, with triton_decode's running softmax (see that module's docstring); a key is hidden
from a row past that row's position (causal), at or before position - window, and ALiBi adds
slope[h] * (key_pos - query_pos).

Decodes keep triton_decode's kernel: its grid is fixed by the batch (what CUDA graphs need) and its rows are one
query each.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from camelid.engine.triton_decode import check_inputs, keys_per_iteration
from camelid.triton_support import jit

try:
    import triton
    import triton.language as tl
except ImportError:  # optional: triton_support.available() says False, callers keep the PyTorch path
    triton = tl = None

TILE_ELEMENTS = 128 * 64  # rows x head_dim of a program's query tile on the tl.dot path, 16-bit inputs (half for
# fp32): compiles for sm_90 without register spills at 8 warps (ptxas -v); more rows share each key tile read


@dataclass
class PrefillPlan:
    """The tiles of one step's prefill chunks: rows of (sequence, its first token among the packed N, its number of
    new tokens T, the tile's first query among those T)."""

    tiles: torch.Tensor  # (num_tiles, 4) int32
    queries_per_tile: int
    group_pad: int
    use_dot: bool


def tile_shape(num_heads: int, num_kv_heads: int, head_dim: int, block_size: int,
               itemsize: int) -> tuple[int, int, bool]:
    """(queries per tile, padded group, use_dot) for these sizes and bytes per element. The group pads to a power of
    two (tile shapes must be); tl.dot needs >= 16 rows, key tiles of >= 16 and head_dim >= 16, else broadcast
    products over a few rows."""
    group_pad = 1 << (num_heads // num_kv_heads - 1).bit_length()
    use_dot = block_size >= 16 and head_dim >= 16
    if use_dot:
        rows = max(16, TILE_ELEMENTS // head_dim // max(1, itemsize // 2))
    else:
        rows = 4  # the broadcast path keeps a (rows, keys, hd) product in registers
    return max(rows // group_pad, 1), group_pad, use_dot


def num_warps(rows: int, head_dim: int) -> int:
    """Warps per program: the (rows, hd) fp32 accumulator and the (rows, keys) scores live in registers; 8 warps
    from 64 x 128 on (4 spilled there when compiled for sm_90, at 255 registers a thread)."""
    return 8 if rows * head_dim >= 64 * 128 else 4


def plan(seqs: list[int], query_starts: list[int], query_lens: list[int], num_heads: int, num_kv_heads: int,
         head_dim: int, block_size: int, itemsize: int, device: torch.device) -> PrefillPlan:
    """Tiles covering the T = query_lens[i] queries of sequence seqs[i] (a row of the block tables), which start at
    query_starts[i] among the step's packed tokens; itemsize: bytes per element of q and the cache."""
    queries, group_pad, use_dot = tile_shape(num_heads, num_kv_heads, head_dim, block_size, itemsize)
    rows = [(s, start, n, first) for s, start, n in zip(seqs, query_starts, query_lens) for first in range(0, n, queries)]
    tiles = torch.tensor(rows, dtype=torch.int32).reshape(-1, 4).to(device, non_blocking=True)
    return PrefillPlan(tiles, queries, group_pad, use_dot)


def _paged_prefill_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, table_ptr, ctx_ptr, tiles_ptr, slopes_ptr,
    scale, window,
    q_stride_tok, q_stride_head, q_stride_dim,
    kv_stride_block, kv_stride_slot, kv_stride_head, kv_stride_dim,
    out_stride_tok, out_stride_head, out_stride_dim,
    table_stride_seq, table_stride_block,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, QUERIES: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, KEYS: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_ALIBI: tl.constexpr,
    USE_DOT: tl.constexpr,
):
    """Program (tile, kv_head). Rows that pad the group or run past the sequence's queries compute on zeros and are
    never stored."""
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    seq = tl.load(tiles_ptr + tile * 4)
    token0 = tl.load(tiles_ptr + tile * 4 + 1)  # the sequence's first new token among the packed ones
    num_queries = tl.load(tiles_ptr + tile * 4 + 2)  # its new tokens this step, T
    first = tl.load(tiles_ptr + tile * 4 + 3)  # this tile's first query among them
    ctx = tl.load(ctx_ptr + seq).to(tl.int32)  # keys of the sequence, the new ones included
    offset = ctx - num_queries  # position of query 0

    rows = tl.arange(0, QUERIES * GROUP_PAD)  # (M,)
    query = first + rows // GROUP_PAD  # (M,) index among the sequence's new tokens
    group = rows % GROUP_PAD
    row_ok = (group < GROUP) & (query < num_queries)
    heads = kv_head * GROUP + group  # (M,) GQA groups are contiguous
    q_pos = offset + query  # (M,) position of each row's query in the sequence
    dims = tl.arange(0, HEAD_DIM)
    keys = tl.arange(0, KEYS)

    tokens = (token0 + query).to(tl.int64)
    q_offs = tokens[:, None] * q_stride_tok + heads[:, None] * q_stride_head + dims[None, :] * q_stride_dim
    q = tl.load(q_ptr + q_offs, mask=row_ok[:, None], other=0.0)  # (M, hd)
    if HAS_ALIBI:
        slopes = tl.load(slopes_ptr + heads, mask=row_ok, other=0.0).to(tl.float32)  # (M,)

    key_end = offset + tl.minimum(first + QUERIES, num_queries)  # past the tile's last query: causal stop
    first_key = 0
    if HAS_WINDOW:  # blocks wholly before the first query's window hold no visible key
        first_key = (tl.maximum(offset + first - window + 1, 0) // BLOCK_SIZE) * BLOCK_SIZE

    m = tl.full((QUERIES * GROUP_PAD,), -1.0e30, tl.float32)  # finite: exp(m - m') stays 1 on fully hidden tiles
    l = tl.zeros((QUERIES * GROUP_PAD,), tl.float32)
    acc = tl.zeros((QUERIES * GROUP_PAD, HEAD_DIM), tl.float32)
    for start in range(first_key, key_end, KEYS):
        k_pos = start + keys  # (K,)
        present = k_pos < key_end  # slots past it are not loaded (stale, maybe non-finite)
        block_id = tl.load(table_ptr + seq * table_stride_seq + (k_pos // BLOCK_SIZE) * table_stride_block,
                           mask=present, other=0).to(tl.int64)
        # keys and values share one layout (check_inputs): one (K, hd) offset grid serves both loads
        kv_offs = (block_id * kv_stride_block + (k_pos % BLOCK_SIZE) * kv_stride_slot + kv_head * kv_stride_head
                   )[:, None] + dims[None, :] * kv_stride_dim
        k = tl.load(k_ptr + kv_offs, mask=present[:, None], other=0.0)  # (K, hd)
        v = tl.load(v_ptr + kv_offs, mask=present[:, None], other=0.0)  # (K, hd)

        if USE_DOT:
            s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale  # (M, K)
        else:
            s = tl.sum(q.to(tl.float32)[:, None, :] * k.to(tl.float32)[None, :, :], axis=2) * scale
        if HAS_ALIBI:
            s += slopes[:, None] * (k_pos[None, :] - q_pos[:, None]).to(tl.float32)
        visible = present[None, :] & (k_pos[None, :] <= q_pos[:, None])  # (M, K)
        if HAS_WINDOW:
            visible = visible & (k_pos[None, :] > q_pos[:, None] - window)
        s = tl.where(visible, s, float("-inf"))

        m_new = tl.maximum(m, tl.max(s, axis=1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(s - m_new[:, None])
        l = l * alpha + tl.sum(p, axis=1)
        if USE_DOT:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v.to(tl.float32)[None, :, :], axis=1)
        m = m_new

    out = acc / tl.where(l > 0, l, 1.0)[:, None]
    out_offs = tokens[:, None] * out_stride_tok + heads[:, None] * out_stride_head + dims[None, :] * out_stride_dim
    tl.store(out_ptr + out_offs, out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])


def paged_prefill(q: torch.Tensor, k_blocks: torch.Tensor, v_blocks: torch.Tensor, block_tables: torch.Tensor,
                  context_lens: torch.Tensor, tiles: PrefillPlan, scale: float, sliding_window: int | None = None,
                  alibi_slopes: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """The prefill chunks that `tiles` (from `plan`) cover, attended against their sequences' paged keys.

    q (N, nh, hd), the step's packed queries, any strides; k_blocks / v_blocks (num_blocks, block_size, nkv, hd),
    holding every key up to each sequence's context length (this step's included); block_tables (S, max_blocks) and
    context_lens (S,) per sequence of the step; alibi_slopes (nh,) or None. Writes the covered tokens' rows of `out`
    (N, nh, hd), any strides (a new tensor when None; its other rows are left as they are) and returns it.
    Raises ValueError for inputs the kernel does not handle (triton_decode.supports tells first)."""
    check_inputs("paged_prefill", q, k_blocks, v_blocks, block_tables, context_lens, sliding_window, alibi_slopes)
    N, nh, hd = q.shape
    _, block_size, nkv, _ = k_blocks.shape
    if block_tables.shape[0] != context_lens.shape[0]:
        raise ValueError(f"block_tables {tuple(block_tables.shape)} and context_lens {tuple(context_lens.shape)} "
                         "must have a row per sequence")
    queries, group_pad, use_dot = tile_shape(nh, nkv, hd, block_size, q.element_size())
    if (tiles.queries_per_tile, tiles.group_pad, tiles.use_dot) != (queries, group_pad, use_dot):
        raise ValueError("the tiles were planned for other head, block or element sizes")
    if out is None:
        out = torch.empty((N, nh, hd), dtype=q.dtype, device=q.device)
    elif out.shape != q.shape or out.dtype != q.dtype:
        raise ValueError(f"out must be {tuple(q.shape)} {q.dtype}, got {tuple(out.shape)} {out.dtype}")
    if len(tiles.tiles) == 0:
        return out
    rows = queries * group_pad
    slopes = alibi_slopes.float().contiguous() if alibi_slopes is not None else context_lens  # dummy, never read
    jit(_paged_prefill_kernel)[(len(tiles.tiles), nkv)](
        q, k_blocks, v_blocks, out, block_tables, context_lens, tiles.tiles, slopes,
        float(scale), sliding_window or 0,
        *q.stride(), *k_blocks.stride(), *out.stride(), *block_tables.stride(),
        GROUP=nh // nkv, GROUP_PAD=group_pad, QUERIES=queries, HEAD_DIM=hd, BLOCK_SIZE=block_size,
        KEYS=keys_per_iteration(block_size, hd, q.element_size(), use_dot),
        HAS_WINDOW=sliding_window is not None, HAS_ALIBI=alibi_slopes is not None, USE_DOT=use_dot,
        num_warps=num_warps(rows, hd),
    )
    return out
