"""The shapes of the page's JSON API (/api): what each route takes and returns, as its OpenAPI schema shows."""

from __future__ import annotations

from pydantic import BaseModel, Field, StrictInt


class ErrorDetail(BaseModel):
    detail: str = Field(description="what was wrong, on one line")


ERROR_STATUSES = {
    400: "the request is malformed, or an upload is not a usable image, or the Host is not one the server answers",
    401: "the API key is missing or wrong (the server was started with --api-key)",
    404: "no such image, or a model the server did not load",
    408: "the request body stalled",
    413: "the request or an upload is larger than the server's limits",
    422: "a field is missing or out of range",
    503: "busy (see Retry-After), or the model for this route is not loaded",
}


def error_responses(model: type, statuses: dict[int, str] = ERROR_STATUSES) -> dict[int, dict]:
    """OpenAPI `responses` for the error statuses a route family answers, each with that family's error body."""
    return {status: {"model": model, "description": description} for status, description in statuses.items()}


class Limits(BaseModel):
    max_upload_bytes: int
    max_n: int
    max_keep: int
    max_k: int
    max_prompt_chars: int


class Sampling(BaseModel):
    temperature: float | None = Field(None, description="logits divided by this (absent: 1.0)")
    top_k: int | None = Field(None, description="only the k most likely image codes (absent: all)")
    top_p: float | None = Field(None, description="nucleus sampling share (absent: off)")
    cond_scale: float | None = Field(None, description="classifier-free guidance (absent: 1.0, none)")
    shortlist: int | None = Field(None, description="CLIP shortlists k x keep, the most typical are kept (absent: 1)")


class Info(BaseModel):
    images: int = Field(description="images in the index (0 without one)")
    search: bool = Field(description="an index is loaded: /api/search, /api/similar, /api/images")
    clip: bool = Field(description="a CLIP is loaded: /api/classify, /api/moderate, reranking")
    dalle: bool = Field(description="a DALL·E model is loaded: /api/generate, /api/inpaint, /v1/images/*")
    image_size: int | None = Field(description="side of generated images in pixels")
    sampling: Sampling = Field(
        description="the settings generation uses: a served pipeline folder's, from its evaluation (eval.json)"
    )
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
    notice: str | None = Field(None, description="set when the prompt names words the model never saw in training")
    images: list[GeneratedImage] = Field(description="best first")


class Suggestions(BaseModel):
    query: str
    suggestions: list[str] = Field(description="training captions of the DALL·E model, most frequent first")
