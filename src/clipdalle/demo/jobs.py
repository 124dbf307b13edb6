"""The pipeline's child processes: `clipdalle train ...` commands run side by side, each with its own thread count,
log file and progress bar, and the stage's load average sampled while they run."""

from __future__ import annotations

import collections
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import checkpoint
from ..config import TrainConfig, to_dict
from ..io import write_json

LOAD_SAMPLE_SECONDS = 10.0  # how often the load average is sampled while a stage runs
PROGRESS_LOG_SECONDS = 10.0  # a training log keeps one progress-bar line per 10 s (the bar itself redraws 10x/s)
ERROR_TAIL_LINES = 30  # lines of a failed process's output searched for its one-line error


class StageFailed(ValueError):
    """A stage's process failed; the message is its one-line error and where its log is."""


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
    preset = write_json(
        out / "logs" / f"{kind}-preset.json", {"model": to_dict(model_config), "train": to_dict(train_config)}
    )
    initial, steps = 0, train_config.steps
    if (run_dir / checkpoint.TRAIN_STATE_FILE).exists():  # --resume continues with the run's own config
        initial = checkpoint.checkpoint_step(run_dir)
        steps = checkpoint.read_config(run_dir).get("train", {}).get("steps", steps)
    argv = ["train", kind, "--out", str(run_dir), "--preset", str(preset), "--resume", *extra]
    return Job(name, label, argv, out / "logs" / f"{kind}.log", threads, steps, initial)


def training_finished(run_dir: Path) -> bool:
    """The run reached the last step of its own training config, or stopped before it (early stopping or its time
    limit, which the pipeline sets from its budget)."""
    if not (run_dir / checkpoint.CONFIG_FILE).exists() or not (run_dir / checkpoint.TRAIN_STATE_FILE).exists():
        return False
    if checkpoint.checkpoint_stopped(run_dir):
        return True
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
