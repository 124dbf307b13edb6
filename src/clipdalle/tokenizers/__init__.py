"""Caption tokenizers: our byte-level BPE trained on a dataset's captions, and OpenAI's CLIP BPE."""

from .caption import CaptionTokenizer
from .clip_bpe import ClipTokenizer

__all__ = ["CaptionTokenizer", "ClipTokenizer"]
