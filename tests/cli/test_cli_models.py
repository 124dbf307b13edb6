"""`clipdalle models list` and `models download`, and a model name wherever --clip is taken (against the local
server of tests/fake_servers.py)."""

import json

import torch
from helpers import assert_one_line_error, run


def test_models_download_then_list_then_use_offline(capsys, model_server, shapes_32, tmp_path, monkeypatch):
    code, out, err = run(capsys, "models", "list", "--json")
    assert code == 0, err
    rows = {row["name"]: row for row in json.loads(out)}
    assert {"ViT-B/32", "RN50", "ViT-L/14@336px", "ViT-B-32/laion2b_s34b_b79k", "ViT-B-16-SigLIP/webli"} <= set(rows)
    assert {"google/siglip-base-patch16-224", "ViT-bigG-14/laion2b_s39b_b160k"} <= set(rows)
    assert not rows["ViT-B/32"]["cached"]

    code, out, err = run(capsys, "models", "download", "ViT-B/32", "org/tiny-siglip")
    assert code == 0, err
    assert "ViT-B/32: " in out and "org/tiny-siglip: " in out
    code, out, err = run(capsys, "models", "list", "--cached", "--json")
    cached = {row["name"]: row for row in json.loads(out)}
    assert {"ViT-B/32", "org/tiny-siglip"} <= set(cached) and "RN50" not in cached
    assert cached["ViT-B/32"]["size_bytes"] > 10_000 and cached["org/tiny-siglip"]["size_bytes"] > 10_000
    code, out, err = run(capsys, "models", "list", "--cached")
    assert code == 0 and "ViT-B/32" in out and "yes" in out

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a machine offline: both models work, nothing is asked of the network
    requests = len(model_server.requests)
    images = [str(path) for path in sorted(shapes_32.glob("*.png"))[:2]]
    for name in ("ViT-B/32", "org/tiny-siglip"):
        code, out, err = run(
            capsys, "classify", *images, "--clip", name, "--labels", "cat,dog", "--json", "--backend", "torch"
        )
        assert code == 0, err
        assert len(json.loads(out)) == 2
    assert len(model_server.requests) == requests
    code, _, err = run(capsys, "classify", images[0], "--clip", "RN50", "--labels", "cat,dog", "--backend", "torch")
    assert_one_line_error(code, err, "RN50", "offline mode is on", "clipdalle models download RN50")
    code, _, err = run(capsys, "models", "download", "RN50")
    assert_one_line_error(code, err, "offline mode is on")


def test_index_build_and_search_with_a_model_name(capsys, model_server, shapes_32, tmp_path):
    index = tmp_path / "index"
    code, _, err = run(capsys, "index", "build", "--clip", "ViT-B/32", "--data", str(shapes_32), "--out", str(index),
                       "--backend", "torch")  # fmt: skip
    assert code == 0, err
    info = json.loads((index / "info.json").read_text())
    assert info["clip_name"] == "ViT-B/32" and info["clip_run"] is None
    code, out, err = run(capsys, "search", "a cat", "--index", str(index), "--json", "-k", "3", "--backend", "torch")
    assert code == 0, err
    assert len(json.loads(out)) == 3


def test_a_siglip_model_trains_from_scratch(capsys, shapes_folder, tmp_path):
    out = tmp_path / "siglip"
    train = ["train", "clip", "--data", str(shapes_folder), "--out", str(out), "--preset", "siglip-tiny"]
    code, _, err = run(capsys, *train, "--steps", "4", "--eval-every", "4", "--save-every", "4")
    assert code == 0, err
    config = json.loads((out / "config.json").read_text())["model"]
    assert (config["architecture"], config["loss"]) == ("siglip", "siglip")
    code, stdout, err = run(capsys, "classify", str(shapes_folder), "--clip", str(out), "--labels", "red,blue", "--top",
                            "2", "--backend", "torch")  # fmt: skip
    assert code == 0, err
    assert stdout.startswith("# probabilities: sigmoid per label")


def test_fine_tune_a_siglip_by_name_and_resume(capsys, model_server, shapes_folder, tmp_path):
    from clipdalle.pretrained import load
    from clipdalle.tokenizers.siglip import SiglipTokenizer

    out = tmp_path / "tuned"
    base = ["train", "clip", "--init", "org/tiny-siglip", "--data", str(shapes_folder), "--out", str(out)]
    code, _, err = run(capsys, *base, "--steps", "2", "--eval-every", "2", "--save-every", "2", "--batch-size", "4")
    assert code == 0, err
    assert (out / "spiece.model").is_file() and (out / "tokenizer_config.json").is_file()
    code, _, err = run(capsys, "train", "clip", "--data", str(shapes_folder), "--out", str(out), "--resume",
                       "--steps", "3", "--eval-every", "3", "--save-every", "3", "--batch-size", "4")  # fmt: skip
    assert code == 0, err
    model, _, tokenizer = load(out)
    reference_tokenizer = load("org/tiny-siglip")[2]
    assert isinstance(tokenizer, SiglipTokenizer) and model.config.architecture == "siglip"
    assert torch.equal(tokenizer(["a photo of a cat"], 16), reference_tokenizer(["a photo of a cat"], 16))
