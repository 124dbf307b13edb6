"""Which parts of an image match a text: a relevance map over the cells of a CLIP image tower.

Two published methods, each for ViT and ResNet towers of any size:

- "gradient" (the default): for a ViT, gradient-weighted attention rollout (Chefer, Gur & Wolf 2021, "Generic
  Attention-model Explainability for Interpreting Bi-Modal and Encoder-Decoder Transformers", eq. 5-6; the method
  of their CLIP notebook that openai/CLIP#82 points to): R = I, then per block R += mean_heads((dS/dA * A)^+) R,
  and the map is the class token's row of R over the patches. For a ResNet, Grad-CAM (Selvaraju et al. 2017):
  the feature maps of one stage weighted by their mean gradient, ReLU. The stage is the deepest whose grid has
  at least MIN_GRID cells a side (layer4 at 224 px, as CLIP Grad-CAM notebooks use; layer2 at 32 px).
- "dense": the image tower read out per cell (MaskCLIP, Zhou, Loy & Dai 2022, "Extract Free Dense Labels from
  CLIP"): in a ViT's last block every token keeps its own value (value -> out_proj, without the query-key mixing,
  the residual and the MLP, which ClearCLIP, Lan et al. 2024, found to blur the map), then ln_post and the
  projection; in a ResNet the attention pool's value and output projections applied at every cell of layer4.
  The map is each cell's cosine with the text.

S is the cosine of the image and the text. Maps are (h, w) per image: the patch grid of a ViT, the chosen
stage's grid of a ResNet; `heat` scales one to [0, 1] and `overlay` paints it over the image.

    maps, scores = relevance_maps(model, images, text_features)       # (B, h, w), (B,)
    result = explain_image(model, tokenizer, image, "a red heart")    # {"grid", "peak", "score", ...}
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .runtime import device_of, unwrap
from .transforms import colour_ramp
from .zero_shot import encode_texts

METHODS = ("gradient", "dense")
MIN_GRID = 4  # Grad-CAM on a ResNet reads the deepest stage whose grid is at least this many cells a side
# Heat colours from cold to hot (a blue-green-yellow-red ramp, like matplotlib's "jet" without its dark ends).
HEAT_COLOURS = torch.tensor(
    [[0.0, 0.2, 1.0], [0.0, 0.8, 1.0], [0.2, 1.0, 0.3], [1.0, 0.9, 0.0], [1.0, 0.2, 0.0]]
)  # (5, 3) RGB in [0, 1]
OVERLAY_STRENGTH = 0.65  # at the hottest cell the heat colour covers the image this much


# ------------------------------------------------------------------------------------------ ViT


def _vit_tokens(visual: nn.Module, pixels: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """Normalised pixels (B, 3, H, W) -> the tokens the first block reads (B, 1 + h*w, C), and h, w."""
    x = visual.conv1(pixels)  # (B, C, h, w)
    B, C, h, w = x.shape
    x = x.flatten(2).transpose(1, 2)  # (B, h*w, C)
    class_token = visual.class_embedding.to(x.dtype).expand(B, 1, C)  # (B, 1, C)
    x = torch.cat([class_token, x], dim=1) + visual.positional_embedding.to(x.dtype)  # (B, 1 + h*w, C)
    return visual.ln_pre(x), h, w


def _block_with_attention(block: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One residual attention block (layers.ResidualAttentionBlock in eval mode) with its attention weights made
    explicit: (output (B, T, C), weights (B, nh, T, T)), so that gradients can reach them."""
    attention = block.attn
    B, T, C = x.shape
    nh = attention.n_head
    q, k, v = F.linear(block.ln_1(x), attention.in_proj_weight, attention.in_proj_bias).split(C, dim=2)
    q = q.view(B, T, nh, C // nh).transpose(1, 2)  # (B, nh, T, hs)
    k = k.view(B, T, nh, C // nh).transpose(1, 2)  # (B, nh, T, hs)
    v = v.view(B, T, nh, C // nh).transpose(1, 2)  # (B, nh, T, hs)
    weights = (q @ k.transpose(-2, -1) * (C // nh) ** -0.5).softmax(dim=-1)  # (B, nh, T, T)
    y = (weights @ v).transpose(1, 2).reshape(B, T, C)  # (B, T, C)
    x = x + attention.out_proj(y)
    return x + block.mlp(block.ln_2(x)), weights


def vit_features_with_attention(visual: nn.Module, pixels: torch.Tensor) -> tuple[torch.Tensor, list, int, int]:
    """The ViT's forward pass with every block's attention weights kept: (unnormalised embeddings (B, D), [weights
    (B, nh, T, T) per block], h, w). Equal to `visual(pixels)` (tests/test_explain.py)."""
    x, h, w = _vit_tokens(visual, pixels)
    all_weights = []
    for block in visual.transformer.resblocks:
        x, weights = _block_with_attention(block, x)
        all_weights.append(weights)
    return visual.ln_post(x[:, 0]) @ visual.proj, all_weights, h, w


def attention_rollout(weights: list[torch.Tensor], gradients: list[torch.Tensor]) -> torch.Tensor:
    """Chefer et al. 2021, eq. 5-6: R = I; per block R += mean_heads((grad * A)^+) @ R. weights and gradients
    (B, nh, T, T) per block -> R (B, T, T)."""
    B, _, T, _ = weights[0].shape
    relevance = torch.eye(T, device=weights[0].device).expand(B, T, T)  # (B, T, T)
    for attention, gradient in zip(weights, gradients):
        cam = (gradient * attention).clamp(min=0).mean(dim=1)  # (B, T, T)
        relevance = relevance + cam @ relevance
    return relevance


def _vit_gradient(model: nn.Module, pixels: torch.Tensor, text_features: torch.Tensor) -> tuple:
    embeddings, weights, h, w = vit_features_with_attention(model.visual, pixels)
    scores = (F.normalize(embeddings, dim=-1) * text_features).sum(dim=-1)  # (B,)
    gradients = torch.autograd.grad(scores.sum(), weights)
    relevance = attention_rollout(weights, list(gradients))  # (B, T, T)
    return relevance[:, 0, 1:].reshape(-1, h, w), scores  # the class token's row over the patches


def _vit_dense(model: nn.Module, pixels: torch.Tensor, text_features: torch.Tensor) -> tuple:
    visual = model.visual
    x, h, w = _vit_tokens(visual, pixels)
    *blocks, last = visual.transformer.resblocks
    for block in blocks:
        x = block(x)
    C = x.shape[-1]
    values = F.linear(last.ln_1(x), last.attn.in_proj_weight[2 * C :], last.attn.in_proj_bias[2 * C :])  # (B, T, C)
    cells = F.normalize(visual.ln_post(last.attn.out_proj(values[:, 1:])) @ visual.proj, dim=-1)  # (B, h*w, D)
    embeddings = visual.ln_post(last(x)[:, 0]) @ visual.proj  # (B, D): the usual image embedding, for the score
    scores = (F.normalize(embeddings, dim=-1) * text_features).sum(dim=-1)  # (B,)
    return (cells @ text_features[:, :, None])[..., 0].reshape(-1, h, w), scores  # (B, h, w)


# ------------------------------------------------------------------------------------------ ResNet


def gradcam_stage(image_size: int) -> int:
    """The ResNet stage (1-4) Grad-CAM reads: the deepest whose grid (image_size / 4 / 2^(stage - 1)) has at
    least MIN_GRID cells a side, else stage 1."""
    for stage in (4, 3, 2, 1):
        if image_size // (4 * 2 ** (stage - 1)) >= MIN_GRID:
            return stage
    return 1


def _resnet_gradient(model: nn.Module, pixels: torch.Tensor, text_features: torch.Tensor) -> tuple:
    visual = model.visual
    chosen = gradcam_stage(pixels.shape[-1])
    stages = (visual.layer1, visual.layer2, visual.layer3, visual.layer4)
    feature_map = _resnet_stages_until(visual, pixels, chosen)  # (B, C, h, w)
    x = feature_map
    for stage in stages[chosen:]:
        x = stage(x)
    scores = (F.normalize(visual.attnpool(x), dim=-1) * text_features).sum(dim=-1)  # (B,)
    (gradient,) = torch.autograd.grad(scores.sum(), feature_map)  # (B, C, h, w)
    weights = gradient.mean(dim=(2, 3), keepdim=True)  # (B, C, 1, 1): Grad-CAM's alpha
    return (weights * feature_map).sum(dim=1).clamp(min=0), scores  # (B, h, w)


def _resnet_stages_until(visual: nn.Module, pixels: torch.Tensor, stage: int) -> torch.Tensor:
    x = F.relu(visual.bn1(visual.conv1(pixels)))
    x = F.relu(visual.bn2(visual.conv2(x)))
    x = visual.avgpool(F.relu(visual.bn3(visual.conv3(x))))
    for layer in (visual.layer1, visual.layer2, visual.layer3, visual.layer4)[:stage]:
        x = layer(x)
    return x


def _resnet_dense(model: nn.Module, pixels: torch.Tensor, text_features: torch.Tensor) -> tuple:
    visual = model.visual
    pool = visual.attnpool
    x = _resnet_stages_until(visual, pixels, 4)  # (B, C, h, w)
    B, C, h, w = x.shape
    cells = x.flatten(2).transpose(1, 2) + pool.positional_embedding[1:].to(x.dtype)  # (B, h*w, C)
    cells = F.normalize(pool.c_proj(pool.v_proj(cells)), dim=-1)  # (B, h*w, D)
    scores = (F.normalize(pool(x), dim=-1) * text_features).sum(dim=-1)  # (B,)
    return (cells @ text_features[:, :, None])[..., 0].reshape(B, h, w), scores


# ------------------------------------------------------------------------------------------ the maps


def relevance_maps(
    model: nn.Module, images: torch.Tensor, text_features: torch.Tensor, method: str = "gradient"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Relevance (B, h, w) of each cell of images (B, 3, S, S) in [0, 1] (S the model's image_size) for unit text
    features (B, D) or (1, D), and the image-text cosines (B,). Larger is more relevant; the scale is the
    method's own (see `heat`)."""
    if method not in METHODS:
        raise ValueError(f"explain method {method!r}: expected one of {', '.join(METHODS)}")
    model = unwrap(model)
    size = model.config.image_size
    if images.dim() != 4 or images.shape[1] != 3 or images.shape[2:] != (size, size):
        raise ValueError(f"explain: expected images of shape (B, 3, {size}, {size}), got {tuple(images.shape)}")
    device = device_of(model)
    text_features = text_features.to(device, model.positional_embedding.dtype).expand(images.shape[0], -1)  # (B, D)
    pixels = (images.to(device) - model.image_mean) / model.image_std
    pixels = pixels.to(model.positional_embedding.dtype).requires_grad_(True)  # a graph to differentiate
    kind = ("resnet" if model.config.is_resnet else "vit", method)
    compute = {
        ("vit", "gradient"): _vit_gradient,
        ("vit", "dense"): _vit_dense,
        ("resnet", "gradient"): _resnet_gradient,
        ("resnet", "dense"): _resnet_dense,
    }[kind]
    with torch.enable_grad():
        maps, scores = compute(model, pixels, text_features)
    return maps.detach().float(), scores.detach().float()


def heat(maps: torch.Tensor) -> torch.Tensor:
    """Maps (..., h, w) scaled to [0, 1] per map (min -> 0, max -> 1); a constant map is all zeros."""
    flat = maps.flatten(-2)  # (..., h*w)
    low, high = flat.min(dim=-1, keepdim=True).values, flat.max(dim=-1, keepdim=True).values
    scaled = (flat - low) / (high - low).clamp(min=1e-12)
    return torch.where(high > low, scaled, torch.zeros_like(scaled)).view(maps.shape)


def peak(maps: torch.Tensor, size: int) -> torch.Tensor:
    """(..., 2) pixel coordinates (x, y) on a size x size image of the centre of each map's hottest cell."""
    h, w = maps.shape[-2:]
    index = maps.flatten(-2).argmax(dim=-1)  # (...,)
    row, column = index // w, index % w
    return torch.stack([(column.float() + 0.5) * size / w, (row.float() + 0.5) * size / h], dim=-1)


def overlay(image: torch.Tensor, heat_map: torch.Tensor, size: int | None = None) -> torch.Tensor:
    """The image (3, H, W) in [0, 1] with `heat_map` (h, w) in [0, 1] painted over it (bilinear upsampling), at
    size x size when given: hot cells in warm colours, cold ones left almost as they are."""
    if size is not None and image.shape[-1] != size:
        image = F.interpolate(image[None], size=(size, size), mode="nearest")[0]  # crisp pixels for small icons
    H, W = image.shape[-2:]
    upsampled = F.interpolate(heat_map[None, None].float(), size=(H, W), mode="bilinear", align_corners=False)[0, 0]
    upsampled = upsampled.clamp(0, 1).to(image.device)  # (H, W)
    colours = colour_ramp(upsampled, HEAT_COLOURS).permute(2, 0, 1)  # (3, H, W)
    strength = OVERLAY_STRENGTH * upsampled
    return image * (1 - strength) + colours * strength


def explain_image(
    model: nn.Module, tokenizer: Any, image: torch.Tensor, text: str, method: str = "gradient"
) -> dict[str, Any]:
    """One image (3, S, S) in [0, 1] and one text: {"text", "method", "score" (cosine), "grid" (h x w lists of
    heat in [0, 1]), "relevance" (the raw map), "peak" ([x, y] in the image's pixels)}."""
    if not text.strip():
        raise ValueError("explain: the text is empty; expected what to look for, e.g. 'a red heart'")
    return {
        "text": text.strip(),
        **explain_features(model, image, encode_texts(model, tokenizer, [text.strip()]), method),
    }


def explain_features(
    model: nn.Module, image: torch.Tensor, features: torch.Tensor, method: str = "gradient"
) -> dict[str, Any]:
    """`explain_image` for any unit query feature (1, D) or (D,), e.g. a combination of texts and images:
    {"method", "score", "grid", "relevance", "peak"}."""
    maps, scores = relevance_maps(model, image[None], features.reshape(1, -1), method)
    hot = heat(maps)[0]  # (h, w)
    x, y = peak(maps, image.shape[-1])[0].tolist()
    return {
        "method": method,
        "score": round(float(scores[0]), 6),
        "grid": [[round(value, 4) for value in row] for row in hot.tolist()],
        "relevance": [[round(value, 6) for value in row] for row in maps[0].tolist()],
        "peak": [round(x, 2), round(y, 2)],
    }
