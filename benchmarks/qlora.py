"""camelid QLoRA vs transformers + peft + bitsandbytes, side by side: QLoRA fine-tuning steps from one run.

Both columns train LoRA r=16, alpha=32 (no dropout) on every linear layer but lm_head over an NF4 base with double
quantization and bf16 compute, with activation checkpointing and bf16 autocast:
  camelid         camelid.from_pretrained(folder, dtype=bf16), then camelid.peft.apply_qlora (torchao's NF4 codes,
                  dequantized per matmul); model.set_activation_checkpointing(True); loss camelid.train.loss.loss_fn;
                  optimizer camelid.train.optim.build_low_memory_optimizer("paged_adamw8bit").
  transformers    AutoModelForCausalLM.from_pretrained(folder, quantization_config=BitsAndBytesConfig(nf4, double
                  quant, bf16 compute)), peft.prepare_model_for_kbit_training (gradient checkpointing on; it casts
                  the norms, embeddings and lm_head to fp32, as every QLoRA recipe built on it does),
                  get_peft_model(LoraConfig(target_modules="all-linear")); its own loss (labels=input_ids);
                  bitsandbytes.optim.PagedAdamW8bit.
Both 8-bit optimizers get the same lr, betas and eps (and bitsandbytes' default weight decay, 0.01). On CPU, where
paged optimizers cannot run, both use plain AdamW (foreach, no weight decay). The peft adapters are given camelid's
initial A and B and both columns see the same seeded batches (finetune.py's), so the loss curves must stay close;
they are not identical, because the two NF4 implementations round the scales differently (double quantization) and
peft keeps the norms in fp32. The JSON records both curves step by step.

The weights: the camelid model is built once on the CPU in bf16 from a fixed seed and saved to a temporary folder,
which both columns load; camelid quantizes on the device after loading (the bf16 model is on the device once, for
the quantization), transformers + bitsandbytes quantizes while loading. On CUDA the columns run one after another,
each alone on the device (the other is freed: del + gc + empty_cache): static memory is torch.cuda.memory_allocated
after loading and wrapping, before the first step; peak memory is torch.cuda.max_memory_allocated over the steps. The
paged optimizers keep their state in CUDA unified memory, which torch's allocator does not count, in both columns
alike. On CPU the columns take turns step by step (drift in the machine's load hits both) and no memory is given.
tokens/s: B x seq over the median step time of --steps timed steps after --warmup untimed ones.

  .venv/bin/python benchmarks/qlora.py --out /tmp/qlora.json   # CPU: tiny LLaMA (4 layers, 256 wide), 2 x 128
  python benchmarks/qlora.py                                   # CUDA: Llama-2-7B shape, seq 2048, micro-batch 1
"""

from __future__ import annotations

import gc
import importlib.metadata
import os
import tempfile
from pathlib import Path

import torch
import transformers
from common import device_name, device_slug, model_shape, parser, record_header, start, write_result
from finetune import Column, add_step_arguments, batches, camelid_loss, hf_loss

from camelid.checkpoint import from_pretrained, save_pretrained
from camelid.config import ModelConfig
from camelid.model import Transformer
from camelid.peft.lora import apply_qlora, count_parameters, lora_layers
from camelid.train.optim import build_low_memory_optimizer

R, ALPHA = 16, 32
BETAS, EPS = (0.9, 0.999), 1e-8
PROBE_TOLERANCE = 0.1  # max |logits diff| / max(1, logit scale) of the two freshly wrapped models: NF4 rounding only


def save_random_weights(config: ModelConfig, path: str) -> None:
    """A bf16 camelid model from seed 0, written to `path`; built in bf16 on the CPU so a 7B shape takes 13.5 GB of
    host memory once, never the device's."""
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        model = Transformer(config)
    finally:
        torch.set_default_dtype(previous)
    save_pretrained(model, path)


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def probe_logits(model: torch.nn.Module, ids: torch.Tensor, hf: bool) -> torch.Tensor:
    """(B, T, V) fp32 logits on the CPU, eval mode, bf16 autocast as in training."""
    model.eval()
    with torch.inference_mode(), torch.autocast(ids.device.type, dtype=torch.bfloat16):
        logits = model(input_ids=ids).logits if hf else model(ids)
    model.train()
    return logits.float().cpu()


def optimizer_for(model: torch.nn.Module, device: torch.device, lr: float, hf: bool) -> torch.optim.Optimizer:
    """Paged 8-bit AdamW on CUDA (camelid's builder, bitsandbytes' class for transformers), AdamW elsewhere."""
    params = [p for p in model.parameters() if p.requires_grad]
    if device.type != "cuda":
        return torch.optim.AdamW(params, lr=lr, betas=BETAS, eps=EPS, weight_decay=0.0, foreach=True)
    if hf:
        import bitsandbytes

        return bitsandbytes.optim.PagedAdamW8bit(params, lr=lr, betas=BETAS, eps=EPS)
    try:
        return build_low_memory_optimizer("paged_adamw8bit", params, lr, BETAS, EPS, device)
    except ValueError as e:
        raise SystemExit(f"camelid column: {e}") from None


def camelid_qlora(folder: str, device: torch.device, seed: int) -> torch.nn.Module:
    """The bf16 folder loaded on the device, then quantized there layer by layer and wrapped (A from `seed`)."""
    model = from_pretrained(folder, device=device, dtype=torch.bfloat16)
    torch.manual_seed(seed)
    apply_qlora(model, r=R, alpha=ALPHA, target_modules="all-linear", compute_dtype=torch.bfloat16)
    model.set_activation_checkpointing(True)
    return model.train()


def hf_qlora(folder: str, device: torch.device, init: dict[str, torch.Tensor]) -> torch.nn.Module:
    """transformers + bitsandbytes NF4 + peft LoRA, the adapters set to `init` (camelid's names and values)."""
    import peft
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16)
    place = (device.index or 0) if device.type == "cuda" else "cpu"  # all of it there, quantized as it loads
    model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=quant, dtype=torch.bfloat16,
                                                 attn_implementation="sdpa", device_map={"": place})
    model.config.use_cache = False  # training: no KV cache built
    # gradient checkpointing on, via gradient_checkpointing_enable: the name transformers 5.17 and 5.2x both have
    model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0,
                                                         target_modules="all-linear", task_type="CAUSAL_LM"))
    theirs = {n.removeprefix("base_model.model.").replace(".default", ""): p
              for n, p in wrapped.named_parameters() if p.requires_grad}
    if theirs.keys() != init.keys():
        raise SystemExit(f"peft and camelid put LoRA on different layers: {sorted(theirs.keys() ^ init.keys())[:4]}")
    with torch.no_grad():
        for name, p in theirs.items():
            p.copy_(init[name])
    return wrapped.train()


def run_alone(column: Column, data: list[torch.Tensor]) -> dict[str, float]:
    """All steps of one column whose model is alone on the CUDA device, then the model freed; its memory figures."""
    device = column.device
    free(device)
    static = torch.cuda.memory_allocated(device) / 2**30  # weights + adapters, before any activation or state
    torch.cuda.reset_peak_memory_stats(device)  # camelid's quantization held the bf16 model: not a training figure
    for ids in data:
        column.step(ids)
    peak = torch.cuda.max_memory_allocated(device) / 2**30
    column.model = column.optimizer = None
    free(device)
    return {"static_mem_gib": static, "peak_mem_gib": peak}


def main() -> None:
    p = parser(__doc__, cuda_preset="llama-2-7b")
    add_step_arguments(p, cuda_batch=1)
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument("--out", type=Path, help="JSON file (default: benchmarks/results/qlora-<device>-<shape>-<date>)")
    args = p.parse_args()
    transformers.logging.disable_progress_bar()
    if args.threads:
        torch.set_num_threads(args.threads)

    device, malloc_tweak, load_start = start(args.device)
    cuda = device.type == "cuda"
    seq, batch = args.seq or (2048 if cuda else 128), args.batch or (1 if cuda else 2)
    steps = args.steps or (10 if cuda else 6)
    config, preset = model_shape(args, seq, cuda, cuda_preset="llama-2-7b")
    shape = f"{preset or 'tiny'}-L{config.num_hidden_layers}-nf4-s{seq}-b{batch}"
    optimizer_name = "paged_adamw8bit" if cuda else "adamw"
    data = batches(args.warmup + steps, batch, seq, config.vocab_size, args.seed)
    probe = torch.randint(0, config.vocab_size, (1, 64), generator=torch.Generator().manual_seed(args.seed + 1))
    print(f"{shape} on {device_name(device)}: QLoRA r={R} alpha={ALPHA}, {optimizer_name}", flush=True)

    columns, memory, peft_note, diff = [], {}, None, None
    name = "transformers+peft+bnb"
    with tempfile.TemporaryDirectory(prefix="camelid-qlora-") as folder:
        save_random_weights(config, folder)

        # ---- camelid: its adapters' initial values are the transformers column's too ----------------------------
        ours = camelid_qlora(folder, device, args.seed)
        trainable, total = count_parameters(ours)
        layers = len(lora_layers(ours))
        print(f"LoRA on {layers} layers: {trainable:,} trainable of {total:,}", flush=True)
        init = {n: p.detach().cpu().clone() for n, p in ours.named_parameters() if p.requires_grad}
        our_logits = probe_logits(ours, probe.to(device), hf=False)
        columns.append(Column("camelid", ours, camelid_loss, device, True, args.lr))
        columns[-1].optimizer = optimizer_for(ours, device, args.lr, hf=False)
        del ours
        if cuda:  # alone on the device, so that its memory figures are its own
            memory["camelid"] = run_alone(columns[-1], data)

        # ---- transformers + peft + bitsandbytes --------------------------------------------------------------------
        try:
            theirs = hf_qlora(folder, device, init)
        except ImportError as e:  # no bitsandbytes / peft on this machine: the column is skipped, not the run
            peft_note = f"skipped: {e}"
        except Exception as e:  # bitsandbytes' 4-bit kernels off CUDA are a backend that may not load here
            if cuda:
                raise
            peft_note = f"skipped: {type(e).__name__}: {e}"
        if peft_note is None:
            their_logits = probe_logits(theirs, probe.to(device), hf=True)
            diff, scale = (our_logits - their_logits).abs().max().item(), our_logits.abs().max().item()
            if diff > PROBE_TOLERANCE * max(1.0, scale):
                raise SystemExit(f"the two QLoRA models disagree before training (max |logits diff| {diff:.3g} at "
                                 f"logit scale {scale:.3g}): the timings would not compare equivalent computations")
            columns.append(Column(name, theirs, hf_loss, device, True, args.lr))
            columns[-1].optimizer = optimizer_for(theirs, device, args.lr, hf=True)
            del theirs
            if cuda:
                memory[name] = run_alone(columns[-1], data)
        else:
            print(f"{name}: {peft_note}", flush=True)
    if not cuda:  # the columns take turns step by step, so that drift in machine load hits all alike
        for ids in data:
            for column in columns:
                column.step(ids)
    results = {c.name: {**c.row(args.warmup, batch * seq), **memory.get(c.name, {})} for c in columns}
    if peft_note:
        results[name] = peft_note

    # ---- report ------------------------------------------------------------------------------------------------
    print(f"\n{batch} x {seq} tokens a step, NF4 + bf16 autocast, activation checkpointing, {optimizer_name}, "
          f"{args.warmup} warmup + {steps} timed steps")
    print(f"{'':24}{'tok/s':>10}{'best tok/s':>12}{'static mem':>12}{'peak mem':>11}{'first loss':>12}"
          f"{'last loss':>11}")
    for name, row in results.items():
        if isinstance(row, str):
            print(f"{name:24}{row}")
            continue
        mem = [f"{row[k]:.2f} GiB" if k in row else "-" for k in ("static_mem_gib", "peak_mem_gib")]
        print(f"{name:24}{row['tok_s']:10.0f}{row['best_tok_s']:12.0f}{mem[0]:>12}{mem[1]:>11}"
              f"{row['losses'][0]:12.4f}{row['losses'][-1]:11.4f}")
    ratios, curve_diff = {}, None
    reference = results["transformers+peft+bnb"]
    if isinstance(reference, dict):
        ours_row = results["camelid"]
        ratios["camelid/transformers+peft+bnb tok/s"] = ours_row["tok_s"] / reference["tok_s"]
        if cuda:
            ratios["camelid/transformers+peft+bnb peak memory"] = ours_row["peak_mem_gib"] / reference["peak_mem_gib"]
        curve_diff = max(abs(a - b) for a, b in zip(ours_row["losses"], reference["losses"]))
        for name, ratio in ratios.items():
            print(f"{name}: {ratio:.2f}")
        print(f"max |logits diff| of the freshly wrapped models: {diff:.3g}; max |loss difference| over "
              f"{len(data)} steps: {curve_diff:.3g}")
    if not cuda:
        print("no memory columns on CPU: glibc keeps freed memory, so RSS says little about a step")

    versions = {}
    for package in ("peft", "bitsandbytes", "torchao"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    record = {
        **record_header("qlora", device), "precision": "nf4-double-quant+bf16-autocast", "preset": preset or "tiny",
        "config": config.to_hf(), "batch": batch, "seq": seq, "tokens_per_step": batch * seq,
        "lora": {"r": R, "alpha": ALPHA, "target_modules": "all-linear", "layers": layers, "trainable": trainable,
                 "total": total},
        "activation_checkpointing": True, "optimizer": optimizer_name, "lr": args.lr, "betas": BETAS, "eps": EPS,
        "seed": args.seed, "warmup": args.warmup, "steps": steps, "more_versions": versions,
        "glibc_keep_freed_memory": malloc_tweak,
        "load_average_1min": {"start": load_start, "end": os.getloadavg()[0]},  # other work on the box skews CPU runs
        "max_abs_logits_diff_initial": diff, "max_abs_loss_curve_diff": curve_diff, "results": results,
        "ratios": ratios,
    }
    out = write_result(record, f"qlora-{device_slug(device)}-{shape}", args.out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
