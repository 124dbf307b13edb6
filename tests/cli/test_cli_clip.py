"""CLIP from the command line: train, classify, probe, convert; errors are one line."""

import json

import pytest
import torch
from helpers import assert_one_line_error, run

from clipdalle import clip


def test_trained_run_has_tokenizer_metrics_and_first_eos_pooling(tiny_clip_run):
    config = json.loads((tiny_clip_run / "config.json").read_text())
    assert config["clipdalle"]["model_type"] == "clip"
    assert config["model"]["text_pooling"] == "first_eos"
    assert (tiny_clip_run / "tokenizer.json").exists()
    metrics = (tiny_clip_run / "metrics.csv").read_text()
    assert "val,zero_shot_accuracy" in metrics and "val,image_to_text_r1" in metrics
    assert list((tiny_clip_run / "samples").glob("step_*.png"))  # the similarity heat map


def test_classify_json_lists_best_first(capsys, tiny_clip_run, shapes_32):
    images = sorted(shapes_32.glob("*.png"))[:3]
    code, out, err = run(
        capsys,
        "classify",
        "--clip",
        str(tiny_clip_run),
        "--labels",
        "a red circle,a blue square,a green cross",
        "--top",
        "2",
        "--json",
        *map(str, images),
    )
    assert code == 0, err
    results = json.loads(out)
    assert [r["image"] for r in results] == [str(p) for p in images]
    for result in results:
        assert len(result["top"]) == 2
        assert result["top"][0]["prob"] >= result["top"][1]["prob"]


def test_classify_errors(capsys, tiny_clip_run, tmp_path):
    code, _, err = run(capsys, "classify", "--clip", str(tiny_clip_run), "--labels", "cat", str(tmp_path))
    assert_one_line_error(code, err, "at least two labels")
    code, _, err = run(capsys, "classify", "--clip", str(tiny_clip_run), "--labels", "a,b", str(tmp_path / "x.png"))
    assert_one_line_error(code, err, "x.png: no such image")
    code, _, err = run(capsys, "classify", "--clip", str(tmp_path), "--labels", "a,b", str(tmp_path))
    assert code == 1 and "Traceback" not in err


def test_probe_reports_probe_and_zero_shot(capsys, tiny_clip_run, shapes_32, tmp_path):
    labelled = tmp_path / "labelled"
    for path in shapes_32.glob("*.png"):
        colour = path.stem.split("_")[1]
        (labelled / colour).mkdir(parents=True, exist_ok=True)
        (labelled / colour / path.name).write_bytes(path.read_bytes())
    code, out, err = run(capsys, "probe", "--clip", str(tiny_clip_run), "--data", str(labelled))
    assert code == 0, err
    results = json.loads(out)
    assert results["classes"] == 4 and results["chance"] == 0.25
    assert 0 <= results["linear_probe_accuracy"] <= 1 and 0 <= results["zero_shot_accuracy"] <= 1


def test_convert_to_hf_and_back_gives_the_same_features(capsys, tiny_clip_run, tmp_path):
    pytest.importorskip("transformers")
    code, _, err = run(capsys, "convert", str(tiny_clip_run), "--to", "hf", "--out", str(tmp_path / "hf"))
    assert code == 0, err
    ours, _, tokenizer = clip.load(tiny_clip_run)
    converted, _, _ = clip.load(tmp_path / "hf", tokenizer=tokenizer)
    images = torch.rand(2, 3, 32, 32)
    text = tokenizer(["a red circle", "a blue square"], ours.config.context_length)
    torch.testing.assert_close(converted.encode_image(images), ours.encode_image(images), atol=1e-5, rtol=0)
    torch.testing.assert_close(converted.encode_text(text), ours.encode_text(text), atol=1e-5, rtol=0)


def test_train_clip_rejects_model_flags_with_init(capsys, tiny_clip_run, shapes_32, tmp_path):
    code, _, err = run(
        capsys,
        "train",
        "clip",
        "--data",
        str(shapes_32),
        "--out",
        str(tmp_path / "ft"),
        "--init",
        str(tiny_clip_run),
        "--n-embd",
        "8",
    )
    assert code == 1  # --n-embd is not a CLIP field
    code, _, err = run(
        capsys,
        "train",
        "clip",
        "--data",
        str(shapes_32),
        "--out",
        str(tmp_path / "ft"),
        "--init",
        str(tiny_clip_run),
        "--embed-dim",
        "8",
    )
    assert_one_line_error(code, err, "--init takes the model's shape from its weights; drop --embed-dim")


def test_fine_tune_from_a_run_with_locked_image_tower(capsys, tiny_clip_run, shapes_32, tmp_path):
    out = tmp_path / "ft"
    code, _, err = run(
        capsys,
        "train",
        "clip",
        "--data",
        str(shapes_32),
        "--out",
        str(out),
        "--init",
        str(tiny_clip_run),
        "--lock-image",
        "--steps",
        "4",
        "--eval-every",
        "4",
    )
    assert code == 0, err
    before, _, _ = clip.load(tiny_clip_run)
    after, _, _ = clip.load(out)
    assert torch.equal(before.visual.conv1.weight, after.visual.conv1.weight)
    assert not torch.equal(before.token_embedding.weight, after.token_embedding.weight)


def test_load_gives_a_tokenizer_that_takes_just_texts(tiny_clip_run):
    model, preprocess, tokenizer = clip.load(tiny_clip_run)
    text = tokenizer(["a red circle", "a blue cross"])
    assert text.shape == (2, model.config.context_length)
    logits_per_image, logits_per_text = model.logits(torch.rand(3, 3, 32, 32), text)
    assert logits_per_image.shape == (3, 2) and logits_per_text.shape == (2, 3)
