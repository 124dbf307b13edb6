"""The shortlist (`generate(shortlist=K)`) against CLIP's best on a finished collection run (`clipdalle pipeline
--data ...`): its held-out evaluation (clipdalle.demo.heldout.evaluate_collection) at several evaluation seeds, once
per K, judged by the judge CLIP the run was evaluated with. Prints the judge's R-precision of the kept sample on
training and held-out captions. The run's own folder is only read: the evaluations write into a scratch folder
that links the run's dalle/ (a temporary folder, removed at the end). Not a test.

    .venv/bin/python benchmarks/shortlist_collections.py runs/words-25m --judge runs/judge-words --seeds 0 1 2 3 4
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import torch

from clipdalle.demo import heldout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="a finished collection pipeline folder (dalle/, clip/, data/)")
    parser.add_argument("--judge", type=Path, required=True, help="the judge CLIP the run's evaluation used")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--shortlist", type=int, nargs="+", default=[1, 2], metavar="K")
    parser.add_argument("--prompts", type=int, default=100)
    parser.add_argument("--samples", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(2)
    data = args.run / "data"
    scratch = Path(tempfile.mkdtemp(prefix="shortlist-check-"))
    (scratch / "dalle").symlink_to((args.run / "dalle").resolve(), target_is_directory=True)
    try:
        for seed in args.seeds:
            cells = []
            for shortlist in args.shortlist:
                metrics = heldout.evaluate_collection(
                    scratch,
                    train_data=data / "train.jsonl",
                    val_data=data / "val.jsonl",
                    clip=args.run / "clip",
                    judge=args.judge,
                    prompts=args.prompts,
                    samples=args.samples,
                    seed=seed,
                    sampling={"shortlist": shortlist} if shortlist > 1 else {},
                    progress=False,
                )
                train, val = metrics["generation"]["train"], metrics["generation"]["val"]
                cells.append(
                    f"shortlist {shortlist}: kept {100 * train['r_precision_kept']:.0f} % training, "
                    f"{100 * val['r_precision_kept']:.0f} % held out"
                )
            print(f"{args.run.name} seed {seed} | " + " | ".join(cells), flush=True)
    finally:
        shutil.rmtree(scratch)


if __name__ == "__main__":
    main()
