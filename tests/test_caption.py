"""Captions: label tables (files, index captions cut by templates, a vocabulary), CLIP ranking, the captioner's
sampler and reranking, .txt files beside images, and the `caption` / `train captioner` commands."""

import json

import pytest
import torch
from helpers import (
    FLAT_COLOURS,
    WORDS,
    WordTokenizer,
    assert_one_line_error,
    colour_images,
    fit_captioner,
    run,
    train_colour_clip,
)

from clipdalle import caption
from clipdalle.models.captioner import Captioner, CaptionerConfig
from clipdalle.tokenizers import CaptionTokenizer

LABELS = """# colours and things
template: a {colour} icon of a {thing}
template: {thing} icon in {colour}
[colour]
red
orange
[thing]
apple
cup
"""


def test_label_files_give_tables_and_templates_and_fill_fits_articles():
    tables = caption.parse_label_tables(LABELS)
    assert tables.tables == {"colour": ["red", "orange"], "thing": ["apple", "cup"]}
    assert tables.templates == ["a {colour} icon of a {thing}", "{thing} icon in {colour}"]
    assert caption.fill(tables.templates[0], {"colour": "orange", "thing": "apple"}) == "an orange icon of an apple"
    assert caption.fill(tables.templates[0], {"colour": "red", "thing": "cup"}) == "a red icon of a cup"
    plain = caption.parse_label_tables("cat\ndog\ncat\n")
    assert plain.tables == {"label": ["cat", "dog"]} and plain.templates == ["{label}"]
    with pytest.raises(ValueError, match="names the slots"):
        caption.parse_label_tables("template: a {colour}\n[colour]\nred\n[thing]\ncup\n")
    with pytest.raises(ValueError, match=r"labels:2: table \[colour\] appears twice"):
        caption.parse_label_tables("[colour]\n[colour]\n")
    with pytest.raises(ValueError, match="no labels"):
        caption.parse_label_tables("# nothing\n\n")


def test_index_captions_cut_by_templates_and_vocabulary_words():
    captions = ["a red icon of an apple\napple icon in red", "a blue icon of a cup tray\nnot matching anything"]
    tables = caption.tables_from_captions(captions, ["a {colour} icon of a {thing}", "{thing} icon in {colour}"])
    assert tables.tables == {"colour": ["red", "blue"], "thing": ["apple", "cup tray"]}
    whole = caption.tables_from_captions(captions)
    assert whole.tables["caption"][0] == "a red icon of an apple" and whole.templates == ["{caption}"]
    with pytest.raises(ValueError, match="no caption line matched"):
        caption.tables_from_captions(captions, ["{thing} in a box"])
    tokenizer = CaptionTokenizer.train(["a red apple", "a green apple", "the blue cup"] * 20, 280)
    words = caption.vocabulary_table(tokenizer).tables["word"]
    assert {"apple", "green", "blue"} <= set(words) and all(len(word) >= 3 for word in words)


def test_clip_ranking_names_the_colour_and_reports_the_terms():
    model, _ = train_colour_clip("contrastive")
    tokenizer = WordTokenizer([*WORDS, "shape"])
    tables = caption.LabelTables({"colour": list(FLAT_COLOURS), "kind": ["icon", "shape"]}, ["a {colour} {kind}"])
    results = caption.rank_terms(model, tokenizer, colour_images(noise_seed=3), tables)
    assert [result["terms"]["colour"][0]["term"] for result in results] == list(FLAT_COLOURS)
    first = results[0]
    assert first["caption"] == f"a {first['terms']['colour'][0]['term']} {first['terms']['kind'][0]['term']}"
    assert first["method"] == "clip" and len(first["terms"]["colour"]) == caption.TOP_TERMS
    scores = [term["score"] for term in first["terms"]["colour"]]
    assert scores == sorted(scores, reverse=True)


@pytest.fixture(scope="module")
def overfit_captioner():
    """A tiny captioner that learned two code grids -> two captions, with its tokenizer."""
    captions = ["a red cup", "a blue dog"]
    tokenizer = CaptionTokenizer.train(captions * 10, 270)
    torch.manual_seed(0)
    model = Captioner(CaptionerConfig(text_length=8, text_vocab_size=270, image_vocab_size=8, grid_size=2, n_layer=2,
                                      n_head=2, n_embd=32))  # fmt: skip
    codes = torch.tensor([[0, 1, 2, 3], [4, 5, 6, 7]])
    fit_captioner(model, codes, tokenizer(captions, 8), steps=120)
    return model, tokenizer, codes, captions


def test_greedy_sampling_writes_the_learned_captions(overfit_captioner):
    model, tokenizer, codes, captions = overfit_captioner
    texts, log_likelihood = caption.sample_captions(model, codes, tokenizer, n=2, temperature=0)
    assert texts == [[captions[0]] * 2, [captions[1]] * 2]
    assert log_likelihood.shape == (2, 2) and (log_likelihood <= 0).all() and (log_likelihood > -1).all()
    sampled, _ = caption.sample_captions(model, codes, tokenizer, n=3, temperature=1.0, seed=5)
    again, _ = caption.sample_captions(model, codes, tokenizer, n=3, temperature=1.0, seed=5)
    assert sampled == again and len(sampled[0]) == 3  # seeded


def test_caption_files_are_written_beside_images_and_kept_without_overwrite(tmp_path):
    images = [tmp_path / "a.png", tmp_path / "sub.b.jpg"]
    (tmp_path / "a.txt").write_text("mine\n")
    files = caption.write_caption_files(images, ["one", "two"])
    assert files == {"written": [str(tmp_path / "sub.b.txt")], "kept": [str(tmp_path / "a.txt")]}
    assert (tmp_path / "a.txt").read_text() == "mine\n" and (tmp_path / "sub.b.txt").read_text() == "two\n"
    caption.write_caption_files(images, ["one", "two"], overwrite=True)
    assert (tmp_path / "a.txt").read_text() == "one\n"


def test_cli_trains_a_captioner_and_captions_a_folder_both_ways(capsys, tiny_runs, tiny_clip_run, shapes_32, tmp_path):
    vae, _ = tiny_runs
    run_dir = tmp_path / "captioner"
    args = [
        "train",
        "captioner",
        "--data",
        str(shapes_32),
        "--vae",
        str(vae),
        "--out",
        str(run_dir),
        "--preset",
        "tiny",
    ]
    code, _, err = run(capsys, *args, "--steps", "6", "--eval-every", "3")
    assert code == 0, err
    assert (run_dir / "vae" / "model.safetensors").exists() and (run_dir / "tokenizer.json").exists()
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ("circle_red_0", "square_blue_1"):
        (folder / f"{name}.png").write_bytes((shapes_32 / f"{name}.png").read_bytes())
    code, out, err = run(
        capsys, "caption", str(folder), "--clip", str(tiny_clip_run), "--captioner", str(run_dir), "-n", "3",
        "--write-txt", "--json",
    )  # fmt: skip
    assert code == 0, err
    results = json.loads(out)
    assert [result["method"] for result in results] == ["captioner"] * 2 and len(results[0]["candidates"]) <= 3
    assert (folder / "circle_red_0.txt").read_text() == results[0]["caption"] + "\n"

    labels = tmp_path / "labels.txt"
    labels.write_text("template: a {colour} {shape}\n[colour]\nred\nblue\n[shape]\ncircle\nsquare\n")
    code, out, err = run(capsys, "caption", str(folder), "--clip", str(tiny_clip_run), "--labels", str(labels))
    assert code == 0, err
    assert out.count("\n") == 2 and "circle_red_0.png: a " in out
    code, _, err = run(
        capsys, "caption", str(folder), "--clip", str(tiny_clip_run), "--labels", str(labels), "--write-txt"
    )
    assert code == 0 and "kept 2 existing .txt file(s)" in err  # never overwritten without --overwrite

    code, _, err = run(capsys, "caption", str(folder), "--clip", str(tiny_clip_run), "--template", "a {x}")
    assert_one_line_error(code, err, "--template cuts an index's captions")
    code, _, err = run(
        capsys,
        "caption",
        str(folder),
        "--clip",
        str(tiny_clip_run),
        "--captioner",
        str(run_dir),
        "--labels",
        str(labels),
    )
    assert_one_line_error(code, err, "drop --labels")


def test_text_feature_cache_encodes_each_text_once_and_keeps_the_latest(monkeypatch):
    model, _ = train_colour_clip("contrastive")
    encoded = []
    real = caption.encode_texts
    monkeypatch.setattr(
        caption, "encode_texts", lambda m, t, texts: (encoded.append(list(texts)), real(m, t, texts))[1]
    )
    cache = caption.TextFeatureCache(model, WordTokenizer(WORDS), size=2)
    first = cache(["a red icon", "a blue icon", "a red icon"])
    assert first.shape == (3, model.config.embed_dim) and torch.equal(first[0], first[2])
    cache(["a blue icon"])
    assert encoded == [["a red icon", "a blue icon"]]  # nothing encoded twice
    cache(["a green icon"])
    assert list(cache.known) == ["a blue icon", "a green icon"]  # the least recently used went first
