"""The vector search behind an index: exact inner-product search for small collections, an inverted file (IVF)
above `EXACT_LIMIT` vectors, with the codec that fits a memory budget and `nprobe` tuned until recall@10 against
exact search, measured on a sample of the stored vectors, reaches a target (benchmarks/RESULTS.md, Search).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from ..io import atomic_write

EXACT_LIMIT = 9_999  # above 10,000 vectors faiss splits one query's exact scan over OpenMP threads that wait on
# each other on a busy machine, and exact search stops meeting a 2 ms p50 (benchmarks/RESULTS.md, Search)
MEMORY_BUDGET_MB = 2048  # codes + ids of the approximate index: 1M x 512-d float32 (1,961 MB) fits, more is 8-bit
TARGET_RECALL = 0.95  # nprobe is raised until recall@10 vs exact search reaches this on the sample
RECALL_QUERIES = 500  # stored vectors used as queries to measure recall@10
TRAINING_POINTS_PER_LIST = 64  # k-means sample per inverted list (faiss warns below 39)
KMEANS_ITERATIONS = 10  # faiss's default is 25; 10 already meets the recall target at 1M (RESULTS.md, Search)


def recall_at_k(found_ids: np.ndarray, true_ids: np.ndarray, k: int) -> float:
    """Mean over queries of |found top-k ∩ true top-k| / |true top-k|; ids of -1 (no result) never match."""
    if found_ids.shape[0] != true_ids.shape[0]:
        raise ValueError(f"recall_at_k: {found_ids.shape[0]} result rows for {true_ids.shape[0]} true rows")
    total = 0.0
    for found, true in zip(found_ids[:, :k], true_ids[:, :k]):
        true_set = {int(i) for i in true if i >= 0}
        if not true_set:
            total += 1.0
            continue
        total += len(true_set & {int(i) for i in found if i >= 0}) / len(true_set)
    return total / max(1, found_ids.shape[0])


def ivf_list_count(count: int) -> int:
    """Inverted lists for `count` vectors: about sqrt(N), a power of two, and at least 39 training points per
    list so k-means is well posed. A query costs nlist (coarse search) + nprobe * N / nlist (list scans) dot
    products, least at nlist = sqrt(nprobe * N); on the clustered benchmark a 0.95 recall needs nprobe 1 at 1M
    and 6 at 200k, and k-means costs grow as nlist^2, so faiss's 4-16 sqrt(N) would multiply the build time for
    at most 0.2 ms per query on 2 cores (benchmarks/RESULTS.md, Search)."""
    wanted = 2 ** round(math.log2(max(1.0, math.sqrt(count))))
    return int(max(1, min(wanted, count // 39)))


def nprobe_steps(lists: int) -> list[int]:
    """Candidate nprobe values 1, 2, 3, 4, 6, 8, 12, ... up to `lists`: steps of about 1.5x, so the tuned value
    overshoots the latency it needs by at most half."""
    steps, power = [], 1
    while power < lists:
        steps.extend(value for value in (power, power + power // 2) if value < lists and value not in steps)
        power *= 2
    return [*steps, lists]


def ivf_codec(embed_dim: int, count: int, memory_budget_mb: float) -> str:
    """The most precise vector code whose total size (codes + 8-byte ids) fits the budget: float32 ("Flat"),
    8-bit scalar ("SQ8") or product quantisation ("PQm" with m bytes per vector, m dividing embed_dim)."""
    budget = memory_budget_mb * 2**20
    for codec, code_bytes in (("Flat", 4 * embed_dim), ("SQ8", embed_dim)):
        if count * (code_bytes + 8) <= budget:
            return codec
    for bytes_per_vector in (128, 64, 32, 16, 8):
        if embed_dim % bytes_per_vector == 0 and count * (bytes_per_vector + 8) <= budget:
            return f"PQ{bytes_per_vector}"
    raise ValueError(
        f"memory_budget_mb={memory_budget_mb} is too small for {count} vectors (even 8 bytes each need "
        f"{count * 16 / 2**20:.0f} MB); raise it"
    )


def build_faiss(
    embeddings: np.ndarray, ids: np.ndarray, *, exact_limit: int, memory_budget_mb: float, target_recall: float
) -> tuple[Any, dict]:
    """(faiss index over float32 unit vectors (N, D) keyed by `ids`, {"index_type", "nprobe", "recall_at_10",
    "recall_queries"}). Exact up to `exact_limit` vectors, IVF above it with nprobe tuned to `target_recall`."""
    import faiss

    count, embed_dim = embeddings.shape
    if count <= exact_limit:
        index = faiss.IndexIDMap2(faiss.IndexFlatIP(embed_dim))
        index.add_with_ids(embeddings, ids)
        return index, {"index_type": "Flat", "nprobe": None, "recall_at_10": 1.0, "recall_queries": 0}
    lists = ivf_list_count(count)
    description = f"IVF{lists},{ivf_codec(embed_dim, count, memory_budget_mb)}"
    index = faiss.index_factory(embed_dim, description, faiss.METRIC_INNER_PRODUCT)
    index.cp.niter = KMEANS_ITERATIONS
    rng = np.random.default_rng(0)
    training = embeddings[np.sort(rng.choice(count, size=min(count, TRAINING_POINTS_PER_LIST * lists), replace=False))]
    index.train(training)
    index.add_with_ids(embeddings, ids)
    # Stored vectors as queries, each left out of its own results: counting the query itself (always found)
    # would overstate the recall that unseen queries get.
    rows = np.sort(rng.choice(count, size=min(count, RECALL_QUERIES), replace=False))
    _, true_rows = faiss.knn(embeddings[rows], embeddings, 11, metric=faiss.METRIC_INNER_PRODUCT)
    true_ids = without_self(np.where(true_rows >= 0, ids[true_rows], -1), ids[rows], 10)  # rows -> ids
    nprobe, recall = 1, 0.0
    for nprobe in nprobe_steps(lists):
        index.nprobe = nprobe
        _, found = index.search(embeddings[rows], 11)
        recall = recall_at_k(without_self(found, ids[rows], 10), true_ids, 10)
        if recall >= target_recall:
            break
    details = {"index_type": description, "nprobe": nprobe, "recall_at_10": recall, "recall_queries": len(rows)}
    return index, details


def without_self(found_ids: np.ndarray, query_ids: np.ndarray, k: int) -> np.ndarray:
    """The first k ids of each row (Q, k + 1) other than the row's own query id (Q, k)."""
    kept = [[i for i in row if i != own][:k] for row, own in zip(found_ids.tolist(), query_ids.tolist())]
    return np.array([row + [-1] * (k - len(row)) for row in kept], dtype=np.int64)


def write_faiss(path: Path, index: Any) -> None:
    import faiss

    atomic_write(path, lambda tmp: faiss.write_index(index, str(tmp)))
