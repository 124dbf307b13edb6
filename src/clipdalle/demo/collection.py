"""What a pipeline run needs to know about its data: a `Collection` (how to get the data and its held-out split, the
training arguments, the evaluation and the report) and the run's `PipelineState`.

Two collections exist: the built-in icons (demo/icon_collection.py: rendered from a font, DALL·E on a subset of icon
families, the icon judges of demo/evaluation.py) and any folder, shards or manifest of one's own
(demo/folder_collection.py: the data report, a plan for a budget, the held-out evaluation of demo/heldout.py). The
stages in demo/pipeline.py are the same for both and call the collection where the data matters.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..config import TrainConfig


@dataclass
class PipelineState:
    """Everything the stages of one invocation read and write: the collection, its preset or plan and the configs,
    where things go, and what ran (which makes the stages that depend on it run again)."""

    collection: Collection
    preset: str  # the preset's name or path (icons), or "plan" (a collection of one's own)
    spec: dict[str, Any]  # the preset's or plan's contents
    configs: dict[str, tuple[Any, TrainConfig]]  # "vae" | "clip" | "dalle" -> (model config, train config)
    out: Path  # OUT
    data_dir: Path  # where built-in datasets are rendered
    cores: int  # CPU threads to use
    device: torch.device  # for the stages run in this process (codes, index, evaluation)
    started: float = 0.0  # time.perf_counter() when this invocation started (budgets count from it)
    spent_before: float = 0.0  # seconds earlier invocations spent on the stages they finished
    ran: set[str] = field(default_factory=set)  # stages and jobs that ran in this invocation
    job_seconds: dict[str, float] = field(default_factory=dict)  # each training process's wall time
    timings: dict[str, float] = field(default_factory=dict)  # stage name -> seconds, one entry per stage
    stage_log: list[dict[str, Any]] = field(default_factory=list)  # seconds and load average of each stage run
    prepared_s: float = 0.0  # seconds before the stages (reading the data and planning), counted in the first stage

    @property
    def pair_threads(self) -> int:
        """Threads of each of two training processes sharing the cores (never more threads than cores)."""
        return self.collection.pair_threads(self)

    @property
    def alone_threads(self) -> int:
        """Threads of a training process or an in-process stage that runs alone."""
        return self.collection.alone_threads(self)

    def run_dir(self, name: str) -> Path:
        """OUT/vae, OUT/clip, OUT/dalle or OUT/index."""
        return self.out / name

    @property
    def tokens_dir(self) -> Path:
        return self.out / "dalle" / "tokens"

    @property
    def expected(self) -> dict[str, float]:
        """Expected seconds of each stage (for the ETA)."""
        return {name: float(seconds) for name, seconds in self.spec.get("expected_s", {}).items()}


class Collection(ABC):
    """A dataset as the pipeline's stages see it."""

    name: str  # "icons" or the path given
    data_stage: str  # the first stage's name: "icon dataset" or "data report"
    # A finished DALL·E counts as done only with the preset's settings; False where a plan re-sizes it at its start
    fixed_dalle_settings: bool = True

    @abstractmethod
    def data_done(self, state: PipelineState) -> bool:
        """The data and its split are ready."""

    @abstractmethod
    def build_data(self, state: PipelineState, restart: bool) -> None:
        """Makes the data and its split ready (renders the icons; reads a folder and writes its split)."""

    @abstractmethod
    def training_args(self, state: PipelineState, kind: str) -> list[str]:
        """`--data ...` (and `--val-data ...`, `--extra-data ...`) of the dVAE ("vae") or CLIP ("clip") training."""

    @abstractmethod
    def evaluate_tokenizer(self, state: PipelineState) -> dict[str, Any]:
        """The dVAE on held-out images (PSNR, codes used, ...), for OUT/vae/eval.json."""

    @abstractmethod
    def dalle_data_done(self, state: PipelineState) -> bool:
        """DALL·E's data and token cache are current."""

    @abstractmethod
    def build_dalle_data(self, state: PipelineState, restart: bool) -> None:
        """DALL·E's data and its dVAE codes (OUT/dalle/tokens)."""

    @abstractmethod
    def dalle_args(self, state: PipelineState) -> list[str]:
        """`--data ... --vae ... --tokens ...` of the DALL·E training."""

    @abstractmethod
    def index_data(self, state: PipelineState) -> str | Path:
        """What the index holds."""

    @abstractmethod
    def evaluate(self, state: PipelineState) -> dict[str, Any]:
        """Every figure of the report, for OUT/eval.json."""

    @abstractmethod
    def write_report(self, state: PipelineState) -> Path:
        """OUT/report.html."""

    def evaluation_done(self, state: PipelineState) -> bool:
        return (state.out / "eval.json").exists()

    def report_done(self, state: PipelineState) -> bool:
        return (state.out / "report.html").exists()

    def clip_run(self, state: PipelineState) -> str | Path:
        """The CLIP that reranks, indexes and evaluates: OUT/clip (trained by the pipeline) unless a plan names one."""
        return state.run_dir("clip")

    def trains_clip(self, state: PipelineState) -> bool:
        return "clip" in state.configs

    def pair_threads(self, state: PipelineState) -> int:
        return max(1, state.cores // 2)

    def alone_threads(self, state: PipelineState) -> int:
        return state.cores

    def before_dalle(self, state: PipelineState) -> None:  # noqa: B027 (a hook: most collections need nothing)
        """Called before DALL·E's training starts or resumes (a plan sets its steps from the time left)."""

    def summary(self, state: PipelineState) -> dict[str, Any]:
        """What OUT/summary.json records about the collection."""
        return {}
