"""The demo's report: one self-contained HTML page, OUT/report.html, that a person would rather look at than read.

It is drawn from what the pipeline left in OUT: summary.json, timings.json, eval.json (clipdalle.demo_eval), the
runs' config.json, metrics.csv and loss.png (OUT/vae, OUT/clip, OUT/dalle), OUT/vae/reconstructions.png,
OUT/eval/*.png and OUT/dalle/subset.json. Images are embedded as data: URIs and the style sheet is inline, so the
file can be mailed or opened offline; a missing piece is named on the page instead of failing the report.
"""

from __future__ import annotations

import base64
import csv
import datetime
import html
import io
import json
import math
import platform
from pathlib import Path
from typing import Any

from ..io import atomic_write

DATASET_STAGE = "icon dataset"  # the pipeline stage the time budget does not count
RUNS = (("vae", "dVAE"), ("clip", "CLIP"), ("dalle", "DALL·E"))
SECTIONS = (
    ("quality-bar", "Quality bar"),
    ("tokenizer", "dVAE reconstructions"),
    ("losses", "Loss curves"),
    ("gallery", "Gallery"),
    ("generation", "Generated icons, judged"),
    ("clip", "CLIP: zero-shot, retrieval, R-precision and FID"),
    ("examples", "Inpainting, variation, CLIP guidance"),
    ("subset", "DALL·E training subset"),
    ("timings", "Timings"),
    ("configuration", "Configuration and versions"),
)
STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1240px; margin: 2em auto; padding: 0 1em; color: #212121; }
h1 { margin-bottom: 0.2em; } h2 { margin-top: 2em; border-bottom: 1px solid #ddd; padding-bottom: 0.2em; }
nav a { margin-right: 1em; font-size: 0.9em; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.92em; }
th, td { border: 1px solid #ddd; padding: 0.25em 0.6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
th { background: #f5f5f5; }
.pass { color: #2e7d32; font-weight: 600; } .fail { color: #c62828; font-weight: 600; } .info { color: #757575; }
.definition { color: #555; font-size: 0.88em; max-width: 980px; }
.missing { color: #c62828; font-style: italic; }
img { image-rendering: pixelated; max-width: 100%; }
pre { background: #f7f7f7; padding: 0.6em; overflow-x: auto; font-size: 0.85em; }
.row { display: flex; gap: 2em; flex-wrap: wrap; align-items: flex-start; }
"""


class Html(str):
    """Text that is already HTML: `table` and `paragraph` insert it as is instead of escaping it."""


def escape(value: Any) -> str:
    return value if isinstance(value, Html) else html.escape(str(value))


def table(headers: list[Any], rows: list[list[Any]]) -> Html:
    head = "".join(f"<th>{escape(cell)}</th>" for cell in headers)
    body = "".join("<tr>" + "".join(f"<td>{escape(cell)}</td>" for cell in row) + "</tr>" for row in rows)
    return Html(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")


def paragraph(text: Any, css_class: str | None = None) -> Html:
    attribute = f' class="{css_class}"' if css_class else ""
    return Html(f"<p{attribute}>{escape(text)}</p>")


def missing(what: str) -> Html:
    return paragraph(f"missing: {what}", "missing")


def percent(value: float | None, digits: int = 1) -> str:
    return "–" if value is None else f"{100 * value:.{digits}f} %"


def png_data_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def image_tag(path: Path, alt: str) -> Html:
    """The PNG at `path` embedded as a data: URI, or a note naming the missing file."""
    if not path.is_file():
        return missing(str(path))
    return Html(f'<img src="{png_data_uri(path.read_bytes())}" alt="{html.escape(alt)}">')


def verdict(passed: bool | None) -> Html:
    if passed is None:
        return Html('<span class="info">reported</span>')
    return Html('<span class="pass">pass</span>' if passed else '<span class="fail">FAIL</span>')


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


# ------------------------------------------------------------------------------------------ loss curves


def read_metrics(path: Path) -> dict[str, dict[str, tuple[list[int], list[float]]]]:
    """metrics.csv (step, split, name, value) -> {name: {split: (steps, values)}}."""
    series: dict[str, dict[str, tuple[list[int], list[float]]]] = {}
    with open(path, newline="") as handle:
        for row in csv.DictReader(handle):
            steps, values = series.setdefault(row["name"], {}).setdefault(row["split"], ([], []))
            steps.append(int(row["step"]))
            values.append(float(row["value"]))
    return series


def plot_losses(series: dict[str, dict[str, tuple[list[int], list[float]]]], title: str) -> bytes | None:
    """A PNG of the loss-like metrics (names containing "loss", else every metric but lr): matplotlib when it is
    installed, else a plain PIL line chart. None when there is nothing to draw."""
    names = [name for name in series if "loss" in name] or [name for name in series if name != "lr"]
    lines = [(f"{name} ({split})", points) for name in names for split, points in sorted(series[name].items())]
    lines = [(label, points) for label, points in lines if points[0]]
    if not lines:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return _plot_with_pil(lines, title)
    figure, axis = plt.subplots(figsize=(5, 3.2))
    for label, (steps, values) in lines:
        axis.plot(steps, values, label=label, marker="o" if "(train)" not in label else None, markersize=3)
    axis.set_title(title)
    axis.set_xlabel("step")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, dpi=90, format="png")
    plt.close(figure)
    return buffer.getvalue()


def _plot_with_pil(lines: list[tuple[str, tuple[list[int], list[float]]]], title: str) -> bytes:
    from PIL import Image, ImageDraw

    width, height, margin = 480, 300, 40
    picture = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(picture)
    all_steps = [step for _, (steps, _) in lines for step in steps]
    all_values = [value for _, (_, values) in lines for value in values if math.isfinite(value)]
    low_step, high_step = min(all_steps), max(max(all_steps), min(all_steps) + 1)
    low, high = min(all_values), max(max(all_values), min(all_values) + 1e-9)
    draw.rectangle((margin, margin, width - 10, height - margin), outline=(180, 180, 180))
    draw.text((margin, 10), f"{title}  (y: {low:.3g} to {high:.3g})", fill=(33, 33, 33))
    colours = [(30, 136, 229), (229, 57, 53), (67, 160, 71), (142, 36, 170), (251, 140, 0)]
    for index, (label, (steps, values)) in enumerate(lines):
        points = [
            (
                margin + (step - low_step) / (high_step - low_step) * (width - 10 - margin),
                height - margin - (value - low) / (high - low) * (height - 2 * margin),
            )
            for step, value in zip(steps, values)
            if math.isfinite(value)
        ]
        colour = colours[index % len(colours)]
        if len(points) > 1:
            draw.line(points, fill=colour, width=2)
        draw.text((margin + 5, height - margin + 5 + 12 * (index % 2)), label, fill=colour)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()


# ------------------------------------------------------------------------------------------ sections


def quality_bar_section(evaluation: dict[str, Any]) -> Html:
    rows = evaluation.get("quality_bar")
    if not rows:
        return missing("eval.json quality_bar (run the evaluation stage)")
    body = table(
        ["target", "bar", "measured", "verdict"],
        [[row["name"], row["target"], row["measured"], verdict(row["pass"])] for row in rows],
    )
    failed = [row["name"] for row in rows if row["pass"] is False]
    note = (
        "Every target is met."
        if not failed
        else f"{len(failed)} target(s) missed; the figures are reported as measured. Levers that close such gaps: "
        "more DALL·E steps or fewer training families (shape), the `small` preset (longer CPU run), a dVAE that keeps "
        "colours (colour ceiling below), and more samples per prompt for reranking."
    )
    return Html(body + paragraph(note, "definition"))


def tokenizer_section(out: Path, summary: dict[str, Any]) -> Html:
    results = summary.get("vae") or _read_json(out / "vae" / "eval.json")
    parts = [image_tag(out / "vae" / "reconstructions.png", "dVAE reconstructions")]
    if results:
        parts.append(
            table(
                ["validation icons", "PSNR", "right colour (colour judge)", "codes used", "code perplexity"],
                [
                    [
                        results.get("images", "–"),
                        f"{results['psnr']:.2f} dB" if "psnr" in results else "–",
                        percent(results.get("colour_accuracy"), 2),
                        f"{results.get('codes_used', '–')} of {results.get('vocab_size', '–')}",
                        f"{results['perplexity']:.1f}" if "perplexity" in results else "–",
                    ]
                ],
            )
        )
    else:
        parts.append(missing(str(out / "vae" / "eval.json")))
    note = "Pairs: each validation icon, then the dVAE's reconstruction of it (decode(encode(icon)))."
    parts.append(paragraph(note, "definition"))
    return Html("".join(parts))


def losses_section(out: Path) -> Html:
    cells = []
    for folder, label in RUNS:
        run = out / folder
        if (run / "loss.png").is_file():
            cells.append(f"<div><h3>{escape(label)}</h3>{image_tag(run / 'loss.png', f'{label} loss')}</div>")
        elif (run / "metrics.csv").is_file():
            data = plot_losses(read_metrics(run / "metrics.csv"), label)
            picture = Html(f'<img src="{png_data_uri(data)}" alt="{label} loss">') if data else missing(f"{run} losses")
            cells.append(f"<div><h3>{escape(label)}</h3>{picture}</div>")
        else:
            cells.append(f"<div><h3>{escape(label)}</h3>{missing(str(run / 'metrics.csv'))}</div>")
    return Html('<div class="row">' + "".join(cells) + "</div>")


def gallery_section(out: Path, evaluation: dict[str, Any]) -> Html:
    gallery = evaluation.get("gallery")
    if not gallery:
        return missing("eval.json gallery")
    settings = evaluation.get("settings", {})
    n = settings.get("samples_per_prompt", "n")
    text = (
        f"Each row: the prompt, the real icon, then all {n} samples in the order they were drawn (before "
        "reranking), each with its CLIP score (cosine similarity with the prompt); the green frame marks the sample "
        "CLIP keeps (best of n, after reranking). Seen rows are icons of DALL·E's training families, validation rows "
        "icons of held-out families; the rows cover every colour."
    )
    return Html(image_tag(out / gallery["picture"], "gallery") + paragraph(text, "definition"))


def generation_section(evaluation: dict[str, Any]) -> Html:
    generation = evaluation.get("generation")
    if not generation:
        return missing("eval.json generation")
    definitions = evaluation.get("definitions", {})
    seen, val = generation["seen"], generation["val"]
    n = seen["samples"]

    def shape(figures: dict, key: str, field: str) -> str:
        value = figures["shape_rank"][key][field]
        return f"{value:g}" if field == "median" else percent(value)

    headers = ["", "seen: per sample", f"seen: best of {n}", "validation: per sample", f"validation: best of {n}"]
    rows = [
        ["prompts × samples", f"{seen['prompts']} × {n}", seen["prompts"], f"{val['prompts']} × {n}", val["prompts"]],
        ["colour fidelity"]
        + [percent(figures["colour_fidelity"][key]) for figures in (seen, val) for key in ("per_sample", "best_of_n")],
        ["shape: median rank of the named icon"]
        + [shape(figures, key, "median") for figures in (seen, val) for key in ("per_sample", "best_of_n")],
    ]
    for threshold in (1, 10, 100):
        rows.append(
            [f"shape: rank <= {threshold}"]
            + [
                shape(figures, key, f"within_{threshold}")
                for figures in (seen, val)
                for key in ("per_sample", "best_of_n")
            ]
        )
    rows.append(
        ["CLIP R-precision (random sample / kept)"]
        + [percent(figures["r_precision"][key]) for figures in (seen, val) for key in ("random", "kept")]
    )
    rows.append(
        [
            "prompts truncated to DALL·E's text length",
            seen.get("truncated_prompts", "–"),
            "",
            val.get("truncated_prompts", "–"),
            "",
        ]
    )
    rows.append(
        ["mean CLIP score with the prompt"]
        + [f"{figures['clip_score'][key]:.3f}" for figures in (seen, val) for key in ("all_mean", "kept_mean")]
    )
    context_headers = [
        "for comparison",
        "seen: colour",
        "seen: median rank",
        "validation: colour",
        "validation: median rank",
    ]
    context = []
    for key, label in (
        ("oracle_best_of_n", f"oracle best of {n} (best rank among the samples)"),
        ("real_icons", "the real icons of the prompts (judges' ceiling)"),
        ("dvae_reconstructions", "the dVAE's reconstructions of them (tokenizer ceiling)"),
        ("chance", "chance: real icons of another prompt's name"),
    ):
        row = [label]
        for figures in (seen, val):
            colour = figures["colour_fidelity"].get(key)
            row += [percent(colour) if colour is not None else "–", shape(figures, key, "median")]
        context.append(row)
    colours = list(seen["colour_fidelity"]["per_sample_by_colour"])
    by_colour = table(
        ["colour fidelity per sample, by colour"] + colours,
        [
            [label] + [percent(figures["colour_fidelity"]["per_sample_by_colour"].get(colour)) for colour in colours]
            for label, figures in (("seen", seen), ("validation", val))
        ],
    )
    icons = seen["shape_rank"].get("icons", 7367)
    parts = [
        table(headers, rows),
        paragraph(f"Ranks are among all {icons:,} icons (rank 1 = best).", "definition"),
        table(context_headers, context),
        by_colour,
    ]
    misses = [
        [label, miss["prompt"], f"{miss['right_samples']} of {n}", miss["judged"], miss["core_ink"]]
        for label, figures in (("seen", seen), ("validation", val))
        for miss in figures["colour_fidelity"].get("kept_misses", [])
    ]
    if misses:
        parts.append(
            table(
                ["set", "kept sample judged the wrong colour", "samples judged right", "judged", "core of its ink"],
                misses,
            )
        )
    for key in ("prompts", "colour_fidelity", "shape_rank"):
        if key in definitions:
            parts.append(paragraph(f"{key.replace('_', ' ')}: {definitions[key]}", "definition"))
    return Html("".join(parts))


def confusion_table(colours: list[str], confusion: list[list[int]]) -> Html:
    """Rows = true colour, columns = predicted; each cell shaded by its share of the row."""
    head = "<th>true \\ predicted</th>" + "".join(f"<th>{escape(colour)}</th>" for colour in colours)
    body = []
    for colour, row in zip(colours, confusion):
        total = max(1, sum(row))
        cells = "".join(
            f'<td style="background: rgba(30, 136, 229, {count / total:.2f})">{count}</td>' for count in row
        )
        body.append(f"<tr><td>{escape(colour)}</td>{cells}</tr>")
    return Html(f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>")


def clip_section(evaluation: dict[str, Any]) -> Html:
    zero_shot, retrieval, fid = (evaluation.get(key) for key in ("zero_shot", "retrieval", "fid"))
    if not zero_shot or not retrieval or not fid:
        return missing("eval.json zero_shot / retrieval / fid")
    definitions = evaluation.get("definitions", {})
    parts = [
        Html("<h3>Zero-shot on the validation icons</h3>"),
        table(
            ["task", "images", "top-1", "top-5", "chance top-1", "chance top-5"],
            [
                [
                    "colour ('a {colour} icon')",
                    zero_shot["images"],
                    percent(zero_shot["colour_accuracy"]),
                    "–",
                    percent(1 / len(zero_shot["colours"])),
                    "–",
                ],
                [
                    f"icon name among {zero_shot['names']} validation names",
                    zero_shot["images"],
                    percent(zero_shot["name_top1"]),
                    percent(zero_shot["name_top5"]),
                    percent(zero_shot["chance_top1"], 2),
                    percent(zero_shot["chance_top5"], 2),
                ],
            ],
        ),
        confusion_table(zero_shot["colours"], zero_shot["colour_confusion"]),
        Html("<h3>Retrieval (text to image)</h3>"),
        table(
            ["queries (captions) over images", "recall@1", "recall@5"],
            [[retrieval["images"], percent(retrieval["text_to_image_r1"]), percent(retrieval["text_to_image_r5"])]],
        ),
        Html("<h3>CLIP R-precision</h3>"),
    ]
    generation = evaluation.get("generation", {})
    parts.append(
        table(
            ["prompt set", "R", "random samples", "kept (best of n by CLIP)"],
            [
                [
                    label,
                    figures["r_precision"]["r"],
                    percent(figures["r_precision"]["random"]),
                    percent(figures["r_precision"]["kept"]),
                ]
                for label, figures in (("seen", generation.get("seen")), ("validation", generation.get("val")))
                if figures
            ],
        )
    )
    sizes = fid.get("images_per_set", {})
    parts += [
        Html(f"<h3>{escape(fid.get('label', 'FID on CLIP image features'))}</h3>"),
        table(
            ["generated for the validation prompts", "images", f"FID vs {fid['real_images']} real validation icons"],
            [
                ["kept (best of n)", sizes.get("kept", "–"), f"{fid['generated_kept']:.4f}"],
                ["random (first sample drawn)", sizes.get("random", "–"), f"{fid['generated_random']:.4f}"],
                ["all samples", sizes.get("all_samples", "–"), f"{fid['generated_all_samples']:.4f}"],
                [
                    "floor: the real icons of the same prompts",
                    sizes.get("real_prompt_icons", "–"),
                    f"{fid['real_prompt_icons']:.4f}",
                ],
            ],
        ),
        paragraph(
            f"CLIP image features have {fid.get('feature_dim', '?')} dimensions and unit length, so these values are "
            "on a much smaller scale than Inception FIDs and not comparable with them.",
            "definition",
        ),
    ]
    for key in ("zero_shot", "retrieval", "r_precision", "fid"):
        if key in definitions:
            parts.append(paragraph(f"{key.replace('_', ' ')}: {definitions[key]}", "definition"))
    return Html("".join(parts))


def examples_section(out: Path, evaluation: dict[str, Any]) -> Html:
    examples = evaluation.get("examples")
    if not examples:
        return missing("eval.json examples")
    parts = []
    texts = {
        "inpainting": "The region drawn in red is regenerated for the prompt (the codes of the cells it touches are "
        "resampled, the rest fed as given); candidates best first by CLIP, with their scores.",
        "variation": "The top half of the code grid is kept and the rest resampled for the prompt; best first by CLIP.",
        "guided": "CLIP guidance (clipdalle.guide) from the kept DALL·E sample; snapshots with their CLIP score.",
    }
    for key in ("inpainting", "variation", "guided"):
        example = examples.get(key)
        if not example:
            parts.append(missing(f"eval.json examples.{key}"))
            continue
        note = texts[key] + (f" {example['steps']} steps in {example['seconds']} s." if key == "guided" else "")
        parts.append(
            f"<h3>{escape(key)}</h3>" + image_tag(out / example["picture"], key) + paragraph(note, "definition")
        )
    return Html("".join(parts))


def subset_section(out: Path) -> Html:
    subset = _read_json(out / "dalle" / "subset.json")
    if not subset:
        return paragraph("DALL·E trained on every training icon (no OUT/dalle/subset.json).")
    families, names = subset.get("families", []), subset.get("names", [])
    rule = subset.get("rule") or f"{len(families)} icon families picked with a fixed seed"
    text = (
        f"DALL·E trained on {rule} ({len(names)} icons of {len(families)} icon families) from the training split, "
        "so that shapes become recognisable within the time budget; the seen prompts are drawn from these icons, "
        "the validation prompts from held-out families."
    )
    listing = f"<details><summary>icons</summary><pre>{escape(', '.join(names or families))}</pre></details>"
    return Html(paragraph(text) + listing)


def timings_section(timings: dict[str, Any], evaluation: dict[str, Any]) -> Html:
    parts = []
    if timings:
        total = sum(value for value in timings.values() if isinstance(value, (int, float)))
        rows = [[stage, f"{seconds:.1f}", f"{seconds / 60:.1f}"] for stage, seconds in timings.items()]
        rows.append([Html("<b>total</b>"), f"{total:.1f}", f"{total / 60:.1f}"])
        if isinstance(timings.get(DATASET_STAGE), (int, float)):
            budgeted = total - timings[DATASET_STAGE]
            label = "from the first training stage to the report (the demo's budget: 25 min)"
            rows.append([label, f"{budgeted:.1f}", f"{budgeted / 60:.1f}"])
        parts.append(table(["stage", "seconds", "minutes"], rows))
    else:
        parts.append(missing("timings.json"))
    inner = evaluation.get("timings_s")
    if inner:
        parts.append(Html("<h3>Inside the evaluation stage</h3>"))
        parts.append(table(["part", "seconds"], [[part, f"{seconds:.1f}"] for part, seconds in inner.items()]))
    return Html("".join(parts))


def package_versions() -> dict[str, str]:
    from importlib import metadata

    versions = {"python": platform.python_version()}
    for package, distribution in (
        ("clipdalle", "clipdalle"),
        ("torch", "torch"),
        ("numpy", "numpy"),
        ("faiss", "faiss-cpu"),
        ("pillow", "pillow"),
        ("tokenizers", "tokenizers"),
    ):
        try:
            versions[package] = metadata.version(distribution)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    if versions["faiss"] == "not installed":
        try:
            import faiss

            versions["faiss"] = getattr(faiss, "__version__", "installed")
        except ImportError:
            pass
    return versions


def configuration_section(out: Path, summary: dict[str, Any], evaluation: dict[str, Any]) -> Html:
    parts = [table(["package", "version"], [[name, version] for name, version in package_versions().items()])]
    parts.append(paragraph(f"machine: {platform.platform()}, {platform.machine()}"))
    for folder, label in RUNS:
        config = _read_json(out / folder / "config.json")
        body = (
            f"<pre>{escape(json.dumps(config, indent=2))}</pre>"
            if config
            else missing(str(out / folder / "config.json"))
        )
        parts.append(
            f"<details><summary>{escape(label)}: {escape(out / folder / 'config.json')}</summary>{body}</details>"
        )
    settings = evaluation.get("settings")
    if settings:
        shown = escape(json.dumps(settings, indent=2))
        parts.append(f"<details><summary>evaluation settings</summary><pre>{shown}</pre></details>")
    if summary:
        shown = {key: value for key, value in summary.items() if key not in ("vae",)}
        parts.append(
            f"<details><summary>summary.json</summary><pre>{escape(json.dumps(shown, indent=2))}</pre></details>"
        )
    return Html("".join(parts))


# ------------------------------------------------------------------------------------------ the page


def render_report(out: Path) -> str:
    """The report's HTML for the pipeline outputs in `out`."""
    out = Path(out)
    summary = _read_json(out / "summary.json")
    evaluation = _read_json(out / "eval.json")
    timings = _read_json(out / "timings.json") or summary.get("timings_s", {})
    bodies = {
        "quality-bar": quality_bar_section(evaluation),
        "tokenizer": tokenizer_section(out, summary),
        "losses": losses_section(out),
        "gallery": gallery_section(out, evaluation),
        "generation": generation_section(evaluation),
        "clip": clip_section(evaluation),
        "examples": examples_section(out, evaluation),
        "subset": subset_section(out),
        "timings": timings_section(timings, evaluation),
        "configuration": configuration_section(out, summary, evaluation),
    }
    rows = evaluation.get("quality_bar", [])
    judged = [row for row in rows if row["pass"] is not None]
    headline = (
        f"{sum(row['pass'] for row in judged)} of {len(judged)} quality-bar targets met"
        if judged
        else "no evaluation yet"
    )
    total = sum(value for value in timings.values() if isinstance(value, (int, float)))
    preset = summary.get("preset", evaluation.get("settings", {}).get("preset", "?"))
    created = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    nav = "".join(f'<a href="#{anchor}">{escape(title)}</a>' for anchor, title in SECTIONS)
    sections = "".join(
        f'<section id="{anchor}"><h2>{escape(title)}</h2>{bodies[anchor]}</section>' for anchor, title in SECTIONS
    )
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        f"<title>clipdalle demo report ({escape(preset)})</title><style>{STYLE}</style></head><body>"
        f"<h1>clipdalle demo: DALL·E, CLIP and a dVAE trained from scratch on icons</h1>"
        f"<p>preset <b>{escape(preset)}</b> · {escape(headline)} · pipeline time {total / 60:.1f} min · "
        f"written {escape(created)} from {escape(out)}</p><nav>{nav}</nav>{sections}</body></html>\n"
    )


def write_report(out: Path) -> Path:
    """Writes OUT/report.html (self-contained: inline style, images as data: URIs) and returns its path."""
    out = Path(out)
    page = render_report(out)
    path = out / "report.html"
    atomic_write(path, lambda temporary: temporary.write_text(page, encoding="utf-8"))
    return path
