"""camelid vs transformers (and transformers + Liger kernels), side by side: full pretraining steps from one run.

One step = forward + loss + backward + gradient clipping + AdamW step + zero_grad, on one micro-batch of B x seq
tokens, with fp32 master weights and, for bf16, autocast: the way camelid's trainer and the Hugging Face Trainer
both run mixed precision. --dtype bf16-true instead holds every model's weights (hence gradients and AdamW state)
in bf16 with no autocast: camelid's `precision: bf16-true`, and a transformers model loaded in bf16 and trained
as it is.

  camelid         camelid's training path: camelid.train.loss.loss_fn (fused linear cross-entropy, summed, divided
                  by the target count) and the AdamW of camelid.train.optim.build_optimizer (fused on CUDA,
                  foreach on CPU; decay on matrices only). --compile wraps the model in torch.compile, as the
                  trainer's `compile: true` does.
  transformers    LlamaForCausalLM loaded from the same weights (attn_implementation="sdpa"), its own loss
                  (labels=input_ids, shifted inside, fp32 logits), torch AdamW fused on CUDA / foreach on CPU.
  + Liger         the same transformers model after liger_kernel's apply_liger_kernel_to_llama (RoPE, RMSNorm,
                  SwiGLU and the fused linear cross-entropy Triton kernels). Needs CUDA and `pip install
                  liger-kernel`; the column is skipped with a note otherwise.

transformers predicts seq - 1 targets per row (it shifts the labels itself) against camelid's seq; all columns count
B x seq tokens per step. The logits of the models are compared before anything is timed.

Reported per column: tokens/s (median of --repeats steps after --warmup steps, the columns taking turns step by
step), MFU = FLOPs per token (camelid.train.metrics.flops_per_token) x tokens/s / the device's bf16 peak (GPUs
listed in camelid.train.metrics.PEAK_FLOPS only), and on CUDA the peak memory that model would need alone: its
weights + AdamW state + the largest rise of torch.cuda.max_memory_allocated during one of its steps (the other
models sit on the same GPU, so the raw process peak would count them too). On CPU no memory figure is given: the
columns share one process and glibc keeps freed pages.

  .venv/bin/python benchmarks/pretrain.py                         # CPU: a tiny LLaMA (4 layers, 256 wide), fp32
  .venv/bin/python benchmarks/pretrain.py --dtype bf16            # CPU with bf16 autocast
  python benchmarks/pretrain.py                                   # CUDA: TinyLlama-1.1B shape, bf16, seq 2048, B 4
  python benchmarks/pretrain.py --compile
  python benchmarks/pretrain.py --dtype bf16-true
"""

from __future__ import annotations

import contextlib
import os
import statistics
from pathlib import Path

import torch
import transformers
from common import check_same_logits, compare, device_name, device_slug, record_header
from common import add_budget_argument, liger_patch, model_shape, parser, same_weights, start, write_result

from camelid.train.compile import DEFAULT_ACTIVATION_MEMORY_BUDGET, compile_for_training
from camelid.train.config import TrainConfig
from camelid.train.loss import count_targets, loss_fn
from camelid.train.metrics import flops_per_token, peak_flops
from camelid.train.optim import build_optimizer

LR, BETAS, EPS, WEIGHT_DECAY, CLIP = 3e-4, (0.9, 0.95), 1e-8, 0.1, 1.0


class Step:
    """One full optimizer step of one model; `bytes_static` (weights + optimizer state) and `transient` (largest rise
    of allocated CUDA memory during a step) give its peak memory."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, loss, device: torch.device,
                 autocast: bool):
        self.model, self.optimizer, self.loss, self.device = model, optimizer, loss, device
        self.autocast, self.transient = autocast, 0

    def __call__(self) -> None:
        # the first step allocates AdamW's state inside the step: peak_bytes counts that state already, so only
        # steps that start with it in place measure the transient
        cuda = self.device.type == "cuda" and bool(self.optimizer.state)
        if cuda:
            before = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        ctx = torch.autocast(self.device.type, dtype=torch.bfloat16) if self.autocast else contextlib.nullcontext()
        with ctx:
            loss = self.loss()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), CLIP, foreach=True)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if cuda:
            self.transient = max(self.transient, torch.cuda.max_memory_allocated(self.device) - before)

    def peak_bytes(self) -> int:
        tensors = {id(p): p for p in self.model.parameters()}
        for state in self.optimizer.state.values():
            tensors.update({id(t): t for t in state.values() if torch.is_tensor(t) and t.device.type == "cuda"})
        return sum(t.numel() * t.element_size() for t in tensors.values()) + self.transient


def hf_optimizer(model: torch.nn.Module, device: torch.device) -> torch.optim.Optimizer:
    fast = dict(fused=True) if device.type == "cuda" else dict(foreach=True)
    return torch.optim.AdamW(model.parameters(), lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY, **fast)


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--dtype", choices=["bf16", "fp32", "bf16-true"],
                   help="bf16 = fp32 weights + bf16 autocast (default on CUDA); fp32 (default on CPU); bf16-true = "
                        "bf16 weights, gradients and optimizer state, no autocast")
    p.add_argument("--seq", type=int, help="tokens per row (default: 2048 on CUDA, 256 on CPU)")
    p.add_argument("--batch", type=int, help="micro-batch rows (default: 4)")
    p.add_argument("--repeats", type=int, default=10, help="timed steps of each model; the median is reported")
    p.add_argument("--warmup", type=int, help="untimed steps first (default: 3, or 6 with --compile)")
    p.add_argument("--compile", action="store_true", help="torch.compile every model")
    p.add_argument("--no-liger", action="store_true", help="leave out the Liger column even when it is available")
    p.add_argument("--compile-camelid", action="store_true",
                   help="torch.compile camelid's model only (the trainer's `compile: true`); the other columns run "
                        "their usual recipe, eager (transformers, Liger's Triton kernels)")
    add_budget_argument(p)
    p.add_argument("--out", type=Path, help="JSON file (default: benchmarks/results/pretrain-<device>-<shape>-<date>)")
    args = p.parse_args()
    transformers.logging.disable_progress_bar()

    device, malloc_tweak, load_start = start(args.device)
    cuda = device.type == "cuda"
    compiled = "all" if args.compile else "camelid" if args.compile_camelid else None
    warmup = args.warmup if args.warmup is not None else 6 if compiled else 3
    precision = args.dtype or ("bf16" if cuda else "fp32")
    bf16 = precision == "bf16"  # autocast over fp32 weights
    seq, batch = args.seq or (2048 if cuda else 256), args.batch or 4
    config, preset = model_shape(args, seq, cuda)
    shape = f"{preset or 'tiny'}-L{config.num_hidden_layers}-{precision}-s{seq}-b{batch}"

    liger_apply, liger_note = (None, "--no-liger") if args.no_liger else liger_patch(cuda)

    # ---- one set of weights in every model (fp32 master weights) ---------------------------------------------------
    ours, theirs = same_weights(config, device, torch.float32, copies=2 if liger_apply else 1)
    ids = torch.randint(0, config.vocab_size, (batch, seq + 1), device=device)
    diff = check_same_logits(ours, theirs[0], ids[:, :64], low_precision=False)
    print(f"{shape} on {device_name(device)}: max |logits diff| = {diff:.3g} (fp32)")
    if precision == "bf16-true":  # every model trains in bf16 itself: weights, then gradients and AdamW state
        for model in (ours, *theirs):
            model.to(torch.bfloat16)
    if liger_apply:
        liger_apply(model=theirs[1])  # patches that instance (and llama's module-level RoPE: see the phases below)
    for model in (ours, *theirs):
        model.train()

    x, y = ids[:, :-1], ids[:, 1:]  # (B, seq) inputs and their next tokens
    batch_dict = {"input_ids": x, "labels": y}
    n_targets = count_targets(batch_dict)
    cfg = TrainConfig(lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY, grad_clip=CLIP)
    model_ours = compile_for_training(ours, args.activation_memory_budget) if compiled else ours
    steps = {"camelid": Step(ours, build_optimizer(ours, cfg, device),
                             lambda: loss_fn(model_ours, batch_dict) / n_targets, device, bf16)}
    names = ["transformers", "transformers+liger"][:len(theirs)]
    for name, model in zip(names, theirs):
        run = torch.compile(model) if args.compile else model
        steps[name] = Step(model, hf_optimizer(model, device), lambda run=run: run(input_ids=x, labels=x).loss,
                           device, bf16)

    # ---- timing: Liger swaps llama's module-level apply_rotary_pos_emb, which the plain transformers model would
    # then call too, so the plain model runs in phase 1 and the Liger one in phase 2, each against camelid -----------
    times = compare({k: steps[k] for k in ("camelid", "transformers")}, device, warmup, args.repeats)
    peak_bytes = {k: steps[k].peak_bytes() for k in ("camelid", "transformers")}
    if "transformers+liger" in steps:
        del steps["transformers"], theirs[0]  # its weights, gradients and AdamW state: room for phase 2
        if cuda:
            torch.cuda.empty_cache()
        phase2 = compare({k: steps[k] for k in ("camelid", "transformers+liger")}, device, warmup, args.repeats)
        times["transformers+liger"] = phase2["transformers+liger"]
        times["camelid (phase 2)"] = phase2["camelid"]
        peak_bytes["transformers+liger"] = steps["transformers+liger"].peak_bytes()

    # ---- report ----------------------------------------------------------------------------------------------------
    tokens = batch * seq
    flops, peak = flops_per_token(config, seq), peak_flops(device)
    results = {}
    for name, t in times.items():
        secs = statistics.median(t)
        row = {"step_s": secs, "tok_s": tokens / secs, "best_tok_s": tokens / min(t), "all_step_s": t}
        if peak:
            row["mfu"] = flops * tokens / secs / peak
        if cuda and name in peak_bytes:
            row["peak_mem_gib"] = peak_bytes[name] / 2**30
        results[name] = row
    ours_row, theirs_row = results["camelid"], results["transformers"]
    ratios = {"camelid/transformers": ours_row["tok_s"] / theirs_row["tok_s"],
              "camelid/transformers (best runs)": ours_row["best_tok_s"] / theirs_row["best_tok_s"]}
    if "transformers+liger" in results:
        ratios["camelid/transformers+liger"] = (results["camelid (phase 2)"]["tok_s"]
                                                / results["transformers+liger"]["tok_s"])

    print(f"{batch} x {seq} tokens a step, {'bf16 autocast' if bf16 else precision}, "
          f"{flops / 1e9:.3f} GFLOP per token{'' if peak else ' (no MFU: peak FLOP/s unknown for this device)'}")
    print(f"{'':22}{'tok/s':>10}{'best tok/s':>12}{'MFU':>8}{'peak mem':>11}")
    for name, row in results.items():
        mfu = f"{100 * row['mfu']:.1f}%" if "mfu" in row else "-"
        mem = f"{row['peak_mem_gib']:.1f} GiB" if "peak_mem_gib" in row else "-"
        print(f"{name:22}{row['tok_s']:10.0f}{row['best_tok_s']:12.0f}{mfu:>8}{mem:>11}")
    for name, ratio in ratios.items():
        print(f"{name}: {ratio:.2f}")
    if liger_note:
        print(f"no Liger column: {liger_note}")
    if not cuda:
        print("no memory column on CPU: every model shares this process, and glibc keeps freed memory")

    record = {
        **record_header("pretrain", device), "precision": "bf16-autocast" if bf16 else precision,
        "preset": preset or "tiny", "config": config.to_hf(), "batch": batch, "seq": seq, "tokens_per_step": tokens,
        "flops_per_token": flops, "peak_flops": peak, "repeats": args.repeats, "warmup": warmup,
        "compile": compiled, "activation_memory_budget": args.activation_memory_budget if compiled else None,
        "liger": liger_note or "applied", "glibc_keep_freed_memory": malloc_tweak,
        "load_average_1min": {"start": load_start, "end": os.getloadavg()[0]},  # other work on the box skews CPU runs
        "max_abs_logits_diff": diff, "results": results, "ratios": ratios,
    }
    budget = args.activation_memory_budget
    suffix = f"-compile-{compiled}" + (f"-budget{budget:g}" if budget != DEFAULT_ACTIVATION_MEMORY_BUDGET else "")
    out = write_result(record, f"pretrain-{device_slug(device)}-{shape}{suffix if compiled else ''}", args.out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
