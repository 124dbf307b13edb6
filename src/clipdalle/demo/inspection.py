"""The data report: what a collection holds, read once before anything trains, and the validation split it makes.

`inspect_collection(data)` decodes every image of a folder, manifest or shards once and reports the image count,
sizes and colour modes, the unreadable files, the captions (how many per image, their length in words and in
caption-tokenizer tokens, how many repeat), exact duplicates (the same pixels) and near duplicates (32 x 32
thumbnails within NEAR_DUPLICATE_RMS of each other), and how the validation split is made:

- a folder with train/ and val/ subfolders keeps them;
- a folder or manifest is split by a hash of each *duplicate group* (an image and its exact and near duplicates
  share the smallest key among them), so no held-out image has a copy in training; the pipeline writes the split as
  two manifests (`write_split`), which every stage reads;
- shards are split by a hash of each sample's key (`data.sources.is_validation`, as the training commands do), and
  duplicates found across the split are reported.

The held-out share aims at VAL_TARGET images, within VAL_FRACTION_RANGE. Captions can come from folder and file
names instead of .txt files (`captions_from="names"`: "dogs/beagle_01.jpg" -> "beagle, dogs").
"""

from __future__ import annotations

import hashlib
import json
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..data.sources import FileSource, ShardSource, is_validation, name_caption, open_source, resolve_splits
from ..io import atomic_write, write_json
from ..transforms import BadImage

CAPTION_SOURCES = ("txt", "names")  # same-stem .txt files or a manifest's caption column; or file and folder names
THUMBNAIL_SIDE = 32  # near duplicates are compared as 32 x 32 RGB thumbnails (box-filtered); at 16 x 16 two words in
# low-contrast colours ("bake" and "cake", red on orange) were already within 4/255
NEAR_DUPLICATE_RMS = 3 / 255  # RMS difference of two thumbnails below which the images are near duplicates
NEAR_DUPLICATE_LIMIT = 20_000  # above this many images near duplicates are not searched (comparisons grow as N^2)
VAL_TARGET = 128  # held-out images the split aims at: enough for R-precision over 100 prompts
VAL_FRACTION_RANGE = (0.02, 0.15)  # but never less than 2 % (large collections) or more than 15 % (small ones)
TOKENIZER_VOCAB = 1000  # the caption tokenizer the plan trains (the demo's size); captions are measured in its tokens
EXAMPLES = 5  # file names shown per finding
PROGRESS_FROM = 2000  # a progress bar for collections of this many images (smaller ones are read in a second)


@dataclass
class Item:
    """One sample as read: its key, image file (None inside shards), captions, split and size."""

    key: str
    image: str | None
    captions: tuple[str, ...]
    width: int
    height: int
    split: str = "train"


def val_fraction_for(images: int) -> float:
    """The held-out share: VAL_TARGET images, within VAL_FRACTION_RANGE."""
    low, high = VAL_FRACTION_RANGE
    return min(high, max(low, VAL_TARGET / max(1, images)))


def thumbnail(image: Image.Image) -> np.ndarray:
    """The image as THUMBNAIL_SIDE x THUMBNAIL_SIDE RGB values in [0, 1], flattened (3 * side * side,)."""
    small = image.convert("RGB").resize((THUMBNAIL_SIDE, THUMBNAIL_SIDE), Image.BOX)
    return np.asarray(small, dtype=np.float32).reshape(-1) / 255.0


def near_duplicate_pairs(thumbnails: np.ndarray, threshold: float = NEAR_DUPLICATE_RMS) -> list[tuple[int, int]]:
    """Index pairs (i < j) of thumbnails (N, D) whose RMS difference is below `threshold` (in chunks of 1,024 rows:
    |a - b|^2 = |a|^2 + |b|^2 - 2 a.b)."""
    values = torch.from_numpy(thumbnails)  # (N, D) float32
    squares = values.square().sum(1)  # (N,)
    limit = threshold**2 * values.shape[1]
    pairs = []
    for start in range(0, len(values), 1024):
        block = values[start : start + 1024]  # (b, D)
        distance = squares[start : start + 1024, None] + squares[None, :] - 2 * block @ values.T  # (b, N)
        rows, columns = torch.nonzero(distance <= limit, as_tuple=True)
        for row, column in zip((rows + start).tolist(), columns.tolist()):
            if row < column:
                pairs.append((row, column))
    return pairs


def duplicate_groups(count: int, pairs: list[tuple[int, int]]) -> list[int]:
    """The group of each of `count` items joined by `pairs` (union-find): its smallest member's index."""
    parent = list(range(count))

    def root(index: int) -> int:
        while parent[index] != index:
            parent[index] = parent[parent[index]]
            index = parent[index]
        return index

    for first, second in pairs:
        a, b = root(first), root(second)
        if a != b:
            parent[max(a, b)] = min(a, b)
    return [root(index) for index in range(count)]


def _distribution(values: list[int]) -> dict[str, float]:
    if not values:
        return {"min": 0, "median": 0, "p95": 0, "p99": 0, "max": 0}
    ordered = sorted(values)

    def at(share: float) -> int:
        return ordered[min(len(ordered) - 1, int(share * len(ordered)))]

    median = statistics.median(ordered)
    return {"min": ordered[0], "median": median, "p95": at(0.95), "p99": at(0.99), "max": ordered[-1]}


def _kind(source: Any, path: str) -> str:
    if isinstance(source, ShardSource):
        return "shards"
    return "manifest" if Path(path).is_file() else "folder"


def inspect_collection(
    data: str | Path, captions_from: str = "txt", progress: bool = True
) -> tuple[dict[str, Any], list[Item]]:
    """(the report, every readable sample with its split) of the collection at `data`. Problems the user must fix
    (no captions, no readable image) are one-line ValueErrors."""
    from tqdm import tqdm

    if captions_from not in CAPTION_SOURCES:
        raise ValueError(f"--captions-from {captions_from!r}: expected one of {', '.join(CAPTION_SOURCES)}")
    started = time.perf_counter()
    train_path, val_path = resolve_splits(data)
    parts = {"train": train_path} if val_path is None else {"train": train_path, "val": val_path}
    mode = "none" if captions_from == "names" else "optional"
    sources = {split: open_source(path, captions=mode) for split, path in parts.items()}
    kind = _kind(sources["train"], str(train_path))
    if captions_from == "names" and kind == "shards":
        raise ValueError(f"{data}: --captions-from names needs image files (a folder or a manifest), not shards")

    items: list[Item] = []
    pixel_hashes: list[str] = []
    thumbnails: list[np.ndarray] = []
    unreadable: list[str] = []
    uncaptioned: list[str] = []
    modes: dict[str, int] = {}
    listed = sum(len(source) if isinstance(source, FileSource) else 0 for source in sources.values()) or None
    shown = progress and (listed is None or listed >= PROGRESS_FROM)
    bar = tqdm(total=listed, desc="reading the collection", unit="img", disable=not shown)
    for split, source in sources.items():
        for record in source:
            bar.update(1)
            try:
                image = record.decode()
            except BadImage:
                unreadable.append(record.name)
                continue
            captions = (name_caption(record.key),) if captions_from == "names" else record.captions
            captions = tuple(caption for caption in captions if caption)
            if not captions:
                uncaptioned.append(record.name)
                continue
            modes[image.mode] = modes.get(image.mode, 0) + 1
            rgb = image.convert("RGB")
            pixel_hashes.append(hashlib.sha1(rgb.tobytes() + str(rgb.size).encode()).hexdigest())
            thumbnails.append(thumbnail(rgb))
            path = os.path.abspath(record.path) if record.path is not None else None
            items.append(Item(record.key, path, captions, image.width, image.height, split))
    bar.close()
    if uncaptioned and captions_from == "txt":
        raise ValueError(
            f"{data}: {len(uncaptioned)} of {len(uncaptioned) + len(items)} readable images have no caption (e.g. "
            f"{uncaptioned[0]}); give each a same-stem .txt file, pass a CSV/JSONL manifest with image and caption "
            "columns as --data, or take captions from the file and folder names with --captions-from names"
        )
    if not items:
        raise ValueError(f"{data}: no readable image with a caption ({len(unreadable)} unreadable)")

    exact: dict[str, list[int]] = {}
    for index, digest in enumerate(pixel_hashes):
        exact.setdefault(digest, []).append(index)
    exact_pairs = [(group[0], other) for group in exact.values() for other in group[1:]]
    searched_near = len(items) <= NEAR_DUPLICATE_LIMIT
    near_pairs = near_duplicate_pairs(np.stack(thumbnails)) if searched_near else []
    near_pairs = [pair for pair in near_pairs if pixel_hashes[pair[0]] != pixel_hashes[pair[1]]]
    groups = duplicate_groups(len(items), exact_pairs + near_pairs)

    fraction = None
    if val_path is not None:
        rule = f"the folder's own split: {train_path} and {val_path}"
    elif kind == "shards":
        fraction = val_fraction_for(len(items))
        rule = (
            f"{100 * fraction:.1f} % held out by a hash of each sample's key (sha1 below the fraction), the same in "
            "every run; shards are read as they are, so duplicates can straddle the split (counted below)"
        )
        for item in items:
            item.split = "val" if is_validation(item.key, fraction) else "train"
    else:
        fraction = val_fraction_for(len(items))
        rule = (
            f"{100 * fraction:.1f} % held out (aiming at {VAL_TARGET} images) by a hash of each duplicate group (an "
            "image with its exact and near duplicates, keyed by the smallest key among them), so no held-out image "
            "has a copy in training; written as OUT/data/train.jsonl and val.jsonl"
        )
        for item, group in zip(items, groups):
            item.split = "val" if is_validation(items[group].key, fraction) else "train"
    straddling = sum(1 for index, group in enumerate(groups) if items[index].split != items[group].split)

    from ..tokenizers import CaptionTokenizer

    texts = [caption for item in items for caption in item.captions]
    tokenizer = CaptionTokenizer.train(iter(texts), TOKENIZER_VOCAB)
    token_lengths = [len(encoding.ids) for encoding in tokenizer.tokenizer.encode_batch(texts)]
    first_captions = [item.captions[0] for item in items]
    sides = [min(item.width, item.height) for item in items]
    counts = {split: sum(item.split == split for item in items) for split in ("train", "val")}
    exact_groups = [group for group in exact.values() if len(group) > 1]
    report = {
        "data": str(data),
        "kind": kind,
        "images": len(items) + len(unreadable) + len(uncaptioned),
        "readable": len(items),
        "unreadable": {"count": len(unreadable), "examples": unreadable[:EXAMPLES]},
        "uncaptioned": {"count": len(uncaptioned), "examples": uncaptioned[:EXAMPLES]},
        "sizes": {
            "short_side": _distribution(sides),
            "non_square": sum(item.width != item.height for item in items),
            "modes": dict(sorted(modes.items(), key=lambda pair: -pair[1])),
        },
        "captions": {
            "from": "file and folder names" if captions_from == "names" else "captions given with the images",
            "total": len(texts),
            "per_image": _distribution([len(item.captions) for item in items]),
            "words": _distribution([len(text.split()) for text in texts]),
            "tokens": _distribution(token_lengths),
            "distinct_first_captions": len(set(first_captions)),
            "examples": first_captions[:EXAMPLES],
        },
        "exact_duplicates": {
            "groups": len(exact_groups),
            "images": sum(len(group) for group in exact_groups),
            "examples": [[items[index].key for index in group[:3]] for group in exact_groups[:EXAMPLES]],
        },
        "near_duplicates": {
            "searched": searched_near,
            "pairs": len(near_pairs),
            "threshold_rms": NEAR_DUPLICATE_RMS,
            "examples": [[items[a].key, items[b].key] for a, b in near_pairs[:EXAMPLES]],
        },
        "split": {
            "rule": rule,
            "val_fraction": fraction,
            "train": counts["train"],
            "val": counts["val"],
            "duplicates_across_split": straddling,
        },
        "token_lengths": token_lengths,
        "seconds": round(time.perf_counter() - started, 1),
    }
    if counts["val"] < 2 or counts["train"] < 8:
        raise ValueError(
            f"{data}: {counts['train']} training and {counts['val']} held-out images after the split; the pipeline "
            "needs at least 8 and 2 (add images)"
        )
    return report, items


def captions_longer_than(report: dict[str, Any], length: int) -> int:
    """How many captions have more tokens (with <bos> and <eos>) than a model's text length: they are cut."""
    return sum(tokens > length for tokens in report["token_lengths"])


def write_split(items: list[Item], folder: Path) -> dict[str, Path]:
    """FOLDER/train.jsonl, val.jsonl and all.jsonl: manifests of the split (absolute image paths, every caption)."""
    paths = {}
    for name, chosen in (
        ("train", [item for item in items if item.split == "train"]),
        ("val", [item for item in items if item.split == "val"]),
        ("all", items),
    ):
        rows = [{"image": item.image, "caption": list(item.captions)} for item in chosen]
        text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        paths[name] = atomic_write(folder / f"{name}.jsonl", lambda tmp, text=text: tmp.write_text(text, "utf-8"))
    return paths


def write_report(report: dict[str, Any], path: Path) -> Path:
    return write_json(path, report)


def format_report(report: dict[str, Any]) -> str:
    """The data report as the lines `clipdalle pipeline` prints."""
    sizes, captions, split = report["sizes"], report["captions"], report["split"]
    side = sizes["short_side"]
    modes = ", ".join(f"{mode} {count}" for mode, count in sizes["modes"].items())
    lines = [
        f"data: {report['data']} ({report['kind']}), read in {report['seconds']:.0f} s",
        f"  images: {report['readable']:,} readable of {report['images']:,}; unreadable {report['unreadable']['count']}"
        + (f" (e.g. {report['unreadable']['examples'][0]})" if report["unreadable"]["count"] else ""),
        f"  sizes: shorter side {side['min']}-{side['max']} px (median {side['median']:g}); "
        f"{sizes['non_square']} not square (centre-cropped); modes {modes}",
        f"  captions: {captions['from']}; {captions['total']:,} for {report['readable']:,} images "
        f"(max {captions['per_image']['max']} per image), {captions['words']['median']:g} words median "
        f"(max {captions['words']['max']}), {captions['tokens']['median']:g} tokens median, 99 % within "
        f"{captions['tokens']['p99']}, max {captions['tokens']['max']}; "
        f"{captions['distinct_first_captions']:,} distinct; e.g. {captions['examples'][0]!r}",
    ]
    if report["uncaptioned"]["count"]:
        lines.append(
            f"  no caption from the name: {report['uncaptioned']['count']} image(s) left out "
            f"(e.g. {report['uncaptioned']['examples'][0]})"
        )
    exact, near = report["exact_duplicates"], report["near_duplicates"]
    near_text = (
        f"{near['pairs']} near-duplicate pair(s) ({THUMBNAIL_SIDE} x {THUMBNAIL_SIDE} thumbnails within "
        f"{255 * near['threshold_rms']:.0f}/255 RMS)"
        if near["searched"]
        else f"near duplicates not searched above {NEAR_DUPLICATE_LIMIT:,} images"
    )
    example = f", e.g. {' = '.join(exact['examples'][0][:2])}" if exact["groups"] else ""
    lines.append(f"  duplicates: {exact['groups']} group(s) of identical images ({exact['images']} images){example}; "
                 f"{near_text}")  # fmt: skip
    lines.append(f"  split: {split['train']:,} training, {split['val']:,} held out: {split['rule']}")
    if split["duplicates_across_split"]:
        lines.append(f"  warning: {split['duplicates_across_split']} duplicate(s) on the other side of the split")
    return "\n".join(lines)
