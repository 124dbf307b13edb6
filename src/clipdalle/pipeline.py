"""Multi-stage jobs: the demo (`make demo`, `clipdalle pipeline --preset demo`).

A pipeline preset (`configs/demo.json`) names the dataset and each model's preset plus overrides. Stages run in
order; a stage whose outputs are complete is skipped, a stage that was interrupted resumes from its last
checkpoint, and `fresh=True` starts over. Stage timings are written to OUT/timings.json.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import checkpoint
from .config import TrainConfig, build_config, load_preset


@dataclass
class Stage:
    name: str
    done: Callable[[], bool]  # outputs complete: skip
    run: Callable[[], None]


def model_and_train_configs(spec: dict[str, Any], model_config_class: type, prefix: str) -> tuple[Any, TrainConfig]:
    """A stage's configs: its model preset (`"preset": "demo"` -> configs/PREFIX-demo.json) plus overrides."""
    preset = load_preset(f"{prefix}-{spec['preset']}") if "preset" in spec else {}
    model_config = build_config(
        model_config_class, preset.get("model", {}), spec.get("model", {}), source=f"{prefix} stage"
    )
    train_config = build_config(TrainConfig, preset.get("train", {}), spec.get("train", {}), source=f"{prefix} stage")
    return model_config, train_config


def training_finished(run_dir: Path, steps: int) -> bool:
    return (run_dir / checkpoint.CONFIG_FILE).exists() and checkpoint.checkpoint_step(run_dir) == steps


def run_pipeline(preset: str, out: str | Path, *, fresh: bool = False, data_dir: str | Path = "data") -> Path:
    """Runs every stage of a pipeline preset into `out` and returns the path of its summary."""
    from .dvae import DVAEConfig

    spec = load_preset(preset)
    out = Path(out)
    if fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    icons = spec.get("icons", {"size": 32, "colours": 8})
    data = Path(data_dir) / f"icons-{icons['size']}px-{icons['colours']}c"
    vae_dir = out / "vae"
    vae_config, vae_train = model_and_train_configs(spec.get("vae", {}), DVAEConfig, "vae")
    if vae_config.image_size != icons["size"]:
        raise ValueError(f"{preset}: vae image_size {vae_config.image_size} differs from icons size {icons['size']}")

    def build_data() -> None:
        from .data.icons import build_icons

        build_icons(data, size=icons["size"], colours=icons["colours"])

    def train_vae_stage() -> None:
        from .train import train_vae

        resume = (vae_dir / checkpoint.TRAIN_STATE_FILE).exists()
        train_vae(data, vae_dir, vae_config, vae_train, resume=resume)

    def evaluate_vae_stage() -> None:
        results = evaluate_tokenizer_on_icons(vae_dir, data, icons["size"])
        checkpoint.write_json(vae_dir / "eval.json", results)
        print(
            f"dVAE on validation icons: PSNR {results['psnr']:.2f} dB, "
            f"right colour {100 * results['colour_accuracy']:.2f} %, "
            f"{results['codes_used']} of {results['vocab_size']} codes used",
            file=sys.stderr,
        )

    from .data.icons import is_complete

    stages = [
        Stage("icon dataset", lambda: is_complete(data), build_data),
        Stage("dVAE training", lambda: training_finished(vae_dir, vae_train.steps), train_vae_stage),
        Stage("dVAE evaluation", lambda: (vae_dir / "eval.json").exists(), evaluate_vae_stage),
    ]
    timings = _read_json(out / "timings.json")
    started = time.perf_counter()
    for index, stage in enumerate(stages, 1):
        prefix = f"[{index}/{len(stages)}] {stage.name}"
        if stage.done():
            print(f"{prefix}: complete, skipped", file=sys.stderr)
            continue
        elapsed = time.perf_counter() - started
        print(f"{prefix} (pipeline time so far {elapsed / 60:.1f} min)", file=sys.stderr)
        stage_start = time.perf_counter()
        stage.run()
        timings[stage.name] = round(time.perf_counter() - stage_start, 1)
        checkpoint.write_json(out / "timings.json", timings)
    summary = {
        "preset": preset,
        "data": str(data),
        "timings_s": timings,
        "vae": _read_json(vae_dir / "eval.json"),
    }
    path = checkpoint.write_json(out / "summary.json", summary)
    print(f"reconstructions: {out / 'vae' / 'reconstructions.png'}", file=sys.stderr)
    return path


@torch.no_grad()
def evaluate_tokenizer_on_icons(vae_dir: Path, data: Path, image_size: int, batch_size: int = 256) -> dict[str, Any]:
    """Round-trips every validation icon through the dVAE: PSNR, code usage, and the colour judge of the demo
    (dominant non-white colour of the reconstruction equals the icon's colour)."""
    from .data.icons import PALETTE, dominant_colour
    from .data.loader import SampleStream, make_loader
    from .data.sources import open_source
    from .transforms import make_grid, save_image

    model = checkpoint.load_model(vae_dir, expect="dvae")
    colours = list(PALETTE)
    stream = SampleStream(
        open_source(data / "val", captions="optional"),
        image_size=image_size,
        batch_size=batch_size,
        shuffle=False,
        infinite=False,
    )
    right, total, psnr_sum = 0, 0, 0.0
    usage = torch.zeros(model.config.vocab_size)
    shown: list[torch.Tensor] = []
    for batch in make_loader(stream, num_workers=1):
        images = batch["images"]
        codes = model.encode(images)
        reconstructions = model.decode(codes)
        usage += torch.bincount(codes.flatten(), minlength=usage.numel()).float()
        per_image = ((reconstructions - images) ** 2).flatten(1).mean(1)
        psnr_sum += float((10 * torch.log10(1 / per_image.clamp_min(1e-10))).sum())
        truth = torch.tensor([colours.index(key.rsplit("__", 1)[-1]) for key in batch["keys"]])
        right += int((dominant_colour(reconstructions) == truth).sum())
        total += len(images)
        if len(shown) < 2:
            shown.append(torch.stack([images[:16], reconstructions[:16]], 1).flatten(0, 1))  # (32, 3, H, W) pairs
    if total == 0:
        raise ValueError(f"{data / 'val'}: no validation images")
    probabilities = usage / usage.sum()
    perplexity = float(torch.exp(-(probabilities * probabilities.clamp_min(1e-12).log()).sum()))
    save_image(make_grid(torch.cat(shown), n_col=16), vae_dir / "reconstructions.png")
    return {
        "images": total,
        "psnr": psnr_sum / total,
        "colour_accuracy": right / total,
        "codes_used": int((usage > 0).sum()),
        "vocab_size": model.config.vocab_size,
        "perplexity": perplexity,
    }


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.exists() else {}
