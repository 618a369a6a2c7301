"""camelid vs transformers, side by side: training-step, prefill and greedy-decode tokens/s from one run.

Both models share one config, device, dtype and set of weights: the camelid model is built from the config, saved
with `camelid.checkpoint.save_pretrained`, and that folder is loaded into `transformers` (attn_implementation="sdpa").
The logits of the two are compared before anything is timed, so the timings are of equivalent computations.

  train step  forward + cross-entropy + backward (no optimizer step), B * seq tokens per step
  prefill     one forward over B prompts of --prompt tokens into a fresh KV cache, logits of the last token only
  decode      greedy generation end to end (prefill + --decode-tokens new tokens): B * N new tokens per call;
              camelid.generate.generate_ids vs model.generate(do_sample=False, eos_token_id=None, min_new_tokens=N)

Every timing is the median of --repeats runs after --warmup runs; camelid and transformers alternate run by run so
that machine noise hits both alike, and on CPU glibc is told to keep freed memory (see keep_freed_memory).
Ratios are camelid / transformers in tokens/s: > 1 means camelid is faster.

  # CPU: the default small llama-shaped config (fp32, seq 256), or the TinyLlama shape cut to 2 layers
  .venv/bin/python benchmarks/forward.py
  .venv/bin/python benchmarks/forward.py --preset tinyllama-1.1b --layers 2 --seq 256 --batch 2 --decode-tokens 32
  # GPU: TinyLlama-1.1B shape, bf16, seq 2048 (the defaults on CUDA); add --compile to torch.compile both models
  python benchmarks/forward.py --device cuda
"""

from __future__ import annotations

import os
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from common import SMALL, check_same_logits, compare, device_name, device_slug, record_header
from common import model_shape, parser, same_weights, start, write_result

from camelid.checkpoint import parse_dtype
from camelid.generate import generate_ids
from camelid.model import KVCache


def train_step(model: torch.nn.Module, ids: torch.Tensor, hf: bool) -> None:
    """Forward, next-token cross-entropy (in fp32, outside the model, identical for both) and backward."""
    logits = model(input_ids=ids[:, :-1]).logits if hf else model(ids[:, :-1])
    loss = F.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    model.zero_grad(set_to_none=True)


def main() -> None:
    p = parser(__doc__, "a small llama-shaped config")
    p.add_argument("--dtype", help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--seq", type=int, help="training sequence length (default: 2048 on CUDA, 256 on CPU)")
    p.add_argument("--batch", type=int, help="batch size for training and decode (default: 4 on CUDA, 2 on CPU)")
    p.add_argument("--prompt", type=int, default=128, help="prompt tokens per row for prefill and decode")
    p.add_argument("--decode-tokens", type=int, default=64, help="new tokens per row in the decode benchmark")
    p.add_argument("--repeats", type=int, default=5, help="timed runs of each benchmark; the median is reported")
    p.add_argument("--warmup", type=int, help="untimed runs first (default: 2, or 5 with --compile for recompiles)")
    p.add_argument("--compile", action="store_true", help="torch.compile both models")
    p.add_argument("--out", type=Path, help="JSON file (default: benchmarks/results/forward-<device>-<shape>-<date>)")
    args = p.parse_args()
    transformers.logging.disable_progress_bar()

    device, malloc_tweak, load_start = start(args.device)
    cuda = device.type == "cuda"
    warmup = args.warmup if args.warmup is not None else 5 if args.compile else 2
    dtype = parse_dtype(args.dtype or ("bfloat16" if cuda else "float32"))
    seq, batch = args.seq or (2048 if cuda else 256), args.batch or (4 if cuda else 2)
    config, preset = model_shape(args, max(seq, args.prompt + args.decode_tokens), cuda, SMALL)
    shape = f"{preset or 'small'}-L{config.num_hidden_layers}-{str(dtype).removeprefix('torch.')}-s{seq}-b{batch}"

    # ---- one set of weights in both models -----------------------------------------------------------------------
    ours, (theirs,) = same_weights(config, device, dtype)
    ids = torch.randint(0, config.vocab_size, (batch, seq + 1), device=device)
    diff = check_same_logits(ours, theirs, ids[:, :64], low_precision=dtype != torch.float32)
    print(f"{shape} on {device_name(device)}: max |logits diff| = {diff:.3g}")
    if args.compile:
        ours.compile(), theirs.compile()

    # ---- training step -----------------------------------------------------------------------------------------
    ours.train(), theirs.train()
    train = compare({"camelid": lambda: train_step(ours, ids, hf=False),
                     "transformers": lambda: train_step(theirs, ids, hf=True)}, device, warmup, args.repeats)
    ours.eval(), theirs.eval()

    # ---- prefill and decode (inference mode, KV cache on) ------------------------------------------------------
    theirs.config.use_cache = True
    prompts = ids[:, :args.prompt]
    n = args.decode_tokens
    decoded = {}

    def ours_prefill():
        cache = KVCache(config, batch, args.prompt, device=device, dtype=dtype)
        ours(prompts, cache=cache, start=0, last_only=True)

    def ours_decode():
        decoded["camelid"] = generate_ids(ours, prompts.tolist(), max_new_tokens=n)

    def theirs_decode():
        out = theirs.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=False, max_new_tokens=n,
                              min_new_tokens=n, eos_token_id=None, pad_token_id=0)
        decoded["transformers"] = out[:, args.prompt:].tolist()

    with torch.inference_mode():
        prefill = compare({"camelid": ours_prefill,
                           "transformers": lambda: theirs(input_ids=prompts, use_cache=True, logits_to_keep=1)},
                          device, warmup, args.repeats)
        decode = compare({"camelid": ours_decode, "transformers": theirs_decode}, device, max(1, warmup // 2),
                         args.repeats)
    pairs = zip(decoded["camelid"], decoded["transformers"])
    same = sum(x == y for r, s in pairs for x, y in zip(r, s)) / (batch * n)

    # ---- report --------------------------------------------------------------------------------------------------
    rows = {"train_step": (train, batch * seq), "prefill": (prefill, batch * args.prompt),
            "decode": (decode, batch * n)}
    results = {}
    print(f"{'':12}{'camelid tok/s':>16}{'transformers tok/s':>20}{'ratio':>8}{'ratio of best runs':>20}")
    for name, (times, tokens) in rows.items():
        secs = {lib: statistics.median(t) for lib, t in times.items()}
        ours_tps, theirs_tps = tokens / secs["camelid"], tokens / secs["transformers"]
        results[name] = {"tokens": tokens, "camelid_s": secs["camelid"], "transformers_s": secs["transformers"],
                         "camelid_tok_s": ours_tps, "transformers_tok_s": theirs_tps, "ratio": ours_tps / theirs_tps,
                         "camelid_best_tok_s": tokens / min(times["camelid"]),
                         "transformers_best_tok_s": tokens / min(times["transformers"]),
                         "ratio_of_fastest": min(times["transformers"]) / min(times["camelid"]),
                         "camelid_all_s": times["camelid"], "transformers_all_s": times["transformers"]}
        print(f"{name:12}{ours_tps:16.1f}{theirs_tps:20.1f}{ours_tps / theirs_tps:8.2f}"
              f"{results[name]['ratio_of_fastest']:20.2f}")
    print(f"greedy tokens identical in both: {same:.1%} (random weights: near-ties may flip in low precision)")

    record = {
        **record_header("forward", device), "dtype": str(dtype).removeprefix("torch."),
        "preset": preset or "small", "config": config.to_hf(), "batch": batch, "seq": seq, "prompt": args.prompt,
        "decode_tokens": n, "repeats": args.repeats, "warmup": warmup, "compile": args.compile,
        "glibc_keep_freed_memory": malloc_tweak,
        "load_average_1min": {"start": load_start, "end": os.getloadavg()[0]},  # other work on the box skews CPU runs
        "max_abs_logits_diff": diff, "greedy_tokens_identical": same, "results": results,
    }
    out = write_result(record, f"forward-{device_slug(device)}-{shape}{'-compile' * args.compile}", args.out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
