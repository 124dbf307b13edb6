"""Discrete VAE speed: clipdalle's DiscreteVAE against DALLE-pytorch 1.6.6's, side by side in one process.

Matched configurations (as DALLE-pytorch names them): 32 px with 2 layers and 64 px with 3 layers (both to an
8x8 grid), num_tokens 512, codebook_dim 256, hidden_dim 64, 1 residual block, batch 64, Adam, fp32, 2 threads,
random images in [0, 1]. Our "gumbel" variant does the same work as theirs (gumbel-softmax relaxation, KL term);
our "vq" variant is reported alongside. Training = forward + backward + Adam step through each library's own loss
(ours: `clipdalle.training.objectives.vae_loss`, theirs: `vae(images, return_loss=True)`); encoding = ours `encode`,
theirs `get_codebook_indices`. Ours and theirs alternate (A B A B ... after a warmup) and the table reports the median
of the per-pair ratios, because this machine's speed drifts by tens of percent within minutes.

Needs the reference venv (see /work/shared/bench/README.md); not a test, not run in CI:

    bash ../shared/bench/reference-env.sh .venv-ref && .venv-ref/bin/pip install --no-deps -e .
    .venv-ref/bin/python benchmarks/bench_vae.py
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch
from machine import matmul_gflops
from torch.utils.flop_counter import FlopCounterMode

from clipdalle.models.dvae import DiscreteVAE, DVAEConfig
from clipdalle.training.objectives import vae_loss as loss_fn

CONFIGS = [(32, 2), (64, 3)]  # (image_size, downsampling layers)
VOCAB_SIZE, CODEBOOK_DIM, HIDDEN, RESBLOCKS = 512, 256, 64, 1


def reference_vae(image_size: int, layers: int, hidden: int = HIDDEN, resblocks: int = RESBLOCKS) -> torch.nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from dalle_pytorch import DiscreteVAE as ReferenceVAE
    return ReferenceVAE(
        image_size=image_size,
        num_tokens=VOCAB_SIZE,
        codebook_dim=CODEBOOK_DIM,
        num_layers=layers,
        num_resnet_blocks=resblocks,
        hidden_dim=hidden,
    )


def our_vae(
    image_size: int, layers: int, quantizer: str, hidden: int = HIDDEN, resblocks: int = RESBLOCKS
) -> DiscreteVAE:
    config = DVAEConfig(
        image_size=image_size,
        n_downsample=layers,
        vocab_size=VOCAB_SIZE,
        n_embd=CODEBOOK_DIM,
        n_hidden=hidden,
        n_resblock=resblocks,
        quantizer=quantizer,
        recon_loss="mse",  # theirs: mean squared error, unweighted
        foreground_weight=0.0,
    )
    return DiscreteVAE(config)


def contestants(
    image_size: int,
    layers: int,
    batch_size: int,
    hidden: int = HIDDEN,
    resblocks: int = RESBLOCKS,
    device: str = "cpu",
) -> dict[str, dict]:
    """name -> {"model", "train_step", "encode"}: closures doing one unit of work on a fixed random batch (on
    `device`, fp32)."""
    images = torch.rand(batch_size, 3, image_size, image_size).to(device)
    batch = {"keys": [str(i) for i in range(batch_size)], "images": images, "captions": [""] * batch_size}
    entries = {}
    for name in ("ours gumbel", "theirs", "ours vq"):
        if name == "theirs":
            model = reference_vae(image_size, layers, hidden, resblocks)
        else:
            model = our_vae(image_size, layers, name.split()[1], hidden, resblocks)
        model.to(device).train()
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
        if name == "theirs":

            def train_step(model=model, optimizer=optimizer):
                loss = model(images, return_loss=True)
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

            def encode(model=model):
                return model.get_codebook_indices(images)

        else:

            def train_step(model=model, optimizer=optimizer):
                loss, _ = loss_fn(model, batch, 0.5)
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

            def encode(model=model):
                return model.encode(images)

        entries[name] = {"model": model, "train_step": train_step, "encode": encode}
    return entries


def forward_gflop_per_image(name: str, entry: dict, image_size: int) -> float:
    """Forward-pass GFLOP per image (convolutions and matmuls, counted by torch's FlopCounterMode)."""
    model = entry["model"]
    images = torch.rand(8, 3, image_size, image_size, device=next(model.parameters()).device)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        if name == "theirs":
            model(images, return_loss=True)
        else:
            model(images)
    return counter.get_total_flops() / len(images) / 1e9


def interleaved(entries: dict[str, dict], key: str, rounds: int, repeats: int) -> dict[str, list[float]]:
    """Seconds per call of entries[name][key], alternating contestants each round (after one warmup round)."""
    for entry in entries.values():
        for _ in range(2):
            entry[key]()
    times: dict[str, list[float]] = {name: [] for name in entries}
    for _ in range(rounds):
        for name, entry in entries.items():
            start = time.perf_counter()
            for _ in range(repeats):
                entry[key]()
            times[name].append((time.perf_counter() - start) / repeats)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=10, help="interleaved rounds; the table shows medians")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--image-sizes", default="32,64", help="which of the configurations to run: 32, 64 or both")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    import dalle_pytorch

    print(f"torch {torch.__version__}, dalle-pytorch {dalle_pytorch.__version__}, {args.threads} threads")
    gflops_before = matmul_gflops()
    rows = []
    sizes = {int(size) for size in args.image_sizes.split(",")}
    for image_size, layers in [(size, layers) for size, layers in CONFIGS if size in sizes]:
        entries = contestants(image_size, layers, args.batch_size)
        flops = {name: forward_gflop_per_image(name, entry, image_size) for name, entry in entries.items()}
        params = {name: sum(p.numel() for p in entry["model"].parameters()) for name, entry in entries.items()}
        train = interleaved(entries, "train_step", args.rounds, repeats=1)
        encode = interleaved(entries, "encode", args.rounds, repeats=5)
        label = f"{image_size} px, {layers} layers -> 8x8"
        for figure, times in (("train img/s", train), ("encode img/s", encode)):
            rates = {name: [args.batch_size / t for t in values] for name, values in times.items()}
            row = {"config": label, "figure": figure}
            for name in entries:
                row[name] = statistics.median(rates[name])
            for ours in ("ours gumbel", "ours vq"):
                ratios = [a / b for a, b in zip(rates[ours], rates["theirs"])]
                row[f"{ours} / theirs"] = statistics.median(ratios)
            rows.append(row)
        print(
            f"{label}: forward GFLOP/image ours gumbel {flops['ours gumbel']:.4f}, theirs {flops['theirs']:.4f}, "
            f"ours vq {flops['ours vq']:.4f}; parameters ours gumbel {params['ours gumbel']:,}, theirs "
            f"{params['theirs']:,}, ours vq {params['ours vq']:,}",
            flush=True,
        )
    gflops_after = matmul_gflops()

    print()
    print("| config | figure | ours gumbel | theirs | ratio (median of pairs) | ours vq | ratio |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['config']} | {row['figure']} | {row['ours gumbel']:,.0f} | {row['theirs']:,.0f} | "
            f"{row['ours gumbel / theirs']:.2f}x | {row['ours vq']:,.0f} | {row['ours vq / theirs']:.2f}x |"
        )
    print(f"\nfp32 matmul 1024^2: {gflops_before:.0f} GFLOP/s before, {gflops_after:.0f} GFLOP/s after")


if __name__ == "__main__":
    main()
