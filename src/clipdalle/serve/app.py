"""The app factory and the page's JSON API (/api); the OpenAI-compatible routes live in openai_api.py.

    app = create_app(load_models("runs/demo"), ServeSettings(api_key="secret"))
    uvicorn.run(app, host="127.0.0.1", port=8000)       # what `clipdalle serve` does

Searches run concurrently on the server's thread pool (faiss and the index's metadata are guarded by the index's
own lock); generation goes through the bounded queue in limits.py, one request at a time. The OpenAPI docs are
at /docs.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import tarfile
import threading
from collections import OrderedDict
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from fastapi import APIRouter, Depends, FastAPI, File, Form, Query, Request, UploadFile
from fastapi import Path as PathParameter
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from PIL import Image
from pydantic import BaseModel, Field, StrictInt
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..transforms import MAX_IMAGE_PIXELS
from .common import (
    ApiError,
    api_key_check,
    data_url,
    decode_upload,
    error_bytes,
    error_content,
    field_of,
    one_line,
    png_bytes,
)
from .limits import BodySizeLimit, GenerationQueue, QueueFull, read_upload
from .models import ServeModels, ServeSettings

STATIC_DIR = Path(__file__).parent / "static"
THUMBNAIL_CACHE_SIZE = 512  # thumbnails kept in memory (256 px PNGs: a few MB)
DEFAULT_KEEP = 4  # /api/generate and /api/inpaint return this many samples unless told otherwise
MAX_SEED = 2**32 - 1
MAX_ID = 2**63 - 1  # SQLite INTEGER: larger ids cannot exist and would overflow the query


# ------------------------------------------------------------------------------------------ request/response shapes


class Limits(BaseModel):
    max_upload_bytes: int
    max_n: int
    max_keep: int
    max_k: int
    max_prompt_chars: int


class Info(BaseModel):
    images: int = Field(description="images in the index (0 without one)")
    search: bool = Field(description="an index is loaded: /api/search, /api/similar, /api/images")
    clip: bool = Field(description="a CLIP is loaded: /api/classify, /api/moderate, reranking")
    dalle: bool = Field(description="a DALL·E model is loaded: /api/generate, /api/inpaint, /v1/images/*")
    image_size: int | None = Field(description="side of generated images in pixels")
    limits: Limits


class SearchItem(BaseModel):
    id: int
    caption: str | None = Field(description="the image's first caption")
    score: float = Field(description="cosine similarity with the query")
    width: int
    height: int
    thumbnail: str
    url: str


class SearchResults(BaseModel):
    query: str
    results: list[SearchItem] = Field(description="best first")


class LabelScore(BaseModel):
    label: str
    probability: float
    score: float = Field(description="cosine similarity of the image with the label's prompt")


class Classification(BaseModel):
    results: list[LabelScore] = Field(description="by probability, highest first")


class ConceptScore(BaseModel):
    concept: str
    score: float
    threshold: float
    flagged: bool


class Moderation(BaseModel):
    flagged: bool
    concepts: list[ConceptScore]


class GenerateRequest(BaseModel):
    prompt: str = Field(description='what to draw ("" samples unconditionally)')
    n: StrictInt = Field(8, description="samples drawn")
    keep: StrictInt | None = Field(None, description="best samples returned (default min(4, n))")
    seed: StrictInt | None = Field(None, description="sample i uses seed + i; random when null")


class GeneratedImage(BaseModel):
    image: str = Field(description="data:image/png;base64,...")
    clip_score: float | None
    log_likelihood: float
    seed: int


class Generated(BaseModel):
    prompt: str
    native_size: int
    images: list[GeneratedImage] = Field(description="best first")


# ------------------------------------------------------------------------------------------ pure helpers


def box_in_model_pixels(box: list[int], width: int, height: int, size: int) -> list[int]:
    """A box (x0, y0, x1, y1), end exclusive, in pixels of a width x height upload -> the same box on the
    size x size image the model sees (the centre square, resized, as `resize_crop` makes it), rounded outward."""
    x0, y0, x1, y1 = box
    if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
        raise ValueError(
            f"box {x0},{y0},{x1},{y1} is not inside the {width} x {height} image; expected "
            f"0 <= x0 < x1 <= {width} and 0 <= y0 < y1 <= {height} (end exclusive)"
        )
    side = min(width, height)
    left, top, scale = (width - side) / 2, (height - side) / 2, size / side
    mapped = [
        math.floor((x0 - left) * scale),
        math.floor((y0 - top) * scale),
        math.ceil((x1 - left) * scale),
        math.ceil((y1 - top) * scale),
    ]
    mapped = [min(size, max(0, value)) for value in mapped]
    if mapped[0] >= mapped[2] or mapped[1] >= mapped[3]:
        raise ValueError(
            f"box {x0},{y0},{x1},{y1} lies outside the centre {side} x {side} square the model edits; "
            "draw it nearer the middle of the image"
        )
    return mapped


def parse_labels(text: str, limit: int, max_chars: int) -> list[str]:
    """Labels one per line, or comma-separated on one line; blanks and repeats dropped."""
    parts = text.splitlines() if "\n" in text.strip() else text.split(",")
    labels = list(dict.fromkeys(part.strip() for part in parts if part.strip()))
    if not 2 <= len(labels) <= limit:
        raise ApiError(422, f"labels: got {len(labels)} distinct labels, expected 2 to {limit} (one per line or a,b,c)")
    too_long = next((label for label in labels if len(label) > max_chars), None)
    if too_long is not None:
        raise ApiError(422, f"labels: a label of {len(too_long)} characters is longer than {max_chars}")
    return labels


def first_caption(caption: str | None) -> str | None:
    line = (caption or "").split("\n")[0].strip()
    return line or None


def read_indexed_image(path: str) -> bytes:
    """The stored bytes of an indexed image: a file, or a WebDataset member written as "SHARD.tar:MEMBER"."""
    if os.path.isfile(path):
        return Path(path).read_bytes()
    shard, separator, member = path.rpartition(".tar:")
    if separator and os.path.isfile(shard + ".tar"):
        with tarfile.open(shard + ".tar") as archive:
            handle = archive.extractfile(member)
            if handle is not None:
                return handle.read()
    raise FileNotFoundError(path)


# ------------------------------------------------------------------------------------------ the factory


def create_app(models: ServeModels, settings: ServeSettings | None = None) -> FastAPI:
    """A FastAPI app serving `models` (loaded once by the caller) under `settings`: the page at /, the JSON API
    under /api, the OpenAI-compatible images API under /v1 and OpenAPI docs at /docs."""
    from .openai_api import openai_router

    settings = settings or ServeSettings()
    queue = GenerationQueue(settings.max_queue)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        queue.close()  # the worker finishes the queued jobs, then stops

    app = FastAPI(
        lifespan=lifespan,
        title="clipdalle",
        version=__version__,
        description="Search a collection by text or image, classify and moderate with CLIP, generate and edit "
        "images with DALL·E. The /v1 routes follow OpenAI's images API.",
    )
    app.state.models = models
    app.state.settings = settings
    app.state.queue = queue
    add_error_handlers(app)
    app.include_router(api_router(models, settings, queue))
    app.include_router(openai_router(models, settings, queue))
    add_page_routes(app)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_request_bytes, error_body=error_bytes)
    if settings.cors_origins:  # added last: outermost, so errors and 413s carry CORS headers too
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(settings.cors_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type"],
            expose_headers=["Retry-After", "X-Native-Size"],
        )
    return app


def add_error_handlers(app: FastAPI) -> None:
    def respond(request: Request, status: int, message: str, param=None, code=None, headers=None) -> JSONResponse:
        content = error_content(request.url.path, status, message, param, code)
        return JSONResponse(content, status_code=status, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        message = error.detail if isinstance(error.detail, str) else one_line(error.detail)
        param, code = getattr(error, "param", None), getattr(error, "code", None)
        return respond(request, error.status_code, message, param, code, getattr(error, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0] if error.errors() else {"loc": (), "msg": "invalid request"}
        field = field_of(first.get("loc", ()))
        message = f"{field}: {first['msg']}" if field else str(first["msg"])
        if first.get("type") == "missing":
            message = f"{field}: this field is required" if field else "the request has no body; expected JSON"
        elif first.get("type") == "json_invalid":
            field, message = None, f"the request body is not valid JSON ({first['msg']})"
        openai = request.url.path.startswith("/v1/")
        return respond(request, 400 if openai else 422, message, field, "invalid_value" if openai else None)

    @app.exception_handler(ValueError)
    async def bad_value(request: Request, error: ValueError) -> JSONResponse:
        return respond(request, 400, str(error))

    @app.exception_handler(QueueFull)
    async def queue_full(request: Request, error: QueueFull) -> JSONResponse:
        headers = {"Retry-After": str(error.retry_after)}
        return respond(request, 503, str(error), code="queue_full", headers=headers)


def add_page_routes(app: FastAPI) -> None:
    @app.get("/", include_in_schema=False)
    def page() -> Response:
        index_html = STATIC_DIR / "index.html"
        if not index_html.is_file():
            raise ApiError(404, "the page is not installed (no serve/static/index.html); the API is at /docs")
        return FileResponse(index_html, media_type="text/html")

    if STATIC_DIR.is_dir():
        app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")


# ------------------------------------------------------------------------------------------ /api


def api_router(models: ServeModels, settings: ServeSettings, queue: GenerationQueue) -> APIRouter:
    router = APIRouter(prefix="/api", dependencies=[Depends(api_key_check(settings.api_key))])
    clip_lock = threading.Lock()  # label_features caches on the model: one text encoding at a time
    thumbnails: OrderedDict[int, bytes] = OrderedDict()
    thumbnails_lock = threading.Lock()

    def need_index() -> Any:
        if models.index is None:
            raise ApiError(503, "this server has no index loaded; start it with --index INDEX to search")
        return models.index

    def need_clip() -> tuple[Any, Any, Any]:
        if models.clip is None:
            raise ApiError(503, "this server has no CLIP model loaded; start it with --clip RUN or --index INDEX")
        return models.clip

    def need_dalle() -> None:
        if models.dalle is None:
            raise ApiError(503, "this server has no DALL·E model loaded; start it with --dalle RUN to generate")

    def check_k(k: int) -> None:
        if k > settings.max_k:
            raise ApiError(422, f"k: {k} results is more than this server's limit of {settings.max_k}")

    def check_text(name: str, text: str, allow_empty: bool = False) -> str:
        if len(text) > settings.max_prompt_chars:
            raise ApiError(422, f"{name}: {len(text)} characters is more than the limit of {settings.max_prompt_chars}")
        if not allow_empty and not text.strip():
            raise ApiError(422, f"{name}: is empty; expected a description such as 'a red circle'")
        return text.strip()

    def check_samples(n: int, keep: int | None) -> int:
        if not 1 <= n <= settings.max_n:
            raise ApiError(422, f"n: {n} samples is outside 1 to {settings.max_n}, this server's limit")
        keep = min(DEFAULT_KEEP, n) if keep is None else keep
        if not 1 <= keep <= min(n, settings.max_keep):
            raise ApiError(422, f"keep: {keep} must be between 1 and n={n} (at most {settings.max_keep})")
        return keep

    def items(hits: list[dict]) -> list[dict]:
        index = need_index()
        with index.lock:
            rows = index.rows(hit["id"] for hit in hits)
        results = []
        for hit in hits:
            row = rows.get(hit["id"])
            if row is None:  # removed between the search and now
                continue
            results.append(
                {
                    "id": hit["id"],
                    "caption": first_caption(hit["caption"]),
                    "score": float(hit["score"]),
                    "width": int(row["width"]),
                    "height": int(row["height"]),
                    "thumbnail": f"/api/images/{hit['id']}?size=thumb",
                    "url": f"/api/images/{hit['id']}",
                }
            )
        return results

    def image_features(picture: Image.Image) -> torch.Tensor:
        model, preprocess, _ = need_clip()
        pixels = preprocess(picture)[None].to(model.positional_embedding.device)  # (1, 3, S, S)
        with torch.no_grad():
            return model.encode_image(pixels).float().cpu()  # (1, D)

    def generated(generation: Any, prompt: str) -> dict:
        images = []
        for number, image in enumerate(generation.images):
            score = None if generation.clip_scores is None else float(generation.clip_scores[number])
            images.append(
                {
                    "image": data_url(png_bytes(image)),
                    "clip_score": score,
                    "log_likelihood": float(generation.log_likelihood[number]),
                    "seed": int(generation.seeds[number]),
                }
            )
        return {"prompt": prompt, "native_size": models.image_size, "images": images}

    @router.get("/info", response_model=Info, summary="what this server can do, and its limits")
    def info() -> dict:
        images = 0
        if models.index is not None:
            with models.index.lock:
                images = len(models.index)
        limits = {
            name: getattr(settings, name)
            for name in ("max_upload_bytes", "max_n", "max_keep", "max_k", "max_prompt_chars")
        }
        return {
            "images": images,
            "search": models.index is not None,
            "clip": models.clip is not None,
            "dalle": models.dalle is not None,
            "image_size": models.image_size,
            "limits": limits,
        }

    @router.get("/search", response_model=SearchResults, summary="text -> image search")
    def search(
        q: str = Query(..., description="what to look for, e.g. 'a red circle'"),
        k: int = Query(20, ge=1, description="results"),
        min_score: float | None = Query(None, ge=-1, le=1, description="drop results below this cosine"),
    ) -> dict:
        index = need_index()
        check_k(k)
        query = check_text("q", q)
        return {"query": query, "results": items(index.search(text=query, k=k, min_score=min_score))}

    @router.post("/similar", response_model=SearchResults, summary="image -> image search with an uploaded image")
    async def similar_upload(
        image: Annotated[UploadFile, File(description="the query image")],
        k: int = Form(20, ge=1),
        min_score: float | None = Form(None, ge=-1, le=1),
    ) -> dict:
        index = need_index()
        check_k(k)
        data = await read_upload(image, settings.max_upload_bytes, "image")
        name = Path(image.filename or "upload").name[:200]

        def work() -> list[dict]:
            picture = decode_upload(data, name, max_pixels=settings.max_pixels)
            return items(index.search_features(index.encode_images([picture]), k=k, min_score=min_score)[0])

        return {"query": name, "results": await run_in_threadpool(work)}

    @router.get("/similar/{image_id}", response_model=SearchResults, summary="images similar to an indexed one")
    def similar_indexed(
        image_id: int = PathParameter(ge=0, le=MAX_ID),
        k: int = Query(20, ge=1),
        min_score: float | None = Query(None, ge=-1, le=1),
    ):
        index = need_index()
        check_k(k)
        with index.lock:  # one SQLite connection serves every thread
            if image_id not in index.rows([image_id]):
                raise ApiError(404, f"no image with id {image_id} in the index")
            hits = index.similar(image_id, k=k, min_score=min_score)
        return {"query": f"#{image_id}", "results": items(hits)}

    @router.post("/classify", response_model=Classification, summary="zero-shot classification with CLIP")
    async def classify(
        image: Annotated[UploadFile, File(description="the image")],
        labels: str = Form(..., description="2 to 100 labels, one per line or comma-separated"),
        template: str = Form("{}", description="prompt around each label, e.g. 'a {} icon'"),
    ) -> dict:
        from ..clip import classify as clip_classify
        from ..clip import label_features

        model, preprocess, tokenizer = need_clip()
        names = parse_labels(labels, settings.max_labels, settings.max_prompt_chars)
        check_text("template", template)
        if template.count("{}") != 1 or template.replace("{}", "").count("{") or template.replace("{}", "").count("}"):
            raise ApiError(
                422, f"template {template[:60]!r}: expected exactly one {{}} where the label goes, e.g. 'a {{}} icon'"
            )
        data = await read_upload(image, settings.max_upload_bytes, "image")

        def work() -> list[dict]:
            picture = decode_upload(data, Path(image.filename or "image").name, max_pixels=settings.max_pixels)
            pixels = preprocess(picture)[None].to(model.positional_embedding.device)  # (1, 3, S, S)
            with clip_lock:
                probabilities = clip_classify(model, pixels, names, tokenizer, [template])[0].float().cpu()
                text = label_features(model, names, tokenizer, [template]).float().cpu()  # (N_lab, D), cached
            scores = (image_features(picture) @ text.T)[0]  # (N_lab,)
            order = probabilities.argsort(descending=True, stable=True).tolist()
            return [
                {"label": names[i], "probability": float(probabilities[i]), "score": float(scores[i])} for i in order
            ]

        return {"results": await run_in_threadpool(work)}

    @router.post("/moderate", response_model=Moderation, summary="does an image match any of the given concepts")
    async def moderate(
        image: Annotated[UploadFile, File(description="the image")],
        concepts: str = Form(..., description="one 'concept<TAB>threshold' (or just 'concept') per line"),
    ) -> dict:
        from ..clip import label_features
        from ..index import DEFAULT_THRESHOLD

        model, _, tokenizer = need_clip()
        parsed = parse_concepts(concepts, settings.max_labels, settings.max_prompt_chars)
        data = await read_upload(image, settings.max_upload_bytes, "image")

        def work() -> dict:
            picture = decode_upload(data, Path(image.filename or "image").name, max_pixels=settings.max_pixels)
            names = list(dict.fromkeys(name for name, _ in parsed))
            with clip_lock:
                text = label_features(model, names, tokenizer).float().cpu()  # (C, D)
            scores = (image_features(picture) @ text.T)[0]  # (C,)
            results = []
            for name, threshold in parsed:
                threshold = DEFAULT_THRESHOLD if threshold is None else threshold
                score = float(scores[names.index(name)])
                results.append({"concept": name, "score": score, "threshold": threshold, "flagged": score >= threshold})
            return {"flagged": any(result["flagged"] for result in results), "concepts": results}

        return await run_in_threadpool(work)

    @router.post("/generate", response_model=Generated, summary="text -> images, best first (CLIP-reranked)")
    async def generate(request: GenerateRequest) -> dict:
        from ..sampling import generate as sample

        need_dalle()
        prompt = check_text("prompt", request.prompt, allow_empty=True)
        keep = check_samples(request.n, request.keep)
        if request.seed is not None and not 0 <= request.seed <= MAX_SEED:
            raise ApiError(422, f"seed: {request.seed} is outside 0 to {MAX_SEED}")

        def job() -> dict:
            generation = sample(
                models.dalle, models.vae, models.tokenizer, [prompt], n=request.n, keep=keep, clip=models.clip,
                seed=request.seed,
            )  # fmt: skip
            return generated(generation, prompt)

        return await queue.run(job)

    @router.post("/inpaint", response_model=Generated, summary="regenerate a box of an uploaded image")
    async def inpaint(
        image: Annotated[UploadFile, File(description="the image")],
        prompt: str = Form(..., description="what the whole image should show"),
        box: str = Form(..., description="x0,y0,x1,y1 in pixels of the uploaded image, end exclusive"),
        n: int = Form(8),
        keep: int | None = Form(None),
    ) -> dict:
        from ..sampling import inpaint as sample_inpaint
        from ..sampling import parse_box
        from ..transforms import resize_crop, to_tensor

        need_dalle()
        prompt = check_text("prompt", prompt, allow_empty=True)
        keep = check_samples(n, keep)
        try:
            region = parse_box(box)
        except ValueError as error:
            raise ApiError(422, str(error)) from None
        data = await read_upload(image, settings.max_upload_bytes, "image")
        size = models.image_size

        def prepare() -> tuple[list[int], torch.Tensor]:  # decoding and resizing a large upload takes a while
            picture = decode_upload(data, Path(image.filename or "image").name, max_pixels=settings.max_pixels)
            mapped = box_in_model_pixels(region, picture.width, picture.height, size)
            return mapped, to_tensor(resize_crop(picture, size))  # (3, size, size)

        mapped, pixels = await run_in_threadpool(prepare)

        def job() -> dict:
            generation = sample_inpaint(
                models.dalle, models.vae, models.tokenizer, pixels, mapped, prompt, n=n, keep=keep, clip=models.clip
            )
            return generated(generation, prompt)

        return await queue.run(job)

    @router.get(
        "/images/{image_id}",
        summary="an indexed image by id: a thumbnail or the original bytes",
        responses={200: {"content": {"image/png": {}, "image/jpeg": {}}}},
        response_class=Response,
    )
    def indexed_image(
        image_id: int = PathParameter(ge=0, le=MAX_ID), size: Literal["thumb", "original"] = "original"
    ) -> Response:
        index = need_index()
        with index.lock:
            row = index.rows([image_id]).get(image_id)
        if row is None:
            raise ApiError(404, f"no image with id {image_id} in the index")
        headers = {"Cache-Control": "private, max-age=3600", "X-Content-Type-Options": "nosniff"}
        if size == "thumb":
            with thumbnails_lock:
                cached = thumbnails.get(image_id)
                if cached is not None:
                    thumbnails.move_to_end(image_id)
            if cached is None:
                picture = decode_upload(read_stored(row), f"image {image_id}", max_pixels=MAX_IMAGE_PIXELS)
                picture.thumbnail((settings.thumbnail_size, settings.thumbnail_size))
                cached = png_bytes(picture)
                with thumbnails_lock:
                    thumbnails[image_id] = cached
                    while len(thumbnails) > THUMBNAIL_CACHE_SIZE:
                        thumbnails.popitem(last=False)
            return Response(cached, media_type="image/png", headers=headers)
        data = read_stored(row)
        try:
            kind = Image.open(io.BytesIO(data)).format  # reads the header only
        except Exception:
            kind = None
        media_type = Image.MIME.get(kind or "", "application/octet-stream")
        return Response(data, media_type=media_type, headers=headers)

    def read_stored(row: dict) -> bytes:
        try:
            return read_indexed_image(row["path"])
        except (OSError, tarfile.TarError, KeyError):
            raise ApiError(404, f"image {row['id']}: its file is no longer where the index found it") from None

    return router


def parse_concepts(text: str, limit: int, max_chars: int) -> list[tuple[str, float | None]]:
    """Concepts as a concepts file gives them (`clipdalle.index.parse_concepts`); errors name the form field."""
    from .. import index

    try:
        concepts = index.parse_concepts(text, source="concepts")
    except ValueError as error:
        raise ApiError(422, str(error)) from None
    if len(concepts) > limit:
        raise ApiError(422, f"concepts: got {len(concepts)}, more than this server's limit of {limit}")
    too_long = next((name for name, _ in concepts if len(name) > max_chars), None)
    if too_long is not None:
        raise ApiError(422, f"concepts: a concept of {len(too_long)} characters is longer than {max_chars}")
    return concepts
