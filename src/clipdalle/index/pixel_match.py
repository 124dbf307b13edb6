"""Pixel checks for near-duplicates: which stored images may be copies of each other, and which are.

A CLIP trained to tell captions apart places two different pictures of one subject (two icons of one family, one
icon in two colours) as close together as a picture and its JPEG copy, and it places a mirrored copy further away
than either. Photo de-duplicators settle the question on the pixels, and so does this module, in two steps on
small thumbnails of the stored images (the whole image resized to THUMB_SIZE square, so a crop of a non-square
picture lines up with its original):

1. candidates: each image's CANDIDATES nearest neighbours by a perceptual descriptor, the thumbnail blurred and
   pooled to DESCRIPTOR_SIDE x DESCRIPTOR_SIDE (a perceptual hash with real values), searched in a faiss flat
   index that holds every descriptor as it is and mirrored, so a mirrored copy is as near as any other;
2. verification: for each of six alignments of the second image (as it is or mirrored, scaled about the centre
   by 1, 0.9 or 1 / 0.9, which undoes a crop to 90 % of each side or its inverse), the largest per-pixel,
   per-channel difference of the two thumbnails after a Gaussian blur of BLUR_SIGMA pixels (which forgives
   resampling and compression noise but not an added badge or another shape); the pair's distance is the
   smallest over the alignments, in [0, 1]. A pair is a near-duplicate at or below PIXEL_THRESHOLD;
3. colour: the same picture in another colour (an icon set in eight colours) passes step 2 when its strokes are
   thin, since blurring mixes them with the background. Where both images have flat regions of ink (pixels whose
   3 x 3 neighbourhood is even, away from the background), the mean colours of those regions must agree within
   COLOUR_THRESHOLD: resizing, cropping and mirroring keep a flat region's colour, a recolour does not. (A JPEG
   at low quality shifts thin strokes' colours as far as a neighbouring palette colour, which is why the check
   stays off without flat regions.)

    thumbs = thumbnails(images)                      # (N, 3, 32, 32) uint8
    pairs = candidate_pairs(thumbs)                  # (P, 2) row numbers, first < second
    accepted = matches(thumbs, pairs)                # (P,) bool, with pixel_distances and colour_differences

PIXEL_THRESHOLD and COLOUR_THRESHOLD are calibrated on copies of the validation icons (benchmarks/RESULTS.md,
Near-duplicates).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..transforms import RESIZE_FILTER, RESIZE_REDUCING_GAP, to_rgb

THUMB_SIZE = 32  # side of the thumbnails compared; the built-in icons' size
DESCRIPTOR_SIDE = 8  # the candidate descriptor: the blurred thumbnail pooled to 8 x 8 x 3
DESCRIPTOR_SIGMA = 1.5  # blur (pixels of the thumbnail) before pooling
CANDIDATES = 8  # nearest neighbours per image by the descriptor
BLUR_SIGMA = 0.7  # blur (pixels of the thumbnail) before the verifying difference
SCALES = (1.0, 0.9, 1 / 0.9)  # alignments tried, each as it is and mirrored
PIXEL_THRESHOLD = 0.44  # largest blurred difference of a near-duplicate: 96 % of the copies found (RESULTS.md)
FLAT_RANGE = 0.08  # a flat pixel: its 3 x 3 neighbourhood spans less than this in every channel
INK_CONTRAST = 0.25  # ink: a pixel further than this from the border's median colour in some channel
MIN_FLAT_PIXELS = 4  # flat ink pixels each image needs for the colour check to apply
COLOUR_THRESHOLD = 0.15  # largest per-channel difference of the flat ink colours of a near-duplicate
PAIR_BATCH = 512  # pairs verified at once


def thumbnail(image: Image.Image) -> np.ndarray:
    """One image (any mode) as a THUMB_SIZE square RGB thumbnail (THUMB_SIZE, THUMB_SIZE, 3) uint8, stretched."""
    size = (THUMB_SIZE, THUMB_SIZE)
    return np.asarray(to_rgb(image).resize(size, RESIZE_FILTER, reducing_gap=RESIZE_REDUCING_GAP), dtype=np.uint8)


def thumbnails(images: list[Image.Image]) -> torch.Tensor:
    """Images as thumbnails (N, 3, S, S) uint8, S = THUMB_SIZE."""
    if not images:
        return torch.zeros((0, 3, THUMB_SIZE, THUMB_SIZE), dtype=torch.uint8)
    stacked = np.stack([thumbnail(image) for image in images])  # (N, S, S, 3)
    return torch.from_numpy(stacked).permute(0, 3, 1, 2).contiguous()  # (N, 3, S, S)


def gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """Float images (N, 3, S, S) blurred by a separable Gaussian of `sigma` pixels (edges replicated)."""
    radius = max(1, int(3 * sigma + 0.5))
    offsets = torch.arange(-radius, radius + 1, dtype=images.dtype)
    kernel = torch.exp(-(offsets**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()  # (K,)
    channels = images.shape[1]
    across = kernel.view(1, 1, 1, -1).expand(channels, 1, 1, -1)  # (3, 1, 1, K)
    down = kernel.view(1, 1, -1, 1).expand(channels, 1, -1, 1)  # (3, 1, K, 1)
    images = F.conv2d(F.pad(images, (radius, radius, 0, 0), mode="replicate"), across, groups=channels)
    return F.conv2d(F.pad(images, (0, 0, radius, radius), mode="replicate"), down, groups=channels)


def _as_float(thumbs: torch.Tensor) -> torch.Tensor:
    return thumbs.float().div_(255.0)


def descriptors(thumbs: torch.Tensor) -> np.ndarray:
    """The candidate descriptors of thumbnails (N, 3, S, S) uint8: (N, 3 * D * D) float32, D = DESCRIPTOR_SIDE."""
    pooled = F.adaptive_avg_pool2d(gaussian_blur(_as_float(thumbs), DESCRIPTOR_SIGMA), DESCRIPTOR_SIDE)  # (N,3,D,D)
    return np.ascontiguousarray(pooled.flatten(1).numpy(), dtype=np.float32)


def candidate_pairs(thumbs: torch.Tensor, neighbours: int = CANDIDATES) -> np.ndarray:
    """(P, 2) int64 row numbers (first < second, each pair once): every image with its `neighbours` nearest by
    the descriptor, mirrored images included, from a faiss flat index."""
    import faiss

    count = len(thumbs)
    if count < 2:
        return np.zeros((0, 2), dtype=np.int64)
    plain = descriptors(thumbs)  # (N, F)
    mirrored = descriptors(thumbs.flip(-1))  # (N, F)
    flat = faiss.IndexFlatL2(plain.shape[1])
    flat.add(np.concatenate([plain, mirrored]))  # rows N.. are the mirrored images
    _, found = flat.search(plain, min(2 * count, neighbours + 2))  # (N, K): itself and its mirror come first
    rows = np.repeat(np.arange(count), found.shape[1])
    others = found.ravel() % count
    keep = (found.ravel() >= 0) & (others != rows)
    pairs = np.stack([np.minimum(rows[keep], others[keep]), np.maximum(rows[keep], others[keep])], axis=1)
    return np.unique(pairs, axis=0).astype(np.int64)


def _aligned(images: torch.Tensor, scale: float, mirrored: bool) -> torch.Tensor:
    """Images (B, 3, S, S) mirrored left-right if asked, then scaled by `scale` about the centre (scale < 1
    enlarges the middle: the view a crop to `scale` of each side gives), bilinear, edges replicated."""
    if mirrored:
        images = images.flip(-1)
    if scale == 1.0:
        return images
    theta = torch.tensor([[scale, 0.0, 0.0], [0.0, scale, 0.0]], dtype=images.dtype).expand(len(images), 2, 3)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)  # (B, S, S, 2)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def pixel_distances(thumbs: torch.Tensor, pairs: np.ndarray) -> np.ndarray:
    """For each pair of row numbers (P, 2) of `thumbs` (N, 3, S, S) uint8: the smallest over the alignments of the
    largest blurred per-pixel, per-channel difference, (P,) float32 in [0, 1]."""
    distances = []
    for start in range(0, len(pairs), PAIR_BATCH):
        batch = torch.from_numpy(pairs[start : start + PAIR_BATCH])
        first = gaussian_blur(_as_float(thumbs[batch[:, 0]]), BLUR_SIGMA)  # (B, 3, S, S)
        second = _as_float(thumbs[batch[:, 1]])
        best = torch.full((len(batch),), float("inf"))
        for mirrored in (False, True):
            for scale in SCALES:
                view = gaussian_blur(_aligned(second, scale, mirrored), BLUR_SIGMA)
                largest = (first - view).abs().flatten(1).amax(1)  # (B,)
                best = torch.minimum(best, largest)
        distances.append(best)
    if not distances:
        return np.zeros(0, dtype=np.float32)
    return torch.cat(distances).numpy().astype(np.float32)


def flat_ink_colours(thumbs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(colours (N, 3) float in [0, 1], counts (N,)): the mean colour of each thumbnail's flat ink pixels and how
    many there are (see the module's step 3)."""
    images = _as_float(thumbs)  # (N, 3, S, S)
    highest = F.max_pool2d(images, 3, stride=1, padding=1)
    lowest = -F.max_pool2d(-images, 3, stride=1, padding=1)
    flat = ((highest - lowest) < FLAT_RANGE).all(dim=1)  # (N, S, S)
    border = torch.cat([images[:, :, 0], images[:, :, -1], images[:, :, :, 0], images[:, :, :, -1]], dim=-1)  # (N,3,4S)
    background = border.median(dim=-1).values[:, :, None, None]  # (N, 3, 1, 1)
    ink = (images - background).abs().amax(dim=1) > INK_CONTRAST  # (N, S, S)
    weights = (flat & ink).float()[:, None]  # (N, 1, S, S)
    counts = weights.sum(dim=(1, 2, 3))  # (N,)
    colours = (images * weights).sum(dim=(2, 3)) / counts.clamp_min(1)[:, None]  # (N, 3)
    return colours, counts


def colour_differences(thumbs: torch.Tensor, pairs: np.ndarray) -> np.ndarray:
    """For each pair of row numbers (P, 2): the largest per-channel difference of the two images' flat ink
    colours, (P,) float32; NaN where either image has fewer than MIN_FLAT_PIXELS flat ink pixels."""
    colours, counts = flat_ink_colours(thumbs)
    first, second = torch.from_numpy(pairs[:, 0]), torch.from_numpy(pairs[:, 1])
    differences = (colours[first] - colours[second]).abs().amax(dim=1)  # (P,)
    enough = (counts[first] >= MIN_FLAT_PIXELS) & (counts[second] >= MIN_FLAT_PIXELS)
    return torch.where(enough, differences, torch.full_like(differences, float("nan"))).numpy().astype(np.float32)


def matches(thumbs: torch.Tensor, pairs: np.ndarray, pixel_threshold: float = PIXEL_THRESHOLD) -> np.ndarray:
    """(accepted (P,) bool, pixel distances (P,) float32): the pairs within `pixel_threshold` whose flat ink
    colours agree (or that have no flat ink to compare)."""
    distances = pixel_distances(thumbs, pairs)
    colours = colour_differences(thumbs, pairs) if len(pairs) else np.zeros(0, dtype=np.float32)
    colour_agrees = ~(colours > COLOUR_THRESHOLD)  # NaN compares False: no flat ink, no colour check
    return (distances <= pixel_threshold) & colour_agrees, distances
