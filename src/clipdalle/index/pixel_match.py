"""Pixel checks for near-duplicates: which stored images may be copies of each other, and which are.

A CLIP trained to tell captions apart places two different pictures of one subject (two icons of one family, one
icon in two colours) as close together as a picture and its JPEG copy, and it places a mirrored copy further away
than either. Photo de-duplicators settle the question on the pixels, and so does this module: steps 1 to 4 on
small thumbnails of the stored images (the whole image resized to THUMB_SIZE square, so a crop of a non-square
picture lines up with its original), step 5 on the stored files themselves:

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
4. ink colour: where both images are lossless (PNG, BMP, GIF: the caller says which) and drawn on a plain
   background (most of the border within FLAT_RANGE of its median colour, the same in both), the direction in RGB
   of the sum over the thumbnail of (pixel - background) is the ink's colour seen from the background, whatever
   the ink's amount: resizing, cropping to 90 % and mirroring keep it within about 1.3 degrees, while the nearest
   two colours of the icon palette (red and pink) are 10.9 degrees apart. Such a pair is a near-duplicate only
   within INK_ANGLE_THRESHOLD;
5. JPEG: where one image of a pair is a JPEG and the other a lossless image of the same size, a JPEG copy of the
   lossless one is exactly what saving it with the JPEG's own quantisation tables and chroma subsampling gives.
   `reencoding_distance` saves it so, as it is and mirrored, and measures the mean per-pixel difference to the
   JPEG relative to how far the JPEG departs from its background: 0 for a copy saved by this encoder (progressive
   or not), 0.02 on median for one saved from pixels off by a level or two (another decoder or colour
   conversion), 0.10 for one saved twice, and 0.78 on median for a recolour, which steps 2 to 4 cannot tell from
   the colour noise of a low-quality JPEG (up to 15 degrees of ink direction at quality 20 and 32 px). Such a pair
   is a near-duplicate only within REENCODE_THRESHOLD; a JPEG saved first at high quality and then at low quality
   passes 81 % of the time (benchmarks/RESULTS.md).

    thumbs = thumbnails(images)                      # (N, 3, 32, 32) uint8
    pairs = candidate_pairs(thumbs)                  # (P, 2) row numbers, first < second
    accepted, distances = matches(thumbs, pairs, lossless=lossless)  # (P,) bool: steps 2 to 4
    reencoding_distance(lossless_image, jpeg_image, jpeg_settings(jpeg_image))  # step 5, on the stored images

PIXEL_THRESHOLD, COLOUR_THRESHOLD, INK_ANGLE_THRESHOLD and REENCODE_THRESHOLD are calibrated on copies of the
validation icons (benchmarks/RESULTS.md, Near-duplicates).
"""

from __future__ import annotations

import io

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, JpegImagePlugin

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
PLAIN_BORDER = 0.9  # a plain background: this share of the border's pixels within FLAT_RANGE of its median
MIN_INK = 0.01  # the ink direction needs a mean |pixel - background| (largest channel) of at least this
INK_ANGLE_THRESHOLD = 5.0  # degrees between the ink directions of a lossless near-duplicate pair
PAIR_BATCH = 512  # pairs verified at once
REENCODE_THRESHOLD = 0.22  # largest relative difference between a JPEG and its lossless original saved alike
EXIF_ORIENTATION = 0x0112


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


def border_background(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(background (N, 3), plain (N,) bool) of float images (N, 3, S, S): the median colour of each image's border
    pixels, and whether PLAIN_BORDER of them lie within FLAT_RANGE of it in every channel."""
    border = torch.cat([images[:, :, 0], images[:, :, -1], images[:, :, :, 0], images[:, :, :, -1]], dim=-1)  # (N,3,4S)
    background = border.median(dim=-1).values  # (N, 3)
    near = ((border - background[:, :, None]).abs() < FLAT_RANGE).all(dim=1)  # (N, 4S)
    return background, near.float().mean(dim=1) >= PLAIN_BORDER


def flat_ink_colours(thumbs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(colours (N, 3) float in [0, 1], counts (N,)): the mean colour of each thumbnail's flat ink pixels and how
    many there are (see the module's step 3)."""
    images = _as_float(thumbs)  # (N, 3, S, S)
    highest = F.max_pool2d(images, 3, stride=1, padding=1)
    lowest = -F.max_pool2d(-images, 3, stride=1, padding=1)
    flat = ((highest - lowest) < FLAT_RANGE).all(dim=1)  # (N, S, S)
    background = border_background(images)[0][:, :, None, None]  # (N, 3, 1, 1)
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


def ink_angles(thumbs: torch.Tensor, pairs: np.ndarray) -> np.ndarray:
    """For each pair of row numbers (P, 2): the angle in degrees between the two images' ink directions (the
    module's step 4), (P,) float32; NaN where either background is not plain, the backgrounds differ by
    FLAT_RANGE or more in some channel, or either image has less than MIN_INK of ink."""
    images = _as_float(thumbs)  # (N, 3, S, S)
    background, plain = border_background(images)
    deviation = images - background[:, :, None, None]
    ink = deviation.sum(dim=(2, 3))  # (N, 3)
    inked = plain & (deviation.abs().amax(dim=1).mean(dim=(1, 2)) >= MIN_INK)  # (N,)
    first, second = torch.from_numpy(pairs[:, 0]), torch.from_numpy(pairs[:, 1])
    cosine = F.cosine_similarity(ink[first], ink[second], dim=1).clamp(-1.0, 1.0)  # (P,)
    angles = torch.rad2deg(torch.arccos(cosine))
    same_background = ((background[first] - background[second]).abs() < FLAT_RANGE).all(dim=1)
    applies = inked[first] & inked[second] & same_background
    return torch.where(applies, angles, torch.full_like(angles, float("nan"))).numpy().astype(np.float32)


def matches(
    thumbs: torch.Tensor,
    pairs: np.ndarray,
    pixel_threshold: float = PIXEL_THRESHOLD,
    lossless: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(accepted (P,) bool, pixel distances (P,) float32): the pairs within `pixel_threshold` whose flat ink
    colours agree (or that have no flat ink to compare) and, where `lossless` (N,) bool says both images are
    lossless, whose ink directions agree within INK_ANGLE_THRESHOLD (or cannot be compared)."""
    distances = pixel_distances(thumbs, pairs)
    if not len(pairs):
        return np.zeros(0, dtype=bool), distances
    colour_agrees = ~(colour_differences(thumbs, pairs) > COLOUR_THRESHOLD)  # NaN compares False: no check
    accepted = (distances <= pixel_threshold) & colour_agrees
    if lossless is not None:
        both = lossless[pairs[:, 0]] & lossless[pairs[:, 1]]
        accepted &= ~(both & (ink_angles(thumbs, pairs) > INK_ANGLE_THRESHOLD))
    return accepted, distances


def jpeg_settings(image: Image.Image) -> dict | None:
    """How an opened image was saved, if it is a JPEG whose saving can be repeated: {"qtables", "subsampling",
    "mode" ("RGB" or "L")}; None for any other image (a CMYK JPEG, one of unknown subsampling and one shown turned
    by its EXIF orientation included)."""
    if image.format != "JPEG" or image.mode not in ("RGB", "L") or not getattr(image, "quantization", None):
        return None
    if image.getexif().get(EXIF_ORIENTATION, 1) != 1:  # shown turned: its blocks no longer line up with the view
        return None
    subsampling = JpegImagePlugin.get_sampling(image) if image.mode == "RGB" else 0
    if subsampling < 0:
        return None
    return {"qtables": image.quantization, "subsampling": subsampling, "mode": image.mode}


def saved_like(image: Image.Image, settings: dict) -> Image.Image:
    """`image` saved as a JPEG with `settings` (from `jpeg_settings`) and decoded again, in the JPEG's mode."""
    buffer = io.BytesIO()
    image.convert(settings["mode"]).save(
        buffer, format="JPEG", qtables=settings["qtables"], subsampling=settings["subsampling"]
    )
    return Image.open(io.BytesIO(buffer.getvalue())).convert(settings["mode"])


def reencoding_distance(lossless: Image.Image, jpeg: Image.Image, settings: dict) -> float:
    """Step 5: how far `jpeg` (opened, with its `jpeg_settings`) is from `lossless` (the same size) saved with
    those settings, as it is or mirrored, whichever is nearer: the mean over pixels of the largest per-channel
    difference, relative to the mean over pixels of the JPEG's largest per-channel departure from its border's
    median colour (how much picture there is to differ), >= 0. A recolour differs wherever there is ink, whatever
    the strokes' width; a copy from another encoder differs by a level or two here and there."""
    if lossless.size != jpeg.size:
        raise ValueError(f"reencoding_distance: sizes differ ({lossless.size} and {jpeg.size})")

    def as_tensor(image: Image.Image) -> torch.Tensor:  # (1, C, H, W) float in [0, 1]
        pixels = np.asarray(image.convert(settings["mode"]), dtype=np.float32) / 255.0
        return torch.from_numpy(pixels.reshape(pixels.shape[0], pixels.shape[1], -1)).permute(2, 0, 1)[None]

    target = as_tensor(jpeg)
    background = border_background(target)[0][:, :, None, None]  # (1, C, 1, 1)
    picture = float((target - background).abs().amax(dim=1).mean())
    best = float("inf")
    for candidate in (lossless, lossless.transpose(Image.Transpose.FLIP_LEFT_RIGHT)):
        difference = (as_tensor(saved_like(candidate, settings)) - target).abs().amax(dim=1).mean()
        best = min(best, float(difference))
    return best / max(picture, 1 / 255)
