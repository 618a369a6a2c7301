"""camelid vs transformers + peft (and + Liger kernels), side by side: LoRA fine-tuning steps from one run.

LoRA r=16, alpha=32 on every linear layer but lm_head ("all-linear"), no dropout, in both libraries:
  camelid         camelid.peft.apply_lora(model, r=16, alpha=32, target_modules="all-linear"); the loss is
                  camelid.train.loss.loss_fn (fused linear cross-entropy, summed, divided by the target count).
  transformers    LlamaForCausalLM from the same weights (attn_implementation="sdpa") wrapped by
                  peft.get_peft_model(LoraConfig(r=16, lora_alpha=32, target_modules="all-linear")); its own loss
                  (labels=input_ids, shifted inside, fp32 logits).
  + Liger         the same, after liger_kernel's apply_liger_kernel_to_llama (RoPE, RMSNorm, SwiGLU, fused linear
                  cross-entropy); CUDA only, and skipped with a note when liger_kernel is not importable.
The peft adapters are given camelid's initial A and B, so every column starts from the same model and sees the same
batches: the loss curves must agree (up to bf16 rounding), which the JSON records step by step.

One step = forward + loss + backward + AdamW step (lr --lr, no decay; fused on CUDA, foreach on CPU) + zero_grad on
one micro-batch of B x seq tokens. The frozen base is held in bf16 on CUDA (as a LoRA run loads it) with bf16
autocast, the adapters in fp32 (peft's autocast_adapter_dtype, camelid's default); fp32 everything on CPU. The
batches are seeded random rows over a 512-token slice of the vocabulary, so the loss falls from ln(vocab) as the
adapters learn which tokens occur. transformers predicts seq - 1 targets per row against camelid's seq; tokens/s
counts B x seq for every column.

On CUDA the columns run one after another, each model alone on the device (the others wait in CPU memory), so
torch.cuda.max_memory_allocated over its steps is that column's peak: weights, adapters, AdamW state, activations.
On CPU they take turns step by step, so that drift in the machine's load hits all alike, and no memory figure is
given (glibc keeps freed memory). tokens/s: the median step time over --steps timed steps after --warmup untimed
ones (the loss curve covers both).

  .venv/bin/python benchmarks/finetune.py              # CPU: a tiny LLaMA (4 layers, 256 wide), fp32, 2 x 128
  python benchmarks/finetune.py                        # CUDA: TinyLlama-1.1B shape, bf16, seq 2048, micro-batch 4
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import statistics
import time
from pathlib import Path

import torch
import transformers
from common import check_same_logits, device_name, device_slug, record_header, same_weights
from common import add_budget_argument, liger_patch, model_shape, parser, start, write_result

from camelid.peft import apply_lora, count_parameters, lora_layers
from camelid.train.compile import compile_for_training
from camelid.train.loss import count_targets, loss_fn

R, ALPHA, DATA_VOCAB = 16, 32, 512


def batches(n: int, batch: int, seq: int, vocab: int, seed: int) -> list[torch.Tensor]:
    """n batches (B, seq) of token ids, the same for every column."""
    g = torch.Generator().manual_seed(seed)
    offset = torch.randint(0, vocab - DATA_VOCAB, (), generator=g)
    return [torch.randint(0, DATA_VOCAB, (batch, seq), generator=g) + offset for _ in range(n)]


def peft_lora(model: torch.nn.Module, ours: torch.nn.Module) -> torch.nn.Module:
    """model wrapped by peft with LoRA on all linear layers, holding our initial A and B."""
    import peft

    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0,
                                                         target_modules="all-linear", task_type="CAUSAL_LM"))
    theirs = {n.removeprefix("base_model.model.").replace(".default", ""): p
              for n, p in wrapped.named_parameters() if p.requires_grad}
    mine = {n: p for n, p in ours.named_parameters() if p.requires_grad}
    if theirs.keys() != mine.keys():
        raise SystemExit(f"peft and camelid put LoRA on different layers: {sorted(theirs.keys() ^ mine.keys())[:4]}")
    with torch.no_grad():
        for name, p in theirs.items():
            p.copy_(mine[name])
    return wrapped


class Column:
    """One library's model, loss and AdamW; step() trains one batch and records its loss and time."""

    def __init__(self, name: str, model: torch.nn.Module, loss, device: torch.device, bf16: bool, lr: float):
        self.name, self.model, self.loss, self.device, self.bf16, self.lr = name, model, loss, device, bf16, lr
        self.optimizer: torch.optim.Optimizer | None = None  # built at the first step, on the device
        self.losses: list[float] = []
        self.seconds: list[float] = []

    def step(self, ids: torch.Tensor) -> None:
        cuda = self.device.type == "cuda"
        ids = ids.to(self.device)
        if self.optimizer is None:
            params = [p for p in self.model.parameters() if p.requires_grad]
            fast = dict(fused=True) if cuda else dict(foreach=True)
            self.optimizer = torch.optim.AdamW(params, lr=self.lr, weight_decay=0.0, **fast)
        if cuda:
            torch.cuda.synchronize(self.device)
        t0 = time.perf_counter()
        with torch.autocast(self.device.type, dtype=torch.bfloat16) if self.bf16 else contextlib.nullcontext():
            value = self.loss(self.model, ids)
        value.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize(self.device)
        self.seconds.append(time.perf_counter() - t0)
        self.losses.append(value.item())
        print(f"  {self.name} step {len(self.losses)}: loss {self.losses[-1]:.4f}, {self.seconds[-1]:.3f} s",
              flush=True)

    def row(self, warmup: int, tokens: int) -> dict:
        timed = self.seconds[warmup:]
        return {"step_s": statistics.median(timed), "tok_s": tokens / statistics.median(timed),
                "best_tok_s": tokens / min(timed), "losses": self.losses, "all_step_s": self.seconds}


def run_alone(column: Column, data: list[torch.Tensor]) -> float | None:
    """The column's model alone on the device for all its steps; returns its peak allocated GiB on CUDA."""
    device, cuda = column.device, column.device.type == "cuda"
    column.model.to(device)
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    for ids in data:
        column.step(ids)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None
    column.optimizer = None  # its AdamW state lives on the device: free it with the model
    column.model.to("cpu")
    if cuda:
        torch.cuda.empty_cache()
    return peak


def camelid_loss(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    labels = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], dim=1)  # the next token; none after the last
    batch = {"input_ids": ids, "labels": labels}
    return loss_fn(model, batch) / count_targets(batch)


def hf_loss(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, labels=ids).loss


def add_step_arguments(p, cuda_batch: int) -> None:
    """The shape and schedule flags of the fine-tuning benchmarks (this one and qlora.py)."""
    p.add_argument("--seq", type=int, help="tokens per row (default: 2048 on CUDA, 128 on CPU)")
    p.add_argument("--batch", type=int, help=f"micro-batch rows (default: {cuda_batch} on CUDA, 2 on CPU)")
    p.add_argument("--steps", type=int, help="timed steps per column (default: 10 on CUDA, 6 on CPU)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (default: 3)")
    p.add_argument("--lr", type=float, default=5e-3, help="learning rate of every column's optimizer (default: 5e-3)")
    p.add_argument("--seed", type=int, default=0)


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--dtype", choices=["bf16", "fp32"], help="bf16 = bf16 frozen base + bf16 autocast (default on "
                                                             "CUDA); fp32 (default on CPU)")
    add_step_arguments(p, cuda_batch=4)
    p.add_argument("--no-liger", action="store_true", help="leave out the Liger column even when it is available")
    p.add_argument("--compile", action="store_true", help="torch.compile camelid's model (`camelid finetune "
                   "--compile`); the other columns run their usual recipe, eager")
    add_budget_argument(p)
    p.add_argument("--out", type=Path, help="JSON file (default: benchmarks/results/finetune-<device>-<shape>-<date>)")
    args = p.parse_args()
    transformers.logging.disable_progress_bar()

    device, malloc_tweak, load_start = start(args.device)
    cuda = device.type == "cuda"
    bf16 = (args.dtype or ("bf16" if cuda else "fp32")) == "bf16"
    seq, batch = args.seq or (2048 if cuda else 128), args.batch or (4 if cuda else 2)
    steps = args.steps or (10 if cuda else 6)
    config, preset = model_shape(args, seq, cuda)
    shape = f"{preset or 'tiny'}-L{config.num_hidden_layers}-{'bf16' if bf16 else 'fp32'}-s{seq}-b{batch}"

    liger_apply, liger_note = (None, "--no-liger") if args.no_liger else liger_patch(cuda)

    # ---- one set of weights in every model, then LoRA with one initialisation ----------------------------------
    dtype = torch.bfloat16 if bf16 else torch.float32
    ours, theirs = same_weights(config, device, dtype, copies=2 if liger_apply else 1)
    probe = torch.randint(0, config.vocab_size, (2, 64), device=device)
    diff = check_same_logits(ours, theirs[0], probe, low_precision=bf16)
    print(f"{shape} on {device_name(device)}: max |logits diff| of the bases = {diff:.3g}")
    torch.manual_seed(args.seed)
    apply_lora(ours, r=R, alpha=ALPHA, target_modules="all-linear")
    theirs = [peft_lora(model, ours) for model in theirs]
    lora_diff = check_same_logits(ours, theirs[0], probe, low_precision=bf16)
    trainable, total = count_parameters(ours)
    print(f"LoRA r={R} alpha={ALPHA} on {len(lora_layers(ours))} layers: {trainable:,} trainable of {total:,}")
    for model in (ours, *theirs):
        model.to("cpu")  # each column goes to the device alone, for its own peak memory
    if cuda:
        torch.cuda.empty_cache()

    # ---- the runs ---------------------------------------------------------------------------------------------
    data = batches(args.warmup + steps, batch, seq, config.vocab_size, args.seed)
    compiled = compile_for_training(ours, args.activation_memory_budget) if args.compile else None
    ours_loss = (lambda _, ids: camelid_loss(compiled, ids)) if compiled is not None else camelid_loss
    columns = [Column("camelid", ours, ours_loss, device, bf16, args.lr),
               Column("transformers+peft", theirs[0], hf_loss, device, bf16, args.lr)]
    if liger_apply:
        columns.append(Column("transformers+peft+liger", theirs[1], hf_loss, device, bf16, args.lr))
    peaks = {}
    if cuda:  # one column at a time, so that max_memory_allocated is that column's alone
        for column in columns:
            if column.name.endswith("liger"):  # last: Liger swaps llama's module-level RoPE function for everyone
                liger_apply(model=column.model.get_base_model())
            peaks[column.name] = run_alone(column, data)
    else:  # the columns take turns step by step, so that drift in machine load hits all alike
        for column in columns:
            column.model.to(device)
        for ids in data:
            for column in columns:
                column.step(ids)
    results = {c.name: {**c.row(args.warmup, batch * seq), **({"peak_mem_gib": peaks[c.name]} if cuda else {})}
               for c in columns}

    # ---- report ------------------------------------------------------------------------------------------------
    reference = results["transformers+peft"]
    curve_diff = {name: max(abs(a - b) for a, b in zip(row["losses"], reference["losses"]))
                  for name, row in results.items() if name != "transformers+peft"}
    print(f"\n{batch} x {seq} tokens a step, {'bf16 base + bf16 autocast' if bf16 else 'fp32'}, "
          f"{args.warmup} warmup + {steps} timed steps")
    print(f"{'':26}{'tok/s':>10}{'best tok/s':>12}{'peak mem':>11}{'first loss':>12}{'last loss':>11}")
    for name, row in results.items():
        mem = f"{row['peak_mem_gib']:.2f} GiB" if "peak_mem_gib" in row else "-"
        print(f"{name:26}{row['tok_s']:10.0f}{row['best_tok_s']:12.0f}{mem:>11}{row['losses'][0]:12.4f}"
              f"{row['losses'][-1]:11.4f}")
    ratios = {f"camelid/{name}": results["camelid"]["tok_s"] / row["tok_s"]
              for name, row in results.items() if name != "camelid"}
    if cuda:
        ratios.update({f"camelid/{name} peak memory": results["camelid"]["peak_mem_gib"] / row["peak_mem_gib"]
                       for name, row in results.items() if name != "camelid"})
    for name, ratio in ratios.items():
        print(f"{name}: {ratio:.2f}")
    for name, d in curve_diff.items():
        print(f"max |loss difference| {name} vs transformers+peft over {len(data)} steps: {d:.3g}")
    if liger_note:
        print(f"no Liger column: {liger_note}")
    if not cuda:
        print("no memory column on CPU: glibc keeps freed memory, so RSS says little about a step")

    record = {
        **record_header("finetune", device), "precision": "bf16-base+autocast" if bf16 else "fp32",
        "preset": preset or "tiny", "config": config.to_hf(), "batch": batch, "seq": seq,
        "tokens_per_step": batch * seq, "lora": {"r": R, "alpha": ALPHA, "target_modules": "all-linear",
                                                 "trainable": trainable, "total": total},
        "lr": args.lr, "seed": args.seed, "warmup": args.warmup, "steps": steps, "liger": liger_note or "applied",
        "compile_camelid": args.compile,
        "activation_memory_budget": args.activation_memory_budget if args.compile else None, "glibc_keep_freed_memory": malloc_tweak,
        "load_average_1min": {"start": load_start, "end": os.getloadavg()[0]},  # other work on the box skews CPU runs
        "peft_version": importlib.metadata.version("peft"),
        "max_abs_logits_diff_base": diff, "max_abs_logits_diff_lora": lora_diff,
        "max_abs_loss_curve_diff": curve_diff, "results": results, "ratios": ratios,
    }
    out = write_result(record, f"finetune-{device_slug(device)}-{shape}{'-compile' * args.compile}", args.out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
