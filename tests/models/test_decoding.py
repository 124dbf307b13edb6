"""The decoding fast paths equal the model they speed up: a block's last position, one-position block steps, and
DALL·E's one-code image step against `DALLE.extend` and the full forward pass."""

import pytest
import torch
from helpers import random_dalle_batch, tiny_dalle
from torch import nn

from clipdalle.models.decoding import BlockStep, ImageStep, last_block_output
from clipdalle.models.layers import KVCache, ResidualAttentionBlock, causal_mask


@pytest.mark.parametrize("activation", ["gelu", "quick_gelu"])
def test_block_step_equals_the_cached_forward_one_position_at_a_time(activation):
    torch.manual_seed(0)
    block = ResidualAttentionBlock(16, 4, activation).eval()
    for parameter in block.parameters():  # biases are zeros at init; make them count
        nn.init.normal_(parameter, std=0.3)
    x = torch.randn(3, 7, 16)
    full = block(x, is_causal=True)
    allowed = torch.rand(7, 7, generator=torch.Generator().manual_seed(1)) > 0.4
    allowed |= torch.eye(7, dtype=torch.bool)  # every position sees itself
    masked = block(x, causal_mask(7, 7) & allowed)
    step = BlockStep(block)
    with torch.no_grad():
        plain_cache, masked_cache = KVCache(7), KVCache(7)
        block(x[:, :3], is_causal=True, cache=plain_cache)  # a prompt of 3 positions, then one at a time
        block(x[:, :3], causal_mask(3, 3) & allowed[:3, :3], False, masked_cache)
        for t in range(3, 7):
            torch.testing.assert_close(step(x[:, t], plain_cache), full[:, t], atol=1e-5, rtol=1e-5)
            bias = torch.zeros(t + 1).masked_fill(~allowed[t, : t + 1], float("-inf"))
            torch.testing.assert_close(step(x[:, t], masked_cache, bias), masked[:, t], atol=1e-5, rtol=1e-5)
    assert len(plain_cache) == 7
    block.attn.out_proj.bias.data += 1.0  # a snapshot: later changes to the block do not reach the step
    with torch.no_grad():
        plain_cache.reset()
        block(x[:, :6], is_causal=True, cache=plain_cache)
        torch.testing.assert_close(step(x[:, 6], plain_cache), full[:, 6], atol=1e-5, rtol=1e-5)


def test_last_block_output_equals_the_last_position_and_fills_the_cache():
    torch.manual_seed(0)
    block = ResidualAttentionBlock(16, 4).eval()
    x = torch.randn(2, 6, 16)
    with torch.no_grad():
        reference_cache, last_cache = KVCache(6), KVCache(6)
        block(x[:, :2], is_causal=True, cache=reference_cache)
        full = block(x[:, 2:], is_causal=True, cache=reference_cache)  # (B, 4, C) after 2 cached positions
        block(x[:, :2], is_causal=True, cache=last_cache)
        last = last_block_output(block, x[:, 2:], last_cache)
    assert last.shape == (2, 1, 16)
    torch.testing.assert_close(last, full[:, -1:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(last_cache.keys, reference_cache.keys)
    torch.testing.assert_close(last_cache.values, reference_cache.values)


@pytest.mark.parametrize("attn", [["full"], ["full", "row", "col", "conv"]])
def test_image_step_equals_extend_one_code_at_a_time(attn):
    model = tiny_dalle(attn=attn)
    text, codes = random_dalle_batch(model.config)
    _, full = model(text, codes)
    step = ImageStep(model)
    caches = model.new_caches()
    with torch.no_grad():
        model.start(text, caches)
        logits = [step(codes[:, cell], cell, caches) for cell in range(model.config.image_length - 1)]
    torch.testing.assert_close(torch.stack(logits, dim=1), full[:, 1:], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="cell 15 is not feedable; codes 0 .. 14 are fed"):
        step(codes[:, -1], model.config.image_length - 1, caches)
    with pytest.raises(ValueError, match="next code is cell 0, not 2"):
        fresh = model.new_caches()
        model.start(text, fresh)
        step(codes[:, 2], 2, fresh)


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    return float((value.float() - reference.float()).norm() / reference.float().norm())


def test_image_step_built_under_autocast_keeps_its_weights_in_bf16():
    # The training loop's evaluation samples under autocast: the step's weight copies are made in bf16 once,
    # instead of every product casting its fp32 weight at every step.
    model = tiny_dalle(attn=["full", "conv"])
    text, codes = random_dalle_batch(model.config)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        step = ImageStep(model)
        caches = model.new_caches()
        model.start(text, caches)
        logits = torch.stack([step(codes[:, cell], cell, caches) for cell in range(3)], dim=1)  # (B, 3, V)
        reference_caches = model.new_caches()
        model.start(text, reference_caches)
        reference = model.extend(codes[:, :3], 0, reference_caches)
    assert step.blocks[0].qkv_weight.dtype == torch.bfloat16 and step.head_weight.dtype == torch.bfloat16
    assert len(caches[0]) == len(reference_caches[0])
    assert relative_error(logits, reference) < 2e-2  # bf16 keeps 8 bits: ~0.4 % per rounding, a few in a row
    assert ImageStep(model).blocks[0].qkv_weight.dtype == torch.float32  # outside autocast: the model's dtype
