"""Finding in an index: combined queries (the grammar, the arithmetic), near-duplicate groups, folder sync."""

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers import assert_one_line_error, draw_shape, run

pytest.importorskip("faiss")

from clipdalle import index  # noqa: E402
from clipdalle.index import Index, duplicates, query, store, sync  # noqa: E402
from clipdalle.index.faiss_index import build_faiss  # noqa: E402
from clipdalle.index.query import Term, parse_query  # noqa: E402


@pytest.fixture(scope="module")
def opened(built_index) -> Index:
    with Index.open(built_index) as opened_index:
        yield opened_index


# ------------------------------------------------------------------------------------------ the query grammar


def test_grammar_reads_weights_signs_quotes_ids_and_uploads():
    assert parse_query("a red circle") == [Term("text", "a red circle", 1.0)]
    assert parse_query('2:golden retriever + #17 - fruit + 0.5:@1 - "10:30 - clock"') == [
        Term("text", "golden retriever", 2.0),
        Term("image_id", "17", 1.0),
        Term("text", "fruit", -1.0),
        Term("upload", "1", 0.5),
        Term("text", "10:30 - clock", -1.0),
    ]
    assert parse_query("- a t-shirt") == [Term("text", "a t-shirt", -1.0)]  # a hyphen inside a word is text
    assert parse_query("./pool.jpg - cat", allow_paths=True) == [Term("path", "./pool.jpg"), Term("text", "cat", -1)]


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "query is empty"),
        ("a + - b", "two operators in a row"),
        ("a +", "ends with an operator"),
        ('"a', "quote is not closed"),
        ("2:", "a weight without a term"),
        ('a + ""', "empty quoted term"),
        ("./q.png", "command line only"),
        (" + ".join(["x"] * 17), "more than the limit"),
    ],
)
def test_grammar_errors_say_what_is_wrong(text, message):
    with pytest.raises(ValueError, match=message):
        parse_query(text)


def test_combine_is_the_renormalised_weighted_sum():
    features = np.eye(3, dtype=np.float32)[:2]  # (2, 3)
    combined = query.combine(features, [2.0, -1.0])
    np.testing.assert_allclose(combined, np.array([[2, -1, 0]]) / np.sqrt(5), atol=1e-6)
    with pytest.raises(ValueError, match="cancel out"):
        query.combine(np.stack([features[0], features[0]]), [1.0, -1.0])
    assert query.apply_weights([Term("text", "a", -1.0)], [3])[0].weight == -3.0
    with pytest.raises(ValueError, match="one per term"):
        query.apply_weights([Term("text", "a")], [1, 2])


def test_one_text_term_searches_like_plain_text_and_ids_pull_towards_an_image(opened):
    plain = opened.search(text="a red circle", k=5)
    combined = query.search_terms(opened, parse_query("a red circle"), k=5)
    assert [hit["id"] for hit in combined] == [hit["id"] for hit in plain]
    np.testing.assert_allclose([h["score"] for h in combined], [h["score"] for h in plain], atol=1e-5)
    some_id = plain[-1]["id"]
    assert query.search_terms(opened, parse_query(f"#{some_id}"), k=1)[0]["id"] == some_id
    pulled = query.search_terms(opened, parse_query(f"a red circle + 5:#{some_id}"), k=1)[0]["id"]
    assert float((opened.features_of([pulled]) @ opened.features_of([some_id]).T)[0, 0]) > 0.99  # or a jittered twin
    with pytest.raises(ValueError, match="no image with id 999999"):
        query.search_terms(opened, parse_query("#999999"))


def test_cli_search_combines_texts_images_and_weights(capsys, built_index, shapes_32):
    image = shapes_32 / "square_blue_1.png"
    code, out, err = run(capsys, "search", "--index", str(built_index), "--image", str(image), "-k", "1", "--json")
    assert code == 0, err
    assert json.loads(out)[0]["score"] > 0.999
    args = ["search", "a red circle", "--index", str(built_index), "--image", str(image), "--minus", "a cross"]
    code, out, err = run(capsys, *args, "--weights", "0,1,0", "-k", "1", "--json")
    assert code == 0, err
    assert json.loads(out)[0]["score"] > 0.999  # weight 0 drops a term: the image alone
    code, out, err = run(capsys, *args, "--weights", "1,0,0", "-k", "3", "--json")
    assert code == 0, err
    code, text_only, err = run(capsys, "search", "a red circle", "--index", str(built_index), "-k", "3", "--json")
    assert [hit["id"] for hit in json.loads(out)] == [hit["id"] for hit in json.loads(text_only)]
    code, _, err = run(capsys, *args, "--weights", "1,2")
    assert_one_line_error(code, err, "got 2 for 3 terms")
    code, _, err = run(capsys, "search", "a + ./missing.png", "--index", str(built_index))
    assert_one_line_error(code, err, "no such image file")


# ------------------------------------------------------------------------------------------ near-duplicates


def test_range_search_pairs_equal_brute_force_above_the_threshold():
    rng = np.random.default_rng(0)
    base = rng.standard_normal((40, 8)).astype(np.float32)
    vectors = np.concatenate([base, base[:10] + 0.05 * rng.standard_normal((10, 8)).astype(np.float32)])
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    ids = np.arange(100, 150, dtype=np.int64)
    faiss_index, _ = build_faiss(vectors, ids, exact_limit=1000, memory_budget_mb=10, target_recall=0.95)
    pairs, scores = duplicates.pairs_above(faiss_index, ids, vectors, 0.9)
    similarity = vectors @ vectors.T
    rows, columns = np.nonzero(np.triu(similarity > 0.9, k=1))
    assert sorted(map(tuple, pairs.tolist())) == sorted(zip(ids[rows].tolist(), ids[columns].tolist()))
    np.testing.assert_allclose(scores, similarity[pairs[:, 0] - 100, pairs[:, 1] - 100], atol=1e-5)
    with pytest.raises(ValueError, match="between -1 and 1"):
        duplicates.pairs_above(faiss_index, ids, vectors, 1.5)


def test_groups_are_connected_components_largest_first():
    pairs = np.array([[5, 6], [1, 2], [2, 3], [9, 8]])
    assert duplicates.group_pairs(pairs) == [[1, 2, 3], [5, 6], [8, 9]]
    assert duplicates.group_pairs(np.zeros((0, 2), dtype=np.int64)) == []


def test_find_duplicates_by_clip_groups_pairs_above_the_cosine_and_the_cli_prints_them(capsys, opened, built_index):
    report = duplicates.find_duplicates(opened, threshold=0.999, method="clip")
    grouped = {member for group in report["groups"] for member in group["ids"]}
    assert report["grouped"] == len(grouped) and report["images"] == len(opened)
    for group in report["groups"]:
        assert group["min_score"] > 0.999 and [image["id"] for image in group["images"]] == group["ids"]
        assert group["max_pixel_distance"] is None
    everything = duplicates.find_duplicates(opened, threshold=-1.0, max_groups=1, method="clip")
    assert everything["groups_total"] == 1 and everything["grouped"] == len(opened)  # one group of all
    cli_args = ["index", "duplicates", "--index", str(built_index), "--method", "clip", "--threshold", "-1"]
    code, out, err = run(capsys, *cli_args, "--json")
    assert code == 0, err
    assert json.loads(out)["groups"][0]["ids"] == sorted(opened.embeddings()[0].tolist())
    code, out, err = run(capsys, *cli_args)
    assert code == 0 and "1 group(s) of near-duplicates" in out
    with pytest.raises(ValueError, match="expected one of pixels, clip"):
        duplicates.find_duplicates(opened, method="hash")


def test_find_duplicates_on_the_pixels_groups_each_original_with_its_copies_only(capsys, tiny_clip_run, tmp_path):
    import io

    from PIL import Image, ImageDraw

    folder = tmp_path / "photos"
    folder.mkdir()
    originals = [("circle", "red"), ("square", "red"), ("triangle", "blue"), ("cross", "green")]
    for shape, colour in originals:
        image = draw_shape(shape, colour, 32)
        image.save(folder / f"{shape}.png")
        image.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(folder / f"{shape}-mirrored.png")
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=20)
        (folder / f"{shape}-jpeg.jpg").write_bytes(buffer.getvalue())
        image.crop((1, 1, 30, 30)).save(folder / f"{shape}-crop.png")
    draw_shape("circle", "blue", 32).save(folder / "circle-blue.png")  # the same shape in another colour
    draw_shape("square", "red", 32, jitter=2).save(folder / "square-smaller.png")  # another picture of a square
    for name, colour in (("ring", (229, 57, 53)), ("ring-pink", (216, 27, 96))):  # thin strokes: no flat ink
        ring = Image.new("RGB", (32, 32), "white")
        ImageDraw.Draw(ring).ellipse((5, 5, 26, 26), outline=colour, width=2)
        ring.save(folder / f"{name}.png")
        if name == "ring":
            ring.save(folder / "ring-jpeg.jpg", format="JPEG", quality=20)
    index.build_index(tiny_clip_run, folder, tmp_path / "index", num_workers=0)
    (folder / "cross-crop.png").unlink()  # gone since indexing: left out
    with Index.open(tmp_path / "index") as opened:
        report = duplicates.find_duplicates(opened)
        rows = opened.rows(opened.embeddings()[0].tolist())
    assert report["method"] == "pixels" and report["unreadable"] == 1 and report["candidates"] >= report["pairs"]
    stems = [sorted(Path(rows[member]["path"]).stem for member in group["ids"]) for group in report["groups"]]
    indexed = {Path(row["path"]).stem for row in rows.values()}  # a symmetric shape's mirror is stored once
    for shape in ("circle", "square", "triangle", "cross"):
        copies = {shape, f"{shape}-mirrored", f"{shape}-jpeg", f"{shape}-crop"} & indexed - {"cross-crop"}
        assert sorted(copies) in stems, stems
    assert ["ring", "ring-jpeg"] in stems  # the pink ring: another colour by its ink, and not what the JPEG holds
    assert not any(other in group for group in stems for other in ("circle-blue", "square-smaller", "ring-pink"))
    for group in report["groups"]:
        if group["max_pixel_distance"] is not None:
            assert 0 <= group["max_pixel_distance"] <= duplicates.pixel_match.PIXEL_THRESHOLD
    code, out, err = run(capsys, "index", "duplicates", "--index", str(tmp_path / "index"))
    assert code == 0, err
    assert "checked on the pixels" in out and "1 image(s) unreadable" in out


# ------------------------------------------------------------------------------------------ folder sync


def folder_copy(shapes_32: Path, target: Path, stems: list[str]) -> Path:
    target.mkdir(parents=True)
    for stem in stems:
        for suffix in (".png", ".txt"):
            shutil.copy(shapes_32 / f"{stem}{suffix}", target / f"{stem}{suffix}")
    return target


STEMS = [f"{shape}_{colour}_0" for shape in ("circle", "square", "cross") for colour in ("red", "blue")]


def consistent(path: Path) -> Index:
    """The index reopened: faiss holds exactly the stored ids, the files table only existing files."""
    opened = Index.open(path)
    ids, _ = opened.embeddings()
    import faiss

    assert sorted(faiss.vector_to_array(opened.faiss_index.id_map).tolist()) == sorted(ids.tolist())
    return opened


def test_sync_adds_changes_removes_and_then_finds_nothing_to_do(shapes_32, tiny_clip_run, tmp_path, capsys):
    data = folder_copy(shapes_32, tmp_path / "data", STEMS)
    index.build_index(tiny_clip_run, data, tmp_path / "index", num_workers=0)
    first = sync.sync_folder(tmp_path / "index", data, num_workers=0)
    assert (first["added"], first["changed"], first["removed"], first["unchanged"]) == (0, 0, 0, 6)
    assert first["embedded"] == 0  # the build's images are matched by path and hash, not embedded again

    (data / "circle_red_0.png").unlink()  # removed
    draw_shape("triangle", "green", 32).save(data / "square_red_0.png")  # changed content
    draw_shape("triangle", "black", 32).save(data / "new.png")  # added
    shutil.copy(data / "cross_blue_0.png", data / "cross_copy.png")  # added, but its content is stored
    os.utime(data / "square_blue_0.png", ns=(1, 1))  # touched: hashed, found unchanged
    report = sync.sync_folder(tmp_path / "index", data, num_workers=0)
    assert (report["added"], report["changed"], report["removed"], report["unchanged"]) == (2, 1, 1, 4)
    assert (report["embedded"], report["rows_added"], report["rows_removed"]) == (2, 2, 2)
    with consistent(tmp_path / "index") as opened:
        assert len(opened) == 6
        assert opened.search(image=data / "new.png", k=1)[0]["score"] > 0.999
        paths = {row["path"] for row in opened.rows(opened.embeddings()[0].tolist()).values()}
        assert str(data / "circle_red_0.png") not in paths

    again = sync.sync_folder(tmp_path / "index", data, num_workers=0)
    assert (again["added"], again["changed"], again["removed"], again["embedded"]) == (0, 0, 0, 0)
    code, out, err = run(capsys, "index", "info", "--index", str(tmp_path / "index"))
    assert code == 0, err
    assert json.loads(out)["last_sync"]["unchanged"] == 7
    code, _, err = run(capsys, "index", "sync", "--index", str(tmp_path / "index"), "--data", str(data / "new.png"))
    assert_one_line_error(code, err, "give a folder")


def test_killed_sync_resumes_its_chunks_and_rolls_a_committed_faiss_forward(
    shapes_32, tiny_clip_run, tmp_path, monkeypatch
):
    data = folder_copy(shapes_32, tmp_path / "data", STEMS[:2])
    index.build_index(tiny_clip_run, data, tmp_path / "index", num_workers=0)
    for number, shape in enumerate(("triangle", "square", "cross")):
        draw_shape(shape, "green", 32, jitter=number).save(data / f"new{number}.png")

    def die(*args, **kwargs):
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(sync, "_commit", die)
    with pytest.raises(KeyboardInterrupt):
        sync.sync_folder(tmp_path / "index", data, batch_size=1, num_workers=0)
    assert len(list((tmp_path / "index" / "chunks").glob("sync-*.json"))) == 1  # 3 images, one chunk
    monkeypatch.undo()
    written = []
    real_write_chunk = store._write_chunk
    monkeypatch.setattr(store, "_write_chunk", lambda *a, **k: (written.append(a[1]), real_write_chunk(*a, **k)))
    report = sync.sync_folder(tmp_path / "index", data, batch_size=1, num_workers=0)
    assert written == [] and report["rows_added"] == 3  # the chunk of the killed run was reused
    assert not (tmp_path / "index" / "chunks").exists()

    # A kill between the SQLite commit and the faiss rename leaves .faiss.index.gN of the committed generation.
    real_replace = os.replace

    def replace_unless_pending(source, target):
        if Path(source).name.startswith(".faiss.index.g"):
            raise KeyboardInterrupt("killed")
        real_replace(source, target)

    monkeypatch.setattr(os, "replace", replace_unless_pending)
    (data / "new0.png").unlink()
    with pytest.raises(KeyboardInterrupt):
        sync.sync_folder(tmp_path / "index", data, num_workers=0)
    monkeypatch.undo()
    assert list((tmp_path / "index").glob(".faiss.index.g*"))
    report = sync.sync_folder(tmp_path / "index", data, num_workers=0)
    assert report["removed"] == 0  # the deletion was committed by the killed run
    with consistent(tmp_path / "index") as opened:
        assert len(opened) == 4
