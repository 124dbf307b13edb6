"""Loopback load test of the server at twice its capacity: latency, share of 503s, no other error, bounded memory.

An index of `--data` (or, when it does not exist, of `--images` synthetic 32 px pictures) is built with a
random-weight `clip-demo` CLIP (as in bench_index_build.py) and served by uvicorn in a child process on 127.0.0.1
(`clipdalle.serve.create_app` with `uvicorn_options`, one worker, as `clipdalle serve` runs it). The server's
capacity is what its WorkLimiter admits at once: `--workers` jobs running plus `--waiting` waiting. By default
`--clients` is twice that, each client a thread with its own keep-alive httpx client sending a mix of requests
until `--requests` are done or `--seconds` have passed: text searches (60 %), thumbnails of random ids (20 %; made
once, then read from the disk cache) and image uploads to /api/similar (20 %, a 256 px PNG decoded and embedded).

Every answer is counted by status: 200 and 503 (with Retry-After) are expected, anything else is an error. The
server's resident memory (VmRSS, and VmHWM, its peak) is read from /proc before and after the load.

    .venv/bin/python benchmarks/bench_serve_load.py --workers 2 --waiting 6 --requests 3000 --seconds 90

The clients share the machine with the server (2 cores here), so the figures are a floor.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
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
from PIL import Image, ImageDraw

from clipdalle import index

SERVER_SCRIPT = """
import json, sys
import uvicorn
from clipdalle.serve import ServeSettings, create_app, load_models, uvicorn_options
settings = ServeSettings(**json.loads(sys.argv[3]))
app = create_app(load_models(index=sys.argv[1]), settings)
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[2]), log_level="warning", **uvicorn_options(settings))
"""
WORDS = (["red", "orange", "yellow", "green", "blue", "purple", "pink", "black"], ["icon", "arrow", "star", "house"])


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def synthetic_images(folder: Path, count: int) -> Path:
    """`count` 32 px pictures of coloured shapes with captions (distinct, seeded)."""
    rng = random.Random(0)
    folder.mkdir(parents=True)
    for number in range(count):
        image = Image.new("RGB", (32, 32), "white")
        draw = ImageDraw.Draw(image)
        colour = tuple(rng.randrange(256) for _ in range(3))
        box = sorted(rng.sample(range(32), 2)), sorted(rng.sample(range(32), 2))
        (draw.ellipse if number % 2 else draw.rectangle)((box[0][0], box[1][0], box[0][1], box[1][1]), fill=colour)
        image.save(folder / f"{number:05d}.png")
        (folder / f"{number:05d}.txt").write_text(f"a shape {number}\n")
    return folder


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS (now) and VmHWM (peak) of a process, in KiB."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            values[name] = int(value.split()[0])
    return values


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


def upload_png() -> bytes:
    buffer = io.BytesIO()
    Image.effect_noise((256, 256), 60).convert("RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def load(base: str, clients: int, requests: int, seconds: float, k: int, images: int) -> dict:
    """Latencies in ms by (kind, status), answers by status, 503s without Retry-After, wall seconds."""
    issued = iter(range(requests))
    take, record = threading.Lock(), threading.Lock()
    latencies: dict[tuple[str, int], list[float]] = {}
    statuses: dict[int, int] = {}
    missing_retry_after = [0]
    picture = upload_png()
    deadline = time.monotonic() + seconds

    def client(number: int) -> None:
        rng = random.Random(number)
        with httpx.Client(base_url=base, timeout=60) as session:
            while time.monotonic() < deadline:
                with take:
                    request = next(issued, None)
                if request is None:
                    return
                draw = rng.random()
                start = time.perf_counter()
                try:
                    if draw < 0.6:
                        kind = "search"
                        query = f"a {WORDS[0][request % 8]} {WORDS[1][(request // 8) % 4]}"
                        response = session.get("/api/search", params={"q": query, "k": k})
                    elif draw < 0.8:
                        kind = "thumbnail"
                        response = session.get(f"/api/images/{rng.randrange(1, images + 1)}", params={"size": "thumb"})
                    else:
                        kind = "upload"
                        files = {"image": ("query.png", picture, "image/png")}
                        response = session.post("/api/similar", files=files, data={"k": str(k)})
                    status = response.status_code
                    no_retry_after = status == 503 and "retry-after" not in response.headers
                except httpx.TransportError:
                    status, no_retry_after = 0, False
                elapsed = (time.perf_counter() - start) * 1000
                with record:
                    latencies.setdefault((kind, status), []).append(elapsed)
                    statuses[status] = statuses.get(status, 0) + 1
                    missing_retry_after[0] += no_retry_after

    threads = [threading.Thread(target=client, args=(number,)) for number in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    return {"latencies": latencies, "statuses": statuses, "missing_retry_after": missing_retry_after[0], "wall": wall}


def percentiles(values: list[float]) -> str:
    if not values:
        return "-"
    return f"p50 {np.percentile(values, 50):.0f} ms, p99 {np.percentile(values, 99):.0f} ms"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default="data/icons-32px-8c/val", help="images to index (synthetic if missing)")
    parser.add_argument("--images", type=int, default=2000, help="synthetic images when --data does not exist")
    parser.add_argument("--workers", type=int, default=2, help="the server's image_workers (jobs at once)")
    parser.add_argument("--waiting", type=int, default=6, help="the server's max_waiting_work")
    parser.add_argument("--clients", type=int, default=None, help="concurrent clients (default: 2 x capacity)")
    parser.add_argument("--requests", type=int, default=3000, help="stop after this many requests")
    parser.add_argument("--seconds", type=float, default=90, help="or after this long")
    parser.add_argument("--k", type=int, default=20, help="results per search (the page's default)")
    args = parser.parse_args()
    capacity = args.workers + args.waiting
    clients = args.clients or 2 * capacity

    work = Path(tempfile.mkdtemp(prefix="bench_serve_load_"))
    server = None
    try:
        data = args.data if Path(args.data).exists() else synthetic_images(work / "images", args.images)
        random_clip_run("clip-demo", work / "clip")
        info = index.build_index(work / "clip", data, work / "index", num_workers=1)
        print(f"index of {data}: {info['count']} images, {info['index_type']}; load {os.getloadavg()[0]:.1f}")
        port = free_port()
        settings = {"image_workers": args.workers, "max_waiting_work": args.waiting}
        command = [sys.executable, "-c", SERVER_SCRIPT, str(work / "index"), str(port), json.dumps(settings)]
        server = subprocess.Popen(command)
        base = f"http://127.0.0.1:{port}"
        wait_until_up(base, server, 120)
        load(base, 2, 20, 30, args.k, info["count"])  # warm-up, not counted
        before = memory_kib(server.pid)
        result = load(base, clients, args.requests, args.seconds, args.k, info["count"])
        after = memory_kib(server.pid)
        statuses, total = result["statuses"], sum(result["statuses"].values())
        others = {status: count for status, count in statuses.items() if status not in (200, 503)}
        print(
            f"capacity {capacity} ({args.workers} running + {args.waiting} waiting), {clients} clients: {total} "
            f"requests in {result['wall']:.1f} s = {total / result['wall']:.0f}/s; load {os.getloadavg()[0]:.1f}"
        )
        share = statuses.get(503, 0) / max(1, total)
        missing = result["missing_retry_after"]
        print(f"  503: {share:.1%} (without Retry-After: {missing}); other errors: {others or 'none'}")
        for kind in ("search", "thumbnail", "upload"):
            ok = result["latencies"].get((kind, 200), [])
            busy = result["latencies"].get((kind, 503), [])
            print(f"  {kind:9s} 200: {len(ok):5d}, {percentiles(ok)}; 503: {len(busy):5d}, {percentiles(busy)}")
        every_ok = [value for (_, status), values in result["latencies"].items() if status == 200 for value in values]
        print(f"  all 200s: {percentiles(every_ok)}")
        print(
            f"  server memory: RSS {before['VmRSS'] / 1024:.0f} MiB before, {after['VmRSS'] / 1024:.0f} MiB after, "
            f"peak {after['VmHWM'] / 1024:.0f} MiB (peak before the load {before['VmHWM'] / 1024:.0f} MiB)"
        )
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=30)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
