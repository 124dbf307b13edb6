"""The built-in icons as a pipeline collection: `make demo`, `clipdalle pipeline --preset demo|small|ml6` and
`clipdalle pipeline --data icons`.

A pipeline preset (`configs/demo.json`) names the icon dataset, each model's preset plus overrides, the number of icon
families DALL·E trains on, the evaluation sizes and the expected time of each stage. What is icon-specific:

    icon dataset      DATA/icons-32px-8c (all 7,367 icons; rendering is deterministic, so it is shared)
    CLIP data         the icon dataset, plus DALL·E's icons `oversample_dalle_icons` times an epoch when the clip
                      section sets it (`--extra-data DALLE_DATA:R`: the icons whose samples the CLIP reranks),
                      plus DALL·E's training icons captioned by their colour alone ("a pink icon") `colour_captions`
                      times an epoch (DATA/icons-32px-8c-HASH-colour: bare colour prompts, zero-shot colour)
    dVAE evaluation   PSNR and the colour judge (the reconstruction's dominant colour is the icon's)
    DALL·E data       the preset's training icons (common_icons or families) + all validation icons
                      (DATA/icons-32px-8c-HASH), their dVAE codes (OUT/dalle/tokens) and OUT/dalle/subset.json
    index             the validation icons
    evaluation        demo/evaluation.py (icon judges, quality bar); report: demo/report.py

The icons' runs keep their last weights (`keep_best` false unless a preset sets it): their validation icons are icon
families DALL·E never sees, whose loss rises while the training icons the quality bar judges still improve (the demo
CLIP's validation loss rose from step 600 to 1,800 while its reranking of shapes got better: configs/clip-demo.json).
"""

from __future__ import annotations

import hashlib
import random
import sys
from pathlib import Path
from typing import Any

import torch

from .. import checkpoint
from ..config import TrainConfig, build_config, load_preset
from ..data.icons import PALETTE, build_icons, common_icons, dominant_colour, family_of, is_complete
from ..io import read_json, write_json
from ..sampling import check_sampling_settings
from ..training.codes import build_code_cache, cache_is_current
from .collection import Collection, PipelineState
from .heldout import evaluate_tokenizer

# A pipeline preset's sections: the icons, the three models (preset + overrides; dalle also `families`), the
# evaluation sizes, the CPU threads to use (default: all cores) and the expected seconds of each stage (for the ETA).
PRESET_SECTIONS = ("description", "icons", "vae", "clip", "dalle", "eval", "threads", "expected_s")
SUBSET_KEYS = ("families", "common_icons")  # the dalle section's choice of training icons, besides model and train
EVAL_COUNTS = {"prompts": 2, "val_prompts": 2, "samples": 1, "seed": 0}  # the eval section's whole numbers, minimums
PIPELINE_KEYS = ("oversample_dalle_icons", "colour_captions")  # a model section's pipeline settings, besides preset,
# model and train: extra data mixed into its training, each with its repeats per epoch
ICON_TRAIN_DEFAULTS = {"keep_best": False}  # see the module's docstring


# ------------------------------------------------------------------------------------------ configs


def model_and_train_configs(spec: dict[str, Any], model_config_class: type, prefix: str) -> tuple[Any, TrainConfig]:
    """A stage's configs: its model preset (`"preset": "demo"` -> configs/PREFIX-demo.json) plus overrides, over the
    icons' training defaults (ICON_TRAIN_DEFAULTS)."""
    preset = load_preset(f"{prefix}-{spec['preset']}") if "preset" in spec else {}
    model_config = build_config(
        model_config_class, preset.get("model", {}), spec.get("model", {}), source=f"{prefix} stage"
    )
    train_config = build_config(
        TrainConfig, ICON_TRAIN_DEFAULTS, preset.get("train", {}), spec.get("train", {}), source=f"{prefix} stage"
    )
    return model_config, train_config


def is_count(value: Any, least: int) -> bool:
    """A whole number (an int, not a bool) of at least `least`."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def pipeline_configs(spec: dict[str, Any], name: str = "pipeline") -> dict[str, tuple[Any, TrainConfig]]:
    """The (model config, train config) of each model of a pipeline preset, checked to fit together: every model
    reads images of the icons' size, and DALL·E's image vocabulary and grid are the dVAE's."""
    from ..models.clip import CLIPConfig
    from ..models.dalle import DALLEConfig
    from ..models.dvae import DVAEConfig

    unknown = sorted(set(spec) - set(PRESET_SECTIONS))
    if unknown:
        raise ValueError(f"{name}: unknown section(s) {', '.join(unknown)}; expected {', '.join(PRESET_SECTIONS)}")
    threads = spec.get("threads")
    if threads is not None and not is_count(threads, 1):
        raise ValueError(f"{name}: threads must be a positive integer (or absent: all cores), got {threads!r}")
    evaluation = spec.get("eval", {})
    unknown = sorted(set(evaluation) - {*EVAL_COUNTS, "sampling"})
    if unknown:
        expected = ", ".join([*EVAL_COUNTS, "sampling"])
        raise ValueError(f"{name}: unknown eval setting(s) {', '.join(unknown)}; expected {expected}")
    for key, least in EVAL_COUNTS.items():
        if key in evaluation and not is_count(evaluation[key], least):
            raise ValueError(f"{name}: eval {key} must be a whole number >= {least}, got {evaluation[key]!r}")
    check_sampling_settings(evaluation.get("sampling", {}), f"{name}: eval")
    for key in PIPELINE_KEYS:
        repeats = spec.get("clip", {}).get(key)
        if repeats is not None and not is_count(repeats, 0):
            raise ValueError(f"{name}: clip {key} must be the repeats per epoch, a whole number >= 0; got {repeats!r}")
    size = icon_settings(spec)["size"]
    configs = {
        "vae": model_and_train_configs(spec.get("vae", {}), DVAEConfig, "vae"),
        "clip": model_and_train_configs(
            {key: value for key, value in spec.get("clip", {}).items() if key not in PIPELINE_KEYS}, CLIPConfig, "clip"
        ),
        "dalle": model_and_train_configs(
            {key: value for key, value in spec.get("dalle", {}).items() if key not in SUBSET_KEYS},
            DALLEConfig,
            "dalle",
        ),
    }
    vae, clip, dalle = configs["vae"][0], configs["clip"][0], configs["dalle"][0]
    for model_name, image_size in (("vae", vae.image_size), ("clip", clip.image_size)):
        if image_size != size:
            raise ValueError(f"{name}: {model_name} image_size {image_size} differs from the icons' size {size}")
    if (dalle.image_vocab_size, dalle.grid_size) != (vae.vocab_size, vae.grid_size):
        raise ValueError(
            f"{name}: dalle image_vocab_size {dalle.image_vocab_size} and grid_size {dalle.grid_size} must be the "
            f"dVAE's vocab_size {vae.vocab_size} and grid {vae.grid_size} ({size} px / 2**{vae.n_downsample})"
        )
    return configs


def icon_settings(spec: dict[str, Any]) -> dict[str, int]:
    icons = {"size": 32, "colours": 8, **spec.get("icons", {})}
    if set(icons) != {"size", "colours"}:
        raise ValueError(f"icons: expected the keys size and colours, got {', '.join(sorted(icons))}")
    return icons


def choose_families(train_names: list[str], count: int | None, seed: int = 0) -> list[str]:
    """`count` icon families drawn with a seeded RNG from the families of `train_names` (all when None), sorted."""
    families = sorted({family_of(name) for name in train_names})
    if count is None or count >= len(families):
        return families
    if count < 1:
        raise ValueError(f"dalle families: expected a positive number of icon families (or null for all), got {count}")
    return sorted(random.Random(seed).sample(families, count))


def dalle_icons(train_names: list[str], dalle_spec: dict[str, Any], seed: int = 0) -> tuple[list[str], str]:
    """(the training icons DALL·E learns, how they were chosen), from a preset's dalle section: `common_icons: M`
    (the icons at least M other icon fonts draw: `icons.common_icons`), else `families: N` (N families drawn at
    random, every icon of them; null or absent: every training icon)."""
    if "common_icons" in dalle_spec:
        min_fonts = dalle_spec["common_icons"]
        if not isinstance(min_fonts, int) or not 1 <= min_fonts <= 5:
            raise ValueError(
                f"dalle common_icons: expected 1 to 5 (other icon fonts that draw the icon), got {min_fonts!r}"
            )
        chosen = common_icons(train_names, min_fonts)
        return (
            chosen,
            f"the {len(chosen)} icons that at least {min_fonts} of the 5 other icon fonts in qtawesome also draw",
        )
    families = set(choose_families(train_names, dalle_spec.get("families"), seed))
    chosen = [name for name in train_names if family_of(name) in families]
    return chosen, f"every icon of {len(families)} icon families drawn at random (seed {seed})"


def subset_folder_name(size: int, colours: int, names: list[str]) -> str:
    """icons-32px-8c-HASH: the hash of the icon names tells subsets apart, so each is rendered once."""
    digest = hashlib.sha1("\n".join(sorted(names)).encode("utf-8")).hexdigest()[:8]
    return f"icons-{size}px-{colours}c-{digest}"


def checked_preset(preset: str) -> tuple[dict[str, Any], dict[str, tuple[Any, TrainConfig]]]:
    """(the preset, its configs), checked to fit together and to fit this machine."""
    spec = load_preset(preset)
    configs = pipeline_configs(spec, preset)
    wanted = {train.device for _, train in configs.values()}
    if any(name.startswith("cuda") for name in wanted) and not torch.cuda.is_available():
        raise ValueError(
            f"preset {preset} trains on {', '.join(sorted(wanted))} but CUDA is not available on this machine; "
            "use a CPU preset (demo, small) or install the CUDA build of torch==2.13.0"
        )
    return spec, configs


def preset_for_budget(budget_s: float, presets: tuple[str, ...] = ("demo", "small")) -> str:
    """The largest icon preset whose expected stage times (the icon dataset excepted, as the demo counts) fit."""
    fitting = [name for name in presets if sum(expected_training_seconds(load_preset(name)).values()) <= budget_s]
    if not fitting:
        demo = sum(expected_training_seconds(load_preset(presets[0])).values())
        raise ValueError(
            f"--budget {budget_s / 60:.0f} min: the smallest icon preset ({presets[0]}) takes about "
            f"{demo / 60:.0f} min; give a larger budget or --preset demo"
        )
    return fitting[-1]


def expected_training_seconds(spec: dict[str, Any]) -> dict[str, float]:
    return {name: seconds for name, seconds in spec.get("expected_s", {}).items() if name != "icon dataset"}


# ------------------------------------------------------------------------------------------ the collection


class IconCollection(Collection):
    """The built-in icons (see the module's docstring)."""

    name = "icons"
    data_stage = "icon dataset"

    def __init__(self, spec: dict[str, Any], out: Path, data_dir: Path):
        self.spec = spec
        self.data_dir = data_dir
        path = out / "dalle" / "subset.json"
        self.subset: dict[str, Any] = read_json(path) if path.exists() else {}

    @property
    def icons(self) -> dict[str, int]:
        return icon_settings(self.spec)

    @property
    def data(self) -> Path:
        return self.data_dir / f"icons-{self.icons['size']}px-{self.icons['colours']}c"

    @property
    def evaluation(self) -> dict[str, Any]:
        return {"prompts": 128, "samples": 16, "seed": 0, **self.spec.get("eval", {})}

    @property
    def dalle_subset(self) -> dict[str, Any]:
        """The preset's choice of DALL·E's training icons (see `dalle_icons`)."""
        return {key: value for key, value in self.spec.get("dalle", {}).items() if key in SUBSET_KEYS}

    @property
    def dalle_data(self) -> Path | None:
        return Path(self.subset["data"]) if self.subset.get("data") else None

    def split(self) -> dict[str, list[str]]:
        """The icon dataset's train and validation icon names (DATA/split.json)."""
        return read_json(self.data / "split.json")

    def data_done(self, state: PipelineState) -> bool:
        return is_complete(self.data, self.icons["size"], self.icons["colours"])

    def build_data(self, state: PipelineState, restart: bool) -> None:
        build_icons(self.data, size=self.icons["size"], colours=self.icons["colours"])

    def training_args(self, state: PipelineState, kind: str) -> list[str]:
        args = ["--data", str(self.data)]
        section = self.spec.get(kind, {})
        oversample, colour = section.get("oversample_dalle_icons"), section.get("colour_captions")
        if not (oversample or colour):
            return args
        folder, seen, _ = self.dalle_folder()
        if oversample:  # the icons DALL·E will draw, seen `oversample` times as often: what the CLIP must rerank
            args += ["--extra-data", f"{folder}:{oversample}"]
        if colour:  # DALL·E's training icons captioned by their colour alone: what a bare "a pink icon" means
            args += ["--extra-data", f"{self.colour_folder(seen)}:{colour}"]
        return args

    def evaluate_tokenizer(self, state: PipelineState) -> dict[str, Any]:
        colours = list(PALETTE)

        def right_colour(keys: list[str], reconstructions: torch.Tensor) -> int:
            truth = torch.tensor([colours.index(key.rsplit("__", 1)[-1]) for key in keys])
            return int((dominant_colour(reconstructions) == truth).sum())

        results = evaluate_tokenizer(state.run_dir("vae"), self.data / "val", self.icons["size"], judge=right_colour)
        print(
            f"dVAE on validation icons: PSNR {results['psnr']:.2f} dB, "
            f"right colour {100 * results['colour_accuracy']:.2f} %, "
            f"{results['codes_used']} of {results['vocab_size']} codes used",
            file=sys.stderr,
        )
        return results

    def dalle_data_done(self, state: PipelineState) -> bool:
        folder = self.dalle_data
        return (
            folder is not None
            and self.subset.get("requested", "absent") == self.dalle_subset  # the preset's subset, not an older one
            and is_complete(folder, self.icons["size"], self.icons["colours"])
            and cache_is_current(state.tokens_dir, state.run_dir("vae"), str(folder))
        )

    def dalle_folder(self) -> tuple[Path, list[str], str]:
        """(the dataset DALL·E trains on, its training icons, the rule that chose them): the preset's subset of the
        training icons plus every validation icon, rendered once (or the whole dataset when the subset is all of it)."""
        icons, split = self.icons, self.split()
        seen, rule = dalle_icons(split["train"], self.dalle_subset, self.evaluation["seed"])
        folder = self.data  # every training icon: the whole dataset
        if len(seen) < len(split["train"]):
            folder = self.data_dir / subset_folder_name(icons["size"], icons["colours"], seen + split["val"])
        if not is_complete(folder, icons["size"], icons["colours"]):
            build_icons(folder, size=icons["size"], colours=icons["colours"], names=seen + split["val"])
        return folder, seen, rule

    def colour_folder(self, seen: list[str]) -> Path:
        """DALL·E's training icons `seen` (`dalle_folder`) with captions that name only their colour, rendered once."""
        icons = self.icons
        folder = self.data_dir / f"{subset_folder_name(icons['size'], icons['colours'], seen)}-colour"
        if not is_complete(folder, icons["size"], icons["colours"], captions="colour"):
            build_icons(folder, size=icons["size"], colours=icons["colours"], names=seen, captions="colour")
        return folder

    def build_dalle_data(self, state: PipelineState, restart: bool) -> None:
        """The icons DALL·E trains on (`dalle_folder`) and their dVAE codes."""
        split, seed = self.split(), self.evaluation["seed"]
        folder, seen, rule = self.dalle_folder()
        chosen = sorted({family_of(name) for name in seen})
        vae_dir = state.run_dir("vae")
        if not cache_is_current(state.tokens_dir, vae_dir, str(folder)):
            vae = checkpoint.load_model(vae_dir, expect="dvae", device=state.device)
            build_code_cache(vae, vae_dir, str(folder), state.tokens_dir, device=state.device)
            state.ran.add("DALL·E codes")  # DALL·E must start over on these codes
        self.subset = {
            "requested": self.dalle_subset,
            "rule": rule,
            "families": chosen,
            "names": seen,
            "family_count": len(chosen),
            "of_families": len({family_of(name) for name in split["train"]}),
            "val_icons": len(split["val"]),
            "seed": seed,
            "data": str(folder),
        }
        write_json(state.run_dir("dalle") / "subset.json", self.subset)
        print(f"DALL·E trains on {rule} ({len(seen)} icons) + validation icons: {folder}", file=sys.stderr)

    def dalle_args(self, state: PipelineState) -> list[str]:
        vae, tokens = str(state.run_dir("vae")), str(state.tokens_dir)
        return ["--data", str(self.dalle_data), "--vae", vae, "--tokens", tokens]

    def index_data(self, state: PipelineState) -> Path:
        return self.data / "val"

    def evaluate(self, state: PipelineState) -> dict[str, Any]:
        from .evaluation import evaluate_demo

        split, evaluation = self.split(), self.evaluation
        return evaluate_demo(
            state.out,
            self.data,
            seen_names=self.subset.get("names") or split["train"],
            val_names=split["val"],
            prompts=evaluation["prompts"],
            samples=evaluation["samples"],
            seed=evaluation["seed"],
            preset=Path(state.preset).stem,
            sampling=evaluation.get("sampling"),
            val_prompts=evaluation.get("val_prompts"),
        )

    def evaluation_done(self, state: PipelineState) -> bool:
        """OUT/eval.json exists and was made with the preset's evaluation settings (prompts per set, samples, seed,
        sampling): a preset whose eval section changed evaluates again."""
        from .evaluation import evaluation_settings

        path = state.out / "eval.json"
        if not path.exists():
            return False
        found, evaluation = read_json(path).get("settings", {}), self.evaluation
        wanted = evaluation_settings(
            evaluation["prompts"], evaluation["samples"], evaluation["seed"], evaluation.get("sampling"),
            evaluation.get("val_prompts"),
        )  # fmt: skip
        return all(found.get(key) == value for key, value in wanted.items())

    def write_report(self, state: PipelineState) -> Path:
        from .report import write_report

        return write_report(state.out)

    def summary(self, state: PipelineState) -> dict[str, Any]:
        return {
            "data": str(self.data),
            "dalle_data": self.subset.get("data"),
            "subset": "dalle/subset.json",
            "dalle_families": self.subset.get("family_count"),
        }
