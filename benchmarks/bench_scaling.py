"""Scaling measurements behind the pipeline's planner (`clipdalle.demo.plan`, `clipdalle.demo.costs`).

Times training steps of the planner's candidate model sizes (its ladders) on random inputs: the dVAE and CLIP at
32 and 64 px on one thread (in the pipeline they train side by side, one thread each) and two (the dVAE alone when
`--clip` names an existing CLIP), DALL·E on two threads (it trains alone) and one; DALL·E generation at batch 128 on
two threads; and decoding PNGs of 32 to 256 px. Each step time is paired with FLOPs counted on the real model
(`costs.flops_per_sample`) and with the matmul probe the planner runs at start (`costs.matmul_probe`), taken right
before the measurement, so the fit is of seconds against FLOPs / probe rate: the machine's load at each moment
cancels to first order. Prints the table and the fitted `costs.RECORDED` constants; writes all of it as JSON.

    PYTHONPATH=src python benchmarks/bench_scaling.py --out /work/artifacts/anydata/scaling.json

Not a test; about 10 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import time

import numpy as np
import torch
from PIL import Image

from clipdalle.demo import costs, plan
from clipdalle.io import write_json
from clipdalle.training.loop import parameter_groups


def time_steps(kind: str, config, batch_size: int, threads: int, min_seconds: float) -> float:
    """Median seconds of a training step (forward, backward, clip, AdamW) after two warm-up steps."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = costs.build_model(kind, config).train()
    optimizer = torch.optim.AdamW(parameter_groups(model, 0.01), lr=1e-4, fused=True)
    batch = costs.example_batch(kind, config, batch_size)
    loss_fn = costs.loss_function(kind)
    times = []
    started = time.perf_counter()
    for step in range(200):
        start = time.perf_counter()
        loss, _ = loss_fn(model, batch, 0.5)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step >= 2:
            times.append(time.perf_counter() - start)
        if step >= 6 and time.perf_counter() - started > min_seconds:
            break
    return float(np.median(times))


def time_generation(config, samples: int, threads: int) -> float:
    """Seconds per generated sample (codes only: sampling.sample_codes with the KV cache), batch `samples`."""
    from clipdalle.sampling import sample_codes

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = costs.build_model("dalle", config).eval()
    text = costs.example_batch("dalle", config, samples)["text"]
    seeds = list(range(samples))
    sample_codes(model, text[:2], seeds[:2])  # warm-up
    start = time.perf_counter()
    sample_codes(model, text, seeds)
    return (time.perf_counter() - start) / samples


def time_decoding(side: int, size: int, count: int = 200) -> float:
    """Seconds to decode one `side` px PNG (noise over a gradient: compresses like a picture) and resize it."""
    from clipdalle.transforms import decode_image, resize_crop, to_tensor

    rng = np.random.default_rng(0)
    pixels = (np.linspace(0, 255, side * side * 3).reshape(side, side, 3) + rng.integers(0, 40, (side, side, 3))) % 256
    buffer = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(buffer, format="PNG")
    data = buffer.getvalue()
    start = time.perf_counter()
    for _ in range(count):
        to_tensor(resize_crop(decode_image(data), size))
    return (time.perf_counter() - start) / count


def candidates(quick: bool) -> list[dict]:
    """(kind, label, config, batch, threads) of every measurement."""
    rows = []
    vae_sizes = plan.VAE_LADDER[:2] if quick else plan.VAE_LADDER
    clip_sizes = plan.CLIP_LADDER[:2] if quick else plan.CLIP_LADDER[:4]
    dalle_sizes = plan.DALLE_LADDER[:2] if quick else plan.DALLE_LADDER[:5]
    for image_size in (32, 64):
        for hidden, resblocks in vae_sizes:
            config = plan.vae_config(image_size, 8, hidden, resblocks)
            for threads in (1, 2) if (hidden, resblocks) == plan.VAE_LADDER[1] else (1,):
                rows.append(dict(kind="vae", label=f"{image_size}px h{hidden} r{resblocks}", config=config,
                                 batch=64, threads=threads))  # fmt: skip
        for width, layers in clip_sizes:
            config = plan.clip_config(image_size, width, layers, context_length=32, vocab_size=1000)
            rows.append(dict(kind="clip", label=f"{image_size}px {width}x{layers}", config=config, batch=128,
                             threads=1))  # fmt: skip
    for width, layers in dalle_sizes:
        for text_length in (24,) if quick else (24, 48):
            config = plan.dalle_config(width, layers, text_length=text_length, text_vocab_size=1000, grid_size=8)
            for threads in (2, 1) if text_length == 24 else (2,):
                rows.append(dict(kind="dalle", label=f"{width}x{layers} T{text_length}", config=config, batch=32,
                                 threads=threads))  # fmt: skip
    return rows


def fit(points: list[tuple[float, float]]) -> costs.Speed:
    """Least squares of log seconds = log scale + exponent * log ideal, with ideal = FLOPs / probe FLOP/s."""
    x = np.log([point[0] for point in points])
    y = np.log([point[1] for point in points])
    exponent, intercept = np.polyfit(x, y, 1) if len(points) > 1 else (1.0, float(y[0] - x[0]))
    return costs.Speed(scale=round(float(np.exp(intercept)), 4), exponent=round(float(exponent), 4))


def time_encoding(kind: str, config, batch_size: int) -> float:
    """Seconds of the forward pass the evaluation, index and token-cache stages run: dVAE encode or CLIP image
    features, on one thread, batch `batch_size`."""
    torch.set_num_threads(1)
    model = costs.build_model(kind, config).eval()
    images = torch.rand(batch_size, 3, config.image_size, config.image_size)
    run = model.encode if kind == "vae" else model.encode_image
    with torch.no_grad():
        run(images)
        start = time.perf_counter()
        for _ in range(3):
            run(images)
    return (time.perf_counter() - start) / 3


def forward_flops(kind: str, config, batch_size: int) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    model = costs.build_model(kind, config).eval()
    images = torch.rand(2, 3, config.image_size, config.image_size)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.encoder(images) if kind == "vae" else model.encode_image(images)
    return counter.get_total_flops() / 2 * batch_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="JSON file for the measurements and the fit")
    parser.add_argument("--min-seconds", type=float, default=4.0, help="time each configuration at least this long")
    parser.add_argument("--quick", action="store_true", help="two sizes per model (a check of the script)")
    args = parser.parse_args()

    load_before = os.getloadavg()
    probes = {threads: costs.matmul_probe(threads, seconds=1.0) for threads in (1, 2)}
    print(f"probe at start: {probes[1]:.1f} GFLOP/s on 1 thread, {probes[2]:.1f} on 2; load {load_before}")
    measurements = []
    for row in candidates(args.quick):
        flops = costs.flops_per_sample(row["kind"], row["config"])
        probe = costs.matmul_probe(row["threads"])
        seconds = time_steps(row["kind"], row["config"], row["batch"], row["threads"], args.min_seconds)
        parameters = sum(p.numel() for p in costs.build_model(row["kind"], row["config"]).parameters())
        entry = dict(kind=row["kind"], label=row["label"], batch=row["batch"], threads=row["threads"],
                     parameters=parameters, flops_per_sample=flops, probe_gflops=round(probe, 2),
                     seconds_per_step=round(seconds, 4), load=os.getloadavg()[0])  # fmt: skip
        entry["achieved_gflops"] = round(row["batch"] * flops / seconds / 1e9, 2)
        measurements.append(entry)
        print(
            f"{row['kind']:6s} {row['label']:18s} t{row['threads']} {parameters / 1e6:6.2f} M params "
            f"{flops / 1e9:7.3f} GFLOP/sample  {seconds:7.3f} s/step  {entry['achieved_gflops']:6.1f} GFLOP/s "
            f"(probe {probe:6.1f}, load {entry['load']:.1f})",
            flush=True,
        )
    generation = []
    for width, layers in plan.DALLE_LADDER[: 2 if args.quick else 5]:
        config = plan.dalle_config(width, layers, text_length=24, text_vocab_size=1000, grid_size=8)
        for threads in (1, 2):
            probe = costs.matmul_probe(threads)
            seconds = time_generation(config, 128, threads)
            flops = costs.sample_flops(config)
            generation.append(dict(label=f"{width}x{layers}", threads=threads, flops_per_sample=flops,
                                   probe_gflops=round(probe, 2), seconds_per_sample=round(seconds, 5),
                                   load=os.getloadavg()[0]))  # fmt: skip
            print(
                f"generate {width}x{layers} t{threads}: {seconds * 1e3:.1f} ms/sample (probe {probe:.1f})", flush=True
            )
    encoding = []
    for image_size in (32, 64):
        for kind, sizes in (("vae", plan.VAE_LADDER), ("clip", plan.CLIP_LADDER[:4])):
            for size in sizes[:2] if args.quick else sizes:
                if kind == "vae":
                    config = plan.vae_config(image_size, 8, *size)
                else:
                    config = plan.clip_config(image_size, *size, context_length=32, vocab_size=1000)
                probe = costs.matmul_probe(1)
                seconds = time_encoding(kind, config, 256)
                encoding.append(dict(kind=kind, label=f"{image_size}px {size}", flops=forward_flops(kind, config, 256),
                                     probe_gflops=round(probe, 2), seconds=round(seconds, 4)))  # fmt: skip
                print(f"encode {kind} {image_size}px {size}: {seconds:.3f} s per 256 (probe {probe:.1f})", flush=True)
    decoding = []
    for side in (32, 64, 128, 256):
        seconds = time_decoding(side, 32)
        decoding.append(dict(side=side, seconds=seconds))
        print(f"decode {side} px PNG -> 32 px: {seconds * 1e3:.3f} ms", flush=True)

    speeds = {}
    for kind in ("vae", "clip", "dalle"):
        points = [
            (m["batch"] * m["flops_per_sample"] / (m["probe_gflops"] * 1e9), m["seconds_per_step"])
            for m in measurements
            if m["kind"] == kind and m["threads"] == 1
        ]
        speeds[kind] = vars(fit(points))
    speeds["dalle_sample"] = vars(
        fit([(g["flops_per_sample"] / (g["probe_gflops"] * 1e9), g["seconds_per_sample"]) for g in generation
             if g["threads"] == 1])
    )  # fmt: skip
    speeds["encode"] = vars(fit([(e["flops"] / (e["probe_gflops"] * 1e9), e["seconds"]) for e in encoding]))
    pixels = np.array([row["side"] ** 2 for row in decoding], dtype=float)
    slope, intercept = np.polyfit(pixels, np.array([row["seconds"] for row in decoding]), 1)
    result = {
        "machine": {"cores": os.cpu_count(), "torch": torch.__version__},
        "probe_at_start": probes,
        "load_before": load_before,
        "load_after": os.getloadavg(),
        "measurements": measurements,
        "generation": generation,
        "encoding": encoding,
        "decoding": decoding,
        "fit": {"speeds": speeds, "decode_s": max(0.0, float(intercept)), "decode_s_per_pixel": float(slope)},
    }
    write_json(args.out, result)
    print(json.dumps(result["fit"], indent=2))
    print(f"load before {load_before}, after {result['load_after']}")


if __name__ == "__main__":
    main()
