"""/api/info, /api/search, /api/similar and /api/images: what the page's search view calls."""

from __future__ import annotations

import io
import os
import tarfile
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Annotated, Literal

from fastapi import APIRouter, File, Form, Query, UploadFile
from fastapi import Path as PathParameter
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response
from PIL import Image

from ..transforms import MAX_IMAGE_PIXELS
from .common import ApiError, decode_upload, png_bytes
from .context import ServeContext
from .schemas import Info, SearchResults

THUMBNAIL_CACHE_SIZE = 512  # thumbnails kept in memory (256 px PNGs: a few MB)
MAX_ID = 2**63 - 1  # SQLite INTEGER: larger ids cannot exist and would overflow the query


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


def result_items(context: ServeContext, hits: list[dict]) -> list[dict]:
    """Index hits ({"id", "caption", "score"}) as SearchItem dicts, those removed since the search left out."""
    index = context.need_index()
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


def search_router(context: ServeContext) -> APIRouter:
    router = APIRouter()
    models, settings = context.models, context.settings
    thumbnails: OrderedDict[int, bytes] = OrderedDict()
    thumbnails_lock = threading.Lock()

    def items(hits: list[dict]) -> list[dict]:
        return result_items(context, hits)

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
        index = context.need_index()
        context.check_k(k)
        query = context.check_text("q", q)
        return {"query": query, "results": items(index.search(text=query, k=k, min_score=min_score))}

    @router.post("/similar", response_model=SearchResults, summary="image -> image search with an uploaded image")
    async def similar_upload(
        image: Annotated[UploadFile, File(description="the query image")],
        k: int = Form(20, ge=1),
        min_score: float | None = Form(None, ge=-1, le=1),
    ) -> dict:
        index = context.need_index()
        context.check_k(k)
        data, name = await context.upload(image, "image")

        def work() -> list[dict]:
            picture = context.decode(data, name)
            return items(index.search_features(index.encode_images([picture]), k=k, min_score=min_score)[0])

        return {"query": name, "results": await run_in_threadpool(work)}

    @router.get("/similar/{image_id}", response_model=SearchResults, summary="images similar to an indexed one")
    def similar_indexed(
        image_id: int = PathParameter(ge=0, le=MAX_ID),
        k: int = Query(20, ge=1),
        min_score: float | None = Query(None, ge=-1, le=1),
    ):
        index = context.need_index()
        context.check_k(k)
        with index.lock:  # one SQLite connection serves every thread
            if image_id not in index.rows([image_id]):
                raise ApiError(404, f"no image with id {image_id} in the index")
            hits = index.similar(image_id, k=k, min_score=min_score)
        return {"query": f"#{image_id}", "results": items(hits)}

    @router.get(
        "/images/{image_id}",
        summary="an indexed image by id: a thumbnail or the original bytes",
        responses={200: {"content": {"image/png": {}, "image/jpeg": {}}}},
        response_class=Response,
    )
    def indexed_image(
        image_id: int = PathParameter(ge=0, le=MAX_ID), size: Literal["thumb", "original"] = "original"
    ) -> Response:
        index = context.need_index()
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
