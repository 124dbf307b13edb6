"""CLIP's public API in one import, shaped like OpenAI's `clip` package (each name is defined in its own module):

    from clipdalle import clip
    model, preprocess, tokenizer = clip.load("ViT-B/32")        # clipdalle.pretrained: a path or a model name
    clip.available_models()                                      # clipdalle.hub: OpenAI's, open_clip's, the Hub's
    probs = clip.classify(model, images, ["a cat", "a dog"], tokenizer, templates=["a photo of {}."])

The model is clipdalle.models.clip; zero-shot helpers are clipdalle.zero_shot.
"""

from .hub import available_models
from .models.clip import CLIP, OPENAI_IMAGE_MEAN, OPENAI_IMAGE_STD, CLIPConfig
from .pretrained import load
from .transforms import load_image as preprocess
from .zero_shot import classify, label_features, rank, similarity

__all__ = [
    "CLIP",
    "OPENAI_IMAGE_MEAN",
    "OPENAI_IMAGE_STD",
    "CLIPConfig",
    "available_models",
    "classify",
    "label_features",
    "load",
    "preprocess",
    "rank",
    "similarity",
]
