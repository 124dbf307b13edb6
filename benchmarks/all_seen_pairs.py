"""The demo's seen set at its largest: every (icon, colour) pair of the DALL·E's training icons (215 x 8 = 1,720
prompts instead of the evaluation's 512), 16 samples each at the demo's sampling settings, judged as the demo's
evaluation judges them (clipdalle.demo.evaluation.set_figures). Prints the colour and rank-1 gains with their 95 %
intervals for each `--shortlist` K (1: CLIP's best). Not a test; about 4 minutes per seed on 2 cores.

    .venv/bin/python benchmarks/all_seen_pairs.py runs/demo --data data/icons-32px-8c --seed 0 --shortlist 1 2
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from clipdalle import checkpoint, pretrained
from clipdalle.demo.evaluation import IconJudge, caption_of, sample_prompts, set_figures, shape_reranking_helps
from clipdalle.sampling import shortlisted_per_group


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="a finished demo pipeline folder (OUT with dalle/ and clip/)")
    parser.add_argument("--data", type=Path, required=True, help="the icon dataset the demo used")
    parser.add_argument("--seed", type=int, default=0, help="evaluation seed (the seen set's samples as the demo's)")
    parser.add_argument("--shortlist", type=int, nargs="+", default=[1], metavar="K")
    args = parser.parse_args()
    info = json.loads((args.data / "info.json").read_text())
    colours = list(info["colours"])
    sampling = json.loads((args.out / "eval.json").read_text())["settings"]["sampling"]
    model, vae, tokenizer = checkpoint.load_dalle(args.out / "dalle")
    clip_bundle = pretrained.load(args.out / "clip")
    clip_model, _, clip_tokenizer = clip_bundle
    names = sorted(json.loads((args.out / "dalle" / "subset.json").read_text())["names"])
    pairs = [(name, colour) for name in names for colour in colours]
    judge = IconJudge(info["size"], colours)
    captions = [caption_of(name, colour) for name, colour in pairs]
    samples = 16
    generated = sample_prompts(
        model, vae, tokenizer, clip_bundle, captions, samples, args.seed * 10_000_000, sampling
    )  # the seen set's seeds, as evaluate_demo draws them
    features = generated["features"].flatten(0, 1)  # (P*n, D)
    P = len(pairs)
    for shortlist in args.shortlist:
        flat = shortlisted_per_group(generated["scores"].flatten(), features, samples, 1, shortlist)  # (P,)
        kept = {**generated, "kept": flat - torch.arange(P) * samples}
        figures, _ = set_figures(pairs, kept, judge, vae, clip_model, clip_tokenizer, args.seed)
        intervals, colour, shape = figures["intervals"], figures["colour_fidelity"], figures["shape_rank"]
        gain, rank_gain = intervals["colour_gain"], intervals["shape_within_1_gain"]
        helps = shape_reranking_helps(shape["best_of_n"], shape["per_sample"], intervals)
        print(
            f"seed {args.seed}, shortlist {shortlist}: {P} prompts; colour per sample / kept "
            f"{100 * colour['per_sample']:.2f} / {100 * colour['best_of_n']:.2f} %, "
            f"gain 95 % CI {100 * gain[0]:+.2f}..{100 * gain[1]:+.2f}; "
            f"rank 1 {100 * shape['per_sample']['within_1']:.1f} / {100 * shape['best_of_n']['within_1']:.1f} %, "
            f"gain {100 * rank_gain[0]:+.1f}..{100 * rank_gain[1]:+.1f}; reranking helps shape: {helps}"
        )


if __name__ == "__main__":
    main()
