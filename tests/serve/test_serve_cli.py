"""`camelid serve` flag handling: bad input is one line on stderr and exit code 2, before any model loads."""

from __future__ import annotations

import pytest

from camelid.cli import main


@pytest.mark.parametrize("argv,message", [
    (["serve"], "give --model DIR"),
    (["serve", "--model", "m", "--controller", "http://x"], "not both"),
    (["serve", "--model", "m", "--db", "mysql://x"], "unknown session database URL"),
    (["serve", "--model", "/no/such/model", "--db", "none"], "/no/such/model"),
    (["serve", "--model", "/no/such/model"], "/no/such/model"),  # the model loads before the database opens
    (["serve", "--model", "m", "--adapter", "a=x", "--adapter", "a=y"], "unique"),
    (["serve", "--controller", "http://x", "--compile"], "--compile builds a local engine"),
    (["serve", "--model", "m", "--decode-steps", "0"], "--decode-steps must be >= 1"),
    (["serve", "--controller", "http://x", "--decode-steps", "4"], "--decode-steps sets a local engine"),
    (["serve", "--model", "m", "--template", "chatmll"], "unknown chat template 'chatmll'"),  # not at the first chat
    (["serve", "--model", "m", "--device", "tpu"], "device 'tpu' is not one torch knows"),  # not torch's traceback
])
def test_bad_flags_exit_2(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default sqlite file would land here
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("camelid serve: error:") and message in err and err.count("\n") == 1
    if "--db" not in argv:
        assert not (tmp_path / "camelid-chats.db").exists()  # flags are checked before the database is opened


def test_adapter_flag_needs_name_equals_dir(capsys):
    assert main(["serve", "--model", "m", "--adapter", "just-a-dir"]) == 2
    assert "expected NAME=DIR" in capsys.readouterr().err


def test_api_keys_come_from_flags_a_file_and_the_environment(tmp_path, monkeypatch):
    from camelid.cli import build_parser
    from camelid.cli.serve_verbs import api_keys

    keys = tmp_path / "keys.txt"
    keys.write_text("# one key a line\nkey-from-file\n\n  other-file-key  \n")
    monkeypatch.setenv("CAMELID_API_KEYS", "env-a, env-b,,")
    args = build_parser().parse_args(["serve", "--model", "m", "--api-key", "flag-key", "--api-key-file", str(keys)])
    assert api_keys(args) == ["flag-key", "key-from-file", "other-file-key", "env-a", "env-b"]
    monkeypatch.delenv("CAMELID_API_KEYS")
    assert api_keys(build_parser().parse_args(["serve", "--model", "m"])) == []  # open, as documented
    keys.write_text("# nothing but comments\n\n")
    with pytest.raises(ValueError, match="holds no key"):  # never an open server by mistake
        api_keys(args)
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        api_keys(build_parser().parse_args(["serve", "--model", "m", "--api-key-file", str(tmp_path / "missing.txt")]))


def test_compile_flag_reaches_the_engine(monkeypatch):
    """`--compile` is LLM(compile=True): the decode graphs replay a torch.compile'd forward."""
    from camelid.cli import build_parser
    from camelid.cli.serve_verbs import build_backend
    from camelid.serve.backend import LocalBackend

    seen = {}
    monkeypatch.setattr(LocalBackend, "load", classmethod(lambda cls, model, adapters, **kw: seen.update(kw)))
    for flags, want in (([], False), (["--compile"], True)):
        build_backend(build_parser().parse_args(["serve", "--model", "m", "--db", "none", *flags]))
        assert seen["compile"] is want and seen["decode_steps"] == 1
    build_backend(build_parser().parse_args(["serve", "--model", "m", "--db", "none", "--decode-steps", "8"]))
    assert seen["decode_steps"] == 8


@pytest.mark.parametrize("argv", [
    ["serve", "--model", "m", "--port", "99999"], ["serve", "--model", "m", "--port", "-1"],
    ["controller", "--port", "70000"], ["worker", "--controller", "http://x", "--model", "m", "--port", "65536"],
    ["controller", "--log-level", "loud"], ["worker", "--controller", "http://x", "--model", "m", "--log-level", "x"],
])
def test_bad_port_or_log_level_is_a_usage_error(argv, capsys, monkeypatch):
    import uvicorn

    monkeypatch.setattr(uvicorn, "run", lambda *a, **kw: pytest.fail("the server started"))
    # argparse's own exit 2 with the flag named, not uvicorn's traceback after the model has loaded
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and ("--port" in err or "--log-level" in err)


@pytest.mark.parametrize("argv,message", [
    (["controller", "--heartbeat-timeout", "0"], "--heartbeat-timeout must be > 0"),
    (["worker", "--controller", "http://x", "--model", "m", "--heartbeat-interval", "-1"],
     "--heartbeat-interval must be > 0"),
    (["worker", "--controller", "http://x", "--model", "m", "--template", "nope"], "unknown chat template 'nope'"),
    (["worker", "--controller", "http://x", "--model", "m", "--device", "gpu"], "device 'gpu' is not one torch knows"),
])
def test_cluster_flag_mistakes_exit_2_before_anything_loads(argv, message, capsys, monkeypatch):
    import uvicorn

    from camelid.serve.backend import LocalBackend

    monkeypatch.setattr(LocalBackend, "load", classmethod(lambda cls, *a, **kw: pytest.fail("the model loaded")))
    monkeypatch.setattr(uvicorn, "run", lambda *a, **kw: pytest.fail("the server started"))
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


@pytest.mark.parametrize("verb", ["serve", "worker"])
def test_template_help_names_every_default(verb, capsys):
    """Without --template, the model folder's recorded template (a full fine-tune, a merge) comes before the
    tokenizer's: --help says so (the worker's said only "the tokenizer's chat_template")."""
    with pytest.raises(SystemExit):
        main([verb, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "recorded in the model folder" in text and "an adapter's recorded" in text


@pytest.mark.parametrize("verb", [["controller"], ["worker", "--controller", "http://127.0.0.1:1", "--model", "m"],
                                  ["serve", "--model", "m", "--db", "none"]])
def test_a_port_in_use_exits_2_before_anything_loads(verb, capsys, monkeypatch):
    """uvicorn binds last: a worker or server would load its whole model (minutes for a large one), then exit 3 with
    the bind error."""
    import socket

    import uvicorn

    from camelid.serve.backend import LocalBackend

    monkeypatch.setattr(LocalBackend, "load", classmethod(lambda cls, *a, **kw: pytest.fail("the model loaded")))
    monkeypatch.setattr(uvicorn, "run", lambda *a, **kw: pytest.fail("the server started"))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        assert main([*verb, "--port", str(taken.getsockname()[1])]) == 2
    err = capsys.readouterr().err
    assert "cannot listen on --host 127.0.0.1 --port" in err and err.count("\n") == 1
