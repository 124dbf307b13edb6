"""What a server holds: the models (loaded once, then shared by every request) and its settings.

models = load_models("runs/demo")                      # RUN/index, RUN/clip, RUN/dalle when present
models = load_models(index="INDEX", dalle="runs/dalle")  # or each part on its own
app = create_app(models, ServeSettings(api_key="..."))
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MIB = 1 << 20


@dataclass
class ServeSettings:
    api_key: str | None = None  # bearer token required on every route but the page, its assets and the docs
    cors_origins: list[str] = field(default_factory=list)  # origins allowed to call the API from a browser
    rerank: int = 4  # OpenAI routes: each image is the best of this many candidates by CLIP (when CLIP is loaded)
    max_queue: int = 8  # generation requests admitted at once (the running one included); more get 503
    max_upload_bytes: int = 16 * MIB  # per uploaded file; a 16 MB PNG is already a 4000 x 4000 photo
    max_pixels: int = 16_000_000  # decoded size cap per upload (a 4000 x 4000 photo); a small file can claim more
    max_n: int = 16  # samples drawn per /api generation request: 16 tiny-model samples take seconds on 2 cores
    max_keep: int = 16  # samples returned per /api generation request
    max_k: int = 100  # search results per request: a page of thumbnails, not an export (use `index export`)
    max_prompt_chars: int = 1000  # prompt, label and query length (OpenAI's DALL·E 2 limit); models truncate anyway
    max_labels: int = 100  # zero-shot labels or moderation concepts per request
    url_seconds: int = 3600  # life of an OpenAI `response_format=url` image, as OpenAI's own urls
    max_stored_images: int = 1000  # images kept for urls at once; the oldest go first beyond it
    thumbnail_size: int = 256  # longest side of /api/images/ID?size=thumb in pixels
    device: str = "cpu"  # where the models run

    @property
    def max_request_bytes(self) -> int:
        """A whole request: two uploads (image and mask) plus the form fields."""
        return 2 * self.max_upload_bytes + MIB


@dataclass
class ServeModels:
    index: Any = None  # clipdalle.index.Index, or None: no search, similar, images
    clip: Any = None  # (model, preprocess, tokenizer) from clipdalle.clip.load, or None: no classify, moderate
    dalle: Any = None  # clipdalle.dalle.DALLE, or None: no generation
    vae: Any = None  # the dVAE the DALL·E model was trained with (RUN/vae)
    tokenizer: Any = None  # the DALL·E model's caption tokenizer (RUN/tokenizer.json)
    captioner: Any = None  # (model, dVAE, tokenizer) of a captioner run (clipdalle.caption.load_captioner), or None

    def __post_init__(self) -> None:
        if self.index is not None and self.clip is None:
            from ..transforms import load_image

            # The index's CLIP serves classification and reranking too: one copy of the weights in memory.
            model = self.index.model
            self.clip = (model, functools.partial(load_image, size=model.config.image_size), self.index.tokenizer)
        if self.dalle is not None and (self.vae is None or self.tokenizer is None):
            raise ValueError("ServeModels: a DALL·E model needs its dVAE (vae=) and caption tokenizer (tokenizer=)")

    @property
    def image_size(self) -> int | None:
        """Side of the generated images in pixels (the dVAE's image_size), or None without a DALL·E model."""
        return None if self.vae is None else int(self.vae.config.image_size)

    def close(self) -> None:
        if self.index is not None:
            self.index.close()


def load_models(
    pipeline_dir: str | Path | None = None,
    *,
    index: str | Path | None = None,
    clip: str | Path | None = None,
    dalle: str | Path | None = None,
    captioner: str | Path | None = None,
    device: str = "cpu",
) -> ServeModels:
    """Loads what a server needs, once. `pipeline_dir` supplies `index/`, `clip/` and `dalle/` (each when present);
    the keyword arguments name the parts directly and take precedence (`captioner`: a captioner run, also found
    as `captioner/`). The index opens with `clip` when given
    (it must have the weights the index was built with), else with the CLIP run it records."""
    if pipeline_dir is not None:
        root = Path(pipeline_dir)
        if not root.is_dir():
            raise FileNotFoundError(f"{root}: no such pipeline directory (expected one holding index/, clip/, dalle/)")
        found = {name: root / name for name in ("index", "clip", "dalle", "captioner") if (root / name).is_dir()}
        if not found:
            raise ValueError(f"{root}: holds none of index/, clip/, dalle/; give --index, --clip or --dalle instead")
        index = index if index is not None else found.get("index")
        clip = clip if clip is not None else found.get("clip")
        dalle = dalle if dalle is not None else found.get("dalle")
        captioner = captioner if captioner is not None else found.get("captioner")
    if index is None and clip is None and dalle is None:
        raise ValueError("nothing to serve: give a pipeline directory or at least one of index=, clip=, dalle=")
    models = ServeModels()
    if index is not None:
        from ..index import Index

        models.index = Index.open(index, clip=clip, device=device)
    elif clip is not None:
        from ..pretrained import load

        models.clip = load(clip, device=device)
    if dalle is not None:
        from ..checkpoint import load_dalle

        models.dalle, models.vae, models.tokenizer = load_dalle(dalle, device)
    if captioner is not None:
        from ..caption import load_captioner

        models.captioner = load_captioner(captioner, device)
    models.__post_init__()
    return models
