"""Zero-shot use of a CLIP: features of texts and label prompts, classification, similarity, reranking.

    labels = parse_labels("cat, dog")                               # one grammar for the CLI, the API and files
    probs = classify(model, images, labels, tokenizer, templates=["a photo of a {}."])

Label features are a pure function of the model, the labels and the templates (the CLIP paper's prompt
ensembling); a caller that asks for the same labels many times keeps a `LabelFeatureCache` beside the model.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .models.clip import pair_logits
from .runtime import device_of, unwrap
from .transforms import resize_images

IMAGES_PER_CHUNK = 256  # images encoded at once: large sets are encoded in chunks of this many
TEXTS_PER_CHUNK = 512  # texts encoded at once


def parse_labels(text: str, source: str = "labels") -> list[str]:
    """Labels one per line, or comma-separated when the text is one line; blanks and repeats dropped."""
    parts = text.splitlines() if "\n" in text.strip() else text.split(",")
    labels = list(dict.fromkeys(part.strip() for part in parts if part.strip()))
    if not labels:
        raise ValueError(f"{source}: no labels; expected one per line or comma-separated, e.g. 'cat, dog'")
    return labels


def check_templates(templates: list[str]) -> None:
    for template in templates:
        rest = template.replace("{}", "", 1)
        if "{}" not in template or "{" in rest or "}" in rest:
            raise ValueError(
                f"template {template[:60]!r}: expected exactly one {{}} where the label goes, e.g. 'a photo of a {{}}.'"
            )


@torch.no_grad()
def encode_texts(model: nn.Module, tokenizer: Any, texts: list[str]) -> torch.Tensor:
    """Texts -> L2-normalised features (N, D), tokenised to the model's context length, in chunks."""
    model = unwrap(model)
    device = device_of(model)
    chunks = [
        model.encode_text(tokenizer(texts[i : i + TEXTS_PER_CHUNK], model.config.context_length).to(device))
        for i in range(0, len(texts), TEXTS_PER_CHUNK)
    ]
    return torch.cat(chunks) if chunks else torch.empty(0, model.config.embed_dim, device=device)


@torch.no_grad()
def encode_images(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Images (N, 3, H, W) in [0, 1] -> L2-normalised features (N, D), in chunks; images of another size than the
    model's input are resized (`transforms.resize_images`)."""
    model = unwrap(model)
    device, size = device_of(model), model.config.image_size
    chunks = [
        model.encode_image(resize_images(images[i : i + IMAGES_PER_CHUNK].to(device), size))
        for i in range(0, len(images), IMAGES_PER_CHUNK)
    ]
    return torch.cat(chunks) if chunks else torch.empty(0, model.config.embed_dim, device=device)


def label_features(
    model: nn.Module, labels: list[str], tokenizer: Any, templates: list[str] | None = None
) -> torch.Tensor:
    """One L2-normalised feature (N_lab, D) per label: the mean over templates of its prompts' features,
    renormalised (CLIP paper, section 3.1.4, prompt ensembling). `templates` default to the label itself."""
    templates = list(templates) if templates is not None else ["{}"]
    if not labels:
        raise ValueError("label_features: got no labels; expected at least one")
    check_templates(templates)
    prompts = [template.format(label) for label in labels for template in templates]
    features = encode_texts(model, tokenizer, prompts).view(len(labels), len(templates), -1)  # (N_lab, N_tpl, D)
    return F.normalize(features.mean(dim=1), dim=-1)  # (N_lab, D)


class LabelFeatureCache:
    """`label_features` remembered for the last `size` (labels, templates) asked, for one model whose weights do
    not change (a server's). Safe to share between threads."""

    def __init__(self, model: nn.Module, tokenizer: Any, size: int = 32):
        self.model, self.tokenizer, self.size = model, tokenizer, size
        self._features: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()

    def __call__(self, labels: list[str], templates: list[str] | None = None) -> torch.Tensor:
        key = (tuple(labels), None if templates is None else tuple(templates))
        with self._lock:
            if key in self._features:
                self._features.move_to_end(key)
                return self._features[key]
        features = label_features(self.model, labels, self.tokenizer, templates)
        with self._lock:
            self._features[key] = features
            while len(self._features) > self.size:
                self._features.popitem(last=False)
        return features


def probabilities(model: nn.Module, image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
    """(N_img, N_lab): softmax over labels for contrastive models, an independent sigmoid per label for SigLIP."""
    model = unwrap(model)
    logits = pair_logits(image_features, text_features, model.logit_scale.exp(), model.logit_bias)
    return logits.sigmoid() if model.config.loss == "siglip" else logits.softmax(dim=-1)


def classify(
    model: nn.Module, images: torch.Tensor, labels: list[str], tokenizer: Any, templates: list[str] | None = None
) -> torch.Tensor:
    """Zero-shot probabilities (N_img, N_lab) of images (N, 3, H, W) in [0, 1]; see `probabilities`."""
    text_features = label_features(model, labels, tokenizer, templates)
    with torch.no_grad():
        return probabilities(model, encode_images(model, images), text_features)


def similarity(model: nn.Module, images: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """Cosine similarity (N_img, N_txt) between images (N, 3, H, W) in [0, 1] and token ids (N_txt, T)."""
    model = unwrap(model)
    with torch.no_grad():
        text_features = model.encode_text(text.to(device_of(model)))
        return encode_images(model, images) @ text_features.t()


def rank(model: nn.Module, images: torch.Tensor, text: torch.Tensor, keep: int) -> torch.Tensor:
    """Indices (keep,) of the `keep` images most similar to one text (T,) or (1, T), best first (reranking)."""
    text = text.view(1, -1) if text.dim() == 1 else text
    if text.shape[0] != 1:
        raise ValueError(f"rank: expected one text of shape (T,) or (1, T), got {tuple(text.shape)}")
    if not 1 <= keep <= len(images):
        raise ValueError(f"rank: keep={keep} must be between 1 and the number of images ({len(images)})")
    scores = similarity(model, images, text)[:, 0]  # (N,)
    return scores.topk(keep).indices
