"""Chat sessions on SQLite and on a real PostgreSQL: the store, the HTTP API, history in follow-up turns (and the
prefix cache skipping it), trimming that keeps the system prompt, and durability across restarts and kill -9."""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from camelid.serve.sessions import DEFAULT_TITLE, SessionStore
from camelid.templates import get_template
from camelid.tokenizer import Tokenizer
from server_zoo import TEMPLATE

SYSTEM = "You are a camel who answers every question about deserts."


# ---- the store -------------------------------------------------------------------------------------------------------

def test_store_crud_and_isolation(db_url):
    store = SessionStore(db_url)
    a1 = store.create("alice", "first", "tiny", "be brief")
    time.sleep(0.01)
    a2 = store.create("alice")
    b1 = store.create("bob", "bob's")
    assert a2["title"] == DEFAULT_TITLE and a2["system_prompt"] is None
    assert [s["id"] for s in store.list("alice")] == [a2["id"], a1["id"]]  # newest first
    assert [s["id"] for s in store.list("bob")] == [b1["id"]]

    assert store.append("alice", a1["id"], [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}])
    assert store.append("alice", a1["id"], [{"role": "user", "content": "again"}])
    got = store.get("alice", a1["id"])
    assert [(m["role"], m["content"]) for m in got["messages"]] == [("user", "hi"), ("assistant", "yo"),
                                                                     ("user", "again")]
    assert got["system_prompt"] == "be brief" and got["model"] == "tiny"
    assert [s["id"] for s in store.list("alice")][0] == a1["id"]  # a new message moves it to the top

    updated = store.update("alice", a1["id"], title="renamed", system_prompt="be verbose")
    assert updated["title"] == "renamed" and updated["system_prompt"] == "be verbose"
    assert updated["updated_at"] >= got["updated_at"]
    assert store.update("alice", a1["id"], title="")["title"] == DEFAULT_TITLE  # as create names an untitled one

    # bob reaches none of alice's sessions, by any method
    assert store.get("bob", a1["id"]) is None
    assert store.update("bob", a1["id"], title="mine") is None
    assert not store.append("bob", a1["id"], [{"role": "user", "content": "intruder"}])
    assert not store.delete("bob", a1["id"])
    assert len(store.get("alice", a1["id"])["messages"]) == 3

    assert store.delete("alice", a1["id"])
    assert store.get("alice", a1["id"]) is None
    assert not store.delete("alice", a1["id"])
    assert [s["id"] for s in store.list("alice")] == [a2["id"]]
    store.close()

    reopened = SessionStore(db_url)  # written data is on disk, not in the connection
    assert [s["id"] for s in reopened.list("alice")] == [a2["id"]]
    assert reopened.get("bob", b1["id"])["title"] == "bob's"
    reopened.close()


def test_nul_characters_are_stored_as_replacement_characters(db_url):
    """A model's answer (a byte-level token) or a user's text may hold U+0000, which PostgreSQL text refuses (it
    raised DataError: a 500 mid-chat); both stores keep U+FFFD in its place, everywhere text is written."""
    store = SessionStore(db_url)
    try:
        sid = store.create("u", title="a\x00b", system_prompt="s\x00")["id"]
        assert store.append("u", sid, [{"role": "user", "content": "hi\x00"}, {"role": "assistant", "content": "\x00x"}])
        store.update("u", sid, title="t\x00")
        got = store.get("u", sid)
        assert (got["title"], got["system_prompt"]) == ("t\ufffd", "s\ufffd")
        assert [m["content"] for m in got["messages"]] == ["hi\ufffd", "\ufffdx"]
    finally:
        store.close()


def test_store_rejects_bad_urls(tmp_path):
    with pytest.raises(ValueError, match="unknown session database URL"):
        SessionStore("mysql://x")
    with pytest.raises(FileNotFoundError):
        SessionStore(f"sqlite:///{tmp_path}/missing/dir/chats.db")
    # a folder, or a file SQLite cannot open: the one-line error of a bad --db (exit 2), not an sqlite3 traceback
    (tmp_path / "not-sqlite.db").write_bytes(b"\x00camelid" * 600)  # not a database: --db names the wrong file
    for where in (tmp_path, "/proc/chats.db", tmp_path / "not-sqlite.db"):
        with pytest.raises(ValueError, match="cannot open the session database"):
            SessionStore(f"sqlite:///{where}")


def test_a_closed_store_refuses_and_does_not_reconnect(db_url):
    """A streamed answer saved after the server's shutdown closed the store must not open a new connection."""
    store = SessionStore(db_url)
    sid = store.create("u")["id"]
    conn = store._conn
    store.close()
    with pytest.raises(RuntimeError, match="closed"):
        store.append("u", sid, [{"role": "user", "content": "late"}])
    assert store._conn is conn  # still the closed one: nothing was reopened (and leaked)


def test_a_failed_schema_creation_closes_the_connection(tmp_path, monkeypatch):
    import camelid.serve.sessions as sessions

    opened = []
    open_sqlite = sessions._open_sqlite
    monkeypatch.setattr(sessions, "_open_sqlite", lambda url: opened.append(open_sqlite(url)) or opened[-1])
    monkeypatch.setattr(sessions, "_SCHEMA", [*sessions._SCHEMA, "CREATE TABLE broken ("])
    with pytest.raises(Exception, match="syntax error|incomplete input"):
        SessionStore(f"sqlite:///{tmp_path}/chats.db")
    with pytest.raises(Exception, match="closed"):  # sqlite3.ProgrammingError on a closed connection
        opened[0].execute("SELECT 1")


def test_a_database_locked_at_start_is_a_one_line_error(tmp_path, monkeypatch):
    # another server holding the write lock past the busy timeout: the --db error (exit 2), not a traceback
    import camelid.serve.sessions as sessions

    url = f"sqlite:///{tmp_path}/chats.db"
    SessionStore(url).close()  # WAL from now on: opening reads through the lock, creating the tables does not
    open_sqlite = sessions._open_sqlite
    monkeypatch.setattr(sessions, "_open_sqlite", lambda url: _impatient(open_sqlite(url)))
    monkeypatch.setattr(sessions, "_SCHEMA", [*sessions._SCHEMA, "CREATE TABLE IF NOT EXISTS newer (x)"])
    other = sqlite3.connect(tmp_path / "chats.db", isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    with pytest.raises(ValueError, match="cannot open the session database .*locked"):
        SessionStore(url)
    other.execute("ROLLBACK")


def _impatient(conn):
    conn.execute("PRAGMA busy_timeout=50")
    return conn


def test_sqlite_is_in_wal_mode(tmp_path):
    store = SessionStore(f"sqlite:///{tmp_path}/chats.db")
    assert store._conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    store.create("u")
    assert (tmp_path / "chats.db-wal").exists()
    store.close()


# ---- over HTTP -------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def chat_tools(chat_model_dir):
    tokenizer = Tokenizer(chat_model_dir)
    tpl = get_template(TEMPLATE)
    return lambda messages: len(tpl.encode_prompt(tokenizer, messages))


def _stream_turn(http: httpx.Client, body: dict) -> tuple[str, dict]:
    text, usage = "", None
    with http.stream("POST", "/v1/chat/completions", json={**body, "stream": True,
                                                           "stream_options": {"include_usage": True}}) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = httpx.Response(200, content=line[6:]).json()
            assert event.get("session_id") == body["session_id"]
            usage = event.get("usage") or usage
            text += "".join(c["delta"].get("content", "") for c in event["choices"])
    return text, usage


def test_session_turns_history_prefix_cache_and_restart(start_server, db_url, chat_tools):
    server = start_server(db=db_url)
    http = httpx.Client(base_url=server.url, timeout=60)
    session = http.post("/v1/sessions", json={"system_prompt": SYSTEM, "model": "tiny"}).json()
    sid = session["id"]
    assert session["title"] == DEFAULT_TITLE and session["system_prompt"] == SYSTEM

    turn1 = [{"role": "user", "content": "Where do camels live?"}]
    r1 = http.post("/v1/chat/completions", json={"model": "tiny", "messages": turn1, "max_tokens": 12,
                                                 "temperature": 0, "session_id": sid}).json()
    assert r1["session_id"] == sid
    answer1 = r1["choices"][0]["message"]["content"]
    assert r1["usage"]["prompt_tokens"] == chat_tools([{"role": "system", "content": SYSTEM}, *turn1])

    hits = server.backend.stats()["prefix_cache_hit_tokens"]
    turn2 = [{"role": "user", "content": "And what do they eat?"}]
    answer2, usage2 = _stream_turn(http, {"model": "tiny", "messages": turn2, "max_tokens": 12, "temperature": 0,
                                          "session_id": sid})
    full = [{"role": "system", "content": SYSTEM}, *turn1, {"role": "assistant", "content": answer1}, *turn2]
    assert usage2["prompt_tokens"] == chat_tools(full)  # the prompt holds the system prompt and the history
    # the engine's prefix cache served the history it had computed for turn 1 (whole blocks of it)
    gained = server.backend.stats()["prefix_cache_hit_tokens"] - hits
    assert gained >= 16 * ((r1["usage"]["prompt_tokens"] - 1) // 16)
    assert gained >= 16

    stored = http.get(f"/v1/sessions/{sid}").json()
    assert [(m["role"], m["content"]) for m in stored["messages"]] == [
        ("user", turn1[0]["content"]), ("assistant", answer1), ("user", turn2[0]["content"]), ("assistant", answer2)]
    assert stored["title"] == turn1[0]["content"]  # titled by its first message

    assert http.patch(f"/v1/sessions/{sid}", json={"title": "Camels"}).json()["title"] == "Camels"
    other = http.post("/v1/sessions", json={"title": "to delete"}).json()["id"]
    listed = http.get("/v1/sessions").json()["data"]
    assert [s["id"] for s in listed] == [other, sid]
    assert http.delete(f"/v1/sessions/{other}").json() == {"id": other, "deleted": True}
    assert http.get(f"/v1/sessions/{other}").status_code == 404
    http.close()
    server.stop()

    # a new server over the same database finds everything the old one acknowledged
    again = start_server(db=db_url)
    with httpx.Client(base_url=again.url, timeout=60) as http:
        assert [s["id"] for s in http.get("/v1/sessions").json()["data"]] == [sid]
        after = http.get(f"/v1/sessions/{sid}").json()
        assert after["title"] == "Camels" and after["messages"] == stored["messages"]
    again.stop()


def test_history_is_trimmed_from_the_oldest_turns_keeping_the_system_prompt(start_server, db_url, chat_tools):
    server = start_server(db=db_url)
    sid = httpx.post(server.url + "/v1/sessions", json={"system_prompt": SYSTEM}).json()["id"]
    history = []
    for i in range(8):  # ~8 x 60 tokens: far more than the 256-token context
        history += [{"role": "user", "content": f"Question number {i}: tell me about dune {i}?"},
                    {"role": "assistant", "content": f"Answer number {i}: dune {i} is tall and sandy."}]
    writer = SessionStore(db_url)  # the history as an earlier conversation left it
    writer.append("anonymous", sid, history)
    writer.close()

    new = [{"role": "user", "content": "Which dune is tallest?"}]
    r = httpx.post(server.url + "/v1/chat/completions", timeout=60, json={
        "model": "tiny", "messages": new, "max_tokens": 8, "session_id": sid}).json()
    system = [{"role": "system", "content": SYSTEM}]
    # expected: the longest suffix of whole turns that fits the context next to max_tokens, after the system prompt
    fits = [k for k in range(0, len(history) + 1, 2) if chat_tools(system + history[k:] + new) <= 256 - 8]
    assert 0 < fits[0] < len(history)  # some turns were dropped, some kept
    assert r["usage"]["prompt_tokens"] == chat_tools(system + history[fits[0]:] + new)
    # storage keeps everything: trimming only shapes the prompt
    stored = httpx.get(f"{server.url}/v1/sessions/{sid}").json()["messages"]
    assert len(stored) == len(history) + 2
    server.stop()


def test_an_aborted_stream_stores_what_was_produced(start_server, tmp_path):
    server = start_server(db=f"sqlite:///{tmp_path}/chats.db")
    sid = httpx.post(server.url + "/v1/sessions", json={}).json()["id"]
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Tell me a long story"}], "max_tokens": 200,
            "temperature": 0, "stream": True, "session_id": sid}
    received = ""
    with httpx.Client(timeout=30) as http, http.stream("POST", server.url + "/v1/chat/completions", json=body) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                received += "".join(c["delta"].get("content", "") for c in
                                    httpx.Response(200, content=line[6:]).json()["choices"])
            if len(received) >= 3:
                break
    deadline = time.monotonic() + 10
    while len(messages := httpx.get(f"{server.url}/v1/sessions/{sid}").json()["messages"]) < 2:
        assert time.monotonic() < deadline, "the aborted turn was not stored"
        time.sleep(0.05)
    assert messages[0] == {**messages[0], "role": "user", "content": "Tell me a long story"}
    assert messages[1]["role"] == "assistant" and messages[1]["content"].startswith(received)
    s = server.backend.stats()
    assert s["num_running"] == 0 and s["num_free_blocks"] == s["num_blocks"]
    server.stop()


def test_a_streamed_turn_is_stored_before_done_and_a_failed_save_is_reported(start_server, tmp_path):
    # [DONE] acknowledges the turn: it must already be committed (a kill -9 right after must not lose it), and a
    # turn that could not be stored must say so in the stream instead of ending as if all were well
    db = tmp_path / "chats.db"
    server = start_server(db=f"sqlite:///{db}")
    sid = httpx.post(server.url + "/v1/sessions", json={}).json()["id"]
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "stream": True,
            "session_id": sid}
    httpx.post(server.url + "/v1/chat/completions", json={**body, "stream": False, "session_id": None}, timeout=30)
    lock = sqlite3.connect(db, isolation_level=None, check_same_thread=False)  # another writer, for a while
    lock.execute("BEGIN IMMEDIATE")
    threading.Timer(1.0, lambda: lock.execute("ROLLBACK")).start()
    with httpx.Client(timeout=30) as http, http.stream("POST", server.url + "/v1/chat/completions", json=body) as r:
        for line in r.iter_lines():
            if line == "data: [DONE]":  # read beside the server (its own reads wait behind its write)
                assert sqlite3.connect(db).execute("SELECT COUNT(*) FROM messages").fetchall() == [(2,)]
    server.server.config.app.state.sessions._conn.execute("PRAGMA busy_timeout=100")
    lock.execute("BEGIN IMMEDIATE")  # now held past the store's patience
    with httpx.Client(timeout=30) as http, http.stream("POST", server.url + "/v1/chat/completions", json=body) as r:
        events = [line for line in r.iter_lines() if line.startswith("data: ")]
    lock.execute("ROLLBACK")
    assert events[-1] == "data: [DONE]" and "could not be stored" in events[-2]
    assert len(httpx.get(f"{server.url}/v1/sessions/{sid}").json()["messages"]) == 2
    server.stop()


def test_a_system_message_in_a_follow_up_turn_replaces_the_session_prompt(start_server, tmp_path, chat_tools):
    # OpenAI-style clients send their system message with every turn: it goes first, ahead of the stored history
    server = start_server(db=f"sqlite:///{tmp_path}/chats.db")
    http = httpx.Client(base_url=server.url, timeout=60)
    sid = http.post("/v1/sessions", json={"system_prompt": SYSTEM}).json()["id"]
    system = [{"role": "system", "content": "Answer in one word."}]
    history: list[dict] = []
    for question in ("Where do camels live?", "What do they eat?"):
        turn = [{"role": "user", "content": question}]
        r = http.post("/v1/chat/completions", json={"model": "tiny", "messages": system + turn, "max_tokens": 4,
                                                    "temperature": 0, "session_id": sid})
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["prompt_tokens"] == chat_tools(system + history + turn)
        history += [*turn, {"role": "assistant", "content": r.json()["choices"][0]["message"]["content"]}]
    stored = http.get(f"/v1/sessions/{sid}").json()
    assert [m["role"] for m in stored["messages"]] == ["user", "assistant"] * 2 and stored["system_prompt"] == SYSTEM
    http.close()
    server.stop()


# ---- kill -9 -----------------------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(model_dir: Path, db: str, port: int) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "camelid", "serve", "--model", str(model_dir), "--name", "tiny",
                             "--template", TEMPLATE, "--db", db, "--port", str(port), "--log-level", "warning"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise RuntimeError(f"camelid serve exited: {proc.stderr.read().decode()}")
        assert time.monotonic() < deadline, "camelid serve did not start"
        time.sleep(0.1)


@pytest.mark.slow
def test_sessions_survive_kill_9(chat_model_dir, db_url):
    port = _free_port()
    proc = _serve(chat_model_dir, db_url, port)
    url = f"http://127.0.0.1:{port}"
    written = {}
    try:
        for i in range(3):
            sid = httpx.post(url + "/v1/sessions", json={"title": f"chat {i}", "system_prompt": SYSTEM}).json()["id"]
            r = httpx.post(url + "/v1/chat/completions", timeout=60, json={
                "model": "tiny", "messages": [{"role": "user", "content": f"hello {i}"}], "max_tokens": 4,
                "session_id": sid})
            if r.status_code != 200:  # the server's own account of it: its stderr, after it is gone
                proc.kill()
                pytest.fail(f"{r.status_code} {r.text}\nserver stderr:\n{proc.communicate()[1].decode()[-3000:]}")
            written[sid] = httpx.get(f"{url}/v1/sessions/{sid}").json()
    finally:
        proc.send_signal(signal.SIGKILL)  # no shutdown, no flush, no close
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    # what the killed server acknowledged is in the database (read by a fresh connection, as the next server would)
    store = SessionStore(db_url)
    try:
        assert {s["id"] for s in store.list("anonymous")} == set(written)
        for sid, before in written.items():
            assert store.get("anonymous", sid) == before
            assert [m["role"] for m in before["messages"]] == ["user", "assistant"]
    finally:
        store.close()


def test_a_lost_postgres_connection_is_one_clean_error_then_reconnects(start_server, postgres_url):
    import psycopg

    server = start_server(db=postgres_url)
    sid = httpx.post(server.url + "/v1/sessions", json={"title": "kept"}).json()["id"]
    store = server.server.config.app.state.sessions
    with psycopg.connect(postgres_url, autocommit=True) as admin:  # as a database restart would
        admin.execute("SELECT pg_terminate_backend(%s)", (store._conn.info.backend_pid,))
    r = httpx.get(server.url + "/v1/sessions")
    assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"  # shaped, and not a hang
    r = httpx.get(server.url + "/v1/sessions")
    assert r.status_code == 200 and sid in [s["id"] for s in r.json()["data"]]
    server.stop()


# ---- what a turn that did not finish leaves in the session ---------------------------------------------------------

async def _half_then(prompt: str):
    """One chunk of answer, then a failure ("fail") or nothing more until the client leaves ("stop")."""
    import asyncio

    from camelid.serve.backend import BackendError, Chunk

    yield Chunk(0, "Half", [1], None, 3, 1)
    if prompt == "fail":
        raise BackendError(502, "worker w1 stopped answering during the request", type="server_error")
    await asyncio.Event().wait()


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_streamed_and_plain_turns_store_the_same_history(tmp_path, stream):
    """Streamed or not, one rule: a turn the client stopped keeps what was produced; one the server failed is not
    stored (the session stays as it was)."""
    from camelid.serve.app import create_app
    from server_zoo import FakeBackend, ServerThread

    server = ServerThread(create_app(FakeBackend(_half_then), sessions=SessionStore(f"sqlite:///{tmp_path}/c.db")))
    try:
        def ask(sid: str, text: str) -> None:
            body = {"model": "tiny", "messages": [{"role": "user", "content": text}], "max_tokens": 8,
                    "session_id": sid, "stream": stream}
            with httpx.Client(timeout=1.0) as http:
                if stream:
                    with http.stream("POST", server.url + "/v1/chat/completions", json=body) as r:
                        for line in r.iter_lines():
                            if '"Half"' in line or "error" in line:
                                break
                else:
                    try:
                        r = http.post(server.url + "/v1/chat/completions", json=body)
                        assert r.status_code == 502, r.text
                    except httpx.ReadTimeout:  # "stop": the client gives up, as a timeout would
                        pass

        def messages(sid: str, expected: int) -> list:
            deadline = time.monotonic() + 5
            while len(got := httpx.get(f"{server.url}/v1/sessions/{sid}").json()["messages"]) < expected:
                assert time.monotonic() < deadline, got
                time.sleep(0.05)
            return [(m["role"], m["content"]) for m in got]

        failed, stopped = (httpx.post(server.url + "/v1/sessions", json={}).json()["id"] for _ in range(2))
        ask(failed, "fail")
        ask(stopped, "stop")
        assert messages(stopped, 2) == [("user", "stop"), ("assistant", "Half")]
        assert messages(failed, 0) == []
    finally:
        server.stop()


def test_trimming_a_long_history_counts_tokens_a_logarithmic_number_of_times(tmp_path):
    """40 stored turns, most of which must go: the kept turns are exactly the longest suffix of whole turns that
    fits (as dropping them one by one would find), with about log2(40) token counts instead of one per dropped turn."""
    import math

    from camelid.serve.app import create_app
    from camelid.serve.backend import Chunk
    from server_zoo import CONTEXT, FakeBackend, ServerThread

    async def answer(prompt: str):
        yield Chunk(0, "ok", [1], "stop", 1, 1)

    class CountingBackend(FakeBackend):  # one token per character, as FakeBackend; counts calls, keeps the prompt
        def __init__(self):
            super().__init__(answer)
            self.counted, self.prompts = 0, []

        def count_chat_tokens(self, model, messages):
            self.counted += 1
            return super().count_chat_tokens(model, messages)

        async def generate(self, model, prompt, messages, params, request_id):
            self.prompts.append(messages)
            async for chunk in super().generate(model, prompt, messages, params, request_id):
                yield chunk

    backend = CountingBackend()
    store = SessionStore(f"sqlite:///{tmp_path}/c.db")
    server = ServerThread(create_app(backend, sessions=store))
    try:
        system = [{"role": "system", "content": "S" * 10}]
        sid = httpx.post(server.url + "/v1/sessions", json={"system_prompt": system[0]["content"]}).json()["id"]
        history = []
        for i in range(40):  # turns of 18 to 31 characters: ~1000 in all, the context is 256
            history += [{"role": "user", "content": f"question {i}" + "?" * (i % 7)},
                        {"role": "assistant", "content": f"answer {i}" + "!" * (i % 5)}]
        store.append("anonymous", sid, history)
        new = [{"role": "user", "content": "last"}]
        budget = CONTEXT - 8

        def ask() -> list[dict]:
            backend.counted = 0
            r = httpx.post(server.url + "/v1/chat/completions", timeout=10, json={
                "model": "tiny", "messages": new, "max_tokens": 8, "session_id": sid})
            assert r.status_code == 200, r.text
            return [{"role": m["role"], "content": m["content"]} for m in backend.prompts[-1]]

        fits = [k for k in range(0, len(history) + 1, 2)
                if backend.count_chat_tokens("tiny", system + history[k:] + new) <= budget]
        assert len(history) // 2 < fits[0] < len(history)  # most turns dropped, some kept
        assert ask() == system + history[fits[0]:] + new
        assert backend.counted <= math.log2(40) + 2
        # a short history that fits whole: one count
        short = httpx.post(server.url + "/v1/sessions", json={"system_prompt": system[0]["content"]}).json()["id"]
        store.append("anonymous", short, history[:4])
        sid = short
        assert ask() == system + history[:4] + new
        assert backend.counted == 1
    finally:
        server.stop()
        store.close()
