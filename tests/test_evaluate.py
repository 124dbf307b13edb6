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
