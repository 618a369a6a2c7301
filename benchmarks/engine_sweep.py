"""camelid's engine alone on issue 5's offline workload, over several scheduler settings, to pick the defaults.

benchmarks/engine.py measures one setting against transformers (whose columns take most of its run); this script
skips them and runs the same seeded workload (engine.py's: 512 requests of random token ids, prompts uniform in
32..1024, outputs uniform in 32..512, EOS ignored) once per setting `MAX_NUM_SEQS:MAX_NUM_BATCHED_TOKENS`, on one
model built once (TinyLlama-1.1B shape, bf16, random weights from a fixed seed), plus decode at batch 1. Each setting
prints its line as it ends (a timeout keeps the finished ones in the log); the JSON holds them all.

  python benchmarks/engine_sweep.py --device cuda --settings 256:8192 512:8192 512:16384
  .venv/bin/python benchmarks/engine_sweep.py --settings 32:256 64:512     # CPU: the tiny model, engine.py's workload
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import torch
from common import TINY, device_name, device_slug, parser, record_header, start, write_result
from engine import CPU_DEFAULTS, CUDA_DEFAULTS, camelid_decode_tok_s, copy_bandwidth, run_engine

from camelid.checkpoint import parse_dtype
from camelid.config import get_preset
from camelid.engine import LLM
from camelid.model import Transformer


def setting(text: str) -> tuple[int, int]:
    seqs, _, tokens = text.partition(":")
    try:
        return int(seqs), int(tokens)
    except ValueError:
        raise SystemExit(f"error: a setting is MAX_NUM_SEQS:MAX_NUM_BATCHED_TOKENS, got {text!r}") from None


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--settings", nargs="+", default=None,
                   help="MAX_NUM_SEQS:MAX_NUM_BATCHED_TOKENS each (default: engine.py's one setting)")
    p.add_argument("--decode-steps", type=int, default=8)
    p.add_argument("--compile", action="store_true", help="LLM(compile=True) (minutes of compile per setting)")
    p.add_argument("--requests", type=int)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="JSON file (default: benchmarks/results/engine_sweep-<device>-<date>)")
    args = p.parse_args()
    device, _, _ = start(args.device)
    if device.type == "cpu":
        torch.set_num_threads(1)  # as engine.py: a small model on a shared box
    defaults = CUDA_DEFAULTS if device.type == "cuda" else CPU_DEFAULTS
    settings = [setting(s) for s in args.settings] if args.settings else [
        (defaults["max_num_seqs"], defaults["max_num_batched_tokens"])]
    requests = args.requests or defaults["requests"]
    dtype = parse_dtype(defaults["dtype"])
    config = get_preset(args.preset or defaults["preset"]) if (args.preset or defaults["preset"]) else TINY.replace()
    if args.layers:
        config = config.replace(num_hidden_layers=args.layers)
    longest = defaults["prompt"][1] + defaults["output"][1]
    if config.max_position_embeddings < longest:
        config = config.replace(max_position_embeddings=longest)

    rng = random.Random(args.seed)  # engine.py's workload: the same prompts and lengths for the same seed
    prompts = [[rng.randrange(3, config.vocab_size) for _ in range(rng.randint(*defaults["prompt"]))]
               for _ in range(requests)]
    lengths = [rng.randint(*defaults["output"]) for _ in range(requests)]
    torch.manual_seed(0)
    with torch.device(device):
        model = Transformer(config).to(dtype).eval()
    param_bytes = sum(t.numel() * t.element_size() for t in model.parameters())
    roofline = copy_bandwidth(device) / param_bytes
    print(f"{device_name(device)}: {requests} requests, {sum(lengths)} output tokens; decode roofline "
          f"{roofline:.0f} tok/s", flush=True)

    rows = []
    for max_num_seqs, max_num_batched_tokens in settings:
        built = time.perf_counter()
        llm = LLM(model, device=device, max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                  decode_steps=args.decode_steps, compile=args.compile)
        build_s = time.perf_counter() - built
        batch1 = camelid_decode_tok_s(llm, prompts[0][:128], defaults["decode_tokens"]) if not rows else None
        run = run_engine(llm, prompts, lengths, device)
        row = {"max_num_seqs": max_num_seqs, "max_num_batched_tokens": max_num_batched_tokens, "build_s": build_s,
               "output_tok_s": run["output_tokens"] / run["seconds"], "seconds": run["seconds"],
               "steps": run["steps"], "kv_cache_waste": run["kv_waste"], "ttft_s": run["ttft_s"],
               "inter_token_s": run["inter_token_s"], "preemptions": run["stats"]["num_preemptions"],
               "num_blocks": run["stats"]["num_blocks"], "decode_batch1_tok_s": batch1}
        rows.append(row)
        print(f"max_num_seqs {max_num_seqs:5d}, max_num_batched_tokens {max_num_batched_tokens:6d}: "
              f"{row['output_tok_s']:9.1f} output tok/s ({run['seconds']:.1f} s, {run['steps']} steps, "
              f"{row['preemptions']} preemptions, KV waste {row['kv_cache_waste']:.2%}, TTFT p50 "
              f"{run['ttft_s']['p50']:.2f} s, inter-token p50 {run['inter_token_s']['p50'] * 1e3:.1f} ms; built in "
              f"{build_s:.1f} s)" + (f"; decode at batch 1 {batch1:.1f} tok/s ({batch1 / roofline:.1%} of the "
                                     "roofline)" if batch1 else ""), flush=True)
        del llm
        if device.type == "cuda":
            torch.cuda.empty_cache()

    shape = f"{args.preset or defaults['preset'] or 'tiny'}-L{config.num_hidden_layers}"
    record = {**record_header("engine_sweep", device), "dtype": str(dtype).removeprefix("torch."),
              "config": config.to_hf(), "decode_steps": args.decode_steps, "compile": args.compile,
              "workload": {"seed": args.seed, "requests": requests, "prompt_range": defaults["prompt"],
                           "output_range": defaults["output"], "output_tokens": sum(lengths)},
              "roofline_tok_s": roofline, "settings": rows}
    print(f"wrote {write_result(record, f'engine_sweep-{device_slug(device)}-{shape}', args.out)}")


if __name__ == "__main__":
    main()
