import io
import os
import random
import struct
import warnings
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from clipdalle import transforms
from clipdalle.transforms import (
    MAX_IMAGE_PIXELS,
    BadImage,
    decode_image,
    decoded_cost,
    load_image,
    make_grid,
    resize_crop,
    save_image,
    to_pil,
    to_rgb,
    to_tensor,
)

RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)


def encode(image: Image.Image, image_format: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=image_format, **options)
    return buffer.getvalue()


def close_to(pixel, expected, tolerance=0):
    return all(abs(int(a) - int(b)) <= tolerance for a, b in zip(pixel, expected))


def png_header_only(width: int, height: int, colour_type: int = 2) -> bytes:
    """A PNG that claims `width` x `height` pixels but holds no pixel data: a decompression bomb in 60 bytes.
    Colour type 2 is RGB, 6 RGBA."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


# ---------------------------------------------------------------------------------------------- odd image kinds


def test_rgba_is_composited_on_white_using_alpha():
    image = Image.new("RGBA", (4, 2), (255, 0, 0, 0))  # fully transparent red
    image.putpixel((1, 0), (0, 0, 255, 255))  # opaque blue
    image.putpixel((2, 0), (255, 0, 0, 128))  # half-transparent red
    decoded = decode_image(encode(image, "PNG"))
    assert decoded.mode == "RGB" and decoded.size == (4, 2)
    assert decoded.getpixel((0, 0)) == WHITE
    assert decoded.getpixel((1, 0)) == BLUE
    assert close_to(decoded.getpixel((2, 0)), (255, 127, 127), tolerance=1)


def test_grayscale_with_alpha_and_plain_grayscale_and_one_bit():
    gray_alpha = Image.new("LA", (2, 1), (0, 0))
    gray_alpha.putpixel((1, 0), (60, 255))
    decoded = decode_image(encode(gray_alpha, "PNG"))
    assert decoded.getpixel((0, 0)) == WHITE and decoded.getpixel((1, 0)) == (60, 60, 60)
    assert decode_image(encode(Image.new("L", (3, 3), 77), "PNG")).getpixel((1, 1)) == (77, 77, 77)
    one_bit = Image.new("1", (2, 1), 0)
    one_bit.putpixel((1, 0), 1)
    decoded = decode_image(encode(one_bit, "PNG"))
    assert decoded.getpixel((0, 0)) == (0, 0, 0) and decoded.getpixel((1, 0)) == WHITE


def test_palette_with_transparency_becomes_white_where_transparent():
    image = Image.new("P", (2, 2), 0)
    image.putpalette([255, 0, 0, 0, 255, 0] + [0, 0, 0] * 254)  # index 0 red, index 1 green
    image.putpixel((1, 1), 1)
    for image_format in ("PNG", "GIF"):
        decoded = decode_image(encode(image, image_format, transparency=0))
        assert decoded.mode == "RGB"
        assert decoded.getpixel((0, 0)) == WHITE, image_format
        assert decoded.getpixel((1, 1)) == GREEN, image_format
    assert decode_image(encode(image, "PNG")).getpixel((0, 0)) == RED  # no transparency: palette colour


def test_sixteen_bit_png_is_scaled_not_clipped():
    values = np.array([[0, 65535, 32896, 257 * 10]], dtype=np.uint16)
    image = Image.fromarray(values)
    decoded = decode_image(encode(image, "PNG"))
    assert [decoded.getpixel((x, 0)) for x in range(4)] == [(0, 0, 0), WHITE, (128, 128, 128), (10, 10, 10)]


def test_thirty_two_bit_integer_and_float_modes():
    integer = Image.fromarray(np.array([[0, 65535, 100000]], dtype=np.int32))
    assert integer.mode == "I"
    assert [to_rgb(integer).getpixel((x, 0)) for x in range(3)] == [(0, 0, 0), WHITE, WHITE]
    unit_floats = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))
    assert unit_floats.mode == "F"
    assert [to_rgb(unit_floats).getpixel((x, 0)) for x in range(3)] == [(0, 0, 0), (128, 128, 128), WHITE]
    byte_floats = Image.fromarray(np.array([[3.0, 200.0, 400.0]], dtype=np.float32))
    assert [to_rgb(byte_floats).getpixel((x, 0)) for x in range(3)] == [(3, 3, 3), (200, 200, 200), WHITE]
    tiff = decode_image(encode(unit_floats, "TIFF"))
    assert tiff.getpixel((1, 0)) == (128, 128, 128)


def test_cmyk_jpeg_keeps_its_colours():
    colour = (200, 30, 40)
    cmyk = Image.new("RGB", (16, 16), colour).convert("CMYK")
    decoded = decode_image(encode(cmyk, "JPEG", quality=95))
    assert decoded.mode == "RGB"
    assert close_to(decoded.getpixel((8, 8)), colour, tolerance=12)


def test_exif_rotated_jpeg_comes_out_rotated():
    image = Image.new("RGB", (40, 20), RED)
    image.paste(BLUE, (20, 0, 40, 20))  # left half red, right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation 6: the viewer must rotate 90 degrees clockwise
    decoded = decode_image(encode(image, "JPEG", quality=95, exif=exif.tobytes()))
    assert decoded.size == (20, 40)
    # Rotating clockwise puts the left half (red) on top and the right half (blue) below.
    assert close_to(decoded.getpixel((10, 5)), RED, tolerance=30)
    assert close_to(decoded.getpixel((10, 35)), BLUE, tolerance=30)


def test_animated_gif_gives_its_first_frame():
    frames = [Image.new("RGB", (8, 8), RED), Image.new("RGB", (8, 8), BLUE)]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    assert Image.open(io.BytesIO(data)).n_frames == 2
    assert close_to(decode_image(data).getpixel((4, 4)), RED, tolerance=2)


def test_decodes_from_a_path_and_from_bytes(tmp_path):
    path = tmp_path / "green.webp"
    Image.new("RGB", (8, 6), GREEN).save(path, lossless=True)
    for source in (path, str(path), path.read_bytes()):
        decoded = decode_image(source)
        assert decoded.size == (8, 6) and decoded.getpixel((3, 3)) == GREEN


# ---------------------------------------------------------------------------------------------- bad images


def assert_bad(source, expected_name: str, why: str | None = None, name: str | None = None) -> str:
    with pytest.raises(BadImage) as raised:
        decode_image(source, name=name)
    message = str(raised.value)
    assert expected_name in message and "\n" not in message
    if why:
        assert why in message
    assert isinstance(raised.value, ValueError)  # callers that catch ValueError also catch it
    return message


def test_truncated_png_and_jpeg_raise_instead_of_decoding_half(tmp_path):
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    for image_format, suffix in (("PNG", "png"), ("JPEG", "jpg")):
        data = encode(noise, image_format)
        path = tmp_path / f"cat.{suffix}"
        path.write_bytes(data[: len(data) // 2])
        assert_bad(path, str(path))


def test_garbage_bytes_and_missing_files(tmp_path):
    assert_bad(b"this is not an image at all", "shard-000.tar:k1.jpg", why="not an image", name="shard-000.tar:k1.jpg")
    assert_bad(b"", "image bytes")
    missing = tmp_path / "missing.png"
    assert_bad(missing, str(missing), why="cannot read")


def test_decompression_bombs_are_refused_without_touching_pillow_settings(tmp_path):
    pillow_limit = Image.MAX_IMAGE_PIXELS
    filters_before = list(warnings.filters)
    # Ours (64 M) < Pillow's warning (89 M) < Pillow's error (179 M): all three end as BadImage.
    for side in (8100, 10_000, 30_000):
        assert side * side > MAX_IMAGE_PIXELS
        path = tmp_path / f"bomb_{side}.png"
        path.write_bytes(png_header_only(side, side))
        assert_bad(path, str(path), why="pixel limit" if side == 8100 else "too large")
    assert Image.MAX_IMAGE_PIXELS == pillow_limit
    assert list(warnings.filters) == filters_before
    from PIL import ImageFile

    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_the_pixel_cap_counts_what_decoding_costs(tmp_path):
    # 4000 x 3999 is below a 16 M pixel cap as RGB, above it as RGBA (composited on white through RGBA copies)
    rgb, rgba = png_header_only(4000, 3999, colour_type=2), png_header_only(4000, 3999, colour_type=6)
    with pytest.raises(BadImage) as raised:
        decode_image(rgb, "rgb.png", max_pixels=16_000_000)
    assert "pixel limit" not in str(raised.value)  # it fails later, for its missing pixel data
    with pytest.raises(BadImage, match="4000 x 3999 RGBA costs 21328000 RGB pixels to decode, above the pixel limit"):
        decode_image(rgba, "rgba.png", max_pixels=16_000_000)
    assert decoded_cost(Image.new("RGB", (10, 10))) == decoded_cost(Image.new("L", (10, 10))) == 100
    assert decoded_cost(Image.new("RGBA", (10, 10))) == decoded_cost(Image.new("F", (10, 10))) == 133


def test_special_and_oversized_files_are_refused_before_reading(tmp_path, monkeypatch):
    fifo = tmp_path / "fifo.png"
    os.mkfifo(fifo)  # opening it for reading would wait for a writer forever
    (tmp_path / "zero.png").symlink_to("/dev/zero")  # reading it would never end
    (tmp_path / "folder.png").mkdir()
    for name in ("fifo.png", "zero.png", "folder.png"):
        assert_bad(tmp_path / name, name, why="not a regular image file")
    big = tmp_path / "big.png"
    big.write_bytes(encode(Image.new("RGB", (8, 8)), "PNG"))
    monkeypatch.setattr(transforms, "MAX_IMAGE_BYTES", big.stat().st_size - 1)
    assert_bad(big, "big.png", why="above the limit")


# ---------------------------------------------------------------------------------------------- resize_crop


def stripes(width: int, height: int) -> Image.Image:
    """Left third red, middle third green, right third blue."""
    image = Image.new("RGB", (width, height), GREEN)
    image.paste(RED, (0, 0, width // 3, height))
    image.paste(BLUE, (width - width // 3, 0, width, height))
    return image


def test_resize_crop_sizes_and_centre_crop():
    for width, height in ((90, 30), (30, 90), (7, 5), (1000, 600), (32, 32)):
        assert resize_crop(stripes(width, height), 16).size == (16, 16)
    # A wide image keeps its centre: the middle third (green) fills the square.
    centre = resize_crop(stripes(500, 100), 20)
    assert all(centre.getpixel((x, y)) == GREEN for x in range(20) for y in range(20))
    with_rng = resize_crop(stripes(90, 30), 16, rng=None, min_scale=0.2, max_shift=0.3)
    assert with_rng.tobytes() == resize_crop(stripes(90, 30), 16).tobytes()  # no rng: settings ignored


def test_random_crops_keep_colours_and_vary_with_the_seed():
    solid = Image.new("RGB", (80, 50), (37, 180, 90))
    for seed in range(20):
        crop = resize_crop(solid, 16, rng=random.Random(seed), min_scale=0.2, max_shift=0.25)
        colours = set(map(tuple, np.asarray(crop).reshape(-1, 3).tolist()))  # (H*W, 3) -> distinct colours
        assert crop.size == (16, 16)
        assert colours <= {(37, 180, 90), WHITE}  # only the image colour and the white fill, never a tint
        unshifted = resize_crop(solid, 16, rng=random.Random(seed), min_scale=0.2)
        pixels = np.asarray(unshifted).reshape(-1, 3).tolist()  # (H*W, 3)
        assert set(map(tuple, pixels)) == {(37, 180, 90)}
    image = stripes(120, 60)
    crops = {resize_crop(image, 16, rng=random.Random(seed), min_scale=0.3).tobytes() for seed in range(8)}
    assert len(crops) > 1
    first = resize_crop(image, 16, rng=random.Random(5), min_scale=0.3, max_shift=0.1)
    again = resize_crop(image, 16, rng=random.Random(5), min_scale=0.3, max_shift=0.1)
    assert first.tobytes() == again.tobytes()


def test_resize_crop_rejects_bad_settings():
    image = Image.new("RGB", (8, 8))
    for kwargs, word in (
        ({"size": 0}, "size"),
        ({"size": 8, "min_scale": 0.0}, "min_scale"),
        ({"size": 8, "min_scale": 1.5}, "min_scale"),
        ({"size": 8, "max_shift": 1.0}, "max_shift"),
    ):
        with pytest.raises(ValueError, match=word):
            resize_crop(image, **kwargs)


# ---------------------------------------------------------------------------------------------- tensors and grids


def test_to_tensor_and_to_pil_round_trip():
    pixels = np.random.default_rng(1).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    tensor = to_tensor(image)
    assert tensor.shape == (3, 5, 7) and tensor.dtype == torch.float32
    assert 0.0 <= tensor.min() and tensor.max() <= 1.0
    assert torch.equal(tensor[:, 2, 4], torch.tensor(pixels[2, 4], dtype=torch.float32) / 255)
    assert np.array_equal(np.asarray(to_pil(tensor)), pixels)
    clamped = to_pil(torch.tensor([[[-1.0, 2.0]], [[0.5, float("nan")]], [[0.999, 0.001]]]))
    assert clamped.getpixel((0, 0)) == (0, 128, 255) and clamped.getpixel((1, 0)) == (255, 0, 0)
    assert to_tensor(Image.new("RGBA", (2, 2), (0, 0, 0, 0))).min() == 1.0  # transparent -> white, as decode
    with pytest.raises(ValueError, match=r"\(3, H, W\)"):
        to_pil(torch.zeros(1, 3, 4, 4))


def test_make_grid_shape_padding_and_placement():
    images = torch.rand(5, 3, 4, 6)
    grid = make_grid(images, n_col=2, padding=2, pad_value=0.25)
    assert grid.shape == (3, 3 * 4 + 4 * 2, 2 * 6 + 3 * 2)
    assert torch.equal(grid[:, 2:6, 2:8], images[0])
    assert torch.equal(grid[:, 2:6, 10:16], images[1])
    assert torch.equal(grid[:, 14:18, 2:8], images[4])
    assert torch.all(grid[:, 0:2] == 0.25) and torch.all(grid[:, 14:18, 10:16] == 0.25)  # empty last tile
    assert make_grid(torch.rand(9, 3, 4, 4), padding=0).shape == (3, 12, 12)  # default: square-ish
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        make_grid(torch.rand(3, 4, 4))


def test_save_image_is_atomic_and_readable(tmp_path):
    single = torch.rand(3, 5, 7)
    path = save_image(single, tmp_path / "out" / "one.png")
    assert np.array_equal(np.asarray(Image.open(path)), np.asarray(to_pil(single)))
    batch = save_image(torch.rand(4, 3, 8, 8), tmp_path / "out" / "grid.png", n_col=4)
    assert Image.open(batch).size == (4 * 8 + 5 * 2, 8 + 2 * 2)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["grid.png", "one.png"]  # no temporaries left
    with pytest.raises(ValueError, match="format"):
        save_image(single, tmp_path / "out" / "one.unknown")


def test_load_image_gives_a_square_tensor(tmp_path):
    path = tmp_path / "wide.png"
    stripes(90, 30).save(path)
    tensor = load_image(path, 12)
    assert tensor.shape == (3, 12, 12)
    assert torch.allclose(tensor[:, 6, 6], torch.tensor([0.0, 1.0, 0.0]))
