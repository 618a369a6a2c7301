"""Verbs of a scaled-out server: `camelid controller` and `camelid worker` (FastChat style); the OpenAI API server
in front of them is `camelid serve --controller URL`. Also the client side of `camelid chat --server URL`."""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import socket
import sys
import textwrap
from urllib.parse import quote

from camelid.cli.model_verbs import user_lines
from camelid.cli.serve_verbs import (LOG_LEVELS, check_http_url, check_port_free, check_template, parse_adapters,
                                     port_number)

__all__ = ["ChatClient", "chat_with_server", "cluster_token", "parse_adapters", "register"]


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to any interface
        return False


def _is_unspecified(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_unspecified  # 0.0.0.0 or ::
    except ValueError:
        return False


def cluster_token(args: argparse.Namespace) -> str | None:
    """--cluster-token, else $CAMELID_CLUSTER_TOKEN; a controller or worker reachable beyond this machine must have
    one: without it anyone could register an address (and receive users' prompts) or call /worker/generate."""
    from camelid.serve.controller import CLUSTER_TOKEN_ENV

    token = args.cluster_token or os.environ.get(CLUSTER_TOKEN_ENV) or None
    if token is None and not _is_loopback(args.host):
        raise ValueError(f"--host {args.host} is reachable from other machines: give --cluster-token TOKEN (or set "
                         f"{CLUSTER_TOKEN_ENV}), the same on the controller, the workers and `camelid serve`")
    return token


def cmd_controller(args: argparse.Namespace) -> None:
    import uvicorn

    from camelid.serve.controller import SERVER_KEEP_ALIVE_S, create_controller_app

    if args.heartbeat_timeout <= 0:  # every worker would be dropped as soon as it registered
        raise ValueError(f"--heartbeat-timeout must be > 0, got {args.heartbeat_timeout:g}")
    app = create_controller_app(heartbeat_timeout=args.heartbeat_timeout, cluster_token=cluster_token(args))
    check_port_free(args.host, args.port)
    print(f"camelid controller: http://{args.host}:{args.port} (drops a worker silent for {args.heartbeat_timeout:g} s)",
          file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_keep_alive=SERVER_KEEP_ALIVE_S)


def cmd_worker(args: argparse.Namespace) -> None:
    import uvicorn

    from camelid.checkpoint import parse_device
    from camelid.serve.backend import LocalBackend
    from camelid.serve.controller import SERVER_KEEP_ALIVE_S
    from camelid.serve.worker import create_worker_app

    check_http_url(args.controller)
    adapters = parse_adapters(args.adapter)
    token = cluster_token(args)  # before the model loads: a flag mistake costs nothing
    if args.address:
        check_http_url(args.address, "--address")
    elif _is_unspecified(args.host):  # the controller would hand the server http://0.0.0.0:PORT
        raise ValueError(f"--host {args.host} listens on every interface, and http://{args.host}:{args.port} is no "
                         f"address to reach it at: give --address http://THIS_MACHINE:{args.port}")
    if args.decode_steps is not None and args.decode_steps < 1:
        raise ValueError(f"--decode-steps must be >= 1, got {args.decode_steps}")
    if args.heartbeat_interval <= 0:  # 0 would post heartbeats to the controller in a busy loop
        raise ValueError(f"--heartbeat-interval must be > 0, got {args.heartbeat_interval:g}")
    check_template(args.template)
    if args.device:
        parse_device(args.device)
    check_port_free(args.host, args.port)
    llm_kwargs = {k: v for k, v in dict(kv_cache_memory=args.kv_cache_memory, dtype=args.dtype, device=args.device,
                                        max_num_seqs=args.max_num_seqs, compile=args.compile or None,
                                        decode_steps=args.decode_steps).items()
                  if v is not None}
    backend = LocalBackend.load(args.model, adapters, name=args.model_name, template=args.template, **llm_kwargs)
    address = args.address or f"http://{args.host}:{args.port}"
    name = args.name or f"{socket.gethostname()}:{args.port}"
    app = create_worker_app(backend, name, address, args.controller, heartbeat_interval=args.heartbeat_interval,
                            cluster_token=token)
    models = ", ".join(m["id"] for m in backend.models())
    print(f"camelid worker {name}: serving {models} at {address} for the controller {args.controller}",
          file=sys.stderr)
    # a stream still open at shutdown is cut after 5 s (its client gets an error) rather than holding the exit
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=5,
                timeout_keep_alive=SERVER_KEEP_ALIVE_S)


# ---- `camelid chat --server URL`: a terminal client of a running server ---------------------------------------------

class ChatClient:
    """Chat turns over the HTTP API. The history lives in a server session (the server trims it to the context and
    the web page lists it); a server without sessions gets the whole history with every turn instead."""

    def __init__(self, server: str, api_key: str | None = None, timeout: float = 600.0) -> None:
        import httpx

        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=server.rstrip("/"), headers=headers, timeout=timeout)
        self.server = server
        self.local_history: list[dict] | None = None  # None: the server keeps the history (a session)

    def request(self, method: str, path: str, **kwargs) -> dict:
        """JSON of a call; a 4xx/5xx or an unreachable server is a ValueError with the server's message."""
        import httpx

        try:
            r = self.http.request(method, path, **kwargs)
        except httpx.HTTPError as e:
            raise ValueError(f"cannot reach the server at {self.server}: {e}") from None
        if r.status_code >= 400:
            raise ValueError(f"{method} {path}: {error_message(r.status_code, r.text)}")
        return r.json()

    def pick_model(self, wanted: str | None) -> str:
        models = [m["id"] for m in self.request("GET", "/v1/models")["data"]]
        if wanted is None and models:
            return models[0]
        if wanted not in models:
            raise ValueError(f"model {wanted!r} is not served at {self.server}; it has: {', '.join(models) or 'none'}")
        return wanted

    def open_session(self, session_id: str | None, model: str, system: str) -> str | None:
        """The session to chat in: the given one (its system prompt updated when --system is given), else a new one;
        None when the server has no sessions (then the history is kept here)."""
        if session_id:
            path = f"/v1/sessions/{quote(session_id, safe='')}"  # one path segment, whatever the id holds
            session = self.request("GET", path)
            if session.get("id") != session_id:  # "." or ".." still walk the path: another endpoint answered
                raise ValueError(f"GET {path}: no session {session_id!r}")
            if system:
                self.request("PATCH", path, json={"system_prompt": system})
            turns = sum(m["role"] == "user" for m in session.get("messages", []))
            print(f"camelid chat: session {session_id} ({session['title']!r}, {turns} earlier turns)", file=sys.stderr)
            return session_id
        try:
            session = self.request("POST", "/v1/sessions", json={"model": model, "system_prompt": system or None})
        except ValueError:  # sessions are off on this server (404): keep the history here
            self.local_history = [{"role": "system", "content": system}] if system else []
            return None
        print(f"camelid chat: session {session['id']} (resume it with --session {session['id']})", file=sys.stderr)
        return session["id"]

    def turn(self, model: str, session_id: str | None, text: str, sampling: dict, out=sys.stdout) -> str:
        """Send one user message and print the answer as it streams; returns the answer. Ctrl-C stops it."""
        import httpx

        messages = [{"role": "user", "content": text}]
        body = {"model": model, "stream": True, **sampling,
                "messages": messages if self.local_history is None else self.local_history + messages}
        if session_id:
            body["session_id"] = session_id
        try:
            answer = self._stream_answer(body, out)
        except httpx.HTTPError as e:
            raise ValueError(f"the connection to {self.server} failed: {e}") from None
        if self.local_history is not None:
            self.local_history += [*messages, {"role": "assistant", "content": answer}]
        return answer

    def _stream_answer(self, body: dict, out) -> str:
        answer = ""
        # Ctrl-C also while waiting for the headers (the server sends them with the first token, after the prefill);
        # leaving the `with` closes the connection: the server aborts the request
        try:
            with self.http.stream("POST", "/v1/chat/completions", json=body) as r:
                if r.status_code >= 400:
                    raise ValueError(error_message(r.status_code, r.read().decode(errors="replace")))
                for line in r.iter_lines():
                    if not line.startswith("data:"):
                        continue
                    payload = line[5:].strip()
                    if payload == "[DONE]":
                        break
                    event = json.loads(payload)
                    if "error" in event:
                        raise ValueError(event["error"].get("message", "the server failed mid-answer"))
                    for choice in event.get("choices", []):
                        piece = (choice.get("delta") or {}).get("content") or ""
                        answer += piece
                        print(piece, end="", file=out, flush=True)
        except KeyboardInterrupt:
            print(" [stopped]", end="", file=out)
        return answer


def error_message(status: int, text: str) -> str:
    try:
        return f"{json.loads(text)['error']['message']} (HTTP {status})"
    except (ValueError, KeyError, TypeError):
        return f"HTTP {status}: {text[:200]}"


def chat_with_server(args: argparse.Namespace) -> None:
    """The loop of `camelid chat --server URL`: same commands as the local chat."""
    if args.adapter or args.template:
        raise ValueError("--adapter/--template apply to a local --model; on a server, an adapter is its own model "
                         "name: pass it as --model NAME")
    client = ChatClient(args.server, args.api_key or os.environ.get("CAMELID_API_KEY"))
    model = client.pick_model(args.model)
    session_id = client.open_session(args.session, model, args.system)
    sampling = {"max_tokens": args.max_new_tokens, "temperature": args.temperature, "top_p": args.top_p,
                "top_k": args.top_k, "repetition_penalty": args.repetition_penalty, "seed": args.seed}
    print(f"camelid chat: {model} at {args.server}; /reset starts over, /exit or Ctrl-D quits.",
          file=sys.stderr)
    for user in user_lines():
        if user == "/reset":
            session_id = client.open_session(None, model, args.system)
            continue
        print("bot> ", end="", flush=True)
        try:
            client.turn(model, session_id, user, sampling)
        except ValueError as e:  # one failed turn (context full, a worker died): say so and keep the chat going
            print(f"\ncamelid chat: error: {e}", file=sys.stderr)
        print()


def register(verbs, fmt) -> None:
    """Add this module's verbs to the `camelid` parser."""
    p = verbs.add_parser("controller", help="the registry of a scaled-out server: tracks workers and their load",
                         formatter_class=fmt, epilog=textwrap.dedent("""\
        examples:
          camelid controller --port 21001
          camelid worker --controller http://127.0.0.1:21001 --model out/tiny --port 21002
          camelid worker --controller http://127.0.0.1:21001 --model out/tiny --port 21003
          camelid serve --controller http://127.0.0.1:21001 --port 8000
        """))
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=port_number, default=21001)
    p.add_argument("--heartbeat-timeout", type=float, default=4.0,
                   help="drop a worker whose last heartbeat is older than this many seconds (default 4)")
    p.add_argument("--cluster-token", default=None, metavar="TOKEN", help="the cluster's shared secret, needed on "
                   "every call (default: $CAMELID_CLUSTER_TOKEN); required with a --host other than loopback")
    p.add_argument("--log-level", default="warning", choices=LOG_LEVELS, help="uvicorn log level (default warning)")
    p.set_defaults(func=cmd_controller)

    p = verbs.add_parser("worker", help="serve a model for a controller (registers, heartbeats its load)",
                         formatter_class=fmt, epilog=textwrap.dedent("""\
        examples:
          camelid worker --controller http://127.0.0.1:21001 --model out/tiny
          CAMELID_CLUSTER_TOKEN=s3cret camelid worker --controller http://10.0.0.1:21001 --model models/base \\
              --adapter chat=runs/lora/final --host 0.0.0.0 --port 21002 --address http://10.0.0.2:21002
        """))
    p.add_argument("--controller", required=True, help="the controller's URL, e.g. http://127.0.0.1:21001")
    p.add_argument("--model", required=True, help="a Hugging Face-style model folder")
    p.add_argument("--model-name", default=None, help="the name clients use (default: the folder's name)")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR",
                   help="a PEFT LoRA adapter folder served as the model NAME (repeatable)")
    p.add_argument("--template", default=None, help="chat template name; an adapter's recorded template comes "
                   "first (default: the one `camelid finetune` recorded in the model folder, else the tokenizer's "
                   "chat_template)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=port_number, default=21002)
    p.add_argument("--address", default=None,
                   help="the URL the server reaches this worker at (default: http://HOST:PORT; needed with --host 0.0.0.0)")
    p.add_argument("--name", default=None, help="the worker's name at the controller (default: HOSTNAME:PORT)")
    p.add_argument("--kv-cache-memory", default=None, help="KV cache size, e.g. 64MB or 2GB (default: the engine's)")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: as saved)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: the engine's)")
    p.add_argument("--max-num-seqs", type=int, default=None, help="most sequences in one batch (default: the engine's)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the decode forward the CUDA graphs replay (fewer, fused kernels a step; "
                        "minutes more at start)")
    p.add_argument("--decode-steps", type=int, default=None, metavar="K",
                   help="run decode-only steps K at a time on the device, one sync each (default 1)")
    p.add_argument("--cluster-token", default=None, metavar="TOKEN", help="the cluster's shared secret (default: "
                   "$CAMELID_CLUSTER_TOKEN); required with a --host other than loopback")
    p.add_argument("--heartbeat-interval", type=float, default=1.0, help="seconds between heartbeats (default 1)")
    p.add_argument("--log-level", default="warning", choices=LOG_LEVELS, help="uvicorn log level (default warning)")
    p.set_defaults(func=cmd_worker)
