"""The Triton paged-decode kernel, run on CPU through Triton's interpreter, against references we did not write:
torch's scaled_dot_product_attention per sequence (on keys gathered token by token), and the engine's own PyTorch
decode path (PagedBatch._decode) through the exact call the CUDA dispatch makes. Covers both kernel paths (tl.dot for
block_size >= 16, broadcast products below), MHA and GQA (groups of 2, 3 padded to 4, 4 and 8), context lengths of 1,
a full block and across block boundaries, shuffled block tables, sliding windows (with whole blocks skipped), ALiBi,
fp32 and bf16, and that stale NaNs in unowned cache slots never leak into the output."""

import importlib.util
import sys

import pytest
import torch
import torch.nn.functional as F

triton = pytest.importorskip("triton")

from camelid.config import ModelConfig  # noqa: E402
from camelid.engine import triton_decode  # noqa: E402
from camelid.engine.paged_attention import AttentionMetadata, PagedBatch, PagedKVCache  # noqa: E402
from camelid.model import alibi_slopes  # noqa: E402
from triton_interpreter import interpreter  # noqa: E402,F401 (a fixture)


def make_cache(context_lens: list[int], nkv: int, hd: int, bs: int, dtype: torch.dtype, gen: torch.Generator,
               width_pad: int = 1, table_dtype: torch.dtype = torch.long):
    """Random keys/values in shuffled blocks. Every slot no sequence owns (tails of last blocks, spare blocks, the
    blocks the table padding points to) holds NaN: reading one into the output would show."""
    needed = [-(-n // bs) for n in context_lens]
    num_blocks = sum(needed) + 3
    k_blocks = torch.full((num_blocks, bs, nkv, hd), float("nan"))
    v_blocks = torch.full((num_blocks, bs, nkv, hd), float("nan"))
    order = torch.randperm(num_blocks - 1, generator=gen) + 1  # block 0 stays all-NaN: the table padding
    width = max(needed) + width_pad
    tables = torch.zeros(len(context_lens), width, dtype=table_dtype)
    start = 0
    for s, (n, nb) in enumerate(zip(context_lens, needed)):
        tables[s, :nb] = order[start:start + nb]
        start += nb
        pos = torch.arange(n)
        blocks, offsets = tables[s, pos // bs].long(), pos % bs
        k_blocks[blocks, offsets] = torch.randn(n, nkv, hd, generator=gen)
        v_blocks[blocks, offsets] = torch.randn(n, nkv, hd, generator=gen)
    return k_blocks.to(dtype), v_blocks.to(dtype), tables, torch.tensor(context_lens)


def reference(q, k_blocks, v_blocks, tables, context_lens, scale, window=None, slopes=None):
    """Per sequence, in fp32: gather its keys token by token, expand the GQA groups, mask and bias, and let torch's
    SDPA attend. q (D, nh, hd) -> (D, nh, hd)."""
    D, nh, hd = q.shape
    bs, nkv = k_blocks.shape[1], k_blocks.shape[2]
    outs = []
    for s in range(D):
        n = int(context_lens[s])
        pos = torch.arange(n)
        blocks, offsets = tables[s, pos // bs].long(), pos % bs
        k = k_blocks[blocks, offsets].float().transpose(0, 1).repeat_interleave(nh // nkv, 0)  # (nh, n, hd)
        v = v_blocks[blocks, offsets].float().transpose(0, 1).repeat_interleave(nh // nkv, 0)
        q_pos = n - 1
        bias = torch.zeros(nh, 1, n)
        if window is not None:
            bias[:, :, pos <= q_pos - window] = float("-inf")
        if slopes is not None:
            bias = bias + slopes[:, None, None] * (pos - q_pos).float()
        outs.append(F.scaled_dot_product_attention(q[s].float()[:, None], k, v, attn_mask=bias, scale=scale)[:, 0])
    return torch.stack(outs)


CASES = {  # name: (nh, nkv, hd, block_size, context_lens, sliding_window, alibi); block_size 16 takes the tl.dot path
    "mha": (4, 4, 16, 4, [1, 4, 5, 13], None, False),
    "mha_dot": (4, 4, 16, 16, [1, 16, 17, 40], None, False),
    "gqa_4_2": (4, 2, 16, 4, [3, 8, 9, 1], None, False),
    "gqa_8_1_dot": (8, 1, 32, 16, [17, 1, 16, 30], None, False),
    "gqa_6_2_padded_group": (6, 2, 16, 8, [7, 12, 2], None, False),
    "window": (4, 2, 16, 4, [1, 5, 13, 16, 3], 5, False),
    "window_1": (4, 2, 16, 4, [1, 6, 9], 1, False),
    "window_larger_than_context": (4, 4, 16, 4, [2, 7], 64, False),
    "window_dot_skips_blocks": (4, 2, 16, 16, [50, 33, 2], 18, False),
    "alibi_gqa": (8, 2, 16, 4, [1, 6, 13], None, True),
    "alibi_window_dot": (4, 1, 16, 16, [9, 40, 4], 20, True),
    # several 64-key iterations of several blocks each, a window starting inside one, a context ending inside one
    "long_dot_window": (8, 2, 32, 16, [200, 97, 1, 64], 70, False),
    "long_alibi_dot": (4, 4, 16, 16, [130, 64, 65], None, True),
}


@pytest.mark.usefixtures("interpreter")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_sdpa_reference(case, dtype):
    nh, nkv, hd, bs, context_lens, window, alibi = CASES[case]
    gen = torch.Generator().manual_seed(hash(case) % 2**31)
    k_blocks, v_blocks, tables, lens = make_cache(context_lens, nkv, hd, bs, dtype, gen)
    q = torch.randn(len(context_lens), nh, hd, generator=gen).to(dtype)
    slopes = alibi_slopes(nh) if alibi else None
    scale = hd**-0.5
    out = triton_decode.paged_decode(q, k_blocks, v_blocks, tables, lens, scale, window, slopes)
    assert out.shape == q.shape and out.dtype == dtype
    expected = reference(q, k_blocks, v_blocks, tables, lens, scale, window, slopes)
    # bf16: inputs are exact in both, but the kernel rounds its output and (tl.dot path, like PagedBatch._decode) the
    # probabilities to bf16, and the interpreter rounds by truncation (the GPU to nearest): one bf16 ulp relative,
    # plus the probabilities' error summed over the keys.
    tol = dict(atol=1e-5, rtol=0) if dtype == torch.float32 else dict(atol=1e-2, rtol=2**-7)
    torch.testing.assert_close(out.float(), expected, **tol)


@pytest.mark.usefixtures("interpreter")
def test_strided_query_int32_tables_and_wide_padding():
    """The CUDA dispatch passes q as a transposed view and a column slice of the engine's tables (int32 here), wider
    than the longest sequence needs."""
    gen = torch.Generator().manual_seed(1)
    k_blocks, v_blocks, tables, lens = make_cache([5, 11, 1], 2, 16, 4, torch.float32, gen, width_pad=3,
                                                  table_dtype=torch.int32)
    tables = tables[:, :-1]
    q = torch.randn(4, 3, 16, generator=gen).transpose(0, 1)  # (D=3, nh=4, hd)
    assert not q.is_contiguous() and not tables.is_contiguous()
    out = triton_decode.paged_decode(q, k_blocks, v_blocks, tables, lens, 0.3)
    torch.testing.assert_close(out, reference(q, k_blocks, v_blocks, tables, lens, 0.3), atol=1e-5, rtol=0)


@pytest.mark.usefixtures("interpreter")
@pytest.mark.parametrize("window, alibi, bs, context_lens", [(None, False, 4, [1, 6, 13]), (20, True, 16, [1, 17, 40])],
                         ids=["plain_broadcast", "window_alibi_dot"])
def test_matches_paged_batch_decode(window, alibi, bs, context_lens):
    """The engine's PyTorch decode and the kernel, called the way PagedBatch._decode would dispatch to it on CUDA."""
    config = ModelConfig(vocab_size=32, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=window,
                         position_encoding="alibi" if alibi else "rope")
    cache = PagedKVCache(config, num_blocks=12, block_size=bs, dtype=torch.float32, device=torch.device("cpu"))
    gen = torch.Generator().manual_seed(2)
    order = (torch.randperm(11, generator=gen) + 1).tolist()
    block_tables, start = [], 0
    for n in context_lens:
        block_tables.append(order[start:start + -(-n // bs)])
        start += len(block_tables[-1])
    cache.k[0].normal_(generator=gen)
    cache.v[0].normal_(generator=gen)
    meta = AttentionMetadata.build(block_tables, [n - 1 for n in context_lens], [1] * len(context_lens), bs,
                                   torch.device("cpu"))
    q = torch.randn(1, 4, len(context_lens), 16, generator=gen)  # (1, nh, D, hd) as Attention hands it over
    tables = meta.block_tables[:, :meta.single_width]
    expected = PagedBatch(cache, meta)._decode(q, cache.k[0], cache.v[0], tables, meta.context_lens)
    out = triton_decode.paged_decode(q[0].transpose(0, 1), cache.k[0], cache.v[0], tables, meta.context_lens,
                                     16**-0.5, cache.sliding_window, cache.alibi)  # (D, nh, hd)
    torch.testing.assert_close(out.transpose(0, 1)[None], expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("use_dot, num_splits", [(True, 1), (False, 1), (True, 8)],
                         ids=["dot", "broadcast", "dot_split"])
def test_compiles_for_h100(monkeypatch, use_dot, num_splits):
    """The interpreter runs the kernel as Python, which is lenient where the GPU compiler is not (types of loop-carried
    values, names defined under a constexpr if): compile it for sm_90 through Triton's real pipeline down to PTX and
    ptxas (bundled with the wheel; no GPU needed)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from triton.runtime.interpreter import InterpretedFunction

    if isinstance(triton.language.standard.cdiv, InterpretedFunction):
        pytest.skip("TRITON_INTERPRET was set when triton was imported: its GPU compiler cannot run in this process")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    kernel = triton.jit(triton_decode._paged_decode_kernel)
    dtype = "bf16" if use_dot else "fp32"
    block_size = 16 if use_dot else 8
    constants = dict(GROUP=4, GROUP_PAD=16 if use_dot else 4, HEAD_DIM=128, BLOCK_SIZE=block_size,
                     KEYS=triton_decode.keys_per_iteration(block_size, 128, 2 if use_dot else 4, use_dot),
                     HAS_WINDOW=True, HAS_ALIBI=True, USE_DOT=use_dot, NUM_SPLITS=num_splits)
    partials = dict(m_part_ptr="*fp32", l_part_ptr="*fp32", acc_part_ptr="*fp32")
    signature = dict.fromkeys(kernel.arg_names, "i32") | dict.fromkeys(constants, "constexpr") | partials
    signature |= dict(q_ptr=f"*{dtype}", k_ptr=f"*{dtype}", v_ptr=f"*{dtype}", out_ptr=f"*{dtype}",
                      table_ptr="*i32", ctx_ptr="*i64", slopes_ptr="*fp32", scale="fp32")
    compiled = triton.compile(ASTSource(kernel, signature, constants), target=GPUTarget("cuda", 90, 32))
    assert "cubin" in compiled.asm
    assert ("mma" in compiled.asm["ptx"]) == use_dot  # the dot path runs on tensor cores
    if num_splits > 1:
        merge = triton.jit(triton_decode._merge_splits_kernel)
        constants = {name: constants[name] for name in merge.arg_names if name in constants} | {"SPLITS_PAD": 8}
        signature = dict.fromkeys(merge.arg_names, "i32") | dict.fromkeys(constants, "constexpr") | partials
        signature |= dict(out_ptr=f"*{dtype}", ctx_ptr="*i64")
        assert "cubin" in triton.compile(ASTSource(merge, signature, constants), target=GPUTarget("cuda", 90, 32)).asm


@pytest.mark.usefixtures("interpreter")
def test_available_and_bad_shapes():
    assert triton_decode.keys_per_iteration(16, 64, 2, use_dot=True) == 64  # four blocks a step
    assert triton_decode.keys_per_iteration(16, 128, 4, use_dot=True) == 64  # a 32 KiB fp32 tile
    assert triton_decode.keys_per_iteration(256, 128, 2, use_dot=True) == 256  # never less than a block
    assert triton_decode.keys_per_iteration(8, 64, 4, use_dot=False) == 8  # the broadcast path: one block
    assert triton_decode.available()  # triton installed and TRITON_INTERPRET=1
    assert triton_decode.supports(128, 16) and not triton_decode.supports(96, 16) and not triton_decode.supports(64, 6)
    # shared memory: a 256-token block of fp32 keys at head_dim 128 (128 KiB) does not fit sm_90; bf16 does
    assert triton_decode.supports(128, 256, torch.bfloat16) and not triton_decode.supports(128, 256, torch.float32)
    q, blocks = torch.zeros(2, 4, 24), torch.zeros(3, 4, 2, 24)
    tables, lens = torch.zeros(2, 1, dtype=torch.long), torch.ones(2, dtype=torch.long)
    with pytest.raises(ValueError, match="power-of-two head_dim"):
        triton_decode.paged_decode(q, blocks, blocks, tables, lens, 1.0)
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        triton_decode.paged_decode(torch.zeros(2, 3, 16), torch.zeros(3, 4, 2, 16), torch.zeros(3, 4, 2, 16),
                                   tables, lens, 1.0)
    with pytest.raises(ValueError, match="share a dtype"):
        triton_decode.paged_decode(torch.zeros(2, 4, 16), torch.zeros(3, 4, 2, 16, dtype=torch.bfloat16),
                                   torch.zeros(3, 4, 2, 16, dtype=torch.bfloat16), tables, lens, 1.0)
    with pytest.raises(ValueError, match="sliding_window"):
        triton_decode.paged_decode(torch.zeros(2, 4, 16), torch.zeros(3, 4, 2, 16), torch.zeros(3, 4, 2, 16),
                                   tables, lens, 1.0, sliding_window=0)


def test_imports_without_triton(monkeypatch):
    """The engine imports this module unconditionally: without Triton it must import and report unavailable."""
    monkeypatch.setitem(sys.modules, "triton", None)  # makes `import triton` raise ImportError
    monkeypatch.setitem(sys.modules, "triton.language", None)
    spec = importlib.util.spec_from_file_location("triton_decode_without_triton", triton_decode.__file__)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert not module.available()
    with pytest.raises(ValueError, match="needs Triton"):
        module.paged_decode(torch.zeros(1, 1, 16), torch.zeros(1, 4, 1, 16), torch.zeros(1, 4, 1, 16),
                            torch.zeros(1, 1, dtype=torch.long), torch.ones(1, dtype=torch.long), 1.0)


@pytest.mark.usefixtures("interpreter")
@pytest.mark.parametrize("window, alibi", [(None, False), (5, True)], ids=["plain", "window_alibi"])
def test_operator_is_one_opaque_call_under_torch_compile(window, alibi):
    """camelid::paged_decode, the form the compiled decode forward calls: torch.compile(fullgraph=True) takes it
    without a graph break and gives the direct call's output, the kernel launched as it is."""
    from camelid.engine.paged_attention import paged_decode_op

    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(3)
    k_blocks, v_blocks, tables, lens = make_cache([1, 6, 13], 2, 16, 4, torch.float32, gen)
    q = torch.randn(3, 4, 16, generator=gen)
    slopes = alibi_slopes(4) if alibi else None
    direct = triton_decode.paged_decode(q, k_blocks, v_blocks, tables, lens, 0.25, window, slopes)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def compiled(q, k_blocks, v_blocks, tables, lens):
        return paged_decode_op(q * 1.0, k_blocks, v_blocks, tables, lens, 0.25, window, slopes) + 0.0

    torch.testing.assert_close(compiled(q, k_blocks, v_blocks, tables, lens), direct, atol=0, rtol=0)


@pytest.mark.usefixtures("interpreter")
@pytest.mark.parametrize("num_splits", [2, 3, 7, None])
@pytest.mark.parametrize("case", ["mha_dot", "gqa_6_2_padded_group", "long_dot_window", "long_alibi_dot",
                                  "window_dot_skips_blocks"])
def test_split_keys_match_one_pass(case, num_splits):
    """Flash-decoding: a sequence's keys shared out over several programs and merged give the one-pass result.
    Splits that get no keys (short contexts, keys before a window) write nothing and are left out of the merge;
    None lets splits_for pick (a small count under the interpreter)."""
    nh, nkv, hd, bs, context_lens, window, alibi = CASES[case]
    gen = torch.Generator().manual_seed(3)
    k_blocks, v_blocks, tables, lens = make_cache(context_lens, nkv, hd, bs, torch.float32, gen, width_pad=4)
    q = torch.randn(len(context_lens), nh, hd, generator=gen)
    slopes = alibi_slopes(nh) if alibi else None
    out = triton_decode.paged_decode(q, k_blocks, v_blocks, tables, lens, hd**-0.5, window, slopes,
                                     num_splits=num_splits)
    expected = reference(q, k_blocks, v_blocks, tables, lens, hd**-0.5, window, slopes)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


def test_splits_fill_the_device_only_when_sequences_do_not():
    cuda_like = torch.device("meta")  # any non-CUDA device: the interpreter's nominal 2 multiprocessors
    assert triton_decode.splits_for(programs=1, iterations=100, device=cuda_like) == 4  # 2 programs an SM
    assert triton_decode.splits_for(programs=1, iterations=3, device=cuda_like) == 3  # no more than the keys
    assert triton_decode.splits_for(programs=4, iterations=100, device=cuda_like) == 1  # sequences fill it
    assert triton_decode.splits_for(programs=1024, iterations=100, device=cuda_like) == 1
