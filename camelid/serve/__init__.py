"""Serving: an OpenAI-compatible HTTP API (app.py) over a Backend (backend.py: the engine in this process;
remote.py: workers behind a controller), with per-user chat sessions in SQLite or PostgreSQL (sessions.py)."""

from camelid.serve.backend import Backend, BackendError, Chunk, LocalBackend
from camelid.serve.sessions import SessionStore

__all__ = ["Backend", "BackendError", "Chunk", "LocalBackend", "SessionStore", "create_app"]


def create_app(*args, **kwargs):
    """camelid.serve.app.create_app, imported on first use (FastAPI is only needed to serve)."""
    from camelid.serve.app import create_app as make

    return make(*args, **kwargs)
