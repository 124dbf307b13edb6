"""Shared fixtures: tiny seeded synthetic datasets of coloured shapes with captions, and tiny models trained on
them once per session through the CLI (read-only for the tests that share them)."""

import os
from pathlib import Path

import pytest
import torch
from fake_servers import FileServer, build_served_models
from helpers import make_shapes_folder

from clipdalle import cli

# Tiny models run fastest on one thread, and two threads per process thrash when processes share 2 cores.
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")
# `--backend auto` means torch in the tests, so no test exports ONNX graphs unless it asks for them.
os.environ.setdefault("CLIPDALLE_BACKEND", "torch")


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


@pytest.fixture(scope="session")
def served_root(tmp_path_factory) -> Path:
    """Tiny models in every layout a model name resolves to (read-only): OpenAI .pt files under their SHA-256,
    an open_clip hf-hub repo, a transformers SiglipModel repo, OpenAI's BPE."""
    pytest.importorskip("huggingface_hub", reason="huggingface_hub is not installed")
    pytest.importorskip("transformers", reason="transformers is not installed")
    pytest.importorskip("sentencepiece", reason="sentencepiece is not installed")
    root = tmp_path_factory.mktemp("served")
    build_served_models(root)
    return root


@pytest.fixture
def model_server(served_root, tmp_path, monkeypatch):
    """A local server of `served_root` that OpenAI's URLs and the Hub point to, with empty caches; the OpenAI
    names ViT-B/32 and RN50 stand for its two files (the second served under a SHA-256 it does not have)."""
    from clipdalle import hub

    server = FileServer(served_root)
    good, other = (next((served_root / "openai").glob(f"*/{name}.pt")) for name in ("good", "other"))
    monkeypatch.setitem(hub.OPENAI_MODELS, "ViT-B/32", f"{good.parent.name}/good.pt")
    monkeypatch.setitem(hub.OPENAI_MODELS, "RN50", f"{'0' * 64}/other.pt")  # its bytes do not match this path
    (served_root / "openai" / ("0" * 64)).mkdir(exist_ok=True)
    (served_root / "openai" / ("0" * 64) / "other.pt").write_bytes(other.read_bytes())
    monkeypatch.setenv("CLIPDALLE_OPENAI_URL", f"{server.url}/clip/models")
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setenv("CLIPDALLE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    for name in ("HF_HUB_OFFLINE", "CLIPDALLE_OFFLINE", "HF_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    yield server
    server.close()
