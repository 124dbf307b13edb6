"""DALL·E transformer speed: clipdalle's DALLE against DALLE-pytorch 1.6.6's, side by side in one process.

Identical configuration: captions of 32 tokens from a 1,000-token vocabulary, 8x8 codes from a 512-code dVAE
(32 px, 2 downsamplings, hidden 64, codebook dim 256; random weights: speed does not depend on them), width
256, depth 4, 8 heads of 32, fp32, 2 threads. DALLE-pytorch runs as shipped (its defaults: rotary positions,
token shift, GEGLU feed-forward, one joint output layer over text + image ids).

- Training: sequences/s of forward + backward + Adam step through each library's loss (ours
  `clipdalle.training.objectives.dalle_loss`, theirs `dalle(text, codes, return_loss=True)`), batch 32, with
  attention `full` and with the cycle `full,row,col,conv` (theirs: full, axial_row, axial_col, conv_like).
- Our training FLOP/s, counted as 6 x non-embedding parameters x positions per sequence (96), as a fraction
  of the fp32 matmul rate measured in the same run.
- Generation: images/s of text -> codes -> dVAE decode at batch 8 and 64, temperature 1, no filtering (theirs:
  `generate_images(text, filter_thres=0.5)`, whose top half of 1,512 text + image logits keeps every image
  code). "theirs as shipped" passes use_cache=True, which `forward_with_cond_scale` drops when cond_scale is 1;
  "theirs, cache fixed" binds a copy of that method that passes the cache through (their package unchanged).
- Per code step: the bare matrix products one decoding step does (every Linear it uses, batch rows, F.linear for
  both), against each side's whole generation time / 64: how far each is from being only matmuls.

Ours and theirs alternate (A B A B ...) after a warmup and the table shows the median of the per-round ratios,
because this machine's speed drifts by tens of percent within minutes. Needs the reference venv (see
/work/shared/bench/README.md); not a test, not run in CI:

    bash ../shared/bench/reference-env.sh .venv-ref && .venv-ref/bin/pip install --no-deps -e .
    .venv-ref/bin/python benchmarks/bench_dalle.py                  # or --part train / --part generate
    .venv-ref/bin/python benchmarks/bench_dalle.py --part generate --threads 1 --cpu-time   # on a shared machine
"""

from __future__ import annotations

import argparse
import statistics
import time
import types
import warnings
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from machine import matmul_gflops

from clipdalle.models.dalle import DALLE, DALLEConfig
from clipdalle.models.dvae import DiscreteVAE, DVAEConfig
from clipdalle.sampling import sample_codes
from clipdalle.training.objectives import dalle_loss as loss_fn


@dataclass(frozen=True)
class Shape:
    """One configuration in both libraries' terms; the defaults are this benchmark's (benchmarks/gpu_check.py
    builds ML6's from the presets)."""

    text_length: int = 32  # caption tokens
    text_vocab: int = 1000
    image_vocab: int = 512  # dVAE codes
    image_size: int = 32  # dVAE input side in pixels
    vae_layers: int = 2  # dVAE downsamplings: 32 px -> 8 x 8 codes
    vae_hidden: int = 64  # dVAE convolution width
    vae_resblocks: int = 1  # dVAE residual blocks at the code grid
    codebook_dim: int = 256
    width: int = 256  # transformer
    depth: int = 4
    heads: int = 8
    dropout: float = 0.0  # attention and feed-forward dropout, both models

    @property
    def grid_size(self) -> int:
        return self.image_size // 2**self.vae_layers

    @property
    def positions(self) -> int:
        """Positions per training sequence, both models: the caption and the codes (96 here)."""
        return self.text_length + self.grid_size**2


SHAPE = Shape()
PATTERNS = {  # setting -> (our attn, their attn_types)
    "full": (["full"], ("full",)),
    "mixed": (["full", "row", "col", "conv"], ("full", "axial_row", "axial_col", "conv_like")),
}


def reference_modules():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from dalle_pytorch import DALLE as ReferenceDALLE
        from dalle_pytorch import DiscreteVAE as ReferenceVAE
    return ReferenceDALLE, ReferenceVAE


def their_dalle(attn_types: tuple[str, ...], shape: Shape = SHAPE) -> torch.nn.Module:
    ReferenceDALLE, ReferenceVAE = reference_modules()
    vae = ReferenceVAE(
        image_size=shape.image_size,
        num_layers=shape.vae_layers,
        num_tokens=shape.image_vocab,
        codebook_dim=shape.codebook_dim,
        hidden_dim=shape.vae_hidden,
        num_resnet_blocks=shape.vae_resblocks,
    )
    return ReferenceDALLE(
        dim=shape.width,
        vae=vae,
        num_text_tokens=shape.text_vocab,
        text_seq_len=shape.text_length,
        depth=shape.depth,
        heads=shape.heads,
        dim_head=shape.width // shape.heads,
        attn_dropout=shape.dropout,
        ff_dropout=shape.dropout,
        attn_types=attn_types,
    )


def our_models(attn: list[str], shape: Shape = SHAPE) -> tuple[DALLE, DiscreteVAE]:
    vae_config = DVAEConfig(
        image_size=shape.image_size,
        n_downsample=shape.vae_layers,
        vocab_size=shape.image_vocab,
        n_embd=shape.codebook_dim,
        n_hidden=shape.vae_hidden,
        n_resblock=shape.vae_resblocks,
    )
    config = DALLEConfig(
        text_length=shape.text_length,
        text_vocab_size=shape.text_vocab,
        image_vocab_size=shape.image_vocab,
        grid_size=shape.grid_size,
        n_layer=shape.depth,
        n_head=shape.heads,
        n_embd=shape.width,
        dropout=shape.dropout,
        attn=attn,
    )
    return DALLE(config), DiscreteVAE(vae_config).eval()


def non_embedding_parameters(model: torch.nn.Module) -> int:
    """Parameters that take part in matmuls: everything but embedding tables, position tables and the dVAE."""
    total = 0
    for name, parameter in model.named_parameters():
        if name.startswith("vae.") or "emb" in name:  # ours: *_embedding; theirs: text_emb, image_emb
            continue
        total += parameter.numel()
    return total


def random_batch(
    batch_size: int, generator: torch.Generator, shape: Shape = SHAPE
) -> tuple[torch.Tensor, torch.Tensor]:
    text = torch.randint(3, shape.text_vocab, (batch_size, shape.text_length), generator=generator)
    lengths = torch.randint(6, shape.text_length, (batch_size, 1), generator=generator)
    text = text.masked_fill(torch.arange(shape.text_length)[None] >= lengths, 0)  # padded captions, as in real data
    codes = torch.randint(0, shape.image_vocab, (batch_size, shape.grid_size**2), generator=generator)
    return text, codes


def autocast_to(device: str, dtype: torch.dtype | None):
    """Mixed precision for both contestants alike (None: as built, fp32)."""
    return nullcontext() if dtype is None else torch.autocast(device, dtype=dtype)


def training_steps(
    batch_size: int,
    shape: Shape = SHAPE,
    settings: tuple[str, ...] = tuple(PATTERNS),
    device: str = "cpu",
    dtype: torch.dtype | None = None,
) -> dict[str, dict[str, callable]]:
    """setting -> contestant -> a closure doing one optimizer step on a fixed random batch (on `device`, under
    autocast to `dtype` when given)."""
    text, codes = random_batch(batch_size, torch.Generator().manual_seed(0), shape)
    text, codes = text.to(device), codes.to(device)
    batch = {"text": text, "codes": codes}
    steps: dict[str, dict] = {}
    for setting in settings:
        ours_attn, their_attn = PATTERNS[setting]
        ours, _ = our_models(ours_attn, shape)
        theirs = their_dalle(their_attn, shape)
        steps[setting] = {}
        for name, model in (("ours", ours.to(device)), ("theirs", theirs.to(device))):
            model.train()
            optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4)

            def step(model=model, optimizer=optimizer, name=name):
                with autocast_to(device, dtype):
                    if name == "ours":
                        loss, _ = loss_fn(model, batch, 0.5)
                    else:
                        loss = model(text.clone(), codes, return_loss=True)  # it edits text in place
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

            steps[setting][name] = {"call": step, "model": model}
    return steps


def fixed_cond_scale(self, *args, cond_scale=1, cache=None, **kwargs):
    """DALLE-pytorch's forward_with_cond_scale with the cache passed through at cond_scale 1."""
    if cond_scale == 1:
        return self(*args, cache=cache, **kwargs)
    return type(self).forward_with_cond_scale(self, *args, cond_scale=cond_scale, cache=cache, **kwargs)


def generation_calls(
    batch_size: int,
    shape: Shape = SHAPE,
    device: str = "cpu",
    dtype: torch.dtype | None = None,
    contestants: tuple[str, ...] = ("ours", "theirs as shipped", "theirs, cache fixed"),
) -> dict[str, callable]:
    """contestant -> a closure generating `batch_size` images from fixed random captions (full attention), on
    `device`, under autocast to `dtype` when given."""
    text, _ = random_batch(batch_size, torch.Generator().manual_seed(1), shape)
    text = text.to(device)
    ours, vae = our_models(["full"], shape)
    ours, vae = ours.to(device).eval(), vae.to(device)
    seeds = list(range(batch_size))

    @torch.no_grad()
    def ours_call():
        with autocast_to(device, dtype):
            codes, _ = sample_codes(ours, text, seeds)
            return vae.decode(codes)

    def their_call(model):
        def call():
            with autocast_to(device, dtype):
                return model.generate_images(text.clone(), filter_thres=0.5, use_cache=True)

        return call

    calls = {"ours": ours_call}
    if "theirs as shipped" in contestants:
        calls["theirs as shipped"] = their_call(their_dalle(("full",), shape).to(device).eval())
    if "theirs, cache fixed" in contestants:
        fixed = their_dalle(("full",), shape).to(device).eval()
        fixed.forward_with_cond_scale = types.MethodType(fixed_cond_scale, fixed)
        calls["theirs, cache fixed"] = their_call(fixed)
    return calls


def step_weights(model: torch.nn.Module, skip: tuple[str, ...]) -> list[torch.Tensor]:
    """The weight matrices one decoding step multiplies by: every Linear outside the dVAE and `skip`."""
    return [
        module.weight.detach()
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and not name.startswith(("vae.", *skip))
    ]


def matmul_floor(batch_size: int, rounds: int = 15) -> dict[str, float]:
    """contestant -> seconds per decoding step of its bare matrix products (batch_size rows x every step weight,
    F.linear for both), interleaved: the time a step would take if it did nothing else."""
    weights = {
        "ours": step_weights(our_models(["full"])[0], ("text_head",)),  # ours: one image head, no text logits
        "theirs": step_weights(their_dalle(("full",)), ()),  # theirs: one joint text + image head
    }
    inputs = {
        name: [torch.randn(batch_size, weight.shape[1]) for weight in matrices] for name, matrices in weights.items()
    }
    calls = {
        name: (lambda name=name: [F.linear(x, w) for x, w in zip(inputs[name], weights[name])]) for name in weights
    }
    times = interleaved({name: (lambda call=call: [call() for _ in range(10)]) for name, call in calls.items()}, rounds)
    return {name: statistics.median(values) / 10 for name, values in times.items()}


CLOCK = {"clock": time.perf_counter}  # --cpu-time switches to time.process_time


def interleaved(
    calls: dict[str, callable], rounds: int, cold: tuple[str, ...] = (), deadline: float | None = None
) -> dict[str, list[float]]:
    """Seconds per call, contestants alternating within each round, after one warmup call of each (except the
    `cold` ones: calls of half a minute gain nothing from it). With a `deadline` (a time.perf_counter() value),
    no round starts after it; the first always runs."""
    for name, call in calls.items():
        if name not in cold:
            call()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for round_index in range(rounds):
        if round_index > 0 and deadline is not None and time.perf_counter() > deadline:
            break
        for name, call in calls.items():
            start = CLOCK["clock"]()
            call()
            times[name].append(CLOCK["clock"]() - start)
    return times


def train_part(args: argparse.Namespace, gflops: list[float]) -> list[tuple]:
    """Training rows, plus our FLOP/s as a share of the matmul rate and mixed vs full."""
    started = time.perf_counter()
    steps = training_steps(args.train_batch_size)
    our_rates: dict[str, list[float]] = {}
    rows = []
    for setting, contestants in steps.items():
        calls = {name: (lambda entry=entry: [entry["call"]() for _ in range(3)]) for name, entry in contestants.items()}
        times = interleaved(calls, args.train_rounds)
        rates = {name: [3 * args.train_batch_size / t for t in values] for name, values in times.items()}
        our_rates[setting] = rates["ours"]
        ratio = statistics.median(a / b for a, b in zip(rates["ours"], rates["theirs"]))
        ours, theirs = statistics.median(rates["ours"]), statistics.median(rates["theirs"])
        rows.append((f"train seq/s, {setting}", ours, theirs, None, ratio, None))
        print(f"train {setting}: ours {ours:.1f}, theirs {theirs:.1f}, ratio {ratio:.2f}x", flush=True)
        gflops.append(matmul_gflops())
    our_params = non_embedding_parameters(steps["full"]["ours"]["model"])
    their_params = non_embedding_parameters(steps["full"]["theirs"]["model"])
    matmul = statistics.median(gflops)
    for setting in PATTERNS:
        flops = 6 * our_params * SHAPE.positions * statistics.median(our_rates[setting]) / 1e9
        print(
            f"ours, {setting}: {flops:.0f} GFLOP/s (6 x {our_params:,} non-embedding parameters x {SHAPE.positions} "
            f"positions x seq/s) = {flops / matmul:.0%} of the fp32 matmul rate ({matmul:.0f} GFLOP/s)"
        )
    mixed_vs_full = statistics.median(m / f for m, f in zip(our_rates["mixed"], our_rates["full"]))
    print(
        f"ours mixed / ours full (median of rounds): {mixed_vs_full:.2f}; theirs non-embedding parameters "
        f"{their_params:,}; training part took {time.perf_counter() - started:.0f} s"
    )
    return rows


def generate_part(args: argparse.Namespace, gflops: list[float]) -> list[tuple]:
    started = time.perf_counter()
    rows = []
    for batch_size in (int(size) for size in args.generate_batch_sizes.split(",")):
        rounds = args.generate_rounds if batch_size <= 8 else max(1, args.generate_rounds - 1)
        cold = ("theirs as shipped",) if batch_size > 8 else ()
        times = interleaved(generation_calls(batch_size), rounds, cold)
        rates = {name: [batch_size / t for t in values] for name, values in times.items()}
        shipped = statistics.median(a / b for a, b in zip(rates["ours"], rates["theirs as shipped"]))
        fixed = statistics.median(a / b for a, b in zip(rates["ours"], rates["theirs, cache fixed"]))
        medians = {name: statistics.median(values) for name, values in rates.items()}
        rows.append(
            (
                f"generate images/s, batch {batch_size}",
                medians["ours"],
                medians["theirs as shipped"],
                medians["theirs, cache fixed"],
                shipped,
                fixed,
            )
        )
        print(f"generate batch {batch_size}: " + ", ".join(f"{k} {v:.1f}" for k, v in medians.items()), flush=True)
        floor = matmul_floor(batch_size)
        steps = SHAPE.grid_size**2  # one step per code, the caption's and the dVAE's share included
        per_step = {name: 1e3 * batch_size / rate / steps for name, rate in medians.items()}
        print(
            f"  per code step, batch {batch_size}: bare matmuls ours {1e3 * floor['ours']:.2f} ms, theirs "
            f"{1e3 * floor['theirs']:.2f} ms ({floor['theirs'] / floor['ours']:.2f}x: the ratio if both were only "
            f"matmuls); whole generation / {steps}: " + ", ".join(f"{k} {v:.2f} ms" for k, v in per_step.items()),
            flush=True,
        )
        gflops.append(matmul_gflops())
    print(f"generation part took {time.perf_counter() - started:.0f} s")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=("all", "train", "generate"), default="all", help="run one half only")
    parser.add_argument("--train-batch-size", type=int, default=32)
    parser.add_argument("--train-rounds", type=int, default=6, help="interleaved training rounds (3 steps each)")
    parser.add_argument(
        "--generate-rounds", type=int, default=3, help="interleaved generation rounds (batch 64: 1 less)"
    )
    parser.add_argument("--generate-batch-sizes", default="8,64")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--cpu-time",
        action="store_true",
        help="time with the process's CPU time instead of the wall clock (1 thread only): on a machine shared with "
        "other jobs, a 1-thread process's CPU time leaves out the time it waits for a core",
    )
    args = parser.parse_args()
    if args.cpu_time and args.threads != 1:
        parser.error(f"--cpu-time counts the CPU time of all threads; use it with --threads 1, got {args.threads}")
    if args.cpu_time:
        CLOCK["clock"] = time.process_time
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    import dalle_pytorch

    clock = "CPU time" if args.cpu_time else "wall clock"
    print(
        f"torch {torch.__version__}, dalle-pytorch {dalle_pytorch.__version__}, {args.threads} threads, {clock}",
        flush=True,
    )
    gflops = [matmul_gflops()]
    rows = []
    if args.part in ("all", "train"):
        rows += train_part(args, gflops)
    if args.part in ("all", "generate"):
        rows += generate_part(args, gflops)
    print()
    print("| figure | ours | theirs (as shipped) | theirs, cache fixed | ours / as shipped | ours / cache fixed |")
    print("|---|---|---|---|---|---|")
    for figure, ours, theirs, theirs_fixed, ratio, ratio_fixed in rows:
        fixed_text = "" if theirs_fixed is None else f"{theirs_fixed:,.1f}"
        ratio_fixed_text = "" if ratio_fixed is None else f"{ratio_fixed:.1f}x"
        print(f"| {figure} | {ours:,.1f} | {theirs:,.1f} | {fixed_text} | {ratio:.2f}x | {ratio_fixed_text} |")
    print(f"fp32 matmul 1024^2: {' / '.join(f'{g:.0f}' for g in gflops)} GFLOP/s during the run")


if __name__ == "__main__":
    main()
