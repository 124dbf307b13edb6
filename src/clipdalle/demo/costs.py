"""What a training step and a generated sample cost: FLOPs counted on the real models, and the machine's speed.

The planner (demo/plan.py) predicts seconds from FLOPs and the machine's speed now:

    seconds per step = scale * (FLOPs per step / probe FLOP/s) ** exponent  (+ decoding the batch's images)

`flops_per_sample` counts the matrix multiplications and convolutions of one forward and backward pass (or of one
generated sample) with torch's FlopCounterMode on a batch of two, so no hand-written formula can drift from the
models. `matmul_probe` is the machine's fp32 matmul rate at the moment of the call (one thread, or all of them); the
scale and exponent of each model kind are fitted by benchmarks/bench_scaling.py and recorded in RECORDED below (the
measurements and fits are in benchmarks/RESULTS.md, "Scaling").
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

PROBE_SIZE = 256  # the probe's square matmul: small enough to stay in cache, like the small models' matrices
PROBE_SECONDS = 0.5  # how long the probe runs


@dataclass(frozen=True)
class Speed:
    """A model kind's measured speed on this machine class: seconds = scale * ideal ** exponent, where `ideal` is the
    seconds its FLOPs would take at the matmul probe's rate. An exponent below 1 says small models run further below
    the probe's rate than large ones (their matrices are small, their elementwise work relatively large)."""

    scale: float
    exponent: float

    def seconds(self, flops: float, probe_gflops: float) -> float:
        return self.scale * (flops / (probe_gflops * 1e9)) ** self.exponent


# Fitted by benchmarks/bench_scaling.py on this 2-core AMD EPYC at one thread (benchmarks/RESULTS.md, "Scaling"):
# least squares of log seconds on log ideal seconds. "vae", "clip", "dalle": one training step (forward, backward,
# AdamW); "dalle_sample": one generated sample in a batch of 128 (forward only, KV cache), "encode": the dVAE's or
# CLIP's forward pass in evaluation, index and token-cache stages (a third of a training step's FLOPs).
RECORDED = {
    "vae": Speed(scale=1.0575, exponent=0.7845),
    "clip": Speed(scale=1.9328, exponent=0.9127),
    "dalle": Speed(scale=1.2931, exponent=0.9714),
    "dalle_sample": Speed(scale=1.1564, exponent=0.8547),
    "encode": Speed(scale=1.0456, exponent=0.781),
}
PARALLEL_GAIN = 0.85  # speed-up per core of a stage on all cores when they are free: 2 cores ran the demo dVAE 1.78x
PARALLEL_MIN_PROBE_GAIN = 1.5  # all cores are used only when the probe on all of them beats one thread by this much
DECODE_S = 1.9e-4  # seconds per image read and decoded, beside its pixels (PNG, Pillow)
DECODE_S_PER_PIXEL = 2.0e-8  # seconds per source pixel decoded and resized


def matmul_probe(threads: int, seconds: float = PROBE_SECONDS, device: str | torch.device = "cpu") -> float:
    """GFLOP/s of repeated PROBE_SIZE x PROBE_SIZE fp32 matmuls on `threads` threads for about `seconds` (the median
    of slices of it): the share of the machine this process gets now, busy or not."""
    device = torch.device(device)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _probe_loop(seconds, device)
    finally:
        torch.set_num_threads(previous)


def concurrent_probe(workers: int, seconds: float = PROBE_SECONDS) -> float:
    """GFLOP/s each of `workers` one-thread matmul loops gets while they all run at once (Python threads: torch
    releases the GIL), the median over them: what each of the pipeline's side-by-side trainings can expect, with the
    machine's other load and each other."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    rates = [0.0] * workers

    def work(index: int) -> None:
        rates[index] = _probe_loop(seconds, torch.device("cpu"))

    try:
        runners = [threading.Thread(target=work, args=(index,)) for index in range(workers)]
        for runner in runners:
            runner.start()
        for runner in runners:
            runner.join()
    finally:
        torch.set_num_threads(previous)
    return sorted(rates)[len(rates) // 2]


def _probe_loop(seconds: float, device: torch.device) -> float:
    size = PROBE_SIZE if device.type == "cpu" else 4096
    a, b = torch.randn(size, size, device=device), torch.randn(size, size, device=device)
    a @ b  # warm-up
    rates = []
    deadline = time.perf_counter() + seconds
    while len(rates) < 10 or time.perf_counter() < deadline:
        start = time.perf_counter()
        repeats = 0
        while repeats < 8 or time.perf_counter() - start < seconds / 20:
            a @ b
            repeats += 1
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        rates.append(2 * size**3 * repeats / (time.perf_counter() - start) / 1e9)
        if len(rates) >= 40:
            break
    rates.sort()
    return rates[len(rates) // 2]


def build_model(kind: str, config: Any) -> torch.nn.Module:
    from ..models import CLIP, DALLE, DiscreteVAE

    return {"vae": DiscreteVAE, "clip": CLIP, "dalle": DALLE}[kind](config)


def example_batch(kind: str, config: Any, batch_size: int) -> dict[str, torch.Tensor]:
    """Random inputs of the right shapes for a training step of `kind`."""
    generator = torch.Generator().manual_seed(0)
    if kind == "vae":
        return {"images": torch.rand(batch_size, 3, config.image_size, config.image_size, generator=generator)}
    if kind == "clip":
        images = torch.rand(batch_size, 3, config.image_size, config.image_size, generator=generator)
        text = torch.randint(3, config.vocab_size, (batch_size, config.context_length), generator=generator)
        return {"images": images, "text": text}
    text = torch.randint(3, config.text_vocab_size, (batch_size, config.text_length), generator=generator)
    codes = torch.randint(0, config.image_vocab_size, (batch_size, config.image_length), generator=generator)
    return {"text": text, "codes": codes}


def loss_function(kind: str) -> Any:
    from ..training import objectives

    return {"vae": objectives.vae_loss, "clip": objectives.clip_loss, "dalle": objectives.dalle_loss}[kind]


@contextlib.contextmanager
def threads(count: int) -> Iterator[None]:
    """torch on `count` threads inside the block (counting FLOPs on two threads of a busy machine takes 10x longer)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def flops_per_sample(kind: str, config: Any) -> float:
    """FLOPs of one training sample of `kind` (forward and backward), counted on a batch of two."""
    from torch.utils.flop_counter import FlopCounterMode

    with threads(1):
        torch.manual_seed(0)
        model = build_model(kind, config).train()
        batch = example_batch(kind, config, 2)
        with FlopCounterMode(display=False, depth=0) as counter:
            loss, _ = loss_function(kind)(model, batch, 0.5)
            loss.backward()
    return counter.get_total_flops() / 2


def sample_flops(config: Any) -> float:
    """FLOPs of generating one DALL·E sample: a forward pass over the whole sequence, which is what decoding with a
    key/value cache adds up to (counted on a batch of two)."""
    from torch.utils.flop_counter import FlopCounterMode

    with threads(1):
        model = build_model("dalle", config).eval()
        batch = example_batch("dalle", config, 2)
        with torch.no_grad(), FlopCounterMode(display=False, depth=0) as counter:
            model(batch["text"], batch["codes"])
    return counter.get_total_flops() / 2


def training_step_seconds(kind: str, flops_per_step: float, probe_gflops: float, decoded_pixels: float = 0.0) -> float:
    """Predicted seconds of one training step of `kind` (FLOPs of the whole batch) at one thread whose probe runs at
    `probe_gflops` now, plus decoding the batch's images (`decoded_pixels`: their source pixels summed, 0 for DALL·E,
    which reads cached codes)."""
    return RECORDED[kind].seconds(flops_per_step, probe_gflops) + decoded_pixels * DECODE_S_PER_PIXEL


def decode_seconds(images: int, source_pixels: float) -> float:
    """Seconds to read, decode and resize `images` images of `source_pixels` pixels each."""
    return images * (DECODE_S + DECODE_S_PER_PIXEL * source_pixels)
