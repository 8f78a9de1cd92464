"""Crash-safe file output: every file or directory is written under a temporary name and renamed into place;
manifests (size and SHA-256 of every file of a saved directory) and a per-directory run lock.

``os.replace`` is atomic on POSIX within one filesystem, so a reader (or a resumed run after SIGKILL)
sees either the previous version or the complete new one, never a half-written file.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Iterator

from safetensors import safe_open


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


# -------------------------------------------------------------------------------------------- manifests
MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = "lpc-manifest-v1"


class IntegrityError(ValueError):
    """A saved directory whose files do not match its manifest (or cannot be read): names the file."""


def file_sha256(path: os.PathLike) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def write_manifest(directory: os.PathLike) -> Path:
    """Record every file under ``directory`` (relative path, size, SHA-256) in ``directory/manifest.json``.
    Call it last, once everything else is written: ``verify_manifest`` then catches any later change."""
    directory = Path(directory)
    files = {}
    for p in sorted(directory.rglob("*")):
        if p.is_file() and p.name != MANIFEST_FILE:
            files[p.relative_to(directory).as_posix()] = {"size": p.stat().st_size, "sha256": file_sha256(p)}
    return write_json_atomic(directory / MANIFEST_FILE, {"format": MANIFEST_FORMAT, "files": files})


def verify_manifest(directory: os.PathLike) -> bool:
    """Check every file listed in ``directory/manifest.json`` (present, same size, same SHA-256). Returns False
    when there is no manifest (a directory written before manifests existed: nothing to check), True when all
    match. Raises ``IntegrityError`` naming the first file that does not."""
    directory = Path(directory)
    manifest = directory / MANIFEST_FILE
    if not manifest.is_file():
        return False
    try:
        m = json.loads(manifest.read_text(encoding="utf-8"))
        files = m["files"] if m.get("format") == MANIFEST_FORMAT else None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
        raise IntegrityError(f"{manifest}: unreadable manifest ({exc})") from None
    if not isinstance(files, dict):
        raise IntegrityError(f"{manifest}: not a {MANIFEST_FORMAT} manifest")
    for rel, want in files.items():
        p = directory / rel
        if not p.is_file():
            raise IntegrityError(f"{p}: missing (the manifest lists it)")
        size = p.stat().st_size
        if size != want.get("size"):
            raise IntegrityError(f"{p}: {size} bytes, the manifest says {want.get('size')} (truncated or rewritten)")
        if file_sha256(p) != want.get("sha256"):
            raise IntegrityError(f"{p}: contents differ from the manifest's checksum (corrupted)")
    return True


def read_safetensors(file: os.PathLike, *, with_metadata: bool = False):
    """``safetensors.torch.load_file(file)`` (with ``with_metadata``: ``(tensors, metadata)``), raising
    ``IntegrityError`` naming the file when it is missing, truncated or not safetensors."""
    try:
        with safe_open(str(file), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
            meta = f.metadata() or {}
    except Exception as exc:  # SafetensorError, OSError: the library's own types vary by version
        raise IntegrityError(f"{file}: unreadable safetensors ({type(exc).__name__}: {exc})") from None
    return (tensors, meta) if with_metadata else tensors


# ------------------------------------------------------------------------------------------------ locks
class DirectoryInUse(RuntimeError):
    """Another live process holds the directory's lock."""


class DirectoryLock:
    """An exclusive lock on a directory for one process's lifetime (``<dir>/.lock``).

    ``fcntl.flock`` on the lock file: the kernel drops it when the holder exits, however it exits, so a lock
    left by a dead process is taken over without any staleness guess. The file holds the holder's pid, host
    and start time, for the message a second process gets. Within one process the lock is re-entrant (a
    counter), so code that sets up a run twice in one process does not lock itself out. Local filesystems
    only: ``flock`` over NFS may not exclude another machine.
    """

    _held: dict = {}  # resolved path -> [DirectoryLock, count] of this process

    def __init__(self, directory: os.PathLike):
        self.path = Path(directory).resolve() / ".lock"
        self.fd: int | None = None
        self.previous: dict | None = None  # the holder recorded in the file when it was taken over

    def _holder(self) -> dict:
        try:
            return json.loads(self.path.read_text(encoding="utf-8") or "{}")
        except (OSError, ValueError):
            return {}

    def acquire(self) -> "DirectoryLock":
        key = str(self.path)
        if key in DirectoryLock._held:
            DirectoryLock._held[key][1] += 1
            return DirectoryLock._held[key][0]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666 & ~umask())
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            h = self._holder()
            raise DirectoryInUse(f"{self.path.parent} is in use by another run: pid {h.get('pid', '?')} on "
                                 f"{h.get('host', '?')} since {h.get('started', '?')} (lock {self.path}); wait for "
                                 "it to finish or choose another --output-dir") from None
        self.previous = self._holder() or None  # a dead process's record: taken over
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        self.fd = fd
        DirectoryLock._held[key] = [self, 1]
        return self

    def release(self) -> None:
        key = str(self.path)
        entry = DirectoryLock._held.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] > 0:
            return
        del DirectoryLock._held[key]
        lock = entry[0]
        with contextlib.suppress(OSError):
            os.ftruncate(lock.fd, 0)  # no holder recorded: the next run takes it without a note
            fcntl.flock(lock.fd, fcntl.LOCK_UN)
        os.close(lock.fd)
        lock.fd = None
