"""Verbs that train: data prepare, pretrain, finetune, plot."""

from __future__ import annotations

import argparse
import textwrap

from camelid.cli.model_verbs import human_count
from camelid.config import PRESETS
from camelid.data.pretrain import prepare
from camelid.train import TrainConfig, train
from camelid.train.finetune import METHODS, finetune, load_config, split_config
from camelid.train.config import OPTIMIZERS, PRECISIONS, STRATEGIES, parse_overrides
from camelid.train.plot import plot_run


def cmd_data_prepare(args: argparse.Namespace) -> None:
    meta = prepare(args.input, args.tokenizer, args.out, val_fraction=args.val_fraction, workers=args.workers,
                   shard_tokens=args.shard_tokens, seed=args.seed)
    splits = meta["splits"]
    for name, s in splits.items():
        print(f"{name}: {s['documents']} documents, {s['tokens']:,} tokens in {len(s['shards'])} shard(s)")
    tokens, seconds = sum(s["tokens"] for s in splits.values()), max(meta["seconds"], 1e-6)
    print(f"wrote {args.out}: {meta['dtype']} ids (vocab {meta['vocab_size']}), prepared in {seconds:.1f} s "
          f"({human_count(int(tokens / seconds))} tokens/s)")


# flags of `camelid pretrain` that set the TrainConfig field of the same name (None: keep the YAML / default value)
PRETRAIN_FLAGS = ("model", "data", "out", "tokenizer", "max_steps", "micro_batch", "grad_accum", "seq_len", "lr",
                  "warmup_steps", "optimizer", "precision", "device", "seed", "eval_every", "save_every", "resume",
                  "compile", "activation_checkpointing", "strategy", "measure_gns", "profile_steps", "auto_fit",
                  "device_memory")


def cmd_pretrain(args: argparse.Namespace) -> None:
    flags = {name: getattr(args, name) for name in PRETRAIN_FLAGS if getattr(args, name) is not None}
    cfg = TrainConfig.from_yaml(args.config, **{**parse_overrides(args.set), **flags})
    result = train(cfg)
    if result.final_dir is not None:  # rank 0 only under torchrun
        best = f", best val loss {result.best_val_loss:.4f}" if result.best_val_loss is not None else ""
        print(f"trained {result.step} steps on {result.tokens_seen:,} tokens{best}; wrote {result.final_dir} "
              f"(metrics: {result.out / 'metrics.jsonl'})")


# flags of `camelid finetune` that set a FinetuneSpec field, and those that set a TrainConfig field
FINETUNE_SPEC_FLAGS = ("base", "data", "method", "template", "lora_r", "lora_alpha", "lora_dropout", "target_modules",
                       "num_virtual_tokens", "prefix_projection", "prompt_init_text", "encoder_type", "bottleneck_size",
                       "adapter_placement", "pack")
FINETUNE_TRAIN_FLAGS = ("out", "max_steps", "micro_batch", "grad_accum", "seq_len", "lr", "optimizer", "warmup_steps", "precision",
                        "device", "seed", "save_every", "eval_every", "resume", "auto_fit", "device_memory",
                        "strategy", "compile", "activation_checkpointing")


def cmd_finetune(args: argparse.Namespace) -> None:
    spec_flags = {n: getattr(args, n) for n in FINETUNE_SPEC_FLAGS if getattr(args, n) not in (None, [])}
    train_flags = {n: getattr(args, n) for n in FINETUNE_TRAIN_FLAGS if getattr(args, n) is not None}
    set_spec, set_train = split_config(parse_overrides(args.set))  # --set takes any key --config takes
    spec, cfg = load_config(args.config, {**set_spec, **spec_flags}, {**set_train, **train_flags})
    result = finetune(cfg, spec)
    if result.final_dir is not None:
        full = spec.method == "full"  # final/ is the tuned model itself, not an adapter over the base
        chat = f"--model {result.final_dir}" if full else f"--model {spec.base} --adapter {result.final_dir}"
        last = result.losses.get(result.step)
        print(f"fine-tuned {result.step} steps ({spec.method})" + (f", last loss {last:.4f}" if last else "")
              + f"; wrote {result.final_dir} ({'a model' if full else 'an adapter'} folder; chat: camelid chat {chat})")




def cmd_plot(args: argparse.Namespace) -> None:
    try:
        paths = plot_run(args.run_dir)
    except ImportError as e:  # matplotlib is optional: one line, not a traceback
        raise ValueError(str(e)) from None
    for path in paths:
        print(path)



def register(verbs, fmt) -> None:
    """Add this module's verbs to the `camelid` parser."""
    p = verbs.add_parser("data", help="training data tools")
    dverbs = p.add_subparsers(dest="data_verb", required=True, metavar="VERB")
    p = dverbs.add_parser("prepare", help="tokenize text into train/val token shards for pretraining",
                          formatter_class=fmt, epilog=textwrap.dedent("""\
        inputs: .txt/.md files (one document each), .jsonl (a "text" field per line), .parquet (a "text" column),
        or folders of them (walked recursively). Each document ends with EOS. Running again on the same inputs,
        tokenizer and settings does nothing.

        examples:
          camelid data prepare --input corpus/ --tokenizer out/tiny --out data/corpus
          camelid data prepare --input a.jsonl b.parquet --tokenizer tok/ --out data/ab --val-fraction 0.01
        """))
    p.add_argument("--input", nargs="+", required=True, help="files or folders")
    p.add_argument("--tokenizer", required=True, help="a folder with tokenizer.json (a model folder works)")
    p.add_argument("--out", required=True, help="the folder to write shards and meta.json into")
    p.add_argument("--val-fraction", type=float, default=0.005, help="share of documents held out, in [0, 0.5] "
                   "(default 0.005; at least one document when there are two or more)")
    p.add_argument("--workers", type=int, default=None, help="tokenizer processes (default: CPU count, at most 8)")
    p.add_argument("--shard-tokens", type=int, default=100_000_000, help="tokens per shard file (default 1e8)")
    p.add_argument("--seed", type=int, default=0, help="seed of the train/val split")
    p.set_defaults(func=cmd_data_prepare)

    p = verbs.add_parser("pretrain", help="train a model on prepared token shards", formatter_class=fmt,
                         epilog=textwrap.dedent("""\
        Every flag has a default (TrainConfig in camelid/train/config.py); flags override --config YAML values,
        and --set KEY=VALUE sets any other config key. Writes OUT/metrics.jsonl, OUT/checkpoints/step_N/ and
        OUT/final/ (a model folder for `camelid generate`). See docs/TRAINING.md.

        examples:
          camelid pretrain --model tiny --data data/corpus --tokenizer tok/ --out out/run1 --max-steps 2000
          camelid pretrain --config run.yaml --resume
          camelid pretrain --model tiny --data data/corpus --tokenizer tok/ --out out/r2 \\
              --set model_overrides.num_hidden_layers=4 --set eval_every=100 --optimizer lion --lr 1e-4
          torchrun --nproc-per-node 4 -m camelid pretrain --config run.yaml
          torchrun --nproc-per-node 8 -m camelid pretrain --config run.yaml --strategy fsdp --precision bf16
          camelid pretrain --model tinyllama-1.1b --data data/corpus --seq-len 2048 --micro-batch 64 \\
              --auto --device-memory 24GB --profile
        """))
    d = TrainConfig()
    p.add_argument("--config", default=None, metavar="FILE.yaml", help="a YAML file of TrainConfig keys")
    p.add_argument("--model", default=None,
                   help=f"a preset ({', '.join(PRESETS)}) or a model folder (default {d.model})")
    p.add_argument("--data", default=None, help="a folder written by `camelid data prepare`")
    p.add_argument("--out", default=None, help=f"the run folder (default {d.out})")
    p.add_argument("--tokenizer", default=None, help="the tokenizer the data was prepared with "
                   "(default: the model folder's, else the data folder's)")
    p.add_argument("--max-steps", type=int, default=None, help=f"optimizer steps (default {d.max_steps})")
    p.add_argument("--micro-batch", type=int, default=None, help=f"sequences per forward (default {d.micro_batch})")
    p.add_argument("--grad-accum", type=int, default=None, help=f"micro-batches per step (default {d.grad_accum})")
    p.add_argument("--seq-len", type=int, default=None, help=f"tokens per sequence (default {d.seq_len})")
    p.add_argument("--lr", type=float, default=None, help=f"peak learning rate (default {d.lr:g})")
    p.add_argument("--warmup-steps", type=int, default=None, help=f"(default {d.warmup_steps})")
    p.add_argument("--optimizer", default=None, choices=list(OPTIMIZERS),
                   help=f"(default {d.optimizer}; adamw8bit / paged_adamw8bit: 8-bit states, CUDA only)")
    p.add_argument("--precision", default=None, choices=list(PRECISIONS),
                   help=f"bf16 / fp16: autocast over fp32 master weights; bf16-true: the weights, gradients and "
                        f"optimizer state in bf16 (default {d.precision}: bf16 on a GPU that has it, else fp32)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when present)")
    p.add_argument("--strategy", default=None, choices=list(STRATEGIES),
                   help="under torchrun: ddp (a full copy per process), fsdp (FSDP2, ZeRO-3: weights, gradients "
                        "and optimizer state sharded), zero2 (fsdp that keeps gathered weights from forward to "
                        f"backward), none (default {d.strategy})")
    p.add_argument("--seed", type=int, default=None, help=f"(default {d.seed})")
    p.add_argument("--eval-every", type=int, default=None, help=f"steps between evals, 0 = at the end only "
                   f"(default {d.eval_every})")
    p.add_argument("--save-every", type=int, default=None, help=f"steps between checkpoints (default {d.save_every})")
    p.add_argument("--resume", action=argparse.BooleanOptionalAction, default=None,
                   help="continue from the latest checkpoint in --out")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None, help="torch.compile the model")
    p.add_argument("--activation-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                   help="recompute activations in backward: less memory, ~30%% more compute")
    p.add_argument("--measure-gns", action=argparse.BooleanOptionalAction, default=None,
                   help="log the gradient noise scale and a critical batch size to metrics.jsonl "
                        "(McCandlish et al. 2018; needs --grad-accum >= 2)")
    p.add_argument("--profile", dest="profile_steps", type=int, nargs="?", const=5, default=None, metavar="N",
                   help="write a torch.profiler trace of N steps (default 5, from step 3) to OUT/profile/trace.json")
    p.add_argument("--auto", dest="auto_fit", action=argparse.BooleanOptionalAction, default=None,
                   help="choose micro-batch, grad-accum and activation checkpointing to fit --device-memory "
                        "(camelid.plan.fit), keeping micro-batch x grad-accum sequences per step")
    p.add_argument("--device-memory", default=None, help="with --auto: memory per device, e.g. 24GB, 80GiB "
                   "(default: the GPU's own)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any other config key, e.g. --set weight_decay=0.05 (repeatable)")
    p.set_defaults(func=cmd_pretrain)

    p = verbs.add_parser("finetune", help="instruction-tune a model folder (LoRA, QLoRA, DoRA, prefix, prompt, adapters, "
                                          "BitFit, IA3 or full)", formatter_class=fmt,
                         epilog=textwrap.dedent("""\
        Runs the training loop of `camelid pretrain` on chat-template-rendered instruction data (Alpaca, ShareGPT
        or OpenAI messages JSON / JSONL), with loss on the answers only. OUT/final is an adapter folder (PEFT format
        for lora, qlora, dora, prefix, ptuning-v2, prompt, ptuning, ia3; camelid's own for adapter and bitfit) or
        a model folder (full). --config YAML may hold these flags' keys and any TrainConfig key.

        examples:
          camelid finetune --base models/tiny --data alpaca.json --template alpaca --out runs/lora --max-steps 200
          camelid finetune --base models/llama --data a.json:0.7 --data b.jsonl:0.3 --method dora \\
              --target-modules all-linear --lora-r 16 --lora-alpha 32 --out runs/dora
          camelid finetune --base models/llama --data alpaca.json --method qlora --target-modules all-linear \\
              --precision bf16 --out runs/qlora
          camelid finetune --base models/tiny --data alpaca.json --method prefix --num-virtual-tokens 16 --out runs/p
          camelid finetune --config ft.yaml --resume
          camelid chat --model models/tiny --adapter runs/lora/final
        """))
    p.add_argument("--config", default=None, metavar="FILE.yaml", help="a YAML file of fine-tuning and TrainConfig keys")
    p.add_argument("--base", default=None, help="the base model folder")
    p.add_argument("--data", action="append", default=[], metavar="FILE[:ratio]",
                   help="instruction data, repeatable; ratios mix several files")
    p.add_argument("--method", default=None, help=f"{' | '.join(METHODS)} (default lora)")
    p.add_argument("--template", default=None, help="chat template name (default: the tokenizer's chat_template)")
    p.add_argument("--out", default=None, help="the run folder")
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--optimizer", default=None, choices=list(OPTIMIZERS),
                   help="adamw (default), lion, or for QLoRA on a GPU adamw8bit (torchao) / paged_adamw8bit (bitsandbytes)")
    p.add_argument("--warmup-steps", type=int, default=None, help="(default 0)")
    p.add_argument("--micro-batch", type=int, default=None)
    p.add_argument("--grad-accum", type=int, default=None)
    p.add_argument("--seq-len", type=int, default=None)
    p.add_argument("--lora-r", type=int, default=None, help="(default 8)")
    p.add_argument("--lora-alpha", type=float, default=None, help="(default 16)")
    p.add_argument("--lora-dropout", type=float, default=None, help="(default 0.05)")
    p.add_argument("--target-modules", default=None,
                   help="comma-separated names, or all-linear (default: lora/dora q_proj,v_proj; "
                        "qlora/bitfit all-linear; ia3 k_proj,v_proj,down_proj)")
    p.add_argument("--num-virtual-tokens", type=int, default=None,
                   help="prefix / ptuning-v2 / prompt / ptuning: virtual tokens (default 20)")
    p.add_argument("--prefix-projection", action=argparse.BooleanOptionalAction, default=None,
                   help="prefix / ptuning-v2: the reparameterisation MLP (default: on for prefix, off for ptuning-v2)")
    p.add_argument("--prompt-init-text", default=None, help="prompt: start the soft tokens from this text")
    p.add_argument("--encoder-type", default=None, choices=["mlp", "lstm"], help="ptuning: the prompt encoder (default mlp)")
    p.add_argument("--bottleneck-size", type=int, default=None, help="adapter: the bottleneck width (default 64)")
    p.add_argument("--adapter-placement", default=None, choices=["houlsby", "pfeiffer"],
                   help="adapter: houlsby = after attention and FFN, pfeiffer = after FFN (default houlsby)")
    p.add_argument("--pack", action=argparse.BooleanOptionalAction, default=None,
                   help="pack short examples into each row (no attention across them)")
    p.add_argument("--precision", default=None, choices=list(PRECISIONS),
                   help="bf16 / fp16: mixed precision over fp32 weights; bf16-true: bf16 weights (default auto)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when present)")
    p.add_argument("--strategy", default=None, choices=list(STRATEGIES),
                   help=f"under torchrun: ddp, fsdp or zero2, as for `camelid pretrain` (default {d.strategy})")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None, help="torch.compile the model")
    p.add_argument("--activation-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                   help="recompute block activations in backward")
    p.add_argument("--auto", dest="auto_fit", action=argparse.BooleanOptionalAction, default=None,
                   help="pick micro-batch, accumulation and checkpointing that fit the device for this method "
                        "(camelid plan fit), keeping micro-batch x grad-accum sequences per step")
    p.add_argument("--device-memory", default=None, help="with --auto: memory per device, e.g. 24GB (default: the GPU's)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--eval-every", type=int, default=None)
    p.add_argument("--save-every", type=int, default=None)
    p.add_argument("--resume", action=argparse.BooleanOptionalAction, default=None,
                   help="continue from the latest checkpoint in --out")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any other key of --config (a fine-tuning or TrainConfig key), e.g. --set lora_dropout=0.1")
    p.set_defaults(func=cmd_finetune)

    p = verbs.add_parser("plot", help="PNG charts of a training run's metrics", formatter_class=fmt,
                         epilog="example:\n  camelid plot out/run1  # out/run1/plots/{loss,lr,throughput}.png\n")
    p.add_argument("run_dir", metavar="RUN_DIR", help="the --out folder of `camelid pretrain`")
    p.set_defaults(func=cmd_plot)

