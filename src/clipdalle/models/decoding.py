"""Decoding fast paths of the DALL·E transformer: the same arithmetic as its forward pass, arranged for feeding
a prompt once and then one new position per step (tested equal to `DALLE.forward` in tests/models/test_decoding.py).

- `last_block_output`: a block fed a whole prompt, computed at its last position only (the only one read);
- `BlockStep`: a block's weights laid out for one new position per row, where every matrix product has B rows;
- `ImageStep`: `DALLE.extend` for one code per row, built from `BlockStep`s: the sampler's inner loop.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from .layers import KVCache, ResidualAttentionBlock, SelfAttention, apply_layer_norm


def snapshot_dtype(weight: torch.Tensor) -> torch.dtype:
    """The dtype of a decoding step's weight copies: autocast's when it is on for their device (bf16 on a GPU), so
    that the products do not cast every weight at every step; else the weights' own."""
    if torch.is_autocast_enabled(weight.device.type):
        return torch.get_autocast_dtype(weight.device.type)
    return weight.dtype


def last_position_attention(attention: SelfAttention, x: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """x (B, T, C), new positions after those in `cache` -> (B, 1, C): `attention(x, is_causal=True, cache=cache)`
    at the last position only. Every position's key and value go into the cache, but the query and the output
    projection run for the last position, which sees all the others (what feeding a prompt needs)."""
    B, T, C = x.shape
    nh, hs = attention.n_head, C // attention.n_head
    k, v = F.linear(x, attention.in_proj_weight[C:], attention.in_proj_bias[C:]).split(C, dim=2)
    k = k.view(B, T, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
    v = v.view(B, T, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
    past = len(cache)
    keys, values = cache.append(k, v)  # (B, nh, T_past + T, hs)
    if past == 0:  # the new k, v are all there is: SDPA reads them contiguous, not as a slice of the cache
        keys, values = k, v
    q = F.linear(x[:, -1:], attention.in_proj_weight[:C], attention.in_proj_bias[:C])  # (B, 1, C)
    q = q.view(B, 1, nh, hs).transpose(1, 2)  # (B, nh, 1, hs)
    y = F.scaled_dot_product_attention(q, keys, values)  # (B, nh, 1, hs)
    return attention.out_proj(y.transpose(1, 2).reshape(B, 1, C))  # (B, 1, C)


def last_block_output(block: ResidualAttentionBlock, x: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """x (B, T, C), new positions after those in `cache` -> (B, 1, C): `block(x, is_causal=True, cache=cache)` at
    the last position only; all T keys and values are still cached. For the last block of a decoder fed a prompt,
    of which only the last position's output is read: the query, output projection and MLP of the other T - 1
    positions are skipped."""
    last = x[:, -1:] + block.residual_dropout(last_position_attention(block.attn, block.ln_1(x), cache))
    return last + block.residual_dropout(block.mlp(block.ln_2(last)))


class BlockStep:
    """A `ResidualAttentionBlock` run on one new position per row after the positions in a `KVCache`: the
    inner loop of token-by-token decoding, where every matrix product has only B rows.

    The block's weights are copied once into the layout that suits such thin products: transposed to (in, out)
    and contiguous, so each product is `torch.addmm(bias, x, weight)` = x @ W, which MKL runs faster for few rows
    than F.linear's x @ W.T (benchmarks/RESULTS.md, DALL·E generation). The attention scale 1/sqrt(hs) is folded
    into the query weights, and single-query attention is two batched matrix products over the filled part of the
    cache (no mask building for causal layers: the cache holds only earlier positions). The copy is a snapshot:
    build a new `BlockStep` after the block's weights change. Built under autocast, the copies are in its dtype
    (`snapshot_dtype`): call it under the same autocast."""

    def __init__(self, block: ResidualAttentionBlock):
        attention = block.attn
        C = attention.in_proj_weight.shape[1]
        self.n_head = attention.n_head
        self.head_size = C // attention.n_head
        dtype = snapshot_dtype(attention.in_proj_weight)
        with torch.no_grad():
            scale = torch.ones(3 * C, dtype=attention.in_proj_weight.dtype, device=attention.in_proj_weight.device)
            scale[:C] = self.head_size**-0.5  # per SDPA: softmax(q k^T / sqrt(hs)); applied to q's weights once
            self.qkv_weight = (attention.in_proj_weight * scale[:, None]).t().to(dtype).contiguous()  # (C, 3C)
            self.qkv_bias = (attention.in_proj_bias * scale).to(dtype)  # (3C,)
            self.out_weight = attention.out_proj.weight.t().to(dtype).contiguous()  # (C, C)
            self.out_bias = attention.out_proj.bias.detach().to(dtype, copy=True)
            self.fc_weight = block.mlp.c_fc.weight.t().to(dtype).contiguous()  # (C, 4C)
            self.fc_bias = block.mlp.c_fc.bias.detach().to(dtype, copy=True)
            self.proj_weight = block.mlp.c_proj.weight.t().to(dtype).contiguous()  # (4C, C)
            self.proj_bias = block.mlp.c_proj.bias.detach().to(dtype, copy=True)
        self.ln_1, self.ln_2 = copy.deepcopy(block.ln_1), copy.deepcopy(block.ln_2)
        self.activation = block.mlp.activation  # parameter-free

    def __call__(self, x: torch.Tensor, cache: KVCache, mask_bias: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, C), one new position per row -> (B, C), the block's output there. The position's key and value
        are appended to `cache` and it attends to every cached position and itself, minus those where
        `mask_bias` (T_past + 1,), additive, is -inf (None: all of them, as in a causal layer)."""
        B, C = x.shape
        nh, hs = self.n_head, self.head_size
        qkv = torch.addmm(self.qkv_bias, apply_layer_norm(self.ln_1, x), self.qkv_weight)  # (B, 3C)
        q, k, v = qkv.view(B, 3, nh, 1, hs).unbind(1)  # (B, nh, 1, hs) each
        keys, values = cache.append(k, v)  # (B, nh, T, hs)
        T = values.shape[2]
        scores = torch.bmm(q.reshape(B * nh, 1, hs), keys.reshape(B * nh, T, hs).transpose(1, 2))  # (B*nh, 1, T)
        if mask_bias is not None:
            scores += mask_bias
        y = torch.bmm(scores.softmax(-1), values.reshape(B * nh, T, hs))  # (B*nh, 1, hs)
        x = x + torch.addmm(self.out_bias, y.view(B, C), self.out_weight)  # heads side by side: (B, C)
        hidden = self.activation(torch.addmm(self.fc_bias, apply_layer_norm(self.ln_2, x), self.fc_weight))  # (B, 4C)
        return x + torch.addmm(self.proj_bias, hidden, self.proj_weight)


class ImageStep:
    """`DALLE.extend` for exactly one code per row, the step a sampler repeats N - 1 times per image, with the
    weights laid out for thin matrix products (`BlockStep`) and the image head alone.

    `ImageStep(model)(codes, cell, caches)` takes codes (B,) of cell `cell` and returns the logits (B,
    image_vocab_size) of code cell + 1, equal to `model.extend(codes[:, None], cell, caches)[:, 0]` up to
    rounding. The weights are a snapshot taken at construction (a copy of the transformer's, ~4 bytes per
    parameter; in autocast's dtype when built under it, like `BlockStep`): build one per sampling run, not once
    per model."""

    def __init__(self, model: nn.Module):  # a clipdalle.models.dalle.DALLE
        config = model.config
        self.text_region = config.text_region
        self.image_length = config.image_length
        self.blocks = [BlockStep(block) for block in model.transformer.resblocks]
        self.patterns = model.patterns
        with torch.no_grad():
            self.image_embedding = model.image_embedding.weight.detach().clone()  # (V, C)
            self.grid_position = model.grid_position_embedding().detach()  # (N, C)
            dtype = snapshot_dtype(model.image_head.weight)
            self.head_weight = model.image_head.weight.t().to(dtype).contiguous()  # (C, V)
            self.head_bias = model.image_head.bias.detach().to(dtype, copy=True)
        self.ln_final = copy.deepcopy(model.ln_final)
        self.mask_biases = {}  # pattern -> additive (L, L) mask, 0 or -inf, for the patterns that are not causal
        for pattern in set(self.patterns) - {"full"}:
            allowed = getattr(model, f"mask_{pattern}")
            self.mask_biases[pattern] = allowed.new_zeros(allowed.shape, dtype=self.head_weight.dtype).masked_fill_(
                ~allowed, float("-inf")
            )

    def __call__(self, codes: torch.Tensor, cell: int, caches: list[KVCache]) -> torch.Tensor:
        """codes (B,) of cell `cell`, fed after what `caches` hold -> logits (B, image_vocab_size) of code cell + 1."""
        position = self.text_region + cell
        if not 0 <= cell < self.image_length - 1:
            raise ValueError(
                f"ImageStep: cell {cell} is not feedable; codes 0 .. {self.image_length - 2} are fed (the last one "
                f"is only predicted)"
            )
        if len(caches[0]) != position:
            raise ValueError(
                f"ImageStep: the caches hold {len(caches[0])} positions, so the next code is cell "
                f"{len(caches[0]) - self.text_region}, not {cell}"
            )
        x = F.embedding(codes, self.image_embedding) + self.grid_position[cell]  # (B, C)
        for block, pattern, cache in zip(self.blocks, self.patterns, caches):
            mask_bias = None if pattern == "full" else self.mask_biases[pattern][position, : position + 1]
            x = block(x, cache, mask_bias)
        x = apply_layer_norm(self.ln_final, x)
        return torch.addmm(self.head_bias, x, self.head_weight)  # (B, V)
