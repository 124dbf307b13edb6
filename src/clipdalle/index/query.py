"""Combined queries: several texts and images, each with a weight, positive or negative, in one search.

    terms = parse_query('2:golden retriever + #17 - fruit')     # the grammar the CLI, the API and the page share
    search_terms(index, terms, k=20)                             # [{"id", "path", "caption", "score"}, ...]

The query vector is the weighted sum of the terms' unit CLIP features, renormalised (rclip's arithmetic on
embeddings; word-vector analogies before it), so `+ #17` pulls towards an indexed image and `- fruit` pushes
away from a text. The grammar:

    query  := ["+" | "-"] term (("+" | "-") term)*      operators stand alone, between spaces
    term   := [weight ":"] body                           weight: a number such as 2 or 0.5 (default 1)
    body   := '"' text '"'                                quoted: taken literally ("a 10:30 clock - dial")
            | "#" ID                                      an image of the index, by id
            | "@" N                                       the N-th uploaded image of an API request (1-based)
            | PATH                                        an image file (command line only): ./q.png, /x.jpg, ~/y.png
            | text                                        anything else
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data.sources import IMAGE_EXTENSIONS
from ..transforms import load_image
from ..zero_shot import encode_images, encode_texts

TERM_KINDS = ("text", "image_id", "upload", "path")
MAX_TERMS = 16  # terms in one query: each text or image is one CLIP forward pass
_WEIGHT = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*:\s*(.*)$", re.DOTALL)


@dataclass(frozen=True)
class Term:
    kind: str  # text | image_id (an indexed image) | upload (the N-th uploaded image) | path (an image file)
    value: str  # the text, the id, the upload number or the path, as written
    weight: float = 1.0  # signed: a "-" term has a negative weight

    def describe(self) -> str:
        body = {"text": self.value, "image_id": f"#{self.value}", "upload": f"@{self.value}", "path": self.value}
        return f"{self.weight:g}:{body[self.kind]}"


def _split(text: str) -> list[tuple[str, str]]:
    """(sign, raw term) pairs: the query cut at "+" and "-" that stand alone between spaces, outside quotes."""
    parts: list[tuple[str, str]] = []
    sign, current, quoted = "+", [], False
    index = 0
    while index < len(text):
        char = text[index]
        if char == '"':
            quoted = not quoted
        at_boundary = (index == 0 or text[index - 1].isspace()) and (
            index + 1 == len(text) or text[index + 1].isspace()
        )
        if char in "+-" and not quoted and at_boundary:
            if "".join(current).strip():
                parts.append((sign, "".join(current)))
            elif parts:
                raise ValueError(f"query {text[:80]!r}: two operators in a row; put a term between them")
            sign, current = char, []
        else:
            current.append(char)
        index += 1
    if quoted:
        raise ValueError(f"query {text[:80]!r}: a quote is not closed")
    if "".join(current).strip():
        parts.append((sign, "".join(current)))
    elif parts or sign != "+":
        raise ValueError(f"query {text[:80]!r}: ends with an operator; put a term after it")
    return parts


def _looks_like_path(body: str) -> bool:
    return body.startswith(("./", "../", "/", "~/")) or body.lower().endswith(IMAGE_EXTENSIONS)


def parse_query(text: str, allow_paths: bool = False) -> list[Term]:
    """Terms of a query in the grammar above. `allow_paths` (the command line) reads PATH terms as image files;
    elsewhere a term that looks like a path is an error, so a server never opens a file it was not given."""
    if not text.strip():
        raise ValueError("query is empty; expected a description such as 'a red circle', or terms such as 'a + b - c'")
    terms = []
    for sign, raw in _split(text):
        weight = 1.0
        match = _WEIGHT.match(raw)
        if match:
            weight, raw = float(match.group(1)), match.group(2)
        body = raw.strip()
        if not body:
            raise ValueError(f"query term {raw!r}: a weight without a term; write e.g. '2:a red circle'")
        signed = -weight if sign == "-" else weight
        if len(body) >= 2 and body[0] == body[-1] == '"':
            terms.append(Term("text", body[1:-1].strip(), signed))
        elif re.fullmatch(r"#[0-9]+", body):
            terms.append(Term("image_id", body[1:], signed))
        elif re.fullmatch(r"@[0-9]+", body):
            terms.append(Term("upload", body[1:], signed))
        elif _looks_like_path(body) and " " not in body:
            if not allow_paths:
                raise ValueError(
                    f"query term {body[:80]!r}: image files are read by the command line only; upload the image "
                    "(@1) or name an indexed one (#ID)"
                )
            terms.append(Term("path", body, signed))
        else:
            terms.append(Term("text", body, signed))
    if any(term.kind == "text" and not term.value for term in terms):
        raise ValueError(f'query {text[:80]!r}: an empty quoted term ""; remove it')
    if len(terms) > MAX_TERMS:
        raise ValueError(f"query: {len(terms)} terms, more than the limit of {MAX_TERMS}")
    return terms


def apply_weights(terms: Sequence[Term], weights: Sequence[float]) -> list[Term]:
    """Terms with their weights multiplied by `weights` (one per term, non-negative: signs stay the terms')."""
    if len(weights) != len(terms):
        raise ValueError(
            f"weights: got {len(weights)} for {len(terms)} terms ({', '.join(term.describe() for term in terms)}); "
            "give one per term"
        )
    if any(weight < 0 for weight in weights):
        raise ValueError(f"weights {list(weights)}: expected non-negative numbers; subtract a term with - or --minus")
    return [replace(term, weight=term.weight * weight) for term, weight in zip(terms, weights)]


def combine(features: np.ndarray, weights: Sequence[float]) -> np.ndarray:
    """Unit features (N, D) and weights (N,) -> the unit query (1, D): sum of weight * feature, renormalised."""
    weights_array = np.asarray(weights, dtype=np.float32)
    if features.ndim != 2 or features.shape[0] != len(weights_array) or len(weights_array) == 0:
        raise ValueError(f"combine: expected features (N, D) with N = {len(weights_array)} >= 1, got {features.shape}")
    query = (weights_array[:, None] * features).sum(axis=0, keepdims=True)  # (1, D)
    norm = float(np.linalg.norm(query))
    if norm < 1e-6:
        raise ValueError("query: the terms cancel out (their weighted sum is zero); change a weight or a term")
    return (query / norm).astype(np.float32)


def term_features(index: Any, terms: Sequence[Term], uploads: Sequence[Any] = ()) -> np.ndarray:
    """Unit CLIP features (N, D) of the terms, in order: texts and images encoded by the index's CLIP, indexed
    images (#ID) read from the index, uploads (@N) from `uploads` (anything `Index.encode_images` reads). `index`
    is an open Index, or a `ClipEncoder` where there is none."""
    rows: list[np.ndarray | None] = [None] * len(terms)
    groups: dict[str, list[int]] = {}
    for position, term in enumerate(terms):
        groups.setdefault(term.kind, []).append(position)
    encoders: dict[str, Callable[[list[Term]], np.ndarray]] = {
        "text": lambda chosen: index.encode_text([term.value for term in chosen]),
        "image_id": lambda chosen: index.features_of([int(term.value) for term in chosen]),
        "upload": lambda chosen: index.encode_images([_upload(uploads, term.value) for term in chosen]),
        "path": lambda chosen: index.encode_images([_image_file(term.value) for term in chosen]),
    }
    for kind, positions in groups.items():
        features = encoders[kind]([terms[position] for position in positions])
        for position, feature in zip(positions, features):
            rows[position] = feature
    return np.stack(rows).astype(np.float32)  # (N, D)


class ClipEncoder:
    """What `term_features` reads from an index, from a CLIP alone: texts and images, but no #ID terms."""

    def __init__(self, model: Any, tokenizer: Any):
        self.model, self.tokenizer = model, tokenizer

    def encode_text(self, texts: list[str]) -> np.ndarray:
        return encode_texts(self.model, self.tokenizer, list(texts)).float().cpu().numpy()

    def encode_images(self, images: Sequence[Any]) -> np.ndarray:
        size = self.model.config.image_size
        pixels = torch.stack([load_image(image, size, name=f"query image {n}") for n, image in enumerate(images)])
        return encode_images(self.model, pixels).float().cpu().numpy()

    def features_of(self, ids: Sequence[int]) -> np.ndarray:
        raise ValueError(f"query term #{ids[0]}: #ID terms name indexed images, and there is no index here")


def _upload(uploads: Sequence[Any], number: str) -> Any:
    position = int(number)
    if not 1 <= position <= len(uploads):
        raise ValueError(f"query term @{number}: there are {len(uploads)} uploaded images (@1 .. @{len(uploads)})")
    return uploads[position - 1]


def _image_file(path: str) -> Path:
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"{path}: no such image file (query terms that look like paths are read as images)")
    return file


def search_terms(
    index: Any, terms: Sequence[Term], k: int = 20, min_score: float | None = None, uploads: Sequence[Any] = ()
) -> list[dict]:
    """The k stored images nearest to the weighted combination of `terms`, best first, as `Index.search` gives
    them ({"id", "path", "caption", "score"}: cosine with the combined query)."""
    if not terms:
        raise ValueError("search: no query terms; give a text, an image or both")
    query = combine(term_features(index, terms, uploads), [term.weight for term in terms])
    return index.search_features(query, k=k, min_score=min_score)[0]
