"""Shared fixtures: tiny seeded synthetic datasets of coloured shapes with captions."""

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

# Tiny models run fastest on one thread, and two threads per process thrash when processes share 2 cores.
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")

COLOURS = {"red": (229, 57, 53), "green": (67, 160, 71), "blue": (30, 136, 229), "black": (33, 33, 33)}
SHAPES = ("circle", "square", "triangle", "cross")


def draw_shape(shape: str, colour: str, size: int = 32, jitter: int = 0) -> Image.Image:
    image = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(image)
    margin = size // 5 + jitter
    box = (margin, margin, size - 1 - margin, size - 1 - margin)
    rgb = COLOURS[colour]
    if shape == "circle":
        draw.ellipse(box, fill=rgb)
    elif shape == "square":
        draw.rectangle(box, fill=rgb)
    elif shape == "triangle":
        draw.polygon(
            [(size // 2, margin), (margin, size - 1 - margin), (size - 1 - margin, size - 1 - margin)], fill=rgb
        )
    else:
        width = max(2, size // 8)
        draw.rectangle((size // 2 - width, margin, size // 2 + width, size - 1 - margin), fill=rgb)
        draw.rectangle((margin, size // 2 - width, size - 1 - margin, size // 2 + width), fill=rgb)
    return image


def make_shapes_folder(root: Path, size: int = 32, repeats: int = 1, seed: int = 0) -> Path:
    """A folder dataset: PNG + same-stem .txt captions, every (shape, colour) pair `repeats` times."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for repeat in range(repeats):
        for shape in SHAPES:
            for colour in COLOURS:
                stem = f"{shape}_{colour}_{repeat}"
                draw_shape(shape, colour, size, jitter=int(rng.integers(0, 3))).save(root / f"{stem}.png")
                (root / f"{stem}.txt").write_text(f"a {colour} {shape}\n{colour} {shape}\n")
    return root


@pytest.fixture
def shapes_folder(tmp_path: Path) -> Path:
    return make_shapes_folder(tmp_path / "shapes", size=16, repeats=2)


@pytest.fixture(scope="session")
def shapes_32(tmp_path_factory) -> Path:
    """32 px coloured shapes, 4 of each (shape, colour) pair: 64 images, read-only for the tests that share it."""
    return make_shapes_folder(tmp_path_factory.mktemp("shapes32") / "shapes", size=32, repeats=4)


@pytest.fixture(scope="session")
def tiny_clip_run(shapes_32, tmp_path_factory) -> Path:
    """A tiny CLIP trained briefly on the shapes through the CLI (read-only for the tests that share it)."""
    from clipdalle import cli

    out = tmp_path_factory.mktemp("clip") / "run"
    code = cli.main(["train", "clip", "--data", str(shapes_32), "--out", str(out), "--preset", "tiny", "--steps", "30"])
    assert code == 0
    return out
