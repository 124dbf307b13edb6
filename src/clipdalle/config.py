"""Configs as flat dataclasses: JSON round trips, presets, and typed command-line flags.

Every model has one `@dataclass` config (`DVAEConfig`, `CLIPConfig`, `DALLEConfig`) and every run has a
`TrainConfig`. A preset is `configs/NAME.json` = `{"model": {...}, "train": {...}}`. Values are layered:
dataclass defaults < preset < (on resume) the run's own config < command-line flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

PACKAGE_CONFIGS = Path(__file__).parent / "configs"  # presets packed into a wheel
SOURCE_CONFIGS = Path(__file__).resolve().parents[2] / "configs"  # presets in a source checkout


@dataclass
class TrainConfig:
    steps: int = 1000  # optimizer steps in the whole run (not per epoch: streams have no fixed length)
    batch_size: int = 64  # samples per optimizer step per process (before gradient accumulation)
    grad_accum: int = 1  # micro-batches summed per optimizer step; effective batch = batch_size * grad_accum * world
    epochs: float = 0.0  # above 0: sets steps to this many passes over the training split (counted at the start)
    lr: float = 3e-4  # peak learning rate after warmup
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio at the last step
    warmup_steps: int = 100  # linear warmup from 0; short runs on small data need it less
    weight_decay: float = 0.01  # AdamW decay on matrices only (not on gains, biases, embeddings)
    beta1: float = 0.9  # AdamW first-moment decay
    beta2: float = 0.99  # AdamW second-moment decay; 0.99 rather than 0.999 is steadier for short runs
    grad_clip: float = 1.0  # global gradient-norm clip; 0 disables
    max_skipped_steps: int = 5  # steps in a row with a NaN/infinite loss or gradient (each skipped) that stop the run
    eval_every: int = 200  # steps between evaluations (validation metrics, sample grid)
    eval_batches: int = 4  # validation batches per evaluation
    save_every: int = 200  # steps between checkpoints (the run also saves at its last step)
    keep_best: bool = True  # keep the weights of the lowest validation loss in RUN/best/, which loading prefers
    early_stop: int = 0  # stop after this many evaluations in a row without a lower validation loss; 0 = never
    max_seconds: float = 0.0  # stop (with a checkpoint) after this many seconds; the lr decay then ends by it too
    log_every: int = 10  # steps between training-metric rows in metrics.csv
    seed: int = 0  # seeds initialisation, data order, augmentation and sampling noise
    num_workers: int = 0  # data-loader processes per training process; 0 decodes between steps, which on few cores
    # beats a worker process fighting the compute threads for small images; raise it for big images
    crop_scale: float = 1.0  # random resized crop keeps at least this share of the area; 1 = no crop (CLIP: 0.8)
    max_shift: float = 0.0  # random translation as a share of the image side; never colour jitter (colour is content)
    caption_templates: str = ""  # '|'-separated templates a training caption is put into at random ('{}' = the caption)
    code_views: int = 1  # DALL·E: cached codes per training image, the centre crop + augmented views; one per epoch
    hard_negative_words: list[str] = field(default_factory=list)  # e.g. colours: some batches share one, so the
    # contrast must come from the rest of the captions (CLIP; data.loader.hard_negative_batches)
    hard_negative_share: float = 0.5  # share of the batches drawn from one hard_negative_words group
    val_fraction: float = 0.02  # share of samples held out by a hash of their key when no val/ split exists
    device: str = "auto"  # auto | cpu | cuda | cuda:N; auto takes CUDA when present
    dtype: str = "fp32"  # fp32 | bf16 | fp16 autocast; fp32 on CPU (bf16 matmul is ~100x slower on AVX2)


def to_dict(config: Any) -> dict[str, Any]:
    """A config dataclass as a plain JSON-ready dict (derived @property sizes are not included)."""
    return dataclasses.asdict(config)


def from_dict(cls: type[T], values: dict[str, Any], source: str = "config") -> T:
    """Builds `cls` from a dict; an unknown key is a ValueError naming `source` and listing the valid keys."""
    valid = [f.name for f in fields(cls)]
    unknown = sorted(set(values) - set(valid))
    if unknown:
        raise ValueError(
            f"{source}: unknown {cls.__name__} field(s) {', '.join(unknown)}; valid fields: {', '.join(valid)}"
        )
    hints = typing.get_type_hints(cls)
    return cls(**{name: _coerce(hints[name], value, f"{source}: {name}") for name, value in values.items()})


def replace(config: T, **changes: Any) -> T:
    """A copy of `config` with `changes`, checked like `from_dict`."""
    return from_dict(type(config), {**to_dict(config), **changes})


def _coerce(kind: Any, value: Any, where: str) -> Any:
    """JSON gives ints for floats and lists for tuples; anything else of the wrong type is an error."""
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind in (int, float, str, bool):
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise ValueError(f"{where}: expected {kind.__name__}, got {value!r}")
        return value
    origin = typing.get_origin(kind)
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [item for item in value.split(",") if item]
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where}: expected a list, got {value!r}")
        (item_kind, *_) = typing.get_args(kind) or (Any,)
        items = [_coerce(item_kind, item, where) for item in value]
        return origin(items)
    return value


# ---------------------------------------------------------------------------------------------- presets


def preset_path(name: str) -> Path:
    """`name` is a preset name (`configs/NAME.json`) or a path to a JSON file."""
    path = Path(name)
    if path.suffix == ".json" and path.exists():
        return path
    for folder in (PACKAGE_CONFIGS, SOURCE_CONFIGS):
        candidate = folder / f"{name}.json"
        if candidate.exists():
            return candidate
    raise ValueError(f"preset {name!r}: not found; available presets: {', '.join(available_presets()) or 'none'}")


def available_presets() -> list[str]:
    names = {p.stem for folder in (PACKAGE_CONFIGS, SOURCE_CONFIGS) if folder.is_dir() for p in folder.glob("*.json")}
    return sorted(names)


def load_preset(name: str) -> dict[str, Any]:
    """Reads a preset: a dict with optional `model` and `train` sections (and others for pipelines)."""
    path = preset_path(name)
    try:
        values = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(values, dict):
        raise ValueError(f"{path}: expected a JSON object with 'model' and 'train' sections")
    return values


# ------------------------------------------------------------------------------------------- CLI flags


def flag_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def add_config_flags(parser: argparse.ArgumentParser, cls: type, group_title: str | None = None) -> None:
    """One typed flag per field of `cls` (`n_embd` -> `--n-embd`). Flags default to 'not given' so that a
    preset or a resumed run's config is only overridden by what the user typed."""
    group = parser.add_argument_group(group_title or cls.__name__)
    hints = typing.get_type_hints(cls)
    for option in fields(cls):
        kind = hints[option.name]
        comment = _field_comments(cls).get(option.name, "")
        default = option.default if option.default is not dataclasses.MISSING else option.default_factory()
        help_text = f"{comment} (default: {_format_default(default)})"
        if kind is bool:
            group.add_argument(
                flag_name(option.name),
                dest=option.name,
                action=argparse.BooleanOptionalAction,
                default=argparse.SUPPRESS,
                help=help_text,
            )
        elif typing.get_origin(kind) in (list, tuple):
            group.add_argument(
                flag_name(option.name),
                dest=option.name,
                type=str,
                default=argparse.SUPPRESS,
                help=help_text,
            )
        else:
            group.add_argument(
                flag_name(option.name),
                dest=option.name,
                type=kind,
                default=argparse.SUPPRESS,
                metavar=kind.__name__.upper(),
                help=help_text,
            )


def flags_for(cls: type, args: argparse.Namespace) -> dict[str, Any]:
    """The fields of `cls` that were given on the command line."""
    given = vars(args)
    return {f.name: given[f.name] for f in fields(cls) if f.name in given}


def build_config(cls: type[T], *layers: dict[str, Any], source: str = "config") -> T:
    """Merges dicts left to right over the dataclass defaults."""
    merged: dict[str, Any] = {}
    for layer in layers:
        merged.update(layer or {})
    return from_dict(cls, merged, source)


def _format_default(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(str(item) for item in value)
    return str(value)


_COMMENT_CACHE: dict[type, dict[str, str]] = {}


def _field_comments(cls: type) -> dict[str, str]:
    """The trailing `# comment` of each field in the class source: the flag's help text."""
    if cls not in _COMMENT_CACHE:
        import inspect

        comments: dict[str, str] = {}
        try:
            source_lines = inspect.getsource(cls).splitlines()
        except (OSError, TypeError):
            source_lines = []
        for line in source_lines:
            stripped = line.strip()
            if ":" in stripped and "#" in stripped and not stripped.startswith(("#", "def ", "@")):
                name = stripped.split(":", 1)[0].strip()
                comments[name] = stripped.split("#", 1)[1].strip().replace("%", "%%")
        _COMMENT_CACHE[cls] = comments
    return _COMMENT_CACHE[cls]
