"""The embedding index: build, resume, search, dedup, add/remove, model check, export, moderation."""

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import lock_held_by_another_process, make_shapes_folder

pytest.importorskip("faiss")

from clipdalle import checkpoint, index  # noqa: E402
from clipdalle.clip import load  # noqa: E402
from clipdalle.index import (  # noqa: E402
    Index,  # noqa: E402
    faiss_index,
    moderation,
    store,
)


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def copy_images(source: Path, target: Path, names: list[str]) -> Path:
    target.mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.copy(source / f"{name}.png", target / f"{name}.png")
        shutil.copy(source / f"{name}.txt", target / f"{name}.txt")
    return target


@pytest.fixture(scope="module")
def shapes_index(shapes_32, tiny_clip_run, tmp_path_factory) -> Path:
    """The 64 shapes indexed once (read-only for the tests that share it)."""
    out = tmp_path_factory.mktemp("index") / "shapes"
    index.build_index(tiny_clip_run, shapes_32, out, batch_size=16, num_workers=0)
    return out


@pytest.fixture(scope="module")
def opened(shapes_index) -> Index:
    with Index.open(shapes_index) as opened_index:
        yield opened_index


def clustered_vectors(count: int, dim: int, centres: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centre_vectors = rng.standard_normal((centres, dim)).astype(np.float32)
    vectors = centre_vectors[rng.integers(0, centres, count)] + 0.3 * rng.standard_normal((count, dim))
    return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)


# ------------------------------------------------------------------------------------------ build


def test_build_writes_info_metadata_and_stores_duplicates_once(shapes_32, shapes_index):
    info = index.index_info(shapes_index)
    distinct = {sha256_of(path) for path in shapes_32.glob("*.png")}
    assert info["count"] == len(distinct)
    assert info["duplicates"] == 64 - len(distinct) and info["skipped"] == 0
    assert info["index_type"] == "Flat" and info["recall_at_10"] == 1.0
    assert (shapes_index / info["clip_run"]).resolve().name == "run"
    assert not (shapes_index / "chunks").exists()
    export = index.export_index(shapes_index, shapes_index.parent / "export_check")
    rows = [json.loads(line) for line in Path(export["metadata"]).read_text().splitlines()]
    assert {row["sha256"] for row in rows} == distinct
    first = rows[0]
    assert (first["width"], first["height"]) == (32, 32)
    assert first["caption"].startswith("a ") and "\n" in first["caption"]  # every caption line kept
    assert sha256_of(Path(first["path"])) == first["sha256"]


def test_duplicate_file_under_another_name_is_counted_not_stored(shapes_32, tiny_clip_run, tmp_path):
    data = copy_images(shapes_32, tmp_path / "data", ["circle_red_0", "square_blue_0"])
    shutil.copy(data / "circle_red_0.png", data / "copy.png")
    info = index.build_index(tiny_clip_run, data, tmp_path / "index", num_workers=0)
    assert (info["count"], info["duplicates"]) == (2, 1)


def test_resumed_build_equals_uninterrupted_build(shapes_32, tiny_clip_run, tmp_path, monkeypatch):
    data = copy_images(
        shapes_32, tmp_path / "data", [f"{s}_{c}_1" for s in ("circle", "cross") for c in ("red", "blue")]
    )
    shutil.copy(shapes_32 / "square_green_2.png", data / "square_green_2.png")  # no caption: allowed
    (data / "broken.png").write_bytes(b"not a png")  # skipped and counted
    reference = index.build_index(tiny_clip_run, data, tmp_path / "full", batch_size=2, chunk_size=2, num_workers=0)

    real_write_chunk = store._write_chunk
    written = []

    def write_then_die(*args, **kwargs):
        if len(written) == 2:
            raise KeyboardInterrupt("killed")
        written.append(args[1])
        real_write_chunk(*args, **kwargs)

    monkeypatch.setattr(store, "_write_chunk", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        index.build_index(tiny_clip_run, data, tmp_path / "resumed", batch_size=2, chunk_size=2, num_workers=0)
    assert sorted(p.name for p in (tmp_path / "resumed" / "chunks").glob("*.json") if p.name != "plan.json") == [
        "r000-000000.json",
        "r000-000001.json",
    ]
    with pytest.raises(FileNotFoundError, match="did not finish"):
        Index.open(tmp_path / "resumed")

    embedded_again = []
    monkeypatch.setattr(store, "_write_chunk", lambda *a, **k: (embedded_again.append(a[1]), real_write_chunk(*a)))
    resumed = index.build_index(tiny_clip_run, data, tmp_path / "resumed", batch_size=2, chunk_size=2, num_workers=0)
    assert embedded_again == ["r000-000002"]  # the first two chunks were not redone
    assert (resumed["count"], resumed["skipped"]) == (reference["count"], reference["skipped"]) == (5, 1)
    full = index.export_index(tmp_path / "full", tmp_path / "full_export")
    again = index.export_index(tmp_path / "resumed", tmp_path / "resumed_export")
    np.testing.assert_array_equal(np.load(full["embeddings"]), np.load(again["embeddings"]))
    strip = [{k: v for k, v in json.loads(line).items() if k != "added"} for line in open(full["metadata"])]
    strip_again = [{k: v for k, v in json.loads(line).items() if k != "added"} for line in open(again["metadata"])]
    assert strip == strip_again


def test_partial_build_refuses_other_settings(shapes_32, tiny_clip_run, tmp_path, monkeypatch):
    data = copy_images(shapes_32, tmp_path / "data", ["circle_red_0", "square_blue_0", "cross_black_0"])
    monkeypatch.setattr(store, "_write_chunk", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        index.build_index(tiny_clip_run, data, tmp_path / "index", batch_size=1, chunk_size=1, num_workers=0)
    monkeypatch.undo()
    with pytest.raises(ValueError, match="batch_size: was 1, now 2"):
        index.build_index(tiny_clip_run, data, tmp_path / "index", batch_size=2, chunk_size=1, num_workers=0)


def test_empty_collection_and_existing_index_are_one_line_errors(shapes_index, tiny_clip_run, tmp_path):
    data = tmp_path / "bad"
    data.mkdir()
    (data / "a.png").write_bytes(b"garbage")
    with pytest.raises(ValueError, match=r"no image could be embedded \(1 unreadable\)"):
        index.build_index(tiny_clip_run, data, tmp_path / "index", num_workers=0)
    with pytest.raises(ValueError, match="already holds an index"):
        index.build_index(tiny_clip_run, data, shapes_index, num_workers=0)
    with pytest.raises(FileNotFoundError, match="not an index"):
        Index.open(tmp_path / "nowhere")


def test_a_second_writer_of_an_index_gets_a_one_line_error(opened, shapes_32, tiny_clip_run, tmp_path):
    out = tmp_path / "index"
    with lock_held_by_another_process(out) as other:
        with pytest.raises(ValueError, match=f"another process \\(pid {other}: .*\\) is using it to build an index"):
            index.build_index(tiny_clip_run, shapes_32, out, num_workers=0)
        assert sorted(path.name for path in out.iterdir()) == [".lock"]  # nothing written, nothing deleted
    count = len(opened)
    with lock_held_by_another_process(opened.path) as other:
        for change in (lambda: opened.add(shapes_32, num_workers=0), lambda: opened.remove([1])):
            with pytest.raises(ValueError, match=f"pid {other}"):
                change()
    assert len(opened) == count


# ------------------------------------------------------------------------------------------ search


def test_an_indexed_image_finds_itself_first(opened, shapes_32):
    for name in ("circle_red_0", "triangle_green_3", "cross_black_1"):
        path = shapes_32 / f"{name}.png"
        hits = opened.search(image=path, k=5)
        assert len(hits) == 5
        assert opened.rows([hits[0]["id"]])[hits[0]["id"]]["sha256"] == sha256_of(path)
        assert hits[0]["score"] == pytest.approx(1.0, abs=2e-3)  # float16 storage
        assert [hit["score"] for hit in hits] == sorted((hit["score"] for hit in hits), reverse=True)
        assert set(hits[0]) == {"id", "path", "caption", "score"}
    first = opened.search(image=path, k=3)[0]["id"]
    assert opened.similar(first, k=1)[0]["id"] == first


def test_caption_search_ranks_its_images_above_chance(opened):
    """The tiny CLIP is weak, but a caption's own images must sit well above the middle of the ranking."""
    ranks = []
    for caption in ("a red circle", "a blue square", "a green triangle", "a black cross"):
        hits = opened.search(text=caption, k=len(opened))
        assert len(hits) == len(opened)
        positions = [n for n, hit in enumerate(hits) if hit["caption"].split("\n")[0] == caption]
        assert positions
        ranks.append(min(positions) / len(hits))
    assert np.mean(ranks) < 0.25  # chance: about 0.4 for the best of ~3 images among ~45


def test_search_options_and_bad_queries(opened, shapes_32):
    assert len(opened.search(text="a red circle", k=3)) == 3
    assert opened.search(text="a red circle", min_score=1.01) == []
    with pytest.raises(ValueError, match="exactly one"):
        opened.search(text="a", image=shapes_32 / "circle_red_0.png")
    with pytest.raises(ValueError, match="not an image"):
        opened.search(image=b"garbage bytes")
    with pytest.raises(ValueError, match="k must be at least 1"):
        opened.search(text="a red circle", k=0)
    tensor_hits = opened.search(image=torch.ones(3, 40, 40), k=2)
    assert len(tensor_hits) == 2


def test_search_function_opens_the_index(shapes_index):
    hits = index.search(shapes_index, text="a blue square", k=4)
    assert len(hits) == 4 and all(isinstance(hit["id"], int) for hit in hits)


def test_other_model_weights_are_refused(shapes_index, tiny_clip_run, tmp_path):
    model, _, _ = load(tiny_clip_run)
    with torch.no_grad():
        model.logit_scale.add_(0.5)
    other = tmp_path / "other"
    checkpoint.save_model(other, model)
    shutil.copy(tiny_clip_run / checkpoint.TOKENIZER_FILE, other / checkpoint.TOKENIZER_FILE)
    with pytest.raises(ValueError, match="differ from the ones") as error:
        Index.open(shapes_index, clip=other)
    assert "\n" not in str(error.value)


# ------------------------------------------------------------------------------------------ add / remove


def test_add_appends_and_remove_drops(shapes_32, tiny_clip_run, tmp_path):
    first = copy_images(shapes_32, tmp_path / "first", ["circle_red_0", "square_blue_0"])
    second = copy_images(shapes_32, tmp_path / "second", ["cross_black_0", "triangle_green_0", "circle_red_0"])
    out = tmp_path / "index"
    index.build_index(tiny_clip_run, first, out, num_workers=0)
    added = index.add_to_index(out, second, num_workers=0)
    assert added == {"added": 2, "duplicates": 1, "skipped": 0}
    assert index.index_info(out)["count"] == 4
    assert index.add_to_index(out, second, num_workers=0)["added"] == 0
    assert not (out / "chunks").exists()
    with Index.open(out) as opened_index:
        cross = opened_index.search(image=second / "cross_black_0.png", k=1)[0]
        assert cross["path"].endswith("cross_black_0.png") and cross["id"] == 3
        assert opened_index.remove([cross["id"]]) == 1
        assert len(opened_index) == 3
        assert cross["id"] not in [hit["id"] for hit in opened_index.search(image=second / "cross_black_0.png", k=4)]
        with pytest.raises(ValueError, match="no images with ids 99"):
            opened_index.remove([99])
    with Index.open(out) as reopened:  # the change persisted in both the metadata and faiss
        assert len(reopened) == reopened.faiss_index.ntotal == 3
    assert index.add_to_index(out, tmp_path / "second", num_workers=0)["added"] == 1  # re-added with a new id
    assert sorted(index.Index.open(out).rows(range(10))) == [1, 2, 4, 5]


def test_add_past_the_exact_limit_switches_to_ivf(tiny_clip_run, tmp_path):
    small = make_shapes_folder(tmp_path / "small", size=32, repeats=6, seed=1)
    large = make_shapes_folder(tmp_path / "large", size=40, repeats=6, seed=2)  # other bytes: no duplicates
    out = tmp_path / "index"
    built = index.build_index(tiny_clip_run, small, out, num_workers=0, exact_limit=50)
    assert built["index_type"] == "Flat" and built["count"] <= 50
    index.add_to_index(out, large, num_workers=0)
    info = index.index_info(out)
    assert info["count"] > 50 and info["index_type"].startswith("IVF")
    assert info["recall_at_10"] >= 0.95 and info["nprobe"] >= 1
    with Index.open(out) as opened_index:
        assert opened_index.faiss_index.ntotal == info["count"]
        hit = opened_index.search(image=large / "circle_red_0.png", k=1)[0]
        assert hit["path"].endswith("circle_red_0.png") and hit["score"] == pytest.approx(1, abs=2e-3)


# ------------------------------------------------------------------------------------------ faiss sizing


def test_approximate_index_recall_against_exact_search():
    import faiss

    vectors = clustered_vectors(3000, 32, centres=60, seed=0)
    queries = clustered_vectors(200, 32, centres=60, seed=0)[:100]
    ids = np.arange(100, 3100, dtype=np.int64)
    approximate, details = faiss_index.build_faiss(
        vectors, ids, exact_limit=500, memory_budget_mb=64, target_recall=0.95
    )
    assert details["index_type"] == f"IVF{faiss_index.ivf_list_count(3000)},Flat"
    assert details["recall_at_10"] >= 0.95 and details["recall_queries"] == 500
    _, true_rows = faiss.knn(queries, vectors, 10, metric=faiss.METRIC_INNER_PRODUCT)
    _, found = approximate.search(queries, 10)
    assert faiss_index.recall_at_k(found, ids[true_rows], 10) >= 0.9  # held-out queries
    exact, exact_details = faiss_index.build_faiss(
        vectors, ids, exact_limit=5000, memory_budget_mb=64, target_recall=0.95
    )
    _, exact_found = exact.search(queries, 10)
    assert exact_details["index_type"] == "Flat"
    assert faiss_index.recall_at_k(exact_found, ids[true_rows], 10) == 1.0


def test_codec_follows_the_memory_budget():
    assert faiss_index.ivf_codec(512, 100_000, 1024) == "Flat"  # 200 MB of float32
    assert faiss_index.ivf_codec(512, 1_000_000, 1024) == "SQ8"  # 2 GB float32 does not fit, 0.5 GB does
    assert faiss_index.ivf_codec(512, 1_000_000, 100) == "PQ64"
    with pytest.raises(ValueError, match="memory_budget_mb=1 is too small"):
        faiss_index.ivf_codec(512, 1_000_000, 1)
    assert faiss_index.ivf_list_count(1_000_000) == 1024  # about sqrt(N)
    assert faiss_index.ivf_list_count(100_000) == 256
    assert faiss_index.ivf_list_count(100) == 2  # at least 39 training points per list


def test_nprobe_steps_grow_by_at_most_half_and_end_at_every_list():
    steps = faiss_index.nprobe_steps(1024)
    assert steps[:6] == [1, 2, 3, 4, 6, 8] and steps[-1] == 1024
    assert all(later / earlier <= 1.5 for earlier, later in zip(steps[1:], steps[2:]))
    assert faiss_index.nprobe_steps(1) == [1] and faiss_index.nprobe_steps(5) == [1, 2, 3, 4, 5]


def test_build_recall_estimate_matches_held_out_queries():
    # The estimate uses stored vectors as queries; counting each as its own first neighbour (always found)
    # would claim 0.27 here (one probe of 64 lists) where held-out queries get 0.16.
    import faiss

    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((5000, 32)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    stored, held_out = vectors[:4000], vectors[4000:]
    ids = np.arange(4000, dtype=np.int64)
    approximate, details = faiss_index.build_faiss(stored, ids, exact_limit=0, memory_budget_mb=64, target_recall=0.0)
    assert details["nprobe"] == 1
    _, true_rows = faiss.knn(held_out, stored, 10, metric=faiss.METRIC_INNER_PRODUCT)
    _, found = approximate.search(held_out, 10)
    assert details["recall_at_10"] == pytest.approx(faiss_index.recall_at_k(found, true_rows, 10), abs=0.05)


def test_batched_pixel_conversion_equals_to_tensor():
    from PIL import Image

    from clipdalle.transforms import to_tensor

    rng = np.random.default_rng(0)
    pixels = [rng.integers(0, 256, (8, 8, 3), dtype=np.uint8) for _ in range(3)]
    images = store.pixels_to_images(pixels, 8)
    assert images.shape == (3, 3, 8, 8) and images.dtype == torch.float32
    for row, array in zip(images, pixels):
        assert torch.equal(row, to_tensor(Image.fromarray(array)))
    assert store.pixels_to_images([], 8).shape == (0, 3, 8, 8)


def test_recall_at_k_counts_overlap():
    found = np.array([[1, 2, 3], [4, 5, -1]])
    true = np.array([[3, 2, 9], [4, 5, 6]])
    assert faiss_index.recall_at_k(found, true, 3) == pytest.approx((2 / 3 + 2 / 3) / 2)


# ------------------------------------------------------------------------------------------ moderation


def test_best_f1_threshold_picks_the_separating_score():
    scores = np.array([0.9, 0.8, 0.35, 0.3, 0.1])
    positive = np.array([True, True, False, True, False])
    threshold, precision, recall, f1 = moderation.best_f1_threshold(scores, positive)
    assert threshold == pytest.approx(0.3)  # flags all three positives and one negative: F1 = 6/7
    assert (precision, recall) == (pytest.approx(0.75), 1.0) and f1 == pytest.approx(6 / 7)
    assert moderation.best_f1_threshold(scores, np.zeros(5, bool))[0] == float("inf")


def test_moderation_calibrates_thresholds_and_flags(opened, shapes_32, tmp_path):
    concepts = tmp_path / "concepts.txt"
    concepts.write_text("red circle\nblack cross\t0.99\n\n# a comment\n")
    labels = tmp_path / "labels.csv"
    rows = ["image,concept"]
    rows += [f"{shapes_32 / f'circle_red_{n}.png'},red circle" for n in range(4)]  # duplicates match by content
    rows += [f"{shapes_32 / f'{name}_{n}.png'},none" for name in ("square_blue", "triangle_green") for n in range(2)]
    labels.write_text("\n".join(rows) + "\n")
    report = opened.moderate(concepts, calibrate=labels)
    red, cross = report["concepts"]
    assert red["threshold_from"] == "calibrated" and cross["threshold_from"] == "file"
    assert cross["threshold"] == 0.99
    assert 0 < red["recall"] <= 1 and 0 < red["precision"] <= 1 and red["positives"] >= 1
    flagged_for_red = [
        item for item in report["flagged"] if any(c["concept"] == "red circle" for c in item["concepts"])
    ]
    assert len(flagged_for_red) == red["flagged"] >= 1
    assert all(c["score"] >= red["threshold"] for item in flagged_for_red for c in item["concepts"])
    plain = index.moderate(opened, concepts)
    assert plain["concepts"][0]["threshold"] == index.DEFAULT_THRESHOLD
    assert plain["images"] == len(opened)


def test_malformed_concepts_and_labels_name_the_line(opened, tmp_path):
    concepts = tmp_path / "concepts.txt"
    concepts.write_text("red circle\t0.3\nblue\tsquare\n")
    with pytest.raises(ValueError, match=r"concepts.txt:2: threshold 'square' is not a number"):
        opened.moderate(concepts)
    concepts.write_text("red circle\t0.3\n")
    labels = tmp_path / "labels.csv"
    labels.write_text("image,concept\nmissing.png,none\n")
    with pytest.raises(ValueError, match=r"labels.csv:2: image 'missing.png' is not in the index"):
        opened.moderate(concepts, calibrate=labels)
    with pytest.raises(FileNotFoundError, match="concepts file not found"):
        opened.moderate(tmp_path / "nope.txt")


# ------------------------------------------------------------------------------------------ export


def test_export_writes_unit_embeddings_and_matching_metadata(opened, tmp_path):
    result = opened.export(tmp_path / "export")
    embeddings = np.load(result["embeddings"], allow_pickle=False)
    lines = Path(result["metadata"]).read_text().splitlines()
    assert embeddings.dtype == np.float16 and embeddings.shape == (len(opened), opened.info["embed_dim"])
    np.testing.assert_allclose(np.linalg.norm(embeddings.astype(np.float32), axis=1), 1.0, atol=2e-3)
    ids = [json.loads(line)["id"] for line in lines]
    assert ids == sorted(ids) and len(ids) == len(opened)
    stored_ids, stored = opened.embeddings()
    np.testing.assert_array_equal(stored.astype(np.float16), embeddings)
    assert stored_ids.tolist() == ids


def test_ranks_embed_their_shares_and_rank_zero_merges(shapes_32, tiny_clip_run, tmp_path, monkeypatch):
    """Under torchrun each rank writes its own chunks; rank 0 merges all of them (ranks simulated in turn)."""
    names = [f"{shape}_{colour}_0" for shape in ("circle", "square", "triangle", "cross") for colour in ("red", "blue")]
    data = copy_images(shapes_32, tmp_path / "data", names)
    single = index.build_index(tiny_clip_run, data, tmp_path / "single", batch_size=2, num_workers=0)
    monkeypatch.setattr(store, "init_distributed", lambda device: None)
    monkeypatch.setattr(store, "barrier", lambda: None)
    out = tmp_path / "ranks"
    monkeypatch.setattr(store, "distributed_context", lambda: (0, 2, 0))
    with pytest.raises(ValueError, match="rank 1 of 2 has not finished"):
        index.build_index(tiny_clip_run, data, out, batch_size=2, num_workers=0)
    monkeypatch.setattr(store, "distributed_context", lambda: (1, 2, 1))
    assert index.build_index(tiny_clip_run, data, out, batch_size=2, num_workers=0) == {}
    assert sorted(p.name for p in (out / "chunks").glob("r001-*.json")) == ["r001-000000.json"]
    monkeypatch.setattr(store, "distributed_context", lambda: (0, 2, 0))
    merged = index.build_index(tiny_clip_run, data, out, batch_size=2, num_workers=0)
    assert merged["count"] == single["count"] == 8
    keys = {json.loads(line)["key"] for line in open(index.export_index(out, tmp_path / "export")["metadata"])}
    assert keys == set(names)
