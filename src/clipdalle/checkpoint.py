"""Run directories: one per trained model, written atomically, loaded strictly.

    RUN/config.json        {"clipdalle": {"model_type", "format_version"}, "model": {...}, "train": {...}}
    RUN/model.safetensors  latest good weights of the unwrapped model (no `module.` / `_orig_mod.` prefixes)
    RUN/best/              config.json, model.safetensors (and the tokenizer) of the lowest validation loss so far:
                           what loading gives by default (`which="best"`); `which="last"` gives RUN/model.safetensors
    RUN/tokenizer.json     where the model reads text
    RUN/train_state.pt     optimizer, scheduler, step, data position: for --resume only (weights_only=True)
    RUN/metrics.csv, RUN/loss.png, RUN/samples/step_NNNNNN.png

Every file is written to a temporary name in the same directory and renamed into place, so a killed process
leaves either the old file or the new one. A checkpoint is two files (weights and train state) written as a
two-phase commit: both temporaries are complete before either is renamed, and `recover` rolls a half-done
rename forward, so resuming never pairs weights of one step with optimizer state of another. The best weights are
one more file, RUN/best/model.safetensors, replaced atomically beside a config.json that never changes in a run.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_model as load_safetensors_model
from safetensors.torch import save_model as save_safetensors_model

from .config import from_dict, to_dict
from .io import atomic_write, fsync, read_json, write_json
from .models import MODEL_CLASSES
from .runtime import unwrap
from .tokenizers import CaptionTokenizer

FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.json"
TRAIN_STATE_FILE = "train_state.pt"
BEST_DIR = "best"
WHICH = ("best", "last")  # the weights loading picks: RUN/best/ when the run has it, or the latest
TOKENIZER_FILES = (TOKENIZER_FILE, "vocab.json", "merges.txt")  # our caption BPE, or a fine-tuned CLIP's OpenAI BPE


# ------------------------------------------------------------------------------------------ models


def model_class(model_type: str) -> type:
    if model_type not in MODEL_CLASSES:
        raise ValueError(f"unknown model_type {model_type!r}; expected one of {', '.join(MODEL_CLASSES)}")
    return MODEL_CLASSES[model_type]


def save_config(run_dir: str | Path, model: torch.nn.Module, train_config: Any = None) -> Path:
    """Writes RUN/config.json for `model` (which has `.model_type` and a dataclass `.config`)."""
    model = unwrap(model)
    values = {
        "clipdalle": {"model_type": model.model_type, "format_version": FORMAT_VERSION},
        "model": to_dict(model.config),
    }
    if train_config is not None:
        values["train"] = to_dict(train_config)
    return write_json(Path(run_dir) / CONFIG_FILE, values)


def read_config(run_dir: str | Path) -> dict[str, Any]:
    """RUN/config.json, checked to be one of ours; errors name the directory and what was found."""
    run_dir = Path(run_dir)
    path = run_dir / CONFIG_FILE
    if not run_dir.exists():
        raise FileNotFoundError(f"{run_dir}: no such run directory")
    if not path.exists():
        raise ValueError(f"{run_dir}: not a clipdalle run (no {CONFIG_FILE})")
    values = read_json(path)
    header = values.get("clipdalle")
    if not isinstance(header, dict) or "model_type" not in header:
        found = values.get("model_type")
        raise ValueError(f"{path}: not a clipdalle run config (no 'clipdalle' section; found model_type {found!r})")
    if header.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(
            f"{path}: format_version {header['format_version']} is newer than this clipdalle "
            f"({FORMAT_VERSION}); upgrade clipdalle"
        )
    return values


def is_run(path: str | Path) -> bool:
    """True for a directory holding a clipdalle run (a config.json with the 'clipdalle' header), of any type."""
    try:
        return isinstance(read_json(Path(path) / CONFIG_FILE).get("clipdalle"), dict)
    except (OSError, ValueError):
        return False


def model_type_of(run_dir: str | Path) -> str:
    return read_config(run_dir)["clipdalle"]["model_type"]


def nonfinite_tensors(model: torch.nn.Module) -> list[str]:
    """Names of the saved tensors (the state dict) holding a NaN or an infinity."""
    return [
        name
        for name, tensor in unwrap(model).state_dict().items()
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())
    ]


def check_finite(model: torch.nn.Module, path: str | Path, step: int | None = None) -> None:
    """A ValueError naming `path` (and the step) when a weight is NaN or infinite: such weights are never committed,
    so the file on disk stays the last good one."""
    bad = nonfinite_tensors(model)
    if bad:
        at = f" at step {step}" if step is not None else ""
        raise ValueError(
            f"{path}: the weights{at} hold NaN or infinite values ({len(bad)} tensor(s), e.g. {bad[0]}); refusing to "
            "save them, the file on disk keeps the last good weights (lower the learning rate, then --resume)"
        )


def save_weights(path: str | Path, model: torch.nn.Module) -> Path:
    """Weights of the unwrapped model as safetensors (shared/tied tensors stored once); non-finite ones are refused."""
    model = unwrap(model)
    check_finite(model, path)
    return atomic_write(path, lambda tmp: save_safetensors_model(model, str(tmp)))


def load_weights(path: str | Path, model: torch.nn.Module) -> torch.nn.Module:
    """Strict load: a missing or unexpected tensor is an error naming the file."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no weights file")
    try:
        missing, unexpected = load_safetensors_model(unwrap(model), str(path), strict=False)
    except RuntimeError as error:  # shape mismatches
        first = next((line.strip() for line in str(error).splitlines() if "size mismatch" in line), str(error))
        raise ValueError(f"{path}: weights do not match the model's config ({first})") from None
    if missing or unexpected:
        raise ValueError(
            f"{path}: weights do not match the model (missing: {', '.join(missing[:5]) or 'none'}; "
            f"unexpected: {', '.join(unexpected[:5]) or 'none'})"
        )
    return model


def save_model(run_dir: str | Path, model: torch.nn.Module, train_config: Any = None) -> Path:
    """config.json + model.safetensors: a run directory another user can load."""
    run_dir = Path(run_dir)
    check_finite(model, run_dir / WEIGHTS_FILE)  # before config.json: a refused model leaves no half-written run
    save_config(run_dir, model, train_config)
    save_weights(run_dir / WEIGHTS_FILE, model)
    return run_dir


def weights_path(run_dir: str | Path, which: str = "best") -> Path:
    """The weights file loading reads: RUN/best/model.safetensors for `which="best"` when the run kept one (the lowest
    validation loss), else RUN/model.safetensors (the latest)."""
    if which not in WHICH:
        raise ValueError(f"which weights: expected one of {', '.join(WHICH)}, got {which!r}")
    run_dir = Path(run_dir)
    best = run_dir / BEST_DIR / WEIGHTS_FILE
    return best if which == "best" and best.is_file() else run_dir / WEIGHTS_FILE


def load_model(
    run_dir: str | Path,
    expect: str | None = None,
    device: str | torch.device = "cpu",
    overrides: dict[str, Any] | None = None,
    which: str = "best",
) -> torch.nn.Module:
    """Builds the model named by RUN/config.json and loads its weights strictly: the best ones (RUN/best/) when the
    run kept them, else the latest (`which="last"` always takes the latest); `expect` checks the type; `overrides`
    changes config fields that do not change the weights' shapes (e.g. a CLIP's activation)."""
    run_dir = Path(run_dir)
    values = read_config(run_dir)
    model_type = values["clipdalle"]["model_type"]
    if expect is not None and model_type != expect:
        raise ValueError(f"{run_dir}: is a {model_type} run, expected a {expect} run")
    cls = model_class(model_type)
    fields = {**values.get("model", {}), **(overrides or {})}
    model = cls(from_dict(cls.config_class, fields, source=str(run_dir / CONFIG_FILE)))
    load_weights(weights_path(run_dir, which), model)
    return model.to(device).eval()


def weights_metadata(path: str | Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as handle:
        return handle.metadata() or {}


# ------------------------------------------------------------------------------------------ checkpoints


def save_checkpoint(run_dir: str | Path, model: torch.nn.Module, train_state: dict[str, Any]) -> None:
    """Weights and train state as one unit: write both temporaries, then rename both.

    `train_state["step"]` is recorded in both files; `recover` finishes a commit a kill interrupted. Weights holding
    NaN or infinity are refused (a ValueError) before anything is written, so `--resume` restarts from the last
    good checkpoint."""
    run_dir = Path(run_dir)
    step = int(train_state["step"])
    check_finite(model, run_dir / WEIGHTS_FILE, step)
    weights_tmp = run_dir / f".{WEIGHTS_FILE}.commit"
    state_tmp = run_dir / f".{TRAIN_STATE_FILE}.commit"
    metadata = {"step": str(step)}
    if train_state.get("stopped"):
        metadata["stopped"] = str(train_state["stopped"])
    save_safetensors_model(unwrap(model), str(weights_tmp), metadata=metadata)
    torch.save(train_state, state_tmp)
    fsync(weights_tmp)
    fsync(state_tmp)
    os.replace(state_tmp, run_dir / TRAIN_STATE_FILE)
    os.replace(weights_tmp, run_dir / WEIGHTS_FILE)


def recover(run_dir: str | Path) -> None:
    """Finishes a checkpoint commit that a kill interrupted between its two renames, and drops stale temporaries."""
    run_dir = Path(run_dir)
    weights_tmp = run_dir / f".{WEIGHTS_FILE}.commit"
    state_tmp = run_dir / f".{TRAIN_STATE_FILE}.commit"
    state_path = run_dir / TRAIN_STATE_FILE
    if weights_tmp.exists() and not state_tmp.exists() and state_path.exists():
        # The state was renamed, the weights were not: the weights temporary is complete (fsynced before).
        try:
            same_step = weights_metadata(weights_tmp).get("step") == str(load_train_state(run_dir)["step"])
        except Exception:
            same_step = False
        if same_step:
            os.replace(weights_tmp, run_dir / WEIGHTS_FILE)
    for stale in (weights_tmp, state_tmp, *run_dir.glob(".*.tmp")):
        stale.unlink(missing_ok=True)


def load_train_state(run_dir: str | Path) -> dict[str, Any]:
    path = Path(run_dir) / TRAIN_STATE_FILE
    if not path.exists():
        raise ValueError(f"{Path(run_dir)}: nothing to resume (no {TRAIN_STATE_FILE})")
    return torch.load(path, map_location="cpu", weights_only=True)


def checkpoint_step(run_dir: str | Path) -> int | None:
    """The step of the committed weights, or None when the run has no checkpoint."""
    path = Path(run_dir) / WEIGHTS_FILE
    if not path.exists():
        return None
    step = weights_metadata(path).get("step")
    return int(step) if step is not None else None


def checkpoint_stopped(run_dir: str | Path) -> str | None:
    """Why the run's last checkpoint ended training before its last step ("early_stop" or "time_limit"), or None."""
    path = Path(run_dir) / WEIGHTS_FILE
    return weights_metadata(path).get("stopped") if path.exists() else None


def save_best(run_dir: str | Path, model: torch.nn.Module, train_config: Any, step: int, val_loss: float) -> Path:
    """RUN/best/: the weights of the lowest validation loss so far (step and loss in their metadata), beside the
    run's config and tokenizer, so RUN/best/ also loads on its own. The weights file is replaced atomically; the
    config and tokenizer are the same for the whole run. Non-finite weights are refused, as for checkpoints."""
    run_dir = Path(run_dir)
    best = run_dir / BEST_DIR
    check_finite(model, best / WEIGHTS_FILE, step)
    best.mkdir(parents=True, exist_ok=True)
    save_config(best, model, train_config)
    for name in TOKENIZER_FILES:
        if (run_dir / name).is_file() and not (best / name).is_file():
            atomic_write(best / name, lambda tmp, source=run_dir / name: shutil.copyfile(source, tmp))
    metadata = {"step": str(step), "val_loss": repr(float(val_loss))}
    return atomic_write(
        best / WEIGHTS_FILE, lambda tmp: save_safetensors_model(unwrap(model), str(tmp), metadata=metadata)
    )


def best_checkpoint(run_dir: str | Path) -> dict[str, float] | None:
    """{"step", "val_loss"} of RUN/best/, or None when the run kept no best weights."""
    path = Path(run_dir) / BEST_DIR / WEIGHTS_FILE
    if not path.is_file():
        return None
    metadata = weights_metadata(path)
    return {"step": int(metadata.get("step", -1)), "val_loss": float(metadata.get("val_loss", "nan"))}


def load_dalle(
    run_dir: str | Path, device: str | torch.device = "cpu", which: str = "best"
) -> tuple[torch.nn.Module, torch.nn.Module, Any]:
    """A DALL·E run as (transformer, its dVAE from RUN/vae, its caption tokenizer), in eval mode; `which` picks the
    transformer's weights (see `load_model`). The dVAE is always the one the codes came from: RUN/vae as training
    loaded it (its best weights when it kept them)."""
    return load_code_model(run_dir, expect="dalle", device=device, which=which)


def load_code_model(
    run_dir: str | Path, expect: str, device: str | torch.device = "cpu", which: str = "best"
) -> tuple[torch.nn.Module, torch.nn.Module, Any]:
    """A run of a model trained on dVAE codes and captions (`expect`: dalle, captioner) as (model, its dVAE from
    RUN/vae, its caption tokenizer), in eval mode; `which` picks the model's weights (see `load_model`)."""
    run_dir = Path(run_dir)
    model = load_model(run_dir, expect=expect, device=device, which=which)
    vae = load_model(run_dir / "vae", expect="dvae", device=device)
    return model, vae, CaptionTokenizer.load(run_dir / TOKENIZER_FILE)
