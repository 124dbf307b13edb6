"""Writing WebDataset shards: plain tar files whose members are grouped into samples by key.

    FOLDER/{prefix}-00000.tar   key1.json key1.png key1.txt key2.json key2.png key2.txt ...

A sample is every member sharing the text before the first "." of its name (the WebDataset convention), so
keys must not contain "." (or "/", which would make a subdirectory). Output is byte-reproducible: members are
written in sample order with their extensions sorted, and every header has mtime 0, mode 0644, uid/gid 0 and
no user names. Each shard is written under a hidden temporary name and renamed when it is complete, so a
killed writer never leaves a half shard under a final name (readers globbing `*.tar` skip the temporaries).
"""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path


def _check_key(key: str) -> None:
    if not isinstance(key, str) or not key:
        raise ValueError(f"shard sample key must be a non-empty string, got {key!r}")
    if "." in key or "/" in key:
        raise ValueError(
            f"shard sample key {key!r} contains '.' or '/'; WebDataset splits member names at the first '.', "
            "so use another separator (e.g. '__')"
        )


def _check_extension(key: str, extension: str) -> None:
    if not isinstance(extension, str) or not extension or extension.startswith(".") or "/" in extension:
        raise ValueError(
            f"member name {extension!r} of sample {key!r} must be a non-empty extension such as 'png' or 'txt' "
            "(no leading '.', no '/')"
        )


def _member_bytes(key: str, extension: str, value: bytes | str) -> bytes:
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    raise ValueError(f"member {key}.{extension} must be bytes or str, got {type(value).__name__}")


def _tar_info(name: str, size: int) -> tarfile.TarInfo:
    """A header with every field that could vary between runs or machines fixed."""
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


class ShardWriter:
    """Writes samples into `{prefix}-{NNNNN}.tar` files of at most `max_count` samples each.

    with ShardWriter("out/train", max_count=5000) as writer:
        writer.write("account__red", {"png": png_bytes, "txt": "a red icon of an account"})
    writer.paths  # [Path("out/train/shard-00000.tar"), ...]

    Leaving the `with` block normally publishes the last shard; leaving it with an exception discards the shard
    in progress (its samples are incomplete) and keeps the shards already published.
    """

    def __init__(self, folder: str | Path, prefix: str = "shard", max_count: int = 5000):
        if max_count < 1:
            raise ValueError(f"max_count must be at least 1 sample per shard, got {max_count}")
        if not prefix or "/" in prefix or "." in prefix:
            raise ValueError(f"shard prefix must be a non-empty name without '.' or '/', got {prefix!r}")
        self.folder = Path(folder)
        self.prefix = prefix
        self.max_count = max_count
        self.paths: list[Path] = []  # published shards, in order
        self.count = 0  # samples written in total
        self._tar: tarfile.TarFile | None = None
        self._temporary: Path | None = None
        self._final: Path | None = None
        self._shard_count = 0  # samples in the shard in progress
        self._keys: set[str] = set()  # keys in the shard in progress (a repeated key would merge two samples)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, error_type, error, traceback) -> None:
        if error_type is None:
            self.close()
        else:
            self.discard()

    def write(self, key: str, members: dict[str, bytes | str]) -> None:
        """Appends one sample; `members` maps extension ("png", "txt", "json", ...) to its content."""
        _check_key(key)
        if not members:
            raise ValueError(f"sample {key!r} has no members; expected e.g. {{'png': bytes, 'txt': str}}")
        contents = []
        for extension in sorted(members):
            _check_extension(key, extension)
            contents.append((f"{key}.{extension}", _member_bytes(key, extension, members[extension])))
        if self._tar is None:
            self._open_next()
        if key in self._keys:
            raise ValueError(f"sample key {key!r} was already written to {self._final.name}; keys must be unique")
        for name, data in contents:
            self._tar.addfile(_tar_info(name, len(data)), io.BytesIO(data))
        self._keys.add(key)
        self._shard_count += 1
        self.count += 1
        if self._shard_count >= self.max_count:
            self._publish()

    def close(self) -> None:
        """Publishes the shard in progress (if any sample went into it)."""
        if self._tar is not None:
            self._publish()

    def discard(self) -> None:
        """Drops the shard in progress without publishing it."""
        if self._tar is not None:
            self._tar.close()
            self._temporary.unlink(missing_ok=True)
            self._reset()

    def _open_next(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        name = f"{self.prefix}-{len(self.paths):05d}.tar"
        self._final = self.folder / name
        self._temporary = self.folder / f".{name}.tmp"
        # PAX (the default) keeps keys longer than 100 characters; the fixed headers keep it reproducible.
        self._tar = tarfile.open(self._temporary, "w", format=tarfile.PAX_FORMAT)

    def _publish(self) -> None:
        self._tar.close()
        with open(self._temporary, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(self._temporary, self._final)
        self.paths.append(self._final)
        self._reset()

    def _reset(self) -> None:
        self._tar = self._temporary = self._final = None
        self._shard_count = 0
        self._keys = set()
