"""Where the time goes on a GPU: step-time ablations and profiler tables for training and the engine.

A tool for a short device lease, not a comparison: it prints what to optimise next (its first H100 output is in
benchmarks/results/logs/h100-2026-11-22-call2-*.log and call3-engine.log).
  python benchmarks/diagnose.py train     # TinyLlama bf16-true step: plain, no recompute, loss variants, profile
  python benchmarks/diagnose.py engine    # LLM setup, batch-1 decode, a small offline run, a profile of steps
  python benchmarks/diagnose.py attention # one layer's attention of mixed steps: Triton kernels vs PyTorch path
  python benchmarks/diagnose.py decode    # the paged-decode kernel: keys split over programs or not, by batch/context
"""

from __future__ import annotations

import sys
import time

import torch

import camelid.model as model_module
from camelid.config import get_preset
from camelid.model import Transformer
from camelid.train.loss import loss_fn

DEV = torch.device("cuda")


def step_time(fn, warmup=3, repeats=6) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def profile(fn, rows=30, steps=2) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as prof
    fn()
    torch.cuda.synchronize()
    with prof(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    print(p.key_averages().table(sort_by="cuda_time_total", row_limit=rows, max_name_column_width=70))


def train() -> None:
    config = get_preset("tinyllama-1.1b")
    torch.manual_seed(0)
    model = Transformer(config).to(DEV, torch.bfloat16).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    ids = torch.randint(0, config.vocab_size, (4, 2049), device=DEV)
    batch = {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}
    tokens = 4 * 2048

    def step(run=model, fused=True):
        loss = loss_fn(run, batch, fused=fused) / tokens
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def fwd_bwd_only(run=model):
        loss = loss_fn(run, batch) / tokens
        loss.backward()
        model.zero_grad(set_to_none=True)

    def report(name, secs):
        print(f"{name:44} {secs * 1e3:8.1f} ms  {tokens / secs:9.0f} tok/s  "
              f"peak {torch.cuda.max_memory_allocated() / 2**30:5.1f} GiB", flush=True)
        torch.cuda.reset_peak_memory_stats()

    report("bf16-true step (plain)", step_time(step))
    report("  forward+backward only", step_time(fwd_bwd_only))
    report("  chunked (unfused) loss", step_time(lambda: step(fused=False)))
    with torch.no_grad():
        report("  forward only, no grad", step_time(lambda: model(batch["input_ids"], return_hidden=True)))
    original = model_module.recomputed
    model_module.recomputed = lambda fn, *xs: fn(*xs)
    try:
        report("  no recompute (plain autograd)", step_time(step))
    finally:
        model_module.recomputed = original
    print("\nprofile: plain step", flush=True)
    profile(step)
    compiled = torch.compile(model)
    t0 = time.perf_counter()
    step(compiled)
    torch.cuda.synchronize()
    print(f"compile: first step {time.perf_counter() - t0:.1f} s", flush=True)
    report("bf16-true step, torch.compile(model)", step_time(lambda: step(compiled), warmup=3))
    print("\nprofile: compiled step", flush=True)
    profile(lambda: step(compiled), rows=25)


def engine() -> None:
    import collections
    import random

    import camelid.engine.runner as runner_module
    from camelid.engine import LLM, SamplingParams

    config = get_preset("tinyllama-1.1b")
    torch.manual_seed(0)
    model = Transformer(config).to(DEV, torch.bfloat16).eval()
    rng = random.Random(0)
    timers: dict[str, float] = collections.defaultdict(float)
    counts: dict[str, int] = collections.defaultdict(int)

    def timed(name, fn):
        def wrapper(*args, **kwargs):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            torch.cuda.synchronize()
            timers[name] += time.perf_counter() - t0
            counts[name] += 1
            return out
        return wrapper

    def batch1(llm, tokens=128) -> float:
        prompt = [rng.randrange(3, config.vocab_size) for _ in range(128)]
        llm.generate([prompt], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
        llm.add_request(prompt, SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True))
        stamps = []  # (time, tokens so far) after each step: one token a step, or decode_steps of them
        while llm.has_unfinished():
            outs = llm.step()
            stamps.append((time.perf_counter(), len(outs[0].outputs[0].token_ids) if outs else 0))
        (t1, n1), (t2, n2) = stamps[1], stamps[-1]  # from the first decode step on
        return (n2 - n1) / (t2 - t1)

    def offline(llm, n) -> None:
        prompts = [[rng.randrange(3, config.vocab_size) for _ in range(rng.randint(32, 1024))] for _ in range(n)]
        lens = [rng.randint(32, 512) for _ in range(n)]
        for p, m in zip(prompts, lens):
            llm.add_request(p, SamplingParams(temperature=0, max_tokens=m, ignore_eos=True))
        replays = llm.runner.graphs.replays if llm.runner.graphs else 0
        t0, steps = time.perf_counter(), 0
        while llm.has_unfinished():
            llm.step()
            steps += 1
        secs = time.perf_counter() - t0
        replays = (llm.runner.graphs.replays if llm.runner.graphs else 0) - replays
        print(f"  offline {n} requests: {sum(lens) / secs:.0f} output tok/s, {steps} steps ({replays} graph "
              f"replays), {secs / steps * 1e3:.1f} ms/step", flush=True)

    llm = LLM(model, device=DEV, kv_cache_memory="20GB", max_num_seqs=256, max_num_batched_tokens=2048)
    print(f"batch-1 decode, graphs: {batch1(llm):.1f} tok/s", flush=True)
    offline(llm, 256)
    llm.decode_steps = 8  # decode-only steps 8 at a time, one host sync (LLM(decode_steps=8))
    print(f"batch-1 decode, graphs, decode_steps 8: {batch1(llm):.1f} tok/s", flush=True)
    offline(llm, 256)
    llm.decode_steps = 1
    # the same run with every phase timed (synchronised: slower in all, but it shows the split)
    llm.scheduler.schedule = timed("schedule", llm.scheduler.schedule)
    llm.scheduler.postprocess = timed("postprocess", llm.scheduler.postprocess)
    llm.runner.prepare = timed("prepare (eager inputs)", llm.runner.prepare)
    llm.runner.graphs.run = timed("graph run (fill + replay)", llm.runner.graphs.run)
    llm.runner.graphs._fill = timed("  graph fill", llm.runner.graphs._fill)
    model_forward = model.forward
    model.forward = timed("model forward (eager + capture)", model.forward)
    original_sample = runner_module.sample
    runner_module.sample = timed("sample", original_sample)
    step = llm.step
    llm.step = timed("llm.step total", step)
    offline(llm, 256)
    for name, secs in timers.items():
        print(f"    {name:36} {secs:7.2f} s  {counts[name]:6d} calls  {secs / counts[name] * 1e3:7.2f} ms/call")
    llm.step, model.forward = step, model_forward
    timers.clear()
    print("profile: 6 decode steps at batch 256 (CUDA graphs)", flush=True)
    for _ in range(256):
        llm.add_request([rng.randrange(3, config.vocab_size) for _ in range(700)],
                        SamplingParams(temperature=0, max_tokens=100, ignore_eos=True))
    while any(s.num_uncomputed_tokens > 1 for s in llm.scheduler.running) or llm.scheduler.waiting:
        llm.step()
    profile(lambda: [llm.step() for _ in range(3)], rows=20)
    while llm.has_unfinished():
        llm.step()
    runner_module.sample = original_sample

    # batch 1 with the decode graph captured over the torch.compile'd forward (LLM(compile=True))
    del llm
    torch.cuda.empty_cache()
    t0 = time.perf_counter()
    llm = LLM(model, device=DEV, kv_cache_memory="4GB", max_num_seqs=1, compile=True)
    graphs = llm.runner.graphs
    print(f"LLM(compile=True, max_num_seqs=1) built in {time.perf_counter() - t0:.1f} s; compiled graphs: "
          f"{graphs is not None and graphs.compiled}", flush=True)
    print(f"batch-1 decode, compiled graph: {batch1(llm, 256):.1f} tok/s", flush=True)
    llm.decode_steps = 8
    print(f"batch-1 decode, compiled graph, decode_steps 8: {batch1(llm, 256):.1f} tok/s", flush=True)
    llm.decode_steps = 1
    llm.add_request([5] * 100, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))
    for _ in range(4):
        llm.step()  # the prefill and a few decodes first
    profile(lambda: [llm.step() for _ in range(5)], rows=15)


def attention() -> None:
    """One layer's attention of a mixed step (PagedBatch.attend: cache write, decodes, prefill chunks), TinyLlama's
    heads in bf16: the Triton kernels against the PyTorch path (per-chunk gather + SDPA), same inputs."""
    import random

    import camelid.engine.paged_attention as paged
    from camelid.engine.paged_attention import AttentionMetadata, PagedBatch, PagedKVCache

    config = get_preset("tinyllama-1.1b").replace(num_hidden_layers=1)
    nh, nkv, hd, bs = config.num_attention_heads, config.num_key_value_heads, config.head_dim, 16
    steps = {  # name: (tokens already cached, new tokens) per sequence
        "8 prompts of 1024 from scratch": [(0, 1024)] * 8,
        "4 later chunks of 512 after 1024": [(1024, 512)] * 4,
        "256 decodes at ~800 + a 2048 chunk": [(800, 1)] * 256 + [(0, 2048)],
        "256 decodes + 4 later chunks of 1536 after 512": [(800, 1)] * 256 + [(512, 1536)] * 4,
    }
    rng = random.Random(0)
    for name, seqs in steps.items():
        need = [-(-(c + n) // bs) for c, n in seqs]
        cache = PagedKVCache(config, sum(need) + 1, bs, torch.bfloat16, DEV)
        cache.k[0].normal_(), cache.v[0].normal_()
        order = list(range(1, sum(need) + 1))
        rng.shuffle(order)
        tables, start = [], 0
        for n in need:
            tables.append(order[start:start + n])
            start += n
        meta = AttentionMetadata.build(tables, [c for c, _ in seqs], [n for _, n in seqs], bs, DEV)
        N = sum(n for _, n in seqs)
        q, k, v = (torch.randn(1, h, N, hd, device=DEV, dtype=torch.bfloat16) for h in (nh, nkv, nkv))
        times = {}
        for label, triton_on in (("pytorch", False), ("triton", True)):
            paged.use_triton = (lambda q, k_blocks: True) if triton_on else (lambda q, k_blocks: False)
            out = PagedBatch(cache, meta).attend(0, q, k, v)
            times[label] = (step_time(lambda: PagedBatch(cache, meta).attend(0, q, k, v)), out.float())
        if paged._prefill_kernel_failed:  # the "triton" column would be the PyTorch path again
            print(f"  the Triton prefill kernel failed: {paged._prefill_kernel_failed[0]}")
            return
        (py_s, py_out), (tr_s, tr_out) = times["pytorch"], times["triton"]
        print(f"  {name:48} pytorch {py_s * 1e3:7.2f} ms  triton {tr_s * 1e3:7.2f} ms  ({py_s / tr_s:.2f}x), "
              f"max |diff| {(py_out - tr_out).abs().max().item():.3g}", flush=True)


def decode() -> None:
    """The Triton paged-decode kernel on one layer of TinyLlama's heads (bf16, block 16): one program per sequence and
    kv head against the split count splits_for picks (flash-decoding), by batch size and context length. Bandwidth
    counts the keys and values read once."""
    from camelid.engine import triton_decode

    config = get_preset("tinyllama-1.1b")
    nh, nkv, hd, bs = config.num_attention_heads, config.num_key_value_heads, config.head_dim, 16
    for batch, context in [(1, 256), (1, 1024), (1, 4096), (8, 1024), (32, 1024), (64, 2048), (256, 800)]:
        blocks = -(-context // bs)
        k_blocks, v_blocks = (torch.randn(batch * blocks + 1, bs, nkv, hd, device=DEV, dtype=torch.bfloat16)
                              for _ in range(2))
        tables = (torch.randperm(batch * blocks, device=DEV) + 1).view(batch, blocks).int()
        lens = torch.full((batch,), context, device=DEV, dtype=torch.int32)
        q = torch.randn(batch, nh, hd, device=DEV, dtype=torch.bfloat16)
        kv_bytes = 2 * batch * context * nkv * hd * 2
        auto = triton_decode.splits_for(batch * nkv, -(-context // 64), DEV)
        row = []
        for splits in sorted({1, auto}):
            def call():
                return triton_decode.paged_decode(q, k_blocks, v_blocks, tables, lens, hd**-0.5, num_splits=splits)

            out = call()  # compiles; then 20 calls in a CUDA graph, as the engine replays them (the host's launch
            graph = torch.cuda.CUDAGraph()  # overhead would otherwise exceed a batch-1 kernel's time)
            with torch.cuda.graph(graph):
                for _ in range(20):
                    call()
            seconds = step_time(graph.replay, warmup=3, repeats=20) / 20
            row.append(f"{splits:3} split(s) {seconds * 1e6:8.1f} us {kv_bytes / seconds / 1e9:7.0f} GB/s")
            if splits == 1:
                one_pass = out.float()
            else:
                row.append(f"max |diff| {(out.float() - one_pass).abs().max().item():.3g}")
        print(f"  batch {batch:4} context {context:5}: " + "   ".join(row), flush=True)


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("part", choices=["train", "engine", "attention", "decode"])
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("diagnose.py profiles CUDA kernels: it needs a CUDA GPU; nothing to do here")
        return 0
    {"train": train, "engine": engine, "attention": attention, "decode": decode}[args.part]()
    return 0


if __name__ == "__main__":
    sys.exit(main())
