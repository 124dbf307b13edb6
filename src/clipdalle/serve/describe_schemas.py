"""The shapes of /api/caption, /api/explain, /api/duplicates and /api/query, as their OpenAPI schema shows."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


class TermScore(BaseModel):
    term: str
    score: float = Field(description="cosine similarity of the image with the term (in its templates)")


class CandidateCaption(BaseModel):
    caption: str
    score: float = Field(description="CLIP cosine similarity with the image")
    log_likelihood: float = Field(description="the captioner's log-probability of the caption, nats")


class Caption(BaseModel):
    caption: str
    score: float = Field(description="CLIP cosine similarity of the image and the caption")
    method: str = Field(description="clip (label tables ranked by CLIP) or captioner (sampled, reranked by CLIP)")
    terms: dict[str, list[TermScore]] | None = Field(None, description="clip: the best terms of each table")
    candidates: list[CandidateCaption] | None = Field(None, description="captioner: the samples, best first")


class Explanation(BaseModel):
    text: str = Field(description="the query the map is for")
    method: str = Field(description="gradient (attention rollout / Grad-CAM) or dense (MaskCLIP)")
    score: float = Field(description="cosine similarity of the image and the query")
    grid: list[list[float]] = Field(description="relevance per cell of the model's grid, rows top to bottom, in [0, 1]")
    peak: list[float] = Field(description="[x, y] of the hottest cell's centre, in pixels of the model's input")
    overlay: str = Field(description="data:image/png;base64,...: the model's view of the image with the map painted on")


class DuplicateImage(BaseModel):
    id: int
    caption: str | None = Field(description="the image's first caption")
    width: int
    height: int
    thumbnail: str
    url: str


class DuplicateGroup(BaseModel):
    ids: list[int]
    min_score: float = Field(description="lowest cosine of the pairs that joined the group")
    max_score: float
    max_pixel_distance: float | None = Field(
        description="largest pixel difference of the pairs that joined the group (null: method clip)"
    )
    images: list[DuplicateImage]


class Duplicates(BaseModel):
    method: Literal["pixels", "clip"]
    threshold: float = Field(description="CLIP cosine above which two images pair (clip) or are a candidate (pixels)")
    pixel_threshold: float | None = Field(description="largest pixel difference of a pair (null: method clip)")
    images: int = Field(description="images in the index")
    candidates: int = Field(description="pairs compared (pixels: checked on the pixels)")
    unreadable: int = Field(description="stored images that could not be read back (pixels: left out)")
    pairs: int = Field(description="pairs accepted as near-duplicates")
    grouped: int = Field(description="images in some group")
    groups_total: int
    groups: list[DuplicateGroup] = Field(description="largest first (at most max_groups)")
