"""The token cache: a dataset encoded once by a dVAE, so DALL·E training reads codes instead of decoding images.

    DIR/info.json            the dVAE's weights hash, the data it came from, counts per split (written last)
    DIR/{train,val}-NNNNN.npz  `codes` (N, h*w) int16, and the keys and captions (one per line) of the N samples
                             as UTF-8 bytes one after another, `keys_utf8` / `captions_utf8` (uint8), with
                             `keys_ends` / `captions_ends` (N,) int64 where each sample's text ends; with views,
                             training chunks also hold `views` (N, V - 1, h*w) int16: the codes of V - 1
                             augmented crops of each image (random resized crop and shift, colours untouched)

No pickles: every array is numeric, read with `allow_pickle=False`. Texts are stored by their length, not padded
to the longest one (a fixed-width unicode array of 50,000 rows with one 200 kB caption would take 40 GB). A cache
whose info.json names another dVAE, dataset or format is rebuilt, so a DALL·E run never trains on codes of the
wrong tokenizer.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from ..checkpoint import weights_path
from ..data.loader import Augment, SampleStream, make_loader
from ..data.sources import Record, Source, open_source, resolve_splits
from ..io import DirectoryLock, atomic_write, file_sha256, read_json, write_json

CHUNK_SIZE = 50_000  # images per file: 50k x 64 codes x 2 bytes = 6.4 MB at 8x8
INFO_FILE = "info.json"
FORMAT_VERSION = 2  # 2: texts as UTF-8 bytes + end offsets (1 had fixed-width unicode arrays)


def weights_sha256(run_dir: str | Path) -> str:
    """The SHA-256 of the weights file loading reads (`checkpoint.weights_path`: RUN/best/ when the run kept one):
    what a token cache and a DALL·E run record of their dVAE."""
    return file_sha256(weights_path(run_dir))


class CodeSource(Source):
    """A split of a token cache as a Source: records carry `codes` (h*w,) and captions, no image."""

    def __init__(self, folder: Path, split: str, chunks: list[str]):
        super().__init__(folder, chunks)
        self.folder = folder
        self.split = split

    def records(self, unit: str) -> Iterator[Record]:
        self._check_unit(unit)
        with np.load(self.folder / unit, allow_pickle=False) as arrays:
            keys = unpack_texts(arrays["keys_utf8"], arrays["keys_ends"])
            captions = unpack_texts(arrays["captions_utf8"], arrays["captions_ends"])
            codes = arrays["codes"]
            if "views" in arrays.files:  # the centre crop first, then the augmented views: (N, V, h*w)
                codes = np.concatenate([codes[:, None], arrays["views"]], axis=1)
        for key, caption_lines, row in zip(keys, captions, codes):
            captions_tuple = tuple(line for line in caption_lines.split("\n") if line)
            yield Record(key=key, name=f"{self.folder / unit}:{key}", captions=captions_tuple, codes=row)


def pack_texts(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Texts -> (their UTF-8 bytes one after another (uint8), where each one ends (N,) int64): storage that follows
    the texts' lengths."""
    encoded = [text.encode("utf-8") for text in texts]
    data = np.frombuffer(b"".join(encoded), dtype=np.uint8)
    return data, np.cumsum([len(item) for item in encoded], dtype=np.int64)


def unpack_texts(data: np.ndarray, ends: np.ndarray) -> list[str]:
    """The texts `pack_texts` packed."""
    raw = data.tobytes()
    starts = [0, *ends[:-1].tolist()]
    return [raw[start:end].decode("utf-8") for start, end in zip(starts, ends.tolist())]


def views_settings(views: int, augment: Augment | None) -> dict[str, Any]:
    """What a cache records of its views: their count and the augmentation that made them."""
    if views < 1:
        raise ValueError(f"code views: expected at least 1 (the centre crop), got {views}")
    if views > 1 and augment is None:
        raise ValueError(
            f"{views} code views need an augmentation (crop_scale below 1 or max_shift above 0); without one every "
            "view would be the centre crop"
        )
    if views == 1:
        return {"views": 1}
    return {"views": views, "min_scale": augment.min_scale, "max_shift": augment.max_shift}


def cache_is_current(
    folder: str | Path, vae_run: str | Path, data: str | Path, views: int = 1, augment: Augment | None = None
) -> bool:
    path = Path(folder) / INFO_FILE
    if not path.exists():
        return False
    info = read_json(path)
    return (
        info.get("format_version") == FORMAT_VERSION
        and info.get("vae_sha256") == weights_sha256(vae_run)
        and info.get("data") == str(data)
        and info.get("views", {"views": 1}) == views_settings(views, augment)
    )


def open_code_cache(folder: str | Path, split: str) -> CodeSource:
    folder = Path(folder)
    if not (folder / INFO_FILE).exists():
        raise ValueError(f"{folder}: not a complete token cache (no {INFO_FILE}); run `clipdalle tokens cache`")
    version = read_json(folder / INFO_FILE).get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(
            f"{folder}: a token cache of format {version or 1}, this clipdalle reads format {FORMAT_VERSION}; "
            "rebuild it with `clipdalle tokens cache`"
        )
    chunks = sorted(path.name for path in folder.glob(f"{split}-*.npz"))
    if not chunks:
        raise ValueError(f"{folder}: the token cache has no {split} split")
    return CodeSource(folder, split, chunks)


@torch.no_grad()
def build_code_cache(
    vae: torch.nn.Module,
    vae_run: str | Path,
    data: str | Path,
    folder: str | Path,
    *,
    val_data: str | Path | None = None,
    batch_size: int = 256,
    num_workers: int = 1,
    device: str | torch.device = "cpu",
    views: int = 1,
    augment: Augment | None = None,
) -> dict[str, Any]:
    """Encodes every image of `data` (and its validation split, when it has one) into `folder`.

    Images are centre-cropped; with `views` > 1 each training image is also encoded as `views - 1` crops drawn by
    `augment` (view v seeded by v, so the same views every build), which DALL·E training draws from, one per epoch.
    Validation images are only centre-cropped. Unreadable images are skipped and counted. One build per folder at a
    time (FOLDER/.lock). Returns the info written to info.json."""
    settings = views_settings(views, augment)
    folder = Path(folder)
    with DirectoryLock(folder, "build a token cache"):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / INFO_FILE).unlink(missing_ok=True)
        for stale in folder.glob("*.npz"):
            stale.unlink()
        train_path, val_path = resolve_splits(data, val_data)
        splits = {"train": train_path} if val_path is None else {"train": train_path, "val": val_path}
        counts: dict[str, int] = {}
        skipped = 0
        vae = vae.to(device).eval()
        for split, path in splits.items():
            source = open_source(path, captions="required")
            split_views = views if split == "train" else 1

            def view_stream(view: int, source: Source = source) -> SampleStream:
                return SampleStream(
                    source,
                    image_size=vae.config.image_size,
                    batch_size=batch_size,
                    seed=view,
                    augment=augment if view > 0 else None,
                    shuffle=False,
                    infinite=False,
                    keep_all_captions=True,
                )

            writer = ChunkWriter(folder, split)
            counts[split] = 0
            loaders = [make_loader(view_stream(view), num_workers) for view in range(split_views)]
            for batch, *other_views in tqdm(zip(*loaders), desc=f"encoding {split} images", unit="batch"):
                skipped += batch["skipped"]
                if not batch["keys"]:
                    continue
                batch_codes = vae.encode(batch["images"].to(device)).flatten(1)  # (B, h*w)
                extra = None
                if other_views:  # the same images in the same order, each cropped its own way
                    extra = torch.stack(
                        [vae.encode(view["images"].to(device)).flatten(1) for view in other_views], 1
                    )  # (B, V-1, h*w)
                    extra = extra.to(torch.int16).cpu().numpy()
                writer.add(batch["keys"], batch["captions"], batch_codes.to(torch.int16).cpu().numpy(), extra)
                counts[split] += len(batch["keys"])
            writer.flush()
            if counts[split] == 0:
                raise ValueError(f"{path}: no readable images to encode")
        info = {
            "format_version": FORMAT_VERSION,
            "vae_sha256": weights_sha256(vae_run),
            "data": str(data),
            "grid_size": vae.config.grid_size,
            "vocab_size": vae.config.vocab_size,
            "counts": counts,
            "skipped_images": skipped,
            "holdout": val_path is None,
            "views": settings,
        }
        write_json(folder / INFO_FILE, info)
        return info


class ChunkWriter:
    """Collects encoded samples of one split and writes them as `{split}-NNNNN.npz` files of CHUNK_SIZE rows."""

    def __init__(self, folder: Path, split: str):
        self.folder, self.split, self.chunk = folder, split, 0
        self.keys: list[str] = []
        self.captions: list[str] = []
        self.codes: list[np.ndarray] = []
        self.views: list[np.ndarray] = []

    def add(self, keys: list[str], captions: list[str], codes: np.ndarray, views: np.ndarray | None = None) -> None:
        self.keys += keys
        self.captions += captions
        self.codes.append(codes)
        if views is not None:
            self.views.append(views)
        if len(self.keys) >= CHUNK_SIZE:
            self.flush()

    def flush(self) -> None:
        if not self.keys:
            return
        keys_utf8, keys_ends = pack_texts(self.keys)
        captions_utf8, captions_ends = pack_texts(self.captions)
        arrays = {
            "keys_utf8": keys_utf8,
            "keys_ends": keys_ends,
            "captions_utf8": captions_utf8,
            "captions_ends": captions_ends,
            "codes": np.concatenate(self.codes),
        }
        if self.views:
            arrays["views"] = np.concatenate(self.views)  # (N, V-1, h*w)

        def save(path: Path) -> None:
            with open(path, "wb") as handle:
                np.savez(handle, **arrays)

        atomic_write(self.folder / f"{self.split}-{self.chunk:05d}.npz", save)
        self.chunk += 1
        self.keys, self.captions, self.codes, self.views = [], [], [], []
