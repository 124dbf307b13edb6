"""/api/info, /api/search, /api/similar and /api/images: what the page's search view calls.

Thumbnails are made once per image and kept on disk (INDEX/thumbnails/ID-SHA256.png, or --thumbnail-dir), the most
recent few hundred in memory as well; searches, decoding and thumbnailing go through the server's WorkLimiter.
"""

from __future__ import annotations

import io
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

from ..index import read_image
from ..io import atomic_write, read_file
from ..transforms import MAX_IMAGE_PIXELS
from .common import ApiError, decode_upload, png_bytes
from .context import ServeContext
from .schemas import Info, SearchResults

THUMBNAIL_CACHE_SIZE = 512  # thumbnails kept in memory (256 px PNGs: a few MB)
MAX_THUMBNAIL_BYTES = 8 << 20  # a cached thumbnail file larger than this is not one of ours: made again
MAX_ID = 2**63 - 1  # SQLite INTEGER: larger ids cannot exist and would overflow the query


def first_caption(caption: str | None) -> str | None:
    line = (caption or "").split("\n")[0].strip()
    return line or None


class ThumbnailCache:
    """PNG thumbnails by (id, sha256): in memory (the most recent THUMBNAIL_CACHE_SIZE) and as files in `folder`.
    A folder that cannot be written (a read-only index) leaves the memory cache alone."""

    def __init__(self, folder: Path | None):
        self.folder = folder
        self.memory: OrderedDict[str, bytes] = OrderedDict()
        self.lock = threading.Lock()

    def name(self, row: dict, size: int) -> str:
        return f"{int(row['id'])}-{row['sha256'][:32]}-{size}.png"

    def get(self, name: str) -> bytes | None:
        with self.lock:
            found = self.memory.get(name)
            if found is not None:
                self.memory.move_to_end(name)
                return found
        if self.folder is None:
            return None
        try:
            found = read_file(self.folder / name, MAX_THUMBNAIL_BYTES, "thumbnail")
        except OSError:
            return None
        self._remember(name, found)
        return found

    def put(self, name: str, png: bytes) -> None:
        self._remember(name, png)
        if self.folder is not None:
            try:
                atomic_write(self.folder / name, lambda temporary: temporary.write_bytes(png))
            except OSError:
                pass  # not writable: thumbnails are made again after a restart

    def _remember(self, name: str, png: bytes) -> None:
        with self.lock:
            self.memory[name] = png
            while len(self.memory) > THUMBNAIL_CACHE_SIZE:
                self.memory.popitem(last=False)


def read_indexed_image(context: ServeContext, row: dict) -> bytes:
    """The stored bytes of an indexed image (a file or a shard member); a 404 if it has gone since indexing."""
    try:
        return read_image(row["path"], context.models.index.info.get("data", []))
    except (OSError, KeyError, tarfile.TarError, EOFError):
        raise ApiError(404, f"image {row['id']}: its file is no longer where the index found it") from None


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
    folder = settings.thumbnail_dir or (models.index.path / "thumbnails" if models.index is not None else None)
    thumbnails = ThumbnailCache(Path(folder) if folder is not None else None)

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
            "sampling": models.sampling,
            "limits": limits,
        }

    @router.get("/search", response_model=SearchResults, summary="text -> image search")
    async def search(
        q: str = Query(..., description="what to look for, e.g. 'a red circle'"),
        k: int = Query(20, ge=1, description="results"),
        min_score: float | None = Query(None, ge=-1, le=1, description="drop results below this cosine"),
    ) -> dict:
        index = context.need_index()
        context.check_k(k)
        query = context.check_text("q", q)
        results = await context.work.run(lambda: items(index.search(text=query, k=k, min_score=min_score)))
        return {"query": query, "results": results}

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

        return {"query": name, "results": await context.work.run(work)}

    @router.get("/similar/{image_id}", response_model=SearchResults, summary="images similar to an indexed one")
    async def similar_indexed(
        image_id: int = PathParameter(ge=0, le=MAX_ID),
        k: int = Query(20, ge=1),
        min_score: float | None = Query(None, ge=-1, le=1),
    ):
        index = context.need_index()
        context.check_k(k)

        def work() -> list[dict]:
            with index.lock:  # one SQLite connection serves every thread
                if image_id not in index.rows([image_id]):
                    raise ApiError(404, f"no image with id {image_id} in the index")
                hits = index.similar(image_id, k=k, min_score=min_score)
            return items(hits)

        return {"query": f"#{image_id}", "results": await context.work.run(work)}

    @router.get(
        "/images/{image_id}",
        summary="an indexed image by id: a thumbnail or the original bytes",
        responses={200: {"content": {"image/*": {}, "application/octet-stream": {}}}},
        response_class=Response,
    )
    async def indexed_image(
        image_id: int = PathParameter(ge=0, le=MAX_ID), size: Literal["thumb", "original"] = "original"
    ) -> Response:
        index = context.need_index()
        with index.lock:
            row = index.rows([image_id]).get(image_id)
        if row is None:
            raise ApiError(404, f"no image with id {image_id} in the index")
        headers = {"Cache-Control": "private, max-age=3600", "X-Content-Type-Options": "nosniff"}
        if size == "thumb":
            name = thumbnails.name(row, settings.thumbnail_size)
            cached = await run_in_threadpool(thumbnails.get, name)
            if cached is None:
                cached = await context.work.run(lambda: make_thumbnail(row, name))
            return Response(cached, media_type="image/png", headers=headers)
        data = await context.work.run(lambda: read_stored(row))
        try:
            kind = Image.open(io.BytesIO(data)).format  # reads the header only
        except Exception:
            kind = None
        media_type = Image.MIME.get(kind or "", "application/octet-stream")
        return Response(data, media_type=media_type, headers=headers)

    def make_thumbnail(row: dict, name: str) -> bytes:
        # The index accepted the image at the library's cap; its decoded cost is bounded by it (and by the limiter).
        picture = decode_upload(read_stored(row), f"image {row['id']}", max_pixels=MAX_IMAGE_PIXELS)
        picture.thumbnail((settings.thumbnail_size, settings.thumbnail_size))
        png = png_bytes(picture)
        thumbnails.put(name, png)
        return png

    def read_stored(row: dict) -> bytes:
        return read_indexed_image(context, row)

    return router
