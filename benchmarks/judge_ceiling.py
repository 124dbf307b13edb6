"""The colour judge's own ceiling on a finished demo: for every (icon, colour) pair of DALL·E's training icons (the
seen set's population) and of the validation icons, how often the judge (`icons.dominant_colour`, the quality
bar's) calls the real icon the right colour, and how often it calls the run's dVAE reconstruction of it right.
Where both sit near the samples' per-sample colour, the samples' colour errors are the judge's own, not the
generator's or the decoder's. Also the mean foreground darkness of real icons and reconstructions (a washed-out
decoder would show paler ink). Not a test.

    .venv/bin/python benchmarks/judge_ceiling.py runs/demo --data data/icons-32px-8c
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from colour_misses import darkness

from clipdalle import checkpoint
from clipdalle.data import icons
from clipdalle.demo.evaluation import IconJudge, colour_hits
from clipdalle.io import read_json

BATCH = 512


def ink_darkness(images: torch.Tensor) -> float:
    """Mean over images of the mean summed distance from white (0..765) of each image's foreground pixels."""
    foreground = icons.foreground_mask(images).flatten(1)  # (B, H*W)
    per_image = (darkness(images) * foreground).sum(dim=1) / foreground.sum(dim=1).clamp(min=1)
    return float(per_image.mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="a finished demo pipeline folder (dalle/ with its dVAE)")
    parser.add_argument("--data", type=Path, required=True, help="the icon dataset the run trained on")
    args = parser.parse_args()
    torch.set_num_threads(2)
    _, vae, _ = checkpoint.load_dalle(args.run / "dalle")
    info = read_json(args.data / "info.json")
    judge = IconJudge(info["size"], list(info["colours"]))
    sets = {
        "seen (DALL·E's icons)": read_json(args.run / "dalle" / "subset.json")["names"],
        "validation": read_json(args.data / "split.json")["val"],
    }
    for label, names in sets.items():
        pairs = [(name, colour) for name in names for colour in range(len(judge.colours))]
        colour_indices = [colour for _, colour in pairs]
        real = judge.real_icons([name for name, _ in pairs], colour_indices)  # (N, 3, H, W)
        with torch.no_grad():
            rebuilt = torch.cat([vae.decode(vae.encode(real[i : i + BATCH])) for i in range(0, len(real), BATCH)])
        real_right, rebuilt_right = colour_hits(real, colour_indices), colour_hits(rebuilt, colour_indices)
        lost, gained = int((real_right & ~rebuilt_right).sum()), int((~real_right & rebuilt_right).sum())
        print(
            f"{label}: {len(pairs)} pairs; judge right on real icons {100 * float(real_right.double().mean()):.2f} %, "
            f"on dVAE reconstructions {100 * float(rebuilt_right.double().mean()):.2f} % (real right, reconstruction "
            f"wrong: {lost}; the reverse: {gained}); "
            f"mean ink darkness real {ink_darkness(real):.1f}, reconstructions {ink_darkness(rebuilt):.1f} of 765"
        )


if __name__ == "__main__":
    main()
