"""The index of a collection: CLIP embeddings with their metadata (`store`), the vector search over them
(`faiss_index`) and moderation by text concepts (`moderation`).

    build_index("runs/clip", "photos/", "runs/index")
    with Index.open("runs/index") as index:
        index.search(text="a red circle", k=10)       # [{"id", "path", "caption", "score"}, ...]
"""

from .moderation import DEFAULT_THRESHOLD, parse_concepts, read_concepts
from .store import (
    Index,
    add_to_index,
    build_index,
    export_index,
    index_info,
    model_sha256,
    moderate,
    read_image,
    remove_from_index,
    search,
)

__all__ = [
    "DEFAULT_THRESHOLD",
    "Index",
    "add_to_index",
    "build_index",
    "export_index",
    "index_info",
    "model_sha256",
    "moderate",
    "parse_concepts",
    "read_concepts",
    "read_image",
    "remove_from_index",
    "search",
]
