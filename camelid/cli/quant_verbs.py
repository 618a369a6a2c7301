"""Verbs on quantization: quantize."""

from __future__ import annotations

import argparse
import textwrap

from tqdm import tqdm

from camelid.quant import FORMATS
from camelid.quantize import quantize_folder


def cmd_quantize(args: argparse.Namespace) -> None:
    if args.group_size is not None and args.method != "int4":
        raise ValueError("--group-size applies to int4 only (int8 is per channel, nf4 uses QLoRA's blocks of 64)")
    group_size = 128 if args.group_size is None else args.group_size
    if group_size <= 0:
        raise ValueError(f"--group-size must be positive, got {group_size}")
    if args.eval_tokens < 2:
        raise ValueError(f"--eval-tokens must be at least 2, got {args.eval_tokens}")
    # one bar per stage, each opened at its first step: loading and checking print nothing, errors stay one line
    bars: dict[str, tqdm] = {}

    def advance(desc: str, unit: str, done: int, total: int, postfix: str = "") -> None:
        if desc not in bars:
            bars[desc] = tqdm(total=total, desc=desc, unit=unit, disable=args.quiet)
        bars[desc].set_postfix_str(postfix, refresh=False)
        bars[desc].update(done - bars[desc].n)
        if done >= total:  # the next stage's bar then starts on a line of its own
            bars[desc].close()

    def progress(name: str, done: int, total: int) -> None:
        advance(f"quantizing to {args.method}", "layer", done, total, postfix=name)

    def eval_progress(stage: str, done: int, total: int) -> None:
        advance(f"perplexity {stage}", "window", done, total)

    try:
        report = quantize_folder(args.model, args.out, args.method, group_size=group_size,
                                 eval_text=args.eval_text, eval_tokens=args.eval_tokens,
                                 calibration=args.calibration, progress=progress, device=args.device or "cpu",
                                 eval_progress=eval_progress, overwrite=args.overwrite)
    finally:
        for bar in bars.values():
            bar.close()
    for line in report.lines():
        print(line)


def register(verbs, fmt) -> None:
    """Add this module's verbs to the `camelid` parser."""
    p = verbs.add_parser("quantize", help="write a weight-only quantized copy of a model folder (int8, int4, nf4)",
                         formatter_class=fmt, epilog=textwrap.dedent("""\
        methods:
          int8   one symmetric scale per output channel (~8 bits per weight)
          int4   groups of --group-size inputs, min/max asymmetric, fp16 scales (~4.25 bits at 128)
          nf4    QLoRA's NormalFloat4, blocks of 64, double-quantized scales (~4.13 bits)
        lm_head and the embeddings stay unquantized. `camelid generate`, `chat` and the engine load the output
        folder like any other (config.json records a quantization_config).

        examples:
          camelid quantize --model out/tiny --method int8 --out out/tiny-int8
          camelid quantize --model out/tiny --method int4 --group-size 64 --out out/tiny-int4 --eval-text val.txt
          camelid quantize --model out/tiny --method int4 --calibration train.txt --out out/tiny-gptq
          camelid quantize --model out/tiny --method nf4 --out out/tiny-nf4
        """))
    p.add_argument("--model", required=True, help="a Hugging Face-style model folder")
    p.add_argument("--method", required=True, choices=list(FORMATS))
    p.add_argument("--group-size", type=int, default=None, help="int4 only: inputs per scale (default 128)")
    p.add_argument("--out", required=True, help="the folder to write")
    p.add_argument("--overwrite", action="store_true", help="write into --out even when it already holds files")
    p.add_argument("--eval-text", default=None,
                   help="a held-out text file: report perplexity before and after quantizing")
    p.add_argument("--eval-tokens", type=int, default=16384, help="use at most this many eval tokens")
    p.add_argument("--calibration", default=None,
                   help="int4 only: a text file of calibration data; the codes are then chosen by GPTQ")
    p.add_argument("--device", default=None, help="cpu (default) or cuda")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_quantize)
