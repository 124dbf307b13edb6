"""Re-evaluates a finished demo at other evaluation seeds: the same trained models, other prompts and samples, the
same quality bar. Each seed's evaluation goes to OUT/seeds/seed-N/ (the run's dalle/, clip/ and vae/ linked in),
so the demo's own eval.json and report stay as they are. Not a test.

    .venv/bin/python benchmarks/demo_seeds.py runs/demo --seeds 1 2
    .venv/bin/python benchmarks/demo_seeds.py runs/demo --seeds 0 1 2 --sampling '{"temperature": 1.0}' --tag t1

`--sampling` replaces the preset's sampling settings (a JSON object of generate() keywords); `--tag` puts that
evaluation in OUT/seeds/TAG-seed-N/ so it sits beside the preset's own.

Prints each seed's quality bar (target, measured, met) and a line per seed with how many targets it meets.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from clipdalle.config import load_preset
from clipdalle.demo.evaluation import evaluate_demo
from clipdalle.io import read_json, write_json

MODELS = ("dalle", "clip", "vae")


def seed_folder(out: Path, seed: int, tag: str = "") -> Path:
    """OUT/seeds/seed-N (or TAG-seed-N) with links to the run's models (made once)."""
    folder = out / "seeds" / (f"{tag}-seed-{seed}" if tag else f"seed-{seed}")
    folder.mkdir(parents=True, exist_ok=True)
    for name in MODELS:
        link = folder / name
        if not link.exists():
            link.symlink_to((out / name).resolve(), target_is_directory=True)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="a finished demo pipeline folder (with summary.json)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--sampling", type=json.loads, help="generate() keywords as JSON (default: the preset's)")
    parser.add_argument("--val-prompts", type=int, help="validation prompts (default: the preset's)")
    parser.add_argument("--tag", default="", help="evaluate into OUT/seeds/TAG-seed-N")
    args = parser.parse_args()
    if (args.sampling is not None or args.val_prompts is not None) and not args.tag:
        parser.error("--sampling and --val-prompts need --tag, so the preset's own seed folders are not overwritten")
    summary = read_json(args.out / "summary.json")
    data = Path(summary["data"])
    preset = load_preset(summary["preset"])
    evaluation = {"prompts": 128, "samples": 16, **preset.get("eval", {})}
    if args.sampling is not None:
        evaluation["sampling"] = args.sampling
    if args.val_prompts is not None:
        evaluation["val_prompts"] = args.val_prompts
    subset = read_json(args.out / "dalle" / "subset.json")
    split = read_json(data / "split.json")
    counts = []
    for seed in args.seeds:
        folder = seed_folder(args.out, seed, args.tag)
        metrics = evaluate_demo(
            folder,
            data,
            seen_names=subset.get("names") or split["train"],
            val_names=split["val"],
            prompts=evaluation["prompts"],
            samples=evaluation["samples"],
            seed=seed,
            preset=Path(summary["preset"]).stem,  # a name or a preset file: the quality bar's shape target
            sampling=evaluation.get("sampling"),
            val_prompts=evaluation.get("val_prompts"),
        )
        write_json(folder / "eval.json", metrics)
        rows = [row for row in metrics["quality_bar"] if row["pass"] is not None]
        print(f"\n## seed {seed} ({folder / 'eval.json'})")
        for row in metrics["quality_bar"]:
            verdict = {True: "met", False: "NOT MET", None: "reported"}[row["pass"]]
            print(f"- {row['name']}: {row['measured']} [{verdict}]")
        counts.append((seed, sum(row["pass"] for row in rows), len(rows)))
    print()
    print(json.dumps({f"seed {seed}": f"{met} of {total} targets met" for seed, met, total in counts}))


if __name__ == "__main__":
    main()
