"""The DALL·E transformer: masks against a naive reference, causality, caching, heads, loss, config, save/load."""

import pytest
import torch
from helpers import random_dalle_batch, tiny_dalle, tiny_dalle_config

from clipdalle import checkpoint
from clipdalle.config import from_dict, to_dict
from clipdalle.models.dalle import (
    ATTENTION_PATTERNS,
    DALLE,
    PAD_ID,
    DALLEConfig,
    attention_mask,
    drop_captions,
    empty_captions,
)


def naive_mask(config: DALLEConfig, pattern: str) -> torch.Tensor:
    """The patterns spelled out position by position (DALLE-pytorch's axial_row / axial_col / conv_like)."""
    length, text_region, grid, reach = config.sequence_length, config.text_region, config.grid_size, config.conv_kernel
    allowed = torch.zeros(length, length, dtype=torch.bool)
    for query in range(length):
        for key in range(query + 1):
            if pattern == "full" or query < text_region or key < text_region:
                allowed[query, key] = True
                continue
            query_row, query_column = divmod(query - text_region, grid)
            key_row, key_column = divmod(key - text_region, grid)
            if pattern == "row":
                allowed[query, key] = key_row == query_row
            elif pattern == "col":
                allowed[query, key] = key_column == query_column
            else:
                allowed[query, key] = (
                    query_row - reach < key_row <= query_row and query_column - reach < key_column <= query_column
                )
    return allowed


@pytest.mark.parametrize("pattern", ATTENTION_PATTERNS)
@pytest.mark.parametrize("conv_kernel", [1, 2, 3, 5])
def test_masks_equal_naive_reference(pattern, conv_kernel):
    config = tiny_dalle_config(conv_kernel=conv_kernel)
    assert torch.equal(attention_mask(config, pattern), naive_mask(config, pattern))


def test_mask_examples():
    config = tiny_dalle_config(text_length=2, grid_size=3, conv_kernel=2)  # text region 3, cells 0..7 fed
    row = attention_mask(config, "row")
    assert row.shape == (config.sequence_length, config.sequence_length) == (11, 11)
    cell = {index: config.text_region + index for index in range(8)}
    assert row[cell[4], : config.text_region].all()  # every image position sees all text and <soi>
    assert row[cell[4], cell[3]] and not row[cell[4], cell[2]]  # same row only
    col = attention_mask(config, "col")
    assert col[cell[7], cell[4]] and col[cell[7], cell[1]] and not col[cell[7], cell[6]]
    conv = attention_mask(config, "conv")
    assert conv[cell[4], cell[0]] and conv[cell[4], cell[3]] and not conv[cell[4], cell[2]]  # 2x2 window up-left
    for pattern in ATTENTION_PATTERNS:
        mask = attention_mask(config, pattern)
        assert not mask.triu(1).any()  # causal
        assert mask[: config.text_region, : config.text_region].equal(torch.ones(3, 3, dtype=torch.bool).tril())
    with pytest.raises(ValueError, match="attention pattern 'sparse'"):
        attention_mask(config, "sparse")


def test_forward_shapes_and_separate_heads():
    model = tiny_dalle(text_vocab_size=50, image_vocab_size=7)
    config = model.config
    text, codes = random_dalle_batch(config)
    text_logits, image_logits = model(text, codes)
    assert text_logits.shape == (3, config.text_length - 1, 50)  # position t predicts text t + 1
    assert image_logits.shape == (3, config.image_length, 7)  # row i predicts code i: image ids only
    _, partial = model(text, codes[:, :5])
    assert partial.shape == (3, 6, 7)
    torch.testing.assert_close(partial, image_logits[:, :6], atol=1e-5, rtol=1e-5)
    _, grid_shaped = model(text, codes.view(3, 4, 4))
    torch.testing.assert_close(grid_shaped, image_logits)


@pytest.mark.parametrize("attn", [["full"], ["row"], ["col"], ["conv"], ["full", "row", "col", "conv"]])
def test_later_tokens_never_change_earlier_logits(attn):
    model = tiny_dalle(attn=attn)
    config = model.config
    text, codes = random_dalle_batch(config)
    text_logits, image_logits = model(text, codes)
    for cell in (0, 5, config.image_length - 2):
        changed = codes.clone()
        changed[:, cell:] = (changed[:, cell:] + 1) % config.image_vocab_size
        new_text_logits, new_image_logits = model(text, changed)
        assert torch.equal(new_text_logits, text_logits)
        # logits row i reads codes < i: rows up to `cell` are unchanged, the next one moves
        torch.testing.assert_close(new_image_logits[:, : cell + 1], image_logits[:, : cell + 1], atol=1e-6, rtol=0)
        assert not torch.allclose(new_image_logits[:, cell + 1], image_logits[:, cell + 1])
    changed_text = text.clone()
    changed_text[:, 2] = (changed_text[:, 2] + 1) % config.text_vocab_size
    new_text_logits, new_image_logits = model(changed_text, codes)
    torch.testing.assert_close(new_text_logits[:, :2], text_logits[:, :2], atol=1e-6, rtol=0)
    assert not torch.allclose(new_image_logits, image_logits)  # images see the caption


def test_row_pattern_ignores_codes_outside_its_row():
    model = tiny_dalle(attn=["row"], n_layer=2)
    text, codes = random_dalle_batch(model.config)
    _, image_logits = model(text, codes)
    changed = codes.clone()
    changed[:, 1] = (changed[:, 1] + 1) % model.config.image_vocab_size  # row 0
    _, new_image_logits = model(text, changed)
    # rows of logits 5..8 read cells 4..7 (grid row 1): they cannot see cell 1
    torch.testing.assert_close(new_image_logits[:, 5:9], image_logits[:, 5:9], atol=1e-6, rtol=0)
    assert not torch.allclose(new_image_logits[:, 2:5], image_logits[:, 2:5])


def test_pad_token_depends_on_position():
    model = tiny_dalle()
    text = torch.full((1, model.config.text_length), PAD_ID)
    embedded = model.embed_text(text) - model.text_position_embedding
    assert not torch.allclose(embedded[0, 1], embedded[0, 2])  # a distinct pad token per position
    assert torch.equal(empty_captions(2, model.config), torch.zeros(2, model.config.text_length, dtype=torch.long))


@pytest.mark.parametrize("attn", [["full"], ["full", "row", "col", "conv"]])
def test_cached_chunks_equal_full_forward(attn):
    model = tiny_dalle(attn=attn)
    text, codes = random_dalle_batch(model.config)
    _, full = model(text, codes)
    caches = model.new_caches()
    pieces = [model.start(text, caches), model.extend(codes[:, :4], 0, caches)]  # a chunk of 4, then one at a time
    pieces += [
        model.extend(codes[:, cell : cell + 1], cell, caches) for cell in range(4, model.config.image_length - 1)
    ]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-5)
    assert len(caches[0]) == model.config.sequence_length
    with pytest.raises(ValueError, match="not feedable"):
        model.extend(codes[:, -1:], model.config.image_length - 1, caches)
    with pytest.raises(ValueError, match="already hold positions"):
        model.start(text, caches)
    with pytest.raises(ValueError, match="next code is cell 0, not 3"):
        fresh = model.new_caches()
        model.start(text, fresh)
        model.extend(codes[:, 3:4], 3, fresh)


def test_caption_dropout_replaces_whole_captions_with_padding():
    text = torch.arange(1, 41).view(8, 5)
    generator = torch.Generator().manual_seed(0)
    dropped = drop_captions(text, 0.5, generator)
    empty_rows = (dropped == PAD_ID).all(dim=1)
    assert 0 < int(empty_rows.sum()) < 8
    assert torch.equal(dropped[~empty_rows], text[~empty_rows])
    assert torch.equal(drop_captions(text, 0.0), text)
    assert (drop_captions(text, 1.0) == PAD_ID).all()


def test_config_round_trip_and_errors():
    config = tiny_dalle_config()
    assert from_dict(DALLEConfig, to_dict(config)) == config
    assert from_dict(DALLEConfig, {"attn": "full,conv"}).attn == ["full", "conv"]  # the CLI's comma form
    assert config.layer_patterns() == ["full", "row", "col", "conv"]
    assert tiny_dalle_config(attn=["full", "conv"], n_layer=5).layer_patterns() == [
        "full",
        "conv",
        "full",
        "conv",
        "full",
    ]
    assert config.sequence_length == 5 + 16 and config.text_region == 6
    with pytest.raises(ValueError, match="attn \\['full', 'axial'\\]: expected a non-empty list of full, row"):
        tiny_dalle_config(attn=["full", "axial"])
    with pytest.raises(ValueError, match="n_embd 16 is not divisible by n_head 3"):
        tiny_dalle_config(n_head=3)
    with pytest.raises(ValueError, match="loss weights"):
        tiny_dalle_config(text_loss_weight=0.0, image_loss_weight=0.0)


def test_input_errors_name_the_expected_shapes():
    model = tiny_dalle()
    text, codes = random_dalle_batch(model.config)
    with pytest.raises(ValueError, match=r"expected text token ids of shape \(B, 5\)"):
        model(text[:, :4], codes)
    with pytest.raises(ValueError, match=r"text ids must be in \[0, 40\)"):
        model(text + 100, codes)
    with pytest.raises(ValueError, match=r"codes must be in \[0, 12\)"):
        model(text, codes + 12)
    with pytest.raises(ValueError, match=r"n <= 16"):
        model(text, torch.zeros(3, 17, dtype=torch.long))


def test_save_and_load_give_identical_outputs(tmp_path):
    model = tiny_dalle()
    text, codes = random_dalle_batch(model.config)
    checkpoint.save_model(tmp_path / "run", model)
    loaded = checkpoint.load_model(tmp_path / "run", expect="dalle")
    assert isinstance(loaded, DALLE) and loaded.config == model.config
    for before, after in zip(model(text, codes), loaded(text, codes)):
        assert torch.equal(before, after)
    assert not any(name.startswith("mask_") for name in model.state_dict())  # masks are rebuilt, not stored
