"""Files written so that a killed process leaves either the old file or the new one, and JSON read with errors
that name the file.

Every writer in the package goes through `atomic_write`: the content is written to a temporary name in the same
directory, flushed to disk, then renamed into place.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
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


def file_sha256(path: str | Path) -> str:
    """The SHA-256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
