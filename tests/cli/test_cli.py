"""The command line: one-line errors, flags from config fields, and the issue-1 commands end to end."""

import json

import pytest
from helpers import assert_one_line_error, run

from clipdalle import checkpoint
from clipdalle.data import icons
from clipdalle.data.sources import DataWarning


def test_unknown_flag_lists_the_valid_ones(capsys, shapes_folder, tmp_path):
    code, _, err = run(
        capsys, "train", "vae", "--data", str(shapes_folder), "--out", str(tmp_path / "r"), "--n-emdb", "4"
    )
    assert_one_line_error(code, err, "unknown option(s) --n-emdb", "valid options:", "--n-embd", "--batch-size")


def test_bad_flag_value_is_one_line(capsys, shapes_folder, tmp_path):
    code, _, err = run(
        capsys, "train", "vae", "--data", str(shapes_folder), "--out", str(tmp_path / "r"), "--steps", "x"
    )
    assert_one_line_error(code, err, "--steps", "invalid int value")


def test_missing_dataset_names_the_path(capsys, tmp_path):
    code, _, err = run(capsys, "train", "vae", "--data", str(tmp_path / "nothing"), "--out", str(tmp_path / "r"))
    assert_one_line_error(code, err, str(tmp_path / "nothing"))


def test_unknown_preset_lists_presets(capsys, shapes_folder, tmp_path):
    code, _, err = run(
        capsys, "train", "vae", "--data", str(shapes_folder), "--out", str(tmp_path / "r"), "--preset", "zz"
    )
    assert_one_line_error(code, err, "preset 'vae-zz': not found", "available presets:", "vae-tiny")


def test_train_vae_then_refuse_to_overwrite_then_resume_longer(capsys, shapes_folder, tmp_path):
    out = tmp_path / "vae"
    base = ["train", "vae", "--data", str(shapes_folder), "--out", str(out), "--preset", "tiny", "--steps", "6"]
    code, stdout, err = run(capsys, *base, "--eval-every", "3", "--save-every", "3")
    assert code == 0, err
    config = json.loads((out / "config.json").read_text())
    assert config["clipdalle"]["model_type"] == "dvae" and config["train"]["steps"] == 6
    assert (out / "samples" / "step_000006.png").exists() and (out / "metrics.csv").exists()
    code, _, err = run(capsys, *base)
    assert_one_line_error(code, err, "a run already exists there; pass --resume")
    code, _, err = run(capsys, *base[:-1], "8", "--resume")
    assert code == 0, err
    assert checkpoint.checkpoint_step(out) == 8
    code, _, err = run(capsys, *base[:-1], "9", "--resume", "--n-embd", "64")
    assert_one_line_error(code, err, "cannot change model fields of a run being resumed (n_embd)")


def test_tokenizer_train(capsys, shapes_folder, tmp_path):
    from clipdalle.tokenizers import CaptionTokenizer

    out = tmp_path / "tok.json"
    code, stdout, err = run(
        capsys, "tokenizer", "train", "--data", str(shapes_folder), "--vocab-size", "300", "--out", str(out)
    )
    assert code == 0, err
    tokenizer = CaptionTokenizer.load(out)
    assert tokenizer.decode(tokenizer.encode(["a red circle"], 8)) == ["a red circle"]


def test_data_icons(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(icons, "icon_names", lambda: ["account", "home", "heart", "star"])
    code, stdout, err = run(capsys, "data", "icons", "--out", str(tmp_path / "icons"), "--colours", "2")
    assert code == 0, err
    assert "wrote 8 images of 4 icons" in stdout
    assert icons.is_complete(tmp_path / "icons", captions="full")
    code, stdout, err = run(capsys, "data", "icons", "--out", str(tmp_path / "colour"), "--colours", "2",
                            "--captions", "colour")  # fmt: skip
    assert code == 0, err
    assert icons.is_complete(tmp_path / "colour", captions="colour")
    lines = (tmp_path / "colour" / "metadata.jsonl").read_text().splitlines()
    assert {tuple(json.loads(line)["captions"]) for line in lines} == {
        tuple(icons.colour_captions(colour)) for colour in ("red", "orange")
    }


def test_wrong_kind_of_path_for_a_run(capsys, tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "config.json").write_text('{"model_type": "clip"}')
    code, _, err = run(capsys, "train", "vae", "--data", str(tmp_path), "--out", str(tmp_path / "x"), "--resume")
    assert_one_line_error(code, err, "not a clipdalle run config", "found model_type 'clip'")


@pytest.mark.parametrize("argv", [[], ["train"], ["nonsense"]])
def test_incomplete_commands_are_one_line_errors(capsys, argv):
    code, _, err = run(capsys, *argv)
    assert_one_line_error(code, err, "clipdalle")


def test_a_bad_caption_is_skipped_through_a_resumed_run_and_never_read_for_images(
    capsys, shapes_folder, tiny_clip_run, tmp_path
):
    bad = shapes_folder / "circle_red_0.txt"
    bad.write_bytes("un cercle rouge, très rouge".encode("latin-1"))
    out = tmp_path / "clip"
    base = ["train", "clip", "--data", str(shapes_folder), "--out", str(out), "--preset", "tiny"]
    for steps, resume in (("8", []), ("16", ["--resume"])):
        with pytest.warns(DataWarning, match=f"{bad}: caption skipped with its image, not UTF-8"):
            code, _, err = run(capsys, *base, "--steps", steps, "--save-every", "4", "--eval-every", "8", *resume)
        assert code == 0 and "unreadable sample(s) skipped" in err, err
    assert checkpoint.checkpoint_step(out) == 16
    rows = [line.split(",") for line in (out / "metrics.csv").read_text().splitlines()[1:]]
    assert max(float(value) for _, split, name, value in rows if name == "skipped_images") >= 1

    code, _, err = run(capsys, "train", "vae", "--data", str(shapes_folder), "--out", str(tmp_path / "vae"),
                       "--preset", "tiny", "--steps", "4", "--num-workers", "1")  # fmt: skip
    assert code == 0 and str(bad) not in err, err  # the dVAE never opens a caption

    code, stdout, err = run(capsys, "index", "build", "--clip", str(tiny_clip_run), "--data", str(shapes_folder),
                            "--out", str(tmp_path / "index"), "--num-workers", "1")  # fmt: skip
    assert code == 0, err
    info = json.loads(stdout)
    assert info["skipped"] == 1 and info["count"] + info["duplicates"] == 31
