"""Near-duplicates: groups of stored images whose CLIP embeddings are closer than a cosine threshold.

Copies of one picture (resized, re-encoded, slightly cropped, mirrored) land close together in CLIP space while
distinct pictures, even of one subject, stay further apart. The pairs above the threshold come from the faiss
index itself (a range search per batch of stored vectors, as clip-retrieval's `deduplicate` does), never from all
N^2 pairs, and the groups are the connected components of those pairs (union-find).

    find_duplicates(index, threshold=0.95)     # {"threshold", "images", "pairs", "groups": [{"ids", ...}]}

DEFAULT_THRESHOLD is calibrated on copies of the validation icons (benchmarks/RESULTS.md, Near-duplicates).
"""

from __future__ import annotations

from typing import Any

import numpy as np

DEFAULT_THRESHOLD = 0.97  # cosine: the F1-best on copies of the validation icons with the demo CLIP (RESULTS.md)
QUERY_BATCH = 1024  # stored vectors sent to the faiss range search at once
KNN_FALLBACK = 64  # neighbours per image for faiss indexes without a range search


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


def find_duplicates(index: Any, threshold: float = DEFAULT_THRESHOLD, max_groups: int | None = None) -> dict:
    """Groups of near-duplicate images of an open `Index`: {"threshold", "images", "pairs", "grouped" (images in
    some group), "groups": [{"ids", "min_score", "max_score", "images": [{"id", "path", "caption", "width",
    "height"}]}]}, largest groups first; `max_groups` keeps that many (the counts still cover all)."""
    ids, embeddings = index.embeddings()
    if len(ids) == 0:
        raise ValueError(f"{index.path}: the index holds no images")
    with index.lock:
        pairs, scores = pairs_above(index.faiss_index, ids, embeddings, threshold)
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
    for (first, _), score in zip(pairs.tolist(), scores.tolist()):
        number = pair_group.get(first)
        if number is not None:
            low[number], high[number] = min(low[number], score), max(high[number], score)
    fields = ("id", "path", "caption", "width", "height")
    report_groups = [
        {
            "ids": group,
            "min_score": round(low[number], 6),
            "max_score": round(high[number], 6),
            "images": [{name: rows[member][name] for name in fields} for member in group if member in rows],
        }
        for number, group in enumerate(shown)
    ]
    return {
        "threshold": threshold,
        "images": int(len(ids)),
        "pairs": int(len(pairs)),
        "grouped": sum(len(group) for group in groups),
        "groups_total": len(groups),
        "groups": report_groups,
    }
