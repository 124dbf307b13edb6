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
    7 evaluation             OUT/eval.json and OUT/eval/*.png (demo_eval.evaluate_demo)
    8 report                 OUT/report.html (report.write_report)

A stage whose outputs are complete is skipped, unless a stage it depends on ran again in this invocation. A
training stage that was interrupted resumes from its last checkpoint (`--resume`); `fresh=True` removes OUT first.
Training processes write OUT/logs/NAME.log; OUT/timings.json has every stage's seconds and OUT/summary.json points
at everything.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import random
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import checkpoint
from ..config import TrainConfig, build_config, load_preset, to_dict
from ..runtime import resolve_device

ETA_FACTOR_LIMITS = (0.25, 4.0)  # a machine 4x slower or faster than the preset's expected times is believable
LOAD_SAMPLE_SECONDS = 10.0  # how often the load average is sampled while a stage runs
PROGRESS_LOG_SECONDS = 10.0  # a training log keeps one progress-bar line per 10 s (the bar itself redraws 10x/s)
ERROR_TAIL_LINES = 30  # lines of a failed process's output searched for its one-line error


# A pipeline preset's sections: the icons, the three models (preset + overrides; dalle also `families`), the
# evaluation sizes, the CPU threads to use (default: all cores) and the expected seconds of each stage (for the ETA).
PRESET_SECTIONS = ("description", "icons", "vae", "clip", "dalle", "eval", "threads", "expected_s")


class StageFailed(ValueError):
    """A stage's process failed; the message is its one-line error and where its log is."""


@dataclass
class Stage:
    name: str  # shown in the stage counter; a key of OUT/timings.json
    done: Callable[[], bool]  # outputs complete: skip
    run: Callable[[bool], None]  # run(restart): restart=True when a stage it depends on ran again
    needs: tuple[str, ...] = ()  # stage or job names whose re-run makes this stage run again
    jobs: tuple[str, ...] = ()  # names of the jobs this stage may run, which other stages can need


@dataclass
class Job:
    """One `clipdalle` command run as a child process with its own thread count, log file and progress bar."""

    name: str  # e.g. "dVAE training"; a key of summary.json's jobs_s and of Stage.needs
    label: str  # the progress bar's title
    argv: list[str]  # arguments of `clipdalle`
    log: Path  # the child's whole output (progress bars thinned to one line per PROGRESS_LOG_SECONDS)
    threads: int  # OpenMP threads of the child
    steps: int  # the run's optimizer steps: the progress bar's total
    initial: int = 0  # steps already done (resuming)
    seconds: float = 0.0  # wall time, set when the job ends
    tail: collections.deque = field(default_factory=lambda: collections.deque(maxlen=ERROR_TAIL_LINES))


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
        "clip": model_and_train_configs(spec.get("clip", {}), CLIPConfig, "clip"),
        "dalle": model_and_train_configs(
            {key: value for key, value in spec.get("dalle", {}).items() if key != "families"}, DALLEConfig, "dalle"
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
    from ..data.icons import family_of

    families = sorted({family_of(name) for name in train_names})
    if count is None or count >= len(families):
        return families
    if count < 1:
        raise ValueError(f"dalle families: expected a positive number of icon families (or null for all), got {count}")
    return sorted(random.Random(seed).sample(families, count))


def subset_folder_name(size: int, colours: int, names: list[str]) -> str:
    """icons-32px-8c-HASH: the hash of the icon names tells subsets apart, so each is rendered once."""
    digest = hashlib.sha1("\n".join(sorted(names)).encode("utf-8")).hexdigest()[:8]
    return f"icons-{size}px-{colours}c-{digest}"


# ------------------------------------------------------------------------------------------ time and load


def eta_seconds(expected: dict[str, float], measured: dict[str, float], remaining: list[str]) -> float | None:
    """Expected seconds of the `remaining` stages, scaled by how the stages measured so far compared with their
    expected times (clamped to ETA_FACTOR_LIMITS); None when the preset gives no expected times."""
    if not any(expected.get(name) for name in remaining):
        return None if remaining and not expected else 0.0
    pairs = [(seconds, expected[name]) for name, seconds in measured.items() if expected.get(name)]
    factor = sum(seconds for seconds, _ in pairs) / sum(wanted for _, wanted in pairs) if pairs else 1.0
    factor = min(ETA_FACTOR_LIMITS[1], max(ETA_FACTOR_LIMITS[0], factor))
    return factor * sum(expected.get(name, 0.0) for name in remaining)


class LoadSampler:
    """Samples the 1-minute load average every LOAD_SAMPLE_SECONDS in a thread while a stage runs."""

    def __init__(self) -> None:
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while True:
            self.samples.append(os.getloadavg()[0])
            if self._stop.wait(LOAD_SAMPLE_SECONDS):
                return

    def __enter__(self) -> LoadSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.samples.append(os.getloadavg()[0])

    def summary(self) -> dict[str, float]:
        return {"mean": round(sum(self.samples) / len(self.samples), 2), "max": round(max(self.samples), 2)}


# ------------------------------------------------------------------------------------------ child processes


PROGRESS = re.compile(r"(\d+)/(\d+) \[")  # tqdm's "  12%|█▏   | 180/1500 [00:31<..." in a child's output


def one_line_error(lines: list[str]) -> str:
    """The message a failed `clipdalle` process gave: its `error: ...` line, else its last line (a traceback's)."""
    for line in reversed(lines):
        if line.startswith("error: "):
            return line[len("error: ") :]
    return next((line for line in reversed(lines) if line.strip()), "no output")


def _follow(process: subprocess.Popen, job: Job, bar: Any) -> None:
    """Copies a child's output to its log and moves its progress bar (runs in a thread until the pipe closes)."""
    pending = ""
    last_progress = 0.0
    with open(job.log, "a", encoding="utf-8") as log:
        for chunk in iter(lambda: process.stdout.read1(65536), b""):
            pieces = re.split(r"[\r\n]", pending + chunk.decode("utf-8", errors="replace"))
            pending = pieces.pop()
            for piece in pieces:
                match = PROGRESS.search(piece)
                if match and int(match.group(2)) == job.steps:
                    bar.update(int(match.group(1)) - bar.n)  # through update(), so the bar's rate and ETA work
                    if time.monotonic() - last_progress < PROGRESS_LOG_SECONDS and bar.n < job.steps:
                        continue
                    last_progress = time.monotonic()
                if piece.strip():
                    log.write(piece.rstrip() + "\n")
                    log.flush()
                    if not match:
                        job.tail.append(piece.rstrip())
        if pending.strip():
            log.write(pending.rstrip() + "\n")
            job.tail.append(pending.rstrip())


def run_jobs(jobs: list[Job]) -> None:
    """Runs `clipdalle` jobs side by side, each with its own progress bar; sets each job's `seconds`. If one fails,
    the others are stopped and StageFailed carries its one-line error."""
    from tqdm import tqdm

    started: list[tuple[Job, subprocess.Popen, threading.Thread, Any, float]] = []
    try:
        for position, job in enumerate(jobs):
            if job.initial:
                print(f"{job.name}: resuming from step {job.initial} of {job.steps}", file=sys.stderr)
            job.log.parent.mkdir(parents=True, exist_ok=True)
            with open(job.log, "a", encoding="utf-8") as log:
                log.write(f"$ clipdalle {' '.join(job.argv)}  (OMP_NUM_THREADS={job.threads})\n")
            threads = str(job.threads)
            environment = {
                **os.environ,
                "OMP_NUM_THREADS": threads,
                "MKL_NUM_THREADS": threads,
                "PYTHONUNBUFFERED": "1",
            }
            process = subprocess.Popen(
                [sys.executable, "-m", "clipdalle.cli", *job.argv],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                env=environment,
            )
            bar = tqdm(
                total=job.steps,
                initial=job.initial,
                desc=job.label,
                position=position,
                unit="step",
                dynamic_ncols=True,
                file=sys.stderr,
            )
            follower = threading.Thread(target=_follow, args=(process, job, bar), daemon=True)
            follower.start()
            started.append((job, process, follower, bar, time.perf_counter()))
        waiting = list(started)
        while waiting:
            time.sleep(0.2)
            for entry in list(waiting):
                job, process, follower, bar, start = entry
                code = process.poll()
                if code is None:
                    continue
                follower.join()
                job.seconds = round(time.perf_counter() - start, 1)
                waiting.remove(entry)
                if code != 0:
                    raise StageFailed(f"{job.name} failed: {one_line_error(list(job.tail))} (log: {job.log})")
    finally:
        for _, process, follower, bar, _ in started:
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
            follower.join(timeout=5)
            if not follower.is_alive():  # the follower reads the pipe until EOF; closing it under it would race
                process.stdout.close()
            bar.close()


def train_job(
    name: str,
    label: str,
    kind: str,
    run_dir: Path,
    configs: tuple[Any, TrainConfig],
    out: Path,
    threads: int,
    extra: list[str],
) -> Job:
    """A `clipdalle train KIND` job for a pipeline stage: the composed preset is written to OUT/logs/KIND.json and the
    run always gets `--resume`, which starts a new run when there is no checkpoint yet."""
    model_config, train_config = configs
    preset = checkpoint.write_json(
        out / "logs" / f"{kind}-preset.json", {"model": to_dict(model_config), "train": to_dict(train_config)}
    )
    initial, steps = 0, train_config.steps
    if (run_dir / checkpoint.TRAIN_STATE_FILE).exists():  # --resume continues with the run's own config
        initial = checkpoint.checkpoint_step(run_dir)
        steps = checkpoint.read_config(run_dir).get("train", {}).get("steps", steps)
    argv = ["train", kind, "--out", str(run_dir), "--preset", str(preset), "--resume", *extra]
    return Job(name, label, argv, out / "logs" / f"{kind}.log", threads, steps, initial)


def training_finished(run_dir: Path) -> bool:
    """The run reached the last step of its own training config."""
    if not (run_dir / checkpoint.CONFIG_FILE).exists() or not (run_dir / checkpoint.TRAIN_STATE_FILE).exists():
        return False
    steps = checkpoint.read_config(run_dir).get("train", {}).get("steps")
    return steps is not None and checkpoint.checkpoint_step(run_dir) >= steps


def clear_run(run_dir: Path, keep: tuple[str, ...] = ()) -> None:
    """Removes a run directory's contents except the names in `keep` (a restart after its inputs changed)."""
    if not run_dir.exists():
        return
    for path in run_dir.iterdir():
        if path.name in keep:
            continue
        shutil.rmtree(path) if path.is_dir() else path.unlink()


# ------------------------------------------------------------------------------------------ the pipeline


def run_pipeline(preset: str, out: str | Path, *, fresh: bool = False, data_dir: str | Path = "data") -> Path:
    """Runs every stage of a pipeline preset into `out` and returns the path of its summary (OUT/summary.json)."""
    spec = load_preset(preset)
    configs = pipeline_configs(spec, preset)
    wanted = {train.device for _, train in configs.values()}
    if any(name.startswith("cuda") for name in wanted) and not torch.cuda.is_available():
        raise ValueError(
            f"preset {preset} trains on {', '.join(sorted(wanted))} but CUDA is not available on this machine; "
            "use a CPU preset (demo, small) or install the CUDA build of torch==2.13.0"
        )
    out = Path(out)
    if fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    icons = icon_settings(spec)
    data = Path(data_dir) / f"icons-{icons['size']}px-{icons['colours']}c"
    vae_dir, clip_dir, dalle_dir, index_dir = out / "vae", out / "clip", out / "dalle", out / "index"
    tokens_dir = dalle_dir / "tokens"
    families = spec.get("dalle", {}).get("families")
    evaluation = {"prompts": 128, "samples": 16, "seed": 0, **spec.get("eval", {})}
    cores = spec.get("threads") or os.cpu_count() or 1
    pair_threads = max(1, cores // 2)  # two training processes share the cores; never more threads than cores
    subset: dict[str, Any] = _read_json(dalle_dir / "subset.json")
    device = resolve_device(configs["dalle"][1].device)  # for the stages run in this process (codes, index)

    def build_data(restart: bool) -> None:
        from ..data.icons import build_icons

        build_icons(data, size=icons["size"], colours=icons["colours"])

    def train_pair(restart: bool) -> None:
        jobs = []
        if not training_finished(vae_dir):
            jobs.append(train_job("dVAE training", "dVAE", "vae", vae_dir, configs["vae"], out, pair_threads,
                                  ["--data", str(data)]))  # fmt: skip
        if not training_finished(clip_dir):
            jobs.append(train_job("CLIP training", "CLIP", "clip", clip_dir, configs["clip"], out, pair_threads,
                                  ["--data", str(data)]))  # fmt: skip
        for job in jobs:
            job.threads = cores if len(jobs) == 1 else pair_threads
        run_jobs(jobs)
        for job in jobs:
            job_seconds[job.name] = job.seconds
            ran.add(job.name)

    def evaluate_vae_stage(restart: bool) -> None:
        results = evaluate_tokenizer_on_icons(vae_dir, data, icons["size"])
        checkpoint.write_json(vae_dir / "eval.json", results)
        print(
            f"dVAE on validation icons: PSNR {results['psnr']:.2f} dB, "
            f"right colour {100 * results['colour_accuracy']:.2f} %, "
            f"{results['codes_used']} of {results['vocab_size']} codes used",
            file=sys.stderr,
        )

    def dalle_data_folder() -> Path | None:
        return Path(subset["data"]) if subset.get("data") else None

    def dalle_data_done() -> bool:
        from ..data.icons import is_complete
        from ..training.codes import cache_is_current

        folder = dalle_data_folder()
        return (
            folder is not None
            and subset.get("requested_families", "absent") == families  # the preset's subset, not an older one
            and is_complete(folder, icons["size"], icons["colours"])
            and cache_is_current(tokens_dir, vae_dir, str(folder))
        )

    def build_dalle_data(restart: bool) -> None:
        from ..data.icons import build_icons, family_of, is_complete
        from ..training.codes import build_code_cache, cache_is_current

        split = json.loads((data / "split.json").read_text())
        chosen = choose_families(split["train"], families, seed=evaluation["seed"])
        chosen_set = set(chosen)
        seen = [name for name in split["train"] if family_of(name) in chosen_set]
        folder = data  # every training family: the whole dataset
        if len(seen) < len(split["train"]):
            folder = Path(data_dir) / subset_folder_name(icons["size"], icons["colours"], seen + split["val"])
        if not is_complete(folder, icons["size"], icons["colours"]):
            build_icons(folder, size=icons["size"], colours=icons["colours"], names=seen + split["val"])
        if not cache_is_current(tokens_dir, vae_dir, str(folder)):
            vae = checkpoint.load_model(vae_dir, expect="dvae", device=device)
            build_code_cache(vae, vae_dir, str(folder), tokens_dir, device=device)
            ran.add("DALL·E codes")  # DALL·E must start over on these codes
        subset.clear()
        subset.update({
            "requested_families": families,
            "families": chosen,
            "names": seen,
            "family_count": len(chosen),
            "of_families": len({family_of(name) for name in split["train"]}),
            "val_icons": len(split["val"]),
            "seed": evaluation["seed"],
            "data": str(folder),
        })  # fmt: skip
        checkpoint.write_json(dalle_dir / "subset.json", subset)
        print(f"DALL·E trains on {len(chosen)} families ({len(seen)} icons) + validation icons: {folder}",
              file=sys.stderr)  # fmt: skip

    def train_dalle_stage(restart: bool) -> None:
        if restart:
            clear_run(dalle_dir, keep=("tokens", "subset.json"))
        extra = ["--data", str(dalle_data_folder()), "--vae", str(vae_dir), "--tokens", str(tokens_dir)]
        job = train_job("DALL·E training", "DALL·E", "dalle", dalle_dir, configs["dalle"], out, cores, extra)
        run_jobs([job])

    def build_index_stage(restart: bool) -> None:
        from ..index import build_index

        if (index_dir / "info.json").exists():  # a complete index of an older CLIP: build_index would refuse it
            shutil.rmtree(index_dir)
        info = build_index(clip_dir, data / "val", index_dir, device=str(device))
        print(f"index of {info['count']} validation icons: {index_dir}", file=sys.stderr)

    def evaluate_stage(restart: bool) -> None:
        from .evaluation import evaluate_demo

        split = json.loads((data / "split.json").read_text())
        metrics = evaluate_demo(
            out,
            data,
            seen_names=subset.get("names") or split["train"],
            val_names=split["val"],
            prompts=evaluation["prompts"],
            samples=evaluation["samples"],
            seed=evaluation["seed"],
            preset=Path(preset).stem,
            sampling=evaluation.get("sampling"),
        )
        checkpoint.write_json(out / "eval.json", metrics)

    def report_stage(restart: bool) -> None:
        from .report import write_report

        write_summary()
        write_report(out)

    from ..data.icons import is_complete

    stages = [
        Stage("icon dataset", lambda: is_complete(data, icons["size"], icons["colours"]), build_data),
        Stage(
            "dVAE + CLIP training",
            lambda: training_finished(vae_dir) and training_finished(clip_dir),
            train_pair,
            jobs=("dVAE training", "CLIP training"),
        ),
        Stage("dVAE evaluation", lambda: (vae_dir / "eval.json").exists(), evaluate_vae_stage, ("dVAE training",)),
        Stage("DALL·E data", dalle_data_done, build_dalle_data, jobs=("DALL·E codes",)),
        Stage("DALL·E training", lambda: training_finished(dalle_dir), train_dalle_stage, ("DALL·E codes",)),
        Stage("index", lambda: (index_dir / "info.json").exists(), build_index_stage, ("CLIP training",)),
        Stage(
            "evaluation",
            lambda: (out / "eval.json").exists(),
            evaluate_stage,
            ("dVAE training", "CLIP training", "DALL·E training"),
        ),  # fmt: skip
        Stage(
            "report",
            lambda: (out / "report.html").exists(),
            report_stage,
            ("dVAE evaluation", "DALL·E data", "index", "evaluation"),
        ),  # fmt: skip
    ]
    expected = {name: float(seconds) for name, seconds in spec.get("expected_s", {}).items()}
    timings = _read_json(out / "timings.json")  # stage name -> seconds, one entry per stage (they add up)
    earlier = _read_json(out / "summary.json")
    stage_log: list[dict[str, Any]] = earlier.get("stages", [])
    job_seconds: dict[str, float] = earlier.get("jobs_s", {})  # each training process of a stage
    ran: set[str] = set()
    measured: dict[str, float] = {}
    started = time.perf_counter()
    first_training: float | None = None

    def write_summary() -> Path:
        summary = {
            "preset": preset,
            "description": spec.get("description", ""),
            "out": str(out),
            "data": str(data),
            "dalle_data": subset.get("data"),
            "runs": {"vae": "vae", "clip": "clip", "dalle": "dalle"},
            "index": "index",
            "subset": "dalle/subset.json",
            "eval": "eval.json",
            "report": "report.html",
            "timings": "timings.json",
            "logs": sorted(str(path.relative_to(out)) for path in (out / "logs").glob("*.log")),
            "timings_s": timings,
            "jobs_s": job_seconds,
            "stages": stage_log,
            "vae": _read_json(vae_dir / "eval.json"),
            "dalle_families": subset.get("family_count"),
            "threads": {"cores": cores, "parallel_training": pair_threads},
            "serve": f"clipdalle serve {out}",
        }
        return checkpoint.write_json(out / "summary.json", summary)

    for number, stage in enumerate(stages, 1):
        prefix = f"[{number}/{len(stages)}] {stage.name}"
        restart = any(name in ran for name in stage.needs)
        if not restart and stage.done():
            print(f"{prefix}: complete, skipped", file=sys.stderr)
            timings.setdefault(stage.name, 0.0)
            continue
        elapsed = time.perf_counter() - started
        eta = eta_seconds(expected, measured, stages_to_run(stages[number - 1 :], ran))
        eta_text = f", about {eta / 60:.1f} min to go" if eta is not None else ""
        print(f"{prefix} ({elapsed / 60:.1f} min so far{eta_text})", file=sys.stderr)
        if first_training is None and "training" in stage.name:
            first_training = time.perf_counter()
        stage_start = time.perf_counter()
        with LoadSampler() as load:
            stage.run(restart)
        seconds = round(time.perf_counter() - stage_start, 1)
        timings[stage.name] = measured[stage.name] = seconds
        ran.add(stage.name)
        stage_log = [entry for entry in stage_log if entry["name"] != stage.name]
        stage_log.append({"name": stage.name, "seconds": seconds, "load_average": load.summary()})
        checkpoint.write_json(out / "timings.json", timings)
    path = write_summary()
    total = time.perf_counter() - started
    since_training = "" if first_training is None else f"; {(time.perf_counter() - first_training) / 60:.1f} min"
    print(f"pipeline finished in {total / 60:.1f} min{since_training} from the first training stage", file=sys.stderr)
    if (out / "report.html").exists():
        print(f"report: {out / 'report.html'}", file=sys.stderr)
    print(f"explore the models: clipdalle serve {out}", file=sys.stderr)
    return path


def stages_to_run(stages: list[Stage], ran: set[str]) -> list[str]:
    """Names of the stages that will run: the first one, and each later one that is not done or depends on a stage
    that will run (with all of its jobs: "dVAE + CLIP training" may re-run both)."""
    will_run = set(ran)
    names = []
    for position, stage in enumerate(stages):
        if position == 0 or any(name in will_run for name in stage.needs) or not stage.done():
            names.append(stage.name)
            will_run.add(stage.name)
            will_run.update(stage.jobs)
    return names


@torch.no_grad()
def evaluate_tokenizer_on_icons(vae_dir: Path, data: Path, image_size: int, batch_size: int = 256) -> dict[str, Any]:
    """Round-trips every validation icon through the dVAE: PSNR, code usage, and the colour judge of the demo
    (dominant non-white colour of the reconstruction equals the icon's colour)."""
    from ..data.icons import PALETTE, dominant_colour
    from ..data.loader import SampleStream, make_loader
    from ..data.sources import open_source
    from ..transforms import make_grid, save_image

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
