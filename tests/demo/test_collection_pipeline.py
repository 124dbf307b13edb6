"""The pipeline on a tiny folder of one's own (coloured shapes, not icons): the data report and its split, captions
from names, --dry-run, every stage end to end with a tiny plan, a re-run that skips them, and the report against a
baseline."""

import json
import os

import pytest
import torch
from helpers import assert_one_line_error, make_shapes_folder, run
from PIL import Image

from clipdalle import checkpoint
from clipdalle.config import load_preset
from clipdalle.demo import collection_report, heldout, inspection
from clipdalle.evaluate import copy_share, distinct_share, within_prompt_diversity

QUIET = {"eval_every": 10, "save_every": 10, "log_every": 5, "steps": 20}


def tiny_plan():
    """A plan as OUT/plan.json holds one, with the tiny presets' models at 16 px (what the planner would size)."""
    vae, clip, dalle = (load_preset(f"{kind}-tiny") for kind in ("vae", "clip", "dalle"))
    return {
        "description": "a tiny plan for tests",
        "images": {"size": 16, "grid": 4},
        "text_length": 16,
        "vae": {"model": vae["model"], "train": {**vae["train"], **QUIET, "early_stop": 2, "crop_scale": 0.8}},
        "clip": {
            "model": {**clip["model"], "image_size": 16, "vision_patch_size": 4},
            "train": {**clip["train"], **QUIET, "caption_templates": "{}|a picture of {}"},
        },
        "dalle": {
            "model": {**dalle["model"], "dropout": 0.1},
            "train": {**dalle["train"], **QUIET, "code_views": 2, "crop_scale": 0.8},
        },
        "eval": {"prompts": 4, "samples": 2, "seed": 0},
        "threads": {"pair": 1, "alone": 1},
        "weights": "best",
        "regularise": True,
    }


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return make_shapes_folder(tmp_path_factory.mktemp("mine") / "shapes", size=16, repeats=3)


def test_the_data_report_finds_duplicates_and_keeps_them_on_one_side_of_the_split(shapes):
    report, items = inspection.inspect_collection(shapes, progress=False)
    assert report["readable"] == 48 and report["kind"] == "folder"
    assert report["split"]["train"] + report["split"]["val"] == 48 and report["split"]["val"] >= 2
    assert report["exact_duplicates"]["groups"] > 0 and report["split"]["duplicates_across_split"] == 0
    assert report["captions"]["tokens"]["max"] <= 8 and report["captions"]["per_image"]["max"] == 2
    text = inspection.format_report(report)
    assert "48 readable of 48" in text and "held out" in text and "identical images" in text
    pairs = inspection.near_duplicate_pairs(torch.tensor([[0.0, 0.0], [0.001, 0.0], [1.0, 1.0]]).numpy())
    assert pairs == [(0, 1)] and inspection.duplicate_groups(4, [(2, 3), (1, 2)]) == [0, 1, 1, 1]


def test_captions_from_names_and_a_captionless_folder_is_a_one_line_error(capsys, tmp_path):
    for folder, breeds in (("dogs", ("beagle", "poodle", "husky")), ("cats", ("tabby", "siamese"))):
        (tmp_path / "pets" / folder).mkdir(parents=True)
        for index in range(20):
            name = f"{breeds[index % len(breeds)]}_{index:02d}"
            colour = (12 * index, 100 if folder == "dogs" else 200, 7 * index)
            Image.new("RGB", (24, 24), colour).save(tmp_path / "pets" / folder / f"{name}.png")
    code, _, err = run(
        capsys, "pipeline", "--data", str(tmp_path / "pets"), "--out", str(tmp_path / "out"), "--dry-run"
    )
    assert_one_line_error(code, err, "have no caption", "--captions-from names")
    report, items = inspection.inspect_collection(tmp_path / "pets", captions_from="names", progress=False)
    assert report["captions"]["from"] == "file and folder names"
    assert {item.captions[0] for item in items} == {"beagle, dogs", "poodle, dogs", "husky, dogs", "tabby, cats",
                                                    "siamese, cats"}  # fmt: skip


def test_dry_run_prints_the_report_and_the_plan_and_writes_nothing(capsys, shapes, tmp_path):
    out = tmp_path / "out"
    base = ["pipeline", "--data", str(shapes), "--out", str(out), "--dry-run", "--budget", "5m"]
    code, _, err = run(capsys, *base)
    assert code == 0, err
    assert "data: " in err and "48 readable" in err and "plan: planned for" in err and "expected:" in err
    assert f"dry run: nothing written; the pipeline writes this plan to {out / 'plan.json'}" in err
    assert not out.exists()
    code, _, err = run(capsys, "pipeline", "--data", str(shapes), "--out", str(out), "--budget", "soon")
    assert_one_line_error(code, err, "--budget 'soon'")
    code, _, err = run(capsys, "pipeline", "--data", str(shapes), "--dry-run")
    assert_one_line_error(code, err, "give --out DIR")
    code, _, err = run(capsys, "pipeline", "--clip", "runs/clip", "--dry-run")
    assert_one_line_error(code, err, "--clip applies to a collection of your own")
    code, _, err = run(capsys, *base, "--clip", "ViT-B/32")  # a model name is planned for, nothing fetched on a dry run
    assert code == 0 and "the existing CLIP ViT-B/32" in err, err
    code, _, err = run(capsys, *base, "--clip", str(tmp_path / "nowhere"))
    assert_one_line_error(code, err, "nor a model name")


def test_the_whole_pipeline_on_a_tiny_folder(capsys, shapes, tmp_path):
    plan_path = tmp_path / "plan.json"
    plan_path.write_text(json.dumps(tiny_plan()))
    out = tmp_path / "out"
    code, _, err = run(capsys, "pipeline", "--data", str(shapes), "--out", str(out), "--preset", str(plan_path))
    assert code == 0, err
    for number, name in enumerate(["data report", "dVAE + CLIP training", "dVAE evaluation", "DALL·E data"], 1):
        assert f"[{number}/8] {name}" in err
    assert "codes of" in err and "2 view(s) per training image" in err
    split = [json.loads(line) for line in (out / "data" / "val.jsonl").read_text().splitlines()]
    assert split and all(os.path.isabs(row["image"]) and row["caption"] for row in split)
    for run_name in ("vae", "clip", "dalle"):
        assert (out / run_name / "best" / "model.safetensors").exists()
        assert checkpoint.checkpoint_step(out / run_name) == 20
    metrics = json.loads((out / "eval.json").read_text())
    assert metrics["kind"] == "collection" and metrics["settings"]["weights"] == "best"
    assert metrics["losses"]["held_out"]["images"] == len(split)
    for split_name in ("train", "val"):
        figures = metrics["generation"][split_name]
        assert figures["prompts"] <= 4 and figures["samples"] == 2
        assert 0 <= figures["r_precision_kept"] <= 1 and 0.5 <= figures["distinct_grids"] <= 1
    assert json.loads((out / "index" / "info.json").read_text())["count"] >= 16  # identical images stored once
    html = (out / "report.html").read_text()
    assert "Held-out figures" in html and "best weights kept" in html and "data:image/png;base64," in html

    code, _, err = run(capsys, "pipeline", "--data", str(shapes), "--out", str(out), "--preset", str(plan_path))
    assert code == 0 and err.count("complete, skipped") == 8
    page = collection_report.render_report(out, baseline=str(out))  # a run against itself: no clear difference
    assert "Against the baseline" in page and "no clear difference" in page and ">better<" not in page

    # --clip: an existing CLIP reranks and indexes; no CLIP is trained
    reused = tmp_path / "reused"
    argv = [
        "pipeline",
        "--data",
        str(shapes),
        "--out",
        str(reused),
        "--preset",
        str(plan_path),
        "--clip",
        str(out / "clip"),
    ]
    code, _, err = run(capsys, *argv)
    assert code == 0, err
    assert not (reused / "clip" / checkpoint.WEIGHTS_FILE).exists() and (reused / "vae" / "best").is_dir()
    metrics = json.loads((reused / "eval.json").read_text())
    assert metrics["settings"]["clip"] == str(out / "clip")
    assert json.loads((reused / "index" / "info.json").read_text())["count"] >= 16


def test_diversity_and_copies_are_measured_per_prompt():
    features = torch.nn.functional.normalize(torch.randn(3, 4, 8), dim=-1)
    features[0] = features[0, :1]  # prompt 0: four times the same image
    diversity = within_prompt_diversity(features)
    assert diversity[0].abs() < 1e-6 and (diversity[1:] > 0.2).all()
    codes = torch.tensor([[[1, 2], [1, 2]], [[1, 2], [3, 4]]])  # (P=2, n=2, 2)
    assert distinct_share(codes).tolist() == [0.5, 1.0]
    assert copy_share(codes.flatten(0, 1), torch.tensor([[1, 2], [9, 9]])) == 0.75


def test_comparison_rows_say_better_only_when_the_interval_is_on_one_side():
    base = {"losses": {"held_out": {"dalle": {"loss": 3.0}}}, "generation": {"val": {"diversity": 0.1}},
            "per_prompt": {"val": {"diversity": [0.1] * 20}}, "prompts": ["p"]}  # fmt: skip
    better = {"losses": {"held_out": {"dalle": {"loss": 2.5}}}, "generation": {"val": {"diversity": 0.3}},
              "per_prompt": {"val": {"diversity": [0.3 + 0.01 * i for i in range(20)]}}, "prompts": ["p"]}  # fmt: skip
    rows = {row["figure"]: row for row in heldout.compare(better, base)}
    assert rows["held-out DALL·E loss (nats/token)"]["better"] is True  # lower loss
    diversity = rows["held-out captions: diversity"]
    assert diversity["better"] is True and diversity["interval"][0] > 0
    assert heldout.compare(base, better)[0]["better"] is False


def test_the_pipeline_fetches_a_clip_named_by_the_user_and_uses_it(capsys, shapes, tmp_path, model_server):
    plan_path = tmp_path / "plan.json"
    plan_path.write_text(json.dumps(tiny_plan()))
    out = tmp_path / "out"
    argv = ["pipeline", "--data", str(shapes), "--out", str(out), "--preset", str(plan_path), "--clip", "ViT-B/32"]
    code, _, err = run(capsys, *argv)
    assert code == 0, err
    assert model_server.count("GET") > 0  # fetched from the (local) server
    assert not (out / "clip" / checkpoint.WEIGHTS_FILE).exists()  # no CLIP trained
    metrics = json.loads((out / "eval.json").read_text())
    assert metrics["settings"]["clip"] == "ViT-B/32"
    assert 0 <= metrics["generation"]["val"]["r_precision_kept"] <= 1
    info = json.loads((out / "index" / "info.json").read_text())
    assert info["count"] >= 16 and "ViT-B/32" in json.dumps(info)
    fetched = model_server.count("GET")
    code, _, err = run(capsys, *argv)  # again: every stage complete, nothing fetched anew
    assert code == 0 and err.count("complete, skipped") == 8 and model_server.count("GET") == fetched
