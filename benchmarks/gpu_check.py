"""The GPU check: clipdalle's CUDA paths and the ml6 presets on one GPU, against DALLE-pytorch 1.6.6 and open_clip
3.3.0 with the same shapes on the same GPU, in one run of a few minutes.

benchmarks/gpu_check.sh runs this on the device machine after installing the package there; on a machine without a
GPU, `--device cpu --tiny` runs every section end to end at toy sizes (a dry run of the script, not a measurement).

Sections, in this order; each gets a share of --budget seconds (time one leaves unused goes to the later ones) and
its figures go into OUT/results.json, rewritten after every section so that a run cut short keeps what it measured:

    env           the GPU, versions, and the bf16 matmul rate measured now (8192^3, random data)
    tests         pytest -m cuda tests/test_cuda.py, in a subprocess
    dalle         the dalle-ml6 preset through clipdalle.training.loop.train on random batches: sequences/s, peak
                  memory, model FLOP utilisation; likewise `clip` (clip-ml6, pairs/s) and `vae` (vae-ml6, images/s,
                  and dVAE encoding, the DALL·E data stage)
    generate      the ml6 DALL·E + dVAE: images/s at batch 64 and 512, fp32 (what `clipdalle generate` runs) and
                  under bf16 autocast; "generate 512, keep 32" by the ml6 CLIP for one prompt
    ref_dalle     DALLE-pytorch's DALLE and open_clip's CLIP against ours with the ml6 shapes, ours and theirs
    ref_clip      alternating (A B A B), median of the per-round ratios, as the CPU benchmarks do (their model
                  builders are reused from bench_dalle.py, bench_clip.py, bench_vae.py)
    ref_generate  generation against DALLE-pytorch as shipped (cache unused) and with its cache fixed
    ref_vae       training against DALLE-pytorch's DiscreteVAE (ours with the vq and the gumbel quantizer)

Training figures come from the loop's own `items_per_s` in metrics.csv (every --log-every steps; the first interval,
with the warm-up, is dropped). FLOPs are counted as the CPU benchmarks count them: DALL·E 6 x non-embedding
parameters x positions (attention's 12 x layers x positions^2 x width given beside it), CLIP the multiply-adds of
bench_clip.training_flops_per_pair, the dVAE 3 x the forward FLOPs torch's FlopCounterMode counts; utilisation is
against 790 TFLOP/s (the H200's dense bf16 rate, measured at 769-798 on these machines) and against the rate `env`
measured. OUT/summary.md holds the tables for benchmarks/RESULTS.md and the extrapolation to the whole ml6 pipeline.
"""

from __future__ import annotations

import argparse
import copy
import csv
import functools
import itertools
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path

import bench_clip
import bench_dalle
import bench_vae
import torch
from machine import matmul_gflops

from clipdalle.config import TrainConfig, build_config, load_preset
from clipdalle.models.clip import CLIP, CLIPConfig
from clipdalle.models.dalle import DALLE, DALLEConfig
from clipdalle.models.dvae import DiscreteVAE, DVAEConfig
from clipdalle.sampling import generate
from clipdalle.tokenizers import CaptionTokenizer
from clipdalle.training import loop, objectives
from clipdalle.training.loop import train

ROOT = Path(__file__).resolve().parents[1]
# The loop's progress bar redraws ten times a second; in a log that is read afterwards, every 30 s is plenty.
loop.tqdm = functools.partial(loop.tqdm, mininterval=30)
PEAK_BF16 = 790e12  # FLOP/s: H200 dense bf16, as measured on these machines (KINDS.md: 769-798 on random data)
TRAINING_IMAGES = 55_824  # the ml6 pipeline's training icons (README, "Time per epoch")
SECTIONS = {  # name -> share of the budget
    "env": 8,
    "tests": 45,
    "dalle": 30,
    "clip": 25,
    "vae": 30,
    "generate": 35,
    "ref_dalle": 30,
    "ref_clip": 20,
    "ref_generate": 55,
    "ref_vae": 22,
}


class Enough(Exception):
    """Ends a timed training run: raised by the objective once the steps are done or the time is up."""


class Check:
    """What every section reads: the options, the device, where results go, and the section's deadline."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.device = args.device
        self.tiny = args.tiny
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.results: dict[str, dict] = {}
        self.deadline = 0.0
        self.work = Path(tempfile.mkdtemp(prefix="gpu-check-"))  # run directories; nothing of it goes to OUT

    # ------------------------------------------------------------------------------------------ helpers

    def sync(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()

    def synced(self, call: Callable[[], object]) -> Callable[[], None]:
        """`call` timed to its end on the GPU: the clock reads after the queued work has run."""

        def run() -> None:
            call()
            self.sync()

        return run

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def dtype(self, preset: str) -> str:
        """The preset's dtype on a GPU; fp32 on the CPU (bf16 matrix products are ~100x slower on AVX2)."""
        return load_preset(preset)["train"].get("dtype", "fp32") if self.device == "cuda" else "fp32"

    def autocast_dtype(self, preset: str) -> torch.dtype | None:
        return torch.bfloat16 if self.dtype(preset) == "bf16" else None

    def model_config(self, cls: type, preset: str, tiny: dict) -> object:
        """A preset's model config; --tiny shrinks it (a dry run's sizes, never a measurement)."""
        return build_config(cls, load_preset(preset)["model"], tiny if self.tiny else {})

    def batch_size(self, preset: str, tiny: int) -> int:
        return tiny if self.tiny else load_preset(preset)["train"]["batch_size"]

    def write(self) -> None:
        """results.json and summary.md, rewritten whole (a run cut short keeps the sections done)."""
        for name, text in (
            ("results.json", json.dumps(self.results, indent=2, default=str)),
            ("summary.md", summary(self.results)),
        ):
            temporary = self.out / f".{name}.tmp"
            temporary.write_text(text)
            temporary.replace(self.out / name)

    def free(self) -> None:
        if self.device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def median_ratio(ours: list[float], theirs: list[float]) -> dict:
    ratios = [a / b for a, b in zip(ours, theirs)]
    return {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios), "rounds": len(ratios)}


# ------------------------------------------------------------------------------------------ env


def matmul_rate(check: Check) -> float:
    """FLOP/s of a large matrix product now: bf16 8192^3 on a GPU (random data, 3 warm-ups, median of 10); the
    benchmarks' fp32 1024^2 on the CPU."""
    if check.device != "cuda":
        return matmul_gflops() * 1e9
    size = 8192
    a, b = (torch.randn(size, size, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    times = []
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * size**3 / statistics.median(times)


def section_env(check: Check) -> dict:
    result = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": check.device,
        "tiny": check.tiny,
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        "tf32_cudnn": torch.backends.cudnn.allow_tf32,
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
    }
    if check.device == "cuda":
        properties = torch.cuda.get_device_properties(0)
        result.update(
            gpu=properties.name,
            memory_gib=properties.total_memory / 2**30,
            multiprocessors=properties.multi_processor_count,
            cudnn=torch.backends.cudnn.version(),
        )
        try:
            query = "name,driver_version,clocks.sm,clocks.max.sm,power.draw,temperature.gpu"
            smi = subprocess.run(
                ["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=10,
            )
            result["nvidia_smi"] = smi.stdout.strip()
        except (OSError, subprocess.TimeoutExpired) as error:
            result["nvidia_smi"] = f"unavailable: {error}"
    result["matmul_flops"] = matmul_rate(check)
    result["matmul"] = "bf16 8192^3" if check.device == "cuda" else "fp32 1024^2 (CPU)"
    say(
        f"{result.get('gpu', 'cpu')}, torch {torch.__version__}: "
        f"{result['matmul']} {result['matmul_flops'] / 1e12:.3g} TFLOP/s"
    )
    return result


# ------------------------------------------------------------------------------------------ tests


def section_tests(check: Check) -> dict:
    # pyproject's addopts already say -q; a second -q would drop the closing "N passed" line read below
    command = [sys.executable, "-m", "pytest", "-m", "cuda", "tests/test_cuda.py", "-rfEs", "-p", "no:cacheprovider"]
    environment = dict(os.environ)
    if check.device != "cuda":  # the dry run checks the tests' logic on the CPU
        environment["CLIPDALLE_CUDA_TESTS_DEVICE"] = "cpu"
    started = time.perf_counter()
    try:
        done = subprocess.run(command, cwd=ROOT, env=environment, capture_output=True, timeout=max(10.0, check.left()))
        output, code = (done.stdout + done.stderr).decode(errors="replace"), done.returncode
    except subprocess.TimeoutExpired as error:  # what it printed so far still tells which tests ran
        output = ((error.stdout or b"") + (error.stderr or b"")).decode(errors="replace") + "\n(timed out)"
        code = None
    print(output, flush=True)
    outcomes = r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed|deselected)"
    closing = [line for line in output.splitlines() if re.search(outcomes, line)]
    counts = {word: int(number) for number, word in re.findall(outcomes, closing[-1])} if closing else {}
    failures = [line for line in output.splitlines() if line.startswith(("FAILED", "ERROR"))]
    return {"exit_code": code, "counts": counts, "failures": failures, "seconds": time.perf_counter() - started}


# ------------------------------------------------------------------------------------------ ml6 training


def pinned(batch: dict, check: Check) -> dict:
    """A batch as a loader with workers delivers it to a GPU run: page-locked, so the loop's copy is asynchronous."""
    if check.device != "cuda":
        return batch
    return {key: value.pin_memory() if isinstance(value, torch.Tensor) else value for key, value in batch.items()}


def train_preset(
    check: Check, preset: str, model: torch.nn.Module, objective: Callable, batches: list[dict], flops_per_item: dict
) -> dict:
    """Runs `preset`'s training config through the training loop for --steps steps or until the section's time is
    up, on `batches` (cycled), and reads the loop's throughput from metrics.csv."""
    steps = check.args.steps
    log_every = max(1, min(check.args.log_every, steps // 2))
    config = build_config(
        TrainConfig,
        load_preset(preset)["train"],
        {
            "steps": steps + 1,  # the objective ends the run before the last step's checkpoint
            "batch_size": len(batches[0]["keys"]),
            "log_every": log_every,
            "eval_every": 10**9,
            "save_every": 10**9,
            "num_workers": 0,
            "device": check.device,
            "dtype": check.dtype(preset),
        },
    )
    calls = itertools.count(1)
    reserve = 5.0  # for reading the results and freeing memory

    def bounded(model: torch.nn.Module, batch: dict, progress: float):
        if next(calls) > steps or check.left() < reserve:
            raise Enough
        return objective(model, batch, progress)

    run_dir = check.work / preset
    check.free()
    started = time.perf_counter()
    try:
        train(model, bounded, lambda start: itertools.cycle(batches), run_dir, config)
    except Enough:
        pass
    seconds = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated() / 2**30 if check.device == "cuda" else None
    rows: dict[int, dict[str, float]] = {}
    with open(run_dir / "metrics.csv") as handle:
        for row in csv.DictReader(handle):
            if row["split"] == "train":
                rows.setdefault(int(row["step"]), {})[row["name"]] = float(row["value"])
    logged = [rows[step] for step in sorted(rows)]
    rates = [row["items_per_s"] for row in logged[1:]]  # the first interval holds the warm-up
    result = {
        "preset": preset,
        "batch_size": config.batch_size,
        "dtype": config.dtype,
        "steps_done": max(rows, default=0),
        "seconds": seconds,
        "log_every": log_every,
        "items_per_s_per_interval": [row["items_per_s"] for row in logged],
        "loss_first": logged[0]["loss"] if logged else None,
        "loss_last": logged[-1]["loss"] if logged else None,
        "peak_memory_gib": peak,
        "flops_per_item": flops_per_item,
        "preset_steps": load_preset(preset)["train"]["steps"],
        "preset_batch_size": load_preset(preset)["train"]["batch_size"],
    }
    if not rates:
        result["error"] = f"too few logged intervals ({len(logged)}) to time past the warm-up"
        return result
    rate = statistics.median(rates)
    measured = check.results.get("env", {}).get("matmul_flops")
    result.update(items_per_s=rate, step_ms=1e3 * config.batch_size / rate)
    for name, flops in flops_per_item.items():
        result[f"tflops_{name}"] = rate * flops / 1e12
        result[f"mfu_{name}_vs_790"] = rate * flops / PEAK_BF16
        if measured:
            result[f"mfu_{name}_vs_measured"] = rate * flops / measured
    say(
        f"{preset}: {rate:,.1f} items/s at batch {config.batch_size} ({config.dtype}), "
        f"{result['step_ms']:.1f} ms/step, peak {peak or 0:.2f} GiB, {result.get('tflops_model', 0):.1f} TFLOP/s = "
        f"{100 * result.get('mfu_model_vs_790', 0):.1f} % of 790; "
        f"loss {result['loss_first']:.3f} -> {result['loss_last']:.3f}"
    )
    return result


def dalle_shape(dalle: DALLEConfig, vae: DVAEConfig) -> bench_dalle.Shape:
    return bench_dalle.Shape(
        text_length=dalle.text_length,
        text_vocab=dalle.text_vocab_size,
        image_vocab=dalle.image_vocab_size,
        image_size=vae.image_size,
        vae_layers=vae.n_downsample,
        vae_hidden=vae.n_hidden,
        vae_resblocks=vae.n_resblock,
        codebook_dim=vae.n_embd,
        width=dalle.n_embd,
        depth=dalle.n_layer,
        heads=dalle.n_head,
        dropout=dalle.dropout,
    )


def ml6_configs(check: Check) -> tuple[DALLEConfig, DVAEConfig, CLIPConfig]:
    """The ml6 presets' models; with --tiny, 64 px, an 8 x 8 grid and 2 blocks of 128, so that a 2-core CPU runs
    every section in minutes (the sizes of a dry run, never a measurement)."""
    dalle = check.model_config(DALLEConfig, "dalle-ml6", {"grid_size": 8, "n_layer": 2, "n_embd": 128, "n_head": 4})
    vae = check.model_config(DVAEConfig, "vae-ml6", {"image_size": 64, "n_hidden": 32, "n_resblock": 1})
    widths = {"vision_n_embd": 128, "text_n_embd": 128, "vision_n_head": 4, "text_n_head": 4}
    clip = check.model_config(
        CLIPConfig, "clip-ml6", {"image_size": 64, "vision_n_layer": 2, "text_n_layer": 2, **widths}
    )
    return dalle, vae, clip


def clip_shapes(config: CLIPConfig) -> bench_clip.Shapes:
    head_width = config.vision_n_embd // config.vision_n_head
    if config.text_n_embd // config.text_n_head != head_width:
        raise ValueError("bench_clip.Shapes needs one head width in both towers")
    return bench_clip.Shapes(
        image_size=config.image_size,
        patch_size=config.vision_patch_size,
        vision_width=config.vision_n_embd,
        vision_layers=config.vision_n_layer,
        context_length=config.context_length,
        text_width=config.text_n_embd,
        text_layers=config.text_n_layer,
        embed_dim=config.embed_dim,
        quick_gelu=config.activation == "quick_gelu",
        head_width=head_width,
        vocab_size=config.vocab_size,
    )


def section_dalle(check: Check) -> dict:
    config, vae_config, _ = ml6_configs(check)
    shape = dalle_shape(config, vae_config)
    batch_size = check.batch_size("dalle-ml6", 4)
    generator = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(4):
        text, codes = bench_dalle.random_batch(batch_size, generator, shape)
        batches.append(pinned({"keys": list(range(batch_size)), "text": text, "codes": codes}, check))
    torch.manual_seed(0)
    model = DALLE(config)
    parameters = bench_dalle.non_embedding_parameters(model)
    positions = shape.positions
    flops = {
        "model": 6 * parameters * positions,
        "with_attention": 6 * parameters * positions + 12 * config.n_layer * positions**2 * config.n_embd,
    }
    result = train_preset(check, "dalle-ml6", model, objectives.dalle_loss, batches, flops)
    result.update(non_embedding_parameters=parameters, positions=positions)
    return result


def section_clip(check: Check) -> dict:
    *_, config = ml6_configs(check)
    shapes = clip_shapes(config)
    batch_size = check.batch_size("clip-ml6", 8)
    generator = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(4):
        images = torch.rand(batch_size, 3, config.image_size, config.image_size, generator=generator)
        text = bench_clip.captions(batch_size, config.context_length, generator, config.vocab_size, config.eos_id)
        batches.append(pinned({"keys": list(range(batch_size)), "images": images, "text": text}, check))
    # encode_text runs each batch up to its last end-of-text token
    tokens = round(statistics.mean(int((b["text"] == config.eos_id).int().argmax(1).max()) + 1 for b in batches))
    flops = {"model": bench_clip.training_flops_per_pair(shapes, tokens, batch_size, pooled=True)}
    torch.manual_seed(0)
    result = train_preset(check, "clip-ml6", CLIP(config), objectives.clip_loss, batches, flops)
    result["text_tokens_run"] = tokens
    return result


def section_vae(check: Check) -> dict:
    _, config, _ = ml6_configs(check)
    batch_size = check.batch_size("vae-ml6", 4)
    generator = torch.Generator().manual_seed(0)
    size = config.image_size
    batches = [
        pinned(
            {"keys": list(range(batch_size)), "images": torch.rand(batch_size, 3, size, size, generator=generator)},
            check,
        )
        for _ in range(4)
    ]
    torch.manual_seed(0)
    model = DiscreteVAE(config)
    counter = copy.deepcopy(model).to(check.device)
    forward = bench_vae.forward_gflop_per_image("ours", {"model": counter}, size) * 1e9
    del counter
    result = train_preset(check, "vae-ml6", model, objectives.vae_loss, batches, {"model": 3 * forward})
    result["forward_flops_per_image"] = forward
    # Encoding: the DALL·E data stage turns every training image into codes once.
    model.eval()
    images = batches[0]["images"].to(check.device)
    encode = check.synced(lambda: model.encode(images))
    encode()
    times = []
    while len(times) < 10 and (not times or check.left() > 2 * times[-1]):
        started = time.perf_counter()
        encode()
        times.append(time.perf_counter() - started)
    result["encode_images_per_s"] = len(images) / statistics.median(times)
    say(f"vae-ml6 encode: {result['encode_images_per_s']:,.0f} images/s at batch {len(images)}")
    return result


# ------------------------------------------------------------------------------------------ generation


def section_generate(check: Check) -> dict:
    dalle_config, vae_config, clip_config = ml6_configs(check)
    shape = dalle_shape(dalle_config, vae_config)
    result: dict[str, object] = {"rates": {}}
    sizes = (2, 4) if check.tiny else (64, 512)
    precisions = {"fp32": None, "bf16": check.autocast_dtype("dalle-ml6")}
    for batch_size in sizes:
        for precision, dtype in precisions.items():
            if precision == "bf16" and dtype is None:
                continue  # the CPU dry run: fp32 only
            if check.left() < 5:
                result.setdefault("skipped", []).append(f"batch {batch_size} {precision}: out of time")
                continue
            calls = bench_dalle.generation_calls(batch_size, shape, check.device, dtype, contestants=("ours",))
            times = bench_dalle.interleaved({"ours": check.synced(calls["ours"])}, 3, deadline=check.deadline - 3)
            rate = batch_size / statistics.median(times["ours"])
            result["rates"][f"batch {batch_size} {precision}"] = rate
            say(f"generate batch {batch_size} {precision}: {rate:,.1f} images/s ({len(times['ours'])} rounds)")
            del calls
            check.free()
    n, keep = (8, 2) if check.tiny else (512, 32)
    if check.left() > 5:
        result["rerank"] = rerank(check, dalle_config, vae_config, clip_config, n, keep)
    return result


def rerank(check: Check, dalle_config: DALLEConfig, vae_config: DVAEConfig, clip_config: CLIPConfig, n: int, keep: int):
    """ "Generate n, keep `keep`" for one prompt, ranked by a CLIP of the ml6 shape (random weights)."""
    words = ["red", "orange", "yellow", "green", "blue", "purple", "black", "grey", "circle", "star", "house", "icon"]
    captions = [f"a {a} {b} icon" for a, b in itertools.product(words[:8], words[8:])]
    tokenizer = CaptionTokenizer.train(captions, min(dalle_config.text_vocab_size, clip_config.vocab_size))
    torch.manual_seed(0)
    model = DALLE(dalle_config).to(check.device).eval()
    vae = DiscreteVAE(vae_config).to(check.device).eval()
    clip = (CLIP(clip_config).to(check.device).eval(), None, tokenizer)
    dtype = check.autocast_dtype("dalle-ml6")

    def call():
        with bench_dalle.autocast_to(check.device, dtype):
            return generate(model, vae, tokenizer, ["a red star icon"], n=n, keep=keep, clip=clip, seed=0, batch_size=n)

    times = bench_dalle.interleaved({"generate": check.synced(call)}, 2, deadline=check.deadline - 2)["generate"]
    seconds = statistics.median(times)
    say(f"generate {n}, keep {keep} by CLIP: {seconds:.2f} s ({n / seconds:,.0f} images/s generated and ranked)")
    return {"n": n, "keep": keep, "seconds": seconds, "images_per_s": n / seconds, "dtype": str(dtype)}


# ------------------------------------------------------------------------------------------ references


def import_references(check: Check) -> str | None:
    """Imports DALLE-pytorch and open_clip (from --reference-site when given); the reason when they cannot be."""
    if check.args.reference_site:
        sys.path.insert(0, check.args.reference_site)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import dalle_pytorch
            import open_clip
    except Exception as error:  # a missing or broken reference stack skips the comparison, not the run
        return f"reference packages unavailable ({type(error).__name__}: {error})"
    check.results.setdefault("env", {}).update(dalle_pytorch=dalle_pytorch.__version__, open_clip=open_clip.__version__)
    return None


def compare(check: Check, calls: dict[str, Callable], items: int, rounds: int = 5, cold: tuple[str, ...] = ()) -> dict:
    """Interleaved rounds of synced calls until the deadline: items/s per contestant, and the median of the
    per-round ratios of each of ours ("ours", "ours gumbel") to each of theirs."""
    synced = {name: check.synced(call) for name, call in calls.items()}
    times = bench_dalle.interleaved(synced, rounds, cold, deadline=check.deadline - 2)
    rates = {name: [items / t for t in values] for name, values in times.items()}
    ours = [name for name in rates if name.startswith("ours")]
    return {
        "items_per_s": {name: statistics.median(values) for name, values in rates.items()},
        "ratios": {
            f"{mine} / {name}": median_ratio(rates[mine], rates[name])
            for mine in ours
            for name in rates
            if name not in ours
        },
    }


def section_ref_dalle(check: Check) -> dict:
    dalle_config, vae_config, _ = ml6_configs(check)
    shape = dalle_shape(dalle_config, vae_config)
    batch_size = check.batch_size("dalle-ml6", 4)
    dtype = check.autocast_dtype("dalle-ml6")
    steps = bench_dalle.training_steps(batch_size, shape, ("full",), check.device, dtype)["full"]
    repeats = 1 if check.tiny else 3
    calls = {name: (lambda entry=entry: [entry["call"]() for _ in range(repeats)]) for name, entry in steps.items()}
    result = compare(check, calls, repeats * batch_size)
    parameters = bench_dalle.non_embedding_parameters(steps["ours"]["model"])
    result.update(
        batch_size=batch_size,
        dtype=str(dtype),
        optimizer="Adam, both",
        their_parameters=bench_dalle.non_embedding_parameters(steps["theirs"]["model"]),
    )
    result["ours_mfu_vs_790"] = result["items_per_s"]["ours"] * 6 * parameters * shape.positions / PEAK_BF16
    say(f"ref_dalle: {result['items_per_s']}, ours / theirs {result['ratios']['ours / theirs']['median']:.2f}x")
    return result


def section_ref_clip(check: Check) -> dict:
    *_, config = ml6_configs(check)
    shapes = clip_shapes(config)
    batch_size = check.batch_size("clip-ml6", 8)
    dtype = check.autocast_dtype("clip-ml6")
    workload = bench_clip.training_workload(
        "ml6", shapes, torch.Generator().manual_seed(0), batch_size, check.device, dtype
    )
    result = compare(check, {"ours": workload.ours, "theirs": workload.theirs}, batch_size)
    result.update(
        batch_size=batch_size, dtype=str(dtype), text_pooling="argmax (open_clip's), both", optimizer="AdamW, both"
    )
    for name, flops in (("ours", workload.our_flops), ("theirs", workload.their_flops)):
        result[f"{name}_mfu_vs_790"] = result["items_per_s"][name] * flops / PEAK_BF16
    say(f"ref_clip: {result['items_per_s']}, ours / theirs {result['ratios']['ours / theirs']['median']:.2f}x")
    return result


def section_ref_vae(check: Check) -> dict:
    _, config, _ = ml6_configs(check)
    batch_size = check.batch_size("vae-ml6", 4)
    entries = bench_vae.contestants(
        config.image_size, config.n_downsample, batch_size, config.n_hidden, config.n_resblock, check.device
    )
    result = compare(check, {name: entry["train_step"] for name, entry in entries.items()}, batch_size)
    result.update(batch_size=batch_size, dtype="fp32 (the preset's)", optimizer="Adam, both")
    say(f"ref_vae: {result['items_per_s']}, ours vq / theirs {result['ratios']['ours vq / theirs']['median']:.2f}x")
    return result


def section_ref_generate(check: Check) -> dict:
    dalle_config, vae_config, _ = ml6_configs(check)
    shape = dalle_shape(dalle_config, vae_config)
    dtype = check.autocast_dtype("dalle-ml6")
    result: dict[str, object] = {"dtype": str(dtype)}
    small, large = (2, 4) if check.tiny else (64, 512)
    plans = [  # (figure, batch, contestants, rounds, seconds the section must have left to start it)
        (f"batch {small}, cache fixed", small, ("ours", "theirs, cache fixed"), 2, 10),
        (f"batch {large}, cache fixed", large, ("ours", "theirs, cache fixed"), 2, 20),
        (f"batch {small}, as shipped", small, ("ours", "theirs as shipped"), 1, 25),
    ]
    for figure, batch_size, contestants, rounds, needed in plans:
        if check.left() < needed:
            result[figure] = {"skipped": "out of time"}
            continue
        calls = bench_dalle.generation_calls(batch_size, shape, check.device, dtype, contestants)
        cold = ("theirs as shipped",)  # without its cache, seconds a call at ml6's 256 codes: no warm-up
        result[figure] = compare(check, calls, batch_size, rounds, cold)
        say(f"ref_generate {figure}: {result[figure]}")
        del calls
        check.free()
    return result


# ------------------------------------------------------------------------------------------ summary


def extrapolate(results: dict) -> dict:
    """The ml6 pipeline's GPU stages at the measured rates: each model trained to its preset's steps, the DALL·E
    data encoded once, and the evaluation's samples generated (the icon dataset is CPU work, not counted)."""
    stages = {}
    for section in ("vae", "clip", "dalle"):
        measured = results.get(section, {})
        if "items_per_s" in measured:
            items = measured["preset_steps"] * measured["preset_batch_size"]
            stages[f"{section} training ({measured['preset_steps']:,} steps of {measured['preset_batch_size']})"] = (
                items / measured["items_per_s"]
            )
    if "encode_images_per_s" in results.get("vae", {}):
        stages[f"DALL·E data ({TRAINING_IMAGES:,} images encoded)"] = (
            TRAINING_IMAGES / results["vae"]["encode_images_per_s"]
        )
    evaluation = load_preset("ml6")["eval"]
    rate = results.get("generate", {}).get("rates", {}).get("batch 64 fp32")
    if rate:
        images = evaluation["prompts"] * evaluation["samples"]
        stages[f"evaluation samples ({images:,} images at batch 64, fp32)"] = images / rate
    return {"stages_s": stages, "total_s": sum(stages.values())}


def goals(results: dict) -> list[str]:
    """The issue's goals against what was measured: one line each, met or not."""
    measured = []
    mfu = results.get("dalle", {}).get("mfu_model_vs_790")
    if mfu is not None:
        measured.append(("DALL·E ml6 training at >= 25 % of 790 TFLOP/s", mfu, 0.25, f"{100 * mfu:.1f} %"))
    for section, label, floor in (("ref_dalle", "DALL·E training", 1.5), ("ref_clip", "CLIP training", 1.2)):
        ratio = results.get(section, {}).get("ratios", {}).get("ours / theirs")
        if ratio:
            reference = "DALLE-pytorch" if section == "ref_dalle" else "open_clip"
            measured.append((f"{label} >= {floor}x {reference}", ratio["median"], floor, f"{ratio['median']:.2f}x"))
    for figure, value in results.get("ref_generate", {}).items():
        ratio = value.get("ratios", {}).get("ours / theirs, cache fixed") if isinstance(value, dict) else None
        if ratio:
            text = f"{ratio['median']:.2f}x"
            measured.append((f"generation ({figure}) >= 3x DALLE-pytorch, cache fixed", ratio["median"], 3.0, text))
    return [f"- {goal}: {text}, {'met' if value >= floor else 'NOT met'}" for goal, value, floor, text in measured]


def summary(results: dict) -> str:
    """Markdown for benchmarks/RESULTS.md: what each section measured, as tables."""
    env = results.get("env", {})
    lines = [
        "# GPU check",
        "",
        f"{env.get('gpu', env.get('device', '?'))}, torch {env.get('torch')}, CUDA {env.get('cuda')}, "
        f"{env.get('matmul')} measured at {env.get('matmul_flops', 0) / 1e12:.3g} TFLOP/s"
        + (" (--tiny: a dry run at toy sizes, not a measurement)" if env.get("tiny") else ""),
        "",
    ]
    tests = results.get("tests")
    if tests:
        lines += [f"CUDA tests: {tests.get('counts')} (exit code {tests.get('exit_code')})", ""]
        lines += [f"    {line}" for line in tests.get("failures", [])]
    rows = [(name, results[name]) for name in ("dalle", "clip", "vae") if "items_per_s" in results.get(name, {})]
    if rows:
        lines += [
            "| preset | batch | dtype | items/s | ms/step | peak GiB | TFLOP/s | % of 790 | % of measured "
            "| preset's steps at this rate |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for _, row in rows:
            lines.append(
                f"| {row['preset']} | {row['batch_size']} | {row['dtype']} | {row['items_per_s']:,.1f} | "
                f"{row['step_ms']:.1f} | {row['peak_memory_gib'] or 0:.2f} | {row['tflops_model']:.1f} | "
                f"{100 * row['mfu_model_vs_790']:.1f} | {100 * row.get('mfu_model_vs_measured', 0):.1f} | "
                f"{row['preset_steps']:,} of {row['preset_batch_size']}: "
                f"{row['preset_steps'] * row['preset_batch_size'] / row['items_per_s'] / 60:.1f} min |"
            )
        if "tflops_with_attention" in results.get("dalle", {}):
            dalle = results["dalle"]
            lines.append(
                f"\nDALL·E with attention counted (12 x layers x positions^2 x width, full square): "
                f"{dalle['tflops_with_attention']:.1f} TFLOP/s, "
                f"{100 * dalle['mfu_with_attention_vs_790']:.1f} % of 790."
            )
        lines.append("")
    generation = results.get("generate", {})
    if generation.get("rates"):
        lines += ["| generation (ml6 DALL·E + dVAE) | images/s |", "|---|---|"]
        lines += [f"| {name} | {rate:,.1f} |" for name, rate in generation["rates"].items()]
        if "rerank" in generation:
            rerank_result = generation["rerank"]
            lines.append(
                f"| generate {rerank_result['n']}, keep {rerank_result['keep']} by CLIP, one prompt | "
                f"{rerank_result['images_per_s']:,.1f} ({rerank_result['seconds']:.2f} s) |"
            )
        lines.append("")
    comparisons = []
    for section, label in (
        ("ref_dalle", "DALL·E training"),
        ("ref_clip", "CLIP training"),
        ("ref_vae", "dVAE training"),
    ):
        if "items_per_s" in results.get(section, {}):
            comparisons.append((label, results[section]))
    for key, value in results.get("ref_generate", {}).items():
        if isinstance(value, dict) and "items_per_s" in value:
            comparisons.append((f"generation, {key}", value))
    if comparisons:
        lines += ["| figure | contestant | items/s | ratio, median of rounds (range) |", "|---|---|---|---|"]
        for label, value in comparisons:
            for name, rate in value["items_per_s"].items():
                lines.append(f"| {label} | {name} | {rate:,.1f} | |")
            for pair, ratio in value["ratios"].items():
                lines.append(f"| {label} | {pair} | | {ratio['median']:.2f}x ({ratio['min']:.2f}-{ratio['max']:.2f}) |")
        lines.append("")
    for section in SECTIONS:
        if "skipped" in results.get(section, {}) or "error" in results.get(section, {}):
            lines.append(f"- {section}: {results[section].get('skipped') or results[section].get('error')}")
    if goals(results):
        lines += ["", "Goals (issue 'On a GPU'):", "", *goals(results)]
    plan = extrapolate(results)
    if plan["stages_s"]:
        lines += ["", "Extrapolation from the measured rates: the ml6 pipeline's GPU stages on this GPU", ""]
        lines += [f"- {stage}: {seconds / 60:.1f} min" for stage, seconds in plan["stages_s"].items()]
        lines.append(f"- total: {plan['total_s'] / 3600:.2f} h")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------ main


RUNNERS = {
    "env": section_env,
    "tests": section_tests,
    "dalle": section_dalle,
    "clip": section_clip,
    "vae": section_vae,
    "generate": section_generate,
    "ref_dalle": section_ref_dalle,
    "ref_clip": section_ref_clip,
    "ref_generate": section_ref_generate,
    "ref_vae": section_ref_vae,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--tiny", action="store_true", help="toy sizes and step counts: a dry run of every section")
    parser.add_argument("--budget", type=float, default=300, help="seconds for all sections together")
    parser.add_argument("--out", default=os.environ.get("OUT", "runs/gpu-check"), help="results.json, summary.md")
    parser.add_argument("--only", default=None, help=f"comma-separated sections among {','.join(SECTIONS)}")
    parser.add_argument("--steps", type=int, default=None, help="training steps per preset (default 300; --tiny 4)")
    parser.add_argument("--log-every", type=int, default=25, help="steps per throughput interval")
    parser.add_argument("--reference-site", default=None, help="folder holding dalle_pytorch and open_clip")
    args = parser.parse_args(argv)
    args.steps = args.steps or (4 if args.tiny else 300)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA GPU here; use --device cpu --tiny for a dry run")
    chosen = list(SECTIONS) if args.only is None else args.only.split(",")
    if not set(chosen) <= set(SECTIONS):
        parser.error(f"--only {args.only}: expected sections among {', '.join(SECTIONS)}")
    torch.manual_seed(0)
    check = Check(args)
    end = time.perf_counter() + args.budget
    references = None
    say(f"sections {', '.join(chosen)}; budget {args.budget:.0f} s; results in {check.out}")
    for index, name in enumerate(chosen):
        shares = [SECTIONS[later] for later in chosen[index:]]
        started = time.perf_counter()
        check.deadline = started + max(0.0, end - started) * shares[0] / sum(shares)
        result = None
        if name.startswith("ref_"):
            references = import_references(check) or "" if references is None else references
            result = {"skipped": references} if references else None
        if result is None:
            say(f"{name}: {check.left():.0f} s")
            try:
                result = RUNNERS[name](check)
            except Exception as error:  # one broken section must not cost the others their GPU time
                traceback.print_exc()
                result = {"error": f"{type(error).__name__}: {error}"}
        result["section_seconds"] = time.perf_counter() - started
        check.results[name] = result
        check.results["extrapolation"] = extrapolate(check.results)
        check.write()
        check.free()
    print(summary(check.results), flush=True)
    failed = [name for name in chosen if "error" in check.results[name]]
    tests = check.results.get("tests", {})
    return 1 if failed or tests.get("exit_code") not in (None, 0, 5) else 0


if __name__ == "__main__":
    sys.exit(main())
