"""BlockManager: reference counts, the free list, prefix-cache hits keyed by the whole prefix, LRU eviction of
unreferenced cached blocks, copy-on-write of a shared partial block."""

import pytest

from camelid.engine.block_manager import BlockManager
from camelid.engine.sampling_params import SamplingParams
from camelid.engine.sequence import Sequence

BS = 4


def make_seq(tokens: list[int], seq_id: int = 0, adapter_key: str | None = None) -> Sequence:
    return Sequence(seq_id, str(seq_id), 0, tokens, SamplingParams(), adapter_key=adapter_key)


def compute(bm: BlockManager, seq: Sequence, n: int | None = None) -> list[tuple[int, int]]:
    """What one scheduled step does to the block manager: reserve, 'compute' the tokens, register full blocks."""
    n = seq.num_uncomputed_tokens if n is None else n
    copies = bm.reserve(seq, n)
    assert copies is not None
    seq.num_computed_tokens += n
    bm.register_full_blocks(seq)
    return copies


def test_allocate_and_free_restore_every_block():
    bm = BlockManager(8, BS)
    seq = make_seq(list(range(10)))
    compute(bm, seq)
    assert len(seq.block_table) == 3 and len(set(seq.block_table)) == 3  # 10 tokens in blocks of 4
    assert bm.num_free_blocks == 5
    assert all(bm.blocks[b].ref_count == 1 for b in seq.block_table)
    bm.free(seq)
    assert bm.num_free_blocks == 8 and seq.block_table == [] and seq.num_computed_tokens == 0


def test_reserve_refuses_without_changing_anything():
    bm = BlockManager(2, BS)
    seq = make_seq(list(range(12)))
    assert bm.reserve(seq, 12) is None  # needs 3 blocks, 2 exist
    assert seq.block_table == [] and bm.num_free_blocks == 2
    assert bm.reserve(seq, 8) == [] and len(seq.block_table) == 2  # a chunk that fits


def test_prefix_hit_reuses_blocks_of_the_same_prefix_only():
    bm = BlockManager(16, BS)
    first = make_seq(list(range(11)), 0)
    compute(bm, first)  # blocks [0..3] [4..7] full and cached, [8..10] partial
    same_start = make_seq(list(range(9)) + [50, 51], 1)
    assert bm.allocate_cached_prefix(same_start) == 8
    assert same_start.block_table == first.block_table[:2] and same_start.num_computed_tokens == 8
    assert [bm.blocks[b].ref_count for b in first.block_table[:2]] == [2, 2]

    # the same tokens in block 2 but a different block 1: the hash covers the whole prefix, so only block 0 hits
    other = make_seq([0, 1, 2, 3, 99, 5, 6, 7, 8, 9, 10], 2)
    assert bm.allocate_cached_prefix(other) == 4
    # another adapter changes every key/value: no hit at all
    adapted = make_seq(list(range(11)), 3, adapter_key="sql#0")
    assert bm.allocate_cached_prefix(adapted) == 0


def test_the_last_prompt_token_is_always_computed():
    bm = BlockManager(8, BS)
    compute(bm, make_seq(list(range(8)), 0))
    again = make_seq(list(range(8)), 1)  # both blocks are cached, but the last token's logits are needed
    assert bm.allocate_cached_prefix(again) == 4
    assert bm.allocate_cached_prefix(make_seq(list(range(9)), 2)) == 8


def test_freed_cached_blocks_count_as_free_and_still_hit():
    bm = BlockManager(4, BS)
    seq = make_seq(list(range(9)))
    compute(bm, seq)
    bm.free(seq)
    assert bm.num_free_blocks == 4
    later = make_seq(list(range(9)) + [7], 1)
    assert bm.allocate_cached_prefix(later) == 8  # the blocks survived their owner


def test_lru_eviction_takes_never_used_blocks_first_then_the_oldest_cached():
    bm = BlockManager(4, BS)
    a, b = make_seq([1] * 4 + [0], 0), make_seq([2] * 4 + [0], 1)
    compute(bm, a)
    compute(bm, b)
    a_block, b_block = a.block_table[0], b.block_table[0]
    bm.free(a)  # a's full block becomes evictable first (least recently used)
    bm.free(b)
    assert bm.num_free_blocks == 4
    c = make_seq([3] * 4 + [0], 2)
    compute(bm, c)  # 2 blocks: the 2 never-hashed ones, no eviction yet
    assert a_block not in c.block_table and b_block not in c.block_table
    d = make_seq([4] * 4 + [0], 3)
    assert bm.reserve(d, 4) == [] and d.block_table == [a_block]  # evicts the oldest: a's block
    assert bm.allocate_cached_prefix(make_seq([1] * 4 + [0], 4)) == 0  # a's prefix is gone
    assert bm.allocate_cached_prefix(make_seq([2] * 4 + [0], 5)) == 4  # b's is still there


def test_hit_refreshes_lru_position():
    bm = BlockManager(4, BS)
    a, b = make_seq([1] * 4 + [0], 0), make_seq([2] * 4 + [0], 1)
    compute(bm, a)
    compute(bm, b)
    bm.free(a)
    bm.free(b)
    reuse = make_seq([1] * 4 + [9], 2)  # hit a's block: it is in use again, then freed after b
    assert bm.allocate_cached_prefix(reuse) == 4
    bm.free(reuse)
    newcomer = make_seq(list(range(20, 32)), 3)
    assert bm.reserve(newcomer, 12) == []  # two never-used blocks + one eviction: b's (the least recently used)
    assert bm.allocate_cached_prefix(make_seq([1] * 4 + [0], 4)) == 4
    assert bm.allocate_cached_prefix(make_seq([2] * 4 + [0], 5)) == 0


def test_fork_shares_blocks_and_copy_on_write_splits_the_partial_one():
    bm = BlockManager(8, BS)
    parent = make_seq(list(range(6)), 0)  # one full block, one partial (2 of 4 slots)
    compute(bm, parent)
    child = make_seq(list(range(6)), 1)
    bm.fork(parent, child)
    assert child.block_table == parent.block_table and child.num_computed_tokens == 6
    assert all(bm.blocks[b].ref_count == 2 for b in parent.block_table)
    full, partial = parent.block_table

    child.append(77)  # the child writes token 6 into the shared partial block: it gets its own copy first
    copies = compute(bm, child)
    assert copies == [(partial, child.block_table[1])] and child.block_table[1] != partial
    assert child.block_table[0] == full and bm.blocks[full].ref_count == 2
    assert bm.blocks[partial].ref_count == 1

    parent.append(88)  # now the parent is the only owner: it writes in place, no copy
    assert compute(bm, parent) == []
    assert parent.block_table[1] == partial
    bm.free(parent)
    bm.free(child)
    assert bm.num_free_blocks == 8


def test_copy_on_write_needs_a_free_block():
    bm = BlockManager(2, BS)
    parent = make_seq([1, 2], 0)
    compute(bm, parent)
    child = make_seq([1, 2], 1)
    bm.fork(parent, child)
    child.append(3)
    other = make_seq([5], 2)
    compute(bm, other)  # the last free block
    assert bm.reserve(child, 1) is None and bm.blocks[parent.block_table[0]].ref_count == 2


def test_bad_sizes():
    with pytest.raises(ValueError, match="num_blocks"):
        BlockManager(0, 16)
