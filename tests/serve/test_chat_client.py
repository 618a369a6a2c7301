"""`camelid chat --server URL`, the terminal client, against a real server on a loopback port: lines fed on stdin,
answers streamed to stdout, the history kept in a server session that a second run resumes with --session."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys

import httpx

from camelid.cli import main


def chat(*args: str, stdin: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "camelid", "chat", *args], input=stdin, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "CAMELID_API_KEY": ""})


def answers(stdout: str) -> list[str]:
    """The printed answers: each follows "bot> " and ends at the newline printed after it."""
    return re.findall(r"bot> (.*?)\n(?=you> |$)", stdout, flags=re.S)


def test_chat_with_a_server_session_and_resume_it(start_server, tmp_path, monkeypatch, capsys):
    server = start_server(db=f"sqlite:///{tmp_path}/chats.db")
    done = chat("--server", server.url, "--max-new-tokens", "12", "--system", "Be brief.",
                stdin="Hello there\n\nHow are you?\n/exit\n")
    assert done.returncode == 0, done.stderr
    session_id = re.search(r"session (\S+) \(resume it with --session", done.stderr).group(1)
    printed = answers(done.stdout)
    assert len(printed) == 2

    stored = httpx.get(f"{server.url}/v1/sessions/{session_id}").json()
    assert stored["system_prompt"] == "Be brief." and stored["model"] == "tiny"
    turns = [(m["role"], m["content"]) for m in stored["messages"] if m["role"] != "system"]
    assert [t[0] for t in turns] == ["user", "assistant", "user", "assistant"]
    assert [turns[0][1], turns[2][1]] == ["Hello there", "How are you?"]
    # what streamed to the terminal is what the server stored (the server may strip surrounding blanks)
    assert [a.strip() for a in printed] == [turns[1][1].strip(), turns[3][1].strip()]

    # greedy (the default): the first answer equals a plain non-streamed request with the same messages
    reference = httpx.post(f"{server.url}/v1/chat/completions", json={
        "model": "tiny", "max_tokens": 12, "temperature": 0,
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]}).json()
    assert reference["choices"][0]["message"]["content"].strip() == printed[0].strip()

    # resume the session (in-process this time: the subprocess above already proved the real command line)
    code, out, err = run_main(monkeypatch, capsys, ["--server", server.url, "--session", session_id,
                                                    "--max-new-tokens", "4"], "One more\n")
    assert code == 0 and "2 earlier turns" in err and len(answers(out)) == 1
    messages = httpx.get(f"{server.url}/v1/sessions/{session_id}").json()["messages"]
    assert [m["content"] for m in messages if m["role"] == "user"] == ["Hello there", "How are you?", "One more"]


def run_main(monkeypatch, capsys, argv: list[str], stdin: str = "") -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    monkeypatch.delenv("CAMELID_API_KEY", raising=False)
    code = main(["chat", *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_api_key_errors_and_a_server_without_sessions(start_server, monkeypatch, capsys):
    server = start_server(api_keys=["k1"])  # no --db: the client keeps the history itself
    code, _, err = run_main(monkeypatch, capsys, ["--server", server.url], "Hi\n")
    assert code == 2 and "API key" in err and "401" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_main(monkeypatch, capsys, ["--server", server.url, "--api-key", "k1", "--model", "nope"])
    assert code == 2 and "'nope' is not served" in err
    code, _, err = run_main(monkeypatch, capsys, ["--server", "http://127.0.0.1:9", "--model", "tiny"])
    assert code == 2 and "cannot reach the server" in err

    code, out, err = run_main(monkeypatch, capsys, ["--server", server.url, "--api-key", "k1", "--max-new-tokens", "3"],
                              "Hi\nAnd again\n")
    assert code == 0 and len(answers(out)) == 2 and "--session" not in err  # no session was made
    # a turn that cannot run (max_tokens beyond the context) is reported and the chat goes on
    code, out, err = run_main(monkeypatch, capsys, ["--server", server.url, "--api-key", "k1",
                                                    "--max-new-tokens", "100000"], "Hi\n/exit\n")
    assert code == 0 and "camelid chat: error:" in err and "max_tokens" in err


def test_local_only_flags_are_refused_with_a_server(monkeypatch, capsys):
    code, _, err = run_main(monkeypatch, capsys, ["--server", "http://127.0.0.1:9", "--adapter", "x"])
    assert code == 2 and "--adapter" in err
    code, _, err = run_main(monkeypatch, capsys, [])
    assert code == 2 and "--model DIR" in err



def test_a_session_id_that_is_not_one_is_a_one_line_error(start_server, tmp_path, monkeypatch, capsys):
    # the id goes into the URL path: "../models" must not reach /v1/models, nor "a?b" /v1/sessions/a
    server = start_server(db=f"sqlite:///{tmp_path}/chats.db")
    for bad in ("../models", "..", ".", "a?b#c", "a/b"):
        code, _, err = run_main(monkeypatch, capsys, ["--server", server.url, "--session", bad], "Hi\n")
        assert code == 2 and len(err.strip().splitlines()) == 1 and "session" in err, (bad, err)
    code, _, err = run_main(monkeypatch, capsys, ["--server", server.url, "--session", "a?b#c"], "Hi\n")
    assert "no session 'a?b#c'" in err


def test_ctrl_c_before_the_first_token_stops_the_answer_not_the_chat(monkeypatch):
    # the server sends its headers with the first token: a long prefill or a queue is a wait Ctrl-C must stop too
    from camelid.cli.cluster_verbs import ChatClient

    def interrupted(request: httpx.Request) -> httpx.Response:
        raise KeyboardInterrupt

    client = ChatClient("http://camelid.invalid")
    client.http = httpx.Client(base_url="http://camelid.invalid", transport=httpx.MockTransport(interrupted))
    out = io.StringIO()
    assert client.turn("tiny", "sid", "Hi", {}, out=out) == ""
    assert out.getvalue() == " [stopped]"
