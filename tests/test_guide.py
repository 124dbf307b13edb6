import pytest
import torch

from clipdalle.clip import CLIP, CLIPConfig
from clipdalle.config import build_config, load_preset
from clipdalle.guide import cutouts, guide, spherical_distance
from clipdalle.models.dvae import DiscreteVAE, DVAEConfig


class Letters:
    """A stand-in tokenizer: one id per character, eos = 2."""

    def __call__(self, texts, length):
        rows = [[1] + [3 + ord(c) % 200 for c in text][: length - 2] + [2] for text in texts]
        return torch.tensor([row + [0] * (length - len(row)) for row in rows])


def tiny_models():
    torch.manual_seed(0)
    vae = DiscreteVAE(build_config(DVAEConfig, load_preset("vae-tiny")["model"], {"image_size": 16}))
    clip_config = build_config(CLIPConfig, load_preset("clip-tiny")["model"], {"image_size": 32})
    return vae, CLIP(clip_config)


def test_spherical_distance_is_zero_on_equal_and_grows_with_angle():
    x = torch.nn.functional.normalize(torch.randn(3, 8), dim=-1)
    assert torch.allclose(spherical_distance(x, x).diagonal(), torch.zeros(3), atol=1e-6)
    assert (spherical_distance(x, -x).diagonal() > spherical_distance(x, x).diagonal()).all()


def test_cutouts_shape():
    views = cutouts(torch.rand(1, 3, 16, 16), 5, 32, torch.Generator().manual_seed(0))
    assert views.shape == (5, 3, 32, 32)


def test_clip_score_rises_over_steps():
    vae, clip_model = tiny_models()
    result = guide(vae, clip_model, Letters(), "a red circle", steps=40, lr=0.3, snapshot_every=20)
    assert result.snapshot_steps == [0, 20, 40]
    assert result.scores[-1] > result.scores[0]
    assert result.image.shape == (3, 16, 16) and result.codes.shape == (4, 4)
    assert result.image.min() >= 0 and result.image.max() <= 1


def test_guide_leaves_the_models_untouched_and_checks_inputs():
    vae, clip_model = tiny_models()
    before = {name: p.clone() for name, p in vae.named_parameters()}
    guide(vae, clip_model, Letters(), "x", steps=2)
    assert all(torch.equal(before[name], p) and p.grad is None for name, p in vae.named_parameters())
    with pytest.raises(ValueError, match="prompt is empty"):
        guide(vae, clip_model, Letters(), "  ", steps=2)
    with pytest.raises(ValueError, match="init_codes must have shape"):
        guide(vae, clip_model, Letters(), "x", steps=2, init_codes=torch.zeros(3, 3))
