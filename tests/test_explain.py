"""Relevance maps: the explicit-attention ViT equals the model, maps of ViT and ResNet towers have the grid's shape and
are finite, rollout follows its formula, and on a CLIP that knows colours the map points at the named colour."""

import json

import pytest
import torch
from helpers import FLAT_COLOURS, WORDS, WordTokenizer, assert_one_line_error, run, tiny_clip, train_colour_clip

from clipdalle import explain
from clipdalle.zero_shot import encode_texts

RESNET = dict(vision_layers=[1, 1, 1, 1], vision_n_embd=8, vision_n_head=2, image_size=64)


def unit(dim: int, seed: int = 0) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.randn(1, dim, generator=torch.Generator().manual_seed(seed)), dim=-1)


def test_vit_forward_with_explicit_attention_equals_the_model():
    model = tiny_clip(vision_n_layer=2).eval()
    pixels = (torch.rand(3, 3, 32, 32) - model.image_mean) / model.image_std
    embeddings, weights, h, w = explain.vit_features_with_attention(model.visual, pixels)
    torch.testing.assert_close(embeddings, model.visual(pixels), atol=1e-5, rtol=1e-5)
    assert (h, w) == (4, 4) and len(weights) == 2 and weights[0].shape == (3, 2, 17, 17)
    torch.testing.assert_close(weights[0].sum(-1), torch.ones(3, 2, 17))


@pytest.mark.parametrize("overrides, grid", [({}, {"gradient": 4, "dense": 4}), (RESNET, {"gradient": 4, "dense": 2})])
@pytest.mark.parametrize("method", explain.METHODS)
def test_maps_have_the_grid_shape_are_finite_and_scores_are_the_cosines(overrides, grid, method):
    model = tiny_clip(**overrides).eval()
    size = model.config.image_size
    images, text = torch.rand(2, 3, size, size), unit(model.config.embed_dim)
    maps, scores = explain.relevance_maps(model, images, text, method)
    assert maps.shape == (2, grid[method], grid[method]) and torch.isfinite(maps).all()
    torch.testing.assert_close(scores, (model.encode_image(images) @ text.T)[:, 0], atol=1e-5, rtol=1e-5)
    hot = explain.heat(maps)
    flat = maps.flatten(1).max(1).values == maps.flatten(1).min(1).values  # no cell stands out (rollout can give 0)
    assert hot.min() >= 0 and (hot.flatten(1).max(1).values.eq(1) | flat).all()
    assert not any(parameter.grad is not None for parameter in model.parameters())  # nothing accumulated
    with pytest.raises(ValueError, match="expected images of shape"):
        explain.relevance_maps(model, torch.rand(1, 3, 8, 8), text, method)


def test_rollout_adds_the_positive_gradient_weighted_attention():
    attention = torch.tensor([[[[0.5, 0.5], [0.0, 1.0]]]])  # (B=1, nh=1, T=2, T=2)
    gradient = torch.tensor([[[[2.0, -1.0], [1.0, 1.0]]]])
    cam = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # (gradient * attention)^+, mean over the one head
    expected = torch.eye(2) + cam @ torch.eye(2)
    torch.testing.assert_close(explain.attention_rollout([attention], [gradient]), expected[None])


def test_heat_peak_and_overlay():
    maps = torch.tensor([[[0.0, 1.0], [2.0, 3.0]], [[5.0, 5.0], [5.0, 5.0]]])
    assert explain.heat(maps)[1].eq(0).all()  # a flat map has no hot cell
    assert explain.peak(maps[:1], 32).tolist() == [[24.0, 24.0]]  # the bottom-right cell's centre
    picture = explain.overlay(torch.ones(3, 8, 8), explain.heat(maps[0]), size=16)
    assert picture.shape == (3, 16, 16) and picture.min() >= 0 and picture.max() <= 1
    assert torch.allclose(picture[:, 0, 0], torch.ones(3), atol=1e-6)  # the cold corner is left as it was
    assert explain.gradcam_stage(224) == 4 and explain.gradcam_stage(32) == 2 and explain.gradcam_stage(8) == 1


def test_maps_point_at_the_named_colour_on_a_two_colour_canvas():
    model, _ = train_colour_clip("contrastive")
    tokenizer = WordTokenizer(WORDS)
    names, colours = list(FLAT_COLOURS), torch.tensor(list(FLAT_COLOURS.values()))
    for method in explain.METHODS:
        hits, cases = 0, 0
        for left in range(len(names)):
            for right in range(len(names)):
                if left == right:
                    continue
                canvas = torch.empty(3, 32, 32)
                canvas[:, :, :16], canvas[:, :, 16:] = colours[left, :, None, None], colours[right, :, None, None]
                for named, on_left in ((left, True), (right, False)):
                    text = encode_texts(model, tokenizer, [f"a {names[named]} icon"])
                    maps, _ = explain.relevance_maps(model, canvas[None], text, method)
                    x = explain.peak(maps, 32)[0, 0]
                    hits += bool(x < 16) == on_left
                    cases += 1
        # chance is half; a learned model, so a margin for the last digits of another torch build
        assert hits >= 0.9 * cases, f"{method}: the peak was on the named colour in {hits} of {cases} cases"


def test_cli_writes_the_overlay_and_the_json(capsys, tiny_clip_run, shapes_32, tmp_path):
    out = tmp_path / "explained"
    image = shapes_32 / "circle_red_0.png"
    code, stdout, err = run(
        capsys, "explain", str(image), "a red circle", "--clip", str(tiny_clip_run), "--out", str(out)
    )
    assert code == 0, err
    result = json.loads((out / "explanation.json").read_text())
    assert result["text"] == "a red circle" and result["method"] == "gradient" and len(result["grid"]) == 4
    from PIL import Image

    assert Image.open(out / "overlay.png").size == (256, 256) and "peak at" in stdout
    code, _, err = run(capsys, "explain", str(image), " ", "--clip", str(tiny_clip_run), "--out", str(out))
    assert_one_line_error(code, err, "the text is empty")
