"""AttentionMetadata.build (camelid/engine/paged_attention.py) against the definition, token by token: token i of a
sequence sits in slot table[i // block_size] * block_size + i % block_size; decodes are the sequences with exactly one
new token. Random steps mixing decodes, first chunks and later chunks."""

import random

import pytest
import torch

from camelid.engine.paged_attention import AttentionMetadata


def by_definition(block_tables, num_computed, num_new, block_size):
    slots, starts = [], [0]
    for table, first, n in zip(block_tables, num_computed, num_new):
        slots += [table[p // block_size] * block_size + p % block_size for p in range(first, first + n)]
        starts.append(starts[-1] + n)
    context = [f + n for f, n in zip(num_computed, num_new)]
    single = [s for s, n in enumerate(num_new) if n == 1]
    return slots, starts, context, single


@pytest.mark.parametrize("seed", range(20))
def test_build_equals_the_definition(seed):
    rng = random.Random(seed)
    block_size = rng.choice([1, 4, 16])
    S = rng.randint(1, 12)
    num_computed = [rng.choice([0, rng.randint(0, 60)]) for _ in range(S)]
    num_new = [rng.choice([1, 1, rng.randint(1, 40)]) for _ in range(S)]
    free = list(range(1, 500))
    rng.shuffle(free)
    block_tables = [[free.pop() for _ in range(-(-(c + n) // block_size))] for c, n in zip(num_computed, num_new)]
    meta = AttentionMetadata.build(block_tables, num_computed, num_new, block_size, torch.device("cpu"))
    slots, starts, context, single = by_definition(block_tables, num_computed, num_new, block_size)
    assert meta.slot_mapping.tolist() == slots and meta.slot_mapping.dtype == torch.long
    assert meta.query_start_loc == starts
    assert meta.context_lens.tolist() == context == meta.context_lens_host
    assert meta.single_seqs.tolist() == single
    assert meta.single_tokens.tolist() == [starts[s] for s in single]
    assert meta.multi_seqs == [s for s in range(S) if num_new[s] > 1]
    assert meta.single_width == -(-max((context[s] for s in single), default=0) // block_size)
    width = max(map(len, block_tables))
    assert meta.block_tables.tolist() == [t + [0] * (width - len(t)) for t in block_tables]


def test_a_table_too_short_for_the_tokens_is_an_error():
    """Padding the tables with block 0 must not hide a missing block: its slots belong to another sequence."""
    with pytest.raises(ValueError, match="sequence 0's block table"):
        AttentionMetadata.build([[5], [6, 7, 8]], [0, 0], [8, 1], 4, torch.device("cpu"))


@pytest.mark.parametrize("nkv", [4, 2], ids=["mha", "gqa"])
def test_one_sequence_decode_equals_sdpa_over_its_keys(nkv):
    """The PyTorch decode path for a lone sequence (SDPA under a boolean mask over its padded blocks) against torch's
    SDPA over that sequence's keys gathered token by token, GQA expanded, no mask."""
    import torch.nn.functional as F

    from camelid.config import ModelConfig
    from camelid.engine.paged_attention import PagedBatch, PagedKVCache

    config = ModelConfig(vocab_size=32, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=nkv, head_dim=16)
    cache = PagedKVCache(config, num_blocks=16, block_size=4, dtype=torch.float32, device=torch.device("cpu"))
    gen = torch.Generator().manual_seed(7)
    cache.k[0].copy_(torch.randn(cache.k[0].shape, generator=gen))
    cache.v[0].copy_(torch.randn(cache.v[0].shape, generator=gen))
    for context in (1, 4, 13):
        table = [9, 3, 12, 5][:-(-context // 4)]
        meta = AttentionMetadata.build([table], [context - 1], [1], 4, torch.device("cpu"))
        q, k, v = (torch.randn(1, n, 1, 16, generator=gen) for n in (4, nkv, nkv))
        out = PagedBatch(cache, meta).attend(0, q, k, v)  # writes k / v into the last slot, then attends
        pos = torch.arange(context)
        blocks, offsets = torch.tensor(table)[pos // 4], pos % 4
        keys = cache.k[0][blocks, offsets].transpose(0, 1).repeat_interleave(4 // nkv, 0)[None]  # (1, nh, ctx, hd)
        values = cache.v[0][blocks, offsets].transpose(0, 1).repeat_interleave(4 // nkv, 0)[None]
        torch.testing.assert_close(out, F.scaled_dot_product_attention(q, keys, values), atol=1e-6, rtol=0)
