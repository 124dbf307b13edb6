"""/api/caption, /api/explain, /api/duplicates and /api/query: describe an image, show where a query matches it,
group near-duplicates, and search with several weighted texts and images."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import torch
from fastapi import APIRouter, File, Form, Query, UploadFile
from fastapi import Path as PathParameter
from fastapi.concurrency import run_in_threadpool

from .. import caption, explain
from ..index import duplicates, query
from ..index.pixel_match import PIXEL_THRESHOLD
from ..index.store import stored_captions
from .common import ApiError, data_url, png_bytes
from .context import ServeContext
from .describe_schemas import Caption, Duplicates, Explanation
from .schemas import SearchResults
from .search_routes import MAX_ID, first_caption, read_indexed_image, result_items

OVERLAY_SIZE = 128  # side of /api/explain's overlay picture in pixels: a search card's thumbnail
MAX_GROUPS = 200  # duplicate groups returned at most per request
MAX_UPLOADS = 4  # images a combined query may upload (@1 .. @4)
MAX_TERMS = 20_000  # terms of all label tables one /api/caption request may score (each a CLIP text forward once)


def describe_router(context: ServeContext) -> APIRouter:
    router = APIRouter()
    models = context.models
    clip = models.clip
    text_features = None if clip is None else caption.TextFeatureCache(clip[0], clip[2])  # terms repeat across requests

    def parse_terms(text: str) -> list[query.Term]:
        context.check_text("q", text)
        try:
            return query.parse_query(text)
        except ValueError as error:
            raise ApiError(422, f"q: {error}") from None

    def query_features(terms: list[query.Term], uploads: list[Any]) -> torch.Tensor:
        """The unit query (1, D) of the terms: through the index when there is one, else the CLIP alone."""
        if models.index is not None:
            encoder = models.index
        else:
            model, _, tokenizer = context.need_clip()
            encoder = query.ClipEncoder(model, tokenizer)
        try:
            features = query.term_features(encoder, terms, uploads)
        except ValueError as error:
            raise ApiError(422, f"q: {error}") from None
        return torch.from_numpy(query.combine(features, [term.weight for term in terms]))  # (1, D)

    # -------------------------------------------------------------------------------------- caption

    @router.post("/caption", response_model=Caption, summary="a caption for an uploaded image")
    async def caption_image(
        image: Annotated[UploadFile, File(description="the image")],
        labels: str = Form(
            "",
            description="label tables: one term per line, [table] headers, template: lines (only "
            "template: lines: they cut the index's captions)",
        ),
        templates: str = Form("", description="without labels: templates cutting the index's captions into tables"),
        method: Literal["auto", "clip", "captioner"] = Form("auto", description="auto: the captioner when loaded"),
    ) -> dict:
        clip = context.need_clip()
        use_captioner = method == "captioner" or (method == "auto" and models.captioner is not None and not labels)
        if use_captioner and models.captioner is None:
            raise ApiError(503, "this server has no captioner loaded; start it with --captioner RUN or use method=clip")
        if len(labels) > 50 * context.settings.max_prompt_chars:
            raise ApiError(422, f"labels: {len(labels)} characters is more than the limit")
        data, name = await context.upload(image, "image")

        def work() -> dict:
            pixels = clip[1](context.decode(data, name))[None]  # (1, 3, S, S)
            if use_captioner:
                return caption.captioner_captions(clip, models.captioner, pixels)[0]
            chosen = tables()
            terms = sum(len(values) for values in chosen.tables.values())
            if terms > MAX_TERMS:
                raise ApiError(
                    422,
                    f"the label tables hold {terms} terms, more than this server scores per request ({MAX_TERMS}); "
                    "give labels, or templates that cut the index's captions into smaller tables",
                )
            return caption.rank_terms(clip[0], clip[2], pixels, chosen, cache=text_features)[0]

        def tables() -> caption.LabelTables:
            lines = [line.strip() for line in templates.splitlines() if line.strip()]
            given = [line.strip() for line in labels.splitlines() if line.strip() and not line.strip().startswith("#")]
            if given and all(line.startswith("template:") for line in given):  # templates alone: cut the index
                lines, given = [line[len("template:") :].strip() for line in given], []
            try:
                if given:
                    return caption.parse_label_tables(labels, "labels")
                if models.index is not None:
                    return caption.tables_from_captions(stored_captions(models.index), lines)
                if lines:
                    raise ValueError("templates: cut an index's captions; this server has no index, give labels")
                return caption.vocabulary_table(clip[2])
            except ValueError as error:
                raise ApiError(422, str(error)) from None

        return await run_in_threadpool(work)

    # -------------------------------------------------------------------------------------- explain

    def explanation(pixels: torch.Tensor, features: torch.Tensor, text: str, method: str) -> dict:
        model = context.need_clip()[0]
        try:
            result = explain.explain_features(model, pixels, features, method)
        except ValueError as error:
            raise ApiError(422, str(error)) from None
        picture = explain.overlay(pixels, explain.heat(torch.tensor(result["relevance"])), size=OVERLAY_SIZE)
        return {"text": text, **result, "overlay": data_url(png_bytes(picture))}

    @router.post("/explain", response_model=Explanation, summary="where in an uploaded image a query matches")
    async def explain_upload(
        image: Annotated[UploadFile, File(description="the image")],
        q: str = Form(..., description="the query: a text, or terms such as '2:a red heart - a square'"),
        method: Literal["gradient", "dense"] = Form("gradient"),
    ) -> dict:
        _, preprocess, _ = context.need_clip()
        terms = parse_terms(q)
        data, name = await context.upload(image, "image")

        def work() -> dict:
            picture = context.decode(data, name)
            return explanation(preprocess(picture), query_features(terms, [picture]), q.strip(), method)

        return await run_in_threadpool(work)

    @router.get("/explain/{image_id}", response_model=Explanation, summary="where in an indexed image a query matches")
    def explain_indexed(
        image_id: int = PathParameter(ge=0, le=MAX_ID),
        q: str = Query(..., description="the query, as /api/query takes it"),
        method: Literal["gradient", "dense"] = Query("gradient"),
    ) -> dict:
        index = context.need_index()
        terms = parse_terms(q)
        with index.lock:
            row = index.rows([image_id]).get(image_id)
        if row is None:
            raise ApiError(404, f"no image with id {image_id} in the index")
        data = read_indexed_image(context, row)
        _, preprocess, _ = context.need_clip()
        pixels = preprocess(context.decode(data, f"image {image_id}"))
        return explanation(pixels, query_features(terms, []), q.strip(), method)

    # -------------------------------------------------------------------------------------- duplicates

    @router.get("/duplicates", response_model=Duplicates, summary="groups of near-duplicate images in the index")
    def near_duplicates(
        threshold: float = Query(
            duplicates.DEFAULT_THRESHOLD, ge=-1, le=1, description="CLIP cosine: pairs above it (clip) or candidates"
        ),
        max_groups: int = Query(50, ge=1, le=MAX_GROUPS, description="groups returned, largest first"),
        method: Literal["pixels", "clip"] = Query("pixels", description="pixel-checked or CLIP only"),
        pixel_threshold: float = Query(
            PIXEL_THRESHOLD, ge=0, le=1, description="pixels: largest blurred difference of a near-duplicate"
        ),
    ) -> dict:
        index = context.need_index()
        report = duplicates.find_duplicates(
            index, threshold, max_groups=max_groups, method=method, pixel_threshold=pixel_threshold
        )
        for group in report["groups"]:
            group["images"] = [
                {
                    "id": image["id"],
                    "caption": first_caption(image["caption"]),
                    "width": int(image["width"]),
                    "height": int(image["height"]),
                    "thumbnail": f"/api/images/{image['id']}?size=thumb",
                    "url": f"/api/images/{image['id']}",
                }
                for image in group["images"]
            ]
        return report

    # -------------------------------------------------------------------------------------- combined queries

    @router.get("/query", response_model=SearchResults, summary="search with weighted texts and indexed images")
    def combined_query(
        q: str = Query(..., description="e.g. '2:a red circle + #12 - a square' (see clipdalle.index.query)"),
        k: int = Query(20, ge=1, description="results"),
        min_score: float | None = Query(None, ge=-1, le=1, description="drop results below this cosine"),
    ) -> dict:
        index = context.need_index()
        context.check_k(k)
        terms = parse_terms(q)
        hits = index.search_features(query_features(terms, []).numpy(), k=k, min_score=min_score)[0]
        return {"query": q.strip(), "results": result_items(context, hits)}

    @router.post("/query", response_model=SearchResults, summary="search with weighted texts and uploaded images")
    async def combined_query_upload(
        q: str = Form(..., description="terms; @1, @2 ... are the uploaded images in order"),
        images: Annotated[list[UploadFile], File(description="images the query names as @1, @2, ...")] = (),
        k: int = Form(20, ge=1),
        min_score: float | None = Form(None, ge=-1, le=1),
    ) -> dict:
        index = context.need_index()
        context.check_k(k)
        terms = parse_terms(q)
        if len(images) > MAX_UPLOADS:
            raise ApiError(422, f"images: {len(images)} uploads, more than the limit of {MAX_UPLOADS}")
        uploads = [await context.upload(upload, f"images[{number}]") for number, upload in enumerate(images)]

        def work() -> list[dict]:
            pictures = [context.decode(data, name) for data, name in uploads]
            features = query_features(terms, pictures).numpy()
            return result_items(context, index.search_features(features, k=k, min_score=min_score)[0])

        return {"query": q.strip(), "results": await run_in_threadpool(work)}

    return router
