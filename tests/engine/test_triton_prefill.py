"""The Triton paged-prefill kernel, run on CPU through Triton's interpreter, against references we did not write:
torch's scaled_dot_product_attention per sequence and query (keys gathered token by token), and the engine's PyTorch
path for a step that mixes decodes with prefill chunks (PagedBatch.attend), with the Triton dispatch switched on.
Covers whole prompts and later chunks (queries at the end of a longer context), tiles that split a chunk, MHA and GQA
(groups of 2, 3 padded to 4, 8), both kernel paths (tl.dot for block_size >= 16, broadcast products below), sliding
windows, ALiBi, fp32 and bf16, and that stale NaNs in unowned cache slots and in rows it does not own never leak."""

import pytest
import torch
import torch.nn.functional as F

triton = pytest.importorskip("triton")

from camelid.config import ModelConfig  # noqa: E402
from camelid.engine import paged_attention, triton_prefill  # noqa: E402
from camelid.engine.paged_attention import AttentionMetadata, PagedBatch, PagedKVCache  # noqa: E402
from camelid.model import alibi_slopes  # noqa: E402
from test_triton_decode import make_cache  # noqa: E402
from triton_interpreter import interpreter  # noqa: E402,F401 (a fixture)


def reference(q, k_blocks, v_blocks, tables, context_lens, query_lens, scale, window=None, slopes=None):
    """In fp32, sequence by sequence: its T queries are the last T positions of its context; each attends to its
    earlier keys (and itself) through torch's SDPA with a causal / window / ALiBi bias. q (N, nh, hd) packed."""
    nh = q.shape[1]
    bs, nkv = k_blocks.shape[1], k_blocks.shape[2]
    outs, start = [], 0
    for s, T in enumerate(query_lens):
        n = int(context_lens[s])
        pos = torch.arange(n)
        blocks, offsets = tables[s, pos // bs].long(), pos % bs
        k = k_blocks[blocks, offsets].float().transpose(0, 1).repeat_interleave(nh // nkv, 0)  # (nh, n, hd)
        v = v_blocks[blocks, offsets].float().transpose(0, 1).repeat_interleave(nh // nkv, 0)
        q_pos = torch.arange(n - T, n)[:, None]  # (T, 1)
        hidden = pos[None] > q_pos
        if window is not None:
            hidden |= pos[None] <= q_pos - window
        bias = torch.zeros(T, n).masked_fill(hidden, float("-inf"))[None]  # (1, T, n)
        if slopes is not None:
            bias = bias + slopes[:, None, None] * (pos[None] - q_pos).float()
        q_s = q[start:start + T].float().transpose(0, 1)  # (nh, T, hd)
        outs.append(F.scaled_dot_product_attention(q_s, k, v, attn_mask=bias, scale=scale).transpose(0, 1))
        start += T
    return torch.cat(outs)


CASES = {  # name: (nh, nkv, hd, block_size, [(context, new tokens)], sliding_window, alibi)
    "mha_broadcast": (4, 4, 16, 4, [(9, 9), (13, 4), (5, 2)], None, False),
    "gqa_broadcast_window": (4, 2, 16, 8, [(17, 17), (20, 3)], 6, False),
    "mha_dot_split_tiles": (2, 2, 16, 16, [(150, 150), (90, 70), (33, 2)], None, False),  # 64 queries a tile
    "gqa_8_dot": (8, 1, 32, 16, [(40, 40), (100, 37), (17, 16)], None, False),
    "gqa_6_2_padded_group": (6, 2, 16, 16, [(30, 30), (45, 13)], None, False),
    "window_dot_skips_blocks": (4, 2, 16, 16, [(130, 20), (70, 70)], 24, False),
    "alibi_gqa_dot": (8, 2, 16, 16, [(50, 50), (77, 9)], None, True),
    "alibi_window_broadcast": (4, 1, 16, 4, [(12, 12), (19, 5)], 7, True),
}


CUDA = pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"))


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_sdpa_reference(request, case, dtype, device):
    if device == "cpu":
        request.getfixturevalue("interpreter")
    nh, nkv, hd, bs, chunks, window, alibi = CASES[case]
    gen = torch.Generator().manual_seed(sum(map(ord, case)))
    context_lens, query_lens = [c for c, _ in chunks], [t for _, t in chunks]
    k_blocks, v_blocks, tables, lens = make_cache(context_lens, nkv, hd, bs, dtype, gen)
    N = sum(query_lens)
    q = torch.randn(N, nh, hd, generator=gen).to(dtype)
    starts = [sum(query_lens[:i]) for i in range(len(chunks))]
    slopes = alibi_slopes(nh) if alibi else None
    expected = reference(q, k_blocks, v_blocks, tables, lens, query_lens, hd**-0.5, window, slopes)
    q, k_blocks, v_blocks, tables, lens = (t.to(device) for t in (q, k_blocks, v_blocks, tables, lens))
    plan = triton_prefill.plan(list(range(len(chunks))), starts, query_lens, nh, nkv, hd, bs, q.element_size(),
                               q.device)
    out = triton_prefill.paged_prefill(q, k_blocks, v_blocks, tables, lens, plan, hd**-0.5, window,
                                       slopes.to(device) if alibi else None).cpu()
    assert out.shape == q.shape and out.dtype == dtype
    # bf16: the kernel rounds its output and the probabilities to bf16 (the interpreter by truncation)
    tol = dict(atol=1e-5, rtol=0) if dtype == torch.float32 else dict(atol=1e-2, rtol=2**-7)
    torch.testing.assert_close(out.float(), expected, **tol)


@pytest.mark.usefixtures("interpreter")
def test_writes_only_its_rows_of_a_strided_out():
    """The engine passes q and out as transposed views of (1, nh, N, hd), with decode rows between the chunks that
    the kernel must leave alone."""
    gen = torch.Generator().manual_seed(3)
    k_blocks, v_blocks, tables, lens = make_cache([20, 7, 33], 2, 16, 16, torch.float32, gen,
                                                  table_dtype=torch.int32)
    query_lens = [6, 1, 4]  # the middle sequence is a decode: not planned, its row stays NaN
    q = torch.randn(1, 4, 11, 16, generator=gen)[0].transpose(0, 1)  # (N, nh, hd), not contiguous
    out = torch.full((1, 4, 11, 16), float("nan"))[0].transpose(0, 1)
    plan = triton_prefill.plan([0, 2], [0, 7], [6, 4], 4, 2, 16, 16, 4, q.device)
    triton_prefill.paged_prefill(q, k_blocks, v_blocks, tables, lens, plan, 0.25, out=out)
    expected = reference(q, k_blocks, v_blocks, tables, lens, query_lens, 0.25)
    assert out[6].isnan().all()
    keep = torch.arange(11) != 6
    torch.testing.assert_close(out[keep], expected[keep], atol=1e-5, rtol=0)


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("window, alibi, bs, nkv", [(None, False, 16, 2), (None, False, 4, 4), (9, True, 16, 1)],
                         ids=["gqa_dot", "mha_broadcast", "window_alibi_dot"])
def test_mixed_step_equals_the_pytorch_path(request, monkeypatch, device, window, alibi, bs, nkv):
    """A whole step as Attention hands it to the cache: decodes, a first chunk and later chunks, packed. The Triton
    dispatch (decode and prefill kernels; on the CPU through the interpreter) against the PyTorch path on the same
    inputs, in fp32."""
    if device == "cpu":
        request.getfixturevalue("interpreter")
    config = ModelConfig(vocab_size=32, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=nkv, head_dim=16, sliding_window=window,
                         position_encoding="alibi" if alibi else "rope")
    cache = PagedKVCache(config, num_blocks=40, block_size=bs, dtype=torch.float32, device=torch.device(device))
    gen = torch.Generator().manual_seed(4)
    computed, new = [5, 0, 30, 12, 40], [1, 21, 17, 1, 3]  # cached tokens and this step's tokens per sequence
    order = (torch.randperm(39, generator=gen) + 1).tolist()
    block_tables, start = [], 0
    for c, n in zip(computed, new):
        block_tables.append(order[start:start + -(-(c + n) // bs)])
        start += len(block_tables[-1])
    cache.k[0].copy_(torch.randn(cache.k[0].shape, generator=gen))  # stands for the earlier steps' keys
    cache.v[0].copy_(torch.randn(cache.v[0].shape, generator=gen))
    meta = AttentionMetadata.build(block_tables, computed, new, bs, torch.device(device))
    N = sum(new)
    q, k, v = (torch.randn(1, n, N, 16, generator=gen).to(device) for n in (4, nkv, nkv))
    monkeypatch.setattr(paged_attention, "use_triton", lambda q, k_blocks: False)
    expected = PagedBatch(cache, meta).attend(0, q, k, v)
    monkeypatch.setattr(paged_attention, "use_triton", lambda q, k_blocks: True)
    monkeypatch.setattr(paged_attention, "_prefill_kernel_failed", [])  # a fallback would compare PyTorch to itself
    out = PagedBatch(cache, meta).attend(0, q, k, v)
    assert not paged_attention._prefill_kernel_failed
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype, hd, block_size, group", [("bf16", 64, 16, 8), ("bf16", 128, 16, 4), ("fp32", 64, 16, 1),
                                                         ("fp32", 128, 8, 8)],
                         ids=["dot_tinyllama", "dot_hd128", "dot_fp32", "broadcast"])
def test_compiles_for_h100_without_spills(monkeypatch, tmp_path, dtype, hd, block_size, group):
    """Through Triton's real pipeline down to PTX and ptxas for sm_90 (no GPU needed): the interpreter is lenient
    where the compiler is not. With the warps the wrapper picks, the 16-bit tiles keep within the registers (spilled
    registers would go through local memory on every iteration)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.interpreter import InterpretedFunction

    from camelid.engine import triton_decode

    if isinstance(triton.language.standard.cdiv, InterpretedFunction):
        pytest.skip("TRITON_INTERPRET was set when triton was imported: its GPU compiler cannot run in this process")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    kernel = triton.jit(triton_prefill._paged_prefill_kernel)
    itemsize = 2 if dtype == "bf16" else 4
    queries, group_pad, use_dot = triton_prefill.tile_shape(4 * group, 4, hd, block_size, itemsize)
    assert use_dot == (block_size >= 16)
    constants = dict(GROUP=group, GROUP_PAD=group_pad, QUERIES=queries, HEAD_DIM=hd, BLOCK_SIZE=block_size,
                     KEYS=triton_decode.keys_per_iteration(block_size, hd, itemsize, use_dot),
                     HAS_WINDOW=True, HAS_ALIBI=True, USE_DOT=use_dot)
    signature = dict.fromkeys(kernel.arg_names, "i32") | dict.fromkeys(constants, "constexpr")
    signature |= dict(q_ptr=f"*{dtype}", k_ptr=f"*{dtype}", v_ptr=f"*{dtype}", out_ptr=f"*{dtype}",
                      table_ptr="*i64", ctx_ptr="*i64", tiles_ptr="*i32", slopes_ptr="*fp32", scale="fp32")
    warps = triton_prefill.num_warps(queries * group_pad, hd)
    compiled = triton.compile(ASTSource(kernel, signature, constants), target=GPUTarget("cuda", 90, 32),
                              options=dict(num_warps=warps))
    assert "cubin" in compiled.asm
    assert ("mma" in compiled.asm["ptx"]) == (use_dot and dtype == "bf16")  # fp32 "ieee" products: no tensor cores
    if dtype == "bf16":  # ptxas -v (bundled with Triton) reports the spills of the PTX Triton generated
        import re
        import subprocess

        from triton.backends.nvidia.compiler import get_ptxas

        ptx = tmp_path / "kernel.ptx"
        ptx.write_text(compiled.asm["ptx"])
        report = subprocess.run([get_ptxas(90).path, "-v", "--gpu-name=sm_90a", str(ptx), "-o", "/dev/null"],
                                capture_output=True, text=True, check=True).stderr
        spills = [int(n) for n in re.findall(r"(\d+) bytes spill stores", report)]
        assert spills and max(spills) == 0, f"{warps} warps: {report}"


@pytest.mark.usefixtures("interpreter")
def test_bad_inputs():
    gen = torch.Generator().manual_seed(5)
    k_blocks, v_blocks, tables, lens = make_cache([8], 2, 16, 4, torch.float32, gen)
    q = torch.randn(8, 4, 16)
    plan = triton_prefill.plan([0], [0], [8], 4, 2, 16, 4, 4, q.device)
    other = triton_prefill.plan([0], [0], [8], 4, 1, 16, 4, 4, q.device)  # planned for another GQA group
    with pytest.raises(ValueError, match="other head, block or element sizes"):
        triton_prefill.paged_prefill(q, k_blocks, v_blocks, tables, lens, other, 0.25)
    with pytest.raises(ValueError, match="out must be"):
        triton_prefill.paged_prefill(q, k_blocks, v_blocks, tables, lens, plan, 0.25, out=torch.empty(8, 4, 8))
    with pytest.raises(ValueError, match="a row per sequence"):
        triton_prefill.paged_prefill(q, k_blocks, v_blocks, tables, lens.repeat(2), plan, 0.25)
    with pytest.raises(ValueError, match="share strides"):
        triton_prefill.paged_prefill(q, k_blocks, v_blocks.transpose(0, 1).contiguous().transpose(0, 1), tables, lens,
                                     plan, 0.25)
    with pytest.raises(ValueError, match="paged_prefill needs power-of-two"):
        triton_prefill.paged_prefill(q[..., :12], k_blocks[..., :12], v_blocks[..., :12], tables, lens, plan, 0.25)
    empty = triton_prefill.plan([], [], [], 4, 2, 16, 4, 4, q.device)
    assert triton_prefill.paged_prefill(q, k_blocks, v_blocks, tables, lens, empty, 0.25).shape == q.shape


@pytest.mark.usefixtures("interpreter")
@pytest.mark.parametrize("name, block_size", [("llama", 16), ("mistral", 4), ("alibi", 4)])
def test_engine_on_the_triton_path_equals_generate_ids(monkeypatch, name, block_size):
    """The engine with both kernels dispatched (through the interpreter): greedy ids equal the oracle under chunked
    prefill (a budget of 7 tokens: later chunks next to decodes) and preemption."""
    from camelid.engine import LLM, SamplingParams
    from camelid.generate import generate_ids
    from model_zoo import ARCH_CONFIGS, random_model, tiny_config
    from test_llm import mixed_prompts

    model = random_model(tiny_config(**ARCH_CONFIGS.get(name, {})))
    prompts = mixed_prompts(5, seed=2, high=20)
    expected = [generate_ids(model, [p], 8)[0] for p in prompts]
    monkeypatch.setattr(paged_attention, "use_triton", lambda q, k_blocks: True)
    monkeypatch.setattr(paged_attention, "_prefill_kernel_failed", [])
    launches = []
    kernel = triton_prefill.paged_prefill
    monkeypatch.setattr(triton_prefill, "paged_prefill", lambda *a, **k: launches.append(1) or kernel(*a, **k))
    llm = LLM(model, num_blocks=48 // block_size, block_size=block_size, max_num_batched_tokens=7)
    outputs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    assert [o.outputs[0].token_ids for o in outputs] == expected
    assert launches and not paged_attention._prefill_kernel_failed  # the kernel ran, never the fallback
    assert llm.stats()["num_preemptions"] > 0


def test_a_failing_prefill_kernel_falls_back_to_the_pytorch_path(monkeypatch, caplog):
    """A kernel that cannot launch here (say, out of shared memory on some GPU) costs speed, never the step: the
    PyTorch path answers, with one warning, and the kernel is not tried again."""
    config = ModelConfig(vocab_size=32, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    cache = PagedKVCache(config, num_blocks=8, block_size=4, dtype=torch.float32, device=torch.device("cpu"))
    gen = torch.Generator().manual_seed(6)
    cache.k[0].copy_(torch.randn(cache.k[0].shape, generator=gen))
    cache.v[0].copy_(torch.randn(cache.v[0].shape, generator=gen))
    meta = AttentionMetadata.build([[1, 2], [3, 4, 5]], [2, 4], [5, 6], 4, torch.device("cpu"))
    q, k, v = (torch.randn(1, n, 11, 16, generator=gen) for n in (4, 2, 2))
    monkeypatch.setattr(paged_attention, "use_triton", lambda q, k_blocks: False)
    expected = PagedBatch(cache, meta).attend(0, q, k, v)
    calls = []

    def broken(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("out of resources: shared memory")

    monkeypatch.setattr(paged_attention, "use_triton", lambda q, k_blocks: True)
    monkeypatch.setattr(triton_prefill, "paged_prefill", broken)
    monkeypatch.setattr(paged_attention, "_prefill_kernel_failed", [])
    with caplog.at_level("WARNING", logger="camelid.engine.paged_attention"):
        for _ in range(2):
            torch.testing.assert_close(PagedBatch(cache, meta).attend(0, q, k, v), expected, atol=0, rtol=0)
    assert len(calls) == 1 and "Triton prefill kernel failed" in caplog.text
