"""`camelid serve`: the OpenAI-compatible HTTP server over the engine (or over a controller's workers)."""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import textwrap
from pathlib import Path
from urllib.parse import urlsplit

DEFAULT_DB = "sqlite:///camelid-chats.db"
API_KEYS_ENV = "CAMELID_API_KEYS"
LOG_LEVELS = ["critical", "error", "warning", "info", "debug"]  # uvicorn's


def port_number(text: str) -> int:
    """argparse type of --port: a TCP port, refused here rather than by uvicorn's bind after the model has loaded."""
    port = int(text)
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a TCP port (1-65535)")
    return port


def check_port_free(host: str, port: int) -> None:
    """Refuse a --host/--port another process listens on before the model loads (and before a worker registers with
    its controller): uvicorn's bind comes last, and exits with code 3."""
    try:
        for family, kind, proto, _, address in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                                 flags=socket.AI_PASSIVE):
            with socket.socket(family, kind, proto) as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: a TIME_WAIT port is free
                s.bind(address)
    except OSError as e:  # socket.gaierror too: a host name that does not resolve
        raise ValueError(f"cannot listen on --host {host} --port {port}: {e.strerror or e}") from None


def check_template(name: str | None) -> None:
    """Refuse a --template that names no template before the model loads (else every chat request gets a 400)."""
    from camelid.templates import get_template

    if name not in (None, "model"):
        get_template(name)


def check_http_url(url: str, flag: str = "--controller") -> None:
    """Refuse a --controller (--address) that is no http(s) URL: a typo, not a controller still starting (which is
    retried), nor an address every request routed to would fail at."""
    parts = urlsplit(url)
    try:
        parts.port  # noqa: B018  raises on a port that is no number or out of range
    except ValueError:
        parts = None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{flag} {url!r} is not a URL: expected http://HOST:PORT")


def parse_adapters(items: list[str]) -> dict[str, str]:
    """["name=folder", ...] -> {"name": "folder"}, refusing a malformed item or a repeated name (serve and worker)."""
    adapters: dict[str, str] = {}
    for item in items:
        name, sep, folder = item.partition("=")
        if not sep or not name or not folder:
            raise ValueError(f"--adapter {item!r}: expected NAME=DIR")
        if name in adapters:
            raise ValueError(f"--adapter {name!r} is given twice: adapter names must be unique")
        adapters[name] = folder
    return adapters


def api_keys(args: argparse.Namespace) -> list[str]:
    """The keys of --api-key, --api-key-file (one a line; blank lines and # comments skipped) and $CAMELID_API_KEYS
    (comma-separated): the file and the variable keep keys out of `ps`."""
    keys = list(args.api_key or [])
    if args.api_key_file:
        path = Path(args.api_key_file)
        if not path.is_file():
            raise FileNotFoundError(f"--api-key-file {str(path)!r} does not exist")
        from_file = [line.strip() for line in path.read_text().splitlines()]
        from_file = [k for k in from_file if k and not k.startswith("#")]
        if not from_file:  # an empty file must not leave the server open by mistake
            raise ValueError(f"--api-key-file {str(path)!r} holds no key")
        keys += from_file
    keys += [k.strip() for k in os.environ.get(API_KEYS_ENV, "").split(",") if k.strip()]
    return list(dict.fromkeys(keys))


def check_flags(args: argparse.Namespace) -> None:
    """Flag mistakes, found before anything is opened or loaded."""
    from camelid.checkpoint import parse_device
    from camelid.serve.sessions import check_url

    if args.controller and (args.model or args.adapter):
        raise ValueError("give either --model (serve it here) or --controller (route to its workers), not both")
    if not args.controller and not args.model:
        raise ValueError("give --model DIR (or --controller URL)")
    if args.controller and args.compile:
        raise ValueError("--compile builds a local engine: give it with --model, not --controller")
    if args.decode_steps < 1:
        raise ValueError(f"--decode-steps must be >= 1, got {args.decode_steps}")
    if args.controller and args.decode_steps != 1:
        raise ValueError("--decode-steps sets a local engine: give it with --model (or to the workers)")
    if args.controller:
        check_http_url(args.controller)
    parse_adapters(args.adapter or [])
    check_template(args.template)
    if args.device:
        parse_device(args.device)  # a name torch does not know, or CUDA on a machine without it
    if args.db != "none":
        check_url(args.db)


def build_backend(args: argparse.Namespace):
    """LocalBackend over --model (+ --adapter), or RemoteBackend over --controller."""
    check_flags(args)
    if args.controller:
        from camelid.serve.controller import CLUSTER_TOKEN_ENV
        from camelid.serve.remote import RemoteBackend

        return RemoteBackend(args.controller, cluster_token=args.cluster_token or os.environ.get(CLUSTER_TOKEN_ENV))
    from camelid.serve.backend import LocalBackend

    return LocalBackend.load(args.model, parse_adapters(args.adapter or []), name=args.name, template=args.template,
                             kv_cache_memory=args.kv_cache_memory, dtype=args.dtype, device=args.device,
                             max_num_seqs=args.max_num_seqs, compile=args.compile, decode_steps=args.decode_steps)


def cmd_serve(args: argparse.Namespace) -> None:
    import uvicorn

    from camelid.serve.app import create_app
    from camelid.serve.sessions import SessionStore

    check_flags(args)
    keys = api_keys(args)
    check_port_free(args.host, args.port)
    backend = build_backend(args)  # first: a model that fails to load leaves no database file behind
    try:
        sessions = SessionStore(args.db) if args.db != "none" else None
    except BaseException:
        asyncio.run(backend.close())
        raise
    app = create_app(backend, api_keys=keys, sessions=sessions, max_body_bytes=args.max_body_bytes)
    names = ", ".join(m["id"] for m in backend.models()) if not args.controller else f"workers of {args.controller}"
    print(f"camelid serve: {names} on http://{args.host}:{args.port} (OpenAI API under /v1, chat page at /)",
          flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=5)


def register(verbs, fmt) -> None:
    """Add this module's verbs to the `camelid` parser."""
    p = verbs.add_parser("serve", help="OpenAI-compatible HTTP server with chat sessions and a web chat page",
                         formatter_class=fmt, epilog=textwrap.dedent("""\
        Endpoints: /v1/models, /v1/completions, /v1/chat/completions (stream: true = SSE), /v1/sessions,
        /health, /metrics (Prometheus), /docs and /openapi.json, and the chat page at /.
        A LoRA adapter is its own model name. With API keys (--api-key, --api-key-file, or $CAMELID_API_KEYS
        comma-separated), every /v1 request needs Authorization: Bearer KEY, and each key sees only its own chat
        sessions. With --controller, --cluster-token (or $CAMELID_CLUSTER_TOKEN) is the cluster's shared secret.

        examples:
          camelid serve --model out/final --port 8000
          camelid serve --model base --adapter sql=runs/sql/final --api-key-file keys.txt
          camelid serve --model base --db postgresql://camelid@db/chats
          camelid serve --controller http://127.0.0.1:21001
        """))
    p.add_argument("--model", default=None, help="model folder (Hugging Face layout) served by this process")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR",
                   help="a PEFT LoRA folder served as model NAME (repeatable)")
    p.add_argument("--name", default=None, help="the base model's name in the API (default: the folder's name)")
    p.add_argument("--template", default=None, help="chat template name; an adapter's recorded template comes "
                   "first (default: the one `camelid finetune` recorded in the model folder, else the tokenizer's "
                   "chat_template)")
    p.add_argument("--controller", default=None, metavar="URL",
                   help="route requests to the workers registered with this controller instead of --model")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=port_number, default=8000)
    p.add_argument("--api-key", action="append", default=[], metavar="KEY",
                   help="accept this key (repeatable; visible in `ps`: prefer --api-key-file or $CAMELID_API_KEYS); "
                   "no key at all = open, one anonymous user")
    p.add_argument("--api-key-file", default=None, metavar="FILE", help="accept the keys in FILE (one a line)")
    p.add_argument("--cluster-token", default=None, metavar="TOKEN",
                   help="with --controller: the cluster's shared secret (default: $CAMELID_CLUSTER_TOKEN)")
    p.add_argument("--db", default=DEFAULT_DB, help=f"chat sessions database: sqlite:///FILE or postgresql://... "
                   f"('none' = no sessions; default {DEFAULT_DB})")
    p.add_argument("--kv-cache-memory", default=None, metavar="SIZE",
                   help="KV cache size (4GB, 512MB; default: 90%% of free GPU memory, 1 GiB on CPU)")
    p.add_argument("--max-num-seqs", type=int, default=256, help="most sequences in one batch (default 256)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the decode forward the CUDA graphs replay (fewer, fused kernels a step; "
                        "minutes more at start)")
    p.add_argument("--decode-steps", type=int, default=1, metavar="K",
                   help="run decode-only steps K at a time on the device, one sync each (throughput; tokens then "
                        "stream K at a time; default 1)")
    p.add_argument("--dtype", default=None, help="bfloat16 / float16 / float32 (default: the checkpoint's)")
    p.add_argument("--device", default=None, help="cuda / cpu (default: cuda when available)")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20, help="larger request bodies get 413 (default 1 MiB)")
    p.add_argument("--log-level", default="info", choices=LOG_LEVELS)
    p.set_defaults(func=cmd_serve)
