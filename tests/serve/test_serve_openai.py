"""The OpenAI-compatible images API, driven by the official `openai` client against a real uvicorn server."""

import base64
import io
import time

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

import httpx  # noqa: E402
from helpers import serving  # noqa: E402

from clipdalle.serve import ServeSettings, create_app, load_models  # noqa: E402
from clipdalle.serve.openai_api import ImageStore  # noqa: E402
from clipdalle.transforms import resize_crop  # noqa: E402

API_KEY = "test-key"


@pytest.fixture(scope="module")
def server(tiny_runs, tiny_clip_run):
    models = load_models(clip=tiny_clip_run, dalle=tiny_runs[1])
    with serving(create_app(models, ServeSettings(api_key=API_KEY, rerank=2))) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=API_KEY, max_retries=0, timeout=60)


def png_of(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def picture(data: str | bytes) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(data) if isinstance(data, str) else data))


def test_generate_b64_json(client):
    raw = client.images.with_raw_response.generate(
        prompt="a red circle", n=2, size="256x256", response_format="b64_json", model="dall-e-2",
        extra_body={"quality": "hd", "style": "vivid", "made_up_field": 1},  # unknown fields are ignored
    )  # fmt: skip
    assert raw.headers["x-native-size"] == "16x16"
    result = raw.parse()
    assert abs(result.created - time.time()) < 120 and len(result.data) == 2
    for item in result.data:
        assert item.url is None and picture(item.b64_json).size == (256, 256)
    body = raw.http_response.json()
    assert body["model"] == "dall-e-2" and body["native_size"] == "16x16"


def test_generate_url_then_fetch_it_without_the_key(client, server):
    result = client.images.generate(prompt="a blue square", size="512x512", response_format="url")
    (item,) = result.data
    assert item.b64_json is None and item.url.startswith(f"{server}/v1/images/files/")
    response = httpx.get(item.url)
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    assert picture(response.content).size == (512, 512)
    assert httpx.get(f"{server}/v1/images/files/{'A' * 32}.png").status_code == 404
    assert httpx.get(f"{server}/v1/images/files/..%2F..%2Fetc%2Fpasswd").status_code == 404
    native = client.images.generate(prompt="a blue square", size="auto", response_format="b64_json")
    assert picture(native.data[0].b64_json).size == (16, 16)


def test_edit_with_a_mask_and_with_the_image_alpha(client, shapes_32):
    image = Image.open(shapes_32 / "circle_red_0.png").convert("RGBA")
    mask = Image.new("RGBA", image.size, (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (0, 0, 16, 16))  # transparent top-left quarter: regenerate it
    result = client.images.edit(
        image=("image.png", png_of(image), "image/png"), mask=("mask.png", png_of(mask), "image/png"),
        prompt="a red square", n=2, size="256x256", response_format="b64_json",
    )  # fmt: skip
    assert len(result.data) == 2 and all(picture(d.b64_json).size == (256, 256) for d in result.data)
    result = client.images.edit(
        image=("image.png", png_of(image), "image/png"), mask=("mask.png", png_of(mask), "image/png"),
        prompt="a red square", size="auto", response_format="b64_json",
    )  # fmt: skip
    edited = np.asarray(picture(result.data[0].b64_json).convert("RGB"))  # (16, 16, 3) at the model's size
    original = np.asarray(resize_crop(image.convert("RGB"), 16))
    assert (edited[8:, :] == original[8:, :]).all() and (edited[:, 8:] == original[:, 8:]).all()  # opaque: kept
    holed = image.copy()
    holed.paste((0, 0, 0, 0), (16, 16, 32, 32))
    result = client.images.edit(
        image=("holed.png", png_of(holed), "image/png"), prompt="a red circle", response_format="b64_json"
    )
    assert len(result.data) == 1 and picture(result.data[0].b64_json).size == (1024, 1024)  # OpenAI's default size
    with pytest.raises(openai.BadRequestError) as error:
        client.images.edit(image=("opaque.png", png_of(image.convert("RGB")), "image/png"), prompt="x")
    assert error.value.body["param"] == "mask"
    with pytest.raises(openai.BadRequestError) as error:
        small_mask = ("mask.png", png_of(mask.resize((8, 8))), "image/png")
        client.images.edit(image=("image.png", png_of(image), "image/png"), mask=small_mask, prompt="x")
    assert error.value.body["param"] == "mask" and "must match" in error.value.body["message"]


def test_create_variation(client, shapes_32):
    image = (shapes_32 / "cross_green_0.png").read_bytes()
    result = client.images.create_variation(
        image=("cross.png", image, "image/png"), n=3, size="256x256", response_format="b64_json"
    )
    assert len(result.data) == 3 and all(picture(d.b64_json).size == (256, 256) for d in result.data)


@pytest.mark.parametrize(
    "arguments, param",
    [
        ({"prompt": "x", "n": 11}, "n"),
        ({"prompt": "x", "n": 0}, "n"),
        ({"prompt": "x", "size": "100x100"}, "size"),
        ({"prompt": "x", "size": "1792x1024"}, "size"),
        ({"prompt": "x", "response_format": "gif"}, "response_format"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": "x" * 1001}, "prompt"),
        ({"prompt": "x", "extra_body": {"n": "three"}}, "n"),
        ({"prompt": "x", "extra_body": {"prompt": ["a", "list"]}}, "prompt"),
    ],
)
def test_invalid_generation_requests_raise_bad_request(client, arguments, param):
    with pytest.raises(openai.BadRequestError) as error:
        client.images.generate(**arguments)
    assert error.value.status_code == 400
    assert error.value.body["type"] == "invalid_request_error" and error.value.body["param"] == param


def test_bad_uploads_and_keys(client, server):
    with pytest.raises(openai.BadRequestError) as error:
        client.images.create_variation(image=("x.png", b"definitely not a png", "image/png"))
    assert error.value.body["param"] == "image" and "not an image" in error.value.body["message"]
    with pytest.raises(openai.BadRequestError):
        client.images.create_variation(image=("x.png", b"", "image/png"))
    response = httpx.post(f"{server}/v1/images/variations", headers={"Authorization": f"Bearer {API_KEY}"})
    assert response.status_code == 400 and response.json()["error"]["param"] == "image"
    wrong = openai.OpenAI(base_url=f"{server}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as error:
        wrong.images.generate(prompt="x")
    assert error.value.body["code"] == "invalid_api_key"


def test_image_store_expires_and_stays_bounded():
    now = [1000.0]
    store = ImageStore(seconds=60, capacity=2, clock=lambda: now[0])
    first = store.put(b"1")
    assert store.get(first) == (b"1", 60.0)
    second, third = store.put(b"2"), store.put(b"3")
    assert store.get(first) is None and store.get(second)[0] == b"2"  # the oldest went first
    now[0] += 61
    assert store.get(third) is None
