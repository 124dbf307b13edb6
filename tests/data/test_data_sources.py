import csv
import io
import json
import os
import tarfile
import warnings

import pytest
from PIL import Image

from clipdalle.data import sources
from clipdalle.data.loader import SampleStream
from clipdalle.data.sources import (
    UNIT_SIZE,
    DataWarning,
    FileSource,
    ShardSource,
    expand_braces,
    is_validation,
    open_labelled,
    open_source,
    resolve_splits,
)
from clipdalle.transforms import BadImage

# key -> (image file suffix, caption file text, captions it should give)
SAMPLES = {
    "cats/black": (".JPG", "a black cat\n", ("a black cat",)),
    "cats/tabby": (".png", "a tabby cat\n\n   a striped cat  \n\n", ("a tabby cat", "a striped cat")),
    "dogs/sub/pug": (".webp", "\ufeffa pug, sitting\r\n", ("a pug, sitting",)),
    "red_square": (".jpeg", "a red square", ("a red square",)),
}


def image_bytes(suffix: str, colour=(200, 30, 40)) -> bytes:
    image_format = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}[suffix.lower()]
    buffer = io.BytesIO()
    Image.new("RGB", (6, 4), colour).save(buffer, format=image_format)
    return buffer.getvalue()


def write_folder(root, samples=SAMPLES):
    for key, (suffix, caption_text, _) in samples.items():
        (root / key).parent.mkdir(parents=True, exist_ok=True)
        (root / f"{key}{suffix}").write_bytes(image_bytes(suffix))
        (root / f"{key}.txt").write_bytes(caption_text.encode("utf-8"))
    return root


def add_member(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    archive.addfile(info, io.BytesIO(data))


def write_shard(path, members: list[tuple[str, bytes]]):
    with tarfile.open(path, "w") as archive:
        for name, data in members:
            add_member(archive, name, data)
    return path


def sample_members(samples=SAMPLES) -> list[tuple[str, bytes]]:
    members = []
    for key, (suffix, caption_text, _) in samples.items():
        members += [(f"{key}{suffix}", image_bytes(suffix)), (f"{key}.txt", caption_text.encode("utf-8"))]
        members.append((f"{key}.json", b'{"url": "http://example.com"}'))  # metadata img2dataset writes: ignored
    return members


def captions_by_key(source, strip_prefix: str = "") -> list[tuple[str, tuple[str, ...]]]:
    records = sorted(source, key=lambda record: record.key)
    assert all(record.error is None for record in records)
    return [(record.key.removeprefix(strip_prefix), record.captions) for record in records]


def assert_one_line_error(error_type, call, *fragments):
    with pytest.raises(error_type) as raised:
        call()
    message = str(raised.value)
    assert "\n" not in message, message
    for fragment in fragments:
        assert str(fragment) in message, (fragment, message)
    return message


# ---------------------------------------------------------------------------------------------- all formats


def test_folder_shard_and_manifests_read_the_same_dataset(tmp_path):
    expected = [(key, captions) for key, (_, _, captions) in sorted(SAMPLES.items())]
    folder = write_folder(tmp_path / "folder")
    shard = write_shard(tmp_path / "shard-000.tar", sample_members())
    rows = [(f"{key}{suffix}", caption) for key, (suffix, _, captions) in SAMPLES.items() for caption in captions]
    for delimiter, name in ((",", "manifest.csv"), ("\t", "manifest.tsv")):
        with open(folder / name, "w", newline="", encoding="utf-8") as file:
            writer = csv.writer(file, delimiter=delimiter)
            writer.writerow(["image", "caption"])
            writer.writerows(rows)
    with open(folder / "manifest.jsonl", "w", encoding="utf-8") as file:
        for key, (suffix, _, captions) in SAMPLES.items():
            file.write(json.dumps({"image": f"{key}{suffix}", "caption": list(captions)}) + "\n")

    assert captions_by_key(open_source(folder)) == expected
    assert captions_by_key(open_source(shard), strip_prefix="shard-000/") == expected
    for name in ("manifest.csv", "manifest.tsv", "manifest.jsonl"):
        assert captions_by_key(open_source(folder / name)) == expected, name

    # The records point at the same image bytes whichever format they come from.
    for source in (open_source(folder), open_source(shard), open_source(folder / "manifest.csv")):
        for record in source:
            suffix = SAMPLES[record.key.removeprefix("shard-000/")][0]
            assert record.read_bytes() == (folder / f"{record.key.removeprefix('shard-000/')}{suffix}").read_bytes()


def test_folder_records_name_their_files(tmp_path):
    folder = write_folder(tmp_path)
    records = {record.key: record for record in open_source(folder)}
    assert records["dogs/sub/pug"].path == folder / "dogs/sub/pug.webp"
    assert records["dogs/sub/pug"].name == str(folder / "dogs/sub/pug.webp")
    assert records["cats/black"].data is None and records["cats/black"].label is None


# ---------------------------------------------------------------------------------------------- folders


def test_folder_units_are_chunks_of_64_in_path_order(tmp_path):
    for index in range(2 * UNIT_SIZE + 2):
        (tmp_path / f"img{index:04d}.png").write_bytes(b"not decoded here")
    source = open_source(tmp_path, captions="optional")
    assert isinstance(source, FileSource) and len(source) == 2 * UNIT_SIZE + 2
    assert source.units == ["0", "1", "2"]
    assert [len(list(source.records(unit))) for unit in source.units] == [UNIT_SIZE, UNIT_SIZE, 2]
    assert [record.key for record in source.records("2")] == ["img0128", "img0129"]
    assert [record.key for record in source] == [f"img{index:04d}" for index in range(2 * UNIT_SIZE + 2)]
    assert all(record.captions == () for record in source)
    assert_one_line_error(ValueError, lambda: list(source.records("7")), "'7'", str(tmp_path))


def test_many_units_get_ids_that_sort_like_numbers(tmp_path):
    for index in range(10 * UNIT_SIZE + 1):
        (tmp_path / f"{index}.png").write_bytes(b"")
    units = open_source(tmp_path, captions="optional").units
    assert units == [f"{index:02d}" for index in range(11)] and sorted(units) == units


def test_folder_listing_rules(tmp_path):
    (tmp_path / "UPPER.PNG").write_bytes(b"")
    (tmp_path / "UPPER.txt").write_text("upper case extension")
    (tmp_path / "._UPPER.PNG").write_bytes(b"macOS resource fork")  # hidden: not an image
    (tmp_path / ".cache").mkdir()
    (tmp_path / ".cache" / "thumb.png").write_bytes(b"")
    (tmp_path / "notes.md").write_text("ignored")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "x.tiff").write_bytes(b"")
    (tmp_path / "sub" / "x.txt").write_text("a tiff")
    os.symlink(tmp_path, tmp_path / "sub" / "loop")  # a link back up the tree must not recurse forever
    assert captions_by_key(open_source(tmp_path)) == [("UPPER", ("upper case extension",)), ("sub/x", ("a tiff",))]


def test_missing_caption_is_an_error_unless_optional(tmp_path):
    write_folder(tmp_path)
    (tmp_path / "cats" / "lonely.png").write_bytes(image_bytes(".png"))
    assert_one_line_error(ValueError, lambda: open_source(tmp_path), tmp_path / "cats" / "lonely.png", ".txt")
    records = {record.key: record.captions for record in open_source(tmp_path, captions="optional")}
    assert records["cats/lonely"] == () and records["cats/tabby"] == ("a tabby cat", "a striped cat")
    assert_one_line_error(ValueError, lambda: open_source(tmp_path, captions="maybe"), "required", "'maybe'")


def test_images_sharing_a_stem_are_a_warning_with_a_count(tmp_path):
    for name in ("a.png", "a.jpg", "a.webp", "b.png"):
        (tmp_path / name).write_bytes(b"")
    with pytest.warns(DataWarning) as warned:
        source = open_source(tmp_path, captions="optional")
    assert [record.name for record in source] == [str(tmp_path / "a.jpg"), str(tmp_path / "b.png")]
    (message,) = [str(warning.message) for warning in warned]
    assert "2 image(s) skipped" in message and "a.png" in message and "\n" not in message
    manifest = tmp_path / "list.csv"
    manifest.write_text("image,caption\na.png,one\na.jpg,two\na.png,three\n")
    with pytest.warns(DataWarning, match="1 row\\(s\\) skipped .*line 3: .*a.jpg"):
        records = list(open_source(manifest))
    assert [(record.key, record.captions) for record in records] == [("a", ("one", "three"))]


def test_unreadable_captions_skip_their_sample_named_once(tmp_path):
    write_folder(tmp_path)
    (tmp_path / "red_square.txt").write_bytes("un carré rouge".encode("latin-1"))
    source = open_source(tmp_path)  # listing does not read captions
    with pytest.warns(DataWarning) as warned:
        records = {record.key: record for record in source}
    assert [str(warning.message) for warning in warned] == [records["red_square"].error]
    message = records["red_square"].error
    assert str(tmp_path / "red_square.txt") in message and "not UTF-8" in message and "\n" not in message
    assert all(record.error is None for key, record in records.items() if key != "red_square")
    with pytest.raises(BadImage, match="red_square.txt"):
        records["red_square"].decode()
    # Image-only readers never open a caption file.
    (tmp_path / "cats" / "tabby.txt").unlink()
    (tmp_path / "cats" / "tabby.txt").symlink_to("/dev/zero")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        records = list(open_source(tmp_path, captions="none"))
    assert len(records) == 4 and all(record.error is None and record.captions == () for record in records)


def test_special_files_are_refused_before_reading(tmp_path):
    write_folder(tmp_path / "data")
    os.mkfifo(tmp_path / "data" / "fifo.png")
    (tmp_path / "data" / "cats" / "black.txt").unlink()
    os.mkfifo(tmp_path / "data" / "cats" / "black.txt")  # a FIFO caption
    (tmp_path / "data" / "zero.png").symlink_to("/dev/zero")
    (tmp_path / "data" / "fifo.txt").write_text("a pipe")
    (tmp_path / "data" / "zero.txt").write_text("endless zeros")
    with pytest.warns(DataWarning, match="black.txt: caption skipped with its image, not a regular caption file"):
        records = {record.key: record for record in open_source(tmp_path / "data")}
    for key in ("fifo", "zero"):
        with pytest.raises(BadImage, match="not a regular image file"):
            records[key].decode()
    assert records["cats/black"].error is not None
    with pytest.warns(DataWarning):
        batches = list(SampleStream(open_source(tmp_path / "data"), image_size=8, batch_size=16, infinite=False))
    assert batches[0]["skipped"] == 3 and len(batches[0]["keys"]) == 3
    (tmp_path / "list.jsonl").symlink_to("/dev/zero")
    assert_one_line_error(ValueError, lambda: open_source(tmp_path / "list.jsonl"), "list.jsonl", "not a regular")
    os.mkfifo(tmp_path / "shard.tar")
    (only,) = list(ShardSource(tmp_path, [tmp_path / "shard.tar"]))
    assert "not a regular file" in only.error


def test_oversized_shard_members_are_skipped_by_their_header(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "MAX_IMAGE_BYTES", 4096)
    monkeypatch.setattr(sources, "MAX_CAPTION_BYTES", 100)
    path = tmp_path / "bomb.tar.gz"
    with tarfile.open(path, "w:gz") as archive:
        add_member(archive, "big.png", bytes(1 << 20))  # 1 MiB of zeros: a few kB compressed
        add_member(archive, "big.txt", b"a caption")
        add_member(archive, "long.png", image_bytes(".png"))
        add_member(archive, "long.txt", b"x" * 101)
        add_member(archive, "fine.png", image_bytes(".png"))
        add_member(archive, "fine.txt", b"a fine caption")
    assert path.stat().st_size < 10_000
    with pytest.warns(DataWarning):
        records = {record.key: record for record in open_source(path)}
    assert "image member of 1048576 bytes is above the limit of 4096" in records["bomb/big"].error
    assert "caption of 101 bytes is above the limit 100" in records["bomb/long"].error
    assert records["bomb/big"].data is None and records["bomb/fine"].captions == ("a fine caption",)


def test_dataset_errors_are_one_line_and_name_the_path(tmp_path):
    assert_one_line_error(FileNotFoundError, lambda: open_source(tmp_path / "nope"), tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.md").write_text("no images here")
    assert_one_line_error(ValueError, lambda: open_source(tmp_path / "empty"), tmp_path / "empty", ".png", ".jpg")
    (tmp_path / "data.parquet").write_bytes(b"PAR1")
    assert_one_line_error(ValueError, lambda: open_source(tmp_path / "data.parquet"), "data.parquet", "supported")


# ---------------------------------------------------------------------------------------------- manifests


def test_manifest_rows_paths_and_columns(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.png").write_bytes(image_bytes(".png"))
    elsewhere = tmp_path.parent / f"{tmp_path.name}_elsewhere.png"
    elsewhere.write_bytes(image_bytes(".png"))
    manifest = tmp_path / "list.csv"
    manifest.write_text(
        'image,caption\nimages/a.png,"first, with a comma"\n./images/a.png,second\n'
        f"{elsewhere},absolute\n\nimages/a.png,   \n",
        encoding="utf-8",
    )
    records = list(open_source(manifest))
    assert [record.captions for record in records] == [("first, with a comma", "second"), ("absolute",)]
    assert records[0].key == "images/a" and records[0].path == tmp_path / "images" / "a.png"
    assert records[1].path == elsewhere and records[1].read_bytes() == elsewhere.read_bytes()

    wrong = tmp_path / "wrong.csv"
    wrong.write_text("file,text\na.png,hello\n")
    assert_one_line_error(ValueError, lambda: open_source(wrong), wrong, "file, text", "image")
    no_caption = tmp_path / "no_caption.csv"
    no_caption.write_text("image,caption\nimages/a.png,\n")
    assert_one_line_error(ValueError, lambda: open_source(no_caption), tmp_path / "images" / "a.png", "caption")
    assert list(open_source(no_caption, captions="optional"))[0].captions == ()
    lines = tmp_path / "bad.jsonl"
    lines.write_text('{"image": "images/a.png", "caption": "ok"}\n{"image": "images/a.png"}\n')
    assert_one_line_error(ValueError, lambda: open_source(lines), lines, "line 2", "caption")
    latin = tmp_path / "latin.tsv"
    latin.write_bytes("image\tcaption\na.png\tcarré\n".encode("latin-1"))
    assert_one_line_error(ValueError, lambda: open_source(latin), latin, "UTF-8")


def test_manifest_units_are_chunks_of_64(tmp_path):
    manifest = tmp_path / "big.jsonl"
    manifest.write_text("".join(json.dumps({"image": f"{i}.png", "caption": f"c{i}"}) + "\n" for i in range(100)))
    source = open_source(manifest)
    assert source.units == ["0", "1"]
    assert [record.key for record in source.records("1")] == [str(i) for i in range(64, 100)]


# ---------------------------------------------------------------------------------------------- shards


def make_shards(folder, count=3, per_shard=2):
    folder.mkdir(exist_ok=True)
    for shard in range(count):
        members = []
        for sample in range(per_shard):
            key = f"{shard * per_shard + sample:06d}"
            members += [(f"{key}.jpg", image_bytes(".jpg")), (f"{key}.txt", f"caption {key}".encode())]
        write_shard(folder / f"shard-{shard:03d}.tar", members)
    return folder


def test_shard_patterns_globs_braces_folders(tmp_path):
    folder = make_shards(tmp_path / "shards")
    (folder / "stats.json").write_text("{}")  # img2dataset writes these beside the shards
    every = [str(folder / f"shard-{index:03d}.tar") for index in range(3)]
    assert open_source(f"{folder}/shard-{{000..002}}.tar").units == every
    assert open_source(f"{folder}/shard-{{002,000}}.tar").units == [every[0], every[2]]
    assert open_source(f"{folder}/*.tar").units == every
    assert open_source(f"{folder}/shard-00[01].tar").units == every[:2]
    assert open_source(folder).units == every
    single = open_source(folder / "shard-001.tar")
    assert isinstance(single, ShardSource) and single.units == [every[1]]
    records = list(single)
    assert [(record.key, record.captions) for record in records] == [
        ("shard-001/000002", ("caption 000002",)),
        ("shard-001/000003", ("caption 000003",)),
    ]
    assert records[0].name == f"{every[1]}:000002.jpg" and records[0].data == image_bytes(".jpg")
    assert [record.key for record in open_source(folder)] == [f"shard-{i // 2:03d}/{i:06d}" for i in range(6)]

    assert_one_line_error(FileNotFoundError, lambda: open_source(f"{folder}/shard-{{000..004}}.tar"), "shard-003.tar")
    assert_one_line_error(FileNotFoundError, lambda: open_source(f"{folder}/*.tgz"), "*.tgz")


def test_expand_braces():
    assert expand_braces("s-{1..3}.tar") == ["s-1.tar", "s-2.tar", "s-3.tar"]
    assert expand_braces("{08..10}") == ["08", "09", "10"]
    assert expand_braces("{a,b}{1,2}") == ["a1", "a2", "b1", "b2"]
    assert expand_braces("x{a,b{c,d}}") == ["xa", "xbc", "xbd"]
    assert expand_braces("plain{x}.tar") == ["plain{x}.tar"]


def test_shard_members_labels_and_metadata(tmp_path):
    shard = write_shard(
        tmp_path / "labelled.tar",
        [
            ("a/k1.PNG", image_bytes(".png")),
            ("a/k1.cls", b"7\n"),
            ("a/k1.json", b"{}"),
            ("a/k1.txt", b"one"),
            ("k2.json", b"{}"),  # a sample whose download failed: metadata only, skipped
            ("k3.webp", image_bytes(".webp")),
            ("k3.mask.png", image_bytes(".png")),  # key = basename up to its first ".": field "mask.png", ignored
            ("k3.txt", b"three"),
        ],
    )
    records = list(open_source(shard))
    assert [(record.key, record.captions, record.label) for record in records] == [
        ("labelled/a/k1", ("one",), "7"),
        ("labelled/k3", ("three",), None),
    ]
    assert records[1].data == image_bytes(".webp") and records[1].name == f"{shard}:k3.webp"


def test_shard_caption_problems_skip_the_sample_and_name_the_member(tmp_path):
    shard = write_shard(tmp_path / "s.tar", [("k1.png", image_bytes(".png")), ("k1.txt", b"ok"), ("k2.png", b"x")])
    with pytest.warns(DataWarning, match="k2.png: no caption"):
        records = list(open_source(shard))
    assert records[0].error is None and f"{shard}:k2.png" in records[1].error and "k2.txt" in records[1].error
    assert [record.captions for record in open_source(shard, captions="optional")] == [("ok",), ()]
    latin = write_shard(tmp_path / "latin.tar", [("k.png", b"x"), ("k.txt", "carré".encode("latin-1"))])
    with pytest.warns(DataWarning, match="latin.tar:k.txt: caption skipped with its image, not UTF-8"):
        (record,) = list(open_source(latin))
    assert record.data is None and "UTF-8" in record.error
    assert list(open_source(latin, captions="none"))[0].error is None


def damaged_copy(tmp_path, data: bytes, cut: int, name: str):
    path = tmp_path / name
    path.write_bytes(data[:cut])
    return path


def test_truncated_shard_yields_good_records_then_one_error(tmp_path):
    shard = make_shards(tmp_path / "full", count=1, per_shard=4) / "shard-000.tar"
    data = shard.read_bytes()
    with tarfile.open(shard) as archive:
        members = {member.name: member for member in archive.getmembers()}
    cuts = {
        "in_image_data": members["000002.jpg"].offset_data + 10,  # 2 whole samples before it
        "at_member_boundary": members["000002.jpg"].offset,  # tarfile alone would call this a complete shard
        "in_header": members["000002.jpg"].offset + 100,
        "before_end_marker": members["000003.txt"].offset_data + 512,  # all samples, but no end-of-archive blocks
    }
    for label, cut in cuts.items():
        path = damaged_copy(tmp_path, data, cut, f"{label}.tar")
        records = list(open_source(path))
        good = 4 if label == "before_end_marker" else 2
        assert [record.key for record in records[:-1]] == [f"{label}/{i:06d}" for i in range(good)], label
        assert all(record.error is None and record.data for record in records[:-1])
        error = records[-1]
        assert error.error is not None and error.data is None and error.key == f"{label}/#damaged"
        assert str(path) in error.error and "\n" not in error.error and f"{good} good" in error.error
        assert_one_line_error(ValueError, error.read_bytes, str(path))
    garbage = tmp_path / "garbage.tar"
    garbage.write_bytes(b"not a tar file " * 100)
    (only,) = list(open_source(garbage))
    assert only.error and str(garbage) in only.error


# ---------------------------------------------------------------------------------------------- labelled data


def test_open_labelled_class_folders_and_csv(tmp_path):
    root = tmp_path / "eval"
    for label, name in (("cat", "a.png"), ("dog", "b.png"), ("dog", "sub/c.png")):
        (root / label / name).parent.mkdir(parents=True, exist_ok=True)
        (root / label / name).write_bytes(image_bytes(".png"))
    records = list(open_labelled(root))
    assert [(record.key, record.label, record.captions) for record in records] == [
        ("cat/a", "cat", ()),
        ("dog/b", "dog", ()),
        ("dog/sub/c", "dog", ()),
    ]
    (root / "stray.png").write_bytes(b"")
    assert_one_line_error(ValueError, lambda: open_labelled(root), root / "stray.png", "LABEL")

    table = tmp_path / "labels.csv"
    table.write_text("image,label\neval/cat/a.png,cat\neval/dog/b.png,dog\n")
    assert [(record.key, record.label) for record in open_labelled(table)] == [
        ("eval/cat/a", "cat"),
        ("eval/dog/b", "dog"),
    ]
    table.write_text("image,caption\neval/cat/a.png,a cat\n")
    assert_one_line_error(ValueError, lambda: open_labelled(table), table, "label", "image, caption")
    assert_one_line_error(FileNotFoundError, lambda: open_labelled(tmp_path / "missing"), tmp_path / "missing")


# ---------------------------------------------------------------------------------------------- splits


def test_resolve_splits(tmp_path):
    (tmp_path / "split" / "train").mkdir(parents=True)
    (tmp_path / "split" / "val").mkdir()
    assert resolve_splits(tmp_path / "split") == (tmp_path / "split" / "train", tmp_path / "split" / "val")
    assert resolve_splits(tmp_path / "split", "other") == (tmp_path / "split" / "train", "other")
    assert resolve_splits(tmp_path, "held_out.csv") == (tmp_path, "held_out.csv")
    assert resolve_splits("shards/*.tar") == ("shards/*.tar", None)


def test_is_validation_is_stable_and_respects_the_fraction():
    # Computed once from sha1: "shard-000/k1" hashes to 0.02699, "cats/tabby" to 0.55842 (must never change,
    # or resumed runs and other machines would train on their validation set).
    assert is_validation("shard-000/k1", 0.03) and not is_validation("shard-000/k1", 0.02)
    assert is_validation("cats/tabby", 0.56) and not is_validation("cats/tabby", 0.55)
    keys = [f"shard-{index // 1000:05d}/{index:09d}" for index in range(10_000)]
    held_out = sum(is_validation(key, 0.1) for key in keys)
    assert 880 <= held_out <= 1120  # 1000 expected; binomial sd 30
    assert not any(is_validation(key, 0.0) for key in keys[:100])
    assert all(is_validation(key, 1.0) for key in keys[:100])
    with pytest.raises(ValueError, match="fraction"):
        is_validation("k", 1.5)


def test_extra_data_is_mixed_in_with_its_repeats(tmp_path):
    from helpers import make_shapes_folder

    from clipdalle.data.sources import MixedSource, extra_data, open_mixture

    main = make_shapes_folder(tmp_path / "main", size=8, repeats=1)  # 16 images
    extra = make_shapes_folder(tmp_path / "extra", size=8, repeats=1, seed=1)
    mixed = open_mixture(main, [f"{extra}:3"])
    assert isinstance(mixed, MixedSource) and sum(1 for _ in mixed) == 16 + 3 * 16
    assert " x3" in str(mixed.path)
    assert open_mixture(main, []).units == open_source(main).units  # no extras: the dataset as it is
    assert extra_data("data/a:b:2") == ("data/a:b", 2) and extra_data("plain") == ("plain", 1)
    with pytest.raises(ValueError, match="at least 1"):
        extra_data("x:0")
