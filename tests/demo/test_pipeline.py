"""The main job's pipeline on a dozen icons at 16 px with tiny models: every stage runs (dVAE and CLIP side by side
in two processes), a re-run skips them all, a killed DALL·E training resumes, and a failing process stops the
pipeline with its one-line error."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from helpers import lock_held_by_another_process

from clipdalle import checkpoint, cli
from clipdalle.config import load_preset, to_dict
from clipdalle.data import icons
from clipdalle.demo import icon_collection, pipeline
from clipdalle.demo import jobs as pipeline_jobs

STAGES = [
    "icon dataset",
    "dVAE + CLIP training",
    "dVAE evaluation",
    "DALL·E data",
    "DALL·E training",
    "index",
    "evaluation",
    "report",
]


QUIET = {"eval_every": 1000, "log_every": 10}  # one evaluation (and loss plot) at the last step: plots take seconds


def skipped_stages(printed: str) -> set[str]:
    """The stages the pipeline's stderr says it skipped ("[3/8] dVAE evaluation: complete, skipped")."""
    return {line.split("] ", 1)[1].split(":")[0] for line in printed.splitlines() if "complete, skipped" in line}


def tiny_spec(dalle_train=None, clip_model=None, vae_train=None):
    return {
        "icons": {"size": 16, "colours": 2},
        "vae": {"preset": "tiny", "train": {"steps": 20, **QUIET, **(vae_train or {})}},
        "clip": {
            "preset": "tiny",
            "model": {"image_size": 16, "vision_patch_size": 4, **(clip_model or {})},
            "train": {"steps": 20, **QUIET},
            "oversample_dalle_icons": 2,  # CLIP also reads DALL·E's icons, twice an epoch
            "colour_captions": 1,  # and those icons once more, captioned by their colour alone
        },
        "dalle": {"preset": "tiny", "families": 3, "train": {"steps": 20, **QUIET, **(dalle_train or {})}},
        "eval": {"prompts": 4, "val_prompts": 6, "samples": 4, "seed": 0},  # the validation set has its own count
        "threads": 1,
        "expected_s": {name: 1 for name in STAGES},
    }


@pytest.fixture
def twelve_icons(monkeypatch):
    """3 validation and 9 training icons (from distinct families) stand in for all 7,367."""
    names = icons.icon_names()
    val = [name for name in names if icons.split_of(name) == "val"][:3]
    train, families = [], set()
    for name in names:
        if icons.split_of(name) == "train" and icons.family_of(name) not in families and len(train) < 9:
            train.append(name)
            families.add(icons.family_of(name))
    subset = sorted(val + train)
    monkeypatch.setattr(icons, "icon_names", lambda: subset)
    return subset


def write_preset(path: Path, spec: dict) -> str:
    path.write_text(json.dumps(spec))
    return str(path)


def test_pipeline_runs_every_stage_then_skips_them_and_resumes_a_killed_training(tmp_path, twelve_icons, capsys):
    preset = write_preset(tmp_path / "preset.json", tiny_spec())
    out, data_dir = tmp_path / "out", tmp_path / "data"
    summary = json.loads(pipeline.run_pipeline(preset, out, data_dir=data_dir).read_text())
    printed = capsys.readouterr().err
    for number, name in enumerate(STAGES, 1):
        assert f"[{number}/{len(STAGES)}] {name} (" in printed
    assert "min to go" in printed and f"clipdalle serve {out}" in printed and str(out / "report.html") in printed

    for run, kind in (("vae", "dvae"), ("clip", "clip"), ("dalle", "dalle")):
        checkpoint.load_model(out / run, expect=kind)
        assert pipeline_jobs.training_finished(out / run)
        assert (out / "logs" / f"{run}.log").read_text().count("\n") > 2
    clip_command = (out / "logs" / "clip.log").read_text().splitlines()[0]
    assert f"--extra-data {summary['dalle_data']}:2" in clip_command  # the subset DALL·E trains on, mixed in
    colour_data = re.search(r"--extra-data (\S+-colour):1", clip_command)  # DALL·E's training icons, by colour
    colour_lines = [json.loads(line) for line in (Path(colour_data[1]) / "metadata.jsonl").read_text().splitlines()]
    assert colour_lines and all(line["captions"] == icons.colour_captions(line["colour"]) for line in colour_lines)
    dalle_names = json.loads((out / "dalle" / "subset.json").read_text())["names"]
    assert {line["icon"] for line in colour_lines} == set(dalle_names)
    # dVAE and CLIP overlapped in time: the stage took less than the two processes one after the other
    timings, jobs = json.loads((out / "timings.json").read_text()), summary["jobs_s"]
    assert list(timings) == STAGES  # one entry per stage: they add up to the pipeline's time
    assert timings["dVAE + CLIP training"] < 0.9 * (jobs["dVAE training"] + jobs["CLIP training"])
    assert summary["timings_s"] == timings and summary["vae"]["images"] == 6  # 3 validation icons x 2 colours
    assert [entry["name"] for entry in summary["stages"]] == STAGES
    assert all(entry["load_average"]["max"] >= 0 for entry in summary["stages"])

    subset = json.loads((out / "dalle" / "subset.json").read_text())
    assert len(subset["families"]) == 3 and subset["of_families"] == 9
    assert {icons.family_of(name) for name in subset["names"]} == set(subset["families"])
    dalle_data = json.loads((Path(subset["data"]) / "split.json").read_text())
    assert sorted(dalle_data["train"]) == sorted(subset["names"])
    assert len(dalle_data["val"]) == 3  # validation icons feed DALL·E's validation loss
    assert json.loads((out / "index" / "info.json").read_text())["count"] == 6
    evaluation = json.loads((out / "eval.json").read_text())
    assert [evaluation["generation"][split]["prompts"] for split in ("seen", "val")] == [4, 6]
    html = (out / "report.html").read_text()
    assert "<html" in html.lower() and "data:image/png;base64," in html

    pipeline.run_pipeline(preset, out, data_dir=data_dir)
    assert capsys.readouterr().err.count("complete, skipped") == len(STAGES)

    # A second copy whose DALL·E training is killed mid-run by SIGKILL, then resumed by running the pipeline again.
    resumed = tmp_path / "resumed"
    shutil.copytree(out, resumed)
    pipeline_jobs.clear_run(resumed / "dalle", keep=("tokens", "subset.json"))
    (resumed / "eval.json").unlink()
    (resumed / "report.html").unlink()
    long_preset = write_preset(
        tmp_path / "long.json", tiny_spec(dalle_train={"steps": 150, "save_every": 10, "eval_every": 1000})
    )
    command = [sys.executable, "-m", "clipdalle.cli", "pipeline", "--preset", long_preset, "--out", str(resumed),
               "--data-dir", str(data_dir)]  # fmt: skip
    process = subprocess.Popen(command, stderr=subprocess.DEVNULL, start_new_session=True)
    state = resumed / "dalle" / checkpoint.TRAIN_STATE_FILE
    deadline = time.time() + 60
    while not state.exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    killed_at = checkpoint.checkpoint_step(resumed / "dalle")
    assert 0 < killed_at < 150
    pipeline.run_pipeline(long_preset, resumed, data_dir=data_dir)
    printed = capsys.readouterr().err
    assert f"DALL·E training: resuming from step {killed_at} of 150" in printed
    assert printed.count("complete, skipped") == 5  # dataset, dVAE + CLIP, dVAE eval, DALL·E data, index
    assert checkpoint.checkpoint_step(resumed / "dalle") == 150
    assert (resumed / "report.html").exists()

    # The preset's CLIP data changes (its colour-caption shard read twice an epoch): the CLIP trains again from the
    # start, and so do the stages that use it; the dVAE and DALL·E stay as they are.
    changed = tiny_spec(dalle_train={"steps": 150, "save_every": 10, "eval_every": 1000})
    changed["clip"]["colour_captions"] = 2
    vae_weights = (resumed / "vae" / "model.safetensors").read_bytes()
    pipeline.run_pipeline(write_preset(tmp_path / "changed.json", changed), resumed, data_dir=data_dir)
    printed = capsys.readouterr().err
    assert f"CLIP training: {resumed / 'clip'} was trained on other data arguments; training it again" in printed
    assert "dVAE training: " not in printed
    commands = [line for line in (resumed / "logs" / "clip.log").read_text().splitlines() if line.startswith("$ ")]
    assert "-colour:2" in commands[-1]
    assert "CLIP: resuming" not in printed  # started over, not resumed from the old run's checkpoint
    assert (resumed / "vae" / "model.safetensors").read_bytes() == vae_weights
    skipped = skipped_stages(printed)
    assert skipped >= {"DALL·E training", "DALL·E data", "dVAE evaluation"}
    assert not skipped & {"index", "evaluation", "report"}

    # The preset's CLIP training settings change (more steps): a resumed run would keep its own config, so the CLIP
    # trains again from the start with the new settings; the dVAE stays as it is.
    changed["clip"]["train"]["steps"] = 24
    pipeline.run_pipeline(write_preset(tmp_path / "more-steps.json", changed), resumed, data_dir=data_dir)
    printed = capsys.readouterr().err
    assert (
        f"CLIP training: {resumed / 'clip'} was trained with other model or training settings (config.json); "
        "training it again" in printed
    )
    assert "dVAE training: " not in printed and "CLIP: resuming" not in printed
    assert checkpoint.read_config(resumed / "clip")["train"]["steps"] == 24
    assert checkpoint.checkpoint_step(resumed / "clip") == 24
    assert (resumed / "vae" / "model.safetensors").read_bytes() == vae_weights
    pipeline.run_pipeline(write_preset(tmp_path / "more-steps.json", changed), resumed, data_dir=data_dir)
    assert capsys.readouterr().err.count("complete, skipped") == len(STAGES)  # and then it is done

    # The preset's evaluation settings change: only the evaluation and the report run again.
    changed["eval"]["val_prompts"] = 5
    pipeline.run_pipeline(write_preset(tmp_path / "other-eval.json", changed), resumed, data_dir=data_dir)
    assert skipped_stages(capsys.readouterr().err) == set(STAGES) - {"evaluation", "report"}
    assert json.loads((resumed / "eval.json").read_text())["generation"]["val"]["prompts"] == 5

    # The preset's DALL·E settings change: the DALL·E trains again from the start (not resumed), then what uses it.
    changed["dalle"]["train"]["steps"] = 160
    pipeline.run_pipeline(write_preset(tmp_path / "longer-dalle.json", changed), resumed, data_dir=data_dir)
    printed = capsys.readouterr().err
    assert f"DALL·E training: {resumed / 'dalle'} was trained with other model or training settings" in printed
    assert "DALL·E training: resuming" not in printed
    assert skipped_stages(printed) == set(STAGES) - {"DALL·E training", "evaluation", "report"}
    assert checkpoint.read_config(resumed / "dalle")["train"]["steps"] == 160
    assert checkpoint.checkpoint_step(resumed / "dalle") == 160


def test_a_failing_process_stops_the_pipeline_with_its_one_line_error(tmp_path, twelve_icons, capsys):
    # CLIP's vocabulary is below the caption tokenizer's minimum: its process fails at start; the dVAE is stopped
    spec = tiny_spec(clip_model={"vocab_size": 100}, vae_train={"steps": 5000, "save_every": 10})
    preset = write_preset(tmp_path / "preset.json", spec)
    out = tmp_path / "out"
    (out / "vae").mkdir(parents=True)
    (out / pipeline.MARKER).write_text("")  # an earlier pipeline's folder
    (out / "vae" / "stale.txt").write_text("from an earlier run")
    arguments = ["pipeline", "--preset", preset, "--out", str(out), "--data-dir", str(tmp_path / "data"), "--fresh"]
    assert cli.main(arguments) == 1
    assert not (out / "vae" / "stale.txt").exists()  # --fresh (make demo FRESH=1) started over
    error = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(error) == 1
    assert (
        "CLIP training failed" in error[0]
        and "vocab_size 100" in error[0]
        and str(out / "logs" / "clip.log") in error[0]
    )
    assert not pipeline_jobs.training_finished(out / "vae")
    assert not (out / "timings.json").exists() or "dVAE + CLIP training" not in json.loads(
        (out / "timings.json").read_text()
    )


def test_pipeline_presets_compose_model_presets_that_fit_together(tmp_path):
    demo = icon_collection.pipeline_configs(load_preset("demo"), "demo")
    assert demo["vae"][0].image_size == demo["clip"][0].image_size == 32
    assert demo["dalle"][0].image_vocab_size == demo["vae"][0].vocab_size
    assert set(load_preset("demo")["expected_s"]) == set(STAGES)
    assert sum(load_preset("demo")["expected_s"].values()) - load_preset("demo")["expected_s"]["icon dataset"] <= 1500
    small = icon_collection.pipeline_configs(load_preset("small"), "small")
    assert small["dalle"][1].steps > demo["dalle"][1].steps
    ml6 = icon_collection.pipeline_configs(load_preset("ml6"), "ml6")
    vae, clip, dalle = ml6["vae"][0], ml6["clip"][0], ml6["dalle"][0]
    assert (vae.image_size, vae.vocab_size, dalle.text_length, clip.image_size) == (128, 512, 32, 128)
    assert all(train.device == "cuda" for _, train in ml6.values())
    assert all(train.batch_size >= demo[name][1].batch_size for name, (_, train) in ml6.items())
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="preset ml6 trains on cuda but CUDA is not available"):
            pipeline.run_pipeline("ml6", tmp_path / "ml6")
        assert not (tmp_path / "ml6").exists()  # refused before creating anything


def test_pipeline_preset_errors_name_what_does_not_fit():
    spec = tiny_spec(clip_model={"image_size": 32})
    with pytest.raises(ValueError, match="clip image_size 32 differs from the icons' size 16"):
        icon_collection.pipeline_configs(spec, "p")
    spec = {**tiny_spec(), "dalle": {"preset": "tiny", "model": {"grid_size": 8}}}
    with pytest.raises(ValueError, match="grid_size 8 must be the dVAE's vocab_size 16 and grid 4"):
        icon_collection.pipeline_configs(spec, "p")
    with pytest.raises(ValueError, match="unknown section.*stages"):
        icon_collection.pipeline_configs({**tiny_spec(), "stages": []}, "p")
    spec = tiny_spec()
    spec["clip"]["colour_captions"] = "often"
    with pytest.raises(ValueError, match="clip colour_captions must be the repeats per epoch.*'often'"):
        icon_collection.pipeline_configs(spec, "p")
    for evaluation, message in (
        ({"val_prompts": "2048"}, "eval val_prompts must be a whole number >= 2, got '2048'"),
        ({"prompts": 1}, "eval prompts must be a whole number >= 2, got 1"),
        ({"val_promts": 2048}, "unknown eval setting.*val_promts"),
        ({"sampling": 0.85}, "p: eval: sampling must be an object"),
        ({"sampling": {"temprature": 0.85}}, "p: eval: sampling must be an object with keys among temperature"),
        ({"sampling": {"shortlist": 1.5}}, "p: eval: sampling shortlist must be a whole number, got 1.5"),
        ({"sampling": {"temperature": "low"}}, "p: eval: sampling temperature must be a number, got 'low'"),
    ):
        with pytest.raises(ValueError, match=message):
            icon_collection.pipeline_configs({**tiny_spec(), "eval": evaluation}, "p")


def test_a_run_is_current_while_its_config_holds_the_presets_settings(tmp_path):
    model, train = icon_collection.pipeline_configs(tiny_spec(), "p")["clip"]
    run = tmp_path / "clip"
    run.mkdir()
    assert pipeline.settings_current(run, (model, train))  # nothing trained yet: nothing to compare

    def saved(model, train):
        config = {"clipdalle": {"model_type": "clip", "format_version": 1}, "model": to_dict(model)}
        (run / checkpoint.CONFIG_FILE).write_text(json.dumps({**config, "train": to_dict(train)}))

    saved(model, train)
    assert pipeline.settings_current(run, (model, train))
    assert not pipeline.settings_current(run, (model, replace(train, lr=train.lr / 2)))
    assert not pipeline.settings_current(run, (replace(model, embed_dim=model.embed_dim * 2), train))
    # with epochs, training sets the steps itself (recipes.with_epochs): the run's own count is not a change
    by_epochs = replace(train, epochs=2.0)
    saved(model, replace(by_epochs, steps=37))
    assert pipeline.settings_current(run, (model, by_epochs))
    assert not pipeline.settings_current(run, (model, replace(by_epochs, epochs=3.0)))


def test_dalle_icons_follow_the_preset_rule():
    train = [name for name in icons.icon_names() if icons.split_of(name) == "train"]
    common, rule = icon_collection.dalle_icons(train, {"common_icons": 2})
    assert common == icons.common_icons(train, 2) and f"the {len(common)} icons" in rule
    drawn, rule = icon_collection.dalle_icons(train, {"families": 3}, seed=1)
    assert len({icons.family_of(name) for name in drawn}) == 3 and "drawn at random (seed 1)" in rule
    assert icon_collection.dalle_icons(train, {})[0] == train
    with pytest.raises(ValueError, match="common_icons: expected 1 to 5"):
        icon_collection.dalle_icons(train, {"common_icons": 0})


def test_families_are_chosen_by_seed_and_eta_follows_measured_speed():
    names = ["account", "account-outline", "alarm", "bell", "bell-off", "camera", "dog"]
    first = icon_collection.choose_families(names, 3, seed=0)
    assert first == icon_collection.choose_families(list(reversed(names)), 3, seed=0) and len(first) == 3
    assert set(first) <= {"account", "alarm", "bell", "camera", "dog"}
    assert icon_collection.choose_families(names, None) == ["account", "alarm", "bell", "camera", "dog"]
    with pytest.raises(ValueError, match="got 0"):
        icon_collection.choose_families(names, 0)

    expected = {"a": 100.0, "b": 200.0, "c": 300.0}
    assert pipeline.eta_seconds(expected, {}, ["b", "c"]) == 500.0
    assert pipeline.eta_seconds(expected, {"a": 200.0}, ["b", "c"]) == 1000.0  # twice as slow as expected
    assert pipeline.eta_seconds(expected, {"a": 10_000.0}, ["c"]) == 1200.0  # clamped at 4x
    assert pipeline.eta_seconds({}, {}, ["c"]) is None


def test_one_line_error_prefers_the_cli_error_line():
    assert pipeline_jobs.one_line_error(["step 1", "error: bad thing", "Traceback"]) == "bad thing"
    assert pipeline_jobs.one_line_error(["Traceback (most recent call last):", "  File x", "KeyError: 'k'", ""]) == (
        "KeyError: 'k'"
    )


def test_fresh_never_deletes_a_folder_the_pipeline_did_not_make(tmp_path, capsys):
    preset = write_preset(tmp_path / "preset.json", tiny_spec())
    mine = tmp_path / "my-photos"
    mine.mkdir()
    (mine / "holiday.jpg").write_bytes(b"irreplaceable")
    for flags in (["--fresh"], []):
        code = cli.main(["pipeline", "--preset", preset, "--out", str(mine), "--data-dir", str(tmp_path / "d"), *flags])
        error = capsys.readouterr().err.strip().splitlines()
        assert code == 1 and len(error) == 1 and "did not make" in error[0] and str(mine) in error[0]
        assert (mine / "holiday.jpg").read_bytes() == b"irreplaceable" and sorted(p.name for p in mine.iterdir()) == [
            "holiday.jpg"
        ]


def test_a_second_pipeline_on_one_folder_is_refused_and_deletes_nothing(tmp_path, capsys):
    preset = write_preset(tmp_path / "preset.json", tiny_spec())
    out = tmp_path / "out"
    (out / "vae").mkdir(parents=True)
    (out / pipeline.MARKER).write_text("made by clipdalle pipeline")
    (out / "vae" / "config.json").write_text("{}")
    with lock_held_by_another_process(out) as other:
        argv = ["pipeline", "--preset", preset, "--out", str(out), "--data-dir", str(tmp_path / "d"), "--fresh"]
        code = cli.main(argv)
    error = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(error) == 1 and f"pid {other}" in error[0] and str(out) in error[0]
    assert (out / "vae" / "config.json").read_text() == "{}"
