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

import argparse
import ctypes
import datetime
import importlib.metadata
import json
import os
import platform
import re
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from transformers import AutoModelForCausalLM

from camelid.checkpoint import parse_dtype, save_pretrained
from camelid.config import ModelConfig, get_preset
from camelid.generate import generate_ids
from camelid.model import KVCache, Transformer

# the default on CPU: LLaMA's vocabulary and layout (GQA, SwiGLU, RoPE) at a size two cores train in seconds
SMALL = ModelConfig(vocab_size=32000, hidden_size=512, intermediate_size=1408, num_hidden_layers=4,
                    num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=2048, rms_norm_eps=1e-5)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        model = re.search(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text()).group(1).strip()
    except (OSError, AttributeError):
        pass
    return f"{model} ({len(os.sched_getaffinity(0))} cores, {torch.get_num_threads()} torch threads)"


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory in the process (no mmap for big blocks, no trimming) so that every step reuses
    the same pages. Otherwise each step's activations are fresh mmaps, and on a VM whose memory the host backs lazily
    the first touch of a page cost ~25x a warm one (2.8 s vs 0.1 s per GiB on our CI box), swamping the model."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(-4, 0) and libc.mallopt(-1, 2**31 - 1))  # M_MMAP_MAX = 0, M_TRIM_THRESHOLD = 2 GiB
    except (OSError, AttributeError):
        return False


def timed(fn, device: torch.device) -> float:
    """Seconds one call of fn takes, with the device queue drained on both sides."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def compare(fns: dict[str, callable], device: torch.device, warmup: int, repeats: int) -> dict[str, list[float]]:
    """Seconds per call of each fn, `repeats` times; the fns take turns so that drift in machine load hits all alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(timed(fn, device))
    return times


def train_step(model: torch.nn.Module, ids: torch.Tensor, hf: bool) -> None:
    """Forward, next-token cross-entropy (in fp32, outside the model, identical for both) and backward."""
    logits = model(input_ids=ids[:, :-1]).logits if hf else model(ids[:, :-1])
    loss = F.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    model.zero_grad(set_to_none=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", help="a camelid.config.PRESETS name (default: tinyllama-1.1b on CUDA, a small "
                                    "llama-shaped config otherwise)")
    p.add_argument("--layers", type=int, help="override num_hidden_layers (run a big shape on CPU)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="default: cuda if present")
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

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    malloc_tweak = not cuda and keep_freed_memory()
    load_start = os.getloadavg()[0]
    warmup = args.warmup if args.warmup is not None else 5 if args.compile else 2
    dtype = parse_dtype(args.dtype or ("bfloat16" if cuda else "float32"))
    seq, batch = args.seq or (2048 if cuda else 256), args.batch or (4 if cuda else 2)
    preset = args.preset or ("tinyllama-1.1b" if cuda else None)
    config = get_preset(preset) if preset else SMALL.replace()
    if args.layers:
        config = config.replace(num_hidden_layers=args.layers)
    if max(seq, args.prompt + args.decode_tokens) > config.max_position_embeddings:
        config = config.replace(max_position_embeddings=max(seq, args.prompt + args.decode_tokens))
    shape = f"{preset or 'small'}-L{config.num_hidden_layers}-{str(dtype).removeprefix('torch.')}-s{seq}-b{batch}"

    # ---- one set of weights in both models -----------------------------------------------------------------------
    torch.manual_seed(0)
    with torch.device(device):
        ours = Transformer(config)  # built in fp32, cast like transformers casts the saved fp32 file
    with tempfile.TemporaryDirectory() as tmp:
        save_pretrained(ours, tmp)
        theirs = AutoModelForCausalLM.from_pretrained(tmp, dtype=dtype, attn_implementation="sdpa").to(device)
    ours.to(dtype)
    ours.set_activation_checkpointing(False)
    theirs.activation_checkpointing_disable()  # transformers 5 name of gradient_checkpointing_disable
    assert not ours.checkpointed_layers and not theirs.is_activation_checkpointing
    theirs.config.use_cache = False  # training: no KV cache built during the forward

    ids = torch.randint(0, config.vocab_size, (batch, seq + 1), device=device)
    ours.eval(), theirs.eval()
    with torch.inference_mode():
        a, b = ours(ids[:, :64]).float(), theirs(input_ids=ids[:, :64]).logits.float()
    diff = (a - b).abs().max().item()
    print(f"{shape} on {device_name(device)}: max |logits diff| = {diff:.3g} (logit scale {a.abs().max().item():.3g})")
    if diff > (1e-3 if dtype == torch.float32 else 0.1) * max(1.0, a.abs().max().item()):
        raise SystemExit("the two models disagree; the timings would not compare equivalent computations")
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
        "benchmark": "forward", "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "device": device_name(device), "device_type": device.type, "dtype": str(dtype).removeprefix("torch."),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "camelid": importlib.metadata.version("camelid"), "python": platform.python_version()},
        "preset": preset or "small", "config": config.to_hf(), "batch": batch, "seq": seq, "prompt": args.prompt,
        "decode_tokens": n, "repeats": args.repeats, "warmup": warmup, "compile": args.compile,
        "glibc_keep_freed_memory": malloc_tweak,
        "load_average_1min": {"start": load_start, "end": os.getloadavg()[0]},  # other work on the box skews CPU runs
        "max_abs_logits_diff": diff, "greedy_tokens_identical": same, "results": results,
    }
    slug = re.sub(r"[^a-z0-9]+", "-", (torch.cuda.get_device_name(device) if cuda else "cpu").lower()).strip("-")
    name = f"forward-{slug}-{shape}{'-compile' * args.compile}-{datetime.date.today()}.json"
    out = args.out or Path(__file__).parent / "results" / name
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
