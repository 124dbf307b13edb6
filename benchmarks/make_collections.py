"""Two captioned collections that are not the built-in Material Design icons, for measuring `clipdalle pipeline`
on data of one's own (benchmarks/RESULTS.md, "Your own images"):

- `fa6`: the 1,402 glyphs of Font Awesome 6 (solid), which the qtawesome package ships, each drawn in two of the
  demo's 8 colours (drawn by a seeded generator) on white at 32 px: 2,804 PNGs with a same-stem .txt of three
  phrasings ("a red icon of a house chimney", "house chimney icon in red", "red house chimney");
- `words`: 1,600 pictures at 64 px of a short English word in one colour on a background of another, drawn in the
  DroidSansMono font that the `captcha` package ships (pip install captcha==0.7.1): "the word cat in red on yellow",
  "cat written in red on a yellow background", "red text cat on yellow". Word, ink and background are drawn by a
  seeded generator, so held-out captions are mostly new combinations of seen words and colours.

    PYTHONPATH=src python benchmarks/make_collections.py fa6 --out /work/artifacts/anydata/fa6
    PYTHONPATH=src python benchmarks/make_collections.py words --out /work/artifacts/anydata/words
"""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from clipdalle.data.icons import PALETTE, captions_for, colourise, glyph_masks

FA6_FONT = "fontawesome6-solid-webfont-6.7.2.ttf"
FA6_CHARMAP = "fontawesome6-solid-webfont-charmap-6.7.2.json"
WORDS = (
    "cat dog sun moon star tree fish bird frog bear lion wolf fox owl bee ant cow pig hen egg cup pot pan box bag "
    "hat cap key map pen ink car bus van jet boat ship road rain snow wind fire ice sea sky hill rock sand gold coin "
    "ring bell book page note song drum horn milk tea pie cake corn rice bean leaf rose lily oak pine nest web net "
    "kite ball game play run jump swim walk read cook bake rest calm bold soft warm cold fast slow big tiny red blue "
    "home door wall roof lamp desk sofa bed clock time day night wave bolt gear tool saw axe nail"
).split()


def qtawesome_fonts() -> Path:
    spec = importlib.util.find_spec("qtawesome")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("needs qtawesome (pip install qtawesome==1.4.2)")
    return Path(list(spec.submodule_search_locations)[0]) / "fonts"


def make_fa6(out: Path, size: int = 32, colours_per_icon: int = 2, seed: int = 0) -> int:
    fonts = qtawesome_fonts()
    charmap = json.loads((fonts / FA6_CHARMAP).read_text())
    names = sorted(charmap)
    masks = glyph_masks(fonts / FA6_FONT, [chr(int(charmap[name], 16)) for name in names], size, em_fraction=0.9)
    rng = np.random.default_rng(seed)
    palette = list(PALETTE)
    out.mkdir(parents=True, exist_ok=True)
    count = 0
    for name, mask in zip(names, masks):
        for colour_index in rng.choice(len(palette), colours_per_icon, replace=False):
            colour = palette[int(colour_index)]
            pixels = colourise(mask[None], PALETTE[colour])[0]
            stem = f"{name}__{colour}"
            Image.fromarray(pixels).save(out / f"{stem}.png")
            captions = captions_for(name, colour)
            (out / f"{stem}.txt").write_text("\n".join([captions[0], captions[1], captions[2]]) + "\n")
            count += 1
    return count


def make_words(out: Path, count: int = 1600, size: int = 64, seed: int = 0) -> int:
    spec = importlib.util.find_spec("captcha")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("needs captcha's font: pip install captcha==0.7.1")
    font_path = Path(list(spec.submodule_search_locations)[0]) / "data" / "DroidSansMono.ttf"
    rng = np.random.default_rng(seed)
    palette = list(PALETTE)
    out.mkdir(parents=True, exist_ok=True)
    seen = set()
    factor = 4
    big = size * factor
    while len(seen) < count:
        word = WORDS[int(rng.integers(len(WORDS)))]
        ink, paper = (palette[int(index)] for index in rng.choice(len(palette), 2, replace=False))
        if (word, ink, paper) in seen:
            continue
        seen.add((word, ink, paper))
        font = ImageFont.truetype(str(font_path), size=round(big * 1.6 / max(3, len(word))))
        canvas = Image.new("RGB", (big, big), PALETTE[paper])
        draw = ImageDraw.Draw(canvas)
        left, top, right, bottom = draw.textbbox((0, 0), word, font=font)
        draw.text(((big - (right - left)) / 2 - left, (big - (bottom - top)) / 2 - top), word, fill=PALETTE[ink],
                  font=font)  # fmt: skip
        stem = f"{word}__{ink}__on__{paper}"
        canvas.resize((size, size), Image.BOX).save(out / f"{stem}.png")
        captions = [
            f"the word {word} in {ink} on {paper}",
            f"{word} written in {ink} on a {paper} background",
            f"{ink} text {word} on {paper}",
        ]
        (out / f"{stem}.txt").write_text("\n".join(captions) + "\n")
    return len(seen)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("collection", choices=("fa6", "words"))
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args()
    count = make_fa6(args.out) if args.collection == "fa6" else make_words(args.out)
    print(f"wrote {count} images with captions to {args.out}")


if __name__ == "__main__":
    main()
