"""The embedding store: a collection embedded once by CLIP, then searched by text or image and moderated.

    INDEX/info.json      the CLIP (a path relative to INDEX, or a model name) and its weights' sha256, counts,
                         index type, recall
    INDEX/meta.sqlite    table `images`: id, key, path (absolute; "SHARD:MEMBER" for a shard's member, with the
                         member's own name), caption, width, height, sha256, added, embedding (float16 bytes);
                         one row per distinct image (same sha256 = stored once); `read_image` reads it back
    INDEX/faiss.index    inner-product search over the embeddings, keyed by the SQLite id
    INDEX/chunks/        while building: rNNN-NNNNNN.npy float16 embeddings + .json metadata rows, one pair per
                         `chunk_size` samples of a rank's stream; removed once merged

Building is resumable: the sample stream is deterministic (no shuffling), so a chunk is a fixed range of
batches, and a restarted build skips the chunks already on disk without decoding their images. Under torchrun
each rank embeds its share into its own chunks and rank 0 merges. Up to `exact_limit` images the faiss index
is exact (IndexFlatIP); above it an inverted file (IVF) whose codes (float32, 8-bit scalar or product
quantised) are the largest that fit `memory_budget_mb`, with `nprobe` raised until recall@10 against exact
search, measured on a sample of the stored vectors, reaches `target_recall`.

    index = Index.open("INDEX")                      # loads the CLIP once; a server keeps this instance
    index = Index.open("INDEX", backend="onnx")      # its towers on onnxruntime (clipdalle.backends)
    index.search(text="a red circle", k=10)          # [{"id", "path", "caption", "score"}, ...]
"""

from __future__ import annotations

import datetime
import errno
import hashlib
import json
import os
import re
import shutil
import sqlite3
import tarfile
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from .. import backends
from ..data.loader import SampleStream, make_loader
from ..data.sources import Record, open_source
from ..io import DirectoryLock, atomic_write, file_sha256, read_file, read_json, write_json
from ..runtime import barrier, device_of, distributed_context, init_distributed
from ..transforms import MAX_IMAGE_BYTES, BadImage, load_image, resize_crop
from ..zero_shot import encode_texts
from . import moderation
from .faiss_index import EXACT_LIMIT, MEMORY_BUDGET_MB, TARGET_RECALL, build_faiss, write_faiss

FORMAT_VERSION = 1
INFO_FILE = "info.json"
META_FILE = "meta.sqlite"
FAISS_FILE = "faiss.index"
CHUNKS_DIR = "chunks"
CHUNK_SIZE = 16_384  # samples per chunk: at most this much work is redone after a kill (8 MB at 512-d float16)
_SCHEMA = """
CREATE TABLE IF NOT EXISTS images (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    key TEXT NOT NULL,
    path TEXT NOT NULL,
    caption TEXT NOT NULL,
    width INTEGER NOT NULL,
    height INTEGER NOT NULL,
    sha256 TEXT NOT NULL UNIQUE,
    added TEXT NOT NULL,
    embedding BLOB NOT NULL
)
"""
_ROW_FIELDS = ("key", "path", "caption", "width", "height", "sha256")


# ------------------------------------------------------------------------------------------ embedding stream


class _IndexStream(SampleStream):
    """SampleStream batches plus what the metadata needs: "paths", "widths", "heights", "sha256s"; captions
    are all of a sample's captions joined by newlines. Unreadable images are skipped and counted."""

    def _load(self, group: list[tuple[int, Record]]) -> dict:
        batch: dict[str, Any] = {name: [] for name in ("keys", "captions", "paths", "widths", "heights", "sha256s")}
        pixels, skipped = [], 0
        for _, record in group:
            try:
                data = record.read_bytes()
                image = record.decode(data)
            except (BadImage, OSError):
                skipped += 1
                continue
            pixels.append(np.asarray(resize_crop(image, self.image_size)))  # (H, W, 3) uint8, RGB
            batch["keys"].append(record.key)
            batch["captions"].append("\n".join(record.captions))
            batch["paths"].append(image_location(record))
            batch["widths"].append(image.width)
            batch["heights"].append(image.height)
            batch["sha256s"].append(hashlib.sha256(data).hexdigest())
        batch["images"] = pixels_to_images(pixels, self.image_size)
        batch["skipped"] = skipped
        return batch


def image_location(record: Record) -> str:
    """Where an indexed image is read back from: its absolute file path, or "ABSOLUTE_SHARD:MEMBER"."""
    if record.path is not None:
        return os.path.abspath(record.path)
    if record.shard is not None and record.member is not None:
        return f"{os.path.abspath(record.shard)}:{record.member}"
    return record.name


_SHARD_MEMBER = re.compile(r"\.(?:tar|tar\.gz|tgz):", re.IGNORECASE)


def read_image(location: str, data: Iterable[str] = ()) -> bytes:
    """The bytes of an indexed image from its stored `path`: a file, or a member of a .tar/.tar.gz/.tgz shard
    ("SHARD:MEMBER"). Indexes built before shard paths were stored absolute hold them relative to where the build
    ran: such a shard is looked for beside the index's `data` paths; a member stored with a lower-cased extension
    is matched in any letter case. FileNotFoundError when it is gone; OSError when it is not a regular file or is
    above MAX_IMAGE_BYTES."""
    if os.path.isfile(location):
        return read_file(location, MAX_IMAGE_BYTES, "image file")
    for match in reversed(list(_SHARD_MEMBER.finditer(location))):
        shard, member = location[: match.end() - 1], location[match.end() :]
        for candidate in [shard, *(_beside(root, shard) for root in data if not os.path.isabs(shard))]:
            if os.path.isfile(candidate):
                return _read_member(candidate, member)
    raise FileNotFoundError(location)


def _beside(root: str, shard: str) -> str:
    folder = root if os.path.isdir(root) else os.path.dirname(root)  # a folder of shards, a shard or a pattern
    return os.path.join(folder, os.path.basename(shard))


def _read_member(shard: str, member: str) -> bytes:
    """One member of a shard, streamed up to it (a .tar.gz is never decompressed past it), size checked first."""
    with tarfile.open(shard, mode="r|*") as archive:
        for info in archive:
            if info.isfile() and (info.name == member or info.name.lower() == member.lower()):
                if info.size > MAX_IMAGE_BYTES:
                    raise OSError(errno.EFBIG, f"member of {info.size} bytes is above {MAX_IMAGE_BYTES}", member)
                return archive.extractfile(info).read()
    raise FileNotFoundError(f"{shard}: no member {member}")


def pixels_to_images(pixels: list[np.ndarray], image_size: int) -> torch.Tensor:
    """RGB uint8 arrays (H, W, 3) -> float images (B, 3, H, W) in [0, 1], converted as one batch: per-image
    `to_tensor` calls cost more than decoding a 32 px PNG (bench_index_build.py)."""
    if not pixels:
        return torch.zeros(0, 3, image_size, image_size)
    batch = torch.from_numpy(np.stack(pixels))  # (B, H, W, 3) uint8
    return batch.permute(0, 3, 1, 2).float().div_(255.0)  # (B, 3, H, W)


def _save_npy(path: Path, array: np.ndarray) -> None:
    """Atomic np.save (through a file object: np.save would append .npy to the temporary name)."""

    def write(temporary: Path) -> None:
        with open(temporary, "wb") as handle:
            np.save(handle, array, allow_pickle=False)

    atomic_write(path, write)


def _chunk_name(prefix: str, rank: int, number: int) -> str:
    return f"{prefix}r{rank:03d}-{number:06d}"


def _completed_chunks(chunk_dir: Path, prefix: str, rank: int) -> int:
    """Chunks 0 .. n-1 of this rank are complete (their .json, written after the .npy, exists)."""
    number = 0
    while (chunk_dir / f"{_chunk_name(prefix, rank, number)}.json").exists():
        number += 1
    return number


def _write_chunk(chunk_dir: Path, name: str, features: np.ndarray, rows: list[dict], skipped: int) -> None:
    """The .npy first, then the .json that marks the chunk complete; both atomic."""
    _save_npy(chunk_dir / f"{name}.npy", features)
    # compact: json's indented output goes through its pure-Python encoder, several times slower
    text = json.dumps({"rows": rows, "skipped": skipped}, ensure_ascii=False, separators=(",", ":"))
    atomic_write(chunk_dir / f"{name}.json", lambda temporary: temporary.write_text(text, encoding="utf-8"))


def _embed_to_chunks(
    model: Any,
    source: Any,
    chunk_dir: Path,
    prefix: str,
    *,
    batch_size: int,
    chunk_size: int,
    num_workers: int,
    rank: int,
    world_size: int,
) -> None:
    """Embeds this rank's share of `source` into chunk files, skipping the chunks already written."""
    batches_per_chunk = max(1, chunk_size // batch_size)
    number = _completed_chunks(chunk_dir, prefix, rank)
    stream = _IndexStream(
        source,
        image_size=model.config.image_size,
        batch_size=batch_size,
        shuffle=False,
        infinite=False,
        start_batch=number * batches_per_chunk,
        rank=rank,
        world_size=world_size,
    )
    total = len(source) // world_size if hasattr(source, "__len__") else None
    done = min(total or 0, number * batches_per_chunk * batch_size)
    progress = tqdm(total=total, initial=done, unit="img", desc=f"embedding (rank {rank})", disable=None)
    device = device_of(model)
    features: list[np.ndarray] = []
    rows: list[dict] = []
    skipped, batches_in_chunk = 0, 0
    for batch in make_loader(stream, num_workers):
        if len(batch["keys"]) > 0:
            with torch.no_grad():
                features.append(model.encode_image(batch["images"].to(device)).float().cpu().numpy())
        rows.extend(dict(zip(_ROW_FIELDS, values)) for values in zip(*(batch[f"{f}s"] for f in _ROW_FIELDS)))
        skipped += batch["skipped"]
        batches_in_chunk += 1
        progress.update(len(batch["keys"]) + batch["skipped"])
        if batches_in_chunk == batches_per_chunk:
            _write_chunk(chunk_dir, _chunk_name(prefix, rank, number), _stack(features, model), rows, skipped)
            features, rows, skipped, batches_in_chunk, number = [], [], 0, 0, number + 1
    if batches_in_chunk > 0:
        _write_chunk(chunk_dir, _chunk_name(prefix, rank, number), _stack(features, model), rows, skipped)
    progress.close()
    (chunk_dir / f"{prefix}r{rank:03d}.done").touch()


def _stack(features: list[np.ndarray], model: Any) -> np.ndarray:
    if not features:
        return np.zeros((0, model.config.embed_dim), dtype=np.float16)
    return np.concatenate(features).astype(np.float16)  # (N, D)


def _chunk_files(chunk_dir: Path, prefix: str, world_size: int) -> list[Path]:
    """The .json files of every rank's chunks in merge order (rank, then chunk); every rank must be done."""
    for rank in range(world_size):
        if not (chunk_dir / f"{prefix}r{rank:03d}.done").exists():
            raise ValueError(
                f"{chunk_dir}: rank {rank} of {world_size} has not finished embedding; rerun the same command "
                f"(with torchrun --nproc-per-node {world_size} if it was started that way) to complete it"
            )
    return sorted(chunk_dir.glob(f"{prefix}r[0-9][0-9][0-9]-[0-9][0-9][0-9][0-9][0-9][0-9].json"))


def _insert_chunks(connection: sqlite3.Connection, chunk_jsons: list[Path], added: str) -> tuple[list[int], dict]:
    """Inserts the chunks' rows; an image whose sha256 is already stored is counted as a duplicate, not stored.
    Returns the new ids and {"duplicates", "skipped"}. Call inside a transaction."""
    counts = {"duplicates": 0, "skipped": 0}
    new_rows = []
    seen: set[str] = set()  # sha256 of the images stored so far, or about to be
    for chunk_json in chunk_jsons:
        values = json.loads(chunk_json.read_text(encoding="utf-8"))
        features = np.load(chunk_json.with_suffix(".npy"), allow_pickle=False).astype(np.float16)  # (N, D)
        counts["skipped"] += values["skipped"]
        seen |= _stored_sha256s(connection, [row["sha256"] for row in values["rows"]])
        for row, feature in zip(values["rows"], features):
            # Deduplicated here rather than by INSERT OR IGNORE, which would use up an id for every duplicate.
            if row["sha256"] in seen:
                counts["duplicates"] += 1
                continue
            seen.add(row["sha256"])
            new_rows.append((*(row[name] for name in _ROW_FIELDS), added, feature.tobytes()))
    last_id = _last_id(connection)
    connection.executemany(
        "INSERT INTO images (key, path, caption, width, height, sha256, added, embedding) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        new_rows,
    )
    # AUTOINCREMENT hands out consecutive ids to the rows of one transaction with no other writer
    assert _last_id(connection) == last_id + len(new_rows), "ids of the inserted rows are not consecutive"
    return list(range(last_id + 1, last_id + 1 + len(new_rows))), counts


def _stored_sha256s(connection: sqlite3.Connection, sha256s: list[str]) -> set[str]:
    """Those of `sha256s` already in the table (looked up 500 at a time through the UNIQUE index)."""
    found: set[str] = set()
    for start in range(0, len(sha256s), 500):
        part = sha256s[start : start + 500]
        query = f"SELECT sha256 FROM images WHERE sha256 IN ({','.join('?' * len(part))})"
        found.update(sha256 for (sha256,) in connection.execute(query, part))
    return found


def _last_id(connection: sqlite3.Connection) -> int:
    """The largest id ever handed out (AUTOINCREMENT never reuses one, even after deletes); 0 for a new table."""
    row = connection.execute("SELECT seq FROM sqlite_sequence WHERE name = 'images'").fetchone()
    return 0 if row is None else int(row[0])


def _read_embeddings(connection: sqlite3.Connection) -> tuple[np.ndarray, np.ndarray]:
    """(ids (N,) int64, embeddings (N, D) float32) of every stored image, by id."""
    rows = connection.execute("SELECT id, embedding FROM images ORDER BY id").fetchall()
    ids = np.array([row[0] for row in rows], dtype=np.int64)
    if not rows:
        return ids, np.zeros((0, 0), dtype=np.float32)
    embeddings = np.frombuffer(b"".join(row[1] for row in rows), dtype=np.float16).reshape(len(rows), -1)  # (N, D)
    return ids, embeddings.astype(np.float32)


# ------------------------------------------------------------------------------------------ models


def model_sha256(clip_run: str | Path) -> str:
    """sha256 of the weights the CLIP at `clip_run` loads (`pretrained.weights_sha256`): a run's, a file's, the
    files an open_clip or Hugging Face directory's loader reads, a model name's as its cache records it, an ONNX
    export's as it records its model's."""
    return backends.weights_sha256(clip_run)


def _load_clip(clip_run: str | Path, device: str, backend: str) -> tuple[Any, Any]:
    model, _, tokenizer = backends.load_encoder(clip_run, backend=backend, device=device)
    return model, tokenizer


def _clip_record(clip_run: str | Path, out: Path) -> dict[str, Any]:
    """How info.json names the CLIP: a path relative to the index, or a model name (clipdalle.hub)."""
    if Path(clip_run).exists():
        return {"clip_run": os.path.relpath(os.path.abspath(clip_run), os.path.abspath(out))}
    return {"clip_run": None, "clip_name": str(clip_run)}


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _check_plan(chunk_dir: Path, plan: dict) -> None:
    """A partial build continues only with the same data, model, batch and chunk sizes and process count."""
    plan_path = chunk_dir / "plan.json"
    if plan_path.exists():
        previous = read_json(plan_path)
        changed = [name for name in plan if previous.get(name) != plan[name]]
        if changed:
            details = ", ".join(f"{name}: was {previous.get(name)!r}, now {plan[name]!r}" for name in changed)
            raise ValueError(
                f"{chunk_dir}: a partial build with other settings ({details}); rerun with the same settings "
                f"or delete {chunk_dir} to start over"
            )
    else:
        write_json(plan_path, plan)


# ------------------------------------------------------------------------------------------ build


def build_index(
    clip_run: str | Path,
    data: str | Path,
    out: str | Path,
    *,
    batch_size: int = 256,
    num_workers: int = 1,
    device: str = "cpu",
    backend: str = "auto",
    chunk_size: int = CHUNK_SIZE,
    exact_limit: int = EXACT_LIMIT,
    memory_budget_mb: float = MEMORY_BUDGET_MB,
    target_recall: float = TARGET_RECALL,
) -> dict:
    """Embeds every image of `data` (any dataset format, captions optional) with the CLIP at `clip_run` (a path or a
    model name; its towers on `backend`) into a new index at `out`, and returns its `index_info`. Resumes a killed
    build; under torchrun every rank embeds its share and rank 0 merges (other ranks return {}). One build per `out`
    at a time: rank 0 holds OUT/.lock, and a second build gets a one-line error."""
    out = Path(out)
    if (out / INFO_FILE).exists():
        raise ValueError(f"{out}: already holds an index; use add_to_index to append, or choose a new --out")
    if batch_size < 1 or chunk_size < 1:
        raise ValueError(f"batch_size and chunk_size must be at least 1, got {batch_size} and {chunk_size}")
    options = dict(
        batch_size=batch_size, num_workers=num_workers, device=device, backend=backend, chunk_size=chunk_size
    )
    limits = dict(exact_limit=exact_limit, memory_budget_mb=memory_budget_mb, target_recall=target_recall)
    if distributed_context()[0] != 0:
        return _build_index(clip_run, data, out, **options, **limits)
    with DirectoryLock(out, "build an index"):
        if (out / INFO_FILE).exists():  # another build finished while this one waited to start
            raise ValueError(f"{out}: already holds an index; use add_to_index to append, or choose a new --out")
        return _build_index(clip_run, data, out, **options, **limits)


def _build_index(
    clip_run: str | Path,
    data: str | Path,
    out: Path,
    *,
    batch_size: int,
    num_workers: int,
    device: str,
    backend: str,
    chunk_size: int,
    exact_limit: int,
    memory_budget_mb: float,
    target_recall: float,
) -> dict:
    rank, world_size, _ = distributed_context()
    init_distributed(torch.device(device))
    source = open_source(data, captions="optional")
    clip_sha256 = model_sha256(clip_run)
    model, _ = _load_clip(clip_run, device, backend)
    chunk_dir = out / CHUNKS_DIR
    chunk_dir.mkdir(parents=True, exist_ok=True)
    plan = {
        "data": os.path.abspath(data),
        "clip_sha256": clip_sha256,
        "batch_size": batch_size,
        "chunk_size": chunk_size,
        "world_size": world_size,
        "num_workers": num_workers,  # loader workers interleave records: another count cuts other chunks
    }
    _check_plan(chunk_dir, plan)
    _embed_to_chunks(
        model,
        source,
        chunk_dir,
        "",
        batch_size=batch_size,
        chunk_size=chunk_size,
        num_workers=num_workers,
        rank=rank,
        world_size=world_size,
    )
    barrier()
    if rank != 0:
        return {}
    chunk_jsons = _chunk_files(chunk_dir, "", world_size)
    temporary = out / f".{META_FILE}.tmp"
    temporary.unlink(missing_ok=True)
    connection = sqlite3.connect(temporary)
    connection.execute(_SCHEMA)
    _, counts = _insert_chunks(connection, chunk_jsons, _now())
    connection.commit()
    ids, embeddings = _read_embeddings(connection)
    connection.close()
    if len(ids) == 0:
        temporary.unlink()
        raise ValueError(f"{data}: no image could be embedded ({counts['skipped']} unreadable); nothing to index")
    os.replace(temporary, out / META_FILE)
    faiss_index, details = build_faiss(
        embeddings, ids, exact_limit=exact_limit, memory_budget_mb=memory_budget_mb, target_recall=target_recall
    )
    write_faiss(out / FAISS_FILE, faiss_index)
    info = {
        "clipdalle_index": {"format_version": FORMAT_VERSION},
        **_clip_record(clip_run, out),
        "clip_sha256": clip_sha256,
        "embed_dim": int(embeddings.shape[1]),
        "data": [os.path.abspath(data)],
        "count": len(ids),
        "duplicates": counts["duplicates"],
        "skipped": counts["skipped"],
        **details,
        "exact_limit": exact_limit,
        "memory_budget_mb": memory_budget_mb,
        "target_recall": target_recall,
        "created": _now(),
        "updated": _now(),
    }
    write_json(out / INFO_FILE, info)
    shutil.rmtree(chunk_dir)
    return index_info(out)


# ------------------------------------------------------------------------------------------ the index


def _read_info(path: Path) -> dict:
    info_path = path / INFO_FILE
    if not info_path.is_file():
        if (path / CHUNKS_DIR).is_dir():
            raise FileNotFoundError(f"{info_path}: not found; the build of {path} did not finish, rerun it to resume")
        raise FileNotFoundError(f"{info_path}: not found; {path} is not an index (build one with build_index)")
    info = read_json(info_path)
    if "clipdalle_index" not in info:
        raise ValueError(f"{info_path}: not a clipdalle index info file (no 'clipdalle_index' header)")
    return info


class Index:
    """An open index: the CLIP that built it, the faiss index and the SQLite metadata, loaded once. Searches
    are serialised by a lock, so one instance can serve many threads."""

    def __init__(self, path: Path, info: dict, model: Any, tokenizer: Any, faiss_index: Any, connection: Any):
        self.path = path  # the index directory
        self.info = info  # contents of info.json
        self.model = model  # the CLIP in eval mode
        self.tokenizer = tokenizer  # the CLIP's tokenizer: tokenizer(texts, context_length) -> (N, T) ids
        self.faiss_index = faiss_index
        self.connection = connection  # sqlite3 connection to meta.sqlite
        self.lock = threading.RLock()

    @classmethod
    def open(
        cls, path: str | Path, *, clip: str | Path | None = None, device: str = "cpu", backend: str = "auto"
    ) -> Index:
        """Opens the index at `path` with the CLIP it was built with (or `clip`, which must have the same
        weights), its towers on `backend` (torch | onnx | auto, clipdalle.backends). A faiss index out of step with
        the metadata (a kill between the two writes) is rebuilt."""
        import faiss

        path = Path(path)
        info = _read_info(path)
        recorded = info["clip_name"] if info.get("clip_name") else (path / info["clip_run"]).resolve()
        clip_run = clip if clip is not None else recorded
        if clip is None and isinstance(recorded, Path) and not recorded.exists():
            raise FileNotFoundError(f"{recorded}: the CLIP run {path} was built with is missing; pass clip=RUN")
        sha256 = model_sha256(clip_run)
        if sha256 != info["clip_sha256"]:
            raise ValueError(
                f"{clip_run}: CLIP weights (sha256 {sha256[:12]}) differ from the ones {path} was built with "
                f"({recorded}, sha256 {info['clip_sha256'][:12]}); query with that model or rebuild the index"
            )
        model, tokenizer = _load_clip(clip_run, device, backend)
        connection = sqlite3.connect(path / META_FILE, check_same_thread=False)
        faiss_index = faiss.read_index(str(path / FAISS_FILE)) if (path / FAISS_FILE).is_file() else None
        index = cls(path, info, model, tokenizer, faiss_index, connection)
        if faiss_index is None or faiss_index.ntotal != len(index):
            index.rebuild_faiss()
        else:
            index._set_nprobe()
        return index

    def __len__(self) -> int:
        return int(self.connection.execute("SELECT COUNT(*) FROM images").fetchone()[0])

    def __enter__(self) -> Index:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def close(self) -> None:
        self.connection.close()

    def _set_nprobe(self) -> None:
        if self.info.get("nprobe"):
            self.faiss_index.nprobe = int(self.info["nprobe"])

    def rebuild_faiss(self) -> None:
        """Rebuilds the faiss index from the stored embeddings (exact or IVF by the current count)."""
        with self.lock:
            ids, embeddings = _read_embeddings(self.connection)
            if len(ids) == 0:
                raise ValueError(f"{self.path}: the index holds no images")
            self.faiss_index, details = build_faiss(
                embeddings,
                ids,
                exact_limit=self.info["exact_limit"],
                memory_budget_mb=self.info["memory_budget_mb"],
                target_recall=self.info["target_recall"],
            )
            self.info.update(details)
            self._set_nprobe()
            write_faiss(self.path / FAISS_FILE, self.faiss_index)
            self._save_info(details)

    def _save_info(self, updates: dict) -> None:
        self.info.update(updates, count=len(self), updated=_now())
        write_json(self.path / INFO_FILE, self.info)

    # -------------------------------------------------------------------------------------- queries

    def encode_text(self, texts: list[str]) -> np.ndarray:
        """Texts -> unit-norm CLIP features (N, D) float32."""
        return encode_texts(self.model, self.tokenizer, list(texts)).float().cpu().numpy()

    def encode_images(self, images: Iterable[Any]) -> np.ndarray:
        """Images (paths, encoded bytes, PIL images or (3, H, W) tensors in [0, 1]) -> unit-norm features (N, D).
        Unreadable bytes raise BadImage (a ValueError) naming the image."""
        size = self.model.config.image_size
        tensors = [load_image(image, size, name=f"query image {number}") for number, image in enumerate(images)]
        if not tensors:
            raise ValueError("encode_images: got no images")
        with torch.no_grad():
            return self.model.encode_image(torch.stack(tensors).to(device_of(self.model))).float().cpu().numpy()

    def search(
        self, text: str | None = None, image: Any = None, k: int = 20, min_score: float | None = None
    ) -> list[dict]:
        """The k stored images nearest to a text or an image (exactly one of them), best first, as
        {"id", "path", "caption", "score" (cosine)}; results below `min_score` are dropped."""
        if (text is None) == (image is None):
            raise ValueError("search: give exactly one of text= or image=")
        if text is not None and not text.strip():
            raise ValueError("search: text is empty; expected a description such as 'a red circle'")
        features = self.encode_text([text]) if text is not None else self.encode_images([image])
        return self.search_features(features, k=k, min_score=min_score)[0]

    def similar(self, image_id: int, k: int = 20, min_score: float | None = None) -> list[dict]:
        """The k stored images nearest to stored image `image_id` (itself first)."""
        row = self.connection.execute("SELECT embedding FROM images WHERE id = ?", (int(image_id),)).fetchone()
        if row is None:
            raise ValueError(f"{self.path}: no image with id {image_id}")
        features = np.frombuffer(row[0], dtype=np.float16).astype(np.float32)[None]  # (1, D)
        return self.search_features(features, k=k, min_score=min_score)[0]

    def search_features(self, features: np.ndarray, k: int = 20, min_score: float | None = None) -> list[list[dict]]:
        """One result list per row of unit-norm query features (Q, D) float32; see `search`."""
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        features = np.ascontiguousarray(features, dtype=np.float32)
        if features.ndim != 2 or features.shape[1] != self.info["embed_dim"]:
            raise ValueError(f"expected query features (Q, {self.info['embed_dim']}), got {features.shape}")
        with self.lock:
            scores, ids = self.faiss_index.search(features, min(k, max(1, self.faiss_index.ntotal)))
            rows = self.rows(int(i) for i in ids.ravel() if i >= 0)
        results = []
        for query_scores, query_ids in zip(scores, ids):
            hits = []
            for score, image_id in zip(query_scores.tolist(), query_ids.tolist()):
                if image_id < 0 or image_id not in rows or (min_score is not None and score < min_score):
                    continue
                row = rows[image_id]
                hits.append({"id": image_id, "path": row["path"], "caption": row["caption"], "score": score})
            results.append(hits)
        return results

    def rows(self, ids: Iterable[int]) -> dict[int, dict]:
        """Metadata {id: {"id", "key", "path", "caption", "width", "height", "sha256", "added"}} of the given ids
        (unknown ids are left out)."""
        wanted = sorted(set(ids))
        found: dict[int, dict] = {}
        columns = ("id", "key", "path", "caption", "width", "height", "sha256", "added")
        for start in range(0, len(wanted), 500):
            part = wanted[start : start + 500]
            marks = ",".join("?" * len(part))
            query = f"SELECT {', '.join(columns)} FROM images WHERE id IN ({marks})"
            for values in self.connection.execute(query, part):
                found[values[0]] = dict(zip(columns, values))
        return found

    def features_of(self, ids: Iterable[int]) -> np.ndarray:
        """Stored unit features (N, D) float32 of the given image ids, in the order given; an unknown id is a
        ValueError naming it."""
        ids = [int(i) for i in ids]
        with self.lock:
            found: dict[int, bytes] = {}
            for start in range(0, len(ids), 500):
                part = ids[start : start + 500]
                query = f"SELECT id, embedding FROM images WHERE id IN ({','.join('?' * len(part))})"
                found.update(self.connection.execute(query, part).fetchall())
        missing = [i for i in ids if i not in found]
        if missing:
            raise ValueError(f"{self.path}: no image with id {missing[0]} in the index")
        if not ids:
            return np.zeros((0, self.info["embed_dim"]), dtype=np.float32)
        blob = b"".join(found[i] for i in ids)
        return np.frombuffer(blob, dtype=np.float16).reshape(len(ids), -1).astype(np.float32)  # (N, D)

    def embeddings(self) -> tuple[np.ndarray, np.ndarray]:
        """(ids (N,) int64, unit-norm embeddings (N, D) float32) of every stored image, by id."""
        with self.lock:
            return _read_embeddings(self.connection)

    # -------------------------------------------------------------------------------------- changes

    def add(self, data: str | Path, *, batch_size: int = 256, num_workers: int = 1) -> dict:
        """Embeds `data` and appends its images (duplicates of stored images are skipped) without rebuilding:
        new vectors go into the existing faiss index, which is rebuilt only when it outgrows exact search.
        Resumable like a build. One writer at a time (INDEX/.lock). Returns {"added", "duplicates", "skipped"}."""
        with DirectoryLock(self.path, "change this index"):
            return self._add(data, batch_size=batch_size, num_workers=num_workers)

    def _add(self, data: str | Path, *, batch_size: int, num_workers: int) -> dict:
        source = open_source(data, captions="optional")
        chunk_dir = self.path / CHUNKS_DIR
        chunk_dir.mkdir(exist_ok=True)
        prefix = "add-" + hashlib.sha256(os.path.abspath(data).encode()).hexdigest()[:12] + "-"
        _embed_to_chunks(
            self.model,
            source,
            chunk_dir,
            prefix,
            batch_size=batch_size,
            chunk_size=CHUNK_SIZE,
            num_workers=num_workers,
            rank=0,
            world_size=1,
        )
        with self.lock:
            with self.connection:  # one transaction: all rows or none
                new_ids, counts = _insert_chunks(self.connection, _chunk_files(chunk_dir, prefix, 1), _now())
            if new_ids:
                marks = ",".join("?" * len(new_ids))
                blobs = self.connection.execute(
                    f"SELECT embedding FROM images WHERE id IN ({marks}) ORDER BY id", new_ids
                ).fetchall()
                vectors = np.frombuffer(b"".join(blob for (blob,) in blobs), dtype=np.float16)
                vectors = vectors.reshape(len(new_ids), -1)  # (N, D)
                if self.info["nprobe"] is None and len(self) > self.info["exact_limit"]:
                    self.rebuild_faiss()
                else:
                    self.faiss_index.add_with_ids(vectors.astype(np.float32), np.array(sorted(new_ids), np.int64))
                    write_faiss(self.path / FAISS_FILE, self.faiss_index)
            self._save_info(
                {
                    "data": [*self.info["data"], os.path.abspath(data)],
                    "duplicates": self.info["duplicates"] + counts["duplicates"],
                    "skipped": self.info["skipped"] + counts["skipped"],
                }
            )
        for chunk in chunk_dir.glob(f"{prefix}*"):
            chunk.unlink()
        if not any(chunk_dir.iterdir()):
            chunk_dir.rmdir()
        return {"added": len(new_ids), **counts}

    def remove(self, ids: Iterable[int]) -> int:
        """Drops the given image ids from the metadata and the faiss index; an unknown id is a ValueError
        (nothing is removed then). Returns how many were removed."""
        ids = sorted({int(i) for i in ids})
        with DirectoryLock(self.path, "change this index"), self.lock:
            unknown = sorted(set(ids) - set(self.rows(ids)))
            if unknown:
                shown = ", ".join(str(i) for i in unknown[:10]) + (" ..." if len(unknown) > 10 else "")
                raise ValueError(f"{self.path}: no images with ids {shown}; see `index info` or a search for ids")
            with self.connection:
                self.connection.executemany("DELETE FROM images WHERE id = ?", [(i,) for i in ids])
            self.faiss_index.remove_ids(np.array(ids, dtype=np.int64))
            write_faiss(self.path / FAISS_FILE, self.faiss_index)
            self._save_info({})
        return len(ids)

    # -------------------------------------------------------------------------------------- reports

    def describe(self) -> dict:
        """Counts, model, index type and measured recall (info.json with the live count)."""
        info = dict(self.info)
        info["count"] = len(self)
        info["path"] = str(self.path)
        return info

    def export(self, out: str | Path) -> dict:
        """Writes OUT/embeddings.npy (N, D) float16 and OUT/metadata.jsonl (row i describes embedding i)."""
        out = Path(out)
        with self.lock:
            ids, embeddings = _read_embeddings(self.connection)
            rows = self.rows(ids.tolist())
        _save_npy(out / "embeddings.npy", embeddings.astype(np.float16))
        lines = "".join(json.dumps(rows[int(i)], ensure_ascii=False) + "\n" for i in ids)
        atomic_write(out / "metadata.jsonl", lambda tmp: tmp.write_text(lines, encoding="utf-8"))
        return {"embeddings": str(out / "embeddings.npy"), "metadata": str(out / "metadata.jsonl"), "count": len(ids)}

    def moderate(self, concepts_file: str | Path, calibrate: str | Path | None = None) -> dict:
        """Flags stored images whose cosine similarity to a concept reaches its threshold; see `moderate`."""
        concepts = moderation.read_concepts(concepts_file)
        names = [name for name, _ in concepts]
        ids, embeddings = self.embeddings()
        scores = embeddings @ self.encode_text(names).T  # (N, C)
        calibration = self._calibrate(calibrate, names, ids, scores) if calibrate is not None else {}
        chosen = moderation.thresholds(concepts, calibration)
        flagged_mask = moderation.flag(scores, [threshold for threshold, _ in chosen])  # (N, C)
        report_concepts = []
        for column, (name, (threshold, origin)) in enumerate(zip(names, chosen)):
            entry = {"concept": name, "threshold": threshold, "threshold_from": origin}
            entry["flagged"] = int(flagged_mask[:, column].sum())
            if name in calibration:
                entry.update({key: value for key, value in calibration[name].items() if key != "threshold"})
            report_concepts.append(entry)
        flagged_rows = np.flatnonzero(flagged_mask.any(axis=1))
        metadata = self.rows(ids[flagged_rows].tolist())
        flagged = []
        for row in flagged_rows:
            hits = [
                {"concept": names[column], "score": float(scores[row, column])}
                for column in np.flatnonzero(flagged_mask[row])
            ]
            hits.sort(key=lambda hit: -hit["score"])
            meta = metadata[int(ids[row])]
            flagged.append({"id": int(ids[row]), "path": meta["path"], "caption": meta["caption"], "concepts": hits})
        return {"images": len(ids), "concepts": report_concepts, "flagged": flagged}

    def _calibrate(self, labels_file: str | Path, names: list[str], ids: np.ndarray, scores: np.ndarray) -> dict:
        """The labelled images of `labels_file` found in the index, then `moderation.calibrate` on them."""
        labels = moderation.read_labels(labels_file)
        lookup: dict[str, int] = {}
        for image_id, row in self.rows(ids.tolist()).items():
            for name in (str(image_id), row["key"], row["path"], os.path.basename(row["path"])):
                lookup.setdefault(name, image_id)
        position = {int(image_id): row for row, image_id in enumerate(ids.tolist())}
        labelled: dict[int, set[str]] = {}
        for line, image, concept in labels:
            image_id = lookup.get(image)
            if image_id is None:  # a file on disk: found by content, so a duplicate's other copy matches too
                image_id = self._id_of_file(image, Path(labels_file).parent)
            if image_id is None:
                raise ValueError(
                    f"{labels_file}:{line}: image {image!r} is not in the index (give its id, key, path or file name)"
                )
            if concept != "none" and concept not in names:
                raise ValueError(f"{labels_file}:{line}: concept {concept!r} is not in the concepts file ({names})")
            labelled.setdefault(image_id, set())
            if concept != "none":
                labelled[image_id].add(concept)
        labelled_rows = np.array([position[i] for i in labelled], dtype=np.int64)
        return moderation.calibrate(scores, labelled_rows, list(labelled.values()), names)

    def _id_of_file(self, name: str, base: Path) -> int | None:
        for candidate in (Path(name), base / name):
            if candidate.is_file():
                sha256 = file_sha256(candidate)
                row = self.connection.execute("SELECT id FROM images WHERE sha256 = ?", (sha256,)).fetchone()
                return None if row is None else int(row[0])
        return None


# ------------------------------------------------------------------------------------------ CLI functions


def _with_index(index: str | Path | Index, call: Any, device: str = "cpu", backend: str = "auto") -> Any:
    """Calls `call(Index)` with an open Index (opened and closed here when given a path)."""
    owned = not isinstance(index, Index)
    opened = Index.open(index, device=device, backend=backend) if owned else index
    try:
        return call(opened)
    finally:
        if owned:
            opened.close()


def add_to_index(
    index: str | Path | Index,
    data: str | Path,
    *,
    batch_size: int = 256,
    num_workers: int = 1,
    device: str = "cpu",
    backend: str = "auto",
) -> dict:
    """Appends the images of `data` to the index; {"added", "duplicates", "skipped"}."""

    def add(opened: Index) -> dict:
        return opened.add(data, batch_size=batch_size, num_workers=num_workers)

    return _with_index(index, add, device, backend)


def remove_from_index(index: str | Path | Index, ids: Iterable[int]) -> int:
    """Removes images by id; returns how many."""
    return _with_index(index, lambda opened: opened.remove(ids))


def index_info(index: str | Path | Index) -> dict:
    """Counts, CLIP run and weights hash, index type, nprobe and recall@10, without loading the CLIP."""
    if isinstance(index, Index):
        return index.describe()
    path = Path(index)
    info = _read_info(path)
    with sqlite3.connect(path / META_FILE) as connection:
        info["count"] = int(connection.execute("SELECT COUNT(*) FROM images").fetchone()[0])
    connection.close()
    info["path"] = str(path)
    return info


def stored_captions(index: str | Path | Index) -> list[str]:
    """Every stored image's captions (its caption lines joined by newlines), without loading the CLIP."""
    if isinstance(index, Index):
        with index.lock:
            return [caption for (caption,) in index.connection.execute("SELECT caption FROM images ORDER BY id")]
    path = Path(index)
    _read_info(path)
    connection = sqlite3.connect(path / META_FILE)
    try:
        return [caption for (caption,) in connection.execute("SELECT caption FROM images ORDER BY id")]
    finally:
        connection.close()


def export_index(index: str | Path | Index, out: str | Path) -> dict:
    """Writes OUT/embeddings.npy and OUT/metadata.jsonl; returns their paths and the count."""
    return _with_index(index, lambda opened: opened.export(out))


def search(
    index: str | Path | Index,
    text: str | None = None,
    image: Any = None,
    k: int = 20,
    min_score: float | None = None,
    device: str = "cpu",
    backend: str = "auto",
) -> list[dict]:
    """Text->image or image->image search; a list of {"id", "path", "caption", "score"}, best first."""

    def query(opened: Index) -> list[dict]:
        return opened.search(text=text, image=image, k=k, min_score=min_score)

    return _with_index(index, query, device, backend)


def moderate(
    index: str | Path | Index,
    concepts_file: str | Path,
    calibrate: str | Path | None = None,
    device: str = "cpu",
    backend: str = "auto",
) -> dict:
    """Flags images by concept. Returns {"images": N, "concepts": [{"concept", "threshold", "threshold_from"
    ("file" | "calibrated" | "default"), "flagged", and with calibration "precision", "recall", "f1",
    "positives", "labelled"}], "flagged": [{"id", "path", "caption", "concepts": [{"concept", "score"}]}]}."""
    return _with_index(index, lambda opened: opened.moderate(concepts_file, calibrate), device, backend)
