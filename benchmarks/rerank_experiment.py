"""Rescores the demo's evaluated samples with other CLIPs (or other scoring rules) and reports how each reranker
does on the very same samples: the named icon's shape and the prompt's colour, per sample against the kept one.

    .venv/bin/python benchmarks/rerank_experiment.py runs/demo/eval/samples.pt runs/demo/clip runs/clip-wide
    .venv/bin/python benchmarks/rerank_experiment.py runs/demo/eval/samples.pt runs/demo/clip --ensemble
    .venv/bin/python benchmarks/rerank_experiment.py runs/demo/seeds/seed-1/eval/samples.pt runs/demo/clip --seed 1
    .venv/bin/python benchmarks/rerank_experiment.py runs/demo/eval/samples.pt runs/demo/clip --colour-weight 2
    .venv/bin/python benchmarks/rerank_experiment.py runs/demo/eval/samples.pt runs/demo/clip --shortlist 1 2 3
    .venv/bin/python benchmarks/rerank_experiment.py runs/demo/eval/samples.pt runs/demo/clip --consensus-weight 1

Besides the colour and rank-1 figures, each row gives the verdicts of the quality bar's three "reranking helps" targets
(colour, shape, CLIP R-precision; `clipdalle.demo.evaluation.quality_bar`) with the candidate CLIP choosing the kept
sample and judging R-precision, as the demo's evaluation would with it. `--seed` is the evaluation seed the samples
were drawn with (it seeds the bootstrap and R-precision's draws, as in the demo).

`samples.pt` is written by the demo's evaluation (clipdalle.demo.evaluation.save_samples): every sample of every
prompt with the judges' verdicts, so only the choice of the kept sample changes between rows. Intervals are 95 %
bootstrap intervals over the prompts (clipdalle.demo.evaluation.set_intervals). Not a test.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import torch

from clipdalle.data import icons
from clipdalle.demo.evaluation import (
    R_PRECISION_R,
    r_precision_hits,
    rank_summary,
    reranking_helps,
    set_intervals,
)
from clipdalle.pretrained import load
from clipdalle.sampling import consensus, shortlisted_per_group
from clipdalle.zero_shot import encode_images, encode_texts


def prompt_features(model, tokenizer, names: list[str], colours: list[str], ensemble: bool) -> torch.Tensor:
    """(P, D): the first caption's features, or the renormalised mean over all five phrasings with `ensemble`."""
    phrasings = [icons.captions_for(name, colour) for name, colour in zip(names, colours)]
    if not ensemble:
        return encode_texts(model, tokenizer, [captions[0] for captions in phrasings])
    count = len(phrasings[0])
    flat = encode_texts(model, tokenizer, [caption for captions in phrasings for caption in captions])
    return torch.nn.functional.normalize(flat.view(len(names), count, -1).mean(1), dim=-1)


@dataclass(frozen=True)
class Rule:
    """How the kept sample is chosen: the prompt's features (`ensemble`: the mean of the five phrasings), extra
    score terms (W x the bare colour prompt's similarity, W x `sampling.consensus`) and the shortlist."""

    ensemble: bool = False
    colour_weight: float = 0.0
    consensus_weight: float = 0.0
    shortlist: int = 1


def rescore(samples: dict, clip: str, rule: Rule, seed: int = 0) -> dict[str, dict]:
    model, _, tokenizer = load(clip)
    ensemble, colour_weight, consensus_weight = rule.ensemble, rule.colour_weight, rule.consensus_weight
    rows = {}
    for split, values in samples.items():
        images = values["images"].float().div(255)  # (P, n, 3, H, W)
        P, n = images.shape[:2]
        with torch.no_grad():
            features = encode_images(model, images.flatten(0, 1)).view(P, n, -1)  # (P, n, D)
            text = prompt_features(model, tokenizer, values["names"], values["colours"], ensemble)  # (P, D)
            plain = (  # R-precision's prompts: the first caption, as in the demo
                prompt_features(model, tokenizer, values["names"], values["colours"], False) if ensemble else text
            )
            bare = None
            if colour_weight:
                colours = values["colours"]
                bare = encode_texts(model, tokenizer, [icons.colour_captions(colour)[0] for colour in colours])
        scores = (features * text[:, None]).sum(-1)  # (P, n)
        if bare is not None:
            scores = scores + colour_weight * (features * bare[:, None]).sum(-1)
        if consensus_weight:
            scores = scores + consensus_weight * consensus(features.flatten(0, 1), n).view(P, n)
        flat = shortlisted_per_group(scores.flatten(), features.flatten(0, 1), n, 1, rule.shortlist)  # (P,)
        kept = flat - torch.arange(P) * n  # (P,) the kept sample as generate(shortlist=...) keeps it
        hits, ranks = values["hits"], values["ranks"]
        index = torch.arange(P)
        similarity = features.flatten(0, 1) @ plain.T  # (P*n, P)
        truth = index.repeat_interleave(n)
        kept_rows = index * n + kept
        kept_hits = r_precision_hits(similarity[kept_rows], truth[kept_rows], R_PRECISION_R, seed)  # (P,)
        random_hits = r_precision_hits(similarity, truth, R_PRECISION_R, seed).view(P, n)  # (P, n)
        intervals = set_intervals(hits, ranks, kept, kept_hits, random_hits, seed)
        best, per_sample = rank_summary(ranks[index, kept]), rank_summary(ranks)
        colour_kept = float(hits[index, kept].double().mean())
        rows[split] = {
            "colour": (float(hits.double().mean()), float(hits[index, kept].double().mean())),
            "rank1": (float((ranks <= 1).double().mean()), float((ranks[index, kept] <= 1).double().mean())),
            "top10": (float((ranks <= 10).double().mean()), float((ranks[index, kept] <= 10).double().mean())),
            "oracle_rank1": float((ranks.min(1).values <= 1).double().mean()),
            "rank1_gain": intervals["shape_within_1_gain"],
            "colour_gain": intervals["colour_gain"],
            "median": (per_sample["median"], best["median"]),
            "helps": reranking_helps(intervals, colour_kept, best, per_sample),
        }
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("samples", type=Path, help="OUT/eval/samples.pt of a demo evaluation")
    parser.add_argument("clips", nargs="+", help="CLIP runs (or anything clipdalle.pretrained.load reads)")
    parser.add_argument("--ensemble", action="store_true", help="score with the mean of the five caption phrasings")
    parser.add_argument("--seed", type=int, default=0, help="the evaluation seed the samples were drawn with")
    parser.add_argument(
        "--colour-weight",
        type=float,
        default=0.0,
        metavar="W",
        help="add W x the similarity to the bare colour prompt ('an orange icon') to each sample's score",
    )
    parser.add_argument(
        "--shortlist",
        type=int,
        nargs="+",
        default=[1],
        metavar="K",
        help="keep the most typical of CLIP's K best (clipdalle.sampling.shortlisted_per_group); a row per K",
    )
    parser.add_argument(
        "--consensus-weight",
        type=float,
        default=0.0,
        metavar="W",
        help="add W x each sample's mean CLIP-image similarity to its prompt's other samples to its score",
    )
    args = parser.parse_args()
    samples = torch.load(args.samples, weights_only=True)
    print(
        f"{args.samples}: "
        + ", ".join(f"{split} {len(v['names'])} prompts x {v['hits'].shape[1]}" for split, v in samples.items())
    )
    columns = ["CLIP", "set", "colour per sample / kept", "gain 95 % CI", "rank 1 per sample / kept", "gain 95 % CI"]
    columns += ["top 10 per sample / kept", "oracle rank 1", "median rank per sample / kept", "reranking helps"]
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    weight = f" (+ {args.colour_weight:g} x colour)" if args.colour_weight else ""
    weight += f" (+ {args.consensus_weight:g} x consensus)" if args.consensus_weight else ""
    for clip in args.clips:
        for shortlist in args.shortlist:
            rule = Rule(args.ensemble, args.colour_weight, args.consensus_weight, shortlist)
            rows = rescore(samples, clip, rule, args.seed)
            label = clip + (" (ensemble)" if args.ensemble else "") + weight
            label += f", shortlist {shortlist}" if shortlist > 1 else ""
            for split, row in rows.items():
                pct = lambda pair: f"{100 * pair[0]:.1f} / {100 * pair[1]:.1f} %"  # noqa: E731
                gap = lambda pair: f"{100 * pair[0]:+.1f} .. {100 * pair[1]:+.1f}"  # noqa: E731
                print(
                    f"| {label} | {split} | {pct(row['colour'])} | {gap(row['colour_gain'])} | {pct(row['rank1'])} | "
                    f"{gap(row['rank1_gain'])} | {pct(row['top10'])} | {100 * row['oracle_rank1']:.1f} % | "
                    f"{row['median'][0]:g} / {row['median'][1]:g} | "
                    + ", ".join(f"{target} {'yes' if met else 'NO'}" for target, met in row["helps"].items())
                    + " |"
                )


if __name__ == "__main__":
    main()
