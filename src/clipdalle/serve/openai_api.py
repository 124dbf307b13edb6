"""OpenAI-compatible images API, so existing clients work by changing their base URL:

    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="KEY or anything without --api-key")
    client.images.generate(prompt="a red circle", n=2, size="256x256", response_format="b64_json")

POST /v1/images/generations, /v1/images/edits (image + mask PNG whose transparent area is regenerated) and
/v1/images/variations, as OpenAI documents them for DALL·E 2: `n` 1-10, `size` 256x256 | 512x512 | 1024x1024
(plus "auto": the model's own size), `response_format` url | b64_json, `model` accepted and echoed. The model's
output is resized to `size`; its native size is in the `native_size` field and the X-Native-Size header. With a
CLIP loaded, each generated image is the best of `rerank` candidates (edits: the best n of n x rerank). Unknown
fields are ignored as OpenAI does; invalid ones get OpenAI's error JSON with status 400. `url` images are kept
in memory (at most `max_stored_images` and `max_stored_bytes`) and served without the API key (the url is the
secret) for `url_seconds`. A generation whose client leaves is cancelled.
"""

from __future__ import annotations

import io
import re
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter, Depends, File, Form, Request, UploadFile
from fastapi.responses import JSONResponse, Response
from PIL import Image, ImageOps
from pydantic import BaseModel, ConfigDict, Field

from ..sampling import generate, inpaint, mask_from_image, variations
from ..transforms import load_image
from .common import ApiError, api_key_check, png_bytes
from .context import ServeContext
from .schemas import ERROR_STATUSES, error_responses

SIZES = {"256x256": 256, "512x512": 512, "1024x1024": 1024}  # DALL·E 2's sizes; "auto" = the model's own
DEFAULT_SIZE = "1024x1024"  # OpenAI's default
DEFAULT_FORMAT = "url"  # OpenAI's default for DALL·E 2
MAX_IMAGES = 10  # OpenAI's limit on n
DEFAULT_MODEL = "clipdalle"
TOKEN_PATTERN = re.compile(r"[A-Za-z0-9_-]{20,64}")


class GenerationRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI ignores fields it does not know; so do we

    prompt: str = Field(description="what to draw")
    n: int | None = Field(1, description="images, 1 to 10")
    size: str | None = Field(DEFAULT_SIZE, description="256x256, 512x512, 1024x1024 or auto (the model's size)")
    response_format: str | None = Field(DEFAULT_FORMAT, description="url or b64_json")
    model: str | None = Field(None, description="accepted and echoed back")
    stream: bool | None = Field(None, description="not supported: images come whole")


class ImageData(BaseModel):
    url: str | None = None
    b64_json: str | None = None


class ImagesResponse(BaseModel):
    created: int
    data: list[ImageData]
    model: str
    native_size: str = Field(description="the model's own output size, before resizing to `size`")


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    error: ErrorInfo


OPENAI_ERRORS = {status: text for status, text in ERROR_STATUSES.items() if status != 422}  # invalid fields: 400


class ImageStore:
    """PNG bytes behind unguessable tokens, each for `seconds`; at most `capacity` images and `max_bytes` bytes at
    once (oldest out first; the newest image always stays)."""

    def __init__(
        self, seconds: int, capacity: int, max_bytes: int = 256 << 20, clock: Callable[[], float] = time.monotonic
    ):
        self.seconds = seconds
        self.capacity = capacity
        self.max_bytes = max_bytes
        self.clock = clock  # seconds, monotonic
        self.images: OrderedDict[str, tuple[bytes, float]] = OrderedDict()  # token -> (png, expiry time)
        self.bytes = 0  # of the images held
        self.lock = threading.Lock()

    def put(self, png: bytes) -> str:
        token = secrets.token_urlsafe(24)
        with self.lock:
            self._expire()
            self.images[token] = (png, self.clock() + self.seconds)
            self.bytes += len(png)
            while len(self.images) > 1 and (len(self.images) > self.capacity or self.bytes > self.max_bytes):
                self._drop_oldest()
        return token

    def get(self, token: str) -> tuple[bytes, float] | None:
        """(png, seconds left) or None when unknown or expired."""
        with self.lock:
            self._expire()
            found = self.images.get(token)
        return None if found is None else (found[0], found[1] - self.clock())

    def _expire(self) -> None:
        now = self.clock()
        while self.images and next(iter(self.images.values()))[1] <= now:
            self._drop_oldest()

    def _drop_oldest(self) -> None:
        _, (png, _) = self.images.popitem(last=False)
        self.bytes -= len(png)


def check_options(n: int | None, size: str | None, response_format: str | None) -> tuple[int, str, str]:
    """(n, size, response_format) with OpenAI's defaults; a 400 naming the field otherwise."""
    n = 1 if n is None else n
    if not 1 <= n <= MAX_IMAGES:
        code = "integer_above_max_value" if n > MAX_IMAGES else "integer_below_min_value"
        raise ApiError(400, f"n: {n} is not between 1 and {MAX_IMAGES}", param="n", code=code)
    size = DEFAULT_SIZE if size is None else size
    if size not in SIZES and size != "auto":
        raise ApiError(
            400, f"size: {size!r} is not one of {', '.join(SIZES)}, auto", param="size", code="invalid_value"
        )
    response_format = DEFAULT_FORMAT if response_format is None else response_format
    if response_format not in ("url", "b64_json"):
        raise ApiError(
            400, f"response_format: {response_format!r} is not url or b64_json", param="response_format",
            code="invalid_value",
        )  # fmt: skip
    return n, size, response_format


def alpha_of(data: bytes) -> Image.Image | None:
    """The alpha channel ("L", oriented like `decode_image` output) of already-validated image bytes, or None."""
    picture = ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
    if "A" not in picture.getbands() and "transparency" not in picture.info:
        return None
    return picture.convert("RGBA").getchannel("A")


def transparent_as_white(alpha: Image.Image) -> Image.Image:
    """Mask picture for `mask_from_image`: white where the alpha says transparent (to regenerate), black elsewhere."""
    return alpha.point(lambda value: 255 if value < 128 else 0)


def openai_router(context: ServeContext) -> APIRouter:
    errors = error_responses(ErrorResponse, OPENAI_ERRORS)
    router = APIRouter(prefix="/v1", tags=["OpenAI-compatible"], responses=errors)
    models, settings, queue = context.models, context.settings, context.queue
    authorised = [Depends(api_key_check(settings.api_key))]
    store = ImageStore(settings.url_seconds, settings.max_stored_images, settings.max_stored_bytes)

    def need_dalle(model: str | None) -> None:
        if models.dalle is None:
            raise ApiError(
                404,
                f"the model {model or DEFAULT_MODEL!r} is not available: this server has no DALL·E model loaded "
                "(start it with --dalle RUN)",
                code="model_not_found",
            )

    def check_prompt(prompt: str) -> str:
        if not prompt.strip():
            raise ApiError(400, "prompt: is empty; describe the image to draw", param="prompt", code="invalid_value")
        if len(prompt) > settings.max_prompt_chars:
            raise ApiError(
                400, f"prompt: {len(prompt)} characters is more than the limit of {settings.max_prompt_chars}",
                param="prompt", code="string_above_max_length",
            )  # fmt: skip
        return prompt

    def respond(request: Request, images: Any, size: str, response_format: str, model: str | None) -> JSONResponse:
        side = models.image_size if size == "auto" else SIZES[size]
        data = []
        for image in images:
            png = png_bytes(image, side)
            if response_format == "b64_json":
                import base64

                data.append({"b64_json": base64.b64encode(png).decode("ascii")})
            else:
                url = str(request.base_url).rstrip("/") + f"/v1/images/files/{store.put(png)}.png"
                data.append({"url": url})
        native = f"{models.image_size}x{models.image_size}"
        body = {"created": int(time.time()), "data": data, "model": model or DEFAULT_MODEL, "native_size": native}
        return JSONResponse(body, headers={"X-Native-Size": native})

    async def one_image(image: UploadFile | None, images: list[UploadFile] | None) -> bytes:
        uploads = ([image] if image is not None else []) + list(images or [])
        if not uploads:
            raise ApiError(400, "image: this field is required (a PNG file)", param="image", code="missing_required")
        if len(uploads) > 1:
            raise ApiError(400, f"image: got {len(uploads)} images, this model edits one", param="image")
        data, _ = await context.upload(uploads[0], "image")
        return data

    @router.post("/images/generations", dependencies=authorised, response_model=ImagesResponse)
    async def generations(request: Request, body: GenerationRequest) -> JSONResponse:
        n, size, response_format = check_options(body.n, body.size, body.response_format)
        prompt = check_prompt(body.prompt)
        if body.stream:
            raise ApiError(400, "stream: streaming is not supported; images come whole", param="stream")
        need_dalle(body.model)
        candidates = settings.rerank if models.clip is not None else 1
        stop = threading.Event()

        def job() -> Any:
            # Each image is the best of `candidates` samples of its own: n prompts, `candidates` samples each.
            return generate(
                models.dalle, models.vae, models.tokenizer, [prompt] * n, n=candidates, keep=1, clip=models.clip,
                should_stop=stop.is_set, **models.sampling_settings(models.clip),
            ).images  # fmt: skip

        images = await queue.run(job, client_gone=request.is_disconnected, stop=stop)
        return await context.work.run(lambda: respond(request, images, size, response_format, body.model))

    @router.post("/images/edits", dependencies=authorised, response_model=ImagesResponse)
    async def edits(
        request: Request,
        image: Annotated[UploadFile | None, File(description="the image to edit (PNG)")] = None,
        images: Annotated[list[UploadFile] | None, File(alias="image[]", include_in_schema=False)] = None,
        mask: Annotated[
            UploadFile | None,
            File(description="PNG whose transparent area is regenerated (default: the image's)"),
        ] = None,
        prompt: str = Form(..., description="what the whole edited image should show"),
        n: int | None = Form(1),
        size: str | None = Form(DEFAULT_SIZE),
        response_format: str | None = Form(DEFAULT_FORMAT),
        model: str | None = Form(None),
    ) -> JSONResponse:
        n, size, response_format = check_options(n, size, response_format)
        prompt = check_prompt(prompt)
        need_dalle(model)
        image_data = await one_image(image, images)
        mask_data = None if mask is None else (await context.upload(mask, "mask"))[0]
        side = models.image_size

        def prepare() -> tuple[Any, Any]:
            picture = context.decode(image_data, "image", param="image")
            if mask_data is None:
                alpha = alpha_of(image_data)
                if alpha is None:
                    raise ApiError(
                        400, "mask: give a mask PNG, or an image with a transparent area to regenerate", param="mask"
                    )
                mask_picture = transparent_as_white(alpha)
            else:
                decoded = context.decode(mask_data, "mask", param="mask")
                if decoded.size != picture.size:
                    raise ApiError(
                        400, f"mask: is {decoded.width} x {decoded.height} pixels, the image "
                        f"{picture.width} x {picture.height}; they must match", param="mask",
                    )  # fmt: skip
                alpha = alpha_of(mask_data)
                # Without an alpha channel, white marks the area (as `clipdalle inpaint --mask`).
                mask_picture = decoded if alpha is None else transparent_as_white(alpha)
            region = mask_from_image(mask_picture, side)  # (side, side) True where to regenerate
            if not bool(region.any()):
                raise ApiError(400, "mask: has no transparent area, so there is nothing to regenerate", param="mask")
            return load_image(picture, side), region

        pixels, region = await context.work.run(prepare)
        candidates = settings.rerank if models.clip is not None else 1
        stop = threading.Event()

        def job() -> Any:
            return inpaint(
                models.dalle, models.vae, models.tokenizer, pixels, region, prompt, n=n * candidates, keep=n,
                clip=models.clip, should_stop=stop.is_set, **models.sampling_settings(models.clip),
            ).images  # fmt: skip

        results = await queue.run(job, client_gone=request.is_disconnected, stop=stop)
        return await context.work.run(lambda: respond(request, results, size, response_format, model))

    @router.post("/images/variations", dependencies=authorised, response_model=ImagesResponse)
    async def image_variations(
        request: Request,
        image: Annotated[UploadFile | None, File(description="the image to vary (PNG)")] = None,
        n: int | None = Form(1),
        size: str | None = Form(DEFAULT_SIZE),
        response_format: str | None = Form(DEFAULT_FORMAT),
        model: str | None = Form(None),
    ) -> JSONResponse:
        n, size, response_format = check_options(n, size, response_format)
        need_dalle(model)
        image_data = await one_image(image, None)

        def prepare() -> Any:
            return load_image(context.decode(image_data, "image", param="image"), models.image_size)  # (3, S, S)

        pixels = await context.work.run(prepare)
        stop = threading.Event()

        def job() -> Any:
            # No prompt: the lower half of the code grid is resampled unconditionally (the empty caption).
            return variations(
                models.dalle, models.vae, models.tokenizer, pixels, "", n=n, should_stop=stop.is_set,
                **models.sampling_settings(None),
            ).images  # fmt: skip

        results = await queue.run(job, client_gone=request.is_disconnected, stop=stop)
        return await context.work.run(lambda: respond(request, results, size, response_format, model))

    @router.get(
        "/images/files/{name}",
        summary="an image returned as a url (no API key: the url is the secret; gone after an hour)",
        response_class=Response,
        responses={200: {"content": {"image/png": {}}}},
    )
    def stored_image(name: str) -> Response:
        token = name.removesuffix(".png")
        found = store.get(token) if TOKEN_PATTERN.fullmatch(token) else None
        if found is None:
            raise ApiError(404, "this image url is unknown or has expired (urls last an hour)", code="not_found")
        png, seconds_left = found
        headers = {
            "Cache-Control": f"private, max-age={max(0, int(seconds_left))}",
            "X-Content-Type-Options": "nosniff",
        }
        return Response(png, media_type="image/png", headers=headers)

    return router
