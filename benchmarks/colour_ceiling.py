"""How much room the demo's "reranking helps colour" rows leave: the colour gain's 95 % interval (kept minus per
sample, paired over prompts, as the quality bar computes it) for the kept sample the demo stored, for a colour
oracle that keeps a sample the judge calls right whenever the prompt has one, and for that oracle with a single
prompt lost (one whose samples are all right but one, the oracle's pick swapped for the wrong one). Not a test.

    .venv/bin/python benchmarks/colour_ceiling.py runs/demo/eval/samples.pt --seed 0
    .venv/bin/python benchmarks/colour_ceiling.py runs/demo/seeds/seed-1/eval/samples.pt --seed 1
    .venv/bin/python benchmarks/colour_ceiling.py runs/demo/eval/samples.pt runs/demo/seeds/seed-{1,2}/eval/samples.pt \
        --seed 0 1 2

An oracle interval whose low end is barely above 0 says no reranker can be shown to help colour on that set, however
well it reads colour: the judge already calls nearly every sample right.

Given several evaluations (one seed each, other prompts and samples), it also pools their prompts: the stored kept
sample's gain interval over the first 2, 3, ... evaluations' prompts together, which shows how many prompts a set
needs before its interval can clear 0 at the gain the single evaluations measure.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from clipdalle.demo.evaluation import bootstrap_interval


def gain_interval(kept_right: torch.Tensor, rate: torch.Tensor, seed: int) -> list[float]:
    """95 % bootstrap interval of mean(kept_right - rate) over prompts, in points."""
    gain = kept_right.double() - rate
    return [100 * value for value in bootstrap_interval(lambda rows: gain[rows].mean(1), len(gain), seed)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("samples", type=Path, nargs="+", help="OUT/eval/samples.pt of demo evaluations")
    parser.add_argument("--seed", type=int, nargs="+", default=[0], help="the evaluation seed of each samples file")
    args = parser.parse_args()
    if len(args.seed) != len(args.samples):
        parser.error(f"give one --seed per samples file: {len(args.samples)} files, {len(args.seed)} seeds")
    stored: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    for path, seed in zip(args.samples, args.seed):
        print(f"{path} (seed {seed})")
        for split, kept_and_rate in ceiling(path, seed).items():
            stored.setdefault(split, []).append(kept_and_rate)
    for split, evaluations in stored.items():
        for count in range(2, len(evaluations) + 1):
            right = torch.cat([kept for kept, _ in evaluations[:count]])  # (prompts of the first `count`,)
            rate = torch.cat([rate for _, rate in evaluations[:count]])
            low, high = gain_interval(right, rate, 0)
            print(
                f"{split}, first {count} evaluations pooled ({len(rate)} prompts): stored kept gain "
                f"{100 * float(right.double().mean() - rate.mean()):+.2f}, 95 % CI {low:+.2f}..{high:+.2f}"
            )


def ceiling(path: Path, seed: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Prints each set's intervals for one evaluation; returns each set's (stored kept right (P,), per-sample rate
    (P,))."""
    sets = {}
    for split, values in torch.load(path, weights_only=True).items():
        hits = values["hits"]  # (P, n) the judge's verdicts
        P, n = hits.shape
        rate = hits.double().mean(1)  # (P,)
        kept = values["kept"] if "kept" in values else values["scores"].argmax(1)  # (P,)
        stored = hits[torch.arange(P), kept]
        oracle = hits.any(1)  # (P,) right whenever any sample is
        one_wrong = ((rate < 1) & (rate >= 1 - 1.5 / n)).nonzero().flatten()  # prompts with exactly one wrong sample
        lost = oracle.clone()
        if len(one_wrong):
            lost[one_wrong[0]] = False
        rows = {"stored kept": stored, "oracle": oracle} | (
            {"oracle with one prompt lost": lost} if len(one_wrong) else {}
        )
        shown = []
        for label, right in rows.items():
            low, high = gain_interval(right, rate, seed)
            shown.append(f"{label} {low:+.2f}..{high:+.2f}")
        print(
            f"{split}: {P} prompts x {n}, per-sample colour {100 * float(rate.mean()):.2f} %; gain 95 % CI: "
            + ", ".join(shown)
        )
        sets[split] = (stored, rate)
    return sets


if __name__ == "__main__":
    main()
