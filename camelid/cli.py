"""`camelid <verb>`: a thin layer over the library. Every verb parses flags, calls plain functions, prints.

Bad input ends with one line on stderr and exit code 2; nothing here holds logic the library lacks.
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
import time
from pathlib import Path

import torch

from camelid.checkpoint import CheckpointError, from_pretrained, merge_adapter_folder, save_pretrained
from camelid.config import PRESETS, ConfigError, ModelConfig, get_preset, num_parameters
from camelid.data.pretrain import prepare
from camelid.generate import stream
from camelid.model import Transformer
from camelid.monitor import format_sample, monitors
from camelid.plan import fit as plan_fit
from camelid.plan import memory as plan_memory
from camelid.plan import scaling as plan_scaling
from camelid.tokenizer import Tokenizer, TokenizerError
from camelid.peft import load_adapter
from camelid.templates import for_tokenizer, get_template
from camelid.train import TrainConfig, train
from camelid.train.finetune import METHODS, finetune, load_config, recorded_template
from camelid.train.config import STRATEGIES, parse_overrides
from camelid.train.plot import plot_run

BAD_INPUT = (FileNotFoundError, NotADirectoryError, ConfigError, CheckpointError, TokenizerError, ValueError)


def _device(name: str | None) -> str:
    return name or ("cuda" if torch.cuda.is_available() else "cpu")


def _load(model_dir: str, device: str | None, dtype: str | None,
          adapter: str | None = None) -> tuple[Transformer, Tokenizer]:
    model = from_pretrained(model_dir, device=_device(device), dtype=dtype)
    if adapter:
        load_adapter(model, adapter)
        model.eval()
    return model, Tokenizer(model_dir)


def _sampling(args: argparse.Namespace) -> dict:
    return dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                repetition_penalty=args.repetition_penalty, seed=args.seed)


# ---- verbs ------------------------------------------------------------------------------------------------------

def cmd_generate(args: argparse.Namespace) -> None:
    model, tokenizer = _load(args.model, args.device, args.dtype, args.adapter)
    for piece in stream(model, tokenizer, args.prompt, args.max_new_tokens, stop=args.stop, **_sampling(args)):
        print(piece, end="", flush=True)
    print()


def _chat_template(args: argparse.Namespace, tokenizer: Tokenizer):
    """The adapter folder's recorded template, else --template, else the tokenizer's chat_template; None = the
    plain transcript fallback (a base model that was never tuned for chat)."""
    name = recorded_template(args.adapter) if args.adapter else None
    name = name or args.template
    if name == "model" or (name is None and tokenizer.chat_template):
        return for_tokenizer(tokenizer)
    return get_template(name) if name else None


def cmd_chat(args: argparse.Namespace) -> None:
    """Multi-turn chat rendered with the model's chat template (or a plain transcript when there is none); history
    is trimmed from the oldest turns."""
    model, tokenizer = _load(args.model, args.device, args.dtype, args.adapter)
    template = _chat_template(args, tokenizer)
    if template is not None:
        template.check(tokenizer)
        bos, eos = template.special_tokens(tokenizer)
        stop_ids = template.stop_token_ids(tokenizer)
        stop = [x.replace("{eos}", eos) for x in template.stop_strings if x.replace("{eos}", eos)]
    else:
        stop_ids, stop = [], ["\nUser:"]
    turns: list[tuple[str, str]] = []
    budget = model.config.max_position_embeddings - args.max_new_tokens

    def render() -> tuple[str, bool]:  # (prompt text, whether to add BOS when encoding)
        if template is None:
            system = f"{args.system}\n" if args.system else ""
            return system + "".join(f"User: {u}\nAssistant: {a}\n" for u, a in turns) + \
                f"User: {user}\nAssistant:", True
        messages = [{"role": "system", "content": args.system}] if args.system else []
        for u, a in turns:
            messages += [{"role": "user", "content": u}, {"role": "assistant", "content": a}]
        messages.append({"role": "user", "content": user})
        return template.render(messages, True, bos, eos), False  # the template writes BOS itself

    print("camelid chat: type a message; /reset clears the history, /exit or Ctrl-D quits.", file=sys.stderr)
    while True:
        try:
            user = input("you> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return
        if user in ("/exit", "/quit"):
            return
        if user == "/reset":
            turns.clear()
            continue
        if not user:
            continue
        while True:
            prompt, add_bos = render()
            if len(tokenizer.encode(prompt, bos=add_bos)) <= budget or not turns:
                break
            turns.pop(0)
        print("bot> ", end="", flush=True)
        answer = ""
        for piece in stream(model, tokenizer, prompt, args.max_new_tokens, stop=stop, bos=add_bos,
                            stop_ids=stop_ids, **_sampling(args)):
            answer += piece
            print(piece, end="", flush=True)
        print()
        turns.append((user, answer.strip()))


def _human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return ""


def _human_count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.2f} M" if n >= 1e6 else f"{n / 1e3:.1f} K"


def model_info(config: ModelConfig) -> dict:
    params = num_parameters(config)
    embedding = config.vocab_size * config.hidden_size * (1 if config.tie_word_embeddings else 2)
    kv_per_token = 2 * config.num_hidden_layers * config.kv_size  # keys + values, every layer
    return {
        "model_type": config.model_type,
        "parameters": params,
        "non_embedding_parameters": params - embedding,
        "bytes": {"fp32": params * 4, "bf16": params * 2, "int8": params, "int4": params // 2},
        "kv_cache_bytes_per_token_bf16": kv_per_token * 2,
        "config": {k: v for k, v in vars(config).items() if v not in (None, False, 0) or k == "num_local_experts"},
    }


def cmd_info(args: argparse.Namespace) -> None:
    source = Path(args.model)
    config = ModelConfig.from_hf(source) if source.is_dir() else get_preset(args.model)
    info = model_info(config)
    if args.json:
        print(json.dumps(info, indent=2))
        return
    print(f"{args.model}: {config.model_type}, {_human_count(info['parameters'])} parameters "
          f"({_human_count(info['non_embedding_parameters'])} without embeddings)")
    print("weights: " + ", ".join(f"{k} {_human_bytes(v)}" for k, v in info["bytes"].items()))
    print(f"KV cache: {_human_bytes(info['kv_cache_bytes_per_token_bf16'])} per token in bf16 "
          f"({_human_bytes(info['kv_cache_bytes_per_token_bf16'] * config.max_position_embeddings)} "
          f"for the full {config.max_position_embeddings}-token context)")
    c = config
    attention = f"{c.num_attention_heads} heads x {c.head_dim}, {c.num_key_value_heads} KV heads"
    if c.sliding_window:
        attention += f", sliding window {c.sliding_window}"
    positions = c.position_encoding + (f" (theta {c.rope_theta:g})" if c.position_encoding == "rope" else "")
    if c.rope_scaling:
        positions += f", {c.rope_scaling['rope_type']} scaling x{c.rope_scaling['factor']}"
    mlp = f"{c.hidden_act} gated, {c.intermediate_size}"
    if c.num_local_experts:
        mlp += f", {c.num_local_experts} experts (top {c.num_experts_per_tok})"
    rows = [("layers", c.num_hidden_layers), ("hidden", c.hidden_size), ("attention", attention), ("mlp", mlp),
            ("positions", positions), ("context", c.max_position_embeddings), ("vocab", c.vocab_size),
            ("tied embeddings", c.tie_word_embeddings)]
    for name, value in rows:
        print(f"  {name:<16}{value}")
    if source.is_dir():
        on_disk = sum(f.stat().st_size for f in source.glob("*.safetensors"))
        print(f"  {'on disk':<16}{_human_bytes(on_disk)} of safetensors")


def build_byte_tokenizer() -> Tokenizer:
    """A byte-level tokenizer with no merges (259 ids): encodes any text, needs no training data."""
    return Tokenizer.train([], 256 + 3, show_progress=False)


def cmd_init(args: argparse.Namespace) -> None:
    config = get_preset(args.preset)
    tokenizer = Tokenizer(args.tokenizer) if args.tokenizer else build_byte_tokenizer()
    if tokenizer.vocab_size > config.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens, more than the preset's vocab_size "
                         f"{config.vocab_size}")
    config = config.replace(bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)
    torch.manual_seed(args.seed)
    model = Transformer(config)
    out = save_pretrained(model, args.out, dtype=args.dtype)
    tokenizer.save(out)
    print(f"wrote {out}: preset {args.preset}, {_human_count(model.num_parameters())} parameters (random), "
          f"tokenizer with {tokenizer.vocab_size} tokens")


def cmd_merge(args: argparse.Namespace) -> None:
    out = merge_adapter_folder(args.base, args.adapter, args.out)
    print(f"wrote {out}: {args.base} with the LoRA adapter {args.adapter} folded into its weights")


def cmd_tokenizer_train(args: argparse.Namespace) -> None:
    files = []
    for name in args.input:
        path = Path(name)
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.is_file())
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"no such input file or folder: {path}")
    if args.vocab_size < 256 + 3:
        raise ValueError(f"--vocab-size must be at least 259 (256 bytes + 3 special tokens), got {args.vocab_size}")
    tokenizer = Tokenizer.train(files, args.vocab_size, show_progress=True)
    tokenizer.save(args.out)
    print(f"wrote {args.out}: byte-level BPE with {tokenizer.vocab_size} tokens from {len(files)} file(s)")


def cmd_data_prepare(args: argparse.Namespace) -> None:
    meta = prepare(args.input, args.tokenizer, args.out, val_fraction=args.val_fraction, workers=args.workers,
                   shard_tokens=args.shard_tokens, seed=args.seed)
    splits = meta["splits"]
    for name, s in splits.items():
        print(f"{name}: {s['documents']} documents, {s['tokens']:,} tokens in {len(s['shards'])} shard(s)")
    tokens, seconds = sum(s["tokens"] for s in splits.values()), max(meta["seconds"], 1e-6)
    print(f"wrote {args.out}: {meta['dtype']} ids (vocab {meta['vocab_size']}), prepared in {seconds:.1f} s "
          f"({_human_count(int(tokens / seconds))} tokens/s)")


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
                       "pack")
FINETUNE_TRAIN_FLAGS = ("out", "max_steps", "micro_batch", "grad_accum", "seq_len", "lr", "warmup_steps", "precision",
                        "device", "seed", "save_every", "eval_every", "resume")


def cmd_finetune(args: argparse.Namespace) -> None:
    spec_flags = {n: getattr(args, n) for n in FINETUNE_SPEC_FLAGS if getattr(args, n) not in (None, [])}
    train_flags = {n: getattr(args, n) for n in FINETUNE_TRAIN_FLAGS if getattr(args, n) is not None}
    spec, cfg = load_config(args.config, spec_flags, {**parse_overrides(args.set), **train_flags})
    result = finetune(cfg, spec)
    if result.final_dir is not None:
        kind = "a PEFT adapter folder" if spec.method != "full" else "a model folder"
        last = result.losses.get(result.step)
        print(f"fine-tuned {result.step} steps ({spec.method})" + (f", last loss {last:.4f}" if last else "")
              + f"; wrote {result.final_dir} ({kind}; chat: camelid chat --model {spec.base}"
              + (f" --adapter {result.final_dir})" if spec.method != "full" else ")"))


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


def cmd_plot(args: argparse.Namespace) -> None:
    try:
        paths = plot_run(args.run_dir)
    except ImportError as e:  # matplotlib is optional: one line, not a traceback
        raise ValueError(str(e)) from None
    for path in paths:
        print(path)


def _config_of(model: str) -> ModelConfig:
    """A model folder's config.json, else a preset."""
    return ModelConfig.from_hf(model) if Path(model).is_dir() else get_preset(model)


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
    si = lambda n: f"{n / 1e12:.2f} T" if n >= 1e12 else _human_count(n)  # noqa: E731
    for r in result["laws"]:
        print(f"  {r['name']:<26}{si(r['params']):>10}{si(r['tokens']):>10}"
              f"{r['tokens_per_param']:>14.1f}{r['flops']:>11.3g}{r['loss']:>8.3f}")
    if args.plot:
        print(f"wrote {result['plot']}")


def cmd_plan_memory(args: argparse.Namespace) -> None:
    est = plan_memory.estimate(_config_of(args.model), args.method, seq=args.seq, batch=args.batch,
                               precision=args.precision, optimizer=args.optimizer, checkpointing=args.checkpointing,
                               gpus=args.gpus, strategy=args.strategy, kv_context=args.kv_context,
                               lora_r=args.lora_r, lora_targets=args.lora_targets)
    if args.json:
        print(json.dumps(est.to_dict(), indent=2))
        return
    setup = f"{args.model}, {args.method}, seq {args.seq}, batch {args.batch}, {args.precision}"
    if args.method != "inference":
        setup += f", {args.optimizer}" + (", checkpointing" if args.checkpointing else "")
        setup += f", {args.gpus} GPUs ({args.strategy})" if args.gpus > 1 else ""
    print(plan_memory.format_table(est, f"memory per GPU: {setup}"))


def cmd_plan_fit(args: argparse.Namespace) -> None:
    device = plan_fit.parse_size(args.device_memory)
    rows = plan_fit.fit(_config_of(args.model), device, seq=args.seq, global_batch=args.global_batch,
                        precision=args.precision, optimizer=args.optimizer)
    if args.json:
        print(json.dumps({"device_memory_bytes": device, "seq": args.seq, "global_batch": args.global_batch,
                          "methods": plan_fit.to_dicts(rows)}, indent=2))
        return
    print(f"{args.model} on {device / 1e9:.1f} GB, seq {args.seq}, global batch {args.global_batch} "
          f"({args.precision}, {args.optimizer})")
    for r in rows:
        if r.fits:
            ckpt = "on" if r.checkpointing else "off"
            how = (f"batch {r.micro_batch}" if r.method == "inference" else
                   f"micro-batch {r.micro_batch} x accum {r.grad_accum}, checkpointing {ckpt}")
            print(f"  {r.method:<10} fits   {how} ({r.bytes_needed / 1e9:.1f} GB estimated)")
        else:
            print(f"  {r.method:<10} no     {r.reason}")


# ---- argument parsing -------------------------------------------------------------------------------------------

def _add_sampling(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when present)")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: as saved)")


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(prog="camelid", description="LLaMA-family models: plan, train, tune, serve.")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    p = verbs.add_parser("generate", help="stream a completion to stdout", formatter_class=fmt, epilog=textwrap.dedent("""\
        examples:
          camelid generate --model out/tiny --prompt "Once upon a time" --max-new-tokens 64
          camelid generate --model out/tiny --prompt "Hi" --temperature 0.8 --top-p 0.95 --seed 1 --stop "\\n\\n"
        """))
    p.add_argument("--model", required=True, help="a Hugging Face-style model folder")
    p.add_argument("--prompt", required=True)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--adapter", default=None, help="a PEFT LoRA/DoRA adapter folder to apply to --model")
    _add_sampling(p)
    p.set_defaults(func=cmd_generate)

    p = verbs.add_parser("chat", help="interactive multi-turn chat in the terminal", formatter_class=fmt,
                         epilog="examples:\n  camelid chat --model out/tiny --temperature 0.7 --seed 0\n"
                                "  camelid chat --model models/base --adapter runs/lora/final\n")
    p.add_argument("--model", required=True)
    p.add_argument("--adapter", default=None, help="a PEFT LoRA/DoRA adapter folder (`camelid finetune` output)")
    p.add_argument("--template", default=None, help="chat template name (default: the adapter's recorded one, "
                   "else the tokenizer's chat_template, else a plain User:/Assistant: transcript)")
    p.add_argument("--system", default="", help="a system prompt kept at the top of the history")
    _add_sampling(p)
    p.set_defaults(func=cmd_chat)

    p = verbs.add_parser("info", help="parameters, memory and config of a model folder or preset", formatter_class=fmt,
                         epilog="examples:\n  camelid info --model llama-3-8b\n  camelid info --model out/tiny --json\n"
                                f"\npresets: {', '.join(PRESETS)}\n")
    p.add_argument("--model", required=True, help="a model folder or a preset name")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_info)

    p = verbs.add_parser("init", help="write a model folder with random weights and a tokenizer", formatter_class=fmt,
                         epilog="examples:\n  camelid init --preset tiny --out out/tiny\n"
                                "  camelid init --preset tinyllama-1.1b --out out/tl --dtype bfloat16 --tokenizer tok/\n")
    p.add_argument("--preset", required=True, choices=list(PRESETS), metavar="PRESET", help=", ".join(PRESETS))
    p.add_argument("--out", required=True)
    p.add_argument("--tokenizer", default=None, help="copy this tokenizer folder (default: a byte-level tokenizer)")
    p.add_argument("--dtype", default=None, help="float32 (default) | bfloat16 | float16")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_init)

    p = verbs.add_parser("merge", help="fold a PEFT LoRA/DoRA adapter into its base model", formatter_class=fmt,
                         epilog="example:\n  camelid merge --base models/llama --adapter runs/lora/final --out models/merged\n")
    p.add_argument("--base", required=True, help="the base model folder")
    p.add_argument("--adapter", required=True, help="a PEFT adapter folder (adapter_config.json + adapter_model.safetensors)")
    p.add_argument("--out", required=True, help="where to write the merged model folder")
    p.set_defaults(func=cmd_merge)

    p = verbs.add_parser("tokenizer", help="tokenizer tools")
    tverbs = p.add_subparsers(dest="tokenizer_verb", required=True, metavar="VERB")
    p = tverbs.add_parser("train", help="train a byte-level BPE tokenizer", formatter_class=fmt,
                          epilog="example:\n  camelid tokenizer train --input data/*.txt --vocab-size 8000 --out tok/\n")
    p.add_argument("--input", nargs="+", required=True, help="text files or folders")
    p.add_argument("--vocab-size", type=int, required=True)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_tokenizer_train)

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
    p.add_argument("--optimizer", default=None, choices=["adamw", "lion"], help=f"(default {d.optimizer})")
    p.add_argument("--precision", default=None, choices=["auto", "fp32", "bf16", "fp16"],
                   help=f"(default {d.precision}: bf16 on a GPU that has it, else fp32)")
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

    p = verbs.add_parser("finetune", help="instruction-tune a model folder (LoRA, DoRA or full)", formatter_class=fmt,
                         epilog=textwrap.dedent("""\
        Runs the training loop of `camelid pretrain` on chat-template-rendered instruction data (Alpaca, ShareGPT
        or OpenAI messages JSON / JSONL), with loss on the answers only. OUT/final is a PEFT adapter folder (lora,
        dora) or a model folder (full). --config YAML may hold these flags' keys and any TrainConfig key.

        examples:
          camelid finetune --base models/tiny --data alpaca.json --template alpaca --out runs/lora --max-steps 200
          camelid finetune --base models/llama --data a.json:0.7 --data b.jsonl:0.3 --method dora \\
              --target-modules all-linear --lora-r 16 --lora-alpha 32 --out runs/dora
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
    p.add_argument("--warmup-steps", type=int, default=None, help="(default 0)")
    p.add_argument("--micro-batch", type=int, default=None)
    p.add_argument("--grad-accum", type=int, default=None)
    p.add_argument("--seq-len", type=int, default=None)
    p.add_argument("--lora-r", type=int, default=None, help="(default 8)")
    p.add_argument("--lora-alpha", type=float, default=None, help="(default 16)")
    p.add_argument("--lora-dropout", type=float, default=None, help="(default 0.05)")
    p.add_argument("--target-modules", default=None, help="comma-separated names, or all-linear (default q_proj,v_proj)")
    p.add_argument("--pack", action=argparse.BooleanOptionalAction, default=None,
                   help="pack short examples into each row (no attention across them)")
    p.add_argument("--precision", default=None, choices=["auto", "fp32", "bf16", "fp16"])
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when present)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--eval-every", type=int, default=None)
    p.add_argument("--save-every", type=int, default=None)
    p.add_argument("--resume", action=argparse.BooleanOptionalAction, default=None,
                   help="continue from the latest checkpoint in --out")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any other TrainConfig key")
    p.set_defaults(func=cmd_finetune)

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

    p = verbs.add_parser("plot", help="PNG charts of a training run's metrics", formatter_class=fmt,
                         epilog="example:\n  camelid plot out/run1  # out/run1/plots/{loss,lr,throughput}.png\n")
    p.add_argument("run_dir", metavar="RUN_DIR", help="the --out folder of `camelid pretrain`")
    p.set_defaults(func=cmd_plot)

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
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_plan_fit)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except BAD_INPUT as e:
        print(f"camelid {args.verb}: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `camelid generate ... | head` closed the pipe: not an error
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
