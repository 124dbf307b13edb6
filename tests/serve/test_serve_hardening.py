"""What the server answers and to whom: Host names, the key before the body, bounded image work, decoded cost,
thumbnails on disk, stored-url bytes, shard images, cancelled generations, stalled bodies, offline docs."""

import asyncio
import hashlib
import io
import json
import os
import socket
import struct
import tarfile
import threading
import time
import zlib

import pytest
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("faiss")
uvicorn = pytest.importorskip("uvicorn")

from fastapi.testclient import TestClient  # noqa: E402
from helpers import BlockingJobs, make_shapes_folder, run, serving  # noqa: E402

from clipdalle import checkpoint, convert, index, pretrained, sampling  # noqa: E402
from clipdalle.serve import ServeSettings, create_app, generation_routes, load_models, search_routes  # noqa: E402
from clipdalle.serve.limits import Busy, ClientGone, GenerationQueue, WorkLimiter  # noqa: E402
from clipdalle.serve.openai_api import ImageStore  # noqa: E402

KEY = "sekrit"


def png_of(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def png_header(width: int, height: int, colour_type: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def models(built_index, tiny_runs):
    loaded = load_models(index=built_index, dalle=tiny_runs[1])
    yield loaded
    loaded.close()


def client_of(models, host: str = "localhost", **settings) -> TestClient:
    return TestClient(create_app(models, ServeSettings(**settings)), base_url=f"http://{host}")


# ------------------------------------------------------------------------------------------ who may ask


def test_only_the_host_names_the_server_was_started_for_are_answered(models):
    for host in ("localhost", "localhost:8000", "127.0.0.1:8000", "[::1]:8000", "LOCALHOST."):
        assert client_of(models, host).get("/api/info").status_code == 200, host
    rebound = client_of(models, "attacker.example:8000")
    for path in ("/api/info", "/api/search?q=cat", "/api/images/1", "/"):
        response = rebound.get(path)
        assert response.status_code == 400, path
        assert "host name 'attacker.example:8000'" in response.json()["detail"] and "--allowed-host" in str(
            response.json()
        )
    error = rebound.post("/v1/images/generations", json={"prompt": "x"}).json()["error"]
    assert error["code"] == "host_not_allowed" and error["type"] == "invalid_request_error"
    allowed = client_of(models, "photos.lan", allowed_hosts=["localhost", "photos.lan"])
    assert allowed.get("/api/info").status_code == 200
    assert client_of(models, "anything.example", allowed_hosts=["*"]).get("/api/info").status_code == 200


def call_asgi(app, method: str, path: str, headers: list[tuple[bytes, bytes]], body: bytes) -> tuple[int, dict, int]:
    """(status, JSON body, times the app asked for the request body)."""
    asked, sent = [0], []

    async def receive():
        asked[0] += 1
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message):
        sent.append(message)

    scope = {
        "type": "http", "method": method, "path": path, "raw_path": path.encode(), "query_string": b"",
        "headers": [(b"host", b"localhost"), *headers], "http_version": "1.1", "scheme": "http",
        "server": ("127.0.0.1", 8000), "client": ("127.0.0.1", 5000), "root_path": "", "asgi": {"version": "3.0"},
    }  # fmt: skip
    asyncio.run(app(scope, receive, send))
    body_parts = b"".join(message.get("body", b"") for message in sent if message["type"] == "http.response.body")
    return sent[0]["status"], json.loads(body_parts), asked[0]


def test_the_key_is_checked_before_the_body_is_read(models):
    app = create_app(models, ServeSettings(api_key=KEY))
    big_upload = [(b"content-type", b"multipart/form-data; boundary=x"), (b"content-length", b"3000000")]
    status, body, asked = call_asgi(app, "POST", "/api/similar", big_upload, b"--x\r\n" + b"a" * 3_000_000)
    assert (status, asked) == (401, 0) and "Authorization: Bearer" in body["detail"]
    bad_json = [(b"content-type", b"application/json")]
    status, body, asked = call_asgi(app, "POST", "/api/generate", bad_json, b"{not json")
    assert (status, asked) == (401, 0)  # not 422: nothing of the request is looked at before the key
    status, body, asked = call_asgi(app, "POST", "/v1/images/edits", [(b"authorization", b"Bearer nope")], b"")
    assert (status, asked) == (401, 0) and body["error"]["code"] == "invalid_api_key"
    keyed = [(b"authorization", f"Bearer {KEY}".encode()), *bad_json]
    status, body, asked = call_asgi(app, "POST", "/api/generate", keyed, b"{not json")
    assert status == 422 and asked >= 1


# ------------------------------------------------------------------------------------------ bounded work


def test_image_work_beyond_its_bound_gets_503_with_retry_after(models):
    client = client_of(models, image_workers=1, max_waiting_work=0)
    work = client.app.state.work
    assert client.get("/api/search", params={"q": "a red circle"}).status_code == 200
    with work.lock:
        work.admitted = 1  # one job running, none may wait
    try:
        response = client.get("/api/search", params={"q": "a red circle"})
        assert response.status_code == 503 and int(response.headers["retry-after"]) >= 1
        assert "busy" in response.json()["detail"]
        image = png_of(Image.new("RGB", (8, 8)))
        response = client.post("/v1/images/variations", files={"image": ("x.png", image, "image/png")})
        assert response.status_code == 503 and response.json()["error"]["code"] == "busy"
    finally:
        with work.lock:
            work.admitted = 0
    assert client.get("/api/search", params={"q": "a red circle"}).status_code == 200


def test_the_limiter_runs_slots_jobs_at_once_and_bounds_the_waiting():
    limiter, jobs = WorkLimiter(slots=2, waiting=1), BlockingJobs()

    async def main():
        tasks = [asyncio.ensure_future(limiter.run(jobs.job("done"))) for _ in range(3)]
        await asyncio.sleep(0.2)
        with pytest.raises(Busy, match="busy"):
            await limiter.run(jobs.job("refused"))
        jobs.release.set()
        return await asyncio.gather(*tasks)

    assert asyncio.run(main()) == ["done"] * 3 and jobs.peak == 2 and limiter.admitted == 0


def test_an_upload_is_refused_by_what_decoding_it_costs(models):
    client = client_of(models, max_pixels=16_000_000)
    rgba = png_header(4000, 3999, colour_type=6)  # 16 M pixels, but 21 M RGB pixels of work as RGBA
    response = client.post("/api/similar", files={"image": ("bomb.png", rgba, "image/png")})
    assert response.status_code == 400 and "4000 x 3999 RGBA" in response.json()["detail"]


def test_thumbnails_are_made_once_and_kept_on_disk(models, tmp_path, monkeypatch):
    client = client_of(models, thumbnail_dir=str(tmp_path / "thumbs"))
    first = client.get("/api/images/1?size=thumb")
    assert first.status_code == 200
    (cached,) = (tmp_path / "thumbs").iterdir()
    assert cached.read_bytes() == first.content and cached.name.startswith("1-")

    def no_decoding(*args, **kwargs):
        raise AssertionError("the thumbnail was decoded again")

    monkeypatch.setattr(search_routes, "decode_upload", no_decoding)
    again = client_of(models, thumbnail_dir=str(tmp_path / "thumbs"))  # a new server: an empty memory cache
    assert again.get("/api/images/1?size=thumb").content == first.content


def test_stored_url_images_are_bounded_in_bytes():
    store = ImageStore(seconds=60, capacity=100, max_bytes=250)
    tokens = [store.put(bytes(100)) for _ in range(3)]
    assert store.get(tokens[0]) is None and store.get(tokens[1]) and store.get(tokens[2])
    assert store.bytes == 200
    huge = store.put(bytes(1000))  # larger than the cap alone: kept (the newest stays), the others go
    assert store.get(huge) and len(store.images) == 1 and store.bytes == 1000


# ------------------------------------------------------------------------------------------ shard images


def test_images_inside_gzipped_shards_with_upper_case_names_are_served(tiny_clip_run, tmp_path, monkeypatch):
    shapes = make_shapes_folder(tmp_path / "shapes", size=32, repeats=1)
    (tmp_path / "build").mkdir()
    with tarfile.open(tmp_path / "build" / "part-0.tar.gz", "w:gz") as archive:
        for number, name in enumerate(["circle_red_0", "square_blue_0", "cross_green_0"]):
            for member, suffix in ((f"k{number}.PNG", ".png"), (f"k{number}.txt", ".txt")):
                archive.add(shapes / f"{name}{suffix}", arcname=member)
    monkeypatch.chdir(tmp_path / "build")  # the build is given a relative shard path
    info = index.build_index(tiny_clip_run, "part-0.tar.gz", tmp_path / "index", num_workers=0)
    assert info["count"] == 3
    monkeypatch.chdir(tmp_path)  # the server runs elsewhere
    served = load_models(index=tmp_path / "index")
    try:
        client = TestClient(create_app(served), base_url="http://localhost")
        for image_id in (1, 2, 3):
            original = client.get(f"/api/images/{image_id}")
            assert original.status_code == 200 and original.headers["content-type"] == "image/png"
            assert client.get(f"/api/images/{image_id}?size=thumb").status_code == 200
        path = served.index.rows([1])[1]["path"]
        assert os.path.isabs(path) and path.endswith(".tar.gz:k0.PNG")
        # An index built before: the shard path relative to the build's folder, the extension lower-cased.
        legacy = "part-0.tar.gz:k0.png"
        data = [str(tmp_path / "build" / "part-0.tar.gz")]
        assert index.read_image(legacy, data) == index.read_image(path)
        with pytest.raises(FileNotFoundError):
            index.read_image("part-0.tar.gz:k9.png", data)
    finally:
        served.close()


def test_an_index_records_the_hash_of_the_weights_it_loads(capsys, tiny_clip_run, tmp_path, monkeypatch):
    code, _, err = run(capsys, "convert", str(tiny_clip_run), "--to", "hf", "--out", str(tmp_path / "hf"))
    assert code == 0, err
    (tmp_path / "hf" / "a_stray_copy.safetensors").write_bytes(b"not the weights")  # sorts first
    read = []
    original = convert.read_state_dict
    monkeypatch.setattr(convert, "read_state_dict", lambda path, **kw: read.append(path) or original(path, **kw))
    pretrained.load(tmp_path / "hf", tokenizer=tiny_clip_run / "tokenizer.json")
    assert [os.path.basename(path) for path in read] == ["model.safetensors"]
    assert convert.weights_files(tmp_path / "hf") == [tmp_path / "hf" / "model.safetensors"]
    expected = hashlib.sha256((tmp_path / "hf" / "model.safetensors").read_bytes()).hexdigest()
    assert index.model_sha256(tmp_path / "hf") == expected
    run_hash = hashlib.sha256(checkpoint.weights_path(tiny_clip_run).read_bytes()).hexdigest()  # RUN/best/ first
    assert pretrained.weights_sha256(tiny_clip_run) == index.model_sha256(tiny_clip_run) == run_hash


# ------------------------------------------------------------------------------------------ cancelled generations


def test_sampling_stops_between_steps_when_asked(tiny_runs):
    from clipdalle.checkpoint import load_dalle

    model, vae, tokenizer = load_dalle(tiny_runs[1])
    asked = []

    def should_stop():
        asked.append(1)
        return len(asked) > 3

    with pytest.raises(sampling.GenerationStopped):
        sampling.generate(model, vae, tokenizer, ["a red circle"], n=4, seed=0, should_stop=should_stop)
    assert len(asked) == 4  # stopped at the fourth step of 16, not at the end
    plain = sampling.generate(model, vae, tokenizer, ["a red circle"], n=2, seed=0)
    watched = sampling.generate(model, vae, tokenizer, ["a red circle"], n=2, seed=0, should_stop=lambda: False)
    assert plain.codes.equal(watched.codes)


def test_a_queued_job_whose_client_left_never_runs():
    queue = GenerationQueue(capacity=4)
    release, ran = threading.Event(), []
    blocker = queue.submit(release.wait)  # the worker is busy

    async def gone():
        return True

    async def main():
        stop = threading.Event()
        with pytest.raises(ClientGone):
            await queue.run(lambda: ran.append("job"), client_gone=gone, stop=stop)
        return stop.is_set()

    assert asyncio.run(main())
    release.set()
    blocker.result(timeout=5)
    assert queue.submit(lambda: "next").result(timeout=5) == "next" and ran == []
    queue.close()


@pytest.fixture
def live_server(models):
    """A uvicorn on 127.0.0.1 serving `models` (body timeout 1 s): yields its port."""
    with serving(create_app(models, ServeSettings(body_timeout_seconds=1.0))) as url:
        yield int(url.rsplit(":", 1)[1])


def raw_request(port: int, head: str, body: bytes = b"") -> socket.socket:
    connection = socket.create_connection(("127.0.0.1", port), timeout=10)
    connection.sendall(head.replace("\n", "\r\n").encode() + b"\r\n\r\n" + body)
    return connection


def read_reply(connection: socket.socket) -> str:
    """The whole reply: headers and as many body bytes as Content-Length says (they may come in several packets)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = connection.recv(4096)
        if not chunk:
            return data.decode()
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lengths = [line.split(b":", 1)[1] for line in head.lower().split(b"\r\n") if line.startswith(b"content-length:")]
    while lengths and len(body) < int(lengths[0]):
        chunk = connection.recv(4096)
        if not chunk:
            break
        body += chunk
    return (head + b"\r\n\r\n" + body).decode()


def test_a_generation_whose_client_disconnects_is_stopped(live_server, monkeypatch):
    port = live_server
    seen = {}

    def slow_generate(*args, should_stop, **kwargs):
        seen["started"] = time.monotonic()
        while not should_stop():
            if time.monotonic() - seen["started"] > 20:
                raise AssertionError("never told to stop")
            time.sleep(0.01)
        seen["stopped"] = time.monotonic()
        raise sampling.GenerationStopped()

    monkeypatch.setattr(generation_routes, "generate", slow_generate)
    body = json.dumps({"prompt": "a red circle", "n": 2}).encode()
    head = f"POST /api/generate HTTP/1.1\nHost: localhost\nContent-Type: application/json\nContent-Length: {len(body)}"
    connection = raw_request(port, head, body)
    deadline = time.monotonic() + 10
    while "started" not in seen and time.monotonic() < deadline:
        time.sleep(0.01)
    connection.close()  # the user closed the tab
    while "stopped" not in seen and time.monotonic() < deadline + 5:
        time.sleep(0.01)
    assert seen["stopped"] - seen["started"] < 5


def test_a_stalled_body_gets_408(live_server):
    port = live_server
    head = "POST /api/generate HTTP/1.1\nHost: localhost\nContent-Type: application/json\nContent-Length: 100"
    connection = raw_request(port, head, b'{"prompt": ')  # and then nothing
    reply = read_reply(connection)
    connection.close()
    assert reply.startswith("HTTP/1.1 408") and "stalled" in reply


# ------------------------------------------------------------------------------------------ docs and the CLI


def test_docs_need_no_cdn(models):
    client = client_of(models)
    page = client.get("/docs")
    assert page.status_code == 200 and "/docs-assets/swagger-ui-bundle.js" in page.text
    assert "cdn" not in page.text.lower() and "https://" not in page.text
    assert client.get("/docs-assets/swagger-ui-bundle.js").status_code == 200
    assert client.get("/docs-assets/swagger-ui.css").status_code == 200


def test_cli_serve_passes_host_names_and_limits(capsys, monkeypatch, built_index):
    served = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **options: served.update(app=app, **options))
    argv = ["serve", "--index", str(built_index), "--host", "photos.lan", "--allowed-host", "photos.example"]
    code, _, err = run(capsys, *argv)
    assert code == 0, err
    settings = served["app"].state.settings
    assert settings.allowed_hosts == ["localhost", "127.0.0.1", "::1", "photos.lan", "photos.example"]
    assert served["limit_concurrency"] == settings.max_connections and served["timeout_keep_alive"] == 5
    code, _, err = run(capsys, "serve", "--index", str(built_index), "--host", "0.0.0.0", "--api-key", "k")
    assert code == 0 and "--allowed-host" in err
    assert served["app"].state.settings.allowed_hosts == ["localhost", "127.0.0.1", "::1"]
