"""DALL·E from the command line: train on cached codes, generate with reranking, inpaint, variations."""

import json

from helpers import assert_one_line_error, run


def test_dalle_run_is_self_contained(tiny_runs):
    _, dalle = tiny_runs
    config = json.loads((dalle / "config.json").read_text())
    assert config["clipdalle"]["model_type"] == "dalle"
    assert (dalle / "vae" / "model.safetensors").exists() and (dalle / "tokenizer.json").exists()
    assert json.loads((dalle / "tokens" / "info.json").read_text())["counts"]["train"] == 64
    assert "val,image_bits" in (dalle / "metrics.csv").read_text()
    assert (dalle / "samples" / "step_000012.png").exists()


def test_generate_reranks_with_clip(capsys, tiny_runs, tiny_clip_run, tmp_path):
    _, dalle = tiny_runs
    out = tmp_path / "gen"
    code, _, err = run(
        capsys,
        "generate",
        "--dalle",
        str(dalle),
        "--clip",
        str(tiny_clip_run),
        "a red circle",
        "a blue cross",
        "-n",
        "4",
        "--keep",
        "2",
        "--seed",
        "3",
        "--out",
        str(out),
    )
    assert code == 0, err
    results = json.loads((out / "results.json").read_text())
    assert [r["prompt"] for r in results] == ["a red circle"] * 2 + ["a blue cross"] * 2
    for first, second in (results[0:2], results[2:4]):
        assert first["clip_score"] >= second["clip_score"]
    assert all((out / r["file"]).exists() for r in results) and (out / "grid.png").exists()
    assert all(r["notice"] is None for r in results)  # training captions: nothing to warn about
    shortlisted = tmp_path / "shortlisted"
    args = ["--dalle", str(dalle), "--clip", str(tiny_clip_run), "a red circle", "-n", "4", "--keep", "1"]
    code, _, err = run(capsys, "generate", *args, "--seed", "3", "--shortlist", "2", "--out", str(shortlisted))
    assert code == 0, err
    kept = json.loads((shortlisted / "results.json").read_text())
    assert len(kept) == 1 and kept[0]["seed"] in {r["seed"] for r in results[:2]}  # one of CLIP's best two
    code, _, err = run(capsys, "generate", "--dalle", str(dalle), "a purple hexagon", "-n", "1", "--out", str(out))
    assert code == 0 and "warning: prompt 'a purple hexagon': not in this model's training set: purple, hexagon" in err
    assert json.loads((out / "results.json").read_text())[0]["notice"].endswith("expect a guess")


def test_inpaint_and_variations_write_results(capsys, tiny_runs, shapes_32, tmp_path):
    _, dalle = tiny_runs
    image = str(shapes_32 / "circle_red_0.png")
    code, _, err = run(
        capsys,
        "inpaint",
        "--dalle",
        str(dalle),
        "--image",
        image,
        "--box",
        "0,0,8,8",
        "a red square",
        "-n",
        "2",
        "--out",
        str(tmp_path / "in"),
    )
    assert code == 0, err
    assert len(json.loads((tmp_path / "in" / "results.json").read_text())) == 2
    code, _, err = run(
        capsys,
        "variations",
        "--dalle",
        str(dalle),
        "--image",
        image,
        "a red circle",
        "-n",
        "2",
        "--out",
        str(tmp_path / "var"),
    )
    assert code == 0, err
    assert (tmp_path / "var" / "grid.png").exists()


def test_sampling_errors_are_one_line(capsys, tiny_runs, shapes_32, tmp_path):
    vae, dalle = tiny_runs
    image = str(shapes_32 / "circle_red_0.png")
    code, _, err = run(capsys, "inpaint", "--dalle", str(dalle), "--image", image, "x", "--out", str(tmp_path / "o"))
    assert_one_line_error(code, err, "exactly one of --box")
    code, _, err = run(
        capsys, "inpaint", "--dalle", str(dalle), "--image", image, "--box", "1,2,3", "x", "--out", str(tmp_path / "o")
    )
    assert_one_line_error(code, err, "expected x0,y0,x1,y1")
    code, _, err = run(capsys, "generate", "--dalle", str(vae), "x", "--out", str(tmp_path / "o"))
    assert_one_line_error(code, err, "is a dvae run, expected a dalle run")
    code, _, err = run(
        capsys, "generate", "--dalle", str(dalle), "x", "-n", "2", "--keep", "3", "--out", str(tmp_path / "o")
    )
    assert code == 1 and "Traceback" not in err
    code, _, err = run(
        capsys, "generate", "--dalle", str(dalle), "x", "-n", "4", "--shortlist", "2", "--out", str(tmp_path / "o")
    )
    assert_one_line_error(code, err, "shortlist=2 needs a CLIP")


def test_a_dalle_run_refuses_another_dvae(capsys, tiny_runs, shapes_32, tmp_path):
    _, dalle = tiny_runs
    other = tmp_path / "other-vae"
    vae_args = ["--data", str(shapes_32), "--out", str(other), "--preset", "tiny", "--steps", "2", "--seed", "5"]
    assert run(capsys, "train", "vae", *vae_args)[0] == 0
    dalle_args = ["--data", str(shapes_32), "--vae", str(other), "--out", str(dalle), "--resume", "--steps", "14"]
    code, _, err = run(capsys, "train", "dalle", *dalle_args)
    assert_one_line_error(code, err, "was trained with the dVAE in", str(other))


def test_guide_from_a_dalle_sample(capsys, tiny_runs, tiny_clip_run, tmp_path):
    _, dalle = tiny_runs
    args = ["--init-dalle", str(dalle), "--clip", str(tiny_clip_run), "--steps", "4", "--out", str(tmp_path / "g")]
    code, out, err = run(capsys, "guide", "a red circle", *args)
    assert code == 0, err
    assert (tmp_path / "g" / "final.png").exists() and (tmp_path / "g" / "progress.png").exists()
    assert "CLIP score by step: 0:" in out
