"""The captioner (DALL·E's stream reversed): the prefix mask, causality over the caption, cached decoding equal to a
full pass, the loss over caption tokens only, learning a tiny batch, save/load."""

import pytest
import torch
from helpers import fit_captioner

from clipdalle import checkpoint
from clipdalle.config import from_dict, to_dict
from clipdalle.models.captioner import PAD_ID, Captioner, CaptionerConfig, loss, prefix_mask

EOS = 1


def tiny_captioner(**changes) -> Captioner:
    values = dict(text_length=6, text_vocab_size=20, image_vocab_size=12, grid_size=3, n_layer=2, n_head=2, n_embd=16)
    torch.manual_seed(0)
    return Captioner(CaptionerConfig(**{**values, **changes})).eval()


def batch(model: Captioner, size: int = 3, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    config = model.config
    generator = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, config.image_vocab_size, (size, config.image_length), generator=generator)
    text = torch.randint(3, config.text_vocab_size, (size, config.text_length), generator=generator)
    text[:, 0] = 2  # <bos>
    text[:, 3], text[:, 4:] = EOS, PAD_ID  # <bos> w w <eos> <pad> <pad>
    return codes, text


def test_prefix_mask_lets_codes_see_each_other_and_captions_see_back():
    mask = prefix_mask(CaptionerConfig(text_length=3, grid_size=1))  # 1 code, then 2 caption positions
    assert mask.tolist() == [[True, False, False], [True, True, False], [True, True, True]]
    mask = prefix_mask(CaptionerConfig(text_length=2, grid_size=2))  # 4 codes see all codes, not the caption
    assert mask[:4, :4].all() and not mask[:4, 4:].any() and mask[4].all()


def test_forward_shapes_and_later_tokens_never_change_earlier_logits():
    model = tiny_captioner()
    codes, text = batch(model)
    logits = model(codes, text)
    assert logits.shape == (3, 5, 20)
    changed = text.clone()
    changed[:, 2] = 7
    other = model(codes, changed)
    torch.testing.assert_close(other[:, :2], logits[:, :2])  # rows 0, 1 read tokens 0, 1 only
    assert not torch.allclose(other[:, 2:], logits[:, 2:])
    other_codes = codes.clone()
    other_codes[:, -1] = (codes[:, -1] + 1) % 12
    assert not torch.allclose(model(other_codes, text)[:, 0], logits[:, 0])  # the first word sees every code


def test_cached_decoding_equals_the_full_pass():
    model = tiny_captioner()
    codes, text = batch(model)
    full = model(codes, text)  # (B, T - 1, V)
    caches = model.new_caches()
    steps = [model.start(codes, text[:, :2], caches)]  # after <bos> and one word
    for position in range(2, model.config.text_length - 1):
        steps.append(model.step(text[:, position], position, caches))
    torch.testing.assert_close(torch.stack(steps, dim=1), full[:, 1:], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="caches hold"):
        model.step(text[:, 1], 1, caches)


def test_loss_counts_caption_tokens_up_to_eos_only():
    model = tiny_captioner()
    codes, text = batch(model)
    logits = model(codes, text)
    targets = text[:, 1:]
    kept = targets != PAD_ID
    expected = torch.nn.functional.cross_entropy(logits[kept], targets[kept])
    torch.testing.assert_close(loss(model, codes, text), expected)


def test_learns_to_caption_a_tiny_batch():
    model = tiny_captioner()
    codes, text = batch(model, size=4)
    assert fit_captioner(model, codes, text, steps=150) < 0.05
    predicted = model(codes, text).argmax(-1)
    assert torch.equal(predicted[:, :3], text[:, 1:4])  # every word and <eos>


def test_config_errors_and_save_load_give_identical_outputs(tmp_path):
    with pytest.raises(ValueError, match="divisible"):
        CaptionerConfig(n_embd=10, n_head=3)
    with pytest.raises(ValueError, match="at least 2"):
        CaptionerConfig(text_length=1)
    model = tiny_captioner()
    assert from_dict(CaptionerConfig, to_dict(model.config)) == model.config
    checkpoint.save_model(tmp_path / "run", model)
    loaded = checkpoint.load_model(tmp_path / "run", expect="captioner")
    codes, text = batch(model)
    assert torch.equal(loaded(codes, text), model(codes, text))
    with pytest.raises(ValueError, match=r"expected codes of shape \(B, 9\)"):
        model(codes[:, :4], text)
    with pytest.raises(ValueError, match="text must be in"):
        model(codes, text + 100)
