"""camelid.plan.memory's estimate vs the measured peak (torch.cuda.max_memory_allocated), run by run, on a GPU.

Each configuration builds its model on the GPU, resets the peak statistics (so the peak covers the weights, which stay
allocated, but not the transient of building or quantizing them) and then runs what the estimate models:

  full       camelid's training step: fp32 master weights, bf16 autocast, fused cross-entropy, backward,
             fused AdamW (camelid.train.optim.build_optimizer); 2 steps, so the second sees the optimizer states
  lora       the base frozen in bf16, fp32 rank-8 adapters on q_proj and v_proj (camelid.peft.apply_lora), AdamW on
             the adapters only
  qlora      lora over a base whose block projections are NF4 (camelid.quant, torchao's to_nf4); skipped without
             torchao
  prefix     prefix tuning with the estimate's 20 virtual tokens per layer (camelid.peft.prefix)
  inference  a bf16 model, generate_ids over B prompts of S tokens plus N new ones (KV cache of S + N tokens)

each with and without activation checkpointing (training), at two sequence lengths; full and lora also under
torch.compile with camelid's activation memory budget (camelid/train/compile.py) at the longer one. The target (issue 7) is every
estimate within 10% of the measured peak. The table prints both side by side with the relative error
(estimate / measured - 1), and the rows go to benchmarks/results/memory_check-<gpu>-<model>-<date>.json.

Without CUDA there is nothing to measure: the script says so and exits with code 0 (a skipped benchmark, not a
failure; `--help` works everywhere).

  python benchmarks/memory_check.py                                  # tinyllama-1.1b shape, seq 512 and 1024, batch 4
  python benchmarks/memory_check.py --model llama-2-7b --layers 8 --seqs 1024 2048 --batch 2
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from camelid.config import ModelConfig, get_preset
from camelid.generate import generate_ids
from camelid.model import Transformer
from camelid.peft import apply_lora
from camelid.peft.prefix import apply_prefix
from camelid.plan.memory import NUM_VIRTUAL_TOKENS, estimate
from camelid.quant import quantize_model
from camelid.train.compile import compile_for_training
from camelid.train.config import TrainConfig
from camelid.train.loss import loss_fn
from camelid.train.optim import build_optimizer

RESULTS = Path(__file__).parent / "results"
LORA_R, LORA_ALPHA = 8, 16
DEVICE = torch.device("cuda")


# ---- the methods, as camelid.peft applies them -------------------------------------------------------------------

BLOCK_PROJECTIONS = r".*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)$"


def apply_method(model: Transformer, method: str) -> None:
    """What `camelid finetune --method M` adds to a frozen bf16 base: LoRA rank 8 on q_proj and v_proj; for qlora
    every block projection stored in NF4 first (the estimate's assumption); prefix tuning with the estimate's
    number of virtual tokens."""
    if method == "qlora":
        quantize_model(model, "nf4", modules=BLOCK_PROJECTIONS, compute_dtype=torch.bfloat16)
    if method in ("lora", "qlora"):
        apply_lora(model, r=LORA_R, alpha=LORA_ALPHA, target_modules=["q_proj", "v_proj"])
    elif method == "prefix":
        apply_prefix(model, num_virtual_tokens=NUM_VIRTUAL_TOKENS)


# ---- one measured configuration ------------------------------------------------------------------------------------

def fresh_peak() -> None:
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(DEVICE)


def batch_of(config: ModelConfig, batch: int, seq: int) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, config.vocab_size, (batch, seq + 1), device=DEVICE)
    return {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}


def build(config: ModelConfig, dtype: torch.dtype) -> Transformer:
    """The model initialised on the GPU in `dtype` (seconds, not the CPU's minute; never an fp32 copy first)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(DEVICE):
            return Transformer(config)
    finally:
        torch.set_default_dtype(previous)


def train_run(config: ModelConfig, method: str, seq: int, batch: int, checkpointing: bool,
              compiled: bool = False) -> None:
    """Build the model for `method` on the GPU and run two optimizer steps as camelid trains (`compile: true`
    with `compiled`)."""
    if method == "full":
        model = build(config, torch.float32)  # fp32 master weights
    else:
        model = build(config, torch.bfloat16)  # frozen base in the compute dtype
        apply_method(model, method)
    model.set_activation_checkpointing(checkpointing)
    model.train()
    # the peak of training from here: building a QLoRA base (bf16 first, then NF4) peaks higher than its training,
    # and `camelid finetune` loads an already quantized base the same way (the estimate models the step)
    torch.cuda.reset_peak_memory_stats(DEVICE)
    optimizer = build_optimizer(model, TrainConfig(), DEVICE)
    forward = compile_for_training(model) if compiled else model
    for _ in range(2):
        data = batch_of(config, batch, seq)
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
            loss = loss_fn(forward, data) / data["labels"].numel()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


def inference_run(config: ModelConfig, prompt: int, new: int, batch: int) -> None:
    model = build(config, torch.bfloat16).eval()
    prompts = torch.randint(0, config.vocab_size, (batch, prompt)).tolist()
    generate_ids(model, prompts, max_new_tokens=new)
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


def measure(run: Callable[[], None]) -> float:
    fresh_peak()
    run()
    peak = torch.cuda.max_memory_allocated(DEVICE)
    fresh_peak()  # the model and optimizer went out of scope with run()
    return float(peak)


# ---- the table -----------------------------------------------------------------------------------------------------

def configurations(seqs: list[int], batch: int, new_tokens: int) -> list[dict]:
    rows = []
    for method in ("full", "lora", "qlora"):
        for seq in seqs:
            for ckpt in (False, True):
                rows.append(dict(method=method, seq=seq, batch=batch, checkpointing=ckpt))
    for method in ("full", "lora"):
        rows.append(dict(method=method, seq=seqs[-1], batch=batch, checkpointing=False, compiled=True))
    rows.append(dict(method="prefix", seq=seqs[0], batch=batch, checkpointing=False))
    for seq in seqs:
        rows.append(dict(method="inference", seq=seq, batch=batch, checkpointing=False, kv_context=seq + new_tokens))
    return rows


def skip_reason(method: str) -> str | None:
    if method == "qlora":
        try:
            import torchao  # noqa: F401
        except ImportError:
            return "needs torchao for NF4 (pip install torchao)"
    return None


def check(config: ModelConfig, row: dict) -> dict:
    method, seq, batch = row["method"], row["seq"], row["batch"]
    reason = skip_reason(method)
    if reason:
        return {**row, "skipped": reason}
    compiled = row.get("compiled", False)
    est = estimate(config, method, seq=seq, batch=batch, precision="bf16", checkpointing=row["checkpointing"],
                   kv_context=row.get("kv_context"), compiled=compiled)
    if method == "inference":
        measured = measure(lambda: inference_run(config, seq, row["kv_context"] - seq, batch))
    else:
        measured = measure(lambda: train_run(config, method, seq, batch, row["checkpointing"], compiled))
    return {**row, "estimate_bytes": est.total, "measured_bytes": measured, "rel_error": est.total / measured - 1,
            "terms": est.terms}


def label(row: dict) -> str:
    text = f"{row['method']:<9} seq {row['seq']:<5} batch {row['batch']:<3}"
    if row["method"] == "inference":
        return text + f" kv {row['kv_context']}"
    return text + (" ckpt" if row["checkpointing"] else "") + (" compiled" if row.get("compiled") else "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tinyllama-1.1b", help="a camelid preset (default tinyllama-1.1b)")
    parser.add_argument("--layers", type=int, default=None, help="cut the preset to this many layers")
    parser.add_argument("--seqs", type=int, nargs=2, default=[512, 1024], help="two sequence lengths")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=128, help="inference: tokens generated after the prompt")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("memory_check.py measures torch.cuda.max_memory_allocated: it needs a CUDA GPU; nothing to do here")
        return 0

    config = get_preset(args.model)
    if args.layers:
        config = config.replace(num_hidden_layers=args.layers)
    config = config.replace(max_position_embeddings=max(config.max_position_embeddings,
                                                        max(args.seqs) + args.new_tokens))
    gpu = torch.cuda.get_device_name(DEVICE)
    print(f"{args.model} ({config.num_hidden_layers} layers) on {gpu}; bf16; estimate vs measured peak allocated")
    print(f"  {'configuration':<44}{'estimate':>10}{'measured':>10}{'error':>9}")
    results = []
    for row in configurations(args.seqs, args.batch, args.new_tokens):
        try:
            result = check(config, row)
        except torch.cuda.OutOfMemoryError:
            result = {**row, "skipped": "out of memory"}
        except (RuntimeError, NotImplementedError, TypeError) as e:  # e.g. a torchao version without an op
            result = {**row, "skipped": f"failed: {type(e).__name__}: {str(e).splitlines()[0][:100]}"}
        results.append(result)
        if "skipped" in result:
            print(f"  {label(row):<44}{'-':>10}{'-':>10}{'':>9}  skipped: {result['skipped']}")
        else:
            est, got = result["estimate_bytes"] / 2**30, result["measured_bytes"] / 2**30
            print(f"  {label(row):<44}{est:>8.2f}Gi{got:>8.2f}Gi{100 * result['rel_error']:>+8.1f}%", flush=True)
    measured = [r for r in results if "rel_error" in r]
    worst = max((abs(r["rel_error"]) for r in measured), default=math.nan)
    print(f"{len(measured)} configurations measured; worst |error| {100 * worst:.1f}% (target: within 10%)")

    RESULTS.mkdir(parents=True, exist_ok=True)
    name = f"memory_check-{gpu.replace(' ', '_')}-{args.model}-L{config.num_hidden_layers}-{datetime.date.today()}.json"
    path = RESULTS / name
    path.write_text(json.dumps({"model": args.model, "layers": config.num_hidden_layers, "gpu": gpu,
                                "torch": torch.__version__, "rows": results, "worst_abs_error": worst}, indent=2))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
