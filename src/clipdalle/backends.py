"""Where a CLIP's towers run: torch (the model itself) or onnxruntime (the two graphs `export_onnx` writes).

    export_onnx("ViT-B/32", "clip-onnx/")                    # image.onnx, text.onnx, tokenizer, clipdalle_onnx.json
    encoder, preprocess, tokenizer = load_encoder("ViT-B/32", backend="onnx")
    encoder.encode_image(images)                             # (B, 3, S, S) in [0, 1] -> (B, D) unit norm
    encoder.encode_text(tokenizer(["a cat"], encoder.config.context_length))

Both backends give an object with the CLIP's interface that index, search, classification and the server use:
`encode_image`, `encode_text`, `config`, `logit_scale`, `logit_bias` (an `OnnxCLIP` is a torch Module without
parameters, so `.to()`, `.eval()` and clipdalle.runtime's helpers work on it). The image graph takes pixels in
[0, 1] and normalises them itself; the text graph takes whole rows of `context_length` ids; both have a dynamic
batch. `load_encoder(source, backend="onnx")` exports a model once into CLIPDALLE_CACHE/onnx/ and reuses it.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import hub, pretrained
from .config import from_dict, to_dict
from .io import read_json, write_json
from .models.clip import CLIP, CLIPConfig, check_images, check_text, pair_logits, pooling_positions
from .tokenizers import CaptionTokenizer, ClipTokenizer
from .transforms import load_image

BACKENDS = ("auto", "torch", "onnx")
# What `auto` picks where onnxruntime is installed (CLIPDALLE_BACKEND overrides it): benchmarks/bench_onnx.py measured
# onnxruntime faster than torch for both towers at batch 1 and 32 on this CPU (RESULTS.md, "ONNX").
DEFAULT_BACKEND = "onnx"
ONNX_CONFIG = "clipdalle_onnx.json"
IMAGE_GRAPH = "image.onnx"
TEXT_GRAPH = "text.onnx"
FORMAT_VERSION = 1
OPSET = 18


# ------------------------------------------------------------------------------------------ export


class _ImageTower(nn.Module):
    def __init__(self, model: CLIP):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(images)


class _TextTower(nn.Module):
    """encode_text as a graph: the positions read are computed inside it, the caller cuts the rows (a CLIP text
    tower is causal, so ids after the last end token change nothing; SigLIP's reads whole rows)."""

    def __init__(self, model: CLIP):
        super().__init__()
        self.model = model

    def forward(self, text: torch.Tensor) -> torch.Tensor:
        config = self.model.config
        return self.model.encode_text_at(text, pooling_positions(text, config.text_pooling, config.eos_id))


def export_onnx(source: str | Path, out: str | Path, *, quick_gelu: bool | None = None) -> Path:
    """Writes the CLIP at `source` (a path or a model name) as OUT/image.onnx and OUT/text.onnx (dynamic batch),
    its tokenizer's files, and OUT/clipdalle_onnx.json (config, preprocessing, logit scale and bias)."""
    _require("onnx", "onnxscript")
    model, _, tokenizer = pretrained.load(source, quick_gelu=quick_gelu)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = model.config
    batch = torch.export.Dim("batch", min=1, max=65536)
    text_shape = {0: batch}  # SigLIP reads whole rows; a CLIP text graph takes rows cut after their last end token
    if not config.is_siglip:  # (2 ids at least: torch.export fixes dimensions of size 1)
        text_shape[1] = torch.export.Dim("length", min=2, max=config.context_length)
    images = torch.rand(2, 3, config.image_size, config.image_size)
    text = torch.zeros(2, config.context_length, dtype=torch.long)
    text[:, 0], text[:, 1] = 1, config.vocab_size - 1
    graphs = ((_ImageTower(model), images, "images", "image_features", IMAGE_GRAPH, {0: batch}),
              (_TextTower(model), text, "text", "text_features", TEXT_GRAPH, text_shape))  # fmt: skip
    for tower, example, input_name, output_name, file_name, dynamic in graphs:
        temporary = out / f".{file_name}.tmp"
        with torch.no_grad(), contextlib.redirect_stdout(sys.stderr):  # the exporter prints its progress
            program = torch.onnx.export(
                tower.eval(),
                (example,),
                input_names=[input_name],
                output_names=[output_name],
                dynamic_shapes={input_name: dynamic},
                dynamo=True,
                opset_version=OPSET,
                verbose=False,
            )
        program.save(str(temporary))
        os.replace(temporary, out / file_name)
    write_json(out / ONNX_CONFIG, {
        "clipdalle_onnx": {"format_version": FORMAT_VERSION},
        "source": str(source),
        "weights_sha256": pretrained.weights_sha256(source),
        "config": to_dict(config),
        "logit_scale": model.logit_scale.item(),
        "logit_bias": None if model.logit_bias is None else model.logit_bias.item(),
        "tokenizer": _save_tokenizer(tokenizer, out),
        "image_input": {
            "name": "images", "shape": ["batch", 3, config.image_size, config.image_size], "dtype": "float32",
            "range": [0.0, 1.0], "color": "RGB",
            "resize": "shorter side to image_size with Lanczos, then a centre crop (clipdalle.transforms.load_image)",
            "normalised_inside": {"mean": config.image_mean, "std": config.image_std},
        },
        "text_input": {
            "name": "text", "dtype": "int64",
            "shape": ["batch", config.context_length if config.is_siglip else f"length <= {config.context_length}"],
            "rows": "whole rows as the tokenizer pads them" if config.is_siglip
            else "rows as the tokenizer pads them, or cut after their last end token (2 ids at least)",
        },
        "outputs": {"image_features": ["batch", config.embed_dim], "text_features": ["batch", config.embed_dim]},
        "probabilities": "sigmoid(exp(logit_scale) * cosine + logit_bias)" if config.loss == "siglip"
        else "softmax over labels of exp(logit_scale) * cosine",
    })  # fmt: skip
    return out


def _save_tokenizer(tokenizer: Any, out: Path) -> str:
    if isinstance(tokenizer, CaptionTokenizer):
        tokenizer.save(out / "tokenizer.json")
        return "caption"
    if isinstance(tokenizer, ClipTokenizer):
        tokenizer.save(out)
        return "clip_bpe"
    from .tokenizers.siglip import SiglipTokenizer

    if isinstance(tokenizer, SiglipTokenizer):
        tokenizer.save(out)
        return "siglip"
    raise ValueError(f"export onnx: cannot save a {type(tokenizer).__name__} tokenizer beside the graphs")


def _require(*packages: str) -> None:
    import importlib.util

    missing = [package for package in packages if importlib.util.find_spec(package) is None]
    if missing:
        raise ValueError(f"ONNX needs {', '.join(missing)}: pip install 'clipdalle[onnx]'")


# ------------------------------------------------------------------------------------------ runtime


class OnnxCLIP(nn.Module):
    """A CLIP's two towers as onnxruntime sessions, with the CLIP's interface (features, config, logit scale)."""

    model_type = "clip"

    def __init__(self, image_session: Any, text_session: Any, config: CLIPConfig, logit_scale: float,
                 logit_bias: float | None):  # fmt: skip
        super().__init__()
        self.image_session, self.text_session, self.config = image_session, text_session, config
        self.register_buffer("logit_scale", torch.tensor(logit_scale), persistent=False)
        self.logit_bias = None if logit_bias is None else torch.tensor(logit_bias)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [0, 1] -> L2-normalised features (B, embed_dim), as CLIP.encode_image."""
        check_images(images, self.config.image_size)
        if images.shape[0] == 0:
            return torch.empty(0, self.config.embed_dim)
        pixels = images.detach().to("cpu", torch.float32).contiguous().numpy()
        return torch.from_numpy(self.image_session.run(None, {"images": pixels})[0])

    def encode_text(self, text: torch.Tensor) -> torch.Tensor:
        """Token ids (B, T), T <= context_length -> L2-normalised features (B, embed_dim), as CLIP.encode_text."""
        length = self.config.context_length
        check_text(text, length)
        if text.shape[0] == 0:
            return torch.empty(0, self.config.embed_dim)
        text = text.detach().to("cpu", torch.long)
        if self.config.is_siglip:  # reads whole rows
            text = torch.nn.functional.pad(text, (0, length - text.shape[1]))
        else:  # causal: cut after the last end token, as CLIP.encode_text does (2 ids at least, see export_onnx)
            positions = pooling_positions(text, self.config.text_pooling, self.config.eos_id)
            text = torch.nn.functional.pad(text, (0, max(2 - text.shape[1], 0)))[:, : max(int(positions.max()) + 1, 2)]
        return torch.from_numpy(self.text_session.run(None, {"text": text.contiguous().numpy()})[0])

    def forward(self, images: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encode_image(images), self.encode_text(text)

    def logits(self, images: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        image_features, text_features = self(images, text)
        logits_per_image = pair_logits(image_features, text_features, self.logit_scale.exp(), self.logit_bias)
        return logits_per_image, logits_per_image.t()


def is_onnx_export(path: str | Path) -> bool:
    return (Path(path) / ONNX_CONFIG).is_file()


def load_onnx(folder: str | Path, *, threads: int | None = None) -> tuple[OnnxCLIP, Any, Any]:
    """(OnnxCLIP, preprocess, tokenizer) from a folder `export_onnx` wrote; `threads` defaults to torch's count."""
    try:
        import onnxruntime
    except ImportError:
        raise ValueError("--backend onnx needs onnxruntime: pip install 'clipdalle[onnx]'") from None
    folder = Path(folder)
    values = read_json(folder / ONNX_CONFIG)
    if values.get("clipdalle_onnx", {}).get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(f"{folder / ONNX_CONFIG}: written by a newer clipdalle; upgrade clipdalle or export again")
    config = from_dict(CLIPConfig, values["config"], source=str(folder / ONNX_CONFIG))
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    sessions = [
        onnxruntime.InferenceSession(str(folder / name), options, providers=["CPUExecutionProvider"])
        for name in (IMAGE_GRAPH, TEXT_GRAPH)
    ]
    model = OnnxCLIP(*sessions, config, values["logit_scale"], values.get("logit_bias"))
    kind = values.get("tokenizer")
    if kind == "caption":
        tokenizer = CaptionTokenizer.load(folder / "tokenizer.json")
        tokenizer.context_length = config.context_length
    else:
        tokenizer = pretrained.load_tokenizer(folder, siglip=kind == "siglip")
    return model.eval(), functools.partial(load_image, size=config.image_size), tokenizer


# ------------------------------------------------------------------------------------------ choosing


def onnx_available() -> bool:
    import importlib.util

    return all(importlib.util.find_spec(package) is not None for package in ("onnxruntime", "onnx", "onnxscript"))


def resolve_backend(backend: str, device: str | torch.device = "cpu") -> str:
    """auto -> CLIPDALLE_BACKEND if set, else DEFAULT_BACKEND; onnx only where onnxruntime and the exporter are
    installed and the device is a CPU, torch otherwise."""
    if backend not in BACKENDS:
        raise ValueError(f"--backend {backend!r}: expected one of {', '.join(BACKENDS)}")
    on_cpu = torch.device(device).type == "cpu"
    if backend == "onnx" and not on_cpu:
        raise ValueError(
            f"--backend onnx runs on the CPU (onnxruntime's CPU provider); use --backend torch on {device}"
        )
    if backend == "auto":
        preferred = os.environ.get("CLIPDALLE_BACKEND") or DEFAULT_BACKEND
        if preferred not in ("torch", "onnx"):
            raise ValueError(f"CLIPDALLE_BACKEND={preferred!r}: expected torch or onnx")
        return "onnx" if preferred == "onnx" and on_cpu and onnx_available() else "torch"
    return backend


def export_folder(source: str | Path) -> Path:
    """Where `load_encoder` keeps the ONNX export of a model: CLIPDALLE_CACHE/onnx/<weights SHA-256>."""
    return hub.cache_dir() / "onnx" / pretrained.weights_sha256(source)[:32]


def load_encoder(
    source: str | Path, *, backend: str = "torch", device: str | torch.device = "cpu"
) -> tuple[nn.Module, Any, Any]:
    """(encoder, preprocess, tokenizer) for a CLIP path, model name or ONNX export folder on `backend`: torch's
    CLIP, or an OnnxCLIP (a model that is not an export yet is exported once, into `export_folder`)."""
    if is_onnx_export(source):
        if backend == "torch":
            raise ValueError(f"{source}: an ONNX export runs on onnxruntime; use --backend onnx (or auto)")
        return load_onnx(source)
    if resolve_backend(backend, device) == "torch":
        return pretrained.load(source, device=device)
    folder = export_folder(source)
    if not is_onnx_export(folder):
        export_onnx(source, folder)
    return load_onnx(folder)


def weights_sha256(source: str | Path) -> str:
    """The SHA-256 of the CLIP weights at `source`, an ONNX export's included (it records its model's)."""
    if is_onnx_export(source):
        return read_json(Path(source) / ONNX_CONFIG)["weights_sha256"]
    return pretrained.weights_sha256(source)
