"""Any CLIP a user names, loaded the same way: a clipdalle run, or OpenAI, open_clip or Hugging Face weights.

    model, preprocess, tokenizer = load("runs/clip")          # or "ViT-B-32.pt", an open_clip or HF directory

`preprocess(image)` takes a path, encoded bytes, a PIL image or a (3, H, W) tensor and gives the model's input
(3, S, S) in [0, 1]; the model applies its own mean and std inside `encode_image`.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import torch

from . import checkpoint
from .convert import HF_WEIGHTS, OPEN_CLIP_CONFIG, OPEN_CLIP_WEIGHTS, read_checkpoint, tokenizer_beside
from .models.clip import CLIP
from .tokenizers import CaptionTokenizer, ClipTokenizer
from .transforms import load_image


def load(
    path: str | Path,
    *,
    device: str | torch.device = "cpu",
    quick_gelu: bool | None = None,
    tokenizer: Any = None,
    trust_torchscript: bool = False,
    which: str = "best",
) -> tuple[CLIP, Any, Any]:
    """(model in eval mode, preprocess(image) -> (3, S, S), tokenizer) from local files; nothing is downloaded.

    Reads a clipdalle run directory, an OpenAI state-dict .pt (an OpenAI TorchScript archive only with
    trust_torchscript=True: it contains code), open_clip .bin/.safetensors files or a directory with
    open_clip_config.json, and a Hugging Face CLIPModel directory. Sizes come from the weights; the activation
    cannot, so OpenAI and open_clip "-quickgelu" weights default to QuickGELU, Hugging Face to its hidden_act,
    and `quick_gelu=True/False` overrides. `tokenizer` is a tokenizer object, or a path to our tokenizer.json,
    OpenAI's merges file or a Hugging Face tokenizer directory; by default the one beside the weights (or the
    one shipped in an installed clip/open_clip package for OpenAI weights). For a run, `which` picks its best
    weights (RUN/best/, when it kept them) or its last (see `checkpoint.load_model`)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or directory")
    if checkpoint.is_run(path):
        overrides = None if quick_gelu is None else {"activation": "quick_gelu" if quick_gelu else "gelu"}
        model = checkpoint.load_model(path, expect="clip", overrides=overrides, which=which)
        # Our caption tokenizer, or the CLIP BPE (vocab.json + merges.txt) of a run fine-tuned from OpenAI weights.
        tokenizer_source = path / checkpoint.TOKENIZER_FILE
        if not tokenizer_source.is_file():
            tokenizer_source = tokenizer_beside(path)
        if tokenizer is None and tokenizer_source is None:
            raise ValueError(
                f"{path}: the run has no {checkpoint.TOKENIZER_FILE} (nor vocab.json + merges.txt); pass tokenizer=PATH"
            )
    else:
        found = read_checkpoint(path, quick_gelu=quick_gelu, trust_torchscript=trust_torchscript)
        model = CLIP(found.config)
        model.load_state_dict(found.state_dict, strict=True)
        tokenizer_source = found.tokenizer_path
    if tokenizer is None or isinstance(tokenizer, (str, Path)):
        tokenizer = load_tokenizer(tokenizer if tokenizer is not None else tokenizer_source)
    if getattr(tokenizer, "context_length", 0) is None:  # our caption tokenizer: `tokenizer(texts)` just works
        tokenizer.context_length = model.config.context_length
    model = model.to(device).eval()
    return model, functools.partial(load_image, size=model.config.image_size), tokenizer


def weights_file(path: str | Path) -> Path:
    """The file of weights `load(path)` reads: the run's (`checkpoint.weights_path`), the file itself, or the weights an
    open_clip or Hugging Face directory holds (the first of the names `convert.read_checkpoint` tries). What an
    index records the hash of, so the hash is of the loaded weights."""
    path = Path(path)
    if checkpoint.is_run(path):
        return checkpoint.weights_path(path)
    if not path.is_dir():
        if not path.exists():
            raise FileNotFoundError(f"{path}: no such file or directory")
        return path
    names = OPEN_CLIP_WEIGHTS if (path / OPEN_CLIP_CONFIG).is_file() else HF_WEIGHTS
    found = next((path / name for name in names if (path / name).is_file()), None)
    if found is None:
        raise FileNotFoundError(f"{path}: no weights file ({' or '.join(names)})")
    return found


def load_tokenizer(source: str | Path | None) -> Any:
    """Our tokenizer.json -> CaptionTokenizer; OpenAI merges / a HF directory -> ClipTokenizer; None -> the
    merges file an installed clip or open_clip package ships."""
    if source is None:
        return ClipTokenizer.find_installed()
    source = Path(source)
    if source.is_file() and source.suffix == ".json":
        return CaptionTokenizer.load(source)
    return ClipTokenizer.from_files(source)
