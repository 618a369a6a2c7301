"""A Triton paged-decode attention kernel: the optional CUDA fast path for PagedBatch._decode.

Decode steps attend one new query per sequence against that sequence's cached keys, which are scattered over the
paged cache's blocks (see paged_attention.py). The PyTorch reference gathers every sequence's keys into a padded
copy first; this kernel reads them in place through the block table instead, one block at a time, and never
materializes the scores of more than one block.

Work split: one program per (sequence, kv head, split). It loads the g = nh / nkv query heads that share that kv head
and scores them together against each key block, so under GQA every key and value is read from memory once, not g
times. A sequence's keys are split over several programs when sequences x kv heads alone would leave most of the GPU
idle (batch 1 has nkv programs: 4 for TinyLlama, on 132 SMs, each walking every key): each split keeps its own running
softmax over its share of the keys, and a second small kernel merges the splits (flash-decoding; vLLM's paged
attention v2). Large batches take one split and write the output directly.
With block_size and head_dim >= 16 the two products are tl.dot on tensor cores, the query heads padded to 16 rows
(tl.dot's minimum; decode is memory-bound, so the idle rows cost little); smaller tiles use broadcast products.
It walks the sequence's keys in order, several blocks per iteration on the tl.dot path (64 keys: each key finds its
block through the table, so more loads are in flight than with one 16-key block), keeping a running
(flash-decoding style, single pass) softmax in fp32:

    for each tile of keys K_b and values V_b, scores s = q K_b^T * scale (+ ALiBi), masked to -inf where hidden:
        m'  = max(m, max(s))                  running maximum of the scores seen so far
        a   = exp(m - m')                     rescales what was accumulated under the old maximum
        p   = exp(s - m')
        l   = l * a + sum(p)                  running softmax denominator
        acc = acc * a + p V_b                 running numerator
        m   = m'
    out = acc / l

Masks: keys at or past the sequence's context length (the new token is the last key, at position context_len - 1),
and with a sliding window keys at positions <= query_pos - window. ALiBi adds slope[h] * (key_pos - query_pos).

Triton is optional: without it (or without a CUDA device) `available()` is False and callers keep the PyTorch path.
Set TRITON_INTERPRET=1 to run the kernel on CPU tensors through Triton's interpreter (what the tests do); the kernel
is compiled lazily, so that variable only needs to be set before the first call.
"""

from __future__ import annotations

import functools

import torch

from camelid.triton_support import available, jit  # noqa: F401 (available: this kernel's callers ask here)

try:
    import triton
    import triton.language as tl
except ImportError:  # Triton is an optional dependency: the module still imports, available() says False
    triton = tl = None


MAX_TILE_BYTES = 64 * 1024  # one (block_size, head_dim) key tile; Triton stages K and V tiles in shared memory,
# about 2.2x this in all (measured: a 128 KiB fp32 tile asked 280 KiB of sm_90's 227 KiB)


def supports(head_dim: int, block_size: int, dtype: torch.dtype = torch.bfloat16) -> bool:
    """Whether the kernel handles these sizes: both are tl.constexpr tile widths, so they must be powers of two,
    and a key tile of this dtype must leave its staged copies room in shared memory."""
    tile = block_size * head_dim * torch.empty((), dtype=dtype).element_size()
    return _is_power_of_two(head_dim) and _is_power_of_two(block_size) and tile <= MAX_TILE_BYTES


KEYS_PER_ITERATION = 64  # keys a program scores per loop iteration on the tl.dot path (several blocks of 16)


def keys_per_iteration(block_size: int, head_dim: int, itemsize: int, use_dot: bool) -> int:
    """Keys per loop iteration: whole blocks, up to KEYS_PER_ITERATION on the tl.dot path while a key tile stays
    within MAX_TILE_BYTES / 2; one block on the broadcast path (its (G, K, hd) product lives in registers)."""
    keys = block_size
    while use_dot and keys * 2 <= KEYS_PER_ITERATION and keys * 2 * head_dim * itemsize <= MAX_TILE_BYTES // 2:
        keys *= 2
    return keys


def check_inputs(name: str, q: torch.Tensor, k_blocks: torch.Tensor, v_blocks: torch.Tensor,
                 block_tables: torch.Tensor, context_lens: torch.Tensor, sliding_window: int | None,
                 alibi_slopes: torch.Tensor | None) -> None:
    """The checks a paged attention kernel (this one, triton_prefill's) makes before launching: q (tokens, nh, hd),
    k/v blocks (num_blocks, block_size, nkv, hd) of one shape and q's dtype, sizes `supports` takes, a 2-d table, one
    device. Raises ValueError naming the kernel."""
    if triton is None:
        raise ValueError(f"{name} needs Triton, which is not installed (check available() first)")
    if q.dim() != 3 or k_blocks.dim() != 4 or v_blocks.shape != k_blocks.shape:
        raise ValueError(f"expected q (tokens, nh, hd) and k/v blocks (num_blocks, block_size, nkv, hd) of one "
                         f"shape, got q {tuple(q.shape)}, k {tuple(k_blocks.shape)}, v {tuple(v_blocks.shape)}")
    _, nh, hd = q.shape
    _, block_size, nkv, k_hd = k_blocks.shape
    if k_hd != hd or nh % nkv:
        raise ValueError(f"q {tuple(q.shape)} does not fit kv blocks {tuple(k_blocks.shape)}: head_dim must match "
                         "and num_heads be a multiple of num_kv_heads")
    if k_blocks.stride() != v_blocks.stride():
        raise ValueError(f"k and v blocks must share strides, got {k_blocks.stride()} and {v_blocks.stride()}")
    if not q.dtype == k_blocks.dtype == v_blocks.dtype:
        raise ValueError(f"q and the kv blocks must share a dtype, got {q.dtype}, {k_blocks.dtype}, {v_blocks.dtype}")
    if not supports(hd, block_size, q.dtype):
        raise ValueError(f"{name} needs power-of-two head_dim and block_size with a key tile of at most "
                         f"{MAX_TILE_BYTES} bytes, got {hd}, {block_size} and {q.dtype}")
    if block_tables.dim() != 2 or context_lens.dim() != 1:
        raise ValueError(f"expected block_tables (sequences, max_blocks) and context_lens (sequences,), got "
                         f"{tuple(block_tables.shape)} and {tuple(context_lens.shape)}")
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"sliding_window must be >= 1, got {sliding_window}")
    if alibi_slopes is not None and tuple(alibi_slopes.shape) != (nh,):
        raise ValueError(f"expected alibi_slopes ({nh},), got {tuple(alibi_slopes.shape)}")
    tensors = [q, k_blocks, v_blocks, block_tables, context_lens] + ([alibi_slopes] if alibi_slopes is not None else [])
    if len({t.device for t in tensors}) != 1:
        raise ValueError(f"{name} inputs must share one device, got {sorted({str(t.device) for t in tensors})}")


def _is_power_of_two(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def _paged_decode_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, table_ptr, ctx_ptr, slopes_ptr, m_part_ptr, l_part_ptr, acc_part_ptr,
    scale, window,
    q_stride_seq, q_stride_head, q_stride_dim,
    kv_stride_block, kv_stride_slot, kv_stride_head, kv_stride_dim,
    out_stride_seq, out_stride_head, out_stride_dim,
    table_stride_seq, table_stride_block,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    KEYS: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_ALIBI: tl.constexpr, USE_DOT: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
):
    """Program (seq, kv_head, split): the GROUP query heads of kv_head for sequence seq, over the split-th share of
    its keys (whole iterations of KEYS keys; all of them with NUM_SPLITS 1). GROUP_PAD = GROUP rounded up to a
    power of two (tile shapes must be), and to 16 with USE_DOT; padding rows compute on zeros and are never stored.
    Each iteration takes KEYS keys (a multiple of BLOCK_SIZE: several blocks, each key finding its own block through
    the table), so a program keeps more loads in flight than one 16-key block at a time."""
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    n_heads = tl.num_programs(1) * GROUP
    ctx = tl.load(ctx_ptr + seq).to(tl.int32)  # keys of this sequence, the new token included
    q_pos = ctx - 1  # the new token is the last key

    group = tl.arange(0, GROUP_PAD)  # (G,)
    head_ok = group < GROUP
    heads = kv_head * GROUP + group  # (G,) query heads served by this kv head (GQA groups are contiguous)
    dims = tl.arange(0, HEAD_DIM)  # (hd,)
    keys = tl.arange(0, KEYS)  # (K,) key offsets within one iteration

    q_offs = seq * q_stride_seq + heads[:, None] * q_stride_head + dims[None, :] * q_stride_dim
    q = tl.load(q_ptr + q_offs, mask=head_ok[:, None], other=0.0)  # (G, hd) in the input dtype
    if HAS_ALIBI:
        slopes = tl.load(slopes_ptr + heads, mask=head_ok, other=0.0).to(tl.float32)  # (G,)

    # Blocks wholly before the window hold no visible key: start at the block of the oldest visible one.
    first_key = 0
    if HAS_WINDOW:
        first_key = (tl.maximum(q_pos - window + 1, 0) // BLOCK_SIZE) * BLOCK_SIZE

    # This split's keys: an equal share of the iterations from first_key on. The shares are fixed by the context, so
    # a split past the last key has nothing to do (the merge kernel skips it by the same arithmetic).
    iterations = (ctx - first_key + KEYS - 1) // KEYS
    share = (iterations + NUM_SPLITS - 1) // NUM_SPLITS * KEYS
    lo = first_key + split * share
    hi = tl.minimum(lo + share, ctx)  # <= lo for a split past the last key: no iteration, nothing stored

    # A finite start for the running max keeps exp(m - m') at 1, not NaN, should a block be fully masked.
    m = tl.full((GROUP_PAD,), -1.0e30, tl.float32)  # (G,) running max score
    l = tl.zeros((GROUP_PAD,), tl.float32)  # (G,) running softmax denominator
    acc = tl.zeros((GROUP_PAD, HEAD_DIM), tl.float32)  # (G, hd) running numerator
    for start in range(lo, hi, KEYS):
        k_pos = start + keys  # (K,) positions of this iteration's keys in the sequence
        visible = k_pos < hi
        if HAS_WINDOW:
            visible = visible & (k_pos > q_pos - window)
        # the block of each key (table entries past the sequence's last block are not read)
        block_id = tl.load(table_ptr + seq * table_stride_seq + (k_pos // BLOCK_SIZE) * table_stride_block,
                           mask=visible, other=0).to(tl.int64)  # (K,)
        slot = k_pos % BLOCK_SIZE
        # Hidden slots are not loaded: the tail of the last block may hold stale (even non-finite) data, and
        # 0 * NaN would poison the sum below.
        # keys and values share one layout (checked by check_inputs): one (K, hd) offset grid serves both loads,
        # which halves the registers holding 64-bit addresses (more programs fit on an SM)
        kv_offs = (block_id * kv_stride_block + slot * kv_stride_slot + kv_head * kv_stride_head)[:, None] \
            + dims[None, :] * kv_stride_dim
        k = tl.load(k_ptr + kv_offs, mask=visible[:, None], other=0.0)  # (K, hd)
        v = tl.load(v_ptr + kv_offs, mask=visible[:, None], other=0.0)  # (K, hd)

        if USE_DOT:  # (G, K) scores, accumulated in fp32; "ieee": fp32 inputs multiply in fp32, not tf32
            s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
        else:  # tl.dot needs every tile dim >= 16: a broadcast product over (G, bs, hd) instead
            s = tl.sum(q.to(tl.float32)[:, None, :] * k.to(tl.float32)[None, :, :], axis=2) * scale
        if HAS_ALIBI:
            s += slopes[:, None] * (k_pos - q_pos).to(tl.float32)[None, :]
        s = tl.where(visible[None, :], s, float("-inf"))

        m_new = tl.maximum(m, tl.max(s, axis=1))  # (G,)
        alpha = tl.exp(m - m_new)  # (G,)
        p = tl.exp(s - m_new[:, None])  # (G, K)
        l = l * alpha + tl.sum(p, axis=1)
        if USE_DOT:  # probabilities in the values' dtype for the product, as the PyTorch path does
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")  # (G, hd)
        else:
            acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v.to(tl.float32)[None, :, :], axis=1)
        m = m_new

    if NUM_SPLITS == 1:
        out = acc / tl.where(l > 0, l, 1.0)[:, None]  # l is 0 only for an empty context: output zeros, not NaN
        out_offs = seq * out_stride_seq + heads[:, None] * out_stride_head + dims[None, :] * out_stride_dim
        tl.store(out_ptr + out_offs, out.to(out_ptr.dtype.element_ty), mask=head_ok[:, None])
    else:  # this split's running max, denominator and unnormalised numerator, for _merge_splits_kernel
        part = (seq * n_heads + heads) * NUM_SPLITS + split  # (G,) rows of the (D, nh, S) partials
        ok = head_ok & (lo < ctx)
        tl.store(m_part_ptr + part, m, mask=ok)
        tl.store(l_part_ptr + part, l, mask=ok)
        tl.store(acc_part_ptr + part[:, None] * HEAD_DIM + dims[None, :], acc, mask=ok[:, None])


def _merge_splits_kernel(
    m_part_ptr, l_part_ptr, acc_part_ptr, out_ptr, ctx_ptr, window,
    out_stride_seq, out_stride_head, out_stride_dim,
    HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, KEYS: tl.constexpr, HAS_WINDOW: tl.constexpr,
    NUM_SPLITS: tl.constexpr, SPLITS_PAD: tl.constexpr,
):
    """Program (seq, head): out = sum_s e^(m_s - M) acc_s / sum_s e^(m_s - M) l_s with M = max_s m_s, over the
    splits that had keys (the same arithmetic as the split kernel's: the others wrote nothing)."""
    seq = tl.program_id(0)
    head = tl.program_id(1)
    n_heads = tl.num_programs(1)
    ctx = tl.load(ctx_ptr + seq).to(tl.int32)
    first_key = 0
    if HAS_WINDOW:
        first_key = (tl.maximum(ctx - 1 - window + 1, 0) // BLOCK_SIZE) * BLOCK_SIZE
    iterations = (ctx - first_key + KEYS - 1) // KEYS
    per_split = (iterations + NUM_SPLITS - 1) // NUM_SPLITS
    used = (iterations + per_split - 1) // per_split  # splits that were given keys

    splits = tl.arange(0, SPLITS_PAD)  # (S,)
    ok = splits < used
    dims = tl.arange(0, HEAD_DIM)
    part = (seq * n_heads + head) * NUM_SPLITS + splits  # (S,)
    m = tl.load(m_part_ptr + part, mask=ok, other=-1.0e30)  # (S,)
    l = tl.load(l_part_ptr + part, mask=ok, other=0.0)
    acc = tl.load(acc_part_ptr + part[:, None] * HEAD_DIM + dims[None, :], mask=ok[:, None], other=0.0)  # (S, hd)
    weight = tl.exp(m - tl.max(m, axis=0))  # (S,) each split's rescale to the common maximum
    total = tl.sum(weight * l, axis=0)
    out = tl.sum(weight[:, None] * acc, axis=0) / tl.where(total > 0, total, 1.0)  # (hd,)
    tl.store(out_ptr + seq * out_stride_seq + head * out_stride_head + dims * out_stride_dim,
             out.to(out_ptr.dtype.element_ty))


def paged_decode(q: torch.Tensor, k_blocks: torch.Tensor, v_blocks: torch.Tensor, block_tables: torch.Tensor,
                 context_lens: torch.Tensor, scale: float, sliding_window: int | None = None,
                 alibi_slopes: torch.Tensor | None = None, num_splits: int | None = None) -> torch.Tensor:
    """One new token per sequence attended against its paged keys.

    q (D, nh, hd), any strides; k_blocks / v_blocks (num_blocks, block_size, nkv, hd); block_tables (D, max_blocks)
    int32/int64 block ids (entries past a sequence's last block are never read); context_lens (D,) keys per sequence,
    the new token included, each >= 1; alibi_slopes (nh,) or None; num_splits: programs per sequence and kv head
(None: `splits_for` picks). Returns (D, nh, hd) in q's dtype.
    Raises ValueError for shapes the kernel does not handle (check `supports` first to fall back instead)."""
    check_inputs("paged_decode", q, k_blocks, v_blocks, block_tables, context_lens, sliding_window, alibi_slopes)
    D, nh, hd = q.shape
    _, block_size, nkv, _ = k_blocks.shape
    if block_tables.shape[0] != D or tuple(context_lens.shape) != (D,):
        raise ValueError(f"expected block_tables ({D}, max_blocks) and context_lens ({D},), got "
                         f"{tuple(block_tables.shape)} and {tuple(context_lens.shape)}")

    out = torch.empty((D, nh, hd), dtype=q.dtype, device=q.device)
    if D == 0:
        return out
    group = nh // nkv
    use_dot = block_size >= 16 and hd >= 16
    group_pad = max(triton.next_power_of_2(group), 16 if use_dot else 1)
    # The broadcast path holds a (G, bs, hd) fp32 product in registers: spread it so each thread keeps <= 64 values.
    num_warps = 4 if use_dot else max(4, min(16, group_pad * block_size * hd // 2048))
    slopes = alibi_slopes.float().contiguous() if alibi_slopes is not None else context_lens  # dummy, never read
    keys = keys_per_iteration(block_size, hd, q.element_size(), use_dot)
    if num_splits is None:
        num_splits = splits_for(D * nkv, -(-block_tables.shape[1] * block_size // keys), q.device)
    if num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    # (D, nh, S) running maxima and denominators and (D, nh, S, hd) numerators of the splits (with one split the
    # kernel writes the output itself and never reads these)
    partial = (D, nh, num_splits) if num_splits > 1 else (1,)
    m_part = torch.empty(partial, dtype=torch.float32, device=q.device)
    l_part = torch.empty(partial, dtype=torch.float32, device=q.device)
    acc_part = torch.empty(partial + ((hd,) if num_splits > 1 else ()), dtype=torch.float32, device=q.device)
    constants = dict(HEAD_DIM=hd, BLOCK_SIZE=block_size, KEYS=keys, HAS_WINDOW=sliding_window is not None,
                     NUM_SPLITS=num_splits)
    jit(_paged_decode_kernel)[(D, nkv, num_splits)](
        q, k_blocks, v_blocks, out, block_tables, context_lens, slopes, m_part, l_part, acc_part,
        float(scale), sliding_window or 0,
        *q.stride(), *k_blocks.stride(), *out.stride(), *block_tables.stride(),
        GROUP=group, GROUP_PAD=group_pad, HAS_ALIBI=alibi_slopes is not None, USE_DOT=use_dot,
        num_warps=num_warps, **constants,
    )
    if num_splits > 1:
        jit(_merge_splits_kernel)[(D, nh)](
            m_part, l_part, acc_part, out, context_lens, sliding_window or 0, *out.stride(),
            SPLITS_PAD=triton.next_power_of_2(num_splits), **constants,
        )
    return out


def splits_for(programs: int, iterations: int, device: torch.device) -> int:
    """How many programs share one sequence's keys: enough that programs x splits fills the device twice over (two
    programs an SM), never more than the longest table's iterations of keys (a split with none exits at once).
    Under CUDA graphs the table width is the captured one, so the count is fixed per captured batch size."""
    target = 2 * _multiprocessors(device)
    return max(1, min(-(-target // programs), iterations, MAX_SPLITS))


MAX_SPLITS = 64  # the merge kernel holds (splits, head_dim) fp32 partials in registers


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 2  # Triton's interpreter on the CPU: a small count, so that the tests exercise splitting
