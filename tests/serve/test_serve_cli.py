"""`camelid serve` flag handling: bad input is one line on stderr and exit code 2, before any model loads."""

from __future__ import annotations

import pytest

from camelid.cli import main


@pytest.mark.parametrize("argv,message", [
    (["serve"], "give --model DIR"),
    (["serve", "--model", "m", "--controller", "http://x"], "not both"),
    (["serve", "--model", "m", "--db", "mysql://x"], "unknown session database URL"),
    (["serve", "--model", "/no/such/model", "--db", "none"], "/no/such/model"),
    (["serve", "--model", "m", "--adapter", "a=x", "--adapter", "a=y"], "unique"),
])
def test_bad_flags_exit_2(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default sqlite file would land here
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("camelid serve: error:") and message in err and err.count("\n") == 1
    if "--db" not in argv:
        assert not (tmp_path / "camelid-chats.db").exists()  # flags are checked before the database is opened


def test_adapter_flag_needs_name_equals_dir(capsys):
    with pytest.raises(SystemExit) as e:
        main(["serve", "--model", "m", "--adapter", "just-a-dir"])
    assert e.value.code == 2
    assert "expected NAME=DIR" in capsys.readouterr().err
