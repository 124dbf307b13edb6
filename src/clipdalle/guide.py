"""CLIP-guided generation on the dVAE's code grid (the VQGAN+CLIP recipe, with our discrete VAE as decoder).

Continuous logits over the codebook per grid cell are optimised with Adam: softmax -> a mix of codebook
vectors per cell -> the dVAE decoder -> random cutouts of the decoded image -> CLIP image features, and the
loss is the spherical distance to the prompt's text features (as in Crowson's VQGAN+CLIP notebook). Cutouts
(random crops resized to CLIP's input, small shifts) keep the optimiser from fitting one exact pixel view.
The result is decoded from the hard argmax codes, so it is an image the dVAE can actually produce.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from .zero_shot import encode_images, encode_texts


@dataclass
class Guided:
    image: torch.Tensor  # (3, H, W) in [0, 1], decoded from the final hard codes
    codes: torch.Tensor  # (h, w) code ids
    scores: list[float] = field(default_factory=list)  # CLIP cosine of the whole image with the prompt, per snapshot
    snapshots: list[torch.Tensor] = field(default_factory=list)  # (3, H, W) decoded hard codes along the way
    snapshot_steps: list[int] = field(default_factory=list)


def spherical_distance(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Squared great-circle distance between unit vectors x (N, D) and y (M, D) -> (N, M)."""
    chord = (x[:, None, :] - y[None, :, :]).norm(dim=-1)  # (N, M), in [0, 2]
    return 2 * (chord / 2).clamp(max=1).arcsin().pow(2)


def cutouts(images: torch.Tensor, count: int, size: int, generator: torch.Generator, min_scale: float = 0.6):
    """`count` random square crops of images (1, 3, H, W), each with side in [min_scale, 1] x H, resized to
    (count, 3, size, size). No flips or colour changes: colour and orientation are part of the prompt."""
    _, _, H, W = images.shape
    crops = []
    for _ in range(count):
        side = int(H * (min_scale + (1 - min_scale) * torch.rand(1, generator=generator).item()))
        top = int(torch.randint(0, H - side + 1, (1,), generator=generator))
        left = int(torch.randint(0, W - side + 1, (1,), generator=generator))
        crop = images[:, :, top : top + side, left : left + side]  # (1, 3, side, side)
        crops.append(F.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False, antialias=True))
    return torch.cat(crops)  # (count, 3, size, size)


def guide(
    vae: torch.nn.Module,
    clip_model: torch.nn.Module,
    tokenizer: Any,
    prompt: str,
    *,
    steps: int = 200,
    lr: float = 0.2,
    n_cutouts: int = 16,
    seed: int = 0,
    init_codes: torch.Tensor | None = None,
    snapshot_every: int = 25,
) -> Guided:
    """Optimises a code grid so that the decoded image matches `prompt` under CLIP. `init_codes` (h, w) starts
    from an existing image's codes (e.g. a DALL·E sample) instead of noise."""
    if steps < 1:
        raise ValueError(f"guide: steps must be at least 1, got {steps}")
    if not prompt.strip():
        raise ValueError("guide: the prompt is empty; CLIP guidance needs a text to move towards")
    grid, vocab = vae.config.grid_size, vae.config.vocab_size
    generator = torch.Generator().manual_seed(seed)
    if init_codes is not None:
        if tuple(init_codes.shape) != (grid, grid):
            raise ValueError(f"guide: init_codes must have shape ({grid}, {grid}), got {tuple(init_codes.shape)}")
        logits = F.one_hot(init_codes.long(), vocab).float()[None] * 4.0  # (1, h, w, K): confident start
    else:
        logits = torch.randn(1, grid, grid, vocab, generator=generator)  # (1, h, w, K)
    logits.requires_grad_(True)
    vae.eval()
    clip_model.eval()
    clip_size = clip_model.config.image_size
    text_features = encode_texts(clip_model, tokenizer, [prompt])  # (1, D)
    optimizer = torch.optim.Adam([logits], lr=lr)
    result = Guided(image=torch.empty(0), codes=torch.empty(0))

    def snapshot(step: int) -> None:
        with torch.no_grad():
            codes = logits.argmax(dim=-1)  # (1, h, w)
            image = vae.decode(codes)  # (1, 3, H, W)
            score = (encode_images(clip_model, image) @ text_features.T).item()
        result.snapshots.append(image[0])
        result.scores.append(score)
        result.snapshot_steps.append(step)

    snapshot(0)
    for step in range(1, steps + 1):
        image = vae.decode_soft(logits.softmax(dim=-1)).clamp(0, 1)  # (1, 3, H, W)
        views = cutouts(image, n_cutouts, clip_size, generator)
        loss = spherical_distance(clip_model.encode_image(views), text_features).mean()
        (logits.grad,) = torch.autograd.grad(loss, [logits])  # only the logits: the models stay untouched
        optimizer.step()
        if step % snapshot_every == 0 or step == steps:
            snapshot(step)
    result.codes = logits.detach().argmax(dim=-1)[0]
    result.image = result.snapshots[-1]
    return result
