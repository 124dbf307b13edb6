"""Image decoding and resizing: PIL in, float tensors (3, H, W) in [0, 1] out.

Every image a dataset can hold (grayscale, palette, CMYK, 16-bit, float, alpha, EXIF-rotated, animated) comes
out of `decode_image` as plain RGB, and a file that cannot be used raises `BadImage` naming it, so a data loader
can skip and count it. Augmentation only crops and moves: colours are never changed, because on icons and
logos the colour is often the very thing a caption says.
"""

from __future__ import annotations

import io
import math
import random
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from .io import atomic_write, read_file

# Refuse images above this many pixels before decoding them: a small file can claim a huge canvas (a
# "decompression bomb") and exhaust memory. 64 M pixels is an 8000 x 8000 photo, far above any training size.
# The count is of RGB pixels: an image with more bands or wider samples costs more (see `decoded_cost`).
MAX_IMAGE_PIXELS = 64_000_000
MAX_IMAGE_BYTES = 256 << 20  # an encoded image file or shard member; a 64 M pixel PNG is below it
# Pillow's resize first shrinks by an integer factor with a box filter while the image stays at least
# `RESIZE_REDUCING_GAP` times the target: much faster on big photos and, per the Pillow docs, indistinguishable
# from a full-quality resize at 3.0.
RESIZE_REDUCING_GAP = 3.0
RESIZE_FILTER = Image.Resampling.LANCZOS  # sharpest of Pillow's filters for downscaling; exact on flat colours

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")


class BadImage(ValueError):
    """An image that cannot be used; the message names the file (or archive member) and why."""


# ---------------------------------------------------------------------------------------------- decoding


def decode_image(data: bytes | str | Path, name: str | None = None, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Decodes encoded image bytes or an image file to an RGB image with its EXIF orientation applied.

    `name` is used in error messages (defaults to the path, or "image bytes"). Truncated files, unreadable
    bytes, files that are not regular or above MAX_IMAGE_BYTES, and images whose `decoded_cost` is above
    `max_pixels` (a server may set a lower cap) raise BadImage. Animated images give their first frame.
    """
    if isinstance(data, (str, Path)):
        name = name or str(data)
        try:
            data = read_file(data, MAX_IMAGE_BYTES, "image file")
        except OSError as error:
            raise BadImage(f"{name}: cannot read the file ({_one_line(error.strerror or error)})") from None
    name = name or "image bytes"
    try:
        # Pillow warns above its own limit and raises at twice it; turning the warning into an error here
        # (not in Pillow's global settings) lets every bomb end as a BadImage.
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width < 1 or height < 1:
                raise BadImage(f"{name}: empty image ({width} x {height} pixels)")
            cost = decoded_cost(image)
            if cost > max_pixels:
                raise BadImage(
                    f"{name}: {width} x {height} {image.mode} costs {cost} RGB pixels to decode, above the pixel limit "
                    f"({max_pixels}); refusing to decode it (a decompression bomb or an oversized image)"
                )
            # `.load()` decodes now, inside the try: Pillow decodes lazily, and with LOAD_TRUNCATED_IMAGES left
            # False a truncated file raises here instead of giving half an image.
            image.load()
            image = ImageOps.exif_transpose(image)
            return to_rgb(image)
    except BadImage:
        raise
    except Image.UnidentifiedImageError:
        raise BadImage(f"{name}: not an image (unknown format or a corrupt header)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise BadImage(f"{name}: image too large to decode safely ({_one_line(error)})") from None
    except Exception as error:  # Pillow raises OSError, SyntaxError, ValueError, EOFError, zlib.error, ...
        raise BadImage(f"{name}: not a readable image ({type(error).__name__}: {_one_line(error)})") from None


def decoded_cost(image: Image.Image) -> int:
    """What decoding an opened (not yet loaded) image costs, in RGB pixels: width x height x bands x bytes per band
    / 3, and at least its pixel count. An RGBA or CMYK image costs 4/3 of its pixels (transparency is composited on
    white through RGBA copies), a 32-bit integer or float one 4/3: the pixel cap bounds memory whatever the mode."""
    width, height = image.size
    bands = len(image.getbands())
    band_bytes = 2 if image.mode.startswith("I;16") else 4 if image.mode in ("I", "F") else 1
    return width * height * max(3, bands * band_bytes) // 3


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode as RGB: transparency is composited on white, 16-bit and float values are rescaled.

    16-bit modes (I;16*, and I, which older Pillow used for 16-bit PNG) map 0..65535 to 0..255. Float images
    (F) are taken as 0..1 when no value exceeds 1, else as 0..255 like Pillow's own conversion.
    """
    mode = image.mode
    if mode == "RGB" and "transparency" not in image.info:
        return image
    if mode in _SIXTEEN_BIT_MODES:
        values = np.asarray(image).astype(np.float64)  # (H, W)
        gray = np.clip(values, 0, 65535) / 257.0
        return Image.fromarray(np.rint(gray).astype(np.uint8)).convert("RGB")
    if mode == "F":
        values = np.nan_to_num(np.asarray(image).astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)  # (H, W)
        if values.max(initial=0.0) <= 1.0:
            values = values * 255.0
        return Image.fromarray(np.rint(np.clip(values, 0, 255)).astype(np.uint8)).convert("RGB")
    if mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")  # 1, L, P, CMYK, YCbCr, RGBX, ...


# ---------------------------------------------------------------------------------------------- geometry


def resize_crop(
    image: Image.Image,
    size: int,
    rng: random.Random | None = None,
    min_scale: float = 1.0,
    max_shift: float = 0.0,
) -> Image.Image:
    """A `size` x `size` image: the shorter side resized to `size` and the centre cropped.

    With `rng`, a random square crop instead: its area is a fraction of the largest square, drawn uniformly
    in [min_scale, 1], at a uniform position (aspect ratio kept, so nothing is stretched), then the result is
    moved by up to `max_shift` * size pixels in x and y, filling with white. Without `rng`, `min_scale` and
    `max_shift` are ignored, so evaluation can pass the training settings unchanged.
    """
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"resize_crop: size must be a positive integer, got {size!r}")
    if not 0.0 < min_scale <= 1.0:
        raise ValueError(f"resize_crop: min_scale must be in (0, 1], got {min_scale!r}")
    if not 0.0 <= max_shift < 1.0:
        raise ValueError(f"resize_crop: max_shift must be in [0, 1), got {max_shift!r}")
    width, height = image.size
    side = min(width, height)
    if rng is None:
        crop_side, left, top = side, (width - side) / 2, (height - side) / 2
    else:
        crop_side = side * math.sqrt(rng.uniform(min_scale, 1.0))
        left = rng.uniform(0.0, width - crop_side)
        top = rng.uniform(0.0, height - crop_side)
    # Cropping through `box` resizes only the pixels kept, at sub-pixel precision.
    box = (left, top, left + crop_side, top + crop_side)
    result = image.resize((size, size), RESIZE_FILTER, box=box, reducing_gap=RESIZE_REDUCING_GAP)
    if rng is not None and max_shift > 0.0:
        reach = max_shift * size
        shift_x, shift_y = round(rng.uniform(-reach, reach)), round(rng.uniform(-reach, reach))
        if shift_x or shift_y:
            canvas = Image.new(result.mode, result.size, "white")
            canvas.paste(result, (shift_x, shift_y))  # whole-pixel move: no resampling, colours stay exact
            result = canvas
    return result


# ---------------------------------------------------------------------------------------------- tensors


def to_tensor(image: Image.Image) -> torch.Tensor:
    """An image as a float tensor (3, H, W) in [0, 1]; non-RGB modes go through `to_rgb` first."""
    pixels = np.array(to_rgb(image), dtype=np.uint8)  # (H, W, 3), a writable copy for torch.from_numpy
    return torch.from_numpy(pixels).permute(2, 0, 1).float().div_(255.0)  # (3, H, W)


def to_pil(tensor: torch.Tensor) -> Image.Image:
    """A tensor (3, H, W) with values in [0, 1] (clamped, rounded) as an RGB image."""
    if tensor.dim() != 3 or tensor.shape[0] != 3:
        raise ValueError(f"to_pil: expected a tensor of shape (3, H, W), got {tuple(tensor.shape)}")
    values = torch.nan_to_num(tensor.detach().to("cpu", torch.float32), nan=0.0)
    pixels = values.clamp(0.0, 1.0).mul(255.0).round().to(torch.uint8).permute(1, 2, 0)  # (H, W, 3)
    return Image.fromarray(pixels.contiguous().numpy())


def resize_images(images: torch.Tensor, size: int) -> torch.Tensor:
    """Images (B, 3, H, W) in [0, 1] resized to (B, 3, size, size) (bicubic, antialiased, clamped): how generated
    images meet a model with another input size. Images already that size come back as they are."""
    if tuple(images.shape[-2:]) == (size, size):
        return images
    resized = torch.nn.functional.interpolate(
        images, size=(size, size), mode="bicubic", align_corners=False, antialias=True
    )
    return resized.clamp(0, 1)


def make_grid(images: torch.Tensor, n_col: int | None = None, padding: int = 2, pad_value: float = 1.0) -> torch.Tensor:
    """Tiles images (B, 3, H, W) row by row into one image (3, H', W'), with `padding` pixels of `pad_value`
    around and between the tiles; `n_col` defaults to a square-ish grid (ceil(sqrt(B)) columns)."""
    if images.dim() != 4 or images.shape[1] != 3 or images.shape[0] < 1:
        raise ValueError(f"make_grid: expected images of shape (B, 3, H, W) with B >= 1, got {tuple(images.shape)}")
    B, C, H, W = images.shape
    n_col = math.ceil(math.sqrt(B)) if n_col is None else n_col
    if n_col < 1:
        raise ValueError(f"make_grid: n_col must be at least 1, got {n_col}")
    if padding < 0:
        raise ValueError(f"make_grid: padding must be >= 0, got {padding}")
    n_col = min(n_col, B)
    n_row = math.ceil(B / n_col)
    grid = images.new_full((C, n_row * (H + padding) + padding, n_col * (W + padding) + padding), pad_value)
    for index in range(B):
        row, col = divmod(index, n_col)
        top, left = padding + row * (H + padding), padding + col * (W + padding)
        grid[:, top : top + H, left : left + W] = images[index]
    return grid


def colour_ramp(values: torch.Tensor, stops: torch.Tensor) -> torch.Tensor:
    """Values (...) in [0, 1] -> RGB (..., 3): linear interpolation between colour stops (S, 3), the first at 0
    and the last at 1 (a heat map's colours)."""
    position = values.clamp(0, 1) * (len(stops) - 1)
    lower = position.floor().long().clamp(max=len(stops) - 2)
    fraction = (position - lower).unsqueeze(-1)  # (..., 1)
    stops = stops.to(values.device)
    return stops[lower] * (1 - fraction) + stops[lower + 1] * fraction


def save_image(images: torch.Tensor, path: str | Path, n_col: int | None = None) -> Path:
    """Writes one image (3, H, W) or a grid of a batch (B, 3, H, W) to `path` (format from its extension),
    atomically: a temporary file in the same directory is renamed into place, so readers never see half a file."""
    path = Path(path)
    image_format = Image.registered_extensions().get(path.suffix.lower())
    if image_format is None:
        raise ValueError(f"save_image: cannot tell the image format of {path}; use a .png, .jpg or .webp name")
    if images.dim() == 4:
        images = make_grid(images, n_col=n_col)
    image = to_pil(images)
    return atomic_write(path, lambda temporary: image.save(temporary, format=image_format))


def load_image(
    source: str | Path | bytes | Image.Image | torch.Tensor,
    size: int,
    name: str | None = None,
    max_pixels: int = MAX_IMAGE_PIXELS,
) -> torch.Tensor:
    """A model's input (3, size, size) in [0, 1] from an image file, encoded bytes, a PIL image or a (3, H, W) tensor
    in [0, 1]: decoded to RGB (see `decode_image`), shorter side resized, centre cropped. The one path from a
    user's image to a model, so CLIP, the dVAE, the index and the server see the same pixels."""
    if isinstance(source, torch.Tensor):
        if source.dim() != 3 or source.shape[0] != 3:
            raise ValueError(f"{name or 'image'}: expected a (3, H, W) tensor, got {tuple(source.shape)}")
        if tuple(source.shape[1:]) == (size, size):
            return source.float()
        source = to_pil(source)
    elif isinstance(source, (str, Path, bytes, bytearray)):
        source = decode_image(bytes(source) if isinstance(source, bytearray) else source, name, max_pixels)
    elif not isinstance(source, Image.Image):
        raise ValueError(
            f"{name or 'image'}: expected a path, encoded bytes, a PIL image or a tensor, got {type(source).__name__}"
        )
    return to_tensor(resize_crop(to_rgb(source), size))


def _one_line(error: object) -> str:
    return " ".join(str(error).split())
