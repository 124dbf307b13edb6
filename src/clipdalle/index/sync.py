"""Keeping an index in step with a folder: embed new and changed images, drop deleted ones.

    sync_folder("runs/index", "photos/")   # {"added", "changed", "removed", "unchanged", "embedded", ...}

Which files changed is decided by (path, size, mtime) first and by sha256 only where those differ, so a
second sync of an unchanged folder reads no image. The index remembers each synced file in the table `files`
of meta.sqlite (path, size, mtime_ns, sha256); images the index got from a build or `add` before its first sync
are matched by path and hashed once. A stored image (one row per distinct sha256) is removed when no file of the
folder holds it any more, so a moved or copied file costs no embedding.

A sync is resumable and leaves the index consistent when killed at any point:
  1. new content is embedded into INDEX/chunks/sync-PLAN-* chunks (the build's chunks: a rerun with the same
     changes skips those already written);
  2. one SQLite transaction deletes, inserts and updates the rows and `files`, and raises `sync_state.generation`;
     just before it the updated faiss index is written beside the current one as .faiss.index.gN;
  3. that file is renamed over faiss.index; a kill between 2 and 3 is rolled forward (or back) by the next
     sync, which compares N with the committed generation (the two-phase commit of clipdalle.checkpoint);
  4. info.json records `last_sync` (what changed, when, how long), which `index info` shows.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ..data.sources import UNIT_SIZE, Record, Source, open_source
from ..io import file_sha256
from . import store
from .faiss_index import write_faiss

FILES_SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    path TEXT PRIMARY KEY,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    sha256 TEXT NOT NULL
)
"""
STATE_SCHEMA = "CREATE TABLE IF NOT EXISTS sync_state (key TEXT PRIMARY KEY, value INTEGER NOT NULL)"
PENDING_PREFIX = ".faiss.index.g"  # + generation: the faiss index of a sync whose SQLite commit may have happened


class ListedSource(Source):
    """Records known up front (the files a sync must embed) as a Source: units of UNIT_SIZE records."""

    def __init__(self, path: str | Path, records: list[Record]):
        count = (len(records) + UNIT_SIZE - 1) // UNIT_SIZE
        super().__init__(path, [f"{number:08d}" for number in range(count)])
        self._records = records

    def __len__(self) -> int:
        return len(self._records)

    def records(self, unit: str) -> Iterator[Record]:
        self._check_unit(unit)
        start = int(unit) * UNIT_SIZE
        yield from self._records[start : start + UNIT_SIZE]


def _generation(connection: sqlite3.Connection) -> int:
    row = connection.execute("SELECT value FROM sync_state WHERE key = 'generation'").fetchone()
    return 0 if row is None else int(row[0])


def recover_pending(path: Path, connection: sqlite3.Connection) -> bool:
    """Finishes a sync killed between its SQLite commit and its faiss rename: the pending faiss index of the
    committed generation replaces faiss.index, any other pending one is dropped. True when one was rolled forward."""
    committed = _generation(connection)
    rolled = False
    for pending in path.glob(f"{PENDING_PREFIX}*"):
        suffix = pending.name[len(PENDING_PREFIX) :]
        if suffix.isdigit() and int(suffix) == committed:
            os.replace(pending, path / store.FAISS_FILE)
            rolled = True
        else:
            pending.unlink()
    return rolled


def _under(path: str, root: str) -> bool:
    """An image file below `root` (not a member of a .tar shard there: a folder sync does not read shards)."""
    return path.startswith(root.rstrip(os.sep) + os.sep) and ".tar:" not in path


def _known_files(connection: sqlite3.Connection, root: str) -> dict[str, tuple[int, int, str]]:
    """{path: (size, mtime_ns, sha256)} of the files under `root` the index knows: those of earlier syncs, and the
    image paths of rows built or added before any sync (size and mtime -1: hashed once to confirm)."""
    known = {
        path: (size, mtime, sha256)
        for path, size, mtime, sha256 in connection.execute("SELECT path, size, mtime_ns, sha256 FROM files")
        if _under(path, root)
    }
    for path, sha256 in connection.execute("SELECT path, sha256 FROM images"):
        if _under(path, root) and path not in known:
            known[path] = (-1, -1, sha256)
    return known


def _plan(root: str, known: dict[str, tuple[int, int, str]], stored: set[str]) -> dict[str, Any]:
    """What changed between the folder and the index: current files by path with their stat and sha256, the
    counts, and [(sha256, record)] of the content the index does not hold yet (to embed, one per new sha256)."""
    source = open_source(root, captions="optional")
    first_sync = all(size == -1 for size, _, _ in known.values())  # no file of this folder synced before
    current: dict[str, tuple[int, int, str]] = {}
    counts = {"added": 0, "changed": 0, "unchanged": 0}
    to_embed: dict[str, Record] = {}
    for record in source:
        if record.path is None:
            raise ValueError(f"{root}: holds .tar shards, not image files; sync follows a folder of images")
        path = os.path.abspath(record.path)
        stat = os.stat(path)
        size, mtime = stat.st_size, stat.st_mtime_ns
        previous = known.get(path)
        if previous is not None and previous[:2] == (size, mtime):
            sha256 = previous[2]
        else:
            sha256 = file_sha256(path)
        current[path] = (size, mtime, sha256)
        if previous is None and not (first_sync and sha256 in stored):  # a build's duplicates are not new
            counts["added"] += 1
        elif previous[2] != sha256:
            counts["changed"] += 1
        else:
            counts["unchanged"] += 1
        if sha256 not in stored and sha256 not in to_embed:
            to_embed[sha256] = record
    removed = sorted(set(known) - set(current))
    counts["removed"] = len(removed)
    records = sorted(to_embed.items(), key=lambda item: str(item[1].path))  # [(sha256, record)]
    return {"current": current, "removed": removed, "counts": counts, "records": records}


def sync_folder(
    index: str | Path | store.Index,
    data: str | Path,
    *,
    batch_size: int = 256,
    num_workers: int = 1,
    device: str = "cpu",
) -> dict:
    """Brings the index in step with the folder `data` (see the module's docstring) and returns `last_sync`:
    {"data", "time", "seconds", "added", "changed", "removed", "unchanged" (files), "embedded", "rows_added",
    "rows_removed" (stored images)}."""
    if not Path(data).is_dir():
        raise ValueError(f"{data}: sync keeps an index in step with a folder of images; give a folder")
    owned = not isinstance(index, store.Index)
    opened = store.Index.open(index, device=device) if owned else index
    try:
        return _sync(opened, os.path.abspath(data), batch_size=batch_size, num_workers=num_workers)
    finally:
        if owned:
            opened.close()


def _sync(index: store.Index, root: str, *, batch_size: int, num_workers: int) -> dict:
    started = time.monotonic()
    connection = index.connection
    with index.lock, connection:
        connection.execute(FILES_SCHEMA)
        connection.execute(STATE_SCHEMA)
    with index.lock:
        if recover_pending(index.path, connection):
            import faiss

            index.faiss_index = faiss.read_index(str(index.path / store.FAISS_FILE))
            index._set_nprobe()
        known = _known_files(connection, root)
        stored = {sha256 for (sha256,) in connection.execute("SELECT sha256 FROM images")}
    plan = _plan(root, known, stored)

    chunk_dir = index.path / store.CHUNKS_DIR
    # the chunks' contents depend on the files, the batch size and the loader workers (as a build's plan)
    listing = json.dumps([batch_size, num_workers, [[str(r.path), sha256] for sha256, r in plan["records"]]]).encode()
    prefix = f"sync-{hashlib.sha256(listing).hexdigest()[:12]}-"
    if chunk_dir.is_dir():  # chunks of an earlier, different sync plan are stale
        for stale in chunk_dir.glob("sync-*"):
            if not stale.name.startswith(prefix):
                stale.unlink()
    chunk_files: list[Path] = []
    if plan["records"]:
        chunk_dir.mkdir(exist_ok=True)
        store._embed_to_chunks(
            index.model,
            ListedSource(root, [record for _, record in plan["records"]]),
            chunk_dir,
            prefix,
            batch_size=batch_size,
            chunk_size=store.CHUNK_SIZE,
            num_workers=num_workers,
            rank=0,
            world_size=1,
        )
        chunk_files = store._chunk_files(chunk_dir, prefix, 1)

    with index.lock:
        report = _commit(index, root, plan, chunk_files)
    for chunk in chunk_dir.glob(f"{prefix}*") if chunk_dir.is_dir() else ():
        chunk.unlink()
    if chunk_dir.is_dir() and not any(chunk_dir.iterdir()):
        chunk_dir.rmdir()
    report["seconds"] = round(time.monotonic() - started, 3)
    data_list = index.info.get("data", [])
    index._save_info({"last_sync": report, "data": data_list if root in data_list else [*data_list, root]})
    return report


def _commit(index: store.Index, root: str, plan: dict, chunk_files: list[Path]) -> dict:
    """Steps 2 and 3 of the module's docstring; returns the counts for `last_sync`."""
    connection = index.connection
    current: dict[str, tuple[int, int, str]] = plan["current"]
    holders: dict[str, str] = {}  # sha256 -> a current file holding it (the first by path)
    for path in sorted(current):
        holders.setdefault(current[path][2], path)
    generation = _generation(connection) + 1
    pending = index.path / f"{PENDING_PREFIX}{generation}"
    with connection:  # one transaction
        rows_under = [
            (image_id, path, sha256)
            for image_id, path, sha256 in connection.execute("SELECT id, path, sha256 FROM images")
            if _under(path, root)
        ]
        removed_ids = [image_id for image_id, _, sha256 in rows_under if sha256 not in holders]
        moved = [
            (holders[sha256], image_id)
            for image_id, path, sha256 in rows_under
            if sha256 in holders and path not in current
        ]
        connection.executemany("DELETE FROM images WHERE id = ?", [(image_id,) for image_id in removed_ids])
        connection.executemany("UPDATE images SET path = ? WHERE id = ?", moved)
        new_ids, _ = store._insert_chunks(connection, chunk_files, store._now()) if chunk_files else ([], {})
        connection.executemany("DELETE FROM files WHERE path = ?", [(path,) for path in plan["removed"]])
        connection.executemany(
            "INSERT OR REPLACE INTO files (path, size, mtime_ns, sha256) VALUES (?, ?, ?, ?)",
            [(path, *values) for path, values in current.items()],
        )
        connection.execute("INSERT OR REPLACE INTO sync_state (key, value) VALUES ('generation', ?)", (generation,))
        count = int(connection.execute("SELECT COUNT(*) FROM images").fetchone()[0])
        if count == 0:
            raise ValueError(f"{root}: the folder holds no image the index could keep; an index cannot be empty")
        rebuild = index.info.get("nprobe") is None and count > index.info["exact_limit"]
        if (removed_ids or new_ids) and not rebuild:
            if removed_ids:
                index.faiss_index.remove_ids(np.array(removed_ids, dtype=np.int64))
            if new_ids:
                vectors = index.features_of(new_ids)  # (N, D), read inside this transaction
                index.faiss_index.add_with_ids(vectors, np.array(new_ids, dtype=np.int64))
            write_faiss(pending, index.faiss_index)
    if pending.exists():
        os.replace(pending, index.path / store.FAISS_FILE)
    if rebuild:
        index.rebuild_faiss()
    counts = plan["counts"]
    return {
        "data": root,
        "time": store._now(),
        **counts,
        "embedded": len(plan["records"]),
        "rows_added": len(new_ids),
        "rows_removed": len(removed_ids),
    }
