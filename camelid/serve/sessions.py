"""Chat sessions: each user's conversations, stored in SQLite (one file, WAL) or PostgreSQL (psycopg 3), by URL.

    sqlite:///camelid-chats.db    (a relative path)    sqlite:////abs/path.db    sqlite:///:memory:
    postgresql://user:pass@host:port/dbname

Every write is its own committed transaction before the call returns, so what the server has acknowledged
survives a kill -9 (SQLite: WAL + synchronous=FULL; PostgreSQL: its commit). PostgreSQL text cannot hold U+0000
(a model's answer can: byte-level tokenizers have a token for it), so both stores keep it as U+FFFD. A user only
ever reaches their own sessions: every query filters on user_id, and another user's session id reads as "not found".

The methods are blocking; the app calls them from a worker thread. One connection is shared under a lock: the
statements are tiny, and one connection keeps SQLite's single-writer rule trivially true.
"""

from __future__ import annotations

import sqlite3
import threading
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

_SCHEMA = [
    """CREATE TABLE IF NOT EXISTS sessions (
        id TEXT PRIMARY KEY,
        user_id TEXT NOT NULL,
        title TEXT NOT NULL,
        model TEXT,
        system_prompt TEXT,
        created_at DOUBLE PRECISION NOT NULL,
        updated_at DOUBLE PRECISION NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS sessions_by_user ON sessions (user_id, updated_at)",
    """CREATE TABLE IF NOT EXISTS messages (
        session_id TEXT NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
        seq INTEGER NOT NULL,
        role TEXT NOT NULL,
        content TEXT NOT NULL,
        created_at DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (session_id, seq))""",
]
_SESSION_COLUMNS = "id, title, model, system_prompt, created_at, updated_at"
DEFAULT_TITLE = "New chat"


class SessionStore:
    """create / list / get / update / delete sessions and append messages, per user."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._lock = threading.Lock()
        self._closed = False
        self.kind = check_url(url)
        self._conn = _open_sqlite(url) if self.kind == "sqlite" else _open_postgres(url)
        try:
            with self._lock:
                self._transaction(lambda cur: [cur.execute(s) for s in _SCHEMA])
        except sqlite3.OperationalError as e:  # another process holding the write lock past busy_timeout
            self.close()
            raise ValueError(f"cannot open the session database {url!r}: {e}") from None
        except BaseException:  # a read-only file, a database without rights: no connection left behind
            self.close()
            raise

    # ---- plumbing ---------------------------------------------------------------------------------------------------

    def _sql(self, sql: str) -> str:
        return sql.replace("?", "%s") if self.kind == "postgresql" else sql

    def _transaction(self, body):
        """Run body(cursor) in one committed transaction (rolled back if it raises)."""
        if self._closed:  # e.g. a streamed answer saved after the server's shutdown closed the store
            raise RuntimeError("the session store is closed")
        if self.kind == "sqlite":
            with self._conn:  # commits, or rolls back on an exception
                return body(self._conn.cursor())
        if self._conn.broken:  # the database restarted: the call that saw it failed, this one reconnects
            self._conn.close()  # (never a retry: a write may have committed)
            self._conn = _open_postgres(self.url)
        with self._conn.transaction(), self._conn.cursor() as cur:
            return body(cur)

    def _execute(self, sql: str, args: tuple = ()) -> list[tuple]:
        def run(cur):
            cur.execute(self._sql(sql), args)
            return cur.fetchall() if cur.description else []
        with self._lock:
            return self._transaction(run)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._conn.close()

    # ---- sessions ---------------------------------------------------------------------------------------------------

    def create(self, user: str, title: str | None = None, model: str | None = None,
               system_prompt: str | None = None) -> dict[str, Any]:
        title, model, system_prompt = _text(title), _text(model), _text(system_prompt)
        now = time.time()
        sid = uuid.uuid4().hex
        self._execute(f"INSERT INTO sessions ({_SESSION_COLUMNS}, user_id) VALUES (?, ?, ?, ?, ?, ?, ?)",
                      (sid, title or DEFAULT_TITLE, model, system_prompt, now, now, user))
        return {"id": sid, "title": title or DEFAULT_TITLE, "model": model, "system_prompt": system_prompt,
                "created_at": now, "updated_at": now}

    def list(self, user: str) -> list[dict[str, Any]]:
        rows = self._execute(f"SELECT {_SESSION_COLUMNS} FROM sessions WHERE user_id = ? "
                             "ORDER BY updated_at DESC, created_at DESC", (user,))
        return [_session(r) for r in rows]

    def get(self, user: str, session_id: str, with_messages: bool = True) -> dict[str, Any] | None:
        rows = self._execute(f"SELECT {_SESSION_COLUMNS} FROM sessions WHERE id = ? AND user_id = ?",
                             (session_id, user))
        if not rows:
            return None
        session = _session(rows[0])
        if with_messages:
            msgs = self._execute("SELECT role, content, created_at FROM messages WHERE session_id = ? ORDER BY seq",
                                 (session_id,))
            session["messages"] = [{"role": r, "content": c, "created_at": t} for r, c, t in msgs]
        return session

    def update(self, user: str, session_id: str, **fields: Any) -> dict[str, Any] | None:
        """Set title / model / system_prompt (the ones given, None values skipped); None when not found."""
        fields = {k: _text(v) for k, v in fields.items() if v is not None}
        unknown = set(fields) - {"title", "model", "system_prompt"}
        if unknown:
            raise ValueError(f"cannot update session field(s) {sorted(unknown)}")
        if "title" in fields:
            fields["title"] = fields["title"] or DEFAULT_TITLE  # as create: a session is never listed without a name
        sets = "".join(f", {k} = ?" for k in fields)
        rows = self._execute(f"UPDATE sessions SET updated_at = ?{sets} WHERE id = ? AND user_id = ? RETURNING id",
                             (time.time(), *fields.values(), session_id, user))
        return self.get(user, session_id, with_messages=False) if rows else None

    def delete(self, user: str, session_id: str) -> bool:
        def run(cur):
            cur.execute(self._sql("DELETE FROM messages WHERE session_id IN "
                                  "(SELECT id FROM sessions WHERE id = ? AND user_id = ?)"), (session_id, user))
            cur.execute(self._sql("DELETE FROM sessions WHERE id = ? AND user_id = ? RETURNING id"),
                        (session_id, user))
            return bool(cur.fetchall())
        with self._lock:
            return self._transaction(run)

    def append(self, user: str, session_id: str, messages: list[dict[str, str]]) -> bool:
        """Append messages [{role, content}] in one transaction; False when the session is not the user's."""
        def run(cur):
            now = time.time()
            cur.execute(self._sql("UPDATE sessions SET updated_at = ? WHERE id = ? AND user_id = ? RETURNING id"),
                        (now, session_id, user))
            if not cur.fetchall():
                return False
            cur.execute(self._sql("SELECT COALESCE(MAX(seq), -1) FROM messages WHERE session_id = ?"), (session_id,))
            seq = cur.fetchall()[0][0] + 1
            for k, m in enumerate(messages):
                cur.execute(self._sql("INSERT INTO messages (session_id, seq, role, content, created_at) "
                                      "VALUES (?, ?, ?, ?, ?)"),
                            (session_id, seq + k, _text(m["role"]), _text(m["content"]), now))
            return True
        with self._lock:
            return self._transaction(run)


def check_url(url: str) -> str:
    """"sqlite" or "postgresql" for a session database URL (nothing is opened); ValueError for another kind."""
    scheme = urlparse(url).scheme
    if scheme == "sqlite":
        return "sqlite"
    if scheme in ("postgresql", "postgres"):
        return "postgresql"
    raise ValueError(f"unknown session database URL {url!r}: use sqlite:///FILE or postgresql://...")


def _text(value: Any) -> Any:
    """A string as the store keeps it: U+0000, which PostgreSQL text refuses, becomes U+FFFD."""
    return value.replace("\x00", "\ufffd") if isinstance(value, str) else value


def _session(row: tuple) -> dict[str, Any]:
    sid, title, model, system_prompt, created, updated = row
    return {"id": sid, "title": title, "model": model, "system_prompt": system_prompt, "created_at": float(created),
            "updated_at": float(updated)}


def _open_sqlite(url: str) -> sqlite3.Connection:
    path = url[len("sqlite://"):]
    path = path[1:] if path.startswith("/") else path  # sqlite:///rel.db -> rel.db, sqlite:////abs.db -> /abs.db
    if not path:
        raise ValueError(f"session database URL {url!r} names no file: use sqlite:///FILE")
    if path != ":memory:":
        parent = Path(path).parent
        if not parent.is_dir():
            raise FileNotFoundError(f"the folder of the session database {path!r} does not exist")
    # with conn: commits each transaction; python opens it (BEGIN) before the first write
    try:
        conn = sqlite3.connect(path, check_same_thread=False, isolation_level="DEFERRED")
    except sqlite3.OperationalError as e:  # a folder, a place without write access: the user's --db, not a bug
        raise ValueError(f"cannot open the session database {path!r}: {e}") from None
    try:
        conn.execute("PRAGMA journal_mode=WAL")  # readers do not block the writer; one file plus its -wal
        conn.execute("PRAGMA synchronous=FULL")  # fsync the WAL at every commit: an acknowledged write survives
        conn.execute("PRAGMA foreign_keys=ON")
        conn.execute("PRAGMA busy_timeout=5000")  # another process (a second server) holding the write lock: wait
    except sqlite3.DatabaseError as e:  # also "file is not a database": --db names some other file
        conn.close()
        raise ValueError(f"cannot open the session database {path!r}: {e}") from None
    return conn


def _open_postgres(url: str):
    try:
        import psycopg
    except ImportError:
        raise ValueError("a postgresql:// session database needs psycopg 3: pip install 'psycopg[binary]'") from None
    return psycopg.connect(url, autocommit=True)  # transactions are explicit (conn.transaction())
