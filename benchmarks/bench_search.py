"""Vector search speed and recall: the index's approximate faiss index, faiss exact search and autofaiss.

Data like real CLIP embeddings: `--centres` random unit centres, each vector a centre plus Gaussian noise,
normalised (uniformly random vectors have no neighbourhoods, so every index looks bad or every index looks
good). Held-out queries are drawn the same way. Our approximate index is built by the very function
`build_index` uses (`clipdalle.index.faiss_index.build_faiss`: IVF sized to `--memory-budget-mb`, nprobe tuned to
recall@10 >= 0.95 on stored vectors); recall here is measured independently on the held-out queries.

autofaiss (the index builder clip-retrieval uses) runs in another virtualenv (`--autofaiss-python`, default
.venv-ref: autofaiss declares numpy<2) on the same vectors and the same memory budget, with its query-time
limit set to the 2 ms goal; its index is read back and timed here, by the same code as ours.

    .venv/bin/python benchmarks/bench_search.py --count 1000000
    .venv/bin/python benchmarks/bench_search.py --count 200000 --memory-budget-mb 410 --autofaiss

Reports build time, index size and peak RSS, p50/p99 single-query latency at k=10, batched per-query time,
recall@10 vs exact and the recall-latency curve over each index's search knob (nprobe, efSearch); then
exact search latency against collection size (where `index.EXACT_LIMIT` should sit). Not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np
from machine import matmul_gflops

from clipdalle.index import faiss_index as index

# save_on_disk=False: with numpy 2 autofaiss 2.18's own save fails (json.dump of numpy float32 metrics; numpy 2
# keeps float32 * float as float32, numpy 1 made a float64, which json accepts). The index is written here.
AUTOFAISS_SCRIPT = """
import json, sys, time
import faiss
import numpy as np
from autofaiss import build_index
vectors = np.load(sys.argv[1])
start = time.perf_counter()
built, infos = build_index(
    embeddings=vectors, save_on_disk=False, max_index_memory_usage=sys.argv[3], current_memory_available="8G",
    metric_type="ip", max_index_query_time_ms=float(sys.argv[4]), min_nearest_neighbors_to_retrieve=10, verbose=30,
)
seconds = time.perf_counter() - start
faiss.write_index(built, sys.argv[2])
print(json.dumps({"seconds": seconds, "infos": infos}, default=float))
"""


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


def load_average() -> str:
    return " ".join(f"{value:.1f}" for value in os.getloadavg())


def curve(name: str, search_index: faiss.Index, knob: str, values: list[int], queries, true_ids, k, shipped) -> None:
    """Markdown rows: recall@k and latency at each value of the index's search knob ("nprobe", "efSearch")."""
    parameters = faiss.ParameterSpace()
    for value in values:
        parameters.set_index_parameter(search_index, knob, value)
        single = latencies_ms(search_index, queries, k)
        start = time.perf_counter()
        _, found = search_index.search(queries, k)
        batched = (time.perf_counter() - start) * 1000 / len(queries)
        recall = index.recall_at_k(found, true_ids, k)
        mark = " (as built)" if value == shipped else ""
        print(
            f"| {name} | {knob} {value}{mark} | {recall:.3f} | {np.percentile(single, 50):.3f} "
            f"| {np.percentile(single, 99):.3f} | {batched:.3f} |",
            flush=True,
        )
    parameters.set_index_parameter(search_index, knob, shipped)


def run_autofaiss(python: str, vectors: np.ndarray, budget_mb: float, query_ms: float) -> tuple[faiss.Index, dict]:
    """autofaiss's index for `vectors` built in a child process with `python`; (index, its build report)."""
    with tempfile.TemporaryDirectory(prefix="bench_autofaiss_") as work:
        np.save(Path(work) / "vectors.npy", vectors)
        index_path = str(Path(work) / "knn.index")
        budget = f"{int(budget_mb)}M"
        command = [python, "-c", AUTOFAISS_SCRIPT, str(Path(work) / "vectors.npy"), index_path, budget, str(query_ms)]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"autofaiss failed ({python}):\n{done.stderr[-3000:]}")
        report = json.loads(done.stdout.strip().splitlines()[-1])
        report["size_mb"] = os.path.getsize(index_path) / 2**20
        report["child_peak_rss_mb"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        return faiss.read_index(index_path), report


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
    parser.add_argument("--autofaiss", action="store_true", help="also build and time autofaiss's index")
    parser.add_argument("--autofaiss-python", default=".venv-ref/bin/python", help="a Python with autofaiss")
    parser.add_argument("--goal-ms", type=float, default=2.0, help="p50 goal; autofaiss's query-time limit")
    parser.add_argument(
        "--exact-sizes", type=int, nargs="*", default=[2500, 5000, 10_000, 20_000, 40_000], help="exact p50 curve"
    )
    args = parser.parse_args()

    print(f"load average {load_average()}, matmul {matmul_gflops():.0f} GFLOP/s at start", flush=True)
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
        f"{exact_batched:.3f} ms/query, recall@10 1.000",
        flush=True,
    )
    del exact

    before = peak_rss_mb()
    start = time.perf_counter()
    ours, details = index.build_faiss(
        vectors, ids, exact_limit=0, memory_budget_mb=args.memory_budget_mb, target_recall=index.TARGET_RECALL
    )
    build = time.perf_counter() - start
    after = peak_rss_mb()
    lists = faiss.extract_index_ivf(ours).invlists
    codes = sum(lists.list_size(number) for number in range(lists.nlist)) * (lists.code_size + 8)
    size_mb = (codes + ours.nlist * args.dim * 4) / 2**20  # codes + ids + centroids
    print(
        f"ours {details['index_type']}: build {build:.1f} s (train + add + nprobe tuning), {size_mb:.0f} MB "
        f"(codes, ids, centroids), peak RSS {after:.0f} MB (was {before:.0f}), tuned nprobe {details['nprobe']} "
        f"(recall@10 {details['recall_at_10']:.3f} on {details['recall_queries']} stored vectors, self excluded)",
        flush=True,
    )
    print(f"load average {load_average()}", flush=True)

    print("| index | knob | recall@10 | single p50 ms | single p99 ms | batched ms/query |")
    print("|---|---|---|---|---|---|")
    steps = [value for value in index.nprobe_steps(ours.nlist) if value <= 64]
    curve("ours " + details["index_type"], ours, "nprobe", steps, queries, true_ids, args.k, details["nprobe"])
    del ours

    if args.autofaiss:
        theirs, report = run_autofaiss(args.autofaiss_python, vectors, args.memory_budget_mb, args.goal_ms)
        key, param = report["infos"].get("index_key"), report["infos"].get("index_param", "")
        print(
            f"autofaiss {key} ({param}): build {report['seconds']:.1f} s, {report['size_mb']:.0f} MB on disk, "
            f"child peak RSS {report['child_peak_rss_mb']:.0f} MB",
            flush=True,
        )
        knob = "efSearch" if "efSearch" in param else "nprobe"
        shipped = int(dict(part.split("=") for part in param.split(",") if "=" in part).get(knob, 0))
        values = sorted({16, 24, 32, 48, 64, 96, 128, 192, 256, shipped} if knob == "efSearch" else set(steps))
        curve(f"autofaiss {key}", theirs, knob, values, queries, true_ids, args.k, shipped)
        del theirs

    print("exact search p50 against collection size (where index.EXACT_LIMIT should sit):")
    for size in args.exact_sizes:
        small = faiss.IndexFlatIP(args.dim)
        small.add(vectors[:size])
        single = latencies_ms(small, queries[:200], args.k)
        print(f"  {size:>7} vectors: p50 {np.percentile(single, 50):.3f} ms, p99 {np.percentile(single, 99):.3f} ms")
    print(f"load average {load_average()}, matmul {matmul_gflops():.0f} GFLOP/s at end")


if __name__ == "__main__":
    sys.exit(main())
