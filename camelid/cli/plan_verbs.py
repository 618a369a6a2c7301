"""Verbs before and around a run: plan scaling / memory / fit, monitor."""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
import time

from camelid.cli.model_verbs import human_count
from camelid.config import config_of
from camelid.monitor import format_sample, monitors
from camelid.plan import fit as plan_fit
from camelid.plan import memory as plan_memory
from camelid.plan import scaling as plan_scaling


def cmd_monitor(args: argparse.Namespace) -> None:
    if args.interval <= 0 or (args.count is not None and args.count < 1):
        raise ValueError("--interval must be > 0 and --count >= 1")
    devices, note = monitors()
    if note:
        print(note, file=sys.stderr)
    done = 0
    try:
        while args.count is None or done < args.count:
            time.sleep(args.interval)  # CPU percentages are measured over the interval
            rows = [{"device": m.name, **m.sample()} for m in devices]
            if args.json:
                print(json.dumps({"time": time.time(), "devices": rows}), flush=True)
            else:
                stamp = time.strftime("%H:%M:%S")
                for i, row in enumerate(rows):
                    name = f"GPU {i} {row['device']}" if "gpu_util" in row else "host"
                    print(f"{stamp} {format_sample(name, row)}", flush=True)
            done += 1
    except KeyboardInterrupt:
        pass




def _count(text: str) -> float:
    """'7B', '1.4T', '500M', '5.76e23' -> a number (for --params / --tokens / --flops)."""
    scale = {"K": 1e3, "M": 1e6, "B": 1e9, "G": 1e9, "T": 1e12}.get(text[-1:].upper(), 1)
    try:
        return float(text[:-1] if scale != 1 else text) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r} (write e.g. 7B, 1.4T or 5.76e23)") from None


def cmd_plan_scaling(args: argparse.Namespace) -> None:
    result = plan_scaling.plan(flops=args.flops, params=args.params, tokens=args.tokens)
    if args.plot:
        try:
            result["plot"] = str(plan_scaling.plot_frontier(args.plot, flops=result["laws"][0]["flops"]))
        except ImportError as e:  # matplotlib is optional
            raise ValueError(str(e)) from None
    if args.json:
        print(json.dumps(result, indent=2))
        return
    (key, value), = result["given"].items()
    print(f"compute-optimal training for {key} = {value:.3g} (FLOPs = 6 N D; loss from Chinchilla approach 3)")
    print(f"  {'law':<26}{'params':>10}{'tokens':>10}{'tokens/param':>14}{'FLOPs':>11}{'loss':>8}")
    si = lambda n: f"{n / 1e12:.2f} T" if n >= 1e12 else human_count(n)  # noqa: E731
    for r in result["laws"]:
        print(f"  {r['name']:<26}{si(r['params']):>10}{si(r['tokens']):>10}"
              f"{r['tokens_per_param']:>14.1f}{r['flops']:>11.3g}{r['loss']:>8.3f}")
    if args.plot:
        print(f"wrote {result['plot']}")


def cmd_plan_memory(args: argparse.Namespace) -> None:
    est = plan_memory.estimate(config_of(args.model), args.method, seq=args.seq, batch=args.batch,
                               precision=args.precision, optimizer=args.optimizer, checkpointing=args.checkpointing,
                               gpus=args.gpus, strategy=args.strategy, kv_context=args.kv_context,
                               lora_r=args.lora_r, lora_targets=args.lora_targets, compiled=args.compile)
    if args.json:
        print(json.dumps(est.to_dict(), indent=2))
        return
    setup = f"{args.model}, {args.method}, seq {args.seq}, batch {args.batch}, {args.precision}"
    if args.method != "inference":
        setup += f", {args.optimizer}" + (", checkpointing" if args.checkpointing else "")
        setup += ", compiled" if args.compile else ""
        setup += f", {args.gpus} GPUs ({args.strategy})" if args.gpus > 1 else ""
    print(plan_memory.format_table(est, f"memory per GPU: {setup}"))


def cmd_plan_fit(args: argparse.Namespace) -> None:
    device = plan_fit.parse_memory(args.device_memory)
    rows = plan_fit.fit(config_of(args.model), device, seq=args.seq, global_batch=args.global_batch,
                        precision=args.precision, optimizer=args.optimizer, compiled=args.compile)
    if args.json:
        print(json.dumps({"device_memory_bytes": device, "seq": args.seq, "global_batch": args.global_batch,
                          "compiled": args.compile, "methods": plan_fit.to_dicts(rows)}, indent=2))
        return
    print(f"{args.model} on {device / 1e9:.1f} GB, seq {args.seq}, global batch {args.global_batch} "
          f"({args.precision}, {args.optimizer}{', compiled' if args.compile else ''})")
    for r in rows:
        if r.fits:
            ckpt = "on" if r.checkpointing else "off"
            how = (f"batch {r.micro_batch}" if r.method == "inference" else
                   f"micro-batch {r.micro_batch} x accum {r.grad_accum}, checkpointing {ckpt}")
            print(f"  {r.method:<10} fits   {how} ({r.bytes_needed / 1e9:.1f} GB estimated)")
        else:
            print(f"  {r.method:<10} no     {r.reason}")




def register(verbs, fmt) -> None:
    """Add this module's verbs to the `camelid` parser."""
    p = verbs.add_parser("monitor", help="a live view of the GPUs (NVML), or of the CPU and RAM", formatter_class=fmt,
                         epilog=textwrap.dedent("""\
        One line per GPU per interval: utilisation, memory used/total (all processes), power, temperature.
        Without a GPU (or without nvidia-ml-py): the machine's CPU and RAM. Ctrl-C stops.

        examples:
          camelid monitor
          camelid monitor --interval 5 --count 12 --json > gpu.jsonl
        """))
    p.add_argument("--interval", type=float, default=1.0, help="seconds between samples (default 1)")
    p.add_argument("--count", type=int, default=None, help="stop after N samples (default: run until Ctrl-C)")
    p.add_argument("--json", action="store_true", help="one JSON object per sample")
    p.set_defaults(func=cmd_monitor)

    p = verbs.add_parser("plan", help="scaling laws, memory estimates, what fits a GPU")
    pverbs = p.add_subparsers(dest="plan_verb", required=True, metavar="VERB")
    p = pverbs.add_parser("scaling", help="compute-optimal model size and tokens (Chinchilla, Kaplan)",
                          formatter_class=fmt, epilog=textwrap.dedent("""\
        Give exactly one of --flops, --params, --tokens; every law answers with its compute-optimal (N, D, C).
        Sources and formulas: docs/PLANNING.md.

        examples:
          camelid plan scaling --flops 5.76e23
          camelid plan scaling --params 7B --json
          camelid plan scaling --tokens 1.4T --plot frontier.png
        """))
    p.add_argument("--flops", type=_count, default=None, help="training compute C")
    p.add_argument("--params", type=_count, default=None, help="model size N (7B, 500M, ...)")
    p.add_argument("--tokens", type=_count, default=None, help="training tokens D (1.4T, ...)")
    p.add_argument("--plot", default=None, metavar="FILE.png", help="write the iso-FLOP frontier as a PNG")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_plan_scaling)

    p = pverbs.add_parser("memory", help="GPU memory of a training or inference run, term by term",
                          formatter_class=fmt, epilog=textwrap.dedent("""\
        Bytes per GPU: weights, gradients, optimizer states, activations, KV cache, logits and buffers, each with
        its formula (camelid/plan/memory.py). LoRA/QLoRA/DoRA default to rank 8 on q_proj and v_proj.

        examples:
          camelid plan memory --model llama-2-7b --method qlora --seq 1024 --batch 4
          camelid plan memory --model llama-2-7b --method full --optimizer adamw8bit --checkpointing \\
              --gpus 8 --strategy fsdp
          camelid plan memory --model llama-3-8b --method inference --batch 16 --seq 512 --kv-context 8192 --json
        """))
    p.add_argument("--model", required=True, help="a preset or a model folder")
    p.add_argument("--method", required=True, choices=plan_memory.METHODS, metavar="METHOD",
                   help=", ".join(plan_memory.METHODS))
    p.add_argument("--seq", type=int, default=512, help="tokens per sequence (default 512)")
    p.add_argument("--batch", type=int, default=1, help="sequences per micro-batch (default 1)")
    p.add_argument("--precision", default="bf16", choices=list(plan_memory.PRECISIONS))
    p.add_argument("--optimizer", default="adamw", choices=plan_memory.OPTIMIZERS)
    p.add_argument("--checkpointing", action="store_true", help="activation checkpointing of every block")
    p.add_argument("--compile", action="store_true",
                   help="training under torch.compile (`compile: true`): norm outputs and the gated product are "
                        "recomputed in backward")
    p.add_argument("--gpus", type=int, default=1)
    p.add_argument("--strategy", default="ddp", choices=plan_memory.STRATEGIES, help="with --gpus > 1 (default ddp)")
    p.add_argument("--kv-context", type=int, default=None, help="inference: KV-cache tokens (default --seq)")
    p.add_argument("--lora-r", type=int, default=8, help="LoRA/QLoRA/DoRA rank (default 8)")
    p.add_argument("--lora-targets", default="qv", choices=list(plan_memory.LORA_TARGETS),
                   help="qv: q_proj and v_proj (default); all: every projection")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_plan_memory)

    p = pverbs.add_parser("fit", help="which methods fit a device, with micro-batch, accumulation, checkpointing",
                          formatter_class=fmt, epilog=textwrap.dedent("""\
        A method fits when its estimate plus a margin (5% + 1 GB for the CUDA context) is within --device-memory.
        Checkpointing is switched on only when micro-batch 1 does not fit without it.

        examples:
          camelid plan fit --device-memory 24GB --model llama-2-7b --seq 1024
          camelid plan fit --device-memory 48GB --model llama-65b --json
        """))
    p.add_argument("--device-memory", required=True, help="e.g. 24GB, 80GiB (a bare number is GB)")
    p.add_argument("--model", required=True, help="a preset or a model folder")
    p.add_argument("--seq", type=int, default=512, help="tokens per sequence (default 512)")
    p.add_argument("--global-batch", type=int, default=64, help="sequences per optimizer step (default 64)")
    p.add_argument("--precision", default="bf16", choices=list(plan_memory.PRECISIONS))
    p.add_argument("--optimizer", default="adamw", choices=plan_memory.OPTIMIZERS)
    p.add_argument("--compile", action="store_true", help="training under torch.compile (`compile: true`)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_plan_fit)
