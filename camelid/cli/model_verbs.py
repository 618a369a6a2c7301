"""Verbs on a model folder: generate, chat, info, init, merge, tokenizer train."""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import torch

from camelid.checkpoint import (from_pretrained, merge_adapter_folder, parse_device, refuse_non_empty,
                                remove_model_files, save_pretrained)
from camelid.config import PRESETS, ModelConfig, config_of, get_preset, num_parameters
from camelid.data.pretrain import SUFFIXES, DataError, find_files, texts
from camelid.generate import stream
from camelid.model import Transformer
from camelid.tokenizer import Tokenizer
from camelid.peft import load_adapter
from camelid.templates import for_tokenizer, get_template, recorded_template

def _device(name: str | None) -> torch.device:
    return parse_device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


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
    """--template, else the template `camelid finetune` recorded in the adapter folder, else in the model folder (a
    full fine-tune's final/, a merged model), else the tokenizer's chat_template; None = the plain transcript
    fallback (a base model that was never tuned for chat)."""
    recorded = (recorded_template(args.adapter) if args.adapter else None) or recorded_template(args.model)
    name = args.template or recorded
    if name == "model" or (name is None and tokenizer.chat_template):
        return for_tokenizer(tokenizer)
    return get_template(name) if name else None


def cmd_chat(args: argparse.Namespace) -> None:
    """Multi-turn chat rendered with the model's chat template (or a plain transcript when there is none); history
    is trimmed from the oldest turns. With --server URL, the same chat against a running `camelid serve`."""
    if args.server:
        from camelid.cli.cluster_verbs import chat_with_server

        return chat_with_server(args)
    if not args.model:
        raise ValueError("give --model DIR (a local model folder) or --server URL (a running camelid serve)")
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
    for user in user_lines():
        if user == "/reset":
            turns.clear()
            continue
        history = list(turns)
        while True:
            prompt, add_bos = render()
            size = len(tokenizer.encode(prompt, bos=add_bos))
            if size <= budget or not turns:
                break
            turns.pop(0)
        if size >= model.config.max_position_embeddings:  # too long even alone: skip it, keep the chat and history
            turns[:] = history
            print(f"camelid chat: that message makes a prompt of {size} tokens, more than the model's context of "
                  f"{model.config.max_position_embeddings}: not sent", file=sys.stderr)
            continue
        print("bot> ", end="", flush=True)
        answer = ""
        for piece in stream(model, tokenizer, prompt, args.max_new_tokens, stop=stop, bos=add_bos,
                            stop_ids=stop_ids, **_sampling(args)):
            answer += piece
            print(piece, end="", flush=True)
        print()
        turns.append((user, answer.strip()))


def user_lines() -> Iterator[str]:
    """The chat's input: each non-empty line typed at `you> `, until /exit, /quit, end of input or Ctrl-C."""
    while True:
        try:
            user = input("you> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return
        if user in ("/exit", "/quit"):
            return
        if user:
            yield user


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return ""


def human_count(n: int) -> str:
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
    config = config_of(args.model)
    info = model_info(config)
    quantized = json.loads((source / "config.json").read_text()).get("quantization_config") \
        if (source / "config.json").is_file() else None
    if quantized:  # a `camelid quantize` folder keeps its original's config: only this says what its weights are
        info["quantization"] = {**{k: v for k, v in quantized.items() if k not in ("quant_method", "modules")},
                                "layers": len(quantized.get("modules") or [])}
    if args.json:
        print(json.dumps(info, indent=2))
        return
    print(f"{args.model}: {config.model_type}, {human_count(info['parameters'])} parameters "
          f"({human_count(info['non_embedding_parameters'])} without embeddings)")
    print("weights: " + ", ".join(f"{k} {human_bytes(v)}" for k, v in info["bytes"].items()))
    print(f"KV cache: {human_bytes(info['kv_cache_bytes_per_token_bf16'])} per token in bf16 "
          f"({human_bytes(info['kv_cache_bytes_per_token_bf16'] * config.max_position_embeddings)} "
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
    if quantized:
        q = info["quantization"]
        options = "".join(f", {k}={v}" for k, v in q.items() if k not in ("method", "layers"))
        rows.append(("quantized", f"{q['method']}{options}, {q['layers']} Linear layers"))
    for name, value in rows:
        print(f"  {name:<16}{value}")
    if source.is_dir():
        on_disk = sum(f.stat().st_size for f in source.glob("*.safetensors"))
        print(f"  {'on disk':<16}{human_bytes(on_disk)} of safetensors")


def build_byte_tokenizer() -> Tokenizer:
    """A byte-level tokenizer with no merges (259 ids): encodes any text, needs no training data."""
    return Tokenizer.train([], 256 + 3, show_progress=False)


def cmd_init(args: argparse.Namespace) -> None:
    config = get_preset(args.preset)
    out = Path(args.out)
    refuse_non_empty(out, args.overwrite, "new model")
    tokenizer = Tokenizer(args.tokenizer) if args.tokenizer else build_byte_tokenizer()
    grown = tokenizer.vocab_size > config.vocab_size  # the weights are random: the table grows to fit (tiny's 512
    if grown:                                          # cannot hold Llama 3's 128k tokens, and there was no way out)
        config = config.replace(vocab_size=tokenizer.vocab_size)
    config = config.replace(bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)
    torch.manual_seed(args.seed)
    model = Transformer(config)
    if out.is_dir():  # --overwrite
        remove_model_files(out)
    out = save_pretrained(model, args.out, dtype=args.dtype)
    tokenizer.save(out)
    print(f"wrote {out}: preset {args.preset}, {human_count(model.num_parameters())} parameters (random), "
          f"tokenizer with {tokenizer.vocab_size} tokens"
          + (f" (vocab_size {config.vocab_size}: the preset's {get_preset(args.preset).vocab_size} grown to fit it)"
             if grown else ""))


def cmd_merge(args: argparse.Namespace) -> None:
    out = merge_adapter_folder(args.base, args.adapter, args.out, overwrite=args.overwrite)
    print(f"wrote {out}: {args.base} with the adapter {args.adapter} folded into its weights")
    quantized = json.loads((Path(args.base) / "config.json").read_text()).get("quantization_config")
    if quantized:  # folded into the dequantized weights: the output is a float model, not a smaller one
        print(f"the base was quantized ({quantized.get('method')}): {out} holds the merged weights dequantized, in "
              f"float; run camelid quantize on it for a quantized copy")


def cmd_tokenizer_train(args: argparse.Namespace) -> None:
    # the files and documents `camelid data prepare` reads (a .jsonl line's "text", not its JSON), so the tokenizer
    # learns the text it will encode
    files = find_files(args.input)
    if not files:
        raise DataError(f"no {', '.join(SUFFIXES)} files in {', '.join(args.input)}")
    if args.vocab_size < 256 + 3:
        raise ValueError(f"--vocab-size must be at least 259 (256 bytes + 3 special tokens), got {args.vocab_size}")
    tokenizer = Tokenizer.train([], args.vocab_size, show_progress=True, texts=texts(files))
    tokenizer.save(args.out)
    print(f"wrote {args.out}: byte-level BPE with {tokenizer.vocab_size} tokens from {len(files)} file(s)")


def _add_sampling(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when present)")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: as saved)")



def register(verbs, fmt) -> None:
    """Add this module's verbs to the `camelid` parser."""
    p = verbs.add_parser("generate", help="stream a completion to stdout", formatter_class=fmt, epilog=textwrap.dedent("""\
        examples:
          camelid generate --model out/tiny --prompt "Once upon a time" --max-new-tokens 64
          camelid generate --model out/tiny --prompt "Hi" --temperature 0.8 --top-p 0.95 --seed 1 --stop $'\\n\\n'
        """))
    p.add_argument("--model", required=True, help="a Hugging Face-style model folder")
    p.add_argument("--prompt", required=True)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--adapter", default=None, help="an adapter folder (any `camelid finetune` method, or a PEFT folder) to apply to --model")
    _add_sampling(p)
    p.set_defaults(func=cmd_generate)

    p = verbs.add_parser("chat", help="interactive multi-turn chat in the terminal", formatter_class=fmt,
                         epilog="examples:\n  camelid chat --model out/tiny --temperature 0.7 --seed 0\n"
                                "  camelid chat --model models/base --adapter runs/lora/final\n"
                                "  camelid chat --server http://127.0.0.1:8000 --api-key KEY\n"
                                "  camelid chat --server http://127.0.0.1:8000 --model my-lora --session SESSION_ID\n")
    p.add_argument("--model", default=None, help="a local model folder; with --server, the served model's name "
                   "(default: the server's first)")
    p.add_argument("--server", default=None, metavar="URL", help="chat with a running `camelid serve` at URL")
    p.add_argument("--api-key", default=None,
                   help="the server's API key (default: $CAMELID_API_KEY)")
    p.add_argument("--session", default=None, metavar="ID", help="continue this server chat session "
                   "(default: a new one; its id is printed)")
    p.add_argument("--adapter", default=None, help="an adapter folder (`camelid finetune` output of any method, or a PEFT folder)")
    p.add_argument("--template", default=None, help="chat template name (default: the one `camelid finetune` recorded "
                   "in the adapter or model folder, else the tokenizer's chat_template, else a plain User:/Assistant: "
                   "transcript)")
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
    p.add_argument("--tokenizer", default=None, help="copy this tokenizer folder (default: a byte-level tokenizer); "
                   "the vocabulary grows to the tokenizer's when the preset's is smaller")
    p.add_argument("--dtype", default=None, help="float32 (default) | bfloat16 | float16")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="write into --out even when it already holds files")
    p.set_defaults(func=cmd_init)

    p = verbs.add_parser("merge", help="fold a LoRA / DoRA / IA3 adapter into its base model", formatter_class=fmt,
                         epilog="example:\n  camelid merge --base models/llama --adapter runs/lora/final --out models/merged\n")
    p.add_argument("--base", required=True, help="the base model folder")
    p.add_argument("--adapter", required=True, help="a PEFT adapter folder (adapter_config.json + adapter_model.safetensors)")
    p.add_argument("--out", required=True, help="where to write the merged model folder")
    p.add_argument("--overwrite", action="store_true", help="write into --out even when it already holds files")
    p.set_defaults(func=cmd_merge)

    p = verbs.add_parser("tokenizer", help="tokenizer tools")
    tverbs = p.add_subparsers(dest="tokenizer_verb", required=True, metavar="VERB")
    p = tverbs.add_parser("train", help="train a byte-level BPE tokenizer", formatter_class=fmt,
                          epilog="example:\n  camelid tokenizer train --input data/*.txt --vocab-size 8000 --out tok/\n")
    p.add_argument("--input", nargs="+", required=True, help="files or folders, read as `camelid data prepare` reads "
                   "them: .txt/.md files, .jsonl (the \"text\" field), .parquet (the \"text\" column)")
    p.add_argument("--vocab-size", type=int, required=True)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_tokenizer_train)

