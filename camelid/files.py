"""Writing files safely: whole or not at all, and readable the way any other file of the user's would be.

A file is written under a temporary name in its folder and renamed into place (a rename is atomic), so a crash
leaves the old file or the new one, never half of one. Temporary files are private (mkstemp makes them 0600,
safetensors writes 0600 too); renamed into place they would stay private, and a model folder that another account
(a server, a colleague) cannot read is a surprise. So every final file gets the mode the user's umask gives a new
file, as `cp` or `open()` would.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def _read_umask() -> int:
    mask = os.umask(0o022)  # the only portable way to read it is to set it; done once, at import
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def make_usual(path: str | os.PathLike[str]) -> None:
    """Give a file (or folder) the permissions a new one gets from the umask (0644 / 0755 under umask 022)."""
    base = 0o777 if Path(path).is_dir() else 0o666
    os.chmod(path, base & ~_UMASK)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write text (UTF-8) to path atomically, with the usual permissions."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        make_usual(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
