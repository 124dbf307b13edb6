"""The server's JSON API (/api): every route with good and bad input, limits, the queue, API key, CORS, the CLI."""

import base64
import io
import struct
import threading
import zlib

import pytest
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("faiss")

from fastapi.testclient import TestClient  # noqa: E402
from helpers import BlockingJobs, assert_one_line_error, run  # noqa: E402

from clipdalle import cli  # noqa: E402
from clipdalle.sampling import SAMPLING_SETTINGS  # noqa: E402
from clipdalle.serve import ServeModels, ServeSettings, create_app, load_models  # noqa: E402
from clipdalle.serve.generation_routes import box_in_model_pixels  # noqa: E402
from clipdalle.serve.limits import GenerationQueue, QueueFull  # noqa: E402
from clipdalle.serve.schemas import Sampling  # noqa: E402


def local_client(app) -> TestClient:
    """A test client whose requests name localhost, one of the host names a server answers by default."""
    return TestClient(app, base_url="http://localhost")


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels, with (almost) no pixel data: a decompression bomb."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def png_of(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def decode_data_url(url: str) -> Image.Image:
    prefix = "data:image/png;base64,"
    assert url.startswith(prefix)
    return Image.open(io.BytesIO(base64.b64decode(url[len(prefix) :])))


@pytest.fixture(scope="module")
def models(built_index, tiny_runs):
    loaded = load_models(index=built_index, dalle=tiny_runs[1])
    yield loaded
    loaded.close()


@pytest.fixture(scope="module")
def client(models):
    return local_client(create_app(models))


def test_info_reports_models_and_limits(client):
    info = client.get("/api/info").json()
    assert info["search"] and info["clip"] and info["dalle"]
    assert info["images"] > 0 and info["image_size"] == 16
    assert info["sampling"] == {key: None for key in SAMPLING_SETTINGS}  # runs named one by one: generate()'s defaults
    assert set(Sampling.model_fields) == set(SAMPLING_SETTINGS)  # the schema names every setting a folder may hold
    assert info["limits"] == {
        "max_upload_bytes": 16 << 20,
        "max_n": 16,
        "max_keep": 16,
        "max_k": 100,
        "max_prompt_chars": 1000,
    }
    assert "/api/search" in client.get("/openapi.json").json()["paths"]


def test_search_similar_and_images(client, shapes_32):
    response = client.get("/api/search", params={"q": "a red circle", "k": 5})
    assert response.status_code == 200
    body = response.json()
    assert body["query"] == "a red circle" and len(body["results"]) == 5
    scores = [item["score"] for item in body["results"]]
    assert scores == sorted(scores, reverse=True)
    item = body["results"][0]
    assert set(item) == {"id", "caption", "score", "width", "height", "thumbnail", "url"}
    assert item["width"] == item["height"] == 32 and "\n" not in item["caption"]

    # The known nearest item: an indexed image, uploaded, finds itself first.
    query = (shapes_32 / "square_blue_1.png").read_bytes()
    response = client.post("/api/similar", files={"image": ("query.png", query, "image/png")}, data={"k": "3"})
    assert response.status_code == 200
    body = response.json()
    assert body["query"] == "query.png" and len(body["results"]) == 3
    best = body["results"][0]
    assert best["score"] > 0.999 and best["caption"] == "a blue square"
    original = client.get(best["url"])
    assert original.status_code == 200 and original.headers["content-type"] == "image/png"
    assert original.content == query
    thumbnail = client.get(best["thumbnail"])
    assert thumbnail.status_code == 200 and Image.open(io.BytesIO(thumbnail.content)).size == (32, 32)

    by_id = client.get(f"/api/similar/{best['id']}", params={"k": 2}).json()
    assert by_id["results"][0]["id"] == best["id"] and len(by_id["results"]) == 2
    min_score = client.get("/api/search", params={"q": "a red circle", "k": 50, "min_score": 0.999}).json()
    assert all(item["score"] >= 0.999 for item in min_score["results"])


def test_classify_and_moderate(client, shapes_32):
    image = (shapes_32 / "circle_red_0.png").read_bytes()
    files = {"image": ("circle.png", image, "image/png")}
    response = client.post("/api/classify", files=files, data={"labels": "red circle\nblue square\nred circle"})
    assert response.status_code == 200
    results = response.json()["results"]
    assert [r["label"] for r in results] in (["red circle", "blue square"], ["blue square", "red circle"])
    assert abs(sum(r["probability"] for r in results) - 1.0) < 1e-4
    assert results[0]["probability"] >= results[1]["probability"] and -1 <= results[0]["score"] <= 1
    templated = client.post("/api/classify", files=files, data={"labels": "circle, square", "template": "a red {}"})
    assert templated.status_code == 200 and len(templated.json()["results"]) == 2

    concepts = "a red circle\t-1\na blue square\t1\na cat\n"
    response = client.post("/api/moderate", files=files, data={"concepts": concepts})
    assert response.status_code == 200
    body = response.json()
    assert body["flagged"] is True
    assert [(c["concept"], c["threshold"], c["flagged"]) for c in body["concepts"]] == [
        ("a red circle", -1.0, True),
        ("a blue square", 1.0, False),
        ("a cat", 0.25, body["concepts"][2]["score"] >= 0.25),
    ]


def test_prompt_suggestions_are_the_dalle_runs_training_captions(client):
    response = client.get("/api/prompts", params={"q": "a red c", "k": 5})
    assert response.status_code == 200, response.text
    suggestions = response.json()["suggestions"]
    assert suggestions and all(text.startswith("a red c") for text in suggestions)  # "a red circle", "a red cross"
    assert client.get("/api/prompts", params={"q": "blue"}).json()["suggestions"][0].split().count("blue") == 1
    assert client.get("/api/prompts", params={"q": "a purple hexagon"}).json()["suggestions"] == []
    assert client.get("/api/prompts", params={"k": 51}).status_code == 422


def test_a_pipeline_folder_samples_as_its_evaluation_measured(tiny_clip_run, tiny_runs, tmp_path, monkeypatch):
    from clipdalle.sampling import generate
    from clipdalle.serve.common import data_url, png_bytes

    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "clip").symlink_to(tiny_clip_run, target_is_directory=True)
    (folder / "dalle").symlink_to(tiny_runs[1], target_is_directory=True)
    (folder / "eval.json").write_text('{"settings": {"sampling": {"temperature": 0.5, "shortlist": 2}}}')
    served = load_models(folder)
    assert served.sampling == {"temperature": 0.5, "shortlist": 2}
    info = local_client(create_app(served)).get("/api/info").json()  # and the server says so
    assert {key: value for key, value in info["sampling"].items() if value is not None} == served.sampling
    body = local_client(create_app(served)).post(
        "/api/generate", json={"prompt": "a red circle", "n": 6, "keep": 1, "seed": 3}
    )
    assert body.status_code == 200, body.text
    expected = generate(
        served.dalle, served.vae, served.tokenizer, "a red circle", n=6, keep=1, clip=served.clip, seed=3,
        temperature=0.5, shortlist=2,
    )  # fmt: skip
    image = body.json()["images"][0]
    assert image["seed"] == expected.seeds[0] and image["image"] == data_url(png_bytes(expected.images[0]))
    bundle = (served.dalle, served.vae, served.tokenizer)
    default = generate(*bundle, "a red circle", n=6, keep=1, clip=served.clip, seed=3)
    assert image["image"] != data_url(png_bytes(default.images[0]))  # not generate()'s defaults
    # The OpenAI routes sample the same way; variations, which rank without CLIP, without the shortlist.
    from clipdalle.serve import openai_api

    calls = []
    for name in ("generate", "variations"):
        real = getattr(openai_api, name)
        monkeypatch.setattr(
            openai_api, name, lambda *a, _real=real, _name=name, **k: calls.append((_name, k)) or _real(*a, **k)
        )
    client = local_client(create_app(served))
    response = client.post("/v1/images/generations", json={"prompt": "a red circle", "response_format": "b64_json"})
    assert response.status_code == 200, response.text
    upload = {"image": ("icon.png", png_bytes(expected.images[0]), "image/png")}
    response = client.post("/v1/images/variations", files=upload, data={"response_format": "b64_json"})
    assert response.status_code == 200, response.text
    settings = {name: {key: kwargs.get(key) for key in ("temperature", "shortlist")} for name, kwargs in calls}
    assert settings == {
        "generate": {"temperature": 0.5, "shortlist": 2},
        "variations": {"temperature": 0.5, "shortlist": None},
    }
    assert load_models(dalle=tiny_runs[1]).sampling == {}  # a DALL·E run on its own: generate()'s defaults
    (folder / "eval.json").write_text('{"settings": {"sampling": {"temprature": 0.5}}}')
    with pytest.raises(ValueError, match=r"eval.json: settings: sampling must be an object with keys among"):
        load_models(folder)


def test_generate_and_inpaint(client, shapes_32):
    request = {"prompt": "a red circle", "n": 3, "keep": 2, "seed": 7}
    response = client.post("/api/generate", json=request)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["prompt"] == "a red circle" and body["native_size"] == 16 and len(body["images"]) == 2
    first, second = body["images"]
    assert first["clip_score"] >= second["clip_score"]  # reranked by the index's CLIP
    assert decode_data_url(first["image"]).size == (16, 16) and 7 <= first["seed"] < 10
    again = client.post("/api/generate", json=request).json()
    assert again["images"] == body["images"]  # a seed reproduces its samples
    default_keep = client.post("/api/generate", json={"prompt": "", "n": 2}).json()
    assert len(default_keep["images"]) == 2  # keep defaults to min(4, n); "" samples unconditionally
    assert body["notice"] is None and default_keep["notice"] is None  # a training caption; no prompt at all
    unseen = client.post("/api/generate", json={"prompt": "a purple hexagon", "n": 1}).json()
    assert unseen["notice"] == "not in this model's training set: purple, hexagon; expect a guess"

    # A 64 x 32 upload: the box is in its pixels; the model sees its centre 32 x 32 square resized to 16.
    wide = Image.new("RGB", (64, 32), "white")
    wide.paste(Image.open(shapes_32 / "circle_red_0.png"), (16, 0))
    files = {"image": ("wide.png", png_of(wide), "image/png")}
    data = {"prompt": "a red square", "box": "16,0,32,16", "n": "2", "keep": "1"}
    response = client.post("/api/inpaint", files=files, data=data)
    assert response.status_code == 200, response.text
    images = response.json()["images"]
    assert len(images) == 1 and decode_data_url(images[0]["image"]).size == (16, 16)


def test_box_mapping_follows_the_centre_crop():
    assert box_in_model_pixels([16, 0, 32, 16], 64, 32, 32) == [0, 0, 16, 16]
    assert box_in_model_pixels([0, 0, 64, 64], 64, 64, 32) == [0, 0, 32, 32]
    assert box_in_model_pixels([1, 1, 2, 2], 64, 64, 32) == [0, 0, 1, 1]  # rounded outward
    with pytest.raises(ValueError, match="outside the centre 32 x 32 square"):
        box_in_model_pixels([0, 0, 8, 8], 64, 32, 32)
    with pytest.raises(ValueError, match="not inside the 64 x 32 image"):
        box_in_model_pixels([0, 0, 65, 8], 64, 32, 32)


GARBAGE = b"this is not an image at all" * 10
BOMB = png_header(100_000, 100_000)  # 10^10 pixels claimed
LARGE = png_header(9_000, 9_000)  # 81 M pixels: above decode_image's 64 M cap, below Pillow's own


def upload(data: bytes, **fields: str) -> dict:
    return {"files": {"image": ("x.png", data, "image/png")}, "data": fields}


BAD_REQUESTS = [
    ("get", "/api/search", {}),  # missing q
    ("get", "/api/search?q=", {}),
    ("get", "/api/search?q=%20%20", {}),
    ("get", "/api/search?q=" + "a" * 1001, {}),
    ("get", "/api/search?q=cat&k=0", {}),
    ("get", "/api/search?q=cat&k=101", {}),
    ("get", "/api/search?q=cat&k=many", {}),
    ("get", "/api/search?q=cat&min_score=nan", {}),
    ("get", "/api/similar/999999", {}),
    ("get", "/api/similar/-1", {}),
    ("get", "/api/similar/abc", {}),
    ("get", "/api/images/999999", {}),
    ("get", "/api/images/100000000000000000000000000000", {}),
    ("get", "/api/images/..%2F..%2Fetc%2Fpasswd", {}),
    ("get", "/api/images/%2e%2e%2f%2e%2e%2fetc%2fpasswd", {}),
    ("get", "/api/images/1%00", {}),
    ("get", "/api/images/1?size=huge", {}),
    ("post", "/api/similar", {}),  # missing image
    ("post", "/api/similar", upload(GARBAGE)),
    ("post", "/api/similar", upload(BOMB)),
    ("post", "/api/similar", upload(LARGE)),
    ("post", "/api/similar", upload(b"")),
    ("post", "/api/similar", upload(GARBAGE, k="1000")),
    ("post", "/api/classify", upload(GARBAGE, labels="a,b")),
    ("post", "/api/classify", upload(BOMB, labels="a,b")),
    ("post", "/api/classify", upload(png_of(Image.new("RGB", (8, 8))), labels="only one")),
    ("post", "/api/classify", upload(png_of(Image.new("RGB", (8, 8))), labels="a,b", template="a {0} icon")),
    ("post", "/api/classify", upload(png_of(Image.new("RGB", (8, 8))), labels="a,b", template="no slot")),
    ("post", "/api/classify", upload(png_of(Image.new("RGB", (8, 8))))),  # missing labels
    ("post", "/api/moderate", upload(GARBAGE, concepts="a cat")),
    ("post", "/api/moderate", upload(png_of(Image.new("RGB", (8, 8))), concepts="a cat\tmuch")),
    ("post", "/api/moderate", upload(png_of(Image.new("RGB", (8, 8))), concepts="a cat\t7")),
    ("post", "/api/moderate", upload(png_of(Image.new("RGB", (8, 8))), concepts="\n\n")),
    ("post", "/api/generate", {"json": {}}),
    ("post", "/api/generate", {"json": {"prompt": "x", "n": 17}}),
    ("post", "/api/generate", {"json": {"prompt": "x", "n": 0}}),
    ("post", "/api/generate", {"json": {"prompt": "x", "n": "many"}}),
    ("post", "/api/generate", {"json": {"prompt": "x", "n": 2, "keep": 3}}),
    ("post", "/api/generate", {"json": {"prompt": "x", "seed": -1}}),
    ("post", "/api/generate", {"json": {"prompt": "x", "seed": 2**70}}),
    ("post", "/api/generate", {"json": {"prompt": 5}}),
    ("post", "/api/generate", {"json": {"prompt": "x" * 1001}}),
    ("post", "/api/generate", {"content": b"{not json", "headers": {"content-type": "application/json"}}),
    ("post", "/api/generate", {"json": ["a", "list"]}),
    ("post", "/api/inpaint", upload(GARBAGE, prompt="x", box="0,0,8,8")),
    ("post", "/api/inpaint", upload(png_of(Image.new("RGB", (32, 32))), prompt="x", box="0,0,8")),
    ("post", "/api/inpaint", upload(png_of(Image.new("RGB", (32, 32))), prompt="x", box="0,0,99,8")),
    ("post", "/api/inpaint", upload(png_of(Image.new("RGB", (32, 32))), prompt="x", box="0,0,1,1")),  # < a cell
    ("post", "/api/inpaint", upload(png_of(Image.new("RGB", (32, 32))), prompt="x", box="0,0,8,8", n="99")),
    ("post", "/api/inpaint", upload(png_of(Image.new("RGB", (32, 32))), box="0,0,8,8")),  # missing prompt
    ("post", "/api/info", {}),  # wrong method
]


@pytest.mark.parametrize("method, url, arguments", BAD_REQUESTS)
def test_bad_input_is_a_4xx_with_a_one_line_detail(client, method, url, arguments):
    response = getattr(client, method)(url, **arguments)
    assert 400 <= response.status_code < 500, (response.status_code, response.text)
    detail = response.json()["detail"]
    assert isinstance(detail, str) and detail and "\n" not in detail


def test_bad_images_name_the_problem(client):
    assert "not an image" in client.post("/api/similar", **upload(GARBAGE)).json()["detail"]
    assert "pixel limit" in client.post("/api/similar", **upload(LARGE)).json()["detail"]
    assert "too large" in client.post("/api/similar", **upload(BOMB)).json()["detail"]


def test_uploads_above_the_caps_get_413(models):
    client = local_client(create_app(models, ServeSettings(max_upload_bytes=1000)))
    big = png_of(Image.effect_noise((64, 64), 50))
    assert len(big) > 1000
    response = client.post("/api/similar", **upload(big))
    assert response.status_code == 413 and "limit of 1000 bytes" in response.json()["detail"]
    whole_body = b"x" * (3 << 20)  # above the request cap (2 uploads + 1 MiB): refused before it is read
    response = client.post("/api/similar", files={"image": ("x.png", whole_body, "image/png")})
    assert response.status_code == 413 and "request body is larger" in response.json()["detail"]
    response = client.post("/v1/images/variations", files={"image": ("x.png", whole_body, "image/png")})
    assert response.status_code == 413 and "request body is larger" in response.json()["error"]["message"]


def test_a_full_generation_queue_answers_503(models):
    app = create_app(models, ServeSettings(max_queue=1))
    client = local_client(app)
    release = threading.Event()
    blocker = app.state.queue.submit(release.wait)  # the worker is busy and the queue holds its one request
    try:
        response = client.post("/api/generate", json={"prompt": "a red circle", "n": 1})
        assert response.status_code == 503 and int(response.headers["retry-after"]) >= 1
        assert "queue is full" in response.json()["detail"]
        response = client.post("/v1/images/generations", json={"prompt": "a red circle"})
        assert response.status_code == 503 and response.json()["error"]["code"] == "queue_full"
    finally:
        release.set()
    blocker.result(timeout=10)
    assert client.post("/api/generate", json={"prompt": "a red circle", "n": 1}).status_code == 200


def test_the_queue_runs_one_job_at_a_time_in_order():
    queue, jobs = GenerationQueue(capacity=3), BlockingJobs()
    futures = [queue.submit(jobs.job(number * 10, timeout=5)) for number in range(3)]
    with pytest.raises(QueueFull, match="queue is full"):
        queue.submit(jobs.job(30))
    jobs.release.set()
    assert [future.result(timeout=5) for future in futures] == [0, 10, 20]
    assert jobs.finished == [0, 10, 20] and jobs.peak == 1
    assert queue.submit(jobs.job(40)).result(timeout=5) == 40  # room again once the jobs finished
    queue.close()


def test_api_key_is_required_everywhere_but_the_page(models):
    client = local_client(create_app(models, ServeSettings(api_key="sekrit")))
    response = client.get("/api/info")
    assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer"
    assert "Authorization: Bearer" in response.json()["detail"]
    assert client.get("/api/info", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert client.get("/api/search?q=cat", headers={"Authorization": "Basic c2Vrcml0"}).status_code == 401
    good = {"Authorization": "Bearer sekrit"}
    assert client.get("/api/info", headers=good).status_code == 200
    results = client.get("/api/search", params={"q": "a red circle", "k": 1}, headers=good).json()["results"]
    response = client.post("/v1/images/generations", json={"prompt": "x"})
    assert response.status_code == 401 and response.json()["error"]["code"] == "missing_api_key"
    assert client.get(results[0]["thumbnail"]).status_code == 401
    assert client.get(results[0]["thumbnail"], headers=good).status_code == 200
    assert client.get("/docs").status_code == 200 and client.get("/").status_code in (200, 404)


def test_cors_allows_exactly_the_given_origins(models):
    client = local_client(create_app(models, ServeSettings(cors_origins=["http://app.example"])))
    allowed = client.get("/api/info", headers={"Origin": "http://app.example"})
    assert allowed.headers["access-control-allow-origin"] == "http://app.example"
    other = client.get("/api/info", headers={"Origin": "http://evil.example"})
    assert "access-control-allow-origin" not in other.headers
    preflight = client.options(
        "/api/search",
        headers={"Origin": "http://app.example", "Access-Control-Request-Method": "GET"},
    )
    assert preflight.status_code == 200 and "GET" in preflight.headers["access-control-allow-methods"]
    assert (
        "access-control-allow-origin"
        not in local_client(create_app(models)).get("/api/info", headers={"Origin": "http://app.example"}).headers
    )


def test_missing_models_are_clear_errors(models):
    search_only = local_client(create_app(ServeModels(index=models.index)))
    assert search_only.get("/api/info").json()["dalle"] is False
    response = search_only.post("/api/generate", json={"prompt": "x"})
    assert response.status_code == 503 and "--dalle" in response.json()["detail"]
    response = search_only.post("/v1/images/generations", json={"prompt": "x"})
    assert response.status_code == 404 and response.json()["error"]["code"] == "model_not_found"
    dalle_only = ServeModels(dalle=models.dalle, vae=models.vae, tokenizer=models.tokenizer)
    generate_only = local_client(create_app(dalle_only))
    response = generate_only.get("/api/search", params={"q": "cat"})
    assert response.status_code == 503 and "--index" in response.json()["detail"]
    response = generate_only.post("/api/classify", **upload(GARBAGE, labels="a,b"))
    assert response.status_code == 503 and "CLIP" in response.json()["detail"]
    with pytest.raises(ValueError, match="needs its dVAE"):
        ServeModels(dalle=models.dalle)


def test_cli_serve_loads_a_pipeline_directory(capsys, monkeypatch, built_index, tiny_runs, tmp_path):
    import uvicorn

    served = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **options: served.update(app=app, **options))
    pipeline = tmp_path / "pipeline"
    pipeline.mkdir()
    (pipeline / "index").symlink_to(built_index, target_is_directory=True)
    (pipeline / "dalle").symlink_to(tiny_runs[1], target_is_directory=True)
    code, _, err = run(capsys, "serve", str(pipeline), "--port", "8123", "--api-key", "k", "--rerank", "2")
    assert code == 0, err
    assert served["port"] == 8123 and served["host"] == "127.0.0.1" and "http://127.0.0.1:8123" in err
    client = local_client(served["app"])
    info = client.get("/api/info", headers={"Authorization": "Bearer k"}).json()
    assert info["search"] and info["clip"] and info["dalle"] and served["app"].state.settings.rerank == 2

    code, _, err = run(capsys, "serve")
    assert_one_line_error(code, err, "give a pipeline directory")
    code, _, err = run(capsys, "serve", str(tmp_path / "missing"))
    assert_one_line_error(code, err, "no such pipeline directory")
    code, _, err = run(capsys, "serve", "--dalle", str(built_index))
    assert_one_line_error(code, err, str(built_index))
    assert cli.main(["serve", str(pipeline), "--rerank", "0"]) == 1


def test_serve_runs_the_clip_on_onnxruntime_with_the_same_answers(tiny_clip_run, shapes_32, monkeypatch, tmp_path):
    pytest.importorskip("onnxruntime")
    monkeypatch.setenv("CLIPDALLE_CACHE", str(tmp_path / "cache"))  # the one-time export goes here
    image = (shapes_32 / "circle_red_0.png").read_bytes()
    answers = {}
    for backend in ("torch", "onnx"):
        served = load_models(clip=tiny_clip_run, backend=backend)
        with TestClient(create_app(served), base_url="http://localhost") as client:
            response = client.post(
                "/api/classify",
                files={"image": ("c.png", image, "image/png")},
                data={"labels": "red circle, blue cross"},
            )
        assert response.status_code == 200, response.text
        answers[backend] = {row["label"]: row["probability"] for row in response.json()["results"]}
    assert type(load_models(clip=tiny_clip_run, backend="onnx").clip[0]).__name__ == "OnnxCLIP"
    for label, probability in answers["torch"].items():
        assert abs(answers["onnx"][label] - probability) < 1e-4
