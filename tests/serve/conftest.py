"""Fixtures of the serving tests: a tiny chat model folder, servers on free loopback ports, and a real PostgreSQL
(initdb + pg_ctl on a temp dir, as a non-root user when we run as root; skipped when the binaries are missing)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest

from server_zoo import TEMPLATE, ServerThread, make_chat_model


@pytest.fixture(scope="session")
def chat_model_dir(tmp_path_factory) -> Path:
    return make_chat_model(tmp_path_factory.mktemp("serve-model") / "tiny")


@pytest.fixture(scope="module")
def start_server(chat_model_dir):
    """start_server(api_keys=None, db=None, adapters=None) -> ServerThread over a fresh LocalBackend; all are
    stopped at the module's end."""
    from camelid.serve.app import create_app
    from camelid.serve.backend import LocalBackend
    from camelid.serve.sessions import SessionStore

    running: list[ServerThread] = []

    def start(api_keys=None, db: str | None = None, adapters: dict | None = None, **app_kwargs) -> ServerThread:
        backend = LocalBackend.load(chat_model_dir, adapters, name="tiny", template=TEMPLATE)
        server = ServerThread(create_app(backend, api_keys=api_keys, sessions=SessionStore(db) if db else None,
                                         **app_kwargs))
        server.backend = backend
        running.append(server)
        return server

    yield start
    for server in running:
        server.stop()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pg_binary(name: str) -> str | None:
    return shutil.which(name) or next((str(p) for p in [Path("/usr/local/bin") / name] if p.is_file()), None)


@pytest.fixture(scope="session")
def postgres_url():
    """postgresql://... of a throwaway server, or skip."""
    pytest.importorskip("psycopg")
    initdb, pg_ctl = _pg_binary("initdb"), _pg_binary("pg_ctl")
    if not initdb or not pg_ctl:
        pytest.skip("PostgreSQL binaries (initdb, pg_ctl) are not installed")
    # not under pytest's base temp: pytest keeps that 0700 for root, which the postgres user could not traverse
    root = Path(tempfile.mkdtemp(prefix="camelid-pg-"))
    as_user: list[str] = []
    if os.geteuid() == 0:  # initdb refuses to run as root
        runuser = shutil.which("runuser")
        if runuser is None:
            shutil.rmtree(root)
            pytest.skip("running as root without runuser: cannot start PostgreSQL as another user")
        as_user = [runuser, "-u", "nobody", "--"]
        shutil.chown(root, "nobody")
    data, port = root / "data", _free_port()
    subprocess.run([*as_user, initdb, "-D", str(data), "-A", "trust", "-U", "camelid"], check=True,
                   capture_output=True)
    # fsync stays on: the restart tests rely on PostgreSQL's own durability
    subprocess.run([*as_user, pg_ctl, "-D", str(data), "-l", str(root / "log"), "-w", "-o",
                    f"-p {port} -k {root} -c listen_addresses=127.0.0.1", "start"], check=True, capture_output=True)
    try:
        yield f"postgresql://camelid@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*as_user, pg_ctl, "-D", str(data), "-m", "immediate", "-w", "stop"], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path):
    """A fresh, empty session database of each kind (PostgreSQL: a new database on the shared server)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/chats.db"
    base = request.getfixturevalue("postgres_url")
    import psycopg

    name = f"t_{os.urandom(6).hex()}"
    with psycopg.connect(base, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return base.rsplit("/", 1)[0] + f"/{name}"
