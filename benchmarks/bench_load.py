"""Loading a cached model by name against loading the same file by its path.

Two models, each with random weights in the real layout and size, served once by the tests' local server
(tests/fake_servers.py: OpenAI's URL scheme and the Hub's) so that the caches hold them as after a real download:

- "ViT-B/32": an OpenAI-style release file, a TorchScript archive of OpenAI's model.py (clip-anytorch) with fp16
  ViT-B/32 weights (~350 MB), plus OpenAI's BPE (vocab.json + merges.txt) in huggingface_hub's cache;
- "openai/clip-vit-base-patch32": a transformers CLIPModel repo of the same shapes (fp32 safetensors, ~600 MB).

Each round loads both ways, alternating (by name, then by path), with `clipdalle.pretrained.load`; the path load
is given the same tokenizer folder. By name also runs with CLIPDALLE_OFFLINE=1 (no difference expected: a cached
model is never checked against the network). The table gives medians and the median of per-round ratios.

    PYTHONPATH=src .venv/bin/python benchmarks/bench_load.py [--rounds 7]
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from fake_servers import FileServer  # noqa: E402

from clipdalle import hub  # noqa: E402
from clipdalle.pretrained import load  # noqa: E402
from clipdalle.tokenizers import ClipTokenizer  # noqa: E402


def openai_archive(path: Path) -> None:
    """OpenAI's ViT-B/32 as OpenAI ships it: a traced TorchScript module with fp16 weights."""
    spec = importlib.util.find_spec("clip")
    folder = Path(spec.submodule_search_locations[0])
    module_spec = importlib.util.spec_from_file_location("openai_clip_model", folder / "model.py")
    model_py = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(model_py)
    torch.manual_seed(0)
    model = model_py.CLIP(512, 224, 12, 768, 32, 77, 49408, 512, 8, 12).eval()
    images, text = torch.rand(1, 3, 224, 224), torch.zeros(1, 77, dtype=torch.long)
    text[0, :2] = torch.tensor([49406, 49407])
    traced = torch.jit.trace(model, (images, text), check_trace=False)
    torch.jit.save(traced.half(), str(path))  # fp16 weights, as OpenAI's files


def hf_repo(folder: Path) -> None:
    import transformers

    config = transformers.CLIPConfig(projection_dim=512)  # transformers' defaults are ViT-B/32's shapes
    transformers.CLIPModel(config).save_pretrained(folder)


def timed(source, **options) -> float:
    start = time.perf_counter()
    load(source, **options)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(2)
    root = Path(tempfile.mkdtemp(prefix="bench-load-"))
    served = root / "served"
    archive = root / "ViT-B-32.pt"
    openai_archive(archive)
    sha256 = hashlib.sha256(archive.read_bytes()).hexdigest()
    (served / "openai" / sha256).mkdir(parents=True)
    os.replace(archive, served / "openai" / sha256 / "ViT-B-32.pt")
    ClipTokenizer.find_installed().save(served / "hub" / "openai" / "clip-vit-base-patch32")
    hf_repo(served / "hub" / "openai" / "clip-vit-base-patch32")
    server = FileServer(served)
    hub.OPENAI_MODELS["ViT-B/32"] = f"{sha256}/ViT-B-32.pt"
    os.environ.update(
        CLIPDALLE_OPENAI_URL=f"{server.url}/clip/models", HF_ENDPOINT=server.url, NO_PROXY="127.0.0.1,localhost",
        CLIPDALLE_CACHE=str(root / "cache"), HF_HUB_CACHE=str(root / "hf"),
    )  # fmt: skip
    names = ("ViT-B/32", "openai/clip-vit-base-patch32")
    paths = {}
    for name in names:  # the download: what the caches hold afterwards
        files = hub.resolve(name)
        paths[name] = (files.path, files.tokenizer or files.path)
    server.close()
    rows = {name: {"path": [], "name": [], "offline": []} for name in names}
    for number in range(args.rounds):
        for name in names:
            path, tokenizer = paths[name]
            ways = [("name", {}), ("path", {"tokenizer": tokenizer}), ("offline", {})]
            for way, options in ways if number % 2 == 0 else ways[::-1]:  # A B C, then C B A: no order favoured
                if way == "offline":
                    os.environ["CLIPDALLE_OFFLINE"] = "1"
                rows[name][way].append(timed(path if way == "path" else name, **options))
                os.environ.pop("CLIPDALLE_OFFLINE", None)
        print(f"round {number + 1}/{args.rounds} done", flush=True)
    # what a name adds to a load: finding its cached files (hub.resolve), timed alone many times
    resolve_seconds = {}
    for name in names:
        times = []
        for _ in range(50):
            start = time.perf_counter()
            hub.resolve(name)
            times.append(time.perf_counter() - start)
        resolve_seconds[name] = statistics.median(times)
    print(f"\nload average at the end: {os.getloadavg()[0]:.2f}; torch {torch.__version__}, 2 threads")
    print("\n| model | by path (s) | by name (s) | by name, offline (s) | by name / by path (median of rounds) "
          "| finding the cached files (hub.resolve) |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|")
    for name in names:
        times = rows[name]
        ratios = [by_name / by_path for by_name, by_path in zip(times["name"], times["path"])]
        medians = [statistics.median(times[key]) for key in ("path", "name", "offline")]
        overhead = resolve_seconds[name]
        print(f"| {name} | {medians[0]:.2f} | {medians[1]:.2f} | {medians[2]:.2f} | {statistics.median(ratios):.3f} "
              f"({min(ratios):.3f} to {max(ratios):.3f}) | {overhead * 1000:.1f} ms = "
              f"{100 * overhead / medians[0]:.2f} % of a load by path |")  # fmt: skip


if __name__ == "__main__":
    main()
