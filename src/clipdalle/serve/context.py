"""What every route of one server shares: the loaded models, the settings, the generation queue, the limiter of
image work, the label-feature cache, and the checks a request goes through before any work (each a 4xx naming the
field)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import UploadFile
from PIL import Image

from ..index import parse_concepts
from ..zero_shot import LabelFeatureCache, check_templates, parse_labels
from .common import ApiError, decode_upload
from .limits import GenerationQueue, WorkLimiter, read_upload
from .models import ServeModels, ServeSettings

DEFAULT_KEEP = 4  # /api/generate and /api/inpaint return this many samples unless told otherwise
MAX_SEED = 2**32 - 1


@dataclass
class ServeContext:
    models: ServeModels
    settings: ServeSettings
    queue: GenerationQueue
    work: WorkLimiter  # decoding, encoding and CLIP jobs: `await context.work.run(job)`
    label_features: LabelFeatureCache | None = field(init=False)  # the CLIP's label features, per label set

    def __post_init__(self) -> None:
        clip = self.models.clip
        self.label_features = None if clip is None else LabelFeatureCache(clip[0], clip[2])

    # -------------------------------------------------------------------------------------- what is loaded

    def need_index(self) -> Any:
        if self.models.index is None:
            raise ApiError(503, "this server has no index loaded; start it with --index INDEX to search")
        return self.models.index

    def need_clip(self) -> tuple[Any, Any, Any]:
        if self.models.clip is None:
            raise ApiError(503, "this server has no CLIP model loaded; start it with --clip RUN or --index INDEX")
        return self.models.clip

    def need_dalle(self) -> None:
        if self.models.dalle is None:
            raise ApiError(503, "this server has no DALL·E model loaded; start it with --dalle RUN to generate")

    # -------------------------------------------------------------------------------------- request fields

    def check_k(self, k: int) -> None:
        if k > self.settings.max_k:
            raise ApiError(422, f"k: {k} results is more than this server's limit of {self.settings.max_k}")

    def check_text(self, name: str, text: str, allow_empty: bool = False) -> str:
        limit = self.settings.max_prompt_chars
        if len(text) > limit:
            raise ApiError(422, f"{name}: {len(text)} characters is more than the limit of {limit}")
        if not allow_empty and not text.strip():
            raise ApiError(422, f"{name}: is empty; expected a description such as 'a red circle'")
        return text.strip()

    def check_samples(self, n: int, keep: int | None) -> int:
        if not 1 <= n <= self.settings.max_n:
            raise ApiError(422, f"n: {n} samples is outside 1 to {self.settings.max_n}, this server's limit")
        keep = min(DEFAULT_KEEP, n) if keep is None else keep
        if not 1 <= keep <= min(n, self.settings.max_keep):
            raise ApiError(422, f"keep: {keep} must be between 1 and n={n} (at most {self.settings.max_keep})")
        return keep

    def check_seed(self, seed: int | None) -> None:
        if seed is not None and not 0 <= seed <= MAX_SEED:
            raise ApiError(422, f"seed: {seed} is outside 0 to {MAX_SEED}")

    def check_labels(self, text: str) -> list[str]:
        """Labels in the grammar of `zero_shot.parse_labels`, 2 to max_labels of them, each within the text limit."""
        try:
            labels = parse_labels(text, "labels")
        except ValueError as error:
            raise ApiError(422, str(error)) from None
        self._check_names("labels", labels, minimum=2)
        return labels

    def check_template(self, template: str) -> str:
        self.check_text("template", template)
        try:
            check_templates([template])
        except ValueError as error:
            raise ApiError(422, str(error)) from None
        return template

    def check_concepts(self, text: str) -> list[tuple[str, float | None]]:
        """Concepts as a concepts file gives them (`clipdalle.index.parse_concepts`); errors name the form field."""
        try:
            concepts = parse_concepts(text, source="concepts")
        except ValueError as error:
            raise ApiError(422, str(error)) from None
        self._check_names("concepts", [name for name, _ in concepts], minimum=1)
        return concepts

    def _check_names(self, field_name: str, names: list[str], minimum: int) -> None:
        limit = self.settings.max_labels
        if not minimum <= len(names) <= limit:
            raise ApiError(
                422, f"{field_name}: got {len(names)} distinct entries, expected {minimum} to {limit} (one per line)"
            )
        too_long = next((name for name in names if len(name) > self.settings.max_prompt_chars), None)
        if too_long is not None:
            raise ApiError(
                422,
                f"{field_name}: an entry of {len(too_long)} characters is longer than {self.settings.max_prompt_chars}",
            )

    # -------------------------------------------------------------------------------------- uploads

    async def upload(self, upload: UploadFile, field_name: str) -> tuple[bytes, str]:
        """(the file's bytes, a safe display name), within the upload cap."""
        data = await read_upload(upload, self.settings.max_upload_bytes, field_name)
        return data, Path(upload.filename or field_name).name[:200]

    def decode(self, data: bytes, name: str, param: str | None = None) -> Image.Image:
        """Upload bytes -> an RGB image within the server's pixel cap; a 400 naming the file otherwise."""
        return decode_upload(data, name, param, max_pixels=self.settings.max_pixels)
