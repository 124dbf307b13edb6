"""Index build throughput against bare `encode_image`: how much of the embedding speed the build keeps.

Bare: every image decoded and resized into one tensor beforehand (not timed), then `model.encode_image` over
batches, so only the model runs. Build: `clipdalle.index.build_index` from the PNGs on disk (tar shard reading,
PNG decoding, sha256, float16 chunk writes, SQLite inserts, the faiss index), timed end to end including the
model load. The goal is build >= 90 % of bare. `--profile` adds a breakdown of a build's time by stage with
`num_workers=0`, the place to look when the ratio falls short.

    .venv/bin/python benchmarks/bench_index_build.py --data data/icons-32px-8c/val

The CLIP is the `clip-demo` preset with random weights (throughput does not depend on the weights).
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import shutil
import tempfile
import time
from pathlib import Path

import torch
from machine import matmul_gflops

from clipdalle import checkpoint, index
from clipdalle.config import from_dict, load_preset
from clipdalle.data.sources import open_source
from clipdalle.models.clip import CLIP, CLIPConfig
from clipdalle.tokenizers import CaptionTokenizer
from clipdalle.transforms import decode_image, resize_crop, to_tensor


def random_clip_run(preset: str, run_dir: Path) -> CLIP:
    """A CLIP of `preset` with seeded random weights saved as a run directory (config, weights, tokenizer)."""
    torch.manual_seed(0)
    model = CLIP(from_dict(CLIPConfig, load_preset(preset)["model"], source=preset)).eval()
    checkpoint.save_model(run_dir, model)
    CaptionTokenizer.train(["a red circle", "a blue square"], vocab_size=300).save(run_dir / checkpoint.TOKENIZER_FILE)
    return model


def decoded_images(data: str, image_size: int) -> torch.Tensor:
    """Every image of `data` decoded and resized: (N, 3, H, W) in [0, 1]."""
    source = open_source(data, captions="optional")
    tensors = []
    for unit in source.units:
        for record in source.records(unit):
            image = decode_image(record.path if record.path is not None else record.data, record.name)
            tensors.append(to_tensor(resize_crop(image, image_size)))
    return torch.stack(tensors)  # (N, 3, H, W)


def bare_rate(model: CLIP, images: torch.Tensor, batch_size: int) -> float:
    """Images per second of encode_image alone (one untimed warm-up batch first)."""
    with torch.no_grad():
        model.encode_image(images[:batch_size])
        start = time.perf_counter()
        for first in range(0, len(images), batch_size):
            model.encode_image(images[first : first + batch_size])
    return len(images) / (time.perf_counter() - start)


def build_rate(run_dir: Path, data: str, out: Path, batch_size: int, num_workers: int) -> float:
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    info = index.build_index(run_dir, data, out, batch_size=batch_size, num_workers=num_workers)
    elapsed = time.perf_counter() - start
    return (info["count"] + info["duplicates"] + info["skipped"]) / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default="data/icons-32px-8c/val", help="images to index (any dataset format)")
    parser.add_argument("--preset", default="clip-demo", help="CLIP preset (random weights)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--num-workers", type=int, nargs="+", default=[0, 1], help="loader workers to try")
    parser.add_argument("--repeats", type=int, default=3, help="best of this many timings")
    parser.add_argument("--profile", action="store_true", help="print where a num_workers=0 build spends its time")
    parser.add_argument("--torch-threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.torch_threads > 0:
        torch.set_num_threads(args.torch_threads)

    work = Path(tempfile.mkdtemp(prefix="bench_index_build_"))
    try:
        model = random_clip_run(args.preset, work / "clip")
        images = decoded_images(args.data, model.config.image_size)
        threads = torch.get_num_threads()
        print(f"{args.data}: {len(images)} images, {args.preset} random weights, torch threads {threads}")
        print(f"matmul {matmul_gflops():.0f} GFLOP/s at start")
        bare = max(bare_rate(model, images, args.batch_size) for _ in range(args.repeats))
        print(f"bare encode_image: {bare:.0f} images/s (batch {args.batch_size})")
        for workers in args.num_workers:
            rates = [
                build_rate(work / "clip", args.data, work / "index", args.batch_size, workers)
                for _ in range(args.repeats)
            ]
            best = max(rates)
            print(
                f"build_index num_workers={workers}: {best:.0f} images/s = {100 * best / bare:.0f} % of bare "
                f"(runs: {', '.join(f'{rate:.0f}' for rate in rates)})"
            )
        print(f"matmul {matmul_gflops():.0f} GFLOP/s at end")
        if args.profile:
            shutil.rmtree(work / "index", ignore_errors=True)
            profiler = cProfile.Profile()
            profiler.runcall(
                index.build_index, work / "clip", args.data, work / "index", batch_size=args.batch_size, num_workers=0
            )
            pstats.Stats(profiler).sort_stats("tottime").print_stats(20)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
