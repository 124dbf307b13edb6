"""Multi-stage jobs: the demo (`make demo`, `clipdalle pipeline --preset demo|small|ml6 --out OUT`) and the same job on
any collection (`clipdalle pipeline --data DIR --budget 25m --out OUT`).

The stages, the same for every collection (demo/collection.py; the icons: demo/icon_collection.py, a folder, shards
or manifest of one's own: demo/folder_collection.py):

    1 data                   the icon dataset (rendered once, shared), or the data report and its split
    2 dVAE + CLIP training   OUT/vae and OUT/clip, two `clipdalle train` processes side by side (one thread each on
                             a 2-core machine: for small models that beats one 2-thread run after the other)
    3 dVAE evaluation        OUT/vae/eval.json and reconstructions.png
    4 DALL·E data            the dVAE's codes of DALL·E's data (OUT/dalle/tokens)
    5 DALL·E training        OUT/dalle (with its own copy of the dVAE in OUT/dalle/vae)
    6 index                  OUT/index: CLIP embeddings, searchable with OUT/clip
    7 evaluation             OUT/eval.json and OUT/eval/*.png
    8 report                 OUT/report.html

Each stage is a pair of plain functions of the run's `PipelineState`: `done(state)` (its outputs are complete) and
`run(state, restart)`. A stage whose outputs are complete is skipped, unless a stage it depends on ran again in this
invocation. A training stage that was interrupted resumes from its last checkpoint (`--resume`); `fresh=True`
starts over, removing OUT only when the pipeline made it (it holds the MARKER file), never a folder of the user's.
The dVAE's and CLIP's data arguments are recorded in RUN/pipeline-inputs.json; when they change (another preset's
extra data, another data folder), or when the preset's model or training settings differ from those in the run's
own config.json, that model trains again from the start and the stages after it run again; so does the icons'
DALL·E (a folder collection's DALL·E is sized again at its start, so its config is its own). The icons' evaluation
runs again when OUT/eval.json was made with other evaluation settings than the preset's.
Training processes write OUT/logs/NAME.log; OUT/timings.json has every stage's seconds and OUT/summary.json points
at everything.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .. import checkpoint, hub
from ..config import to_dict
from ..index import build_index
from ..io import LOCK_FILE, DirectoryLock, read_json, write_json
from ..runtime import resolve_device
from .collection import Collection, PipelineState
from .icon_collection import IconCollection, checked_preset
from .jobs import LoadSampler, clear_run, run_jobs, train_job, training_finished

ETA_FACTOR_LIMITS = (0.25, 4.0)  # a machine 4x slower or faster than the preset's expected times is believable
MARKER = ".clipdalle-pipeline"  # written into OUT by the pipeline: `fresh` removes only a folder that holds it
INPUTS_FILE = "pipeline-inputs.json"  # RUN/...: the data arguments a dVAE or CLIP run was trained on
SETTINGS_CHANGED = f"was trained with other model or training settings ({checkpoint.CONFIG_FILE})"


def eta_seconds(expected: dict[str, float], measured: dict[str, float], remaining: list[str]) -> float | None:
    """Expected seconds of the `remaining` stages, scaled by how the stages measured so far compared with their
    expected times (clamped to ETA_FACTOR_LIMITS); None when the preset gives no expected times."""
    if not any(expected.get(name) for name in remaining):
        return None if remaining and not expected else 0.0
    pairs = [(seconds, expected[name]) for name, seconds in measured.items() if expected.get(name)]
    factor = sum(seconds for seconds, _ in pairs) / sum(wanted for _, wanted in pairs) if pairs else 1.0
    factor = min(ETA_FACTOR_LIMITS[1], max(ETA_FACTOR_LIMITS[0], factor))
    return factor * sum(expected.get(name, 0.0) for name in remaining)


# ------------------------------------------------------------------------------------------ the stages


def inputs_current(run_dir: Path, args: list[str]) -> bool:
    """The run in `run_dir` was trained (or started) on these data arguments (`INPUTS_FILE`)."""
    return _read_if_present(run_dir / INPUTS_FILE).get("args") == args


def settings_current(run_dir: Path, configs: tuple[Any, Any]) -> bool:
    """The run in `run_dir` has no checkpoint yet, or its config.json holds these (model, train) configs' settings
    (a resumed run continues with its own config, so a changed preset would otherwise be ignored)."""
    if not (run_dir / checkpoint.CONFIG_FILE).exists():
        return True
    saved = checkpoint.read_config(run_dir)
    wanted = json.loads(json.dumps({"model": to_dict(configs[0]), "train": to_dict(configs[1])}))  # as JSON reads
    found = {"model": saved.get("model"), "train": dict(saved.get("train") or {})}
    if wanted["train"].get("epochs", 0) > 0:  # training derives its steps from the epochs (recipes.with_epochs)
        found["train"].pop("steps", None)
        wanted["train"].pop("steps", None)
    return found == wanted


def trained_on(run_dir: Path, args: list[str], configs: tuple[Any, Any]) -> bool:
    """The run in `run_dir` finished training on these data arguments and with these settings."""
    return training_finished(run_dir) and inputs_current(run_dir, args) and settings_current(run_dir, configs)


def stale_reason(run_dir: Path, args: list[str], configs: tuple[Any, Any]) -> str | None:
    """Why a started run in `run_dir` cannot be continued with these data arguments and settings (None: it can)."""
    if not run_dir.is_dir() or not any(run_dir.iterdir()):
        return None
    if not (run_dir / INPUTS_FILE).exists():
        return f"does not record the data arguments it was trained on ({INPUTS_FILE})"
    if not inputs_current(run_dir, args):
        return "was trained on other data arguments"
    if not settings_current(run_dir, configs):
        return SETTINGS_CHANGED
    return None


def train_pair(state: PipelineState, restart: bool) -> None:
    """The dVAE and CLIP, side by side, each on its share of the cores (or one alone on all of them); only the dVAE
    when the collection's CLIP exists already. A run begun on other data arguments (`INPUTS_FILE`) starts over."""
    jobs = []
    kinds = (("dVAE training", "dVAE", "vae"), ("CLIP training", "CLIP", "clip"))
    for name, label, kind in kinds:
        if kind not in state.configs:
            continue
        run_dir = state.run_dir(kind)
        extra = state.collection.training_args(state, kind)
        if trained_on(run_dir, extra, state.configs[kind]):
            continue
        why = stale_reason(run_dir, extra, state.configs[kind])
        if why is not None:
            print(f"{name}: {run_dir} {why}; training it again", file=sys.stderr)
            clear_run(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json(run_dir / INPUTS_FILE, {"args": extra})
        jobs.append(train_job(name, label, kind, run_dir, state.configs[kind], state.out, state.pair_threads, extra))
    for job in jobs:
        job.threads = state.alone_threads if len(jobs) == 1 else state.pair_threads
    run_jobs(jobs)
    for job in jobs:
        state.job_seconds[job.name] = job.seconds
        state.ran.add(job.name)


def pair_done(state: PipelineState) -> bool:
    return all(
        trained_on(state.run_dir(kind), state.collection.training_args(state, kind), state.configs[kind])
        for kind in ("vae", "clip")
        if kind in state.configs
    )


def evaluate_vae(state: PipelineState, restart: bool) -> None:
    write_json(state.run_dir("vae") / "eval.json", state.collection.evaluate_tokenizer(state))


def dalle_settings_current(state: PipelineState) -> bool:
    """OUT/dalle holds the preset's DALL·E settings, or the collection re-sizes its DALL·E at its start."""
    return not state.collection.fixed_dalle_settings or settings_current(state.run_dir("dalle"), state.configs["dalle"])


def dalle_done(state: PipelineState) -> bool:
    return training_finished(state.run_dir("dalle")) and dalle_settings_current(state)


def train_dalle(state: PipelineState, restart: bool) -> None:
    dalle_dir = state.run_dir("dalle")
    if not dalle_settings_current(state):
        print(f"DALL·E training: {dalle_dir} {SETTINGS_CHANGED}; training it again", file=sys.stderr)
        restart = True
    if restart:
        clear_run(dalle_dir, keep=("tokens", "subset.json"))
    state.collection.before_dalle(state)
    extra = state.collection.dalle_args(state)
    run_jobs([train_job("DALL·E training", "DALL·E", "dalle", dalle_dir, state.configs["dalle"], state.out,
                        state.alone_threads, extra)])  # fmt: skip


def build_index_stage(state: PipelineState, restart: bool) -> None:
    index_dir = state.run_dir("index")
    if (index_dir / "info.json").exists():  # a complete index of an older CLIP: build_index would refuse it
        shutil.rmtree(index_dir)
    clip = state.collection.clip_run(state)
    info = build_index(clip, state.collection.index_data(state), index_dir, device=str(state.device))
    print(f"index of {info['count']} images: {index_dir}", file=sys.stderr)


def evaluate(state: PipelineState, restart: bool) -> None:
    write_json(state.out / "eval.json", state.collection.evaluate(state))


def report(state: PipelineState, restart: bool) -> None:
    write_summary(state)
    state.collection.write_report(state)


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


def stages_of(collection: Collection) -> list[Stage]:
    """The pipeline's stages for a collection: its data stage, then the shared ones."""
    return [
        Stage(collection.data_stage, collection.data_done, collection.build_data),
        Stage("dVAE + CLIP training", pair_done, train_pair, jobs=("dVAE training", "CLIP training")),
        Stage("dVAE evaluation", file_exists("vae", "eval.json"), evaluate_vae, ("dVAE training",)),
        Stage("DALL·E data", collection.dalle_data_done, collection.build_dalle_data, jobs=("DALL·E codes",)),
        Stage("DALL·E training", dalle_done, train_dalle, ("DALL·E codes",)),
        Stage("index", file_exists("index", "info.json"), build_index_stage, ("CLIP training",)),
        Stage(
            "evaluation", collection.evaluation_done, evaluate, ("dVAE training", "CLIP training", "DALL·E training")
        ),
        Stage("report", collection.report_done, report, ("dVAE evaluation", "DALL·E data", "index", "evaluation")),
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


def open_state(preset: str, out: Path, data_dir: Path) -> PipelineState:
    """The state of an icon run in `out`, with what an earlier invocation recorded there."""
    spec, configs = checked_preset(preset)
    return restore_state(
        PipelineState(
            collection=IconCollection(spec, out, data_dir),
            preset=preset,
            spec=spec,
            configs=configs,
            out=out,
            data_dir=data_dir,
            cores=spec.get("threads") or os.cpu_count() or 1,
            device=resolve_device(configs["dalle"][1].device),
        )
    )


def restore_state(state: PipelineState) -> PipelineState:
    """`state` with the timings and job seconds an earlier invocation recorded in its OUT."""
    earlier = _read_if_present(state.out / "summary.json")
    state.job_seconds = earlier.get("jobs_s", {})
    state.timings = _read_if_present(state.out / "timings.json")
    state.stage_log = earlier.get("stages", [])
    state.spent_before = sum(state.timings.values())
    return state


def run_pipeline(preset: str, out: str | Path, *, fresh: bool = False, data_dir: str | Path = "data") -> Path:
    """Runs every stage of an icon pipeline preset into `out` and returns the path of its summary (OUT/summary.json)."""
    out = Path(out)
    checked_preset(preset)  # a preset that cannot run here fails before anything is touched
    with prepare_out(out, fresh):
        return run_stages(open_state(preset, out, Path(data_dir)))


def run_collection(
    data: str,
    out: str | Path,
    *,
    budget_s: float | None = None,
    preset: str | None = None,
    clip: str | None = None,
    captions_from: str = "txt",
    plain: bool = False,
    judge: str | None = None,
    baseline: str | None = None,
    fresh: bool = False,
    dry_run: bool = False,
) -> Path | None:
    """The pipeline on a folder, shards or manifest of one's own: reads the data and prints its report, plans the
    run for `budget_s` seconds on this machine (or takes the plan file `preset`) and prints the plan, then runs every
    stage into `out` and returns OUT/summary.json. `dry_run` stops after printing and writes nothing. A re-run in the
    same OUT keeps its plan (OUT/plan.json) and skips what is done; `fresh` starts over."""
    from ..config import load_preset
    from .folder_collection import FolderCollection
    from .inspection import format_report, inspect_collection
    from .plan import PLAN_FILE, format_plan, make_plan, measure_machine, plan_configs, without_regularisation

    started = time.perf_counter()
    out = Path(out)
    if budget_s is not None and preset is not None:
        raise ValueError(
            "give --budget (the planner sizes the run) or --preset PLAN.json (a plan as written), not both"
        )
    if clip is not None and not Path(clip).exists() and hub.kind_of(str(clip)) is None:
        raise FileNotFoundError(f"--clip {clip}: no such file or directory, nor a model name (clipdalle models list)")
    for flag, path in (("--judge-clip", judge), ("--baseline", baseline)):
        if path is not None and not Path(path).exists():
            raise FileNotFoundError(f"{flag} {path}: no such file or directory")

    def new_plan() -> tuple[dict[str, Any], tuple[dict[str, Any], list[Any]]]:
        inspected = inspect_collection(data, captions_from)
        print(format_report(inspected[0]), file=sys.stderr)
        if preset is not None:
            spec = load_preset(preset)
            if clip is not None:  # the plan's CLIP section gives way to the CLIP named here
                spec["clip"] = {"existing": str(clip)}
            plan_configs(spec, preset)
            spec = without_regularisation(spec) if plain and spec.get("regularise", True) else spec
        else:
            machine = measure_machine("cuda" if torch.cuda.is_available() else "cpu")
            spent = time.perf_counter() - started
            spec = make_plan(inspected[0], budget_s=budget_s, machine=machine, clip=clip, regularise=not plain,
                             spent_s=spent)  # fmt: skip
        return spec, inspected

    if dry_run:
        spec, _ = new_plan()
        print(f"(read and planned in {time.perf_counter() - started:.0f} s)", file=sys.stderr)
        print(format_plan(spec), file=sys.stderr)
        print(
            f"dry run: nothing written; the pipeline writes this plan to {out / PLAN_FILE} and runs it", file=sys.stderr
        )
        return None
    with prepare_out(out, fresh):
        inspected = None
        if (out / PLAN_FILE).exists() and preset is None:
            spec = read_json(out / PLAN_FILE)
            planned = {"budget_s": spec.get("budget_s"), "regularise": spec.get("regularise")}
            asked = {"budget_s": budget_s, "regularise": not plain}
            if planned != asked:
                raise ValueError(
                    f"{out} was planned for budget {planned['budget_s']} s, regularise {planned['regularise']}; "
                    f"this run asks for {asked['budget_s']} s, {asked['regularise']}: pass --fresh to plan again, or "
                    "use another --out"
                )
            print(f"continuing the plan in {out / PLAN_FILE} (--fresh plans again)", file=sys.stderr)
        else:
            spec, inspected = new_plan()
            write_json(out / PLAN_FILE, spec)
        print(format_plan(spec), file=sys.stderr)
        configs = plan_configs(spec, str(out / PLAN_FILE))
        collection = FolderCollection(
            data, out, spec, captions_from=captions_from, inspected=inspected, judge=judge, baseline=baseline
        )
        state = PipelineState(
            collection=collection,
            preset="plan",
            spec=spec,
            configs=configs,
            out=out,
            data_dir=out / "data",
            cores=os.cpu_count() or 1,
            device=resolve_device(configs["dalle"][1].device),
            started=started,
        )
        state = restore_state(state)
        state.prepared_s = time.perf_counter() - started
        return run_stages(state)


def run_stages(state: PipelineState) -> Path:
    """The stages in a prepared OUT: those not yet done, and those whose inputs changed."""
    out, stages = state.out, stages_of(state.collection)
    expected = state.expected
    measured: dict[str, float] = {}
    started = state.started = state.started or time.perf_counter()
    first_training: float | None = None
    for number, stage in enumerate(stages, 1):
        prefix = f"[{number}/{len(stages)}] {stage.name}"
        restart = any(name in state.ran for name in stage.needs)
        if not restart and stage.done(state):
            print(f"{prefix}: complete, skipped", file=sys.stderr)
            state.timings.setdefault(stage.name, 0.0)
            continue
        elapsed = time.perf_counter() - started
        eta = eta_seconds(expected, measured, stages_to_run(stages[number - 1 :], state))
        eta_text = f", about {eta / 60:.1f} min to go" if eta is not None else ""
        print(f"{prefix} ({elapsed / 60:.1f} min so far{eta_text})", file=sys.stderr)
        if first_training is None and "training" in stage.name:
            first_training = time.perf_counter()
        stage_start = time.perf_counter()
        with LoadSampler() as load:
            stage.run(state, restart)
        seconds = round(time.perf_counter() - stage_start + (state.prepared_s if number == 1 else 0.0), 1)
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
        "collection": state.collection.name,
        "out": str(out),
        "runs": {"vae": "vae", "clip": "clip", "dalle": "dalle"},
        "index": "index",
        "eval": "eval.json",
        "report": "report.html",
        "timings": "timings.json",
        "logs": sorted(str(path.relative_to(out)) for path in (out / "logs").glob("*.log")),
        "timings_s": state.timings,
        "jobs_s": state.job_seconds,
        "stages": state.stage_log,
        "vae": _read_if_present(state.run_dir("vae") / "eval.json"),
        "threads": {"cores": state.cores, "parallel_training": state.pair_threads, "alone": state.alone_threads},
        "serve": f"clipdalle serve {out}",
        **state.collection.summary(state),
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


def _read_if_present(path: Path) -> dict[str, Any]:
    return read_json(path) if path.exists() else {}
