"""A shard of the icons in a dataset's train split with their ink lightened towards white and their captions
saying so ("a light orange icon of a heart"): the negative experiment of RESULTS.md, "The demo" (meant to teach the
demo's CLIP that a paler stroke is less "orange"; it did not move the colour-reranking rows).

    .venv/bin/python benchmarks/lightened_shard.py data/icons-32px-8c-HASH /tmp/light --lighten 0.25 0.5
    .venv/bin/clipdalle train clip --out /tmp/clip-light --preset runs/demo/logs/clip-preset.json \\
        --data data/icons-32px-8c --extra-data data/icons-32px-8c-HASH:16 \\
        --extra-data data/icons-32px-8c-HASH2-colour:1 --extra-data /tmp/light:1

Each image is blended with white by an amount drawn uniformly from the --lighten range (seed 0). Not a test.
"""

from __future__ import annotations

import argparse
import io
import json
import random
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

from clipdalle.data.icons import captions_for
from clipdalle.data.shards import ShardWriter


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", type=Path, help="an icon dataset (clipdalle data icons, or the demo's DALL·E subset)")
    parser.add_argument("out", type=Path, help="where to write train/ (and an empty val/)")
    parser.add_argument("--lighten", type=float, nargs=2, default=(0.25, 0.5), metavar=("LOW", "HIGH"))
    args = parser.parse_args()
    low, high = args.lighten
    if not 0.0 <= low <= high < 1.0:
        raise SystemExit(f"error: --lighten {low} {high}: expected 0 <= LOW <= HIGH < 1")
    draw = random.Random(0)
    (args.out / "val").mkdir(parents=True, exist_ok=True)
    count = 0
    with ShardWriter(args.out / "train", prefix="icons", max_count=5000) as writer:
        for shard in sorted((args.data / "train").glob("*.tar")):
            samples: dict[str, dict[str, bytes]] = {}
            with tarfile.open(shard) as tar:
                for member in tar.getmembers():
                    key, extension = member.name.split(".", 1)
                    samples.setdefault(key, {})[extension] = tar.extractfile(member).read()
            for key, members in samples.items():
                record = json.loads(members["json"])
                pixels = np.asarray(Image.open(io.BytesIO(members["png"])).convert("RGB")).astype(np.float32)
                amount = draw.uniform(low, high)
                light = (pixels + amount * (255.0 - pixels)).round().clip(0, 255).astype(np.uint8)
                buffer = io.BytesIO()
                Image.fromarray(light).save(buffer, format="PNG")
                captions = captions_for(record["icon"], f"light {record['colour']}")
                writer.write(key, {"png": buffer.getvalue(), "txt": "\n".join(captions), "json": members["json"]})
                count += 1
    print(f"wrote {count} lightened icons to {args.out / 'train'}")


if __name__ == "__main__":
    main()
