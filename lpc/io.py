"""Crash-safe file output: every file or directory is written under a temporary name and renamed into place.

``os.replace`` is atomic on POSIX within one filesystem, so a reader (or a resumed run after SIGKILL)
sees either the previous version or the complete new one, never a half-written file.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator


def umask() -> int:
    """The process umask (read without changing it for longer than two syscalls)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_file(path: os.PathLike, suffix: str = "") -> Iterator[str]:
    """Yield a temp file name beside ``path`` (ending in ``suffix``, for writers that infer the format from
    it) to write; on normal exit it replaces ``path`` by rename, on an exception it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~umask())  # mkstemp makes 0600; results should look like any other file
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_text_atomic(path: os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` through a temp file in the same directory, then rename."""
    with atomic_file(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
    return Path(path)


def write_json_atomic(path: os.PathLike, obj) -> Path:
    """``json.dump(obj)`` (indented, trailing newline) to ``path`` by temp file + rename."""
    return write_text_atomic(path, json.dumps(obj, indent=2) + "\n")


@contextlib.contextmanager
def atomic_directory(path: os.PathLike) -> Iterator[Path]:
    """Yield a fresh temp directory beside ``path``; on normal exit it replaces ``path`` by rename.

    On an exception the temp directory is removed and ``path`` (if it existed) is untouched. A process
    killed inside the block leaves only a ``.<name>.tmp-*`` directory, which ``remove_stale_temps``
    cleans up later; ``path`` itself is never half-written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    os.chmod(tmp, 0o777 & ~umask())  # mkdtemp makes 0700
    try:
        yield tmp
        old = None
        if path.exists():  # rename cannot replace a non-empty directory: move the old one aside first
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            os.replace(path, old / "previous")
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove_stale_temps(directory: os.PathLike) -> list[Path]:
    """Delete ``.*.tmp-*`` / ``.*.old-*`` leftovers of killed writers in ``directory``; returns them."""
    directory = Path(directory)
    removed = []
    if directory.is_dir():
        for p in directory.iterdir():
            if p.name.startswith(".") and (".tmp-" in p.name or ".old-" in p.name):
                if p.is_dir():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    with contextlib.suppress(FileNotFoundError):
                        p.unlink()
                removed.append(p)
    return removed
