"""Where samples come from: folders of images with .txt captions, WebDataset .tar shards, manifests, labelled sets.

A `Source` lists its samples as `units`: independent pieces in a fixed order that can be read separately (a
chunk of 64 files, or one shard), so the loader can deal units to DDP ranks and loader workers. Reading a unit
gives `Record`s: a stable key, encoded image bytes or an image path, and captions (or a label). Images are decoded
only when a reader asks (`Record.decode`), and an unreadable one raises `BadImage` for the loader to count.

Problems the user must fix before anything runs (missing path, no images, an image without a caption file, a
manifest without the needed columns, an unknown format) raise one-line errors naming the file. What is found
only while reading, deep into a long run, never raises: a damaged shard yields its good records, then one Record
with `error` set; an unreadable caption (not UTF-8, not a regular file, too large, missing from a shard), a
special file (FIFO, device) or an oversized image or member gives a Record with `error` set, which the loader
skips and counts like an unreadable image, and is named once in a `DataWarning`. Files are read only when
regular and within a size cap checked before reading (from the file's stat or the tar header). Captions are read
only by what needs them (`captions="none"` never opens a caption file).
"""

from __future__ import annotations

import csv
import errno
import glob
import hashlib
import io
import json
import os
import posixpath
import re
import tarfile
import warnings
import zlib
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from PIL import Image

from ..io import read_file
from ..transforms import MAX_IMAGE_BYTES, BadImage, decode_image

IMAGE_EXTENSIONS = (".bmp", ".gif", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp")  # matched case-insensitively
SHARD_EXTENSIONS = (".tar", ".tar.gz", ".tgz")  # streamed with tarfile "r|*", which also reads compressed shards
MANIFEST_EXTENSIONS = (".csv", ".tsv", ".jsonl")
UNIT_SIZE = 64  # images per unit for folders and manifests: small datasets still split across processes
CAPTION_MODES = ("required", "optional", "none")  # "none": captions are never read (image-only training)
MAX_CAPTION_BYTES = 1 << 20  # a caption file or member: thousands of captions, far below a worker's memory
MAX_MANIFEST_BYTES = 1 << 30  # a manifest is read whole; bigger collections belong in shards

_SUPPORTED = (
    "a folder of images with same-stem .txt captions, .tar shards (a file, a glob, a {000..009} brace pattern "
    "or a folder of .tar files), or a .csv/.tsv/.jsonl manifest with 'image' and 'caption' columns"
)


class DataWarning(UserWarning):
    """A sample skipped or a dataset oddity worked around; the message names the file."""


def warn(message: str) -> None:
    """A DataWarning: Python's default filter shows each distinct message once per process."""
    warnings.warn(message, DataWarning, stacklevel=2)


@dataclass(frozen=True)
class Record:
    key: str  # stable unique sample id ("sub/dir/stem", or "shardstem/key" for tars); also drives the val split
    name: str  # for messages: the image file, or "path/shard.tar:key.png"
    path: Path | None = None  # image file (folder, manifest)
    data: bytes | None = None  # encoded image bytes (tar member)
    captions: tuple[str, ...] = ()  # one caption per non-blank line of the .txt (or per manifest row)
    label: str | None = None  # class name, for labelled evaluation data only
    error: str | None = None  # set when the record could not be read (e.g. truncated tar); the loader skips+counts it
    codes: Any = None  # dVAE code ids (h*w,) for records of a token cache (data/codes.py); no image then
    shard: str | None = None  # the shard holding the image (as given), for tar members
    member: str | None = None  # the image's member name in that shard, exactly as stored (any letter case)

    def read_bytes(self) -> bytes:
        """The encoded image: the tar member's bytes, or the image file's contents; BadImage for a record that
        could not be read (`error`), OSError for a file that cannot be."""
        if self.error is not None:
            raise BadImage(self.error)
        if self.data is not None:
            return self.data
        if self.path is not None:
            return read_file(self.path, MAX_IMAGE_BYTES, "image file")
        raise ValueError(f"{self.name}: record has no image ({self.error or 'neither data nor path set'})")

    def decode(self, data: bytes | None = None) -> Image.Image:
        """The record's image as RGB (`transforms.decode_image`), from `data` when the caller has read the bytes
        already; a record that could not be read raises BadImage naming it, so a loader can skip and count it."""
        if self.error is not None:
            raise BadImage(self.error)
        if data is None:
            try:
                data = self.read_bytes()
            except OSError as error:
                raise BadImage(f"{self.name}: cannot read the file ({error.strerror or error})") from None
        return decode_image(data, self.name)


class Source(ABC):
    """Samples in `units`, each readable on its own with `records(unit)`; iterating reads every unit in order."""

    def __init__(self, path: str | Path, units: list[str]):
        self.path = path  # what the user gave: a folder, a file or a shard pattern
        self.units = units  # independent pieces in a fixed sorted order
        self._unit_set = set(units)

    @abstractmethod
    def records(self, unit: str) -> Iterator[Record]:
        """The records of one unit, in a fixed order."""

    def __iter__(self) -> Iterator[Record]:
        for unit in self.units:
            yield from self.records(unit)

    def keys(self) -> Iterator[str]:
        """Every sample's key in order (sources that list their files answer without reading them)."""
        return (record.key for record in self)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r}, {len(self.units)} units)"

    def _check_unit(self, unit: str) -> None:
        if unit not in self._unit_set:
            known = f"{self.units[0]!r} .. {self.units[-1]!r}" if self.units else "none"
            raise ValueError(f"{self.path}: no unit {unit!r} in this source (its {len(self.units)} units: {known})")


# ---------------------------------------------------------------------------------------------- files


class _Entry(NamedTuple):
    """One listed image. Plain strings, not Paths: building 100k Path objects costs seconds."""

    key: str
    image: str
    caption_file: str | None = None  # read at records() time (folders)
    captions: tuple[str, ...] = ()  # known up front (manifests)
    label: str | None = None


class FileSource(Source):
    """Image files listed up front (a folder tree or a manifest); units are chunks of UNIT_SIZE images."""

    def __init__(self, path: str | Path, entries: list[_Entry]):
        count = (len(entries) + UNIT_SIZE - 1) // UNIT_SIZE
        width = len(str(max(count - 1, 0)))  # zero-padded ids sort the same as strings and as numbers
        super().__init__(path, [str(index).zfill(width) for index in range(count)])
        self._entries = entries

    def __len__(self) -> int:
        return len(self._entries)

    def keys(self) -> Iterator[str]:
        return (entry.key for entry in self._entries)

    def records(self, unit: str) -> Iterator[Record]:
        self._check_unit(unit)
        start = int(unit) * UNIT_SIZE
        for entry in self._entries[start : start + UNIT_SIZE]:
            captions, error = entry.captions, None
            if entry.caption_file is not None:
                try:
                    captions = _caption_lines(read_file(entry.caption_file, MAX_CAPTION_BYTES, "caption file"))
                except (OSError, UnicodeDecodeError) as problem:
                    error = _unreadable_caption(entry.caption_file, problem)
            path = Path(entry.image)
            yield Record(key=entry.key, name=entry.image, path=path, captions=captions, label=entry.label, error=error)


def _caption_lines(data: bytes) -> tuple[str, ...]:
    """One caption per non-blank line (whitespace stripped; a UTF-8 byte-order mark is dropped); UnicodeDecodeError
    for text that is not UTF-8."""
    text = data.decode("utf-8-sig")
    return tuple(line.strip() for line in text.splitlines() if line.strip())


def _unreadable_caption(name: str, problem: Exception) -> str:
    """The error of a sample whose caption cannot be read, warned about once; the loader skips and counts it."""
    if isinstance(problem, UnicodeDecodeError):
        found = problem.object[problem.start : problem.start + 1]
        why = f"not UTF-8 (byte {problem.start}: {found!r}); re-save it as UTF-8"
    else:
        why = " ".join(str(getattr(problem, "strerror", None) or problem).split())
    message = f"{name}: caption skipped with its image, {why}"
    warn(message)
    return message


def _scan_folder(root: Path) -> Iterator[tuple[str, str, str | None]]:
    """(key, image file, same-stem caption file or None) for every image under `root`, in no particular order;
    the key is the image's path relative to `root` without its extension, with "/" separators.

    One os.scandir per directory and no stat per file. Hidden names are skipped (macOS `._x.jpg` files are not
    images). Symlinked folders are followed unless they point back up the tree."""
    pending = [(os.fspath(root), "")]
    while pending:
        directory, key_prefix = pending.pop()
        with os.scandir(directory) as listing:
            entries = [entry for entry in listing if not entry.name.startswith(".")]
        caption_files: dict[str, str] = {}
        images: list[tuple[str, str]] = []
        for entry in entries:
            name = entry.name
            if entry.is_dir():
                if not (entry.is_symlink() and _points_up(entry.path, directory)):
                    pending.append((entry.path, key_prefix + name + "/"))
                continue
            dot = name.rfind(".")
            extension = name[dot:].lower() if dot > 0 else ""
            if extension in IMAGE_EXTENSIONS:
                images.append((name[:dot], entry.path))
            elif extension == ".txt":
                caption_files[name[:dot]] = entry.path
        for stem, image in images:
            yield key_prefix + stem, image, caption_files.get(stem)


def _points_up(link: str, directory: str) -> bool:
    target, here = os.path.realpath(link), os.path.realpath(directory)
    return here == target or here.startswith(target.rstrip(os.sep) + os.sep)


def _folder_entries(root: Path, captions: str) -> list[_Entry]:
    entries: list[_Entry] = []
    for key, image, caption_file in _scan_folder(root):
        if caption_file is None and captions == "required":
            raise ValueError(
                f"{image}: no caption; expected a same-stem .txt file next to it (or pass captions='optional')"
            )
        entries.append(_Entry(key, image, caption_file if captions != "none" else None))
    entries.sort()  # by key, then image: the first of images sharing a key is kept, the same one every time
    return _unique_keys(entries, root)


def _strip_extension(relative_path: str) -> str:
    return posixpath.splitext(relative_path)[0]


def _unique_keys(entries: list[_Entry], root: str | Path) -> list[_Entry]:
    """Sorted entries without repeated keys. Keys are file paths without extension, so `a.jpg` and `a.png` in one
    folder share a key (and a caption): the first is kept, the others skipped, counted in one warning."""
    kept = [entries[0]] if entries else []
    repeated = []
    for entry in entries[1:]:
        if entry.key == kept[-1].key:
            repeated.append((kept[-1].image, entry.image))
        else:
            kept.append(entry)
    if repeated:
        first, second = repeated[0]
        warn(
            f"{root}: {len(repeated)} image(s) skipped for sharing a name without extension with another, e.g. "
            f"{second} beside {first} (captions are matched by that name); rename them to use them all"
        )
    return kept


def _no_images_message(path: Path) -> str:
    return (
        f"{path}: no images found (looked recursively for {', '.join(IMAGE_EXTENSIONS)}, any letter case) "
        "and no .tar shards"
    )


# ---------------------------------------------------------------------------------------------- manifests


def _manifest_rows(path: Path, columns: tuple[str, ...]) -> Iterator[tuple[int, dict[str, object]]]:
    """(line number, row) for each row of a .csv, .tsv or .jsonl file; `columns` must all be present."""
    try:
        text = read_file(path, MAX_MANIFEST_BYTES, "manifest").decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: manifest is not UTF-8 (byte {error.start}); re-save it as UTF-8") from None
    except OSError as error:
        raise ValueError(f"{path}: cannot read the manifest ({error.strerror or error})") from None
    if path.suffix.lower() == ".jsonl":
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path} line {number}: not valid JSON ({error.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path} line {number}: expected a JSON object, got {type(row).__name__}")
            missing = [column for column in columns if column not in row]
            if missing:
                raise ValueError(
                    f"{path} line {number}: missing {', '.join(missing)}; expected keys {', '.join(columns)}, "
                    f"found {', '.join(map(str, row)) or 'none'}"
                )
            yield number, row
        return
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    header = [name.strip().lower() for name in next(reader, [])]
    missing = [column for column in columns if column not in header]
    if missing:
        raise ValueError(
            f"{path}: manifest has no {', '.join(missing)} column; expected columns {', '.join(columns)}, "
            f"found {', '.join(header) or 'none'}"
        )
    for values in reader:
        if any(value.strip() for value in values):
            yield reader.line_num, dict(zip(header, values))


def _manifest_image(path: Path, number: int, value: object) -> tuple[str, Path]:
    """(key, file) for a manifest's image cell: relative to the manifest's folder, or absolute."""
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{path} line {number}: empty or non-text image path {value!r}")
    image = Path(os.path.normpath(value.strip()))
    if not image.is_absolute():
        return _strip_extension(image.as_posix()), path.parent / image
    try:
        relative = image.relative_to(path.parent.resolve())
    except ValueError:
        relative = image.relative_to(image.anchor)  # outside the manifest's folder: key = the absolute path
    return _strip_extension(relative.as_posix()), image


def _manifest_captions(path: Path, number: int, value: object) -> list[str]:
    """A caption cell: a string (CSV/TSV/JSONL) or a list of strings (JSONL); blank captions are dropped."""
    values = value if isinstance(value, list) else [value]
    if not all(isinstance(item, str) or item is None for item in values):
        raise ValueError(f"{path} line {number}: caption must be text or a list of texts, got {value!r}")
    return [item.strip() for item in values if item and item.strip()]


def _manifest_entries(path: Path, captions: str) -> list[_Entry]:
    columns = ("image", "caption") if captions == "required" else ("image",)
    images: dict[str, Path] = {}
    texts: dict[str, list[str]] = {}
    repeated: list[str] = []
    for number, row in _manifest_rows(path, columns):
        key, image = _manifest_image(path, number, row.get("image"))
        if images.setdefault(key, image) != image:
            repeated.append(f"line {number}: {image} beside {images[key]}")
            continue
        if captions != "none":
            texts.setdefault(key, []).extend(_manifest_captions(path, number, row.get("caption")))
    _warn_repeated(path, repeated)
    if not images:
        raise ValueError(f"{path}: manifest lists no images")
    if captions == "required":
        for key, lines in texts.items():
            if not lines:
                raise ValueError(f"{images[key]}: no caption in {path} (every image needs a non-empty 'caption')")
    return [_Entry(key, str(images[key]), captions=tuple(texts.get(key, ()))) for key in images]


def _warn_repeated(path: Path, repeated: list[str]) -> None:
    if repeated:
        warn(
            f"{path}: {len(repeated)} row(s) skipped for naming an image that shares a name without extension with "
            f"an earlier one ({repeated[0]}); rename them to use them all"
        )


# ---------------------------------------------------------------------------------------------- shards


class ShardSource(Source):
    """WebDataset shards in the img2dataset layout (`key.jpg` + `key.txt`, optional `key.cls`); unit = one shard.

    Shards are streamed, never seeked, and members are grouped by key in the order they come. A member's size is
    checked from its header before it is read; one above its cap is skipped (the stream moves past it in blocks)."""

    def __init__(self, path: str | Path, shards: list[Path], captions: str = "required"):
        super().__init__(path, sorted(str(shard) for shard in shards))
        self.captions = captions

    def records(self, unit: str) -> Iterator[Record]:
        """The shard's samples; when the shard is damaged, those before the damage and then one error Record.
        Never raises for its content: a sample whose caption is missing (when required) or unreadable, or whose
        image is above the cap, is a Record with `error` set."""
        self._check_unit(unit)
        shard_stem = _shard_stem(unit)
        group_key, members, names, count = None, {}, {}, 0  # names: extension -> the image member's own name
        if not os.path.isfile(unit):  # a FIFO or device would block or never end
            yield Record(key=f"{shard_stem}/#unreadable", name=unit, error=f"{unit}: not a regular file")
            return
        try:
            with tarfile.open(unit, mode="r|*", tarinfo=_StrictTarInfo) as archive:
                for member in archive:
                    if not member.isfile():
                        continue
                    base = posixpath.basename(member.name)
                    stem, _, extension = base.partition(".")  # key = member path up to the first "." of the name
                    key = posixpath.join(posixpath.dirname(member.name), stem)
                    if key != group_key:
                        done = group_key
                        if done is not None and (record := self._record(unit, shard_stem, done, members, names)):
                            yield record
                            count += 1
                        group_key, members, names = key, {}, {}
                    extension = "." + extension.lower()
                    if (
                        extension in IMAGE_EXTENSIONS
                        or extension == ".cls"
                        or (extension == ".txt" and self.captions != "none")
                    ):
                        cap = MAX_IMAGE_BYTES if extension in IMAGE_EXTENSIONS else MAX_CAPTION_BYTES
                        # an int stands for a member not read: its size, above the cap
                        members[extension] = archive.extractfile(member).read() if member.size <= cap else member.size
                        if extension in IMAGE_EXTENSIONS:
                            names[extension] = member.name
        except (tarfile.TarError, OSError, EOFError, zlib.error) as error:
            # Members read before the damage are whole (tarfile checks lengths), so the last group is usable when
            # it already has everything it needs; otherwise it is part of the loss.
            if group_key is not None and self._is_complete(members):
                yield self._record(unit, shard_stem, group_key, members, names)
                count += 1
            reason = " ".join(str(error).split()) or type(error).__name__
            yield Record(
                key=f"{shard_stem}/#damaged",
                name=unit,
                error=f"{unit}: damaged shard, {count} good sample(s) before the damage ({reason})",
            )
            return
        if group_key is not None and (record := self._record(unit, shard_stem, group_key, members, names)):
            yield record

    def _is_complete(self, members: dict[str, bytes | int]) -> bool:
        has_image = any(extension in IMAGE_EXTENSIONS for extension in members)
        return has_image and (".txt" in members or self.captions != "required")

    def _record(
        self, shard: str, shard_stem: str, key: str, members: dict[str, bytes | int], names: dict[str, str]
    ) -> Record | None:
        """The group of members sharing `key` as a Record; None for a group without an image (metadata only)."""
        image_extension = next((extension for extension in IMAGE_EXTENSIONS if extension in members), None)
        if image_extension is None:
            return None
        name = f"{shard}:{key}{image_extension}"
        image, caption_data, label_data = members[image_extension], members.get(".txt"), members.get(".cls")
        captions, error = (), None
        if isinstance(image, int):
            error = f"{name}: image member of {image} bytes is above the limit of {MAX_IMAGE_BYTES}; skipped"
            warn(error)
        elif caption_data is None and self.captions == "required":
            error = f"{name}: no caption (no {key}.txt member next to it in the shard); skipped"
            warn(error)
        elif caption_data is not None:
            try:
                if isinstance(caption_data, int):
                    raise OSError(
                        errno.EFBIG, f"caption of {caption_data} bytes is above the limit {MAX_CAPTION_BYTES}"
                    )
                captions = _caption_lines(caption_data)
            except (OSError, UnicodeDecodeError) as problem:
                error = _unreadable_caption(f"{shard}:{key}.txt", problem)
        label = label_data.decode("utf-8", errors="replace").strip() if isinstance(label_data, bytes) else None
        data = None if error is not None else image
        return Record(
            key=f"{shard_stem}/{key}", name=name, data=data, captions=captions, label=label, error=error, shard=shard,
            member=names.get(image_extension),
        )  # fmt: skip


class _StrictTarInfo(tarfile.TarInfo):
    """tarfile ends a stream silently when a header after the first is cut short or garbled, so a shard truncated
    at a member boundary would look complete; only the end-of-archive zero block may end it here."""

    @classmethod
    def fromtarfile(cls, archive: tarfile.TarFile) -> tarfile.TarInfo:
        try:
            return super().fromtarfile(archive)
        except tarfile.EOFHeaderError:
            raise
        except tarfile.HeaderError as error:
            raise tarfile.ReadError(f"bad or missing header at byte {archive.offset}: {error}") from None


def _shard_stem(shard: str) -> str:
    name = os.path.basename(shard)
    for extension in sorted(SHARD_EXTENSIONS, key=len, reverse=True):
        if name.lower().endswith(extension):
            return name[: -len(extension)]
    return name


def _is_shard(name: str) -> bool:
    return name.lower().endswith(SHARD_EXTENSIONS)


def expand_braces(pattern: str) -> list[str]:
    """Shell brace expansion: `shard-{000..009}.tar` (zero padding kept), `{a,b}` lists, several and nested
    groups; braces with neither form stay literal."""
    start = pattern.find("{")
    while start != -1:
        end = _matching_brace(pattern, start)
        if end == -1:
            return [pattern]
        alternatives = _brace_alternatives(pattern[start + 1 : end])
        if alternatives is not None:
            prefix, suffix = pattern[:start], pattern[end + 1 :]
            return [expanded for choice in alternatives for expanded in expand_braces(prefix + choice + suffix)]
        start = pattern.find("{", start + 1)
    return [pattern]


def _matching_brace(text: str, start: int) -> int:
    depth = 0
    for index in range(start, len(text)):
        depth += {"{": 1, "}": -1}.get(text[index], 0)
        if depth == 0:
            return index
    return -1


def _brace_alternatives(body: str) -> list[str] | None:
    numbers = re.fullmatch(r"(-?\d+)\.\.(-?\d+)", body)
    if numbers:
        first, last = numbers.groups()
        padded = any(len(end.lstrip("-")) > 1 and end.lstrip("-").startswith("0") for end in (first, last))
        width = max(len(first), len(last)) if padded else 0
        step = 1 if int(last) >= int(first) else -1
        return [str(value).zfill(width) for value in range(int(first), int(last) + step, step)]
    parts, depth, current = [], 0, []
    for character in body:
        if character == "," and depth == 0:
            parts.append("".join(current))
            current = []
            continue
        depth += {"{": 1, "}": -1}.get(character, 0)
        current.append(character)
    parts.append("".join(current))
    return parts if len(parts) > 1 else None


def _expand_shard_pattern(pattern: str) -> list[Path]:
    """The shards a glob and/or brace pattern names; a brace-listed shard that does not exist is an error
    (an incomplete download should not train silently on part of the data)."""
    shards: set[str] = set()
    missing: list[str] = []
    for piece in expand_braces(pattern):
        if glob.has_magic(piece):
            shards.update(match for match in glob.glob(piece) if _is_shard(match) and os.path.isfile(match))
        elif os.path.isfile(piece):
            shards.add(piece)
        else:
            missing.append(piece)
    if missing:
        raise FileNotFoundError(f"{pattern}: {len(missing)} shard(s) it names do not exist, e.g. {missing[0]}")
    if not shards:
        raise FileNotFoundError(f"{pattern}: matches no shard files (looked for {', '.join(SHARD_EXTENSIONS)})")
    return [Path(shard) for shard in sorted(shards)]


# ---------------------------------------------------------------------------------------------- opening


def open_source(path: str | Path, captions: str = "required") -> Source:
    """The dataset at `path`: a folder of images with .txt captions, .tar shards (a file, a glob, a brace pattern
    or a folder holding .tar files and no images) or a .csv/.tsv/.jsonl manifest with image and caption columns.

    captions="required" makes an image without a caption an error naming it; "optional" allows empty captions.
    """
    if captions not in CAPTION_MODES:
        raise ValueError(f"captions must be one of {', '.join(CAPTION_MODES)}, got {captions!r}")
    location = Path(path)
    if not location.exists():
        if glob.has_magic(str(path)) or "{" in str(path):
            return ShardSource(path, _expand_shard_pattern(str(path)), captions)
        raise FileNotFoundError(f"{path}: no such file or directory")
    if location.is_dir():
        entries = _folder_entries(location, captions)
        if entries:
            return FileSource(path, entries)
        shards = sorted(location / name for name in os.listdir(location) if _is_shard(name))
        if shards:
            return ShardSource(path, shards, captions)
        raise ValueError(_no_images_message(location))
    if _is_shard(location.name):
        return ShardSource(path, [location], captions)
    if location.suffix.lower() in MANIFEST_EXTENSIONS:
        return FileSource(path, _manifest_entries(location, captions))
    raise ValueError(f"{path}: unknown dataset format; supported: {_SUPPORTED}")


class MixedSource(Source):
    """Several sources read as one, each `repeats` times per pass: an extra dataset read 4 times an epoch weighs 4x
    its size in what a model sees (`--extra-data PATH:4`). Units are "SOURCE:COPY:UNIT"."""

    def __init__(self, parts: list[tuple[Source, int]]):
        units = [f"{index}:{copy}:{unit}" for index, (source, repeats) in enumerate(parts) for copy in range(repeats)
                 for unit in source.units]  # fmt: skip
        super().__init__(
            " + ".join(f"{source.path}" + (f" x{repeats}" if repeats > 1 else "") for source, repeats in parts), units
        )
        self.parts = parts

    def records(self, unit: str) -> Iterator[Record]:
        self._check_unit(unit)
        index, _, inner = unit.split(":", 2)
        yield from self.parts[int(index)][0].records(inner)


def extra_data(spec: str) -> tuple[str, int]:
    """ "PATH" or "PATH:REPEATS" (`--extra-data`) -> (path, repeats >= 1)."""
    path, separator, repeats = spec.rpartition(":")
    if not separator or not repeats.isdigit():
        return spec, 1
    if int(repeats) < 1:
        raise ValueError(f"--extra-data {spec!r}: the repeats after ':' must be at least 1")
    return path, int(repeats)


def open_mixture(path: str | Path, extras: list[str], captions: str = "required") -> Source:
    """The dataset at `path` with each `--extra-data` spec ("PATH" or "PATH:REPEATS") mixed in (`MixedSource`);
    an extra dataset with train/ and val/ splits contributes its train/ split. Without extras, `open_source(path)`."""
    if not extras:
        return open_source(path, captions)
    parts = [(open_source(path, captions), 1)]
    for spec in extras:
        extra, repeats = extra_data(spec)
        parts.append((open_source(resolve_splits(extra)[0], captions), repeats))
    return MixedSource(parts)


def open_labelled(path: str | Path) -> Source:
    """Labelled evaluation data: class-per-folder (`DIR/LABEL/.../image.png`, label = the top folder's name) or a
    .csv/.tsv/.jsonl manifest with image and label columns. Records carry `label` and no captions."""
    location = Path(path)
    if not location.exists():
        raise FileNotFoundError(f"{path}: no such file or directory")
    if location.is_dir():
        entries = []
        for key, image, _ in _scan_folder(location):
            if "/" not in key:
                raise ValueError(f"{image}: image outside a class folder; expected DIR/LABEL/image files")
            entries.append(_Entry(key, image, label=key.split("/", 1)[0]))
        if not entries:
            raise ValueError(
                f"{path}: no images found in class folders (looked for {', '.join(IMAGE_EXTENSIONS)} in DIR/LABEL/)"
            )
        entries.sort()
        return FileSource(path, _unique_keys(entries, location))
    if location.suffix.lower() not in MANIFEST_EXTENSIONS:
        raise ValueError(
            f"{path}: unknown labelled-data format; supported: a folder of class folders (DIR/LABEL/image) or a "
            ".csv/.tsv/.jsonl manifest with 'image' and 'label' columns"
        )
    labels: dict[str, str] = {}
    images: dict[str, Path] = {}
    repeated: list[str] = []
    for number, row in _manifest_rows(location, ("image", "label")):
        key, image = _manifest_image(location, number, row.get("image"))
        label = row.get("label")
        if not isinstance(label, (str, int)) or not str(label).strip():
            raise ValueError(f"{location} line {number}: empty or non-text label {label!r} for {image}")
        label = str(label).strip()
        if images.setdefault(key, image) != image:
            repeated.append(f"line {number}: {image} beside {images[key]}")
            continue
        if labels.setdefault(key, label) != label:
            raise ValueError(f"{location} line {number}: {image} has two labels, {labels[key]!r} and {label!r}")
    if not images:
        raise ValueError(f"{location}: manifest lists no images")
    _warn_repeated(location, repeated)
    return FileSource(path, [_Entry(key, str(images[key]), label=labels[key]) for key in images])


# ---------------------------------------------------------------------------------------------- names as captions


def name_words(name: str) -> str:
    """A file or folder name as words: separators (_ - . +) become spaces, runs of digits are dropped, lower case
    ("beagle_01" -> "beagle", "Golden-Retriever" -> "golden retriever")."""
    words = re.split(r"[\s_\-.+]+", re.sub(r"\d+", " ", name))
    return " ".join(word.lower() for word in words if word)


def name_caption(key: str) -> str:
    """A caption from a sample's key (its path under the dataset's folder, without extension): the file name's words,
    then each enclosing folder's, innermost first, repeats left out ("dogs/beagle_01" -> "beagle, dogs"). Empty when
    no name holds a word ("IMG_0001" gives "img")."""
    *folders, stem = key.split("/")
    parts: list[str] = []
    for part in [stem, *reversed(folders)]:
        words = name_words(part)
        if words and words not in parts:
            parts.append(words)
    return ", ".join(parts)


# ---------------------------------------------------------------------------------------------- splits


def resolve_splits(path: str | Path, val_data: str | Path | None = None) -> tuple[str | Path, str | Path | None]:
    """(train data, validation data or None). A folder with `train/` and `val/` subfolders gives those (an explicit
    `val_data` still wins for validation); otherwise `val_data` if given; otherwise (path, None), meaning "hold
    out a fraction of `path` by `is_validation`"."""
    location = Path(path)
    if (location / "train").is_dir() and (location / "val").is_dir():
        return location / "train", val_data if val_data is not None else location / "val"
    return path, val_data


def is_validation(key: str, fraction: float) -> bool:
    """Whether the sample `key` is held out: the first 8 bytes of sha1(key) as a number in [0, 1) below
    `fraction`. The same on every run and machine (Python's hash() is salted per process)."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"is_validation: fraction must be in [0, 1], got {fraction!r}")
    digest = hashlib.sha1(key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction
