"""A bounded load test of `camelid serve` on loopback: C concurrent streaming chat clients x R requests each.

The server runs as its own process (`python -m camelid serve`, so it has its own GIL); the clients are httpx async
streams in this process. Each request streams a chat completion with include_usage. Reported:
  requests/s and output tokens/s over the whole run (wall clock from the first request to the last byte),
  TTFT (request sent -> first content chunk) and inter-token latency (gap between content chunks) p50 / p99,
  errors (non-200, error events, a stream without [DONE]) and leaked KV blocks (from /metrics once idle).
Then the same prompts run offline through camelid.engine.LLM.generate in this process, for the ratio
server / offline output tokens/s (the issue's target on GPU: >= 0.8).

Without --model it builds a random model of TINY's shape with a byte-level tokenizer and the ChatML template (the
numbers measure the serving stack, not text quality). The exit status is 1 on any error or leaked block.

  .venv/bin/python benchmarks/serve_load.py                       # CPU, 64 clients x 4 requests, 32 tokens each
  python benchmarks/serve_load.py --model /models/llama --device cuda --max-tokens 256 --template llama3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch
from common import TINY, device_slug, record_header, write_result

from camelid.checkpoint import save_pretrained
from camelid.model import Transformer
from camelid.tokenizer import Tokenizer

CHATML_SPECIALS = ("<|begin_of_text|>", "<|end_of_text|>", "<|pad|>", "<|im_start|>", "<|im_end|>")
TOPICS = ["camels", "dunes", "oases", "caravans", "stars", "wells", "tents", "spices"]


def build_model(folder: Path, context: int) -> Path:
    tokenizer = Tokenizer.train([], 256 + len(CHATML_SPECIALS), special_tokens=CHATML_SPECIALS, show_progress=False)
    config = TINY.replace(vocab_size=tokenizer.vocab_size, max_position_embeddings=context,
                          bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id)
    torch.manual_seed(0)
    model = Transformer(config)
    # A random model's greedy choice is often a lone UTF-8 continuation byte, which never decodes to text, so a
    # stream would carry no content until its end. Zero the output rows of every token that is not one printable
    # ASCII character: their logits are then 0, below the largest of ~95 random ones, and every token is text.
    with torch.no_grad():
        for i in range(tokenizer.vocab_size):
            piece = tokenizer.decode([i])
            if not (len(piece) == 1 and piece.isprintable() and piece.isascii()):
                model.lm_head.weight[i] = 0
    save_pretrained(model, folder)
    tokenizer.save(folder)
    return folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args, model: Path, port: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "camelid", "serve", "--model", str(model), "--name", "bench", "--port", str(port),
           "--db", "none", "--log-level", "warning", "--max-num-seqs", str(args.max_num_seqs)]
    for flag in ("template", "device", "dtype", "kv_cache_memory"):
        if getattr(args, flag):
            cmd += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise SystemExit(f"camelid serve exited: {proc.stderr.read().decode()}")
        time.sleep(0.2)
    proc.kill()
    raise SystemExit("camelid serve did not start in 10 minutes")


def messages_for(client: int, request: int) -> list[dict]:
    topic = TOPICS[(client + request) % len(TOPICS)]
    return [{"role": "system", "content": "You are a desert guide."},
            {"role": "user", "content": f"Client {client}, question {request}: tell me about {topic}."}]


async def one_request(http: httpx.AsyncClient, model: str, messages: list[dict], max_tokens: int) -> dict:
    body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    times, usage, done, error = [], None, False, None
    try:
        async with http.stream("POST", "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                return {"error": f"HTTP {r.status_code}: {(await r.aread()).decode()[:200]}"}
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    break
                event = json.loads(line[6:])
                if "error" in event:
                    error = event["error"]["message"]
                usage = event.get("usage") or usage
                if any(c["delta"].get("content") for c in event.get("choices", [])):
                    times.append(time.perf_counter())
    except httpx.HTTPError as e:
        return {"error": f"{type(e).__name__}: {e}"}
    if error or not done or usage is None:
        return {"error": error or "the stream ended without [DONE] and usage"}
    return {"ttft": times[0] - t0 if times else None, "itl": [b - a for a, b in zip(times, times[1:])],
            "tokens": usage["completion_tokens"], "end": time.perf_counter()}


async def run_clients(url: str, model: str, clients: int, requests: int, max_tokens: int) -> tuple[list[dict], float]:
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(600), limits=limits) as http:
        async def client(c: int) -> list[dict]:
            return [await one_request(http, model, messages_for(c, r), max_tokens) for r in range(requests)]

        t0 = time.perf_counter()
        results = await asyncio.gather(*(client(c) for c in range(clients)))
        return [r for rs in results for r in rs], time.perf_counter() - t0


def metric(text: str, name: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return None


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def offline_throughput(args, model: Path, template: str | None, n_prompts: int) -> float:
    """Output tokens/s of the same chat prompts through LLM.generate in this process (no HTTP)."""
    from camelid.engine import LLM, SamplingParams
    from camelid.templates import for_tokenizer, get_template

    llm = LLM(str(model), kv_cache_memory=args.kv_cache_memory, dtype=args.dtype, device=args.device,
              max_num_seqs=args.max_num_seqs)
    tpl = for_tokenizer(llm.tokenizer) if template in (None, "model") else get_template(template)
    prompts = [tpl.encode_prompt(llm.tokenizer, messages_for(c, r))
               for c in range(args.clients) for r in range(args.requests)][:n_prompts]
    stops = tpl.stop_token_ids(llm.tokenizer)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0, stop_token_ids=stops)
    llm.generate(prompts[:4], params)  # warm-up
    t0 = time.perf_counter()
    outputs = llm.generate(prompts, params)
    seconds = time.perf_counter() - t0
    return sum(len(o.outputs[0].token_ids) for o in outputs) / seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=None, help="model folder (default: a random TINY-shaped model)")
    p.add_argument("--template", default=None, help="chat template (default: chatml for the built model, else the "
                   "tokenizer's own)")
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--requests", type=int, default=4, help="requests per client, one after another")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None)
    p.add_argument("--kv-cache-memory", default=None)
    p.add_argument("--no-offline", action="store_true", help="skip the offline engine comparison")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    if (args.device or ("cuda" if torch.cuda.is_available() else "cpu")) == "cpu":
        # tiny steps gain nothing from intra-op threads, and on a shared box OpenMP threads spin-waiting for a
        # descheduled sibling made every step ~10x slower; the server process inherits this too
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or build_model(Path(tmp) / "tiny-chat", context=512)
        template = args.template or (None if args.model else "chatml")
        args.template = template
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        server = start_server(args, model, port)
        try:
            asyncio.run(run_clients(url, "bench", 4, 1, 4))  # warm-up: first-call costs are not load
            results, seconds = asyncio.run(run_clients(url, "bench", args.clients, args.requests, args.max_tokens))
            deadline, metrics = time.monotonic() + 30, ""
            while time.monotonic() < deadline:  # the last aborts/frees land within a step or two
                metrics = httpx.get(url + "/metrics").text
                idle = metric(metrics, "camelid_num_requests_running") == 0
                if idle and metric(metrics, "camelid_kv_blocks_used") == 0:
                    break
                time.sleep(0.1)
        finally:
            server.terminate()
            server.wait(30)
        ok = [r for r in results if "error" not in r]
        errors = [r["error"] for r in results if "error" in r]
        leaked = metric(metrics, "camelid_kv_blocks_used")
        tokens = sum(r["tokens"] for r in ok)
        ttft = [r["ttft"] for r in ok if r["ttft"] is not None]
        itl = [x for r in ok for x in r["itl"]]
        offline = None if args.no_offline else offline_throughput(args, model, template, len(results))

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    record = {**record_header("serve_load", device),
              "config": {"model": str(args.model or "random TINY (4 layers, hidden 256), byte tokenizer, chatml"),
                         "clients": args.clients, "requests_per_client": args.requests, "max_tokens": args.max_tokens,
                         "max_num_seqs": args.max_num_seqs},
              "requests": len(results), "errors": len(errors), "error_samples": errors[:5],
              "kv_blocks_used_after": leaked, "seconds": seconds,
              "requests_per_s": len(ok) / seconds, "output_tokens_per_s": tokens / seconds, "output_tokens": tokens,
              "ttft_s": {"p50": percentile(ttft, 50), "p99": percentile(ttft, 99), "mean": statistics.fmean(ttft)
                         if ttft else None},
              "itl_s": {"p50": percentile(itl, 50), "p99": percentile(itl, 99)},
              "offline_output_tokens_per_s": offline,
              "server_over_offline": (tokens / seconds) / offline if offline else None}
    print(f"{len(results)} requests ({args.clients} clients x {args.requests}), {len(errors)} errors, "
          f"KV blocks used afterwards: {leaked}")
    print(f"  {record['requests_per_s']:.2f} requests/s, {record['output_tokens_per_s']:.1f} output tokens/s "
          f"({tokens} tokens in {seconds:.1f} s)")
    print(f"  TTFT p50 {record['ttft_s']['p50'] * 1e3:.0f} ms, p99 {record['ttft_s']['p99'] * 1e3:.0f} ms; "
          f"inter-token p50 {record['itl_s']['p50'] * 1e3:.1f} ms, p99 {record['itl_s']['p99'] * 1e3:.1f} ms")
    if offline:
        print(f"  offline engine: {offline:.1f} output tokens/s; server keeps {record['server_over_offline']:.0%}")
    slug = device_slug(device)
    print("wrote", write_result(record, f"serve_load-{slug}-c{args.clients}x{args.requests}-t{args.max_tokens}",
                                args.out))
    if errors or leaked != 0:
        for e in errors[:5]:
            print("error:", e, file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
