import hashlib
import importlib.machinery
import io
import json
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from clipdalle.data import icons
from clipdalle.data.icons import (
    PALETTE,
    build_icons,
    captions_for,
    colour_captions,
    colourise,
    core_ink_colour,
    dominant_colour,
    family_of,
    foreground_mask,
    icon_names,
    is_complete,
    mask_iou,
    palette_rgb,
    render_masks,
    split_of,
)

SOME_ICONS = ["account", "home-outline", "alpha-a", "dots-vertical", "circle", "circle-small"]


@pytest.fixture(scope="module")
def masks():
    return render_masks(SOME_ICONS, 32)


def _to_images(pixels):
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [0, 1]."""
    return torch.from_numpy(np.array(pixels)).permute(0, 3, 1, 2).float() / 255.0


def test_icon_names_are_the_whole_font_sorted():
    names = icon_names()
    assert len(names) == 7367
    assert names == sorted(names)
    assert "account-circle-outline" in names and all("." not in name for name in names)


def test_missing_font_names_the_install_command(monkeypatch, tmp_path):
    monkeypatch.setattr(icons.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match=r"pip install qtawesome==1\.4\.2"):
        icons.font_folder()
    spec = importlib.machinery.ModuleSpec("qtawesome", None, is_package=True)
    spec.submodule_search_locations = [str(tmp_path)]
    monkeypatch.setattr(icons.importlib.util, "find_spec", lambda name: spec)
    with pytest.raises(ValueError, match=r"materialdesignicons6-webfont-6\.9\.96\.ttf not found.*qtawesome==1\.4\.2"):
        icons.font_folder()


def test_render_masks_are_centred_non_empty_antialiased(masks):
    assert masks.shape == (len(SOME_ICONS), 32, 32) and masks.dtype == np.uint8
    for name, mask in zip(SOME_ICONS, masks):
        ys, xs = np.nonzero(mask >= 128)
        assert len(xs) > 10, name
        assert abs((xs.min() + xs.max()) / 2 - 15.5) <= 1.0 and abs((ys.min() + ys.max()) / 2 - 15.5) <= 1.0, name
        # a margin of background all round: nothing touches the canvas border
        assert mask[0].max() == mask[-1].max() == mask[:, 0].max() == mask[:, -1].max() == 0, name
        assert mask.max() == 255 and ((mask > 0) & (mask < 255)).any(), name  # solid ink and smooth edges
    extent = {name: int((mask >= 128).any(0).sum()) for name, mask in zip(SOME_ICONS, masks)}
    assert 24 <= extent["circle"] <= 29  # the big circle fills ~80-90 % of the canvas
    assert extent["circle-small"] < extent["circle"] * 0.7  # one scale for all: relative sizes are kept


def test_render_rejects_unknown_names_and_tiny_sizes():
    with pytest.raises(ValueError, match="unknown icon names"):
        render_masks(["account", "no-such-icon"], 32)
    with pytest.raises(ValueError, match="at least 8"):
        render_masks(["account"], 4)


def test_colourise_gives_exact_colours_on_white():
    masks = np.array([[[0, 255, 128]], [[255, 0, 0]]], dtype=np.uint8)  # (2, 1, 3)
    pixels = colourise(masks, "#E53935")
    assert pixels.shape == (2, 1, 3, 3) and pixels.dtype == np.uint8
    assert pixels[0, 0, 0].tolist() == [255, 255, 255]
    assert pixels[0, 0, 1].tolist() == [0xE5, 0x39, 0x35]
    assert pixels[0, 0, 2].tolist() == [242, 156, 154]  # half coverage: halfway to white, rounded
    per_mask = colourise(masks, palette_rgb(2))  # one colour per mask
    assert per_mask[1, 0, 0].tolist() == [0xFB, 0x8C, 0x00] and per_mask[0, 0, 1].tolist() == [0xE5, 0x39, 0x35]
    with pytest.raises(ValueError, match="2 masks"):
        colourise(masks, palette_rgb(3))


def test_palette_order_and_prefixes():
    assert list(PALETTE) == ["red", "orange", "yellow", "green", "blue", "purple", "pink", "black"]
    assert palette_rgb(3).tolist() == [[0xE5, 0x39, 0x35], [0xFB, 0x8C, 0x00], [0xFD, 0xD8, 0x35]]
    with pytest.raises(ValueError, match="between 1 and 8"):
        palette_rgb(9)


def test_captions():
    captions = captions_for("account-circle-outline", "red")
    assert captions[0] == "a red icon of an account circle outline"
    assert "account circle outline icon in red" in captions
    assert "red account circle outline" in captions
    assert "an icon of a red account circle outline" in captions
    assert len(set(captions)) == len(captions) >= 4
    assert captions_for("umbrella", "orange")[0] == "an orange icon of an umbrella"
    assert captions_for("unicorn", "orange")[0] == "an orange icon of a unicorn"
    assert captions_for("hdmi-port", "blue")[0] == "a blue icon of an hdmi port"
    assert all("-" not in caption for caption in captions_for("arrow-left-bold", "black"))


def test_families_and_split_over_all_names():
    names = icon_names()
    assert family_of("account-circle-outline") == "account" == family_of("account-off")
    assert family_of("circle-outline") == "circle"  # the first word is the icon, never a modifier
    assert family_of("arrow-left-bold") == "arrow-left-bold"
    splits = {}
    for name in names:
        split = split_of(name)
        # the documented rule, with sha1 (Python's hash() would change from run to run)
        digest = hashlib.sha1(family_of(name).encode()).hexdigest()
        assert split == ("val" if int(digest[:8], 16) % 100 < 5 else "train")
        splits.setdefault(family_of(name), set()).add(split)
    assert all(len(seen) == 1 for seen in splits.values())  # no family straddles the splits
    val_fraction = sum(split_of(name) == "val" for name in names) / len(names)
    assert 0.03 < val_fraction < 0.08


def _subset():
    names = icon_names()
    train = [name for name in names[:200] if split_of(name) == "train"][:3]
    val = [name for name in names if split_of(name) == "val"][:2]
    return train, val


def _read_shards(paths):
    samples = {}
    for path in paths:
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                key, extension = member.name.split(".", 1)
                samples.setdefault(key, {})[extension] = tar.extractfile(member).read()
    return samples


def test_build_icons_writes_readable_shards_and_metadata(tmp_path):
    train, val = _subset()
    out = tmp_path / "icons"
    info = build_icons(out, size=16, colours=3, shard_size=4, progress=False, names=train + val)
    assert info["counts"] == {"icons": 5, "train_icons": 3, "val_icons": 2, "train_images": 9, "val_images": 6}
    assert info["colours"] == ["red", "orange", "yellow"] and info["font"]["version"] == "6.9.96"
    assert is_complete(out) and is_complete(out, size=16, colours=3) and not is_complete(out, size=32)
    assert json.loads((out / "info.json").read_text()) == info

    train_paths = sorted((out / "train").glob("*.tar"))
    val_paths = sorted((out / "val").glob("*.tar"))
    assert len(train_paths) == 3 and len(val_paths) == 2  # 9 and 6 samples, 4 per shard
    for paths, split_names in ((train_paths, train), (val_paths, val)):
        samples = _read_shards(paths)
        assert sorted(samples) == sorted(f"{name}__{colour}" for name in split_names for colour in info["colours"])
        for key, members in samples.items():
            assert set(members) == {"png", "txt", "json"}
            record = json.loads(members["json"])
            assert key == f"{record['icon']}__{record['colour']}"
            assert members["txt"].decode().split("\n") == captions_for(record["icon"], record["colour"])
            pixels = np.asarray(Image.open(io.BytesIO(members["png"])))
            assert pixels.shape == (16, 16, 3) and pixels[0, 0].tolist() == [255, 255, 255]
            darkest = pixels.reshape(-1, 3)[(255 - pixels.reshape(-1, 3).astype(int)).sum(1).argmax()]
            ink = palette_rgb()[list(PALETTE).index(record["colour"])]
            assert tuple(darkest) == tuple(ink)  # fully covered pixels are the ink

    lines = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert len(lines) == 15 and len({line["key"] for line in lines}) == 15
    assert {line["split"] for line in lines if line["icon"] in val} == {"val"}
    assert all(line["captions"] == captions_for(line["icon"], line["colour"]) for line in lines)
    split_file = json.loads((out / "split.json").read_text())
    assert split_file["train"] == sorted(train) and split_file["val"] == sorted(val) and "sha1" in split_file["rule"]


def test_colour_captions_name_the_colour_alone_and_a_build_records_its_caption_kind(tmp_path):
    assert colour_captions("orange") == ["an orange icon", "orange icon", "an icon in orange"]
    assert colour_captions("pink")[0] == "a pink icon"
    train, val = _subset()
    out = tmp_path / "colour"
    info = build_icons(out, size=16, colours=2, progress=False, names=train, captions="colour")
    assert info["captions"] == "colour" and info["counts"]["train_images"] == 6 and info["counts"]["val_images"] == 0
    samples = _read_shards(sorted((out / "train").glob("*.tar")))
    assert {members["txt"].decode() for members in samples.values()} == {
        "\n".join(colour_captions(colour)) for colour in info["colours"]
    }
    assert is_complete(out, captions="colour") and not is_complete(out, captions="full")
    full = build_icons(tmp_path / "full", size=16, colours=2, progress=False, names=train)
    assert full["captions"] == "full" and is_complete(tmp_path / "full", captions="full")
    with pytest.raises(ValueError, match="captions must be one of full, colour, got 'shape'"):
        build_icons(tmp_path / "bad", size=16, colours=2, progress=False, names=train, captions="shape")


def test_build_is_reproducible_and_a_damaged_build_is_detected_and_redone(tmp_path):
    train, val = _subset()
    first = build_icons(tmp_path / "a", size=16, colours=2, shard_size=3, progress=False, names=train + val)
    build_icons(tmp_path / "b", size=16, colours=2, shard_size=3, progress=False, names=train + val)
    for entry in first["shards"]["train"] + first["shards"]["val"]:
        assert (tmp_path / "a" / entry["file"]).read_bytes() == (tmp_path / "b" / entry["file"]).read_bytes()

    out = tmp_path / "a"
    shard = out / first["shards"]["train"][0]["file"]
    shard.write_bytes(shard.read_bytes()[:1000])  # a shard cut short
    assert not is_complete(out)
    (out / "info.json").unlink()  # a build killed before its last step
    assert not is_complete(out)
    rebuilt = build_icons(out, size=16, colours=2, shard_size=100, progress=False, names=train + val)
    assert is_complete(out)
    assert [path.name for path in (out / "train").iterdir()] == ["icons-00000.tar"]  # stale shards removed
    assert rebuilt["shards"]["train"] == [
        {"file": "train/icons-00000.tar", "bytes": rebuilt["shards"]["train"][0]["bytes"], "samples": 6}
    ]


def test_dominant_colour_names_every_palette_colour(masks):
    filled = masks[[SOME_ICONS.index("account"), SOME_ICONS.index("home-outline")]]  # icons with solid strokes
    for index, rgb in enumerate(palette_rgb()):
        images = _to_images(colourise(filled, rgb))
        assert dominant_colour(images).tolist() == [index, index], list(PALETTE)[index]
        solid = torch.ones(1, 3, 8, 8) * torch.tensor(rgb / 255.0, dtype=torch.float32)[None, :, None, None]
        assert dominant_colour(solid).tolist() == [index]
    white = torch.ones(2, 3, 8, 8)
    assert dominant_colour(white).tolist() == [-1, -1]
    assert dominant_colour(white).dtype == torch.long


def test_core_ink_colour_reads_a_thin_stroke_by_its_ink_not_its_anti_aliased_edge():
    orange = torch.tensor([0xFB, 0x8C, 0x00]) / 255.0
    image = torch.ones(1, 3, 8, 8)
    image[0, :, 3, 2:6] = orange[:, None]  # 4 pixels fully covered by the stroke
    image[0, :, 2, 2:6] = image[0, :, 4, 2:6] = (orange[:, None] + 1.0) / 2  # 8 half-covered edge pixels
    yellow, orange_index = list(PALETTE).index("yellow"), list(PALETTE).index("orange")
    assert int(dominant_colour(image)[0]) == yellow  # the judge's median lands on the edge
    assert int(core_ink_colour(image)[0]) == orange_index
    assert core_ink_colour(torch.ones(1, 3, 8, 8)).tolist() == [-1]  # no ink


def test_foreground_threshold_is_120_of_765():
    images = torch.ones(1, 3, 1, 2)
    images[0, :, 0, 0] = 1.0 - 121 / 765  # summed distance 121: ink
    images[0, :, 0, 1] = 1.0 - 119 / 765  # 119: background
    assert foreground_mask(images).tolist() == [[[True, False]]]


def test_mask_iou(masks):
    shapes = torch.from_numpy(masks >= 128)
    iou = mask_iou(shapes, shapes)
    assert iou.shape == (len(SOME_ICONS), len(SOME_ICONS)) and iou.dtype == torch.float32
    assert torch.allclose(iou.diagonal(), torch.ones(len(SOME_ICONS)))
    assert (iou.argmax(dim=1) == torch.arange(len(SOME_ICONS))).all()  # each shape is nearest to itself
    left = torch.zeros(1, 4, 4, dtype=torch.bool)
    left[0, :, :2] = True
    assert mask_iou(left, ~left).tolist() == [[0.0]]
    half = torch.zeros(1, 4, 4, dtype=torch.bool)
    half[0, :, :1] = True
    assert mask_iou(half, left).tolist() == [[0.5]]
    with pytest.raises(ValueError, match="one size"):
        mask_iou(left, torch.zeros(1, 5, 5, dtype=torch.bool))


def test_common_icons_are_the_ones_other_icon_fonts_also_draw():
    train = [name for name in icons.icon_names() if icons.split_of(name) == "train"]
    common = icons.common_icons(train, 2)
    assert {"heart", "home", "bell", "lock", "camera", "star", "cloud", "book"} <= set(common)
    assert "heart-outline" not in common and "abugida-devanagari" not in common  # a variant; an icon only MDI draws
    assert all(icons.fonts_drawing(name) >= 2 and icons.family_of(name) == name for name in common)
    assert set(common) < set(icons.common_icons(train, 1)) and 100 < len(common) < 400
