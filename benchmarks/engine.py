"""The engine (camelid.LLM) vs transformers, side by side from one run, on a seeded workload of random token ids.

  (a) decode at batch 1: tokens/s of one request after its prefill, and the fraction of the memory-bandwidth roofline
      (every decode step reads every weight once: roofline tokens/s = measured copy bandwidth / parameter bytes);
      transformers: model.generate with its default (dynamic) cache, decode time = time(N tokens) - time(1 token).
  (b) offline throughput: every request submitted at once, each with its own output length (EOS ignored); output
      tokens/s of camelid's continuous batching vs transformers `generate` over padded batches of --hf-batch requests
      (each batch decodes to its longest request; only the requested tokens count as useful).
      Also: KV-cache waste (allocated slots holding no token, averaged over steps, weighted by allocation), time to
      first token and inter-token latency percentiles (all requests arrive at t=0, so TTFT includes queueing), and the
      fraction of greedy tokens identical in both.
      Third column: transformers' own continuous batching (`init_continuous_batching`, the path issue 5's reference
      number comes from) on the same requests, each with its own max_new_tokens and EOS off; it runs last (it swaps
      the model's attention to a paged one while it runs) and, where the installed transformers lacks it or it fails,
      the column reads "skipped: <reason>" and the JSON records the reason.

Both models hold the same weights (built from a seed, saved by camelid, loaded by transformers; see common.py).

  .venv/bin/python benchmarks/engine.py                   # CPU: a tiny random model and a small workload (< 2 min)
  python benchmarks/engine.py --device cuda               # TinyLlama-1.1B shape, bf16, 512 requests, 32..1024 prompt
                                                          # tokens, 32..512 output tokens, padded batches of 64
"""

from __future__ import annotations

import os
import random
import statistics
import time
from pathlib import Path

import torch
import transformers
from common import TINY, check_same_logits, device_name, device_slug, record_header, same_weights
from common import parser, start, write_result

from camelid.checkpoint import parse_dtype
from camelid.config import get_preset
from camelid.engine import LLM, SamplingParams

# max_num_batched_tokens on CUDA: 8192. The H100 run with 2048 spent 72 steps mixing decodes with prefill chunks, each
# paying the eager forward's ~20 ms of launches; a budget 4x larger needs about 4x fewer such steps
CUDA_DEFAULTS = dict(preset="tinyllama-1.1b", dtype="bfloat16", requests=512, prompt=(32, 1024), output=(32, 512),
                     hf_batch=64, decode_tokens=256, max_num_batched_tokens=8192, max_num_seqs=256, decode_steps=8)
CPU_DEFAULTS = dict(preset=None, dtype="float32", requests=64, prompt=(16, 256), output=(16, 128), hf_batch=16,
                    decode_tokens=64, max_num_batched_tokens=512, max_num_seqs=64, decode_steps=8)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(device: torch.device, nbytes: int = 2**28, repeats: int = 5) -> float:
    """Bytes/s of a large device-to-device copy (read + write both count), the best of `repeats`."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * nbytes / best


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"p50": float("nan"), "p99": float("nan")}
    ordered = sorted(values)
    return {"p50": statistics.median(ordered), "p99": ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]}


def run_engine(llm: LLM, prompts: list[list[int]], lengths: list[int], device: torch.device) -> dict:
    """Submit every request at t=0 and step until all finish; token arrival times, KV waste, outputs."""
    ids = [llm.add_request(p, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))
           for p, n in zip(prompts, lengths)]
    index = {request_id: i for i, request_id in enumerate(ids)}
    arrivals: list[list[float]] = [[] for _ in prompts]
    outputs: list[list[int]] = [[] for _ in prompts]
    allocated = used = steps = 0
    bs = llm.block_manager.block_size
    sync(device)
    t0 = time.perf_counter()
    while llm.has_unfinished():
        step_outputs = llm.step()
        now = time.perf_counter() - t0  # step() returns host token ids, so the device is already drained
        steps += 1
        for seq in llm.scheduler.running:  # slots held vs slots holding a token, after this step
            allocated += len(seq.block_table) * bs
            used += seq.num_computed_tokens
        for out in step_outputs:
            i = index[out.request_id]
            new = len(out.outputs[0].token_ids) - len(outputs[i])
            arrivals[i].extend([now] * new)
            outputs[i] = out.outputs[0].token_ids
    seconds = time.perf_counter() - t0
    ttft = [a[0] for a in arrivals]
    itl = [b - a for times in arrivals for a, b in zip(times, times[1:])]
    return {"seconds": seconds, "output_tokens": sum(map(len, outputs)), "steps": steps,
            "kv_waste": 1 - used / allocated if allocated else 0.0, "ttft_s": percentiles(ttft),
            "inter_token_s": percentiles(itl), "outputs": outputs, "stats": llm.stats()}


@torch.inference_mode()
def run_transformers(model, prompts: list[list[int]], lengths: list[int], batch: int, device: torch.device) -> dict:
    """Padded batches through generate: each batch runs to its longest requested output."""
    outputs, seconds = [], 0.0
    for first in range(0, len(prompts), batch):
        chunk, want = prompts[first:first + batch], lengths[first:first + batch]
        longest, new = max(map(len, chunk)), max(want)
        ids = torch.tensor([[0] * (longest - len(p)) + p for p in chunk], device=device)
        mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in chunk], device=device)
        sync(device)
        t0 = time.perf_counter()
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=new,
                             min_new_tokens=new, eos_token_id=None, pad_token_id=0)
        sync(device)
        seconds += time.perf_counter() - t0
        outputs += [row[longest:longest + n] for row, n in zip(out.tolist(), want)]
    return {"seconds": seconds, "useful_output_tokens": sum(lengths), "outputs": outputs}


def run_transformers_cb(model, prompts: list[list[int]], lengths: list[int], device: torch.device,
                        stall_seconds: float = 600.0) -> dict:
    """transformers' continuous batching: every request queued at t=0 with its own max_new_tokens, EOS off (-1),
    greedy. Returns {"skipped": reason} instead of raising when the API is missing or the run fails, so that the rest
    of the benchmark still reports. Not under inference_mode: buffers the manager makes here (warmup) would become
    inference tensors that its generation thread, running under no_grad, may not update in place."""
    if not hasattr(model, "init_continuous_batching"):
        return {"skipped": f"transformers {transformers.__version__} has no init_continuous_batching"}
    from transformers import GenerationConfig

    config = GenerationConfig(do_sample=False, max_new_tokens=max(lengths), eos_token_id=-1, pad_token_id=0)
    try:  # sizes its KV cache and batch for this workload, as generate_batch does
        from transformers.generation.continuous_batching.utils import WorkloadHints
        hints = {"workload_hints": WorkloadHints(max_prompt_length=max(map(len, prompts)),
                                                 max_generated_length=max(lengths), num_requests=len(prompts))}
    except ImportError:
        hints = {}
    manager = None
    try:
        manager = model.init_continuous_batching(generation_config=config, **hints)
        attention = model.config._attn_implementation  # the manager switched it to a paged / flash one
        if hasattr(manager, "warmup"):
            manager.warmup()  # CUDA graph capture, out of the timing (camelid captures its graphs when built)
        resolved = getattr(manager, "continuous_batching_config", None)  # the sizes it chose; None where unknown
        settings = {key: getattr(resolved, key, None) for key in ("num_blocks", "block_size", "page_size",
                                                                  "max_batch_tokens", "max_requests_per_batch")}
        manager.start()
        index = {}
        sync(device)
        t0 = time.perf_counter()
        for i, (prompt, n) in enumerate(zip(prompts, lengths)):
            request_id = manager.add_request(prompt, request_id=f"r{i}", max_new_tokens=n, eos_token_id=-1,
                                             record_timestamps=True)
            if request_id is None:
                return {"skipped": f"the manager refused request {i}"}
            index[request_id] = i
        results: dict[int, object] = {}
        last_progress = time.perf_counter()
        while len(results) < len(prompts):
            result = manager.get_result(timeout=1)
            if result is not None and result.is_finished():
                results[index[result.request_id]] = result
                last_progress = time.perf_counter()
            elif result is None and not manager.is_running():
                return {"skipped": f"generation thread stopped with {len(results)}/{len(prompts)} requests done"}
            elif time.perf_counter() - last_progress > stall_seconds:
                return {"skipped": f"no request finished for {stall_seconds:.0f} s ({len(results)}/{len(prompts)})"}
        seconds = time.perf_counter() - t0
    except Exception as error:  # any failure of the reference path must not cost us the other two columns
        return {"skipped": f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"[:300]}
    finally:
        if manager is not None:
            try:
                manager.stop(block=True, timeout=30)  # also restores the original attention implementation
                if hasattr(manager, "destroy"):
                    manager.destroy()  # its distributed helpers, as generate_batch does
            except Exception as error:  # a failing stop must not hide the result above
                print(f"transformers continuous batching: stop failed: {type(error).__name__}: {error}")
    failed = [f"{i}: {r.error}" for i, r in sorted(results.items()) if getattr(r, "error", None)]
    if failed:
        return {"skipped": f"{len(failed)} requests failed, first: {failed[0]}"[:300]}
    outputs = [list(results[i].generated_tokens) for i in range(len(prompts))]
    stamps = [[t - t0 for t in (results[i].timestamps or [])] for i in range(len(prompts))]
    return {"seconds": seconds, "output_tokens": sum(map(len, outputs)), "outputs": outputs,
            "attn_implementation": attention, "settings": settings,
            "ttft_s": percentiles([s[0] for s in stamps if s]),
            "inter_token_s": percentiles([b - a for s in stamps for a, b in zip(s, s[1:])])}


def identical_fraction(ours: list[list[int]], theirs: list[list[int]], lengths: list[int]) -> float:
    """Fraction of the requested greedy tokens that are the same, position by position."""
    return sum(x == y for a, b in zip(ours, theirs) for x, y in zip(a, b)) / sum(lengths)


def camelid_decode_tok_s(llm: LLM, prompt: list[int], n: int) -> float:
    """Decode tokens/s of one request in the engine, prefill excluded."""
    llm.generate([prompt], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))  # warm up
    request_id = llm.add_request(prompt, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))
    stamps = []  # (time, tokens so far) at each step that brought new tokens: one, or decode_steps of them
    while llm.has_unfinished():
        for out in llm.step():
            if out.request_id == request_id:
                stamps.append((time.perf_counter(), len(out.outputs[0].token_ids)))
    (t_first, n_first), (t_last, n_last) = stamps[0], stamps[-1]  # from the first token on: prefill excluded
    return (n_last - n_first) / (t_last - t_first)


def decode_batch1(llm: LLM, hf, prompt: list[int], n: int, device: torch.device) -> dict:
    """Decode tokens/s of one request, prefill excluded, for both; with decode_steps > 1 camelid also one step at
    a time (the same engine), to show what the steps taken together bring."""
    ours = camelid_decode_tok_s(llm, prompt, n)
    single = None
    if llm.decode_steps > 1:
        steps, llm.decode_steps = llm.decode_steps, 1
        single = camelid_decode_tok_s(llm, prompt, n)
        llm.decode_steps = steps

    ids = torch.tensor([prompt], device=device)

    def hf_seconds(tokens: int) -> float:
        sync(device)
        t0 = time.perf_counter()
        with torch.inference_mode():
            hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=tokens,
                        min_new_tokens=tokens, eos_token_id=None, pad_token_id=0)
        sync(device)
        return time.perf_counter() - t0

    hf_seconds(4)  # warm up
    theirs = (n - 1) / max(hf_seconds(n) - hf_seconds(1), 1e-9)
    return {"camelid_tok_s": ours, "camelid_single_step_tok_s": single, "transformers_tok_s": theirs, "tokens": n,
            "prompt_tokens": len(prompt)}


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--dtype", help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--requests", type=int)
    p.add_argument("--prompt", type=int, nargs=2, metavar=("MIN", "MAX"), help="prompt lengths, uniform")
    p.add_argument("--output", type=int, nargs=2, metavar=("MIN", "MAX"), help="output lengths, uniform")
    p.add_argument("--hf-batch", type=int, help="transformers padded batch size")
    p.add_argument("--reference-requests", type=int, help="the transformers offline columns run only the first N "
                   "requests (a rate on a sample of the same workload; saves device time), default: all")
    p.add_argument("--decode-tokens", type=int, help="tokens decoded in the batch-1 benchmark")
    p.add_argument("--max-num-batched-tokens", type=int)
    p.add_argument("--max-num-seqs", type=int)
    p.add_argument("--kv-cache-memory", help="KV budget, e.g. 20GB (default: the engine's)")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cuda-graphs", choices=["auto", "on", "off"], default="auto",
                   help="decode steps replay CUDA graphs (auto: on CUDA; on for CPU runs their padded path eagerly)")
    p.add_argument("--compile", choices=["on", "off"], default="off",
                   help="torch.compile the decode forward the graphs replay (LLM(compile=True); on an H100 the "
                        "compile and the 20 captures took 171 s)")
    p.add_argument("--decode-steps", type=int, help="LLM(decode_steps=K): decode-only steps on the graphs run K at a "
                                                   "time, synced once (default 8; 1 = one sync per token)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default on CPU: 1; on a shared box, threads that "
                                              "spin-wait for a descheduled sibling swamp a small model)")
    p.add_argument("--out", type=Path, help="JSON file (default: benchmarks/results/engine-<device>-<shape>-<date>)")
    args = p.parse_args()
    if args.reference_requests is not None and args.reference_requests < 1:
        p.error(f"--reference-requests must be >= 1, got {args.reference_requests}")
    transformers.logging.disable_progress_bar()

    device, malloc_tweak, load_start = start(args.device)
    defaults = CUDA_DEFAULTS if device.type == "cuda" else CPU_DEFAULTS
    opt = {k: getattr(args, k) if getattr(args, k, None) is not None else v for k, v in defaults.items()}
    if args.threads or device.type == "cpu":
        torch.set_num_threads(args.threads or 1)
    dtype = parse_dtype(opt["dtype"])
    config = get_preset(opt["preset"]) if opt["preset"] else TINY.replace()
    if args.layers:
        config = config.replace(num_hidden_layers=args.layers)
    longest = opt["prompt"][1] + opt["output"][1]
    if longest > config.max_position_embeddings:
        config = config.replace(max_position_embeddings=longest)
    shape = f"{opt['preset'] or 'tiny'}-L{config.num_hidden_layers}-{str(dtype).removeprefix('torch.')}"

    rng = random.Random(args.seed)
    prompts = [[rng.randrange(3, config.vocab_size) for _ in range(rng.randint(*opt["prompt"]))]
               for _ in range(opt["requests"])]
    lengths = [rng.randint(*opt["output"]) for _ in range(opt["requests"])]

    ours, (theirs,) = same_weights(config, device, dtype)
    ours.eval(), theirs.eval()
    theirs.config.use_cache = True
    diff = check_same_logits(ours, theirs, torch.tensor([prompts[0][:16]], device=device),
                             low_precision=dtype != torch.float32)
    build_start = time.perf_counter()
    llm = LLM(ours, kv_cache_memory=args.kv_cache_memory, block_size=args.block_size, device=device,
              max_num_seqs=opt["max_num_seqs"], max_num_batched_tokens=opt["max_num_batched_tokens"],
              cuda_graphs={"auto": None, "on": True, "off": False}[args.cuda_graphs],
              compile=args.compile == "on", decode_steps=opt["decode_steps"])
    build_s = time.perf_counter() - build_start  # KV cache, graph captures (and the compile)
    graphs = llm.runner.graphs
    graph_note = ("none" if graphs is None else f"{len(graphs.graphs)} captured, up to batch {graphs.max_batch}"
                  if graphs.graphs else "padded path, not captured")
    if graphs is not None and graphs.compiled:
        graph_note += ", torch.compile'd forward"
    param_bytes = sum(t.numel() * t.element_size() for t in {id(t): t for t in ours.parameters()}.values())
    print(f"{shape} on {device_name(device)}: {opt['requests']} requests, prompt {opt['prompt']}, output "
          f"{opt['output']}, {llm.stats()['num_blocks']} KV blocks of {args.block_size}; CUDA graphs: {graph_note} "
          f"(engine built in {build_s:.1f} s); max |logits diff| "
          f"{diff:.3g}")

    # (a) decode at batch 1
    bandwidth = copy_bandwidth(device)
    roofline = bandwidth / param_bytes
    decode = decode_batch1(llm, theirs, prompts[0][:128], opt["decode_tokens"], device)
    single = decode["camelid_single_step_tok_s"]
    print(f"decode batch 1: camelid {decode['camelid_tok_s']:.1f} tok/s"
          + (f" ({single:.1f} one step at a time)" if single else "")
          + f", transformers {decode['transformers_tok_s']:.1f} tok/s ({decode['camelid_tok_s'] / roofline:.1%} of the "
          f"{roofline:.0f} tok/s roofline)", flush=True)
    decode.update(roofline_tok_s=roofline, copy_bandwidth_gb_s=bandwidth / 1e9, parameter_bytes=param_bytes,
                  camelid_roofline_fraction=decode["camelid_tok_s"] / roofline,
                  transformers_roofline_fraction=decode["transformers_tok_s"] / roofline)

    # (b) offline throughput
    engine = run_engine(llm, prompts, lengths, device)
    print(f"offline: camelid {engine['output_tokens'] / engine['seconds']:.1f} output tok/s ({engine['seconds']:.1f} s,"
          f" {engine['steps']} steps); the transformers columns next", flush=True)
    graph_replays = graphs.replays if graphs is not None else 0
    del llm, graphs  # its KV cache took most of the free GPU memory: give it to transformers' columns
    if device.type == "cuda":
        torch.cuda.empty_cache()
    n_ref = min(args.reference_requests or len(prompts), len(prompts))
    ref_prompts, ref_lengths = prompts[:n_ref], lengths[:n_ref]
    hf = run_transformers(theirs, ref_prompts, ref_lengths, opt["hf_batch"], device)
    # last: it swaps the model's attention while it runs
    cb = run_transformers_cb(theirs, ref_prompts, ref_lengths, device)
    same = identical_fraction(engine["outputs"], hf["outputs"], ref_lengths)
    ours_tps = engine["output_tokens"] / engine["seconds"]
    theirs_tps = hf["useful_output_tokens"] / hf["seconds"]
    if "skipped" in cb:
        cb_record = {"skipped": cb["skipped"]}
    else:
        cb_tps = cb["output_tokens"] / cb["seconds"]
        cb_record = {"output_tok_s": cb_tps, "ratio": ours_tps / cb_tps, "seconds": cb["seconds"],
                     "output_tokens": cb["output_tokens"], "attn_implementation": cb["attn_implementation"],
                     "settings": cb["settings"],
                     "ttft_s": cb["ttft_s"], "inter_token_s": cb["inter_token_s"],
                     "greedy_tokens_identical": identical_fraction(engine["outputs"], cb["outputs"], ref_lengths)}

    print(f"{'':34}{'camelid':>12}{'transformers':>14}{'ratio':>8}")
    print(f"{'decode batch 1 (tok/s)':34}{decode['camelid_tok_s']:12.1f}{decode['transformers_tok_s']:14.1f}"
          f"{decode['camelid_tok_s'] / decode['transformers_tok_s']:8.2f}")
    print(f"{'  roofline fraction':34}{decode['camelid_roofline_fraction']:12.1%}"
          f"{decode['transformers_roofline_fraction']:14.1%}   (roofline {roofline:.0f} tok/s = "
          f"{bandwidth / 1e9:.1f} GB/s / {param_bytes / 1e9:.3f} GB)")
    print(f"\n{'offline throughput (output tok/s)':34}{'camelid':>12}{'padded gen.':>14}{'ratio':>8}"
          f"{'HF cont. b.':>14}{'ratio':>8}")
    cb_columns = (f"{cb_record['output_tok_s']:14.1f}{cb_record['ratio']:8.2f}" if "skipped" not in cb
                  else f"  skipped: {cb['skipped']}")
    print(f"{'':34}{ours_tps:12.1f}{theirs_tps:14.1f}{ours_tps / theirs_tps:8.2f}{cb_columns}")
    print(f"{'  wall seconds':34}{engine['seconds']:12.1f}{hf['seconds']:14.1f}"
          + (f"{'':8}{cb['seconds']:14.1f}" if "skipped" not in cb else ""))
    print(f"camelid: KV-cache waste {engine['kv_waste']:.2%}, TTFT p50 {engine['ttft_s']['p50']:.3f} s p99 "
          f"{engine['ttft_s']['p99']:.3f} s, inter-token p50 {engine['inter_token_s']['p50'] * 1e3:.1f} ms p99 "
          f"{engine['inter_token_s']['p99'] * 1e3:.1f} ms, {engine['steps']} steps, "
          f"{engine['stats']['num_preemptions']} preemptions")
    print(f"greedy tokens identical to camelid's: padded generate {same:.1%}"
          + (f", continuous batching {cb_record['greedy_tokens_identical']:.1%} (attention "
             f"{cb['attn_implementation']}, TTFT p50 {cb['ttft_s']['p50']:.3f} s, inter-token p50 "
             f"{cb['inter_token_s']['p50'] * 1e3:.1f} ms)" if "skipped" not in cb else ""))

    record = {
        **record_header("engine", device), "dtype": str(dtype).removeprefix("torch."),
        "preset": opt["preset"] or "tiny", "config": config.to_hf(), "workload": {
            "seed": args.seed, "requests": opt["requests"], "prompt_range": opt["prompt"],
            "output_range": opt["output"], "prompt_tokens": sum(map(len, prompts)), "output_tokens": sum(lengths)},
        "engine_options": {"block_size": args.block_size, "num_blocks": engine["stats"]["num_blocks"],
                           "max_num_seqs": opt["max_num_seqs"],
                           "max_num_batched_tokens": opt["max_num_batched_tokens"], "cuda_graphs": graph_note, "build_s": build_s,
                           "decode_steps": opt["decode_steps"],
                           "graph_replays": graph_replays},
        "glibc_keep_freed_memory": malloc_tweak, "max_abs_logits_diff": diff,
        "load_average_1min": {"start": load_start, "end": os.getloadavg()[0]},  # other work on the box skews CPU runs
        "decode_batch1": decode,
        "offline": {"camelid_output_tok_s": ours_tps, "transformers_useful_tok_s": theirs_tps,
                    "ratio": ours_tps / theirs_tps, "camelid_s": engine["seconds"], "transformers_s": hf["seconds"],
                    "transformers_batch": opt["hf_batch"], "transformers_requests": n_ref, "kv_cache_waste": engine["kv_waste"],
                    "ttft_s": engine["ttft_s"], "inter_token_s": engine["inter_token_s"], "steps": engine["steps"],
                    "engine_stats": engine["stats"], "greedy_tokens_identical": same,
                    "transformers_continuous_batching": cb_record},
    }
    out = write_result(record, f"engine-{device_slug(device)}-{shape}", args.out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
