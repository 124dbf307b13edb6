"""The prompts a person types first, against a finished demo: 20 everyday icon names chosen before looking at what
DALL·E trained on, in 3 colours each, 16 samples per prompt drawn and kept as the demo's evaluation does (its
sampling settings from OUT/eval.json), judged by the demo's shape and colour judges (clipdalle.demo.evaluation).
Not a test.

    .venv/bin/python benchmarks/everyday_prompts.py runs/demo --data data/icons-32px-8c [--seed 0]

Prints a row per prompt (the kept sample's shape rank among all 7,367 icons and whether its colour is right, and
whether the name is in the DALL·E's training set) and the median rank and colour share over all 60 prompts.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from clipdalle import checkpoint, pretrained
from clipdalle.data import icons
from clipdalle.demo.evaluation import IconJudge, caption_of, colour_hits, sample_prompts

# Chosen as the names a person types first, before looking at any training list: some may be held-out validation
# families (never trained on by design) or missing from the subset; those are reported as such, not dropped.
EVERYDAY = [
    "heart", "home", "star", "car", "cat", "dog", "phone", "camera", "bell", "lock",
    "key", "cloud", "tree", "book", "music", "clock", "airplane", "umbrella", "gift", "fish",
]  # fmt: skip
COLOURS = ["red", "blue", "green"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="a finished demo pipeline folder (OUT with dalle/ and clip/)")
    parser.add_argument("--data", type=Path, required=True, help="the icon dataset the demo used")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--samples", type=int, default=16)
    args = parser.parse_args()
    evaluated = args.out / "eval.json"
    if not evaluated.is_file():
        raise SystemExit(f"{evaluated} not found; expected a demo folder whose evaluation has run")
    sampling = json.loads(evaluated.read_text())["settings"]["sampling"]  # the settings the demo evaluated with

    info = json.loads((args.data / "info.json").read_text())
    model, vae, tokenizer = checkpoint.load_dalle(args.out / "dalle")
    clip_bundle = pretrained.load(args.out / "clip")
    seen = set(json.loads((args.out / "dalle" / "subset.json").read_text()).get("names", []))
    judge = IconJudge(info["size"], list(info["colours"]))
    pairs = [(name, colour) for name in EVERYDAY for colour in COLOURS]
    prompts = [caption_of(name, colour) for name, colour in pairs]
    generated = sample_prompts(model, vae, tokenizer, clip_bundle, prompts, args.samples, args.seed, sampling)
    kept = generated["kept"]  # (P,) the sample the demo keeps
    images = generated["images"][torch.arange(len(pairs)), kept]  # (P, 3, H, W)
    colour_indices = [judge.colours.index(colour) for _, colour in pairs]
    names = [name for name, _ in pairs]
    ranks = judge.shape_ranks(images, names, colour_indices)
    hits = colour_hits(images, colour_indices)
    print("| prompt | trained on | kept sample's shape rank | colour right |")
    print("|---|---|---|---|")
    for name, prompt, rank, hit in zip(names, prompts, ranks.tolist(), hits.tolist()):
        split = "yes" if name in seen else ("no (validation family)" if icons.split_of(name) == "val" else "no")
        print(f"| {prompt} | {split} | {rank} | {'yes' if hit else 'no'} |")
    median, within_10 = float(ranks.double().median()), 100 * float((ranks <= 10).double().mean())
    print(
        f"\n{len(pairs)} prompts ({len(EVERYDAY)} names x {len(COLOURS)} colours), seed {args.seed}: median rank "
        f"{median:g} of {len(judge.names)}, within 10: {within_10:.1f} %, "
        f"colour right {100 * float(hits.double().mean()):.1f} %"
    )


if __name__ == "__main__":
    main()
