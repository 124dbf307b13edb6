"""Validation metrics and pictures of the models (clipdalle.evaluate)."""

import pytest
import torch
from helpers import FLAT_COLOURS, WORDS, WordTokenizer, colour_images, train_colour_clip

from clipdalle.evaluate import clip_metrics, clip_picture, dalle_metrics, heat_map, recall_at, vae_metrics


def test_clip_metrics_and_picture():
    model, _ = train_colour_clip("contrastive")
    tokenizer = WordTokenizer(WORDS)
    batches = [
        {"images": colour_images(noise_seed=seed), "text": tokenizer([f"a {c} icon" for c in FLAT_COLOURS], 16)}
        for seed in (7, 8)
    ]
    model.train()
    metrics, grid = clip_metrics(model, batches), clip_picture(model, batches)
    assert model.training  # mode restored
    assert set(metrics) == {"loss", "image_to_text_r1", "image_to_text_r5", "text_to_image_r1", "text_to_image_r5"}
    assert metrics["image_to_text_r5"] == 1.0  # 8 pairs: each image's colour is among its 5 best texts
    assert metrics["image_to_text_r1"] >= 0.5  # two identical captions per colour: r@1 is at least a half
    assert grid.dim() == 3 and grid.shape[0] == 3 and grid.shape[1] == grid.shape[2] >= 64
    assert 0.0 <= grid.min() and grid.max() <= 1.0


def test_recall_and_heat_map_helpers():
    assert recall_at(torch.eye(4), 1) == 1.0
    assert recall_at(torch.eye(4).roll(1, dims=1), 1) == 0.0
    assert recall_at(torch.eye(4).roll(1, dims=1), 4) == 1.0
    image = heat_map(torch.tensor([[0.0, 1.0], [0.5, 0.25]]), cell=3)
    assert image.shape == (3, 6, 6)
    assert image[:, 0, 3].sum() > image[:, 0, 0].sum()  # high values are brighter


def test_every_metric_function_refuses_an_empty_set_alike():
    empty = [{"keys": [], "images": torch.zeros(0, 3, 32, 32), "text": torch.zeros(0, 16, dtype=torch.long)}]
    for metrics in (clip_metrics, vae_metrics, dalle_metrics):
        with pytest.raises(ValueError, match="got no validation batches"):
            metrics(None, empty)
        with pytest.raises(ValueError, match="got no validation batches"):
            metrics(None, [])


def test_bleu_and_cider_d_equal_coco_caption_on_icon_captions():
    """Golden values from pycocoevalcap 1.2 (Bleu(4), Cider) on the same 200 seeded caption pairs."""
    import random

    from clipdalle.data import icons
    from clipdalle.evaluate import cider_d, corpus_bleu

    generator = random.Random(0)
    names = ["cup", "dog", "account circle", "clock time one", "heart", "star outline", "home", "bell"]
    colours = list(icons.PALETTE)
    references, hypotheses = [], []
    for _ in range(200):
        name, colour = generator.choice(names), generator.choice(colours)
        references.append(icons.captions_for(name.replace(" ", "-"), colour))
        other_name = name if generator.random() < 0.5 else generator.choice(names)
        other_colour = colour if generator.random() < 0.8 else generator.choice(colours)
        hypotheses.append(generator.choice(icons.captions_for(other_name.replace(" ", "-"), other_colour)[:2]))
    assert corpus_bleu(hypotheses, references) == pytest.approx(0.7444554918076374, abs=1e-9)
    assert cider_d(hypotheses, references) == pytest.approx(2.8439887705462543, abs=1e-9)
    assert corpus_bleu(["a b c"], [["x y z"]]) == 0.0 and cider_d(["x"], [["y"]]) == 0.0
