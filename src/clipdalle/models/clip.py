"""CLIP: an image tower and a text tower trained so that matching (image, caption) pairs have similar embeddings.

Per Radford et al. 2021, "Learning Transferable Visual Models From Natural Language Supervision". The towers keep
OpenAI's parameter names (`visual.conv1`, `visual.transformer.resblocks.N`, `token_embedding`, `ln_final`,
`text_projection`, `logit_scale`, and `visual.layer1` ... `visual.attnpool` for the ResNets), so OpenAI and
open_clip state dicts load with strict=True; clipdalle.convert reads the other layouts.

    model = CLIP(CLIPConfig(...))
    image_features = model.encode_image(images)       # images (B, 3, H, W) in [0, 1] -> (B, embed_dim), unit norm
    text_features = model.encode_text(text)           # token ids (B, T) -> (B, embed_dim), unit norm
    logits_per_image, logits_per_text = model.logits(images, text)   # OpenAI's forward: (B_img, B_txt), (B_txt, B_img)

SigLIP (Zhai et al. 2023, "Sigmoid Loss for Language Image Pre-Training"; SigLIP 2 keeps its towers) is the same
class with `architecture="siglip"`: the image tower has no class token and ends in an attention-pooling head
(`visual.attn_pool`, a learnt probe attending over every patch), the text tower attends both ways and reads its
last position, both projections have biases, and `logit_bias` joins `logit_scale` (`loss="siglip"`).

`model(images, text)` returns the two feature matrices (as open_clip's forward does); the losses are plain
functions of features (`contrastive_loss`, `siglip_loss`), and under torch.distributed the training objective
gathers the other processes' features with their gradients (`gather_features_with_grad`, open_clip's
gather_with_grad + local_loss), so every process computes its own rows of the global-batch loss.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .layers import MLP, LayerNorm, Transformer, init_transformer_

OPENAI_IMAGE_MEAN = [0.48145466, 0.4578275, 0.40821073]  # per-channel pixel mean of OpenAI's training set
OPENAI_IMAGE_STD = [0.26862954, 0.26130258, 0.27577711]
TEXT_POOLINGS = ("argmax", "first_eos", "last")
LOSSES = ("contrastive", "siglip")
ARCHITECTURES = ("clip", "siglip")
ACTIVATION_NAMES = ("gelu", "quick_gelu", "gelu_tanh")
MAX_LOGIT_SCALE = math.log(100.0)  # OpenAI clamps the learned temperature so logits never exceed 100 x cosine


@dataclass
class CLIPConfig:
    embed_dim: int = 512  # size of the joint image-text embedding (OpenAI ViT-B/32 shapes by default)
    image_size: int = 224  # input side in pixels; fixes the number of positional embeddings
    vision_patch_size: int = 32  # ViT patch side in pixels (ViT only)
    vision_n_layer: int = 12  # ViT blocks (ViT only; the ResNet uses vision_layers)
    vision_n_embd: int = 768  # ViT width, or the ResNet stem width (64 for RN50)
    vision_n_head: int = 12  # ViT heads, or the ResNet attention-pool heads (OpenAI: stem width * 32 // 64)
    vision_layers: list[int] = field(default_factory=list)  # ResNet bottlenecks per stage, e.g. [3, 4, 6, 3]; [] = ViT
    context_length: int = 77  # longest token sequence the text tower reads (positional embedding rows)
    vocab_size: int = 49408  # text token ids; 49,408 is OpenAI's BPE
    text_n_layer: int = 12  # text transformer blocks
    text_n_embd: int = 512  # text transformer width
    text_n_head: int = 8  # text attention heads
    activation: str = "quick_gelu"  # gelu | quick_gelu | gelu_tanh; OpenAI's weights were trained with QuickGELU
    image_mean: list[float] = field(default_factory=lambda: list(OPENAI_IMAGE_MEAN))  # subtracted inside encode_image
    image_std: list[float] = field(default_factory=lambda: list(OPENAI_IMAGE_STD))  # divided inside encode_image
    text_pooling: str = "argmax"  # argmax (OpenAI: end-of-text is the largest id) | first_eos (first eos_id) | last
    eos_id: int = 1  # end-of-text id for first_eos pooling; 1 is clipdalle.tokenizer's <eos>
    loss: str = "contrastive"  # contrastive (softmax, CLIP) | siglip (pairwise sigmoid, Zhai et al. 2023)
    grad_checkpointing: bool = False  # recompute block activations in backward: less memory, ~30 % more time
    architecture: str = "clip"  # clip | siglip: no class token, attention-pool head, text read both ways at its end
    vision_mlp_width: int = 0  # hidden width of the image tower's MLPs; 0 = 4 x vision_n_embd (bigG-14: 8192)
    text_mlp_width: int = 0  # hidden width of the text tower's MLPs; 0 = 4 x text_n_embd (SigLIP so400m: 4304)
    text_activation: str = ""  # the text tower's activation when not `activation` ("" = same); open_clip SigLIP: gelu
    norm_eps: float = 1e-5  # LayerNorm epsilon of both towers; SigLIP was trained with 1e-6

    def __post_init__(self) -> None:
        choices = {
            "activation": ACTIVATION_NAMES,
            "text_activation": ("", *ACTIVATION_NAMES),
            "text_pooling": TEXT_POOLINGS,
            "loss": LOSSES,
            "architecture": ARCHITECTURES,
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"CLIPConfig.{name} {getattr(self, name)!r}: expected one of {', '.join(allowed)}")
        for name in ("vision_mlp_width", "text_mlp_width"):
            if getattr(self, name) < 0:
                raise ValueError(f"CLIPConfig.{name} {getattr(self, name)}: expected a width, or 0 for 4x the width")
        if self.architecture == "siglip":
            if self.is_resnet:
                raise ValueError("CLIPConfig: architecture siglip has a ViT image tower; set vision_layers to []")
            if self.embed_dim != self.vision_n_embd:
                raise ValueError(
                    f"CLIPConfig: architecture siglip has no image projection, so embed_dim ({self.embed_dim}) must "
                    f"equal vision_n_embd ({self.vision_n_embd})"
                )
            if self.text_pooling != "last":
                raise ValueError(
                    f"CLIPConfig: architecture siglip reads its text at the last position; set text_pooling last "
                    f"(got {self.text_pooling})"
                )
        for name in ("image_mean", "image_std"):
            if len(getattr(self, name)) != 3:
                raise ValueError(f"CLIPConfig.{name} {getattr(self, name)!r}: expected 3 values (R, G, B)")
        if self.is_resnet:
            if len(self.vision_layers) != 4 or self.image_size % 32 != 0:
                raise ValueError(
                    f"CLIPConfig: a ResNet tower needs 4 stages and image_size divisible by 32, got vision_layers "
                    f"{self.vision_layers} and image_size {self.image_size}"
                )
            pairs = [("vision_n_embd * 32", self.vision_n_embd * 32, "vision_n_head", self.vision_n_head)]
        else:
            if self.image_size % self.vision_patch_size != 0:
                raise ValueError(
                    f"CLIPConfig: image_size {self.image_size} is not divisible by vision_patch_size "
                    f"{self.vision_patch_size}"
                )
            pairs = [("vision_n_embd", self.vision_n_embd, "vision_n_head", self.vision_n_head)]
        pairs.append(("text_n_embd", self.text_n_embd, "text_n_head", self.text_n_head))
        for width_name, width, heads_name, heads in pairs:
            if heads < 1 or width % heads != 0:
                raise ValueError(f"CLIPConfig: {width_name} {width} is not divisible by {heads_name} {heads}")

    @property
    def is_resnet(self) -> bool:
        return len(self.vision_layers) > 0

    @property
    def is_siglip(self) -> bool:
        return self.architecture == "siglip"

    @property
    def text_act(self) -> str:
        return self.text_activation or self.activation


# ------------------------------------------------------------------------------------------ vision: ViT


class VisionTransformer(nn.Module):
    """Patches -> [class token, patches] + positions -> transformer -> class token -> projection."""

    def __init__(self, config: CLIPConfig):
        super().__init__()
        width = config.vision_n_embd
        grid = config.image_size // config.vision_patch_size
        scale = width**-0.5
        self.conv1 = nn.Conv2d(3, width, config.vision_patch_size, stride=config.vision_patch_size, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(grid * grid + 1, width))
        self.ln_pre = LayerNorm(width, eps=config.norm_eps)
        self.transformer = tower_transformer(config, "vision")
        self.ln_post = LayerNorm(width, eps=config.norm_eps)
        self.proj = nn.Parameter(scale * torch.randn(width, config.embed_dim))
        init_transformer_(self.transformer)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """Normalised pixels (B, 3, H, W) -> unnormalised embeddings (B, embed_dim)."""
        x = self.conv1(pixels)  # (B, C, h, w)
        B, C = x.shape[:2]
        x = x.flatten(2).transpose(1, 2)  # (B, h*w, C)
        class_token = self.class_embedding.to(x.dtype).expand(B, 1, C)  # (B, 1, C)
        x = torch.cat([class_token, x], dim=1) + self.positional_embedding.to(x.dtype)  # (B, 1 + h*w, C)
        class_positions = torch.zeros(B, dtype=torch.long, device=x.device)  # (B,)
        x = self.transformer.forward_at(self.ln_pre(x), class_positions)  # (B, C): the class token's output
        return self.ln_post(x) @ self.proj


def tower_transformer(config: CLIPConfig, tower: str) -> Transformer:
    """The transformer of the "vision" or "text" tower, sized by the config's fields with that prefix."""
    return Transformer(
        getattr(config, f"{tower}_n_embd"),
        getattr(config, f"{tower}_n_layer"),
        getattr(config, f"{tower}_n_head"),
        config.text_act if tower == "text" else config.activation,
        grad_checkpointing=config.grad_checkpointing,
        mlp_width=getattr(config, f"{tower}_mlp_width") or None,
        norm_eps=config.norm_eps,
    )


# ------------------------------------------------------------------------------------------ vision: SigLIP


class AttentionPoolingHead(nn.Module):
    """A learnt probe attends over every position, then a residual MLP: SigLIP's "MAP" head (multihead attention
    pooling; transformers' SiglipMultiheadAttentionPoolingHead, timm's AttentionPoolLatent). The attention keeps
    nn.MultiheadAttention's parameter names."""

    def __init__(self, config: CLIPConfig):
        super().__init__()
        width = config.vision_n_embd
        self.n_head = config.vision_n_head
        self.probe = nn.Parameter(torch.randn(1, 1, width) * width**-0.5)
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))  # query, key, value rows stacked
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        self.ln = LayerNorm(width, eps=config.norm_eps)
        self.mlp = MLP(width, config.activation, config.vision_mlp_width or None)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, T, C) -> (B, C)."""
        B, T, C = x.shape
        hs = C // self.n_head
        q = F.linear(self.probe.to(x.dtype), self.in_proj_weight[:C], self.in_proj_bias[:C])  # (1, 1, C)
        q = q.view(1, self.n_head, 1, hs).expand(B, -1, -1, -1)  # (B, nh, 1, hs)
        k, v = F.linear(x, self.in_proj_weight[C:], self.in_proj_bias[C:]).split(C, dim=2)  # (B, T, C) each
        k = k.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        y = F.scaled_dot_product_attention(q, k, v)  # (B, nh, 1, hs)
        y = self.out_proj(y.reshape(B, C))  # (B, C)
        return y + self.mlp(self.ln(y))


class SiglipVisionTransformer(nn.Module):
    """Patches (a convolution with a bias) + positions -> transformer -> LayerNorm -> attention-pooling head. No
    class token, no pre-norm and no projection: the head's output is the embedding (embed_dim = vision_n_embd)."""

    def __init__(self, config: CLIPConfig):
        super().__init__()
        width = config.vision_n_embd
        grid = config.image_size // config.vision_patch_size
        self.conv1 = nn.Conv2d(3, width, config.vision_patch_size, stride=config.vision_patch_size)
        self.positional_embedding = nn.Parameter(width**-0.5 * torch.randn(grid * grid, width))
        self.transformer = tower_transformer(config, "vision")
        self.ln_post = LayerNorm(width, eps=config.norm_eps)
        self.attn_pool = AttentionPoolingHead(config)
        init_transformer_(self.transformer)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """Normalised pixels (B, 3, H, W) -> unnormalised embeddings (B, embed_dim)."""
        x = self.conv1(pixels)  # (B, C, h, w)
        x = x.flatten(2).transpose(1, 2) + self.positional_embedding.to(x.dtype)  # (B, h*w, C)
        x = self.ln_post(self.transformer(x))  # (B, h*w, C): the head attends to every patch
        return self.attn_pool(x)


# ------------------------------------------------------------------------------------------ vision: ResNet


class Bottleneck(nn.Module):
    """1x1 -> 3x3 -> avgpool(stride) -> 1x1 (x4 channels) with a residual; strides are average pools, not strided
    convolutions (OpenAI's anti-aliased ResNet-D variant)."""

    expansion = 4

    def __init__(self, in_channels: int, channels: int, stride: int = 1):
        super().__init__()
        out_channels = channels * self.expansion
        self.conv1 = nn.Conv2d(in_channels, channels, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.avgpool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.conv3 = nn.Conv2d(channels, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.downsample = None
        if stride > 1 or in_channels != out_channels:
            # Keys "-1", "0", "1" as in OpenAI's checkpoints: the pool has no weights, so it holds key "-1".
            self.downsample = nn.Sequential(
                OrderedDict(
                    [
                        ("-1", nn.AvgPool2d(stride) if stride > 1 else nn.Identity()),
                        ("0", nn.Conv2d(in_channels, out_channels, 1, bias=False)),
                        ("1", nn.BatchNorm2d(out_channels)),
                    ]
                )
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.avgpool(F.relu(self.bn2(self.conv2(out))))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(out + identity)


class AttentionPool2d(nn.Module):
    """One query (the mean of the feature map) attends over [mean, every position]: replaces global avg-pool."""

    def __init__(self, grid: int, width: int, n_head: int, out_dim: int):
        super().__init__()
        self.n_head = n_head
        self.positional_embedding = nn.Parameter(torch.randn(grid * grid + 1, width) / width**0.5)
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.c_proj = nn.Linear(width, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Feature map (B, C, H, W) -> (B, out_dim)."""
        B, C = x.shape[:2]
        x = x.flatten(2).transpose(1, 2)  # (B, H*W, C)
        x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1) + self.positional_embedding.to(x.dtype)  # (B, 1+HW, C)
        hs = C // self.n_head
        q = self.q_proj(x[:, :1]).view(B, 1, self.n_head, hs).transpose(1, 2)  # (B, nh, 1, hs)
        k = self.k_proj(x).view(B, -1, self.n_head, hs).transpose(1, 2)  # (B, nh, 1+HW, hs)
        v = self.v_proj(x).view(B, -1, self.n_head, hs).transpose(1, 2)  # (B, nh, 1+HW, hs)
        y = F.scaled_dot_product_attention(q, k, v)  # (B, nh, 1, hs)
        y = y.transpose(1, 2).reshape(B, C)  # (B, C)
        return self.c_proj(y)


class ModifiedResNet(nn.Module):
    """OpenAI's ResNet for CLIP RN50/RN101/RN50x4...: a 3-convolution stem with an average pool, anti-aliased
    bottlenecks, and attention pooling instead of global average pooling."""

    def __init__(self, config: CLIPConfig):
        super().__init__()
        width = config.vision_n_embd
        self.conv1 = nn.Conv2d(3, width // 2, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width // 2)
        self.conv2 = nn.Conv2d(width // 2, width // 2, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width // 2)
        self.conv3 = nn.Conv2d(width // 2, width, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        self.avgpool = nn.AvgPool2d(2)
        in_channels = width
        stages = []
        for index, blocks in enumerate(config.vision_layers):
            channels = width * 2**index
            stride = 1 if index == 0 else 2
            stage = [Bottleneck(in_channels, channels, stride)]
            in_channels = channels * Bottleneck.expansion
            stage += [Bottleneck(in_channels, channels) for _ in range(blocks - 1)]
            stages.append(nn.Sequential(*stage))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.attnpool = AttentionPool2d(config.image_size // 32, width * 32, config.vision_n_head, config.embed_dim)
        # OpenAI's initialisation: attention-pool projections ~ N(0, 1/width); each residual branch starts at zero.
        std = self.attnpool.c_proj.in_features**-0.5
        for projection in (self.attnpool.q_proj, self.attnpool.k_proj, self.attnpool.v_proj, self.attnpool.c_proj):
            nn.init.normal_(projection.weight, std=std)
        for stage in stages:
            for block in stage:
                nn.init.zeros_(block.bn3.weight)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """Normalised pixels (B, 3, H, W) -> unnormalised embeddings (B, embed_dim)."""
        x = F.relu(self.bn1(self.conv1(pixels)))
        x = F.relu(self.bn2(self.conv2(x)))
        x = self.avgpool(F.relu(self.bn3(self.conv3(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))  # (B, 32 * width, H/32, W/32)
        return self.attnpool(x)


# ------------------------------------------------------------------------------------------ the model


def pooling_positions(text: torch.Tensor, pooling: str, eos_id: int) -> torch.Tensor:
    """Index (B,) of the token whose output is the text feature: the end-of-text token.

    "argmax": the largest id (OpenAI: <|endoftext|> is the last id of the vocabulary); "first_eos": the first
    `eos_id`, or the last position for a row that has none; "last": the last position (SigLIP, whose text is
    always padded to its full length)."""
    if pooling == "argmax":
        return text.argmax(dim=-1)
    if pooling == "last":
        return torch.full(text.shape[:1], text.shape[-1] - 1, dtype=torch.long, device=text.device)
    if pooling == "first_eos":
        is_eos = text == eos_id
        first = is_eos.int().argmax(dim=-1)
        return torch.where(is_eos.any(dim=-1), first, torch.full_like(first, text.shape[-1] - 1))
    raise ValueError(f"text pooling {pooling!r}: expected one of {', '.join(TEXT_POOLINGS)}")


def check_images(images: torch.Tensor, size: int) -> None:
    """What encode_image takes, for every backend: (B, 3, size, size)."""
    if images.dim() != 4 or images.shape[1] != 3 or images.shape[2:] != (size, size):
        raise ValueError(
            f"encode_image: expected images of shape (B, 3, {size}, {size}), got {tuple(images.shape)}; "
            f"resize them (see clipdalle.clip.preprocess)"
        )


def check_text(text: torch.Tensor, context_length: int) -> None:
    """What encode_text takes, for every backend: integer ids (B, T) with 1 <= T <= context_length."""
    if text.dim() != 2 or text.shape[1] < 1 or text.shape[1] > context_length:
        raise ValueError(
            f"encode_text: expected token ids of shape (B, T) with 1 <= T <= {context_length}, got {tuple(text.shape)}"
        )
    if text.dtype not in (torch.long, torch.int):
        raise ValueError(f"encode_text: expected integer token ids, got {text.dtype}")


def pair_logits(
    features: torch.Tensor, other_features: torch.Tensor, logit_scale: torch.Tensor, logit_bias: torch.Tensor | None
) -> torch.Tensor:
    """scale * cosine (+ bias): rows `features` (N, D) against columns `other_features` (M, D) -> (N, M)."""
    logits = logit_scale * features @ other_features.t()
    return logits if logit_bias is None else logits + logit_bias


class CLIP(nn.Module):
    model_type = "clip"
    config_class = CLIPConfig

    def __init__(self, config: CLIPConfig):
        super().__init__()
        self.config = config
        if config.is_resnet:
            self.visual = ModifiedResNet(config)
        else:
            self.visual = SiglipVisionTransformer(config) if config.is_siglip else VisionTransformer(config)
        self.transformer = tower_transformer(config, "text")
        self.token_embedding = nn.Embedding(config.vocab_size, config.text_n_embd)
        self.positional_embedding = nn.Parameter(torch.empty(config.context_length, config.text_n_embd))
        self.ln_final = LayerNorm(config.text_n_embd, eps=config.norm_eps)
        if config.is_siglip:  # open_clip's name for SigLIP's biased projection (an nn.Linear, weight (out, in))
            self.text_projection = nn.Linear(config.text_n_embd, config.embed_dim)
        else:
            self.text_projection = nn.Parameter(torch.empty(config.text_n_embd, config.embed_dim))
        if config.loss == "siglip":
            # SigLIP starts at temperature 10 and bias -10 so that the many negative pairs begin near zero loss.
            self.logit_scale = nn.Parameter(torch.tensor(math.log(10.0)))
            self.logit_bias = nn.Parameter(torch.tensor(-10.0))
        else:
            self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # CLIP paper: temperature 0.07
            self.logit_bias = None
        # Not in the state dict: checkpoints from any layout load strictly, and the config holds the values.
        self.register_buffer("image_mean", torch.tensor(config.image_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("image_std", torch.tensor(config.image_std).view(1, 3, 1, 1), persistent=False)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        projection = self.text_projection.weight if config.is_siglip else self.text_projection
        nn.init.normal_(projection, std=config.text_n_embd**-0.5)
        init_transformer_(self.transformer)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [0, 1] -> L2-normalised features (B, embed_dim); normalises with image_mean/std."""
        check_images(images, self.config.image_size)
        pixels = (images - self.image_mean) / self.image_std
        features = self.visual(pixels.to(self.positional_embedding.dtype))
        return F.normalize(features, dim=-1)

    def encode_text(self, text: torch.Tensor) -> torch.Tensor:
        """Token ids (B, T), T <= context_length -> L2-normalised features (B, embed_dim).

        A causal (CLIP) text tower cuts the batch after its last end-of-text token: nothing after it changes the
        feature, so padding costs nothing. SigLIP's tower attends both ways and reads the last position, so it
        sees the whole row, padding included, as it was trained."""
        check_text(text, self.config.context_length)
        positions = pooling_positions(text, self.config.text_pooling, self.config.eos_id)  # (B,)
        if not self.config.is_siglip and text.shape[0] > 0:
            text = text[:, : int(positions.max()) + 1]  # (B, T'): causal, so what follows changes nothing
        return self.encode_text_at(text, positions)

    def encode_text_at(self, text: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Token ids (B, T) read at `positions` (B,) -> L2-normalised features (B, embed_dim). `encode_text` picks
        the positions and cuts the padding; an exported graph reads whole rows (no data-dependent length)."""
        x = self.token_embedding(text) + self.positional_embedding[: text.shape[1]]  # (B, T, C)
        causal = not self.config.is_siglip
        x = self.transformer.forward_at(x, positions, is_causal=causal)  # (B, C): the pooled token's output
        x = self.ln_final(x)
        x = self.text_projection(x) if self.config.is_siglip else x @ self.text_projection
        return F.normalize(x, dim=-1)

    def forward(self, images: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(image_features (B_img, embed_dim), text_features (B_txt, embed_dim)), both L2-normalised: what a loss
        needs, whatever process it runs in (training goes through forward so DistributedDataParallel syncs)."""
        return self.encode_image(images), self.encode_text(text)

    def logits(self, images: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits_per_image (B_img, B_txt), logits_per_text (B_txt, B_img)): scale * cosine (+ bias for SigLIP),
        what OpenAI's CLIP.forward returns."""
        image_features, text_features = self(images, text)
        logits_per_image = pair_logits(image_features, text_features, self.logit_scale.exp(), self.logit_bias)
        return logits_per_image, logits_per_image.t()

    def clamp_logit_scale(self) -> None:
        """Keeps exp(logit_scale) <= 100 (OpenAI clips it after each step for stability)."""
        with torch.no_grad():
            self.logit_scale.clamp_(0, MAX_LOGIT_SCALE)

    def after_step(self) -> None:
        """Called by the training loop after each optimizer step."""
        self.clamp_logit_scale()


# ------------------------------------------------------------------------------------------ losses


def contrastive_loss_from_logits(
    logits_per_image: torch.Tensor, logits_per_text: torch.Tensor, first_label: int = 0
) -> torch.Tensor:
    """Symmetric cross-entropy; row i matches column first_label + i (the process's offset in the global batch)."""
    labels = torch.arange(logits_per_image.shape[0], device=logits_per_image.device) + first_label
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2


def siglip_loss_from_logits(logits_per_image: torch.Tensor, first_label: int = 0) -> torch.Tensor:
    """Pairwise sigmoid loss (SigLIP): -sum log sigmoid(+-logit) over every (image, text) pair / images."""
    rows, columns = logits_per_image.shape
    signs = -torch.ones(rows, columns, device=logits_per_image.device, dtype=logits_per_image.dtype)
    signs[torch.arange(rows), torch.arange(rows) + first_label] = 1.0
    return -F.logsigmoid(signs * logits_per_image).sum() / rows


def contrastive_loss(
    image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor
) -> torch.Tensor:
    """CLIP's loss on one batch of matching pairs; `logit_scale` is the multiplier exp(model.logit_scale)."""
    logits_per_image = pair_logits(image_features, text_features, logit_scale, None)
    return contrastive_loss_from_logits(logits_per_image, logits_per_image.t())


def siglip_loss(
    image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor, logit_bias: torch.Tensor
) -> torch.Tensor:
    """SigLIP's loss on one batch of matching pairs; `logit_scale` is the multiplier exp(model.logit_scale)."""
    return siglip_loss_from_logits(pair_logits(image_features, text_features, logit_scale, logit_bias))


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, features: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(features) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, features.contiguous())
        ctx.rank, ctx.rows = dist.get_rank(), features.shape[0]
        return torch.cat(parts)  # (world * B, D)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        # Every process's loss used our rows: their gradient is the sum over processes (all_reduce works on gloo,
        # where reduce_scatter does not).
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows]


def gather_features_with_grad(features: torch.Tensor) -> torch.Tensor:
    """(B, D) on each of `world` processes -> (world * B, D) on all, in rank order; gradients flow back to each
    process's own rows. Every process must pass the same B."""
    return _GatherWithGrad.apply(features)
