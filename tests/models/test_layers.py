"""Shared transformer blocks: names, shapes, masks, the KV cache, fp32 LayerNorm, checkpointing."""

import pytest
import torch
from torch import nn

from clipdalle.models.layers import (
    KVCache,
    LayerNorm,
    QuickGELU,
    ResidualAttentionBlock,
    SelfAttention,
    Transformer,
    causal_mask,
    make_activation,
    merge_masks,
)


def tiny_transformer(**overrides):
    torch.manual_seed(0)
    settings = {"n_embd": 16, "n_layer": 2, "n_head": 4, "activation": "gelu"}
    settings.update(overrides)
    return Transformer(**settings).eval()


def test_block_has_openai_parameter_names():
    names = set(ResidualAttentionBlock(16, 4).state_dict())
    assert names == {
        "ln_1.weight",
        "ln_1.bias",
        "attn.in_proj_weight",
        "attn.in_proj_bias",
        "attn.out_proj.weight",
        "attn.out_proj.bias",
        "ln_2.weight",
        "ln_2.bias",
        "mlp.c_fc.weight",
        "mlp.c_fc.bias",
        "mlp.c_proj.weight",
        "mlp.c_proj.bias",
    }
    assert {key.split(".")[0] + "." + key.split(".")[1] for key in tiny_transformer().state_dict()} == {
        "resblocks.0",
        "resblocks.1",
    }


def test_attention_matches_torch_multihead_attention():
    torch.manual_seed(0)
    ours = SelfAttention(16, 4).eval()
    reference = nn.MultiheadAttention(16, 4, batch_first=True).eval()
    reference.load_state_dict(ours.state_dict(), strict=True)  # same names and shapes
    x = torch.randn(3, 7, 16)
    mask = torch.triu(torch.full((7, 7), float("-inf")), diagonal=1)
    expected = reference(x, x, x, need_weights=False, attn_mask=mask)[0]
    torch.testing.assert_close(ours(x, mask=mask), expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(ours(x, is_causal=True), expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(ours(x), reference(x, x, x, need_weights=False)[0], atol=1e-6, rtol=1e-5)


def test_transformer_shape_and_causality():
    model = tiny_transformer()
    x = torch.randn(2, 9, 16)
    y = model(x, is_causal=True)
    assert y.shape == (2, 9, 16)
    changed = x.clone()
    changed[:, 6:] = torch.randn(2, 3, 16)  # later positions change ...
    y_changed = model(changed, is_causal=True)
    torch.testing.assert_close(y_changed[:, :6], y[:, :6])  # ... earlier outputs do not
    assert not torch.allclose(y_changed[:, 6:], y[:, 6:])
    assert not torch.allclose(model(changed)[:, :6], model(x)[:, :6])  # without the mask they would


def test_boolean_and_additive_masks_agree_and_combine_with_causal():
    model = tiny_transformer()
    x = torch.randn(2, 6, 16)
    allowed = torch.ones(6, 6, dtype=torch.bool)
    allowed[:, 0] = False  # nobody attends to position 0 ...
    allowed[0, 0] = True  # ... except itself (a row must have one key)
    additive = torch.zeros(6, 6).masked_fill(~allowed, float("-inf"))
    torch.testing.assert_close(model(x, mask=allowed), model(x, mask=additive))
    explicit = causal_mask(6, 6) & allowed
    torch.testing.assert_close(model(x, mask=allowed, is_causal=True), model(x, mask=explicit))
    assert torch.equal(merge_masks(causal_mask(6, 6), allowed), explicit)


def test_causal_mask_is_bottom_right_aligned():
    assert torch.equal(causal_mask(3, 3), torch.tril(torch.ones(3, 3, dtype=torch.bool)))
    assert causal_mask(2, 5).tolist() == [[True, True, True, True, False], [True, True, True, True, True]]
    with pytest.raises(ValueError, match="query_length 4 exceeds key_length 2"):
        causal_mask(4, 2)


def test_kv_cached_decoding_equals_full_forward():
    model = tiny_transformer()
    x = torch.randn(2, 8, 16)
    full = model(x, is_causal=True)
    caches = [KVCache() for _ in model.resblocks]
    prefix = model(x[:, :3], is_causal=True, caches=caches)  # a prompt of 3 positions at once ...
    steps = [model(x[:, t : t + 1], is_causal=True, caches=caches) for t in range(3, 6)]  # ... then one at a time
    chunk = model(x[:, 6:], is_causal=True, caches=caches)  # ... then two at once after the cache
    torch.testing.assert_close(torch.cat([prefix, *steps, chunk], dim=1), full, atol=1e-5, rtol=1e-5)
    assert len(caches[0]) == 8 and caches[0].keys.shape == (2, 4, 8, 4)
    with pytest.raises(ValueError, match="expected one per block"):
        model(x, caches=[KVCache()])


def test_layer_norm_computes_in_fp32_and_returns_input_dtype():
    torch.manual_seed(0)
    norm = LayerNorm(16)
    x = (torch.randn(4, 16) * 100 + 1000).bfloat16()
    y = norm(x)
    assert y.dtype == torch.bfloat16
    expected = nn.functional.layer_norm(x.float(), (16,))
    torch.testing.assert_close(y.float(), expected, atol=2e-2, rtol=1e-2)


def test_activations():
    x = torch.linspace(-3, 3, 13)
    torch.testing.assert_close(QuickGELU()(x), x * torch.sigmoid(1.702 * x))
    torch.testing.assert_close(make_activation("gelu")(x), nn.functional.gelu(x))
    with pytest.raises(ValueError, match="activation 'relu6'"):
        make_activation("relu6")
    with pytest.raises(ValueError, match="n_embd 10 is not divisible by n_head 4"):
        SelfAttention(10, 4)


def test_gradient_checkpointing_gives_the_same_gradients():
    plain = tiny_transformer().train()
    checkpointed = tiny_transformer(grad_checkpointing=True).train()
    x = torch.randn(2, 5, 16)
    for model in (plain, checkpointed):
        model(x, is_causal=True).square().sum().backward()
    for (name, a), (_, b) in zip(plain.named_parameters(), checkpointed.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=1e-5, msg=name)


def test_dropout_only_in_training():
    model = tiny_transformer(dropout=0.5)
    x = torch.randn(2, 5, 16)
    torch.testing.assert_close(model(x), model(x))  # eval: deterministic
    model.train()
    assert not torch.allclose(model(x), model(x))


@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_forward_at_equals_the_full_forward_read_at_those_positions(is_causal, checkpointing):
    torch.manual_seed(0)
    transformer = Transformer(16, 2, 2, grad_checkpointing=checkpointing).train()
    x = torch.randn(3, 7, 16, requires_grad=True)
    positions = torch.tensor([0, 6, 3])
    full = transformer(x, is_causal=is_causal)[torch.arange(3), positions]  # (B, C)
    (full_grad,) = torch.autograd.grad(full.square().sum(), x)
    at = transformer.forward_at(x, positions, is_causal=is_causal)
    (at_grad,) = torch.autograd.grad(at.square().sum(), x)
    torch.testing.assert_close(at, full, atol=1e-5, rtol=0)
    torch.testing.assert_close(at_grad, full_grad, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="one position per row"):
        transformer.forward_at(x, positions[:2])


def test_fill_from_copies_chosen_rows_of_a_cache():
    model = tiny_transformer()
    x = torch.randn(2, 5, 16)
    source = [KVCache(8) for _ in model.resblocks]
    with torch.no_grad():
        model(x[:, :3], is_causal=True, caches=source)
        rows = torch.tensor([1, 0, 1])
        filled = [KVCache(8) for _ in model.resblocks]
        for cache, shared in zip(filled, source):
            cache.fill_from(shared, rows)
        direct = [KVCache(8) for _ in model.resblocks]
        model(x[rows, :3], is_causal=True, caches=direct)
        torch.testing.assert_close(
            model(x[rows, 3:], is_causal=True, caches=filled), model(x[rows, 3:], is_causal=True, caches=direct)
        )
    assert len(filled[0]) == 5 and filled[0].keys.shape == (3, 4, 5, 4)
    with pytest.raises(ValueError, match="already holds 5 positions"):
        filled[0].fill_from(source[0], rows)
    with pytest.raises(ValueError, match="more than the capacity of 2"):
        KVCache(2).fill_from(source[0], rows)
