"""/api/generate and /api/inpaint: DALL·E samples for the page, best first, through the bounded generation queue;
a request whose client leaves is dropped from the queue or stopped between sampling steps."""

from __future__ import annotations

import math
import threading
from typing import Annotated, Any

from fastapi import APIRouter, File, Form, Query, Request, UploadFile

from ..sampling import generate, inpaint, parse_box
from ..transforms import load_image
from .common import ApiError, data_url, png_bytes
from .context import ServeContext
from .schemas import Generated, GenerateRequest, Suggestions

MAX_SUGGESTIONS = 50


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


def generation_router(context: ServeContext) -> APIRouter:
    router = APIRouter()
    models = context.models

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
        notice = models.prompts.notice(prompt) if models.prompts is not None and prompt else None
        return {"prompt": prompt, "native_size": models.image_size, "notice": notice, "images": images}

    @router.get("/prompts", response_model=Suggestions, summary="prompts the DALL·E model knows, for a typed text")
    def suggest(
        q: str = Query("", description="what has been typed so far"),
        k: int = Query(10, ge=1, le=MAX_SUGGESTIONS, description="suggestions"),
    ) -> dict:
        context.need_dalle()
        query = context.check_text("q", q, allow_empty=True)
        return {"query": query, "suggestions": [] if models.prompts is None else models.prompts.suggest(query, k)}

    @router.post("/generate", response_model=Generated, summary="text -> images, best first (CLIP-reranked)")
    async def generate_images(body: GenerateRequest, request: Request) -> dict:
        context.need_dalle()
        prompt = context.check_text("prompt", body.prompt, allow_empty=True)
        keep = context.check_samples(body.n, body.keep)
        context.check_seed(body.seed)
        stop = threading.Event()

        def job() -> dict:
            generation = generate(
                models.dalle, models.vae, models.tokenizer, [prompt], n=body.n, keep=keep, clip=models.clip,
                seed=body.seed, should_stop=stop.is_set, **models.sampling_settings(models.clip),
            )  # fmt: skip
            return generated(generation, prompt)

        return await context.queue.run(job, client_gone=request.is_disconnected, stop=stop)

    @router.post("/inpaint", response_model=Generated, summary="regenerate a box of an uploaded image")
    async def inpaint_box(
        request: Request,
        image: Annotated[UploadFile, File(description="the image")],
        prompt: str = Form(..., description="what the whole image should show"),
        box: str = Form(..., description="x0,y0,x1,y1 in pixels of the uploaded image, end exclusive"),
        n: int = Form(8),
        keep: int | None = Form(None),
    ) -> dict:
        context.need_dalle()
        prompt = context.check_text("prompt", prompt, allow_empty=True)
        keep = context.check_samples(n, keep)
        try:
            region = parse_box(box)
        except ValueError as error:
            raise ApiError(422, str(error)) from None
        data, name = await context.upload(image, "image")
        size = models.image_size

        def prepare() -> tuple[list[int], Any]:  # decoding and resizing a large upload takes a while
            picture = context.decode(data, name)
            mapped = box_in_model_pixels(region, picture.width, picture.height, size)
            return mapped, load_image(picture, size)  # (3, size, size)

        mapped, pixels = await context.work.run(prepare)
        stop = threading.Event()

        def job() -> dict:
            generation = inpaint(
                models.dalle, models.vae, models.tokenizer, pixels, mapped, prompt, n=n, keep=keep, clip=models.clip,
                should_stop=stop.is_set, **models.sampling_settings(models.clip),
            )  # fmt: skip
            return generated(generation, prompt)

        return await context.queue.run(job, client_gone=request.is_disconnected, stop=stop)

    return router
