"""The report of a pipeline run on a collection of one's own: OUT/report.html, one self-contained page.

Drawn from OUT/data/report.json (the data report), OUT/plan.json (the plan and why), OUT/eval.json (demo/heldout.py),
OUT/timings.json and summary.json (measured seconds and load per stage), and each run's metrics, best checkpoint and
loss plot. With a baseline (another run's OUT on the same data, e.g. the same run with `--plain`), the held-out
figures are shown side by side with paired 95 % bootstrap intervals of the differences. The page's pieces (tables,
embedded images, loss plots, versions) are demo/report.py's.
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path
from typing import Any

from .. import checkpoint
from ..io import atomic_write, read_json
from .heldout import compare
from .inspection import format_report
from .plan import format_plan, format_seconds
from .report import (
    RUNS,
    STYLE,
    Html,
    configuration_section,
    escape,
    image_tag,
    losses_section,
    missing,
    paragraph,
    table,
)

SECTIONS = (
    ("held-out", "Held-out figures"),
    ("comparison", "Against the baseline"),
    ("gallery", "Samples"),
    ("training", "Training: best and last weights"),
    ("data", "Data report"),
    ("plan", "Plan and time"),
    ("configuration", "Configuration and versions"),
)


def read_or_empty(path: Path) -> dict[str, Any]:
    """A JSON file's object, or {} when it is missing or unreadable (the page names what is missing instead)."""
    try:
        return read_json(path)
    except (OSError, ValueError):
        return {}


def number(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def held_out_section(evaluation: dict[str, Any]) -> Html:
    losses = evaluation.get("losses")
    if not losses:
        return missing("eval.json (run the evaluation stage)")
    held, training = losses["held_out"], losses["training"]
    rows = [
        ["dVAE PSNR (dB)", number(held["dvae_psnr"], 2), number(training["dvae_psnr"], 2)],
        ["CLIP loss", number(held["clip"]["loss"]), number(training["clip"]["loss"])],
        [
            "CLIP text -> image R@1",
            number(held["clip"]["text_to_image_r1"]),
            number(training["clip"]["text_to_image_r1"]),
        ],
        [
            "CLIP text -> image R@5",
            number(held["clip"]["text_to_image_r5"]),
            number(training["clip"]["text_to_image_r5"]),
        ],
        [
            "CLIP image -> text R@1",
            number(held["clip"]["image_to_text_r1"]),
            number(training["clip"]["image_to_text_r1"]),
        ],
        ["DALL·E loss (nats/token)", number(held["dalle"]["loss"]), number(training["dalle"]["loss"])],
        ["DALL·E bits per image token", number(held["dalle"]["image_bits"]), number(training["dalle"]["image_bits"])],
    ]
    parts = [table(["figure", f"held out ({held['images']} images)", f"training ({training['images']} images)"], rows)]
    zero_shot = evaluation.get("zero_shot", {})
    if zero_shot.get("images"):
        parts.append(
            paragraph(
                f"CLIP zero-shot among {zero_shot['words']} caption words ({', '.join(zero_shot['examples'])}, ...), "
                f"{zero_shot['images']} held-out images: top-1 {100 * zero_shot['top1']:.1f} % (chance "
                f"{100 * zero_shot['chance_top1']:.1f} %), top-5 {100 * zero_shot['top5']:.1f} %."
            )
        )
    generation = evaluation.get("generation", {})
    if generation:
        headers = ["samples for", "prompts x n", "R-precision kept", "per sample", "real images", "diversity",
                   "distinct grids", "copies of training codes"]  # fmt: skip
        rows = []
        for split, label in (("train", "training captions"), ("val", "held-out captions")):
            figures = generation.get(split)
            if not figures:
                continue
            rows.append(
                [
                    label,
                    f"{figures['prompts']} x {figures['samples']}",
                    number(figures["r_precision_kept"]),
                    number(figures["r_precision_per_sample"]),
                    number(figures.get("r_precision_real")),
                    number(figures["diversity"]),
                    number(figures["distinct_grids"]),
                    number(figures["copies"]),
                ]
            )
        parts.append(table(headers, rows))
        fid = evaluation.get("fid", {})
        if fid:
            parts.append(
                paragraph(
                    f"FID on CLIP image features against the {fid['real_images']} real held-out images: kept samples "
                    f"{fid['generated_kept']:.3f}, all samples {fid['generated_all_samples']:.3f}, the real prompt "
                    f"images (floor) {fid['real_prompt_images']:.3f}."
                )
            )
    settings = evaluation.get("settings", {})
    parts.append(
        paragraph(
            f"Weights: {settings.get('weights', 'best')}; samples scored by {settings.get('judge', 'the run CLIP')}.",
            "definition",
        )
    )
    for name, text in evaluation.get("definitions", {}).items():
        parts.append(paragraph(f"{name}: {text}", "definition"))
    return Html("".join(parts))


def comparison_section(evaluation: dict[str, Any], baseline: dict[str, Any] | None, baseline_out: str | None) -> Html:
    if baseline_out is None:
        return paragraph("No baseline given (`clipdalle pipeline ... --baseline OTHER_OUT`).", "definition")
    if not baseline.get("losses") or not evaluation.get("losses"):
        return missing(f"{baseline_out}/eval.json or this run's eval.json")
    rows = []
    for row in compare(evaluation, baseline):
        interval = row["interval"]
        shown = "–" if interval is None else f"{interval[0]:+.3f} .. {interval[1]:+.3f}"
        verdict = {True: "better", False: "worse", None: "no clear difference"}[row["better"]]
        rows.append(
            [
                row["figure"],
                number(row["run"]),
                number(row["baseline"]),
                f"{row['difference']:+.3f}",
                shown,
                f"{row['direction']} is better",
                verdict,
            ]
        )
    headers = ["figure", "this run", f"baseline ({baseline_out})", "difference", "95 % CI (paired)", "", "verdict"]
    note = (
        "The baseline is another run of the pipeline on the same data and split (for instance the same plan without "
        "regularisation: `--plain`). Per-prompt figures have a 95 % paired bootstrap interval over the prompts; "
        "'better' or 'worse' when the whole interval (or, without one, the difference) is on one side."
    )
    return Html(table(headers, rows) + paragraph(note, "definition"))


def training_section(out: Path) -> Html:
    rows = []
    for folder, label in RUNS:
        run = out / folder
        if not (run / checkpoint.CONFIG_FILE).exists():
            if folder == "clip":
                rows.append([label, "an existing CLIP (not trained here)", "–", "–", "–"])
            continue
        train = checkpoint.read_config(run).get("train", {})
        best = checkpoint.best_checkpoint(run)
        stopped = checkpoint.checkpoint_stopped(run)
        rows.append(
            [
                label,
                f"{checkpoint.checkpoint_step(run)} of {train.get('steps', '?')}",
                {"early_stop": "early stopping", "time_limit": "its time limit", None: "its last step"}[stopped],
                "–" if best is None else f"step {best['step']} (validation loss {best['val_loss']:.4g})",
                "best" if best is not None else "last",
            ]
        )
    headers = ["model", "steps trained", "ended at", "best weights kept (RUN/best/)", "loaded"]
    return Html(table(headers, rows) + losses_section(out))


def data_section(out: Path) -> Html:
    report = read_or_empty(out / "data" / "report.json")
    if not report:
        return missing(str(out / "data" / "report.json"))
    return Html(f"<pre>{escape(format_report(report))}</pre>")


def plan_section(out: Path, summary: dict[str, Any]) -> Html:
    spec = read_or_empty(out / "plan.json")
    if not spec:
        return missing(str(out / "plan.json"))
    parts = [Html(f"<pre>{escape(format_plan(spec))}</pre>")]
    replanned = spec.get("replanned")
    if replanned:
        parts.append(
            paragraph(
                f"DALL·E planned again at its start: {replanned['dalle_steps']:,} steps (the plan said "
                f"{replanned['planned_steps']:,}) for the {format_seconds(replanned['seconds_left'])} left, at "
                f"{replanned['step_s']:.3f} s per step on {replanned['threads']} thread(s) (probe "
                f"{replanned['probe_one']:.0f} GFLOP/s on one thread, {replanned['probe_all']:.0f} on all)."
            )
        )
    expected = spec.get("expected_s", {})
    loads = {entry["name"]: entry.get("load_average", {}) for entry in summary.get("stages", [])}
    timings = summary.get("timings_s", {})
    rows = []
    for name, seconds in timings.items():
        load = loads.get(name, {})
        rows.append(
            [name, format_seconds(expected.get(name, 0.0)), format_seconds(seconds),
             f"{load.get('mean', '–')} (max {load.get('max', '–')})"]
        )  # fmt: skip
    total = sum(timings.values())
    budget = spec.get("budget_s")
    rows.append(
        [Html("<b>total</b>"), format_seconds(sum(expected.values())), format_seconds(total),
         "" if not budget else f"{100 * total / budget:.0f} % of the budget ({format_seconds(budget)})"]
    )  # fmt: skip
    parts.append(table(["stage", "planned", "measured", "load average (1 min)"], rows))
    return Html("".join(parts))


def render_report(out: Path, baseline: str | None = None) -> str:
    out = Path(out)
    summary = read_or_empty(out / "summary.json")
    evaluation = read_or_empty(out / "eval.json")
    baseline_eval = read_or_empty(Path(baseline) / "eval.json") if baseline else None
    bodies = {
        "held-out": held_out_section(evaluation),
        "comparison": comparison_section(evaluation, baseline_eval, baseline),
        "gallery": image_tag(out / "eval" / "gallery.png", "samples")
        + paragraph(
            "Each row: a prompt (training or held-out caption), the real image it belongs to, then samples in the "
            "order drawn with their CLIP scores; the green frame marks the sample CLIP keeps.",
            "definition",
        ),
        "training": training_section(out),
        "data": data_section(out),
        "plan": plan_section(out, summary),
        "configuration": configuration_section(out, summary, evaluation),
    }
    spec = read_or_empty(out / "plan.json")
    total = sum(value for value in summary.get("timings_s", {}).values() if isinstance(value, (int, float)))
    budget = spec.get("budget_s")
    budget_text = f" of a {format_seconds(budget)} budget" if budget else ""
    created = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    nav = "".join(f'<a href="#{anchor}">{escape(title)}</a>' for anchor, title in SECTIONS)
    sections = "".join(
        f'<section id="{anchor}"><h2>{escape(title)}</h2>{bodies[anchor]}</section>' for anchor, title in SECTIONS
    )
    name = summary.get("collection", str(out))
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        f"<title>clipdalle report: {escape(name)}</title><style>{STYLE}</style></head><body>"
        f"<h1>clipdalle: DALL·E, CLIP and a dVAE trained on {escape(name)}</h1>"
        f"<p>{escape(spec.get('description', ''))} · pipeline time {format_seconds(total)}{escape(budget_text)} · "
        f"written {escape(created)} from {escape(out)}</p><nav>{nav}</nav>{sections}"
        f"<details><summary>plan.json</summary><pre>{escape(json.dumps(spec, indent=2))}</pre></details>"
        "</body></html>\n"
    )


def write_report(out: Path, baseline: str | None = None) -> Path:
    """Writes OUT/report.html and returns its path."""
    page = render_report(out, baseline)
    path = Path(out) / "report.html"
    atomic_write(path, lambda temporary: temporary.write_text(page, encoding="utf-8"))
    return path
