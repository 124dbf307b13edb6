"""Near-duplicates: groups of stored images that are copies of one picture (resized, re-encoded, cropped, mirrored).

Two methods, and the groups are the connected components of the pairs either accepts (union-find):
- "clip": the pairs whose CLIP embeddings are closer than a cosine threshold, from the faiss index itself (a range
  search per batch of stored vectors, as clip-retrieval's `deduplicate` does), never from all N^2 pairs;
- "pixels" (the default): those pairs and each image's nearest neighbours by a perceptual descriptor are
  candidates, and a candidate is accepted when the pixels agree after the best of six alignments, its flat
  regions have one colour, two lossless files have one ink colour and, for a JPEG beside a lossless image of its
  size, the JPEG is that image saved with the JPEG's own settings (`pixel_match`). A caption-trained CLIP puts
  two icons of one family, or one icon in two colours, as close together as a JPEG copy is to its original; the
  pixels tell them apart far better (benchmarks/RESULTS.md).
  It reads every stored image once, and the two of each JPEG-and-lossless candidate pair once more; an image that
  can no longer be read is left out and counted.

    find_duplicates(index)                      # {"method", "threshold", "images", "pairs", "groups": [...]}
    find_duplicates(index, 0.95, method="clip")

DEFAULT_THRESHOLD and pixel_match.PIXEL_THRESHOLD are calibrated on copies of the validation icons
(benchmarks/RESULTS.md, Near-duplicates).
"""

from __future__ import annotations

import io
import tarfile
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from ..transforms import BadImage, decode_image
from . import pixel_match
from .store import read_image

DEFAULT_THRESHOLD = 0.97  # cosine: the F1-best on copies of the validation icons with the demo CLIP (RESULTS.md)
QUERY_BATCH = 1024  # stored vectors sent to the faiss range search at once
KNN_FALLBACK = 64  # neighbours per image for faiss indexes without a range search
METHODS = ("pixels", "clip")
JPEG_START = b"\xff\xd8\xff"  # the first bytes of every JPEG file
LOSSLESS_STARTS = (b"\x89PNG", b"BM", b"GIF8")  # PNG, BMP, GIF: their pixels are the picture as it was saved


def pairs_above(faiss_index: Any, ids: np.ndarray, embeddings: np.ndarray, threshold: float) -> tuple:
    """(pairs (P, 2) int64 ids with a < b, scores (P,) float32): every pair of stored vectors whose inner product
    is above `threshold`, each reported once, found by range searches of the faiss index (k-NN with KNN_FALLBACK
    neighbours for an index type without one)."""
    if not -1 <= threshold <= 1:
        raise ValueError(f"threshold {threshold}: expected a cosine similarity between -1 and 1, e.g. 0.95")
    found_pairs, found_scores = [], []
    for start in range(0, len(ids), QUERY_BATCH):
        queries = np.ascontiguousarray(embeddings[start : start + QUERY_BATCH], dtype=np.float32)  # (Q, D)
        query_ids = ids[start : start + QUERY_BATCH]  # (Q,)
        try:
            limits, scores, neighbours = faiss_index.range_search(queries, float(threshold))
            rows = np.repeat(np.arange(len(queries)), np.diff(limits.astype(np.int64)))  # query row of each result
        except RuntimeError:  # e.g. an HNSW index: no range search
            scores, neighbours = faiss_index.search(queries, min(KNN_FALLBACK, faiss_index.ntotal))  # (Q, K)
            rows = np.repeat(np.arange(len(queries)), neighbours.shape[1])
            scores, neighbours = scores.ravel(), neighbours.ravel()
        keep = (neighbours >= 0) & (scores > threshold) & (neighbours != query_ids[rows])
        first, second = query_ids[rows[keep]], neighbours[keep]
        found_pairs.append(np.stack([np.minimum(first, second), np.maximum(first, second)], axis=1))  # (p, 2)
        found_scores.append(scores[keep].astype(np.float32))
    if not found_pairs:
        return np.zeros((0, 2), dtype=np.int64), np.zeros(0, dtype=np.float32)
    pairs, scores = np.concatenate(found_pairs).astype(np.int64), np.concatenate(found_scores)
    pairs, first = np.unique(pairs, axis=0, return_index=True)  # both directions of a pair -> once
    return pairs, scores[first]


def group_pairs(pairs: np.ndarray) -> list[list[int]]:
    """Connected components of the graph whose edges are `pairs` (P, 2): lists of ids (sorted), largest first,
    then by smallest id. Union-find with path halving."""
    parent: dict[int, int] = {}

    def root(node: int) -> int:
        parent.setdefault(node, node)
        while parent[node] != node:
            parent[node] = parent[parent[node]]
            node = parent[node]
        return node

    for first, second in pairs.tolist():
        a, b = root(first), root(second)
        if a != b:
            parent[max(a, b)] = min(a, b)
    groups: dict[int, list[int]] = {}
    for node in parent:
        groups.setdefault(root(node), []).append(node)
    return sorted((sorted(members) for members in groups.values()), key=lambda members: (-len(members), members[0]))


def stored_thumbnails(index: Any, ids: np.ndarray, progress: bool = False) -> dict:
    """The stored images `ids`, read back from where the index found them, one at a time: {"thumbs" (N, 3, S, S)
    uint8, "readable" (N,) bool, "sizes" (N, 2) width and height, "jpeg" (N,) bool: a JPEG whose saving
    `pixel_match.jpeg_settings` can repeat, "lossless" (N,) bool: a PNG, BMP or GIF}. An image that is gone or
    no longer decodes gets a white thumbnail and readable False."""
    with index.lock:
        rows = index.rows(ids.tolist())
    data = index.info.get("data", [])
    size = pixel_match.THUMB_SIZE
    thumbs = np.full((len(ids), size, size, 3), 255, dtype=np.uint8)  # (N, S, S, 3)
    readable, jpeg, lossless = (np.zeros(len(ids), dtype=bool) for _ in range(3))
    sizes = np.zeros((len(ids), 2), dtype=np.int64)
    for number, image_id in enumerate(tqdm(ids.tolist(), desc="reading images", unit="img", disable=not progress)):
        try:
            encoded = read_image(rows[image_id]["path"], data)
            image = decode_image(encoded)
            thumbs[number], sizes[number] = pixel_match.thumbnail(image), image.size
            jpeg[number] = encoded[:3] == JPEG_START and repeatable_jpeg(encoded) is not None
            lossless[number] = encoded.startswith(LOSSLESS_STARTS)
            readable[number] = True
        except (OSError, KeyError, BadImage, tarfile.TarError, EOFError):
            continue
    thumbs = torch.from_numpy(thumbs).permute(0, 3, 1, 2).contiguous()  # (N, 3, S, S)
    return {"thumbs": thumbs, "readable": readable, "sizes": sizes, "jpeg": jpeg, "lossless": lossless}


def repeatable_jpeg(encoded: bytes) -> dict | None:
    """`pixel_match.jpeg_settings` of a JPEG file's bytes; None where the header or its EXIF does not parse."""
    try:
        return pixel_match.jpeg_settings(Image.open(io.BytesIO(encoded)))
    except Exception:  # Pillow raises OSError, SyntaxError, ValueError, struct.error, ... on a damaged header
        return None


def reencoding_agrees(index: Any, ids: np.ndarray, pairs: np.ndarray, stored: dict) -> np.ndarray:
    """(P,) bool for pairs of row numbers (P, 2): False where one image is a JPEG, the other a lossless image of
    the same size, and the JPEG is not that image saved with its own settings (`pixel_match` step 5); True for
    every other pair. Only the images of pairs of that kind are read again, each once."""
    agrees = np.ones(len(pairs), dtype=bool)
    jpeg, lossless, sizes = stored["jpeg"], stored["lossless"], stored["sizes"]
    left, right = pairs[:, 0], pairs[:, 1]
    one_of_each = (jpeg[left] & lossless[right]) | (lossless[left] & jpeg[right])
    kind = one_of_each & (sizes[left] == sizes[right]).all(axis=1)
    if not kind.any():
        return agrees
    with index.lock:
        rows = index.rows(ids[np.unique(pairs[kind])].tolist())
    data = index.info.get("data", [])
    encoded: dict[int, bytes | None] = {}

    def read(row: int) -> bytes | None:  # an image's bytes, None once it can no longer be read
        if row not in encoded:
            try:
                encoded[row] = read_image(rows[int(ids[row])]["path"], data)
            except (OSError, KeyError, tarfile.TarError, EOFError):
                encoded[row] = None
        return encoded[row]

    for number in np.flatnonzero(kind).tolist():
        first, second = pairs[number].tolist()
        original_row, jpeg_row = (second, first) if jpeg[first] else (first, second)
        original_bytes, jpeg_bytes = read(original_row), read(jpeg_row)
        settings = None if jpeg_bytes is None else repeatable_jpeg(jpeg_bytes)
        if original_bytes is None or settings is None:  # gone or changed since: leave the pair to steps 2 to 4
            continue
        try:
            original, compressed = decode_image(original_bytes), decode_image(jpeg_bytes)
            distance = pixel_match.reencoding_distance(original, compressed, settings)
        except (BadImage, ValueError):  # no longer decodes, or no longer the same size
            continue
        agrees[number] = distance <= pixel_match.REENCODE_THRESHOLD
    return agrees


def pixel_checked_pairs(index: Any, ids: np.ndarray, clip_pairs: np.ndarray, pixel_threshold: float, progress: bool):
    """(pairs (P, 2) ids, pixel distances (P,), candidates checked, unreadable images): the candidates (each
    image's descriptor neighbours and the CLIP pairs) that `pixel_match.matches` accepts (within `pixel_threshold`
    and of one colour, by the ink's direction too between lossless images) and, for a JPEG beside a lossless image
    of its size, `reencoding_agrees`. An image that can no longer be read is left out, and counted."""
    stored = stored_thumbnails(index, ids, progress)
    thumbs, readable = stored["thumbs"], stored["readable"]
    row_of = {image_id: number for number, image_id in enumerate(ids.tolist())}
    clip_rows = np.array([[row_of[a], row_of[b]] for a, b in clip_pairs.tolist()], dtype=np.int64).reshape(-1, 2)
    clip_rows = clip_rows[readable[clip_rows[:, 0]] & readable[clip_rows[:, 1]]]
    readable_rows = np.flatnonzero(readable)
    neighbours = readable_rows[pixel_match.candidate_pairs(thumbs[torch.from_numpy(readable_rows)])]  # (P, 2) rows
    candidates = np.unique(np.concatenate([neighbours.reshape(-1, 2), clip_rows]), axis=0)
    accepted, distances = pixel_match.matches(thumbs, candidates, pixel_threshold, lossless=stored["lossless"])
    accepted[accepted] = reencoding_agrees(index, ids, candidates[accepted], stored)
    return ids[candidates[accepted]].reshape(-1, 2), distances[accepted], len(candidates), int((~readable).sum())


def find_duplicates(
    index: Any,
    threshold: float = DEFAULT_THRESHOLD,
    max_groups: int | None = None,
    method: str = "pixels",
    pixel_threshold: float = pixel_match.PIXEL_THRESHOLD,
    progress: bool = False,
) -> dict:
    """Groups of near-duplicate images of an open `Index`: {"method", "threshold", "pixel_threshold", "images",
    "candidates" (pairs checked on the pixels), "unreadable", "pairs", "grouped" (images in some group),
    "groups_total", "groups": [{"ids", "min_score", "max_score" (cosines of the pairs that joined it),
    "max_pixel_distance", "images": [{"id", "path", "caption", "width", "height"}]}]}, largest groups first;
    `max_groups` keeps that many (the counts still cover all). `threshold` is the CLIP cosine above which two
    images pair ("clip") or are a candidate ("pixels")."""
    if method not in METHODS:
        raise ValueError(f"method {method!r}: expected one of {', '.join(METHODS)}")
    if not 0 <= pixel_threshold <= 1:
        raise ValueError(f"pixel threshold {pixel_threshold}: expected a difference between 0 and 1, e.g. 0.44")
    ids, embeddings = index.embeddings()
    if len(ids) == 0:
        raise ValueError(f"{index.path}: the index holds no images")
    with index.lock:
        pairs, _ = pairs_above(index.faiss_index, ids, embeddings, threshold)
    distances, candidates, unreadable = np.full(len(pairs), np.nan, dtype=np.float32), len(pairs), 0
    if method == "pixels":
        pairs, distances, candidates, unreadable = pixel_checked_pairs(index, ids, pairs, pixel_threshold, progress)
    position = {image_id: number for number, image_id in enumerate(ids.tolist())}
    scores = np.einsum(  # the cosine of each pair, (P,)
        "pd,pd->p", embeddings[[position[a] for a in pairs[:, 0]]], embeddings[[position[b] for b in pairs[:, 1]]]
    ) if len(pairs) else np.zeros(0, dtype=np.float32)  # fmt: skip
    groups = group_pairs(pairs)
    shown = groups if max_groups is None else groups[:max_groups]
    with index.lock:
        rows = index.rows(member for group in shown for member in group)
    pair_group = {}
    for number, group in enumerate(shown):
        for member in group:
            pair_group[member] = number
    low = [1.0] * len(shown)
    high = [-1.0] * len(shown)
    farthest: list[float | None] = [None] * len(shown)
    for (first, _), score, distance in zip(pairs.tolist(), scores.tolist(), distances.tolist()):
        number = pair_group.get(first)
        if number is not None:
            low[number], high[number] = min(low[number], score), max(high[number], score)
            if method == "pixels":
                farthest[number] = max(distance, farthest[number] or 0.0)
    fields = ("id", "path", "caption", "width", "height")
    report_groups = [
        {
            "ids": group,
            "min_score": round(low[number], 6),
            "max_score": round(high[number], 6),
            "max_pixel_distance": None if farthest[number] is None else round(farthest[number], 6),
            "images": [{name: rows[member][name] for name in fields} for member in group if member in rows],
        }
        for number, group in enumerate(shown)
    ]
    return {
        "method": method,
        "threshold": threshold,
        "pixel_threshold": pixel_threshold if method == "pixels" else None,
        "images": int(len(ids)),
        "candidates": int(candidates),
        "unreadable": unreadable,
        "pairs": int(len(pairs)),
        "grouped": sum(len(group) for group in groups),
        "groups_total": len(groups),
        "groups": report_groups,
    }
