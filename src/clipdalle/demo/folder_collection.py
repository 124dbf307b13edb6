"""A folder, shards or a manifest of one's own as a pipeline collection: `clipdalle pipeline --data DIR --out OUT`.

    data report       OUT/data/report.json (demo/inspection.py) and the split as manifests OUT/data/train.jsonl,
                      val.jsonl and all.jsonl (shards are read where they are, split by key hash)
    plan              OUT/plan.json (demo/plan.py): sizes, steps and expected times for the budget and the machine
    dVAE evaluation   PSNR and code usage on the held-out images
    DALL·E data       the dVAE's codes of the training images (and their augmented views) and of the held-out ones
    index             every image of the collection (search your whole collection on the page)
    evaluation        demo/heldout.py on the held-out split; report: demo/collection_report.py

The plan's time limits keep each training within its share of the budget, and DALL·E's steps are planned again from a
fresh speed probe and the time left when its stage starts.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import torch

from .. import checkpoint
from ..config import replace
from ..data.loader import Augment
from ..io import read_json, write_json
from ..training.codes import build_code_cache, cache_is_current
from . import heldout, inspection, plan
from .collection import Collection, PipelineState
from .plan import PLAN_FILE

MIN_DALLE_STEPS = 20  # DALL·E trains at least this long even when the time left says less


class FolderCollection(Collection):
    """A collection of one's own (see the module's docstring)."""

    data_stage = "data report"
    fixed_dalle_settings = False  # before_dalle plans its steps again from the time left

    def __init__(
        self,
        data: str,
        out: Path,
        spec: dict[str, Any],
        *,
        captions_from: str = "txt",
        inspected: tuple[dict[str, Any], list[inspection.Item]] | None = None,
        judge: str | None = None,
        baseline: str | None = None,
    ):
        self.name = data
        self.data = data
        self.out = out
        self.spec = spec
        self.captions_from = captions_from
        self.inspected = inspected  # (report, items) when this invocation read the data already
        self.judge = judge
        self.baseline = baseline
        report_path = out / "data" / "report.json"
        self.report = inspected[0] if inspected else (read_json(report_path) if report_path.exists() else None)

    # ------------------------------------------------------------------------------------ where the data is

    @property
    def data_folder(self) -> Path:
        return self.out / "data"

    @property
    def shards(self) -> bool:
        return self.report is not None and self.report["kind"] == "shards"

    @property
    def val_fraction(self) -> float:
        return float(self.report["split"]["val_fraction"] or 0.0) if self.report else 0.0

    @property
    def train_data(self) -> str:
        return self.data if self.shards else str(self.data_folder / "train.jsonl")

    @property
    def val_data(self) -> str | None:
        return None if self.shards else str(self.data_folder / "val.jsonl")

    @property
    def image_size(self) -> int:
        return self.spec["images"]["size"]

    def data_args(self) -> list[str]:
        return ["--data", self.train_data] + ([] if self.val_data is None else ["--val-data", self.val_data])

    # ------------------------------------------------------------------------------------ stages

    def data_done(self, state: PipelineState) -> bool:
        manifests = ("train", "val", "all")
        return (self.data_folder / "report.json").exists() and (
            self.shards or all((self.data_folder / f"{name}.jsonl").exists() for name in manifests)
        )

    def build_data(self, state: PipelineState, restart: bool) -> None:
        if self.inspected is None:
            self.inspected = inspection.inspect_collection(self.data, self.captions_from)
        report, items = self.inspected
        self.data_folder.mkdir(parents=True, exist_ok=True)
        if report["kind"] != "shards":
            inspection.write_split(items, self.data_folder)
        inspection.write_report(report, self.data_folder / "report.json")
        self.report = report

    def training_args(self, state: PipelineState, kind: str) -> list[str]:
        return self.data_args()

    def evaluate_tokenizer(self, state: PipelineState) -> dict[str, Any]:
        torch.set_num_threads(state.alone_threads)
        if self.val_data is not None:
            results = heldout.evaluate_tokenizer(state.run_dir("vae"), self.val_data, self.image_size)
        else:
            results = heldout.evaluate_tokenizer(
                state.run_dir("vae"), self.data, self.image_size, holdout="val", val_fraction=self.val_fraction
            )
        print(
            f"dVAE on held-out images: PSNR {results['psnr']:.2f} dB, {results['codes_used']} of "
            f"{results['vocab_size']} codes used (perplexity {results['perplexity']:.0f})",
            file=sys.stderr,
        )
        return results

    def code_views(self, state: PipelineState) -> tuple[int, Augment | None]:
        train = state.configs["dalle"][1]
        if train.code_views <= 1:
            return 1, None
        return train.code_views, Augment(min_scale=train.crop_scale, max_shift=train.max_shift)

    def dalle_data_done(self, state: PipelineState) -> bool:
        views, augment = self.code_views(state)
        return cache_is_current(state.tokens_dir, state.run_dir("vae"), self.train_data, views, augment)

    def build_dalle_data(self, state: PipelineState, restart: bool) -> None:
        torch.set_num_threads(state.alone_threads)
        vae_dir = state.run_dir("vae")
        views, augment = self.code_views(state)
        vae = checkpoint.load_model(vae_dir, expect="dvae", device=state.device)
        info = build_code_cache(
            vae, vae_dir, self.train_data, state.tokens_dir, val_data=self.val_data, num_workers=0,
            device=state.device, views=views, augment=augment,
        )  # fmt: skip
        state.ran.add("DALL·E codes")
        counts = ", ".join(f"{count} {split}" for split, count in info["counts"].items())
        print(f"codes of {counts} images ({views} view(s) per training image): {state.tokens_dir}", file=sys.stderr)

    def dalle_args(self, state: PipelineState) -> list[str]:
        return self.data_args() + ["--vae", str(state.run_dir("vae")), "--tokens", str(state.tokens_dir)]

    def index_data(self, state: PipelineState) -> str:
        return self.data if self.shards else str(self.data_folder / "all.jsonl")

    def clip_run(self, state: PipelineState) -> str | Path:
        return self.spec["clip"].get("existing") or state.run_dir("clip")

    def evaluate(self, state: PipelineState) -> dict[str, Any]:
        torch.set_num_threads(state.alone_threads)
        evaluation = self.spec["eval"]
        return heldout.evaluate_collection(
            state.out,
            train_data=self.train_data,
            val_data=self.val_data,
            val_fraction=self.val_fraction,
            clip=self.clip_run(state),
            judge=self.judge,
            prompts=evaluation["prompts"],
            samples=evaluation["samples"],
            seed=evaluation["seed"],
            sampling=evaluation.get("sampling"),
            weights=self.spec.get("weights", "best"),
        )

    def report_done(self, state: PipelineState) -> bool:
        """With a baseline the page is drawn again every time: the baseline may have finished since."""
        return self.baseline is None and (state.out / "report.html").exists()

    def write_report(self, state: PipelineState) -> Path:
        from .collection_report import write_report

        return write_report(state.out, baseline=self.baseline)

    # ------------------------------------------------------------------------------------ threads and time

    def pair_threads(self, state: PipelineState) -> int:
        return 1

    def alone_threads(self, state: PipelineState) -> int:
        return int(self.spec.get("threads", {}).get("alone", 1))

    def before_dalle(self, state: PipelineState) -> None:
        """DALL·E's steps planned again from a fresh probe and the time left: the budget minus what is spent and what
        the later stages are expected to take (a resumed DALL·E run keeps its own config)."""
        dalle_dir = state.run_dir("dalle")
        if (dalle_dir / checkpoint.TRAIN_STATE_FILE).exists() or "budget_s" not in self.spec:
            return
        machine = plan.measure_machine("cuda" if state.device.type == "cuda" else "cpu")
        spent = state.spent_before + time.perf_counter() - state.started
        planned_probe = self.spec.get("machine", {}).get("probe_one", machine.probe_one)
        slower = min(3.0, max(0.5, planned_probe / machine.probe_one))
        later = slower * sum(self.spec["expected_s"].get(name, 0.0) for name in ("index", "evaluation", "report"))
        left = self.spec["budget_s"] * plan.BUDGET_MARGIN - spent - later
        model, train = state.configs["dalle"]
        step = plan.step_seconds("dalle", model, train.batch_size, machine, True, 0.0)
        evaluation = plan.EVALUATION_FIXED_S + plan.sample_seconds(model, 32, machine)
        steps = max(MIN_DALLE_STEPS, int((left - plan.JOB_START_S - plan.EVALUATIONS * evaluation) / step))
        every = max(10, steps // plan.EVALUATIONS)
        train = replace(
            train,
            steps=steps,
            eval_every=every,
            save_every=every,
            log_every=max(1, min(25, every // 4)),
            warmup_steps=max(1, min(100, steps // 20)),
            max_seconds=round(max(60.0, left * 1.05), 1),
        )
        state.configs["dalle"] = (model, train)
        self.spec.setdefault("threads", {})["alone"] = machine.threads_alone
        self.spec["replanned"] = {
            "dalle_steps": steps,
            "planned_steps": self.spec["dalle"]["train"]["steps"],
            "seconds_left": round(left, 1),
            "step_s": round(step, 4),
            "probe_one": round(machine.probe_one, 1),
            "probe_all": round(machine.probe_all, 1),
            "threads": machine.threads_alone,
        }
        write_json(state.out / PLAN_FILE, self.spec)
        print(
            f"DALL·E planned again: {steps:,} steps of {train.batch_size} at {step:.3f} s per step on "
            f"{machine.threads_alone} thread(s) fill the {plan.format_seconds(left)} left (the plan said "
            f"{self.spec['dalle']['train']['steps']:,})",
            file=sys.stderr,
        )

    def summary(self, state: PipelineState) -> dict[str, Any]:
        return {
            "data": self.data,
            "data_report": "data/report.json",
            "plan": PLAN_FILE,
            "split": None if self.shards else {"train": "data/train.jsonl", "val": "data/val.jsonl"},
            "clip_run": str(self.clip_run(state)),
            "budget_s": self.spec.get("budget_s"),
            "regularise": self.spec.get("regularise"),
        }
