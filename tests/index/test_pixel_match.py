"""Pixel checks for near-duplicates: copies of a picture pass, other pictures of one subject or colour do not."""

import io

import numpy as np
import pytest
import torch
from helpers import draw_shape
from PIL import Image, ImageDraw

from clipdalle.index import pixel_match

pytest.importorskip("faiss")


def icon(shape: str, colour: str = "red", badge: bool = False) -> Image.Image:
    """A 32 px shape, with a small square badge in its lower right corner if asked (a family's variant)."""
    image = draw_shape(shape, colour, 32)
    if badge:
        ImageDraw.Draw(image).rectangle((23, 23, 28, 28), fill=(33, 33, 33))
    return image


def copies(image: Image.Image) -> dict[str, Image.Image]:
    """The edits the calibration makes: resized to 24 px, JPEG at quality 20, the centre 90 % crop, mirrored."""
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=20)
    return {
        "resized": image.resize((24, 24), Image.Resampling.LANCZOS),
        "jpeg": Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"),
        "crop90": image.crop((1, 1, 30, 30)),
        "mirrored": image.transpose(Image.Transpose.FLIP_LEFT_RIGHT),
    }


def distance(first: Image.Image, second: Image.Image) -> float:
    thumbs = pixel_match.thumbnails([first, second])
    return float(pixel_match.pixel_distances(thumbs, np.array([[0, 1]]))[0])


@pytest.mark.parametrize("shape", ["triangle", "cross"])
def test_copies_are_within_the_threshold_and_variants_are_not(shape):
    original = icon(shape)
    assert distance(original, original) == 0.0
    for kind, copy in copies(original).items():
        assert distance(original, copy) <= pixel_match.PIXEL_THRESHOLD, kind
        assert distance(copy, original) <= pixel_match.PIXEL_THRESHOLD, kind
    assert distance(original, icon(shape, badge=True)) > pixel_match.PIXEL_THRESHOLD  # one family, another icon
    assert distance(original, icon(shape, colour="blue")) > pixel_match.PIXEL_THRESHOLD  # the icon in another colour
    other = "circle" if shape != "circle" else "square"
    assert distance(original, icon(other)) > pixel_match.PIXEL_THRESHOLD


def test_a_mirrored_copy_is_among_the_candidates_of_its_original():
    rng = np.random.default_rng(0)
    images = []
    for _ in range(40):  # distinct pictures: random rectangles of random colours
        image = Image.new("RGB", (32, 32), "white")
        draw = ImageDraw.Draw(image)
        for _rectangle in range(3):
            left, top = rng.integers(0, 24, size=2)
            colour = tuple(int(value) for value in rng.integers(0, 256, size=3))
            draw.rectangle((int(left), int(top), int(left) + 8, int(top) + 8), fill=colour)
        images.append(image)
    images.append(images[7].transpose(Image.Transpose.FLIP_LEFT_RIGHT))  # row 40: a mirrored copy of row 7
    images.append(images[12].resize((24, 24), Image.Resampling.LANCZOS))  # row 41: a resized copy of row 12
    pairs = pixel_match.candidate_pairs(pixel_match.thumbnails(images))
    assert pairs.shape[1] == 2 and (pairs[:, 0] < pairs[:, 1]).all() and len(np.unique(pairs, axis=0)) == len(pairs)
    found = {tuple(pair) for pair in pairs.tolist()}
    assert (7, 40) in found and (12, 41) in found
    assert len(found) < len(images) * (len(images) - 1) // 2  # neighbours, not all pairs
    distances = pixel_match.pixel_distances(pixel_match.thumbnails(images), pairs)
    accepted = {tuple(pair) for pair, value in zip(pairs.tolist(), distances) if value <= pixel_match.PIXEL_THRESHOLD}
    assert accepted == {(7, 40), (12, 41)}


def test_thumbnails_take_any_mode_and_size():
    images = [Image.new("L", (50, 20), 128), Image.new("RGBA", (8, 8), (255, 0, 0, 0)), icon("circle")]
    thumbs = pixel_match.thumbnails(images)
    assert thumbs.shape == (3, 3, pixel_match.THUMB_SIZE, pixel_match.THUMB_SIZE) and thumbs.dtype == torch.uint8
    assert int(thumbs[1].min()) == 255  # transparency composited on white
    assert pixel_match.candidate_pairs(thumbs[:1]).shape == (0, 2)
    assert pixel_match.pixel_distances(thumbs, np.zeros((0, 2), dtype=np.int64)).shape == (0,)


def test_flat_regions_tell_a_recolour_from_a_copy():
    red = draw_shape("square", "red", 32)
    pink = Image.new("RGB", (32, 32), "white")
    ImageDraw.Draw(pink).rectangle((6, 6, 25, 25), fill=(216, 27, 96))  # the square in the palette's pink
    images = [red, pink, *copies(red).values()]
    pairs = np.array([[0, row] for row in range(1, len(images))])
    thumbs = pixel_match.thumbnails(images)
    assert pixel_match.pixel_distances(thumbs, pairs)[0] <= pixel_match.PIXEL_THRESHOLD  # too close for step 2
    accepted, _ = pixel_match.matches(thumbs, pairs)
    assert accepted.tolist() == [False, True, True, True, True]  # the recolour is refused, every copy kept
    thin = [icon("cross"), icon("cross", colour="blue")]  # strokes of 9 px: flat ink in both, colours apart
    assert np.isfinite(pixel_match.colour_differences(pixel_match.thumbnails(thin), np.array([[0, 1]]))).all()


def ring(colour: tuple[int, int, int], size: int = 32) -> Image.Image:
    """A thin ring (2 px strokes): no flat ink for step 3, so only the ink direction or re-encoding tell colours."""
    image = Image.new("RGB", (size, size), "white")
    ImageDraw.Draw(image).ellipse((5, 5, size - 6, size - 6), outline=colour, width=2)
    return image


RED, PINK = (229, 57, 53), (216, 27, 96)  # the icon palette's nearest two colours


def test_the_ink_direction_keeps_lossless_copies_and_refuses_a_recolour():
    red = ring(RED)
    images = [red, ring(PINK), *(copy for kind, copy in copies(red).items() if kind != "jpeg")]
    thumbs = pixel_match.thumbnails(images)
    pairs = np.array([[0, row] for row in range(1, len(images))])
    angles = pixel_match.ink_angles(thumbs, pairs)
    assert angles[0] > pixel_match.INK_ANGLE_THRESHOLD and (angles[1:] <= pixel_match.INK_ANGLE_THRESHOLD).all()
    assert pixel_match.pixel_distances(thumbs, pairs)[0] <= pixel_match.PIXEL_THRESHOLD  # steps 2, 3 let it pass
    lossless = np.ones(len(images), dtype=bool)
    assert pixel_match.matches(thumbs, pairs)[0].tolist() == [True, True, True, True]  # formats unknown: no step 4
    assert pixel_match.matches(thumbs, pairs, lossless=lossless)[0].tolist() == [False, True, True, True]
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))  # no plain border
    blank = Image.new("RGB", (32, 32), "white")  # no ink
    thumbs = pixel_match.thumbnails([red, photo, blank])
    assert np.isnan(pixel_match.ink_angles(thumbs, np.array([[0, 1], [0, 2]]))).all()


def saved_jpeg(image: Image.Image, quality: int = 20) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return Image.open(io.BytesIO(buffer.getvalue()))


def test_a_jpeg_is_its_original_saved_alike_and_not_a_recolour():
    red, pink = ring(RED), ring(PINK)
    copy = saved_jpeg(red)
    settings = pixel_match.jpeg_settings(copy)
    assert settings is not None and settings["mode"] == "RGB"
    assert pixel_match.reencoding_distance(red, copy, settings) == 0.0
    mirrored = red.transpose(Image.Transpose.FLIP_LEFT_RIGHT)  # the JPEG of a mirrored copy's original
    assert pixel_match.reencoding_distance(mirrored, copy, settings) <= pixel_match.REENCODE_THRESHOLD
    assert pixel_match.reencoding_distance(pink, copy, settings) > pixel_match.REENCODE_THRESHOLD
    thumbs = pixel_match.thumbnails([pink, copy])  # what steps 2 and 3 see: not enough to refuse it
    assert pixel_match.matches(thumbs, np.array([[0, 1]]))[0].tolist() == [True]
    grey = saved_jpeg(red.convert("L"))
    assert pixel_match.reencoding_distance(red, grey, pixel_match.jpeg_settings(grey)) == 0.0
    assert pixel_match.jpeg_settings(red) is None  # not a JPEG
    exif = Image.Exif()
    exif[pixel_match.EXIF_ORIENTATION] = 6  # shown turned a quarter
    buffer = io.BytesIO()
    red.save(buffer, format="JPEG", quality=20, exif=exif)
    assert pixel_match.jpeg_settings(Image.open(buffer)) is None
    with pytest.raises(ValueError, match="sizes differ"):
        pixel_match.reencoding_distance(red.resize((24, 24)), copy, settings)
