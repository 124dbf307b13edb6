"""The kept samples that the demo's colour judge calls the wrong colour, one by one: how many of the prompt's samples
the judge calls right, the median foreground pixel the judge reads, and the colour of the darkest quarter of the
ink (`icons.core_ink_colour`: the pixels most covered by the stroke, where anti-aliasing mixes in the least white).
Also where the kept sample's stroke darkness falls among its prompt's samples.

    .venv/bin/python benchmarks/colour_misses.py runs/demo/eval/samples.pt runs/demo/seeds/seed-1/eval/samples.pt

`samples.pt` is written by the demo's evaluation (clipdalle.demo.evaluation.save_samples); the kept sample is the
one the demo's CLIP chose (its stored scores). The judge stays what the quality bar defines
(`clipdalle.data.icons.dominant_colour`); the second reading is a diagnosis, not a judge. Not a test.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from clipdalle.data import icons


def darkness(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [0, 1] -> (B, H*W): summed distance from white, 0..765 (as `icons.foreground_mask`)."""
    return ((1.0 - images) * 255.0).sum(1).flatten(1)


def stroke_darkness_percentile(images: torch.Tensor, kept: torch.Tensor) -> tuple[float, float]:
    """(kept, any sample): the mean over prompts of the share of a prompt's samples whose median foreground
    darkness is below the kept sample's, and the same for a sample drawn at random (below 0.5 by the ties between
    identical samples); images (P, n, 3, H, W). A kept figure under the random one: the kept strokes are paler."""
    P, n = images.shape[:2]
    flat = images.flatten(0, 1)
    foreground = icons.foreground_mask(flat).flatten(1)  # (P*n, H*W)
    median = torch.where(foreground, darkness(flat), torch.nan).nanmedian(1).values.view(P, n)  # (P, n)
    own = median[torch.arange(P), kept][:, None]  # (P, 1)
    random = (median[:, None, :] < median[:, :, None]).double().mean()  # every sample against its siblings
    return float((median < own).double().mean()), float(random)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("samples", type=Path, nargs="+", help="OUT/eval/samples.pt of demo evaluations")
    args = parser.parse_args()
    palette = list(icons.PALETTE)
    total = agree = 0
    for path in args.samples:
        for split, values in torch.load(path, weights_only=True).items():
            images = values["images"].float().div(255)  # (P, n, 3, H, W)
            hits = values["hits"]  # (P, n)
            kept = values["kept"] if "kept" in values else values["scores"].argmax(1)  # (P,) older files: CLIP's best
            P, n = hits.shape
            kept_share, random_share = stroke_darkness_percentile(images, kept)
            print(
                f"{path} {split}: the kept sample's stroke darkness is above {100 * kept_share:.0f} % of its prompt's "
                f"{n} samples; a random sample's, above {100 * random_share:.0f} %"
            )
            for prompt in range(P):
                if hits[prompt, kept[prompt]]:
                    continue
                image = images[prompt, kept[prompt]]
                judged = int(icons.dominant_colour(image[None])[0])
                foreground = icons.foreground_mask(image[None])[0]
                median = (image[:, foreground] * 255).median(1).values.round().int().tolist()
                ink = int(icons.core_ink_colour(image[None])[0])
                asked = values["colours"][prompt]
                total += 1
                agree += palette[ink] == asked
                print(
                    f"  {values['names'][prompt]} ({asked}): {int(hits[prompt].sum())} of {n} samples judged right; "
                    f"kept judged {palette[judged]} (median pixel {tuple(median)}), darkest quarter of its ink "
                    f"{palette[ink]}"
                )
    print(f"{agree} of {total} kept samples judged the wrong colour have the asked colour in their darkest ink")


if __name__ == "__main__":
    main()
