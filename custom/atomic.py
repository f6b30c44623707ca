"""Atomic outputs (standard library only): a path is either absent or complete, never half-written.

Every output is written to a temporary file in the same folder and renamed into place
(``os.replace``), so a killed run, a full disk or a failing writer leaves no truncated file behind.
SOLF workers import this module, so it imports nothing outside the standard library.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import stat
import tempfile
from pathlib import Path
from typing import Iterator

from custom.errors import InputError


#: the names :func:`_temp_name` makes: ``.<stem>.<8 random characters from mkstemp>.tmp<suffix>``
_TEMP_NAME = re.compile(r"^\..*\.[a-z0-9_]{8}\.tmp(\.[^/]*)?$")


def _temp_name(path: Path) -> Path:
    # keep the full suffix (.nii.gz, .csv, ...) so writers that pick a format by extension still work
    suffix = "".join(path.suffixes) if path.suffixes else ""
    stem = path.name[: len(path.name) - len(suffix)] if suffix else path.name
    fd, tmp = tempfile.mkstemp(prefix=f".{stem}.", suffix=f".tmp{suffix}", dir=path.parent)
    os.close(fd)
    return Path(tmp)


def check_writable_dir(folder: str | os.PathLike) -> Path:
    """Create ``folder`` if needed and check we can write there; :class:`InputError` otherwise."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(folder, f"cannot create the output folder ({exc.strerror})", "choose a writable folder") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise InputError(folder, "the output folder is not writable", "choose a writable folder or fix its permissions")
    return folder


def remove_temp_files(folder: str | os.PathLike, recursive: bool = False) -> int:
    """Delete what :func:`atomic_path` leaves in ``folder`` when its process is killed (SIGKILL, power loss)
    between creating the temporary file and renaming it; returns how many files went. Call it only where no
    other process is writing into ``folder`` (a runner after its workers died, or before it resumes)."""
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    removed = 0
    for file in folder.rglob(".*") if recursive else folder.glob(".*"):
        if _TEMP_NAME.match(file.name) and file.is_file():
            with contextlib.suppress(FileNotFoundError):
                file.unlink()
                removed += 1
    return removed


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds."""
    path = Path(path)
    check_writable_dir(path.parent)
    tmp = _temp_name(path)
    try:
        yield tmp
        os.chmod(tmp, os.stat(tmp).st_mode | stat.S_IRGRP | stat.S_IROTH)  # mkstemp makes 0600; outputs are shared
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; returns ``path``."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; returns ``path``."""
    return atomic_write_bytes(path, text.encode())


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in ``chunk``-byte blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()
