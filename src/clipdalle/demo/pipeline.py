"""Multi-stage jobs: the demo (`make demo`, `clipdalle pipeline --preset demo|small|ml6 --out OUT`).

A pipeline preset (`configs/demo.json`) names the icon dataset, each model's preset plus overrides, the number of
icon families DALL·E trains on, the evaluation sizes and the expected time of each stage. The stages:

    1 icon dataset           DATA/icons-32px-8c (all 7,367 icons; rendering is deterministic, so it is shared)
    2 dVAE + CLIP training   OUT/vae and OUT/clip, two `clipdalle train` processes side by side (one thread each on
                             a 2-core machine: for small models that beats one 2-thread run after the other)
    3 dVAE evaluation        OUT/vae/eval.json and reconstructions.png
    4 DALL·E data            the chosen train families + all validation icons (DATA/icons-32px-8c-HASH), their dVAE
                             codes (OUT/dalle/tokens) and OUT/dalle/subset.json
    5 DALL·E training        OUT/dalle (with its own copy of the dVAE in OUT/dalle/vae)
    6 index                  OUT/index: CLIP embeddings of the validation icons, searchable with OUT/clip
    7 evaluation             OUT/eval.json and OUT/eval/*.png (evaluation.evaluate_demo)
    8 report                 OUT/report.html (report.write_report)

Each stage is a pair of plain functions of the run's `PipelineState`: `done(state)` (its outputs are complete) and
`run(state, restart)`. A stage whose outputs are complete is skipped, unless a stage it depends on ran again in this
invocation. A training stage that was interrupted resumes from its last checkpoint (`--resume`); `fresh=True`
starts over, removing OUT only when the pipeline made it (it holds the MARKER file), never a folder of the user's.
Training processes write OUT/logs/NAME.log; OUT/timings.json has every stage's seconds and OUT/summary.json points
at everything.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import checkpoint
from ..config import TrainConfig, build_config, load_preset
from ..data.icons import PALETTE, build_icons, common_icons, dominant_colour, family_of, is_complete
from ..data.loader import SampleStream, make_loader
from ..data.sources import open_source
from ..index import build_index
from ..io import LOCK_FILE, DirectoryLock, read_json, write_json
from ..models.dvae import perplexity, psnr
from ..runtime import resolve_device
from ..training.codes import build_code_cache, cache_is_current
from ..transforms import make_grid, save_image
from .jobs import LoadSampler, clear_run, run_jobs, train_job, training_finished

ETA_FACTOR_LIMITS = (0.25, 4.0)  # a machine 4x slower or faster than the preset's expected times is believable
MARKER = ".clipdalle-pipeline"  # written into OUT by the pipeline: `fresh` removes only a folder that holds it

# A pipeline preset's sections: the icons, the three models (preset + overrides; dalle also `families`), the
# evaluation sizes, the CPU threads to use (default: all cores) and the expected seconds of each stage (for the ETA).
PRESET_SECTIONS = ("description", "icons", "vae", "clip", "dalle", "eval", "threads", "expected_s")
SUBSET_KEYS = ("families", "common_icons")  # the dalle section's choice of training icons, besides model and train
PIPELINE_KEYS = ("oversample_dalle_icons",)  # a model section's pipeline settings, besides preset, model and train


# ------------------------------------------------------------------------------------------ configs


def model_and_train_configs(spec: dict[str, Any], model_config_class: type, prefix: str) -> tuple[Any, TrainConfig]:
    """A stage's configs: its model preset (`"preset": "demo"` -> configs/PREFIX-demo.json) plus overrides."""
    preset = load_preset(f"{prefix}-{spec['preset']}") if "preset" in spec else {}
    model_config = build_config(
        model_config_class, preset.get("model", {}), spec.get("model", {}), source=f"{prefix} stage"
    )
    train_config = build_config(TrainConfig, preset.get("train", {}), spec.get("train", {}), source=f"{prefix} stage")
    return model_config, train_config


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
    if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool) or threads < 1):
        raise ValueError(f"{name}: threads must be a positive integer (or absent: all cores), got {threads!r}")
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


def eta_seconds(expected: dict[str, float], measured: dict[str, float], remaining: list[str]) -> float | None:
    """Expected seconds of the `remaining` stages, scaled by how the stages measured so far compared with their
    expected times (clamped to ETA_FACTOR_LIMITS); None when the preset gives no expected times."""
    if not any(expected.get(name) for name in remaining):
        return None if remaining and not expected else 0.0
    pairs = [(seconds, expected[name]) for name, seconds in measured.items() if expected.get(name)]
    factor = sum(seconds for seconds, _ in pairs) / sum(wanted for _, wanted in pairs) if pairs else 1.0
    factor = min(ETA_FACTOR_LIMITS[1], max(ETA_FACTOR_LIMITS[0], factor))
    return factor * sum(expected.get(name, 0.0) for name in remaining)


# ------------------------------------------------------------------------------------------ the run's state


@dataclass
class PipelineState:
    """Everything the stages of one invocation read and write: the preset and its configs, where things go, and
    what ran (which makes the stages that depend on it run again)."""

    preset: str  # the pipeline preset's name or path
    spec: dict[str, Any]  # the preset's contents
    configs: dict[str, tuple[Any, TrainConfig]]  # "vae" | "clip" | "dalle" -> (model config, train config)
    out: Path  # OUT
    data_dir: Path  # where built-in datasets are rendered
    cores: int  # CPU threads to use
    device: torch.device  # for the stages run in this process (codes, index)
    subset: dict[str, Any] = field(default_factory=dict)  # OUT/dalle/subset.json: the families DALL·E trains on
    ran: set[str] = field(default_factory=set)  # stages and jobs that ran in this invocation
    job_seconds: dict[str, float] = field(default_factory=dict)  # each training process's wall time
    timings: dict[str, float] = field(default_factory=dict)  # stage name -> seconds, one entry per stage
    stage_log: list[dict[str, Any]] = field(default_factory=list)  # seconds and load average of each stage run

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
    def pair_threads(self) -> int:
        """Threads of each of two training processes sharing the cores (never more threads than cores)."""
        return max(1, self.cores // 2)

    def run_dir(self, name: str) -> Path:
        """OUT/vae, OUT/clip, OUT/dalle or OUT/index."""
        return self.out / name

    @property
    def tokens_dir(self) -> Path:
        return self.out / "dalle" / "tokens"

    @property
    def dalle_data(self) -> Path | None:
        return Path(self.subset["data"]) if self.subset.get("data") else None

    def split(self) -> dict[str, list[str]]:
        """The icon dataset's train and validation icon names (DATA/split.json)."""
        return read_json(self.data / "split.json")


# ------------------------------------------------------------------------------------------ the stages


def build_data(state: PipelineState, restart: bool) -> None:
    build_icons(state.data, size=state.icons["size"], colours=state.icons["colours"])


def data_done(state: PipelineState) -> bool:
    return is_complete(state.data, state.icons["size"], state.icons["colours"])


def train_pair(state: PipelineState, restart: bool) -> None:
    """The dVAE and CLIP, side by side, each on half the cores (or one alone on all of them)."""
    jobs = []
    for name, label, kind in (("dVAE training", "dVAE", "vae"), ("CLIP training", "CLIP", "clip")):
        run_dir = state.run_dir(kind)
        if not training_finished(run_dir):
            extra = ["--data", str(state.data)]
            repeats = state.spec.get(kind, {}).get("oversample_dalle_icons")
            if repeats:  # the icons DALL·E will draw, seen `repeats` times as often: what the CLIP must rerank
                extra += ["--extra-data", f"{dalle_folder(state)[0]}:{repeats}"]
            jobs.append(
                train_job(name, label, kind, run_dir, state.configs[kind], state.out, state.pair_threads, extra)
            )
    for job in jobs:
        job.threads = state.cores if len(jobs) == 1 else state.pair_threads
    run_jobs(jobs)
    for job in jobs:
        state.job_seconds[job.name] = job.seconds
        state.ran.add(job.name)


def pair_done(state: PipelineState) -> bool:
    return training_finished(state.run_dir("vae")) and training_finished(state.run_dir("clip"))


def evaluate_vae(state: PipelineState, restart: bool) -> None:
    vae_dir = state.run_dir("vae")
    results = evaluate_tokenizer_on_icons(vae_dir, state.data, state.icons["size"])
    write_json(vae_dir / "eval.json", results)
    print(
        f"dVAE on validation icons: PSNR {results['psnr']:.2f} dB, "
        f"right colour {100 * results['colour_accuracy']:.2f} %, "
        f"{results['codes_used']} of {results['vocab_size']} codes used",
        file=sys.stderr,
    )


def dalle_data_done(state: PipelineState) -> bool:
    folder = state.dalle_data
    return (
        folder is not None
        and state.subset.get("requested", "absent") == state.dalle_subset  # the preset's subset, not an older one
        and is_complete(folder, state.icons["size"], state.icons["colours"])
        and cache_is_current(state.tokens_dir, state.run_dir("vae"), str(folder))
    )


def dalle_folder(state: PipelineState) -> tuple[Path, list[str], str]:
    """(the dataset DALL·E trains on, its training icons, the rule that chose them): the preset's subset of the
    training icons plus every validation icon, rendered once (or the whole dataset when the subset is all of it)."""
    icons, split = state.icons, state.split()
    seen, rule = dalle_icons(split["train"], state.dalle_subset, state.evaluation["seed"])
    folder = state.data  # every training icon: the whole dataset
    if len(seen) < len(split["train"]):
        folder = state.data_dir / subset_folder_name(icons["size"], icons["colours"], seen + split["val"])
    if not is_complete(folder, icons["size"], icons["colours"]):
        build_icons(folder, size=icons["size"], colours=icons["colours"], names=seen + split["val"])
    return folder, seen, rule


def build_dalle_data(state: PipelineState, restart: bool) -> None:
    """The icons DALL·E trains on (`dalle_folder`) and their dVAE codes."""
    split, seed = state.split(), state.evaluation["seed"]
    folder, seen, rule = dalle_folder(state)
    chosen = sorted({family_of(name) for name in seen})
    vae_dir = state.run_dir("vae")
    if not cache_is_current(state.tokens_dir, vae_dir, str(folder)):
        vae = checkpoint.load_model(vae_dir, expect="dvae", device=state.device)
        build_code_cache(vae, vae_dir, str(folder), state.tokens_dir, device=state.device)
        state.ran.add("DALL·E codes")  # DALL·E must start over on these codes
    state.subset = {
        "requested": state.dalle_subset,
        "rule": rule,
        "families": chosen,
        "names": seen,
        "family_count": len(chosen),
        "of_families": len({family_of(name) for name in split["train"]}),
        "val_icons": len(split["val"]),
        "seed": seed,
        "data": str(folder),
    }
    write_json(state.run_dir("dalle") / "subset.json", state.subset)
    print(f"DALL·E trains on {rule} ({len(seen)} icons) + validation icons: {folder}", file=sys.stderr)


def train_dalle(state: PipelineState, restart: bool) -> None:
    dalle_dir = state.run_dir("dalle")
    if restart:
        clear_run(dalle_dir, keep=("tokens", "subset.json"))
    extra = ["--data", str(state.dalle_data), "--vae", str(state.run_dir("vae")), "--tokens", str(state.tokens_dir)]
    run_jobs([train_job("DALL·E training", "DALL·E", "dalle", dalle_dir, state.configs["dalle"], state.out,
                        state.cores, extra)])  # fmt: skip


def build_index_stage(state: PipelineState, restart: bool) -> None:
    index_dir = state.run_dir("index")
    if (index_dir / "info.json").exists():  # a complete index of an older CLIP: build_index would refuse it
        shutil.rmtree(index_dir)
    info = build_index(state.run_dir("clip"), state.data / "val", index_dir, device=str(state.device))
    print(f"index of {info['count']} validation icons: {index_dir}", file=sys.stderr)


def evaluate(state: PipelineState, restart: bool) -> None:
    from .evaluation import evaluate_demo

    split, evaluation = state.split(), state.evaluation
    metrics = evaluate_demo(
        state.out,
        state.data,
        seen_names=state.subset.get("names") or split["train"],
        val_names=split["val"],
        prompts=evaluation["prompts"],
        samples=evaluation["samples"],
        seed=evaluation["seed"],
        preset=Path(state.preset).stem,
        sampling=evaluation.get("sampling"),
    )
    write_json(state.out / "eval.json", metrics)


def report(state: PipelineState, restart: bool) -> None:
    from .report import write_report

    write_summary(state)
    write_report(state.out)


@dataclass
class Stage:
    name: str  # shown in the stage counter; a key of OUT/timings.json
    done: Callable[[PipelineState], bool]  # outputs complete: skip
    run: Callable[[PipelineState, bool], None]  # run(state, restart): restart when a stage it depends on ran again
    needs: tuple[str, ...] = ()  # stage or job names whose re-run makes this stage run again
    jobs: tuple[str, ...] = ()  # names of the jobs this stage may run, which other stages can need


def file_exists(*parts: str) -> Callable[[PipelineState], bool]:
    """A `done` test: OUT/parts... exists."""
    return lambda state: state.out.joinpath(*parts).exists()


STAGES = [
    Stage("icon dataset", data_done, build_data),
    Stage("dVAE + CLIP training", pair_done, train_pair, jobs=("dVAE training", "CLIP training")),
    Stage("dVAE evaluation", file_exists("vae", "eval.json"), evaluate_vae, ("dVAE training",)),
    Stage("DALL·E data", dalle_data_done, build_dalle_data, jobs=("DALL·E codes",)),
    Stage("DALL·E training", lambda state: training_finished(state.run_dir("dalle")), train_dalle, ("DALL·E codes",)),
    Stage("index", file_exists("index", "info.json"), build_index_stage, ("CLIP training",)),
    Stage("evaluation", file_exists("eval.json"), evaluate, ("dVAE training", "CLIP training", "DALL·E training")),
    Stage("report", file_exists("report.html"), report, ("dVAE evaluation", "DALL·E data", "index", "evaluation")),
]


# ------------------------------------------------------------------------------------------ the driver


def prepare_out(out: Path, fresh: bool) -> DirectoryLock:
    """Creates OUT with the pipeline's MARKER and returns its lock, held (one pipeline per OUT); with `fresh`, first
    empties an OUT the pipeline made, and refuses to touch a non-empty folder it did not make."""
    if fresh and out.exists() and not (out / MARKER).is_file():
        raise ValueError(
            f"{out}: --fresh removes only a folder the pipeline made (one holding {MARKER}), and the pipeline did "
            "not make this one: nothing was deleted; choose a new --out or empty it yourself"
        )
    if out.exists() and any(out.iterdir()) and not (out / MARKER).is_file():
        raise ValueError(
            f"{out}: is a folder the pipeline did not make and it is not empty; choose a new or empty --out"
        )
    lock = DirectoryLock(out, "run a pipeline").acquire()  # before deleting: another pipeline may be using OUT
    if fresh:
        for entry in out.iterdir():
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            elif entry.name != LOCK_FILE:
                entry.unlink()
    (out / MARKER).write_text("made by clipdalle pipeline; `--fresh` may delete this folder\n")
    return lock


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


def open_state(preset: str, out: Path, data_dir: Path) -> PipelineState:
    """The state of a run in `out`, with what an earlier invocation recorded there."""
    spec, configs = checked_preset(preset)
    earlier = _read_if_present(out / "summary.json")
    return PipelineState(
        preset=preset,
        spec=spec,
        configs=configs,
        out=out,
        data_dir=data_dir,
        cores=spec.get("threads") or os.cpu_count() or 1,
        device=resolve_device(configs["dalle"][1].device),
        subset=_read_if_present(out / "dalle" / "subset.json"),
        job_seconds=earlier.get("jobs_s", {}),
        timings=_read_if_present(out / "timings.json"),
        stage_log=earlier.get("stages", []),
    )


def run_pipeline(preset: str, out: str | Path, *, fresh: bool = False, data_dir: str | Path = "data") -> Path:
    """Runs every stage of a pipeline preset into `out` and returns the path of its summary (OUT/summary.json)."""
    out = Path(out)
    checked_preset(preset)  # a preset that cannot run here fails before anything is touched
    with prepare_out(out, fresh):
        return run_stages(preset, out, Path(data_dir))


def run_stages(preset: str, out: Path, data_dir: Path) -> Path:
    """The stages of `run_pipeline` in a prepared OUT: those not yet done, and those whose inputs changed."""
    state = open_state(preset, out, data_dir)
    expected = {name: float(seconds) for name, seconds in state.spec.get("expected_s", {}).items()}
    measured: dict[str, float] = {}
    started = time.perf_counter()
    first_training: float | None = None
    for number, stage in enumerate(STAGES, 1):
        prefix = f"[{number}/{len(STAGES)}] {stage.name}"
        restart = any(name in state.ran for name in stage.needs)
        if not restart and stage.done(state):
            print(f"{prefix}: complete, skipped", file=sys.stderr)
            state.timings.setdefault(stage.name, 0.0)
            continue
        elapsed = time.perf_counter() - started
        eta = eta_seconds(expected, measured, stages_to_run(STAGES[number - 1 :], state))
        eta_text = f", about {eta / 60:.1f} min to go" if eta is not None else ""
        print(f"{prefix} ({elapsed / 60:.1f} min so far{eta_text})", file=sys.stderr)
        if first_training is None and "training" in stage.name:
            first_training = time.perf_counter()
        stage_start = time.perf_counter()
        with LoadSampler() as load:
            stage.run(state, restart)
        seconds = round(time.perf_counter() - stage_start, 1)
        state.timings[stage.name] = measured[stage.name] = seconds
        state.ran.add(stage.name)
        state.stage_log = [entry for entry in state.stage_log if entry["name"] != stage.name]
        state.stage_log.append({"name": stage.name, "seconds": seconds, "load_average": load.summary()})
        write_json(out / "timings.json", state.timings)
    path = write_summary(state)
    total = time.perf_counter() - started
    since_training = "" if first_training is None else f"; {(time.perf_counter() - first_training) / 60:.1f} min"
    print(f"pipeline finished in {total / 60:.1f} min{since_training} from the first training stage", file=sys.stderr)
    if (out / "report.html").exists():
        print(f"report: {out / 'report.html'}", file=sys.stderr)
    print(f"explore the models: clipdalle serve {out}", file=sys.stderr)
    return path


def write_summary(state: PipelineState) -> Path:
    out = state.out
    summary = {
        "preset": state.preset,
        "description": state.spec.get("description", ""),
        "out": str(out),
        "data": str(state.data),
        "dalle_data": state.subset.get("data"),
        "runs": {"vae": "vae", "clip": "clip", "dalle": "dalle"},
        "index": "index",
        "subset": "dalle/subset.json",
        "eval": "eval.json",
        "report": "report.html",
        "timings": "timings.json",
        "logs": sorted(str(path.relative_to(out)) for path in (out / "logs").glob("*.log")),
        "timings_s": state.timings,
        "jobs_s": state.job_seconds,
        "stages": state.stage_log,
        "vae": _read_if_present(state.run_dir("vae") / "eval.json"),
        "dalle_families": state.subset.get("family_count"),
        "threads": {"cores": state.cores, "parallel_training": state.pair_threads},
        "serve": f"clipdalle serve {out}",
    }
    return write_json(out / "summary.json", summary)


def stages_to_run(stages: list[Stage], state: PipelineState) -> list[str]:
    """Names of the stages that will run: the first one, and each later one that is not done or depends on a stage
    that will run (with all of its jobs: "dVAE + CLIP training" may re-run both)."""
    will_run = set(state.ran)
    names = []
    for position, stage in enumerate(stages):
        if position == 0 or any(name in will_run for name in stage.needs) or not stage.done(state):
            names.append(stage.name)
            will_run.add(stage.name)
            will_run.update(stage.jobs)
    return names


@torch.no_grad()
def evaluate_tokenizer_on_icons(vae_dir: Path, data: Path, image_size: int, batch_size: int = 256) -> dict[str, Any]:
    """Round-trips every validation icon through the dVAE: PSNR, code usage, and the colour judge of the demo
    (dominant non-white colour of the reconstruction equals the icon's colour)."""
    model = checkpoint.load_model(vae_dir, expect="dvae")
    colours = list(PALETTE)
    stream = SampleStream(
        open_source(data / "val", captions="none"),
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
        psnr_sum += float(psnr(reconstructions, images).sum())
        truth = torch.tensor([colours.index(key.rsplit("__", 1)[-1]) for key in batch["keys"]])
        right += int((dominant_colour(reconstructions) == truth).sum())
        total += len(images)
        if len(shown) < 2:
            shown.append(torch.stack([images[:16], reconstructions[:16]], 1).flatten(0, 1))  # (32, 3, H, W) pairs
    if total == 0:
        raise ValueError(f"{data / 'val'}: no validation images")
    save_image(make_grid(torch.cat(shown), n_col=16), vae_dir / "reconstructions.png")
    return {
        "images": total,
        "psnr": psnr_sum / total,
        "colour_accuracy": right / total,
        "codes_used": int((usage > 0).sum()),
        "vocab_size": model.config.vocab_size,
        "perplexity": perplexity(usage),
    }


def _read_if_present(path: Path) -> dict[str, Any]:
    return read_json(path) if path.exists() else {}
