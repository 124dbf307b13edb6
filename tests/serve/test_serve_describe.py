"""/api/caption, /api/explain, /api/duplicates and /api/query: good and bad input, OpenAPI response models."""

import shutil

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("faiss")

from fastapi.testclient import TestClient  # noqa: E402

from clipdalle import checkpoint  # noqa: E402
from clipdalle.models.captioner import Captioner, CaptionerConfig  # noqa: E402
from clipdalle.serve import create_app, load_models  # noqa: E402

LABELS = "template: a {colour} {shape}\n[colour]\nred\nblue\n[shape]\ncircle\nsquare\n"


@pytest.fixture(scope="module")
def captioner_run(tiny_runs, tmp_path_factory):
    """An untrained captioner run on the tiny dVAE and DALL·E tokenizer (the API's plumbing, not its quality)."""
    vae, dalle = tiny_runs
    run_dir = tmp_path_factory.mktemp("captioner") / "run"
    vae_model = checkpoint.load_model(vae, expect="dvae")
    config = CaptionerConfig(text_length=16, text_vocab_size=300, image_vocab_size=vae_model.config.vocab_size,
                             grid_size=vae_model.config.grid_size, n_layer=1, n_head=2, n_embd=16)  # fmt: skip
    checkpoint.save_model(run_dir, Captioner(config))
    shutil.copytree(vae, run_dir / "vae")
    shutil.copy(dalle / checkpoint.TOKENIZER_FILE, run_dir / checkpoint.TOKENIZER_FILE)
    return run_dir


@pytest.fixture(scope="module")
def client(built_index, captioner_run):
    models = load_models(index=built_index, captioner=captioner_run)
    yield TestClient(create_app(models), base_url="http://localhost")
    models.close()


def upload(shapes_32, name="circle_red_0"):
    return {"image": (f"{name}.png", (shapes_32 / f"{name}.png").read_bytes(), "image/png")}


def test_caption_by_labels_by_index_templates_and_by_the_captioner(client, shapes_32):
    answer = client.post("/api/caption", files=upload(shapes_32), data={"labels": LABELS}).json()
    assert answer["method"] == "clip" and set(answer["terms"]) == {"colour", "shape"}
    assert answer["caption"] in {f"a {c} {s}" for c in ("red", "blue") for s in ("circle", "square")}
    cut = client.post("/api/caption", files=upload(shapes_32), data={"labels": "template: a {colour} {shape}"})
    assert cut.status_code == 200 and set(cut.json()["terms"]) == {"colour", "shape"}  # the index's captions, cut
    assert len(cut.json()["terms"]["shape"]) == 3
    sampled = client.post("/api/caption", files=upload(shapes_32)).json()
    assert sampled["method"] == "captioner" and sampled["candidates"]
    scores = [candidate["score"] for candidate in sampled["candidates"]]
    assert scores == sorted(scores, reverse=True) and sampled["caption"] == sampled["candidates"][0]["caption"]
    whole = client.post("/api/caption", files=upload(shapes_32), data={"method": "clip"}).json()
    assert set(whole["terms"]) == {"caption"}  # whole caption lines of the index
    bad = client.post("/api/caption", files=upload(shapes_32), data={"labels": "template: {x} in a box"})
    assert bad.status_code == 422 and "no caption line matched" in bad.json()["detail"]


def test_explain_an_upload_and_an_indexed_image(client, shapes_32):
    answer = client.post("/api/explain", files=upload(shapes_32), data={"q": "a red circle"}).json()
    assert answer["method"] == "gradient" and len(answer["grid"]) == 4 and len(answer["grid"][0]) == 4
    assert answer["overlay"].startswith("data:image/png;base64,") and len(answer["peak"]) == 2
    assert max(max(row) for row in answer["grid"]) <= 1
    dense = client.get("/api/explain/1", params={"q": "a red circle - #2", "method": "dense"})
    assert dense.status_code == 200 and dense.json()["text"] == "a red circle - #2"
    assert client.get("/api/explain/999999", params={"q": "x"}).status_code == 404
    refused = client.get("/api/explain/1", params={"q": "./secret.png"})
    assert refused.status_code == 422 and "command line only" in refused.json()["detail"]
    assert client.get("/api/explain/1", params={"q": "x", "method": "magic"}).status_code == 422


def test_duplicates_and_combined_queries(client, shapes_32):
    groups = client.get("/api/duplicates", params={"threshold": -1, "method": "clip"}).json()
    assert groups["groups_total"] == 1 and groups["grouped"] == groups["images"]
    assert set(groups["groups"][0]["images"][0]) == {"id", "caption", "width", "height", "thumbnail", "url"}
    checked = client.get("/api/duplicates", params={"threshold": -1}).json()  # pixels: every pair a candidate
    assert checked["method"] == "pixels" and checked["candidates"] >= checked["images"] - 1
    assert checked["grouped"] < checked["images"]  # circles and crosses are not copies of each other
    for group in checked["groups"]:
        assert group["max_pixel_distance"] <= checked["pixel_threshold"]
    assert client.get("/api/duplicates", params={"threshold": 2}).status_code == 422
    assert client.get("/api/duplicates", params={"method": "hash"}).status_code == 422
    assert client.get("/api/duplicates", params={"pixel_threshold": -0.1}).status_code == 422
    plain = client.get("/api/search", params={"q": "a red circle", "k": 5}).json()
    combined = client.get("/api/query", params={"q": "a red circle", "k": 5}).json()
    assert [item["id"] for item in combined["results"]] == [item["id"] for item in plain["results"]]
    uploaded = client.post("/api/query", data={"q": "@1", "k": 1}, files=[("images", upload(shapes_32)["image"])])
    assert uploaded.json()["results"][0]["score"] > 0.999
    wrong = client.post("/api/query", data={"q": "@2"}, files=[("images", upload(shapes_32)["image"])])
    assert wrong.status_code == 422 and "1 uploaded images" in wrong.json()["detail"]
    assert client.get("/api/query", params={"q": "a + - b"}).status_code == 422
    assert client.get("/api/query", params={"q": "#999999"}).status_code == 422


def test_new_routes_are_in_the_openapi_schema_with_response_models(client):
    paths = client.get("/openapi.json").json()["paths"]
    for path, method in [("/api/caption", "post"), ("/api/explain", "post"), ("/api/explain/{image_id}", "get"),
                         ("/api/duplicates", "get"), ("/api/query", "get"), ("/api/query", "post")]:  # fmt: skip
        schema = paths[path][method]["responses"]["200"]["content"]["application/json"]["schema"]
        assert "$ref" in schema, path
