"""ONNX: torch against onnxruntime on this CPU, both towers, at batch 1 and 32, with ViT-B/32 shapes.

The model is our preset clip-vit-b-32 (OpenAI's ViT-B/32 shapes, QuickGELU) with random weights (speed does not
depend on them), saved as a run, exported by `clipdalle.backends.export_onnx` and loaded back as an OnnxCLIP; both
backends must give the same features (max |difference| printed) before anything is timed. Images are 224 px;
captions are <|startoftext|>, 6 to 12 random word ids, <|endoftext|> (the largest id), zero-padded to 77, as
short captions are: each backend cuts rows after their last end token (torch in CLIP.encode_text, onnxruntime
in OnnxCLIP.encode_text before running the graph, whose sequence length is dynamic).

Rounds alternate torch and onnxruntime on each case after a warmup; the table gives the median of the per-round
ratios (onnxruntime's rate / torch's) and the median rates, because this machine's speed drifts by tens of percent
within minutes. Each round also records the fp32 matmul rate and the load average (what else was running).
Both use the same thread count (torch.get_num_threads(), 2 here; onnxruntime intra-op threads = that).

    PYTHONPATH=src .venv/bin/python benchmarks/bench_onnx.py [--rounds 7] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from machine import matmul_gflops

from clipdalle import checkpoint
from clipdalle.backends import export_onnx, load_onnx
from clipdalle.config import build_config, load_preset
from clipdalle.models.clip import CLIP, CLIPConfig
from clipdalle.tokenizers import ClipTokenizer

START_ID, END_ID = 49406, 49407
CASES = (("image", 1), ("image", 32), ("text", 1), ("text", 32))


def captions(batch: int, generator: torch.Generator) -> torch.Tensor:
    text = torch.zeros(batch, 77, dtype=torch.long)
    for row in range(batch):
        words = int(torch.randint(6, 13, (1,), generator=generator))
        text[row, 0] = START_ID
        text[row, 1 : 1 + words] = torch.randint(1, START_ID, (words,), generator=generator)
        text[row, 1 + words] = END_ID
    return text


def rate(encode, inputs: torch.Tensor, seconds: float = 1.0) -> float:
    """Items per second: calls repeated for about `seconds` (at least 2)."""
    calls, start = 0, time.perf_counter()
    while calls < 2 or time.perf_counter() - start < seconds:
        encode(inputs)
        calls += 1
    return calls * len(inputs) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=1.0, help="time per measurement")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = build_config(CLIPConfig, load_preset("clip-vit-b-32")["model"])
    model = CLIP(config).eval()
    folder = Path(tempfile.mkdtemp(prefix="bench-onnx-"))
    checkpoint.save_model(folder / "run", model)
    ClipTokenizer.find_installed().save(folder / "run")  # OpenAI's BPE, from an installed clip/open_clip package
    start = time.perf_counter()
    export_onnx(folder / "run", folder / "onnx")
    export_seconds = time.perf_counter() - start
    onnx_model, _, _ = load_onnx(folder / "onnx", threads=args.threads)
    generator = torch.Generator().manual_seed(1)
    inputs = {("image", batch): torch.rand(batch, 3, 224, 224, generator=generator) for batch in (1, 32)} | {
        ("text", batch): captions(batch, generator) for batch in (1, 32)
    }
    encoders = {
        "torch": {"image": model.encode_image, "text": model.encode_text},
        "onnx": {"image": onnx_model.encode_image, "text": onnx_model.encode_text},
    }
    with torch.no_grad():
        for case in CASES:
            tower, batch = case
            difference = (encoders["torch"][tower](inputs[case]) - encoders["onnx"][tower](inputs[case])).abs().max()
            print(f"{tower} batch {batch}: max |torch - onnxruntime| = {float(difference):.2e}")
            assert difference < 1e-4
        for case in CASES:  # warmup
            for backend in encoders:
                rate(encoders[backend][case[0]], inputs[case], seconds=0.3)
        rates: dict[tuple, dict[str, list[float]]] = {case: {"torch": [], "onnx": []} for case in CASES}
        gflops, loads = [], []
        for number in range(args.rounds):
            gflops.append(matmul_gflops())
            loads.append(os.getloadavg()[0])
            for case in CASES:
                for backend in encoders:
                    rates[case][backend].append(rate(encoders[backend][case[0]], inputs[case], args.seconds))
            print(f"round {number + 1}/{args.rounds} done", flush=True)
    print(f"\nexport of both towers: {export_seconds:.1f} s; {args.threads} threads; torch {torch.__version__}, "
          f"onnxruntime {__import__('onnxruntime').__version__}")  # fmt: skip
    spread = f"min {min(gflops):.0f}, max {max(gflops):.0f}"
    print(f"fp32 matmul: median {statistics.median(gflops):.0f} GFLOP/s ({spread}); "
          f"load average during the rounds: {min(loads):.2f} to {max(loads):.2f}")  # fmt: skip
    print("\n| tower | batch | torch (per s) | onnxruntime (per s) | onnxruntime / torch (median of rounds) |")
    print("|---|---:|---:|---:|---:|")
    for case in CASES:
        ratios = [onnx / torch_rate for torch_rate, onnx in zip(rates[case]["torch"], rates[case]["onnx"])]
        torch_rate, onnx_rate = (statistics.median(rates[case][backend]) for backend in ("torch", "onnx"))
        print(f"| {case[0]} | {case[1]} | {torch_rate:.1f} | {onnx_rate:.1f} | {statistics.median(ratios):.2f}x "
              f"({min(ratios):.2f} to {max(ratios):.2f}) |")  # fmt: skip


if __name__ == "__main__":
    main()
