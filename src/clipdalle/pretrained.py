"""Any CLIP a user names, loaded the same way: a clipdalle run, OpenAI, open_clip or Hugging Face weights on disk,
or a model name (fetched once by clipdalle.hub).

    model, preprocess, tokenizer = load("runs/clip")          # or "ViT-B-32.pt", an open_clip or HF directory
    model, preprocess, tokenizer = load("ViT-B/32")           # OpenAI's names, open_clip's ARCH/PRETRAINED tags,
    model, preprocess, tokenizer = load("google/siglip-base-patch16-224")   # hf-hub:ORG/NAME, Hub ORG/NAME repos

`preprocess(image)` takes a path, encoded bytes, a PIL image or a (3, H, W) tensor and gives the model's input
(3, S, S) in [0, 1]; the model applies its own mean and std inside `encode_image`. A path that exists wins over
a model name of the same spelling.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path
from typing import Any

import torch

from . import checkpoint, hub
from .convert import read_checkpoint, tokenizer_beside, weights_files
from .io import file_sha256
from .models.clip import CLIP
from .tokenizers import CaptionTokenizer, ClipTokenizer
from .transforms import load_image


def locate(source: str | Path) -> tuple[Path, hub.ModelFiles | None]:
    """(local path, the model's files when `source` is a model name): an existing path as it is, else a name's
    files from the caches, fetched when missing."""
    path = Path(source)
    if path.exists():
        return path, None
    name = str(source)
    if hub.kind_of(name) is None:
        raise FileNotFoundError(
            f"{path}: no such file or directory, and not a model name clipdalle knows (see `clipdalle models list`)"
        )
    files = hub.resolve(name)
    return files.path, files


def load(
    source: str | Path,
    *,
    device: str | torch.device = "cpu",
    quick_gelu: bool | None = None,
    tokenizer: Any = None,
    which: str = "best",
) -> tuple[CLIP, Any, Any]:
    """(model in eval mode, preprocess(image) -> (3, S, S), tokenizer) from a path or a model name.

    Reads a clipdalle run directory, an OpenAI .pt (a state dict, or OpenAI's TorchScript release file, whose tensors
    are read without running its code), open_clip .bin/.safetensors files or a directory with open_clip_config.json,
    a Hugging Face CLIPModel or SiglipModel directory, and the names `clipdalle models list` shows. Sizes come from
    the weights; the activation cannot, so OpenAI and open_clip "-quickgelu" weights default to QuickGELU, Hugging
    Face to its hidden_act, and `quick_gelu=True/False` overrides. `tokenizer` is a tokenizer object, or a path to
    our tokenizer.json, OpenAI's merges file or a Hugging Face tokenizer directory; by default the one beside the
    weights (or, for OpenAI weights on disk, the one shipped in an installed clip/open_clip package). For a run,
    `which` picks its best weights (RUN/best/, when it kept them) or its last (see `checkpoint.load_model`)."""
    path, files = locate(source)
    if checkpoint.is_run(path):
        overrides = None if quick_gelu is None else {"activation": "quick_gelu" if quick_gelu else "gelu"}
        model = checkpoint.load_model(path, expect="clip", overrides=overrides, which=which)
        tokenizer_source = run_tokenizer(path, siglip=model.config.is_siglip)
        if tokenizer is None and tokenizer_source is None:
            raise ValueError(
                f"{path}: the run has no {checkpoint.TOKENIZER_FILE} (nor vocab.json + merges.txt); pass tokenizer=PATH"
            )
    else:
        config = files.open_clip_config if files else None
        if quick_gelu is None and files is not None:
            quick_gelu = files.quick_gelu
        found = read_checkpoint(path, quick_gelu=quick_gelu, open_clip_config=config)
        model = CLIP(found.config)
        model.load_state_dict(found.state_dict, strict=True)
        tokenizer_source = found.tokenizer_path
        if files is not None and files.tokenizer is not None:
            tokenizer_source = files.tokenizer
    if tokenizer is None or isinstance(tokenizer, (str, Path)):
        source_path = tokenizer if tokenizer is not None else tokenizer_source
        tokenizer = load_tokenizer(source_path, siglip=model.config.is_siglip)
    if getattr(tokenizer, "context_length", 0) is None:  # our caption tokenizer: `tokenizer(texts)` just works
        tokenizer.context_length = model.config.context_length
    model = model.to(device).eval()
    return model, functools.partial(load_image, size=model.config.image_size), tokenizer


def run_tokenizer(run: Path, siglip: bool) -> Path | None:
    """Where a run's tokenizer is: our caption tokenizer (RUN/tokenizer.json), or the foreign one of a run fine-tuned
    from OpenAI weights (vocab.json + merges.txt) or from a SigLIP (spiece.model or SigLIP 2's tokenizer.json, with
    tokenizer_config.json)."""
    if siglip and any((run / name).is_file() for name in ("spiece.model", "tokenizer_config.json")):
        return run
    caption = run / checkpoint.TOKENIZER_FILE
    return caption if caption.is_file() else tokenizer_beside(run)


def load_tokenizer(source: str | Path | None, siglip: bool = False) -> Any:
    """Our tokenizer.json -> CaptionTokenizer; OpenAI merges / a HF CLIP directory -> ClipTokenizer; a SigLIP
    directory (spiece.model or tokenizer.json) -> SiglipTokenizer; None -> the merges file an installed clip or
    open_clip package ships."""
    if source is None:
        if siglip:
            raise ValueError("a SigLIP model needs its tokenizer (spiece.model or tokenizer.json); pass tokenizer=PATH")
        return ClipTokenizer.find_installed()
    source = Path(source)
    if source.is_file() and source.suffix == ".json":
        return CaptionTokenizer.load(source)
    if siglip:
        from .tokenizers.siglip import SiglipTokenizer

        return SiglipTokenizer.from_files(source if source.is_dir() else source.parent)
    return ClipTokenizer.from_files(source)


def weights_sha256(source: str | Path) -> str:
    """SHA-256 of the weights `load(source)` reads, which names the model in an index: a run's
    (`checkpoint.weights_path`: RUN/best/ when the run kept one), the file itself, the weights file(s) an open_clip or
    Hugging Face directory holds (`convert.weights_files`, the very files read; several shards hash as the SHA-256 of
    their hashes), and as its cache records it for a model name."""
    path, files = locate(source)
    if files is not None:
        return files.sha256
    if checkpoint.is_run(path):
        return file_sha256(checkpoint.weights_path(path))
    if not path.is_dir():
        return file_sha256(path)
    weights = weights_files(path)
    if len(weights) == 1:
        return file_sha256(weights[0])
    return hashlib.sha256("".join(file_sha256(part) for part in weights).encode()).hexdigest()
