"""/api/classify and /api/moderate: zero-shot classification and concept flags of one uploaded image."""

from __future__ import annotations

from typing import Annotated

import torch
from fastapi import APIRouter, File, Form, UploadFile
from PIL import Image

from ..index import moderation
from ..runtime import device_of
from ..zero_shot import probabilities
from .context import ServeContext
from .schemas import Classification, Moderation


def clip_router(context: ServeContext) -> APIRouter:
    router = APIRouter()

    def image_features(picture: Image.Image) -> torch.Tensor:
        model, preprocess, _ = context.need_clip()
        pixels = preprocess(picture)[None].to(device_of(model))  # (1, 3, S, S)
        with torch.no_grad():
            return model.encode_image(pixels).float().cpu()  # (1, D)

    @router.post("/classify", response_model=Classification, summary="zero-shot classification with CLIP")
    async def classify(
        image: Annotated[UploadFile, File(description="the image")],
        labels: str = Form(..., description="2 to 100 labels, one per line or comma-separated"),
        template: str = Form("{}", description="prompt around each label, e.g. 'a {} icon'"),
    ) -> dict:
        model, _, _ = context.need_clip()
        names = context.check_labels(labels)
        template = context.check_template(template)
        data, name = await context.upload(image, "image")

        def work() -> list[dict]:
            features = image_features(context.decode(data, name))  # (1, D)
            text = context.label_features(names, [template]).float().cpu()  # (N_lab, D)
            with torch.no_grad():
                probs = probabilities(model, features, text)[0]  # (N_lab,)
            scores = (features @ text.T)[0]  # (N_lab,)
            order = probs.argsort(descending=True, stable=True).tolist()
            return [{"label": names[i], "probability": float(probs[i]), "score": float(scores[i])} for i in order]

        return {"results": await context.work.run(work)}

    @router.post("/moderate", response_model=Moderation, summary="does an image match any of the given concepts")
    async def moderate(
        image: Annotated[UploadFile, File(description="the image")],
        concepts: str = Form(..., description="one 'concept<TAB>threshold' (or just 'concept') per line"),
    ) -> dict:
        context.need_clip()
        parsed = context.check_concepts(concepts)
        data, name = await context.upload(image, "image")

        def work() -> dict:
            names = [concept for concept, _ in parsed]
            text = context.label_features(list(dict.fromkeys(names))).float().cpu()  # (C_distinct, D)
            scores = (image_features(context.decode(data, name)) @ text.T)[0].numpy()  # (C_distinct,)
            distinct = list(dict.fromkeys(names))
            per_concept = scores[[distinct.index(concept) for concept in names]][None]  # (1, C)
            chosen = [threshold for threshold, _ in moderation.thresholds(parsed)]
            flags = moderation.flag(per_concept, chosen)[0]  # (C,)
            results = [
                {"concept": concept, "score": float(score), "threshold": threshold, "flagged": bool(flagged)}
                for concept, score, threshold, flagged in zip(names, per_concept[0], chosen, flags)
            ]
            return {"flagged": bool(flags.any()), "concepts": results}

        return await context.work.run(work)

    return router
