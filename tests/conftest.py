"""Shared fixtures: tiny seeded synthetic datasets of coloured shapes with captions, and tiny models trained on
them once per session through the CLI (read-only for the tests that share them)."""

import os
from pathlib import Path

import pytest
import torch
from helpers import make_shapes_folder

from clipdalle import cli

# Tiny models run fastest on one thread, and two threads per process thrash when processes share 2 cores.
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")


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
    out = tmp_path_factory.mktemp("clip") / "run"
    code = cli.main(["train", "clip", "--data", str(shapes_32), "--out", str(out), "--preset", "tiny", "--steps", "30"])
    assert code == 0
    return out


@pytest.fixture(scope="session")
def tiny_runs(shapes_32, tmp_path_factory) -> tuple[Path, Path]:
    """(dVAE run, DALL·E run): tiny models trained briefly on the shapes through the CLI."""
    root = tmp_path_factory.mktemp("dalle")
    vae = root / "vae"
    code = cli.main(["train", "vae", "--data", str(shapes_32), "--out", str(vae), "--preset", "tiny", "--steps", "10"])
    assert code == 0
    dalle = root / "dalle"
    args = ["train", "dalle", "--data", str(shapes_32), "--vae", str(vae), "--out", str(dalle), "--preset", "tiny"]
    assert cli.main([*args, "--steps", "12", "--eval-every", "6", "--save-every", "6"]) == 0
    return vae, dalle


@pytest.fixture(scope="module")
def built_index(tiny_clip_run, shapes_32, tmp_path_factory) -> Path:
    """The shapes indexed by the tiny CLIP (one per test module: some modules add to it)."""
    pytest.importorskip("faiss")
    out = tmp_path_factory.mktemp("index") / "index"
    assert cli.main(["index", "build", "--clip", str(tiny_clip_run), "--data", str(shapes_32), "--out", str(out)]) == 0
    return out
