"""Loopback load test of `/api/search`: requests per second and latency with concurrent clients.

An index of `--data` is built with a random-weight `clip-demo` CLIP (as in bench_index_build.py), served by
uvicorn in a child process on 127.0.0.1 (`clipdalle.serve.create_app`, one worker, as `clipdalle serve` runs
it), and `--clients` threads, each with its own keep-alive httpx client, send text queries until
`--requests` are done or `--seconds` have passed, whichever comes first. Every non-200 answer is counted.

    .venv/bin/python benchmarks/bench_serve_load.py --clients 16 --requests 2000 --seconds 60

The clients share the machine with the server (2 cores here), so the figures are a floor.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
from bench_index_build import random_clip_run

from clipdalle import index

SERVER_SCRIPT = """
import sys
import uvicorn
from clipdalle.serve import create_app, load_models
uvicorn.run(create_app(load_models(index=sys.argv[1])), host="127.0.0.1", port=int(sys.argv[2]), log_level="warning")
"""
WORDS = (["red", "orange", "yellow", "green", "blue", "purple", "pink", "black"], ["icon", "arrow", "star", "house"])


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until_up(base: str, server: subprocess.Popen, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited with code {server.returncode}")
        try:
            if httpx.get(f"{base}/api/info", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.2)
    raise RuntimeError(f"the server did not answer /api/info within {seconds} s")


def load(base: str, clients: int, requests: int, seconds: float, k: int) -> tuple[list[float], dict[int, int], float]:
    """(latencies in ms of successful requests, {status: count} of the others, wall seconds)."""
    issued = iter(range(requests))
    take = threading.Lock()
    latencies: list[float] = []
    failures: dict[int, int] = {}
    record = threading.Lock()
    deadline = time.monotonic() + seconds

    def client(number: int) -> None:
        with httpx.Client(base_url=base, timeout=30) as session:
            while time.monotonic() < deadline:
                with take:
                    request = next(issued, None)
                if request is None:
                    return
                query = f"a {WORDS[0][request % 8]} {WORDS[1][(request // 8) % 4]}"
                start = time.perf_counter()
                try:
                    status = session.get("/api/search", params={"q": query, "k": k}).status_code
                except httpx.TransportError:
                    status = 0
                elapsed = (time.perf_counter() - start) * 1000
                with record:
                    if status == 200:
                        latencies.append(elapsed)
                    else:
                        failures[status] = failures.get(status, 0) + 1

    threads = [threading.Thread(target=client, args=(number,)) for number in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return latencies, failures, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default="data/icons-32px-8c/val", help="images to index")
    parser.add_argument("--clients", type=int, default=16, help="concurrent clients")
    parser.add_argument("--requests", type=int, default=2000, help="stop after this many requests")
    parser.add_argument("--seconds", type=float, default=60, help="or after this long")
    parser.add_argument("--k", type=int, default=20, help="results per search (the page's default)")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench_serve_load_"))
    server = None
    try:
        random_clip_run("clip-demo", work / "clip")
        info = index.build_index(work / "clip", args.data, work / "index", num_workers=1)
        print(f"index of {args.data}: {info['count']} images, {info['index_type']}; load {os.getloadavg()[0]:.1f}")
        port = free_port()
        server = subprocess.Popen([sys.executable, "-c", SERVER_SCRIPT, str(work / "index"), str(port)])
        base = f"http://127.0.0.1:{port}"
        wait_until_up(base, server, 120)
        load(base, 2, 20, 30, args.k)  # warm-up, not counted
        latencies, failures, wall = load(base, args.clients, args.requests, args.seconds, args.k)
        done = len(latencies)
        print(
            f"{args.clients} clients, k={args.k}: {done} ok in {wall:.1f} s = {done / wall:.0f} requests/s, "
            f"p50 {np.percentile(latencies, 50):.1f} ms, p99 {np.percentile(latencies, 99):.1f} ms, "
            f"failures {failures or 0}; load {os.getloadavg()[0]:.1f}"
        )
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=30)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
