"""Files written so that a killed process leaves either the old file or the new one, JSON read with errors that
name the file, and one writer per directory (`DirectoryLock`).

Every writer in the package goes through `atomic_write`: the content is written to a temporary name in the same
directory, flushed to disk, then renamed into place.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Calls `write(temporary_path)`, then renames the temporary file to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    os.chmod(temporary, 0o666 & ~_UMASK)  # mkstemp creates 0600; give the file the permissions open() would
    try:
        write(Path(temporary))
        fsync(temporary)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def write_json(path: str | Path, values: Any) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(json.dumps(values, indent=2) + "\n"))


def read_json(path: str | Path, expect: type = dict) -> Any:
    """A JSON file whose top level is an `expect` (an object by default); a ValueError names the file otherwise."""
    path = Path(path)
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(values, expect):
        kind = {dict: "an object", list: "a list"}.get(expect, expect.__name__)
        raise ValueError(f"{path}: expected a JSON {kind}, found {type(values).__name__}")
    return values


def fsync(path: str | Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def read_file(path: str | Path, max_bytes: int, what: str = "file") -> bytes:
    """The bytes of a regular file of at most `max_bytes`. Anything else raises OSError (its `strerror` says why)
    before a byte is read: a FIFO would block, a device such as /dev/zero never ends, and a size is checked from
    the file's stat (and the read stops at the cap, should the file grow meanwhile)."""
    # O_NONBLOCK: opening a FIFO without a writer would otherwise wait forever, before fstat could refuse it
    descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        info = os.fstat(descriptor)
        if not stat.S_ISREG(info.st_mode):
            raise OSError(errno.EINVAL, f"not a regular {what} (a directory, FIFO, socket or device)", str(path))
        if info.st_size > max_bytes:
            raise OSError(errno.EFBIG, f"{what} of {info.st_size} bytes is above the limit of {max_bytes}", str(path))
        os.set_blocking(descriptor, True)
        parts, size = [], 0
        while size <= max_bytes:
            part = os.read(descriptor, min(1 << 20, max_bytes + 1 - size))
            if not part:
                break
            parts.append(part)
            size += len(part)
        if size > max_bytes:
            raise OSError(errno.EFBIG, f"{what} grew above the limit of {max_bytes} bytes while read", str(path))
        return b"".join(parts)
    finally:
        os.close(descriptor)


def file_sha256(path: str | Path) -> str:
    """The SHA-256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ------------------------------------------------------------------------------------------ one writer per directory

LOCK_FILE = ".lock"


class DirectoryLock:
    """One writer per directory: an exclusive `flock` on DIR/.lock, held from `acquire` (or `with`) to `release`.

    A second writer, in another process or another thread, gets a one-line ValueError naming the directory and the
    process that holds it; the thread that holds the lock may take it again (a sync that calls `add` keeps it). The
    kernel drops the lock when its holder exits, even when killed, so a crash never leaves a directory locked. The
    file itself stays (deleting it would let two processes lock two different files). Readers do not lock."""

    _held: dict[str, tuple[int, int, int]] = {}  # resolved directory -> (thread id, descriptor, depth), this process
    _registry_lock = threading.Lock()

    def __init__(self, directory: str | Path, purpose: str = "write to it"):
        self.directory = Path(directory)
        self.purpose = purpose  # for the message: "another process is using it to <purpose>"
        self._key: str | None = None

    def acquire(self) -> DirectoryLock:
        import fcntl

        self.directory.mkdir(parents=True, exist_ok=True)
        key = os.path.realpath(self.directory)
        with self._registry_lock:
            held = self._held.get(key)
            if held is not None and held[0] == threading.get_ident():
                self._held[key] = (held[0], held[1], held[2] + 1)
                self._key = key
                return self
            descriptor = os.open(self.directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666 & ~_UMASK)
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(descriptor, 500).decode("utf-8", errors="replace").strip() or "unknown"
                os.close(descriptor)
                raise ValueError(
                    f"{self.directory}: another process ({holder}) is using it to {self.purpose}; wait for it to "
                    "finish or choose another directory"
                ) from None
            os.ftruncate(descriptor, 0)
            os.write(descriptor, f"pid {os.getpid()}: {' '.join(sys.argv)[:300]}".encode())
            self._held[key] = (threading.get_ident(), descriptor, 1)
            self._key = key
        return self

    def release(self) -> None:
        if self._key is None:
            return
        with self._registry_lock:
            owner, descriptor, depth = self._held[self._key]
            if depth > 1:
                self._held[self._key] = (owner, descriptor, depth - 1)
            else:
                del self._held[self._key]
                os.close(descriptor)  # closing the only descriptor drops the flock
            self._key = None

    def __enter__(self) -> DirectoryLock:
        return self.acquire()

    def __exit__(self, *exc_info: Any) -> None:
        self.release()

    @classmethod
    def _forget_in_child(cls) -> None:
        """A forked child (a DataLoader worker) closes its copies of the held descriptors: the lock stays with the
        parent and ends with it, instead of outliving a killed parent in its orphaned workers."""
        for _, descriptor, _ in cls._held.values():
            os.close(descriptor)
        cls._held.clear()
        cls._registry_lock = threading.Lock()


os.register_at_fork(after_in_child=DirectoryLock._forget_in_child)
