"""Vector search speed and recall: the index's approximate faiss index against faiss exact search.

Data like real CLIP embeddings: `--centres` random unit centres, each vector a centre plus Gaussian noise,
normalised (uniformly random vectors have no neighbourhoods, so every index looks bad or every index looks
good). Held-out queries are drawn the same way. The approximate index is built by the very function
`build_index` uses (`clipdalle.index._build_faiss`, IVF sized to `--memory-budget-mb`, nprobe tuned to
recall@10 >= 0.95 on stored vectors); recall here is measured independently on the held-out queries.

    .venv/bin/python benchmarks/bench_search.py --count 200000

Reports build time, index size and peak RSS, p50/p99 single-query latency at k=10, batched per-query time,
recall@10 vs exact, and the recall-latency curve over nprobe. Not a test; run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import resource
import time

import faiss
import numpy as np

from clipdalle import index


def clustered(count: int, centres: np.ndarray, noise: float, rng: np.random.Generator) -> np.ndarray:
    """Unit vectors (count, D): a random centre each plus isotropic noise of total norm ~`noise`."""
    dim = centres.shape[1]
    out = np.empty((count, dim), dtype=np.float32)
    for start in range(0, count, 100_000):  # in blocks: the float64 temporaries of 1M x 512 would be 4 GB
        size = min(100_000, count - start)
        block = centres[rng.integers(0, len(centres), size)] + rng.standard_normal((size, dim), np.float32) * (
            noise / np.sqrt(dim)
        )
        out[start : start + size] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return out


def latencies_ms(search_index: faiss.Index, queries: np.ndarray, k: int) -> np.ndarray:
    times = []
    for query in queries:
        start = time.perf_counter()
        search_index.search(query[None], k)
        times.append((time.perf_counter() - start) * 1000)
    return np.array(times)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=1_000_000, help="vectors in the index")
    parser.add_argument("--dim", type=int, default=512, help="embedding size (CLIP ViT-B: 512)")
    parser.add_argument("--centres", type=int, default=10_000, help="cluster centres")
    parser.add_argument("--noise", type=float, default=0.5, help="noise norm around a centre (centres are unit)")
    parser.add_argument("--queries", type=int, default=1000, help="held-out queries")
    parser.add_argument("--exact-queries", type=int, default=100, help="single queries timed on the exact index")
    parser.add_argument("--memory-budget-mb", type=float, default=index.MEMORY_BUDGET_MB)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--threads", type=int, default=0, help="faiss OpenMP threads (0: faiss's default)")
    args = parser.parse_args()
    if args.threads > 0:
        faiss.omp_set_num_threads(args.threads)

    rng = np.random.default_rng(0)
    centres = rng.standard_normal((args.centres, args.dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    vectors = clustered(args.count, centres, args.noise, rng)
    queries = clustered(args.queries, centres, args.noise, rng)
    ids = np.arange(args.count, dtype=np.int64)
    print(f"{args.count} x {args.dim} vectors, {args.centres} centres, noise {args.noise}, {args.queries} queries")
    print(f"faiss {faiss.__version__}, {faiss.omp_get_max_threads()} threads; data RSS {peak_rss_mb():.0f} MB")

    start = time.perf_counter()
    exact = faiss.IndexFlatIP(args.dim)
    exact.add(vectors)
    exact_build = time.perf_counter() - start
    start = time.perf_counter()
    _, true_ids = exact.search(queries, args.k)
    exact_batched = (time.perf_counter() - start) * 1000 / args.queries
    exact_single = latencies_ms(exact, queries[: args.exact_queries], args.k)
    print(
        f"exact Flat: build {exact_build:.1f} s, {args.count * args.dim * 4 / 2**20:.0f} MB, single p50 "
        f"{np.percentile(exact_single, 50):.2f} ms p99 {np.percentile(exact_single, 99):.2f} ms, batched "
        f"{exact_batched:.3f} ms/query, recall@10 1.000"
    )

    before = peak_rss_mb()
    start = time.perf_counter()
    approximate, details = index._build_faiss(
        vectors, ids, exact_limit=0, memory_budget_mb=args.memory_budget_mb, target_recall=index.TARGET_RECALL
    )
    build = time.perf_counter() - start
    size_mb = len(faiss.serialize_index(approximate)) / 2**20
    print(
        f"{details['index_type']}: build {build:.1f} s (train + add + nprobe tuning), {size_mb:.0f} MB serialised, "
        f"peak RSS {peak_rss_mb():.0f} MB (was {before:.0f}), tuned nprobe {details['nprobe']} "
        f"(recall@10 {details['recall_at_10']:.3f} on {details['recall_queries']} stored vectors)"
    )
    print("| nprobe | recall@10 | single p50 ms | single p99 ms | batched ms/query |")
    print("|---|---|---|---|---|")
    nprobe = 1
    while nprobe <= min(256, approximate.nlist):
        approximate.nprobe = nprobe
        single = latencies_ms(approximate, queries, args.k)
        start = time.perf_counter()
        _, found = approximate.search(queries, args.k)
        batched = (time.perf_counter() - start) * 1000 / args.queries
        recall = index.recall_at_k(found, true_ids, args.k)
        mark = " (tuned)" if nprobe == details["nprobe"] else ""
        print(
            f"| {nprobe}{mark} | {recall:.3f} | {np.percentile(single, 50):.3f} | {np.percentile(single, 99):.3f} "
            f"| {batched:.3f} |"
        )
        nprobe *= 2


if __name__ == "__main__":
    main()
