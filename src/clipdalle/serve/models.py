"""What a server holds: the models (loaded once, then shared by every request) and its settings.

models = load_models("runs/demo")                      # RUN/index, RUN/clip, RUN/dalle when present; the
                                                       # sampling settings its evaluation measured (RUN/eval.json)
models = load_models(index="INDEX", dalle="runs/dalle")  # or each part on its own
app = create_app(models, ServeSettings(api_key="..."))
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MIB = 1 << 20


LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")


@dataclass
class ServeSettings:
    api_key: str | None = None  # bearer token required on every route but the page, its assets and the docs
    cors_origins: list[str] = field(default_factory=list)  # origins allowed to call the API from a browser
    # Host names a request may name (its Host header): a page elsewhere can rebind its own name to 127.0.0.1 and
    # read a local server's API, but its requests then carry that name. "*" accepts any (not advised).
    allowed_hosts: list[str] = field(default_factory=lambda: list(LOCAL_HOSTS))
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
    max_stored_bytes: int = 256 * MIB  # and at most this many bytes of them (a 1024 x 1024 PNG is up to 3 MB)
    thumbnail_size: int = 256  # longest side of /api/images/ID?size=thumb in pixels
    thumbnail_dir: str | None = None  # thumbnails made once and kept here (default: INDEX/thumbnails)
    image_workers: int = 0  # image decoding/encoding and CLIP jobs run at once (0: one per core); more wait
    max_waiting_work: int = 16  # requests waiting for those at once (a page loads 6 thumbnails at once); more get 503
    max_connections: int = 128  # open connections and requests at once (uvicorn's limit_concurrency); more get 503
    keep_alive_seconds: int = 5  # an idle keep-alive connection is closed after this long
    body_timeout_seconds: float = 30.0  # a request body that stalls this long gets 408 (slow uploads hold a slot)
    device: str = "cpu"  # where the models run

    @property
    def work_slots(self) -> int:
        return self.image_workers if self.image_workers > 0 else max(1, os.cpu_count() or 1)

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
    prompts: Any = None  # clipdalle.prompts.TrainingPrompts of the DALL·E run (RUN/prompts.json), or None
    captioner: Any = None  # (model, dVAE, tokenizer) of a captioner run (clipdalle.caption.load_captioner), or None
    # generate()/inpaint()/variations() settings for every generation route: those the pipeline's evaluation
    # measured (RUN/eval.json "settings.sampling", e.g. the demo's temperature 0.85), or none
    sampling: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.index is not None and self.clip is None:
            from ..transforms import load_image

            # The index's CLIP serves classification and reranking too: one copy of the weights in memory.
            model = self.index.model
            self.clip = (model, functools.partial(load_image, size=model.config.image_size), self.index.tokenizer)
        if self.dalle is not None and (self.vae is None or self.tokenizer is None):
            raise ValueError("ServeModels: a DALL·E model needs its dVAE (vae=) and caption tokenizer (tokenizer=)")

    def sampling_settings(self, clip: Any) -> dict[str, Any]:
        """`sampling` for one call that ranks with `clip` (a bundle, or None): without `shortlist` when None."""
        return {key: value for key, value in self.sampling.items() if clip is not None or key != "shortlist"}

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
    backend: str = "auto",
) -> ServeModels:
    """Loads what a server needs, once. `pipeline_dir` supplies `index/`, `clip/` and `dalle/` (each when present);
    the keyword arguments name the parts directly and take precedence (`captioner`: a captioner run, also found
    as `captioner/`). The index opens with `clip` when given (it must have the weights the index was built with),
    else with the CLIP run it records; the CLIP's towers run on `backend` (torch | onnx | auto: clipdalle.backends)."""
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

        models.index = Index.open(index, clip=clip, device=device, backend=backend)
    elif clip is not None:
        from ..backends import load_encoder

        models.clip = load_encoder(clip, backend=backend, device=device)
    if dalle is not None:
        from ..checkpoint import load_dalle
        from ..prompts import TrainingPrompts

        models.dalle, models.vae, models.tokenizer = load_dalle(dalle, device)
        models.prompts = TrainingPrompts.load(dalle)
    if captioner is not None:
        from ..caption import load_captioner

        models.captioner = load_captioner(captioner, device)
    models.__post_init__()
    if pipeline_dir is not None and models.dalle is not None and dalle == found.get("dalle"):
        models.sampling = evaluated_sampling(Path(pipeline_dir) / "eval.json")
    return models


def evaluated_sampling(path: Path) -> dict[str, Any]:
    """The sampling settings a pipeline's evaluation used (`settings.sampling` of its eval.json), so the page and
    the APIs sample as the report measured; {} when the file is absent."""
    from ..io import read_json
    from ..sampling import check_sampling_settings

    if not path.is_file():
        return {}
    return check_sampling_settings(read_json(path).get("settings", {}).get("sampling") or {}, f"{path}: settings")
