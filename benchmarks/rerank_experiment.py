"""Rescores the demo's evaluated samples with other CLIPs (or other scoring rules) and reports how each reranker
does on the very same samples: the named icon's shape and the prompt's colour, per sample against the kept one.

    .venv/bin/python benchmarks/rerank_experiment.py runs/demo/eval/samples.pt runs/demo/clip runs/clip-wide
    .venv/bin/python benchmarks/rerank_experiment.py runs/demo/eval/samples.pt runs/demo/clip --ensemble

`samples.pt` is written by the demo's evaluation (clipdalle.demo.evaluation.save_samples): every sample of every
prompt with the judges' verdicts, so only the choice of the kept sample changes between rows. Intervals are 95 %
bootstrap intervals over the prompts (clipdalle.demo.evaluation.set_intervals). Not a test.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from clipdalle.data import icons
from clipdalle.demo.evaluation import set_intervals
from clipdalle.pretrained import load
from clipdalle.zero_shot import encode_images, encode_texts


def prompt_features(model, tokenizer, names: list[str], colours: list[str], ensemble: bool) -> torch.Tensor:
    """(P, D): the first caption's features, or the renormalised mean over all five phrasings with `ensemble`."""
    phrasings = [icons.captions_for(name, colour) for name, colour in zip(names, colours)]
    if not ensemble:
        return encode_texts(model, tokenizer, [captions[0] for captions in phrasings])
    count = len(phrasings[0])
    flat = encode_texts(model, tokenizer, [caption for captions in phrasings for caption in captions])
    return torch.nn.functional.normalize(flat.view(len(names), count, -1).mean(1), dim=-1)


def rescore(samples: dict, clip: str, ensemble: bool) -> dict[str, dict]:
    model, _, tokenizer = load(clip)
    rows = {}
    for split, values in samples.items():
        images = values["images"].float().div(255)  # (P, n, 3, H, W)
        P, n = images.shape[:2]
        with torch.no_grad():
            features = encode_images(model, images.flatten(0, 1)).view(P, n, -1)  # (P, n, D)
            text = prompt_features(model, tokenizer, values["names"], values["colours"], ensemble)  # (P, D)
        scores = (features * text[:, None]).sum(-1)  # (P, n)
        kept = scores.argmax(1)  # (P,)
        hits, ranks = values["hits"], values["ranks"]
        index = torch.arange(P)
        ones = torch.ones(P, dtype=torch.bool)
        intervals = set_intervals(hits, ranks, kept, ones, hits, seed=0)
        rows[split] = {
            "colour": (float(hits.double().mean()), float(hits[index, kept].double().mean())),
            "rank1": (float((ranks <= 1).double().mean()), float((ranks[index, kept] <= 1).double().mean())),
            "top10": (float((ranks <= 10).double().mean()), float((ranks[index, kept] <= 10).double().mean())),
            "oracle_rank1": float((ranks.min(1).values <= 1).double().mean()),
            "rank1_gain": intervals["shape_within_1_gain"],
            "colour_gain": intervals["colour_gain"],
        }
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("samples", type=Path, help="OUT/eval/samples.pt of a demo evaluation")
    parser.add_argument("clips", nargs="+", help="CLIP runs (or anything clipdalle.pretrained.load reads)")
    parser.add_argument("--ensemble", action="store_true", help="score with the mean of the five caption phrasings")
    args = parser.parse_args()
    samples = torch.load(args.samples, weights_only=True)
    print(
        f"{args.samples}: "
        + ", ".join(f"{split} {len(v['names'])} prompts x {v['hits'].shape[1]}" for split, v in samples.items())
    )
    columns = ["CLIP", "set", "colour per sample / kept", "gain 95 % CI", "rank 1 per sample / kept", "gain 95 % CI"]
    columns += ["top 10 per sample / kept", "oracle rank 1"]
    print("| " + " | ".join(columns) + " |")
    print("|---|---|---|---|---|---|---|---|")
    for clip in args.clips:
        for split, row in rescore(samples, clip, args.ensemble).items():
            pct = lambda pair: f"{100 * pair[0]:.1f} / {100 * pair[1]:.1f} %"  # noqa: E731
            gap = lambda pair: f"{100 * pair[0]:+.1f} .. {100 * pair[1]:+.1f}"  # noqa: E731
            print(
                f"| {clip}{' (ensemble)' if args.ensemble else ''} | {split} | {pct(row['colour'])} | "
                f"{gap(row['colour_gain'])} | {pct(row['rank1'])} | {gap(row['rank1_gain'])} | {pct(row['top10'])} | "
                f"{100 * row['oracle_rank1']:.1f} % |"
            )


if __name__ == "__main__":
    main()
