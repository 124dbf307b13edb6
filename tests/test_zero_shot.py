"""Zero-shot helpers: label features from prompt templates, classification, similarity, reranking, preprocessing."""

import pytest
import torch
from helpers import FLAT_COLOURS, WORDS, WordTokenizer, colour_images, random_text, tiny_clip
from PIL import Image

from clipdalle.clip import preprocess
from clipdalle.zero_shot import LabelFeatureCache, classify, label_features, parse_labels, rank, similarity


def test_classify_probabilities_and_prompt_ensembles():
    model = tiny_clip().eval()
    tokenizer = WordTokenizer(WORDS)
    images = colour_images()
    templates = ["a {} icon", "a photo of a {} shape"]
    probs = classify(model, images, list(FLAT_COLOURS), tokenizer, templates)
    assert probs.shape == (4, 4)
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(4))
    per_template = [model.encode_text(tokenizer([t.format(c) for c in FLAT_COLOURS], 16)) for t in templates]
    expected = torch.nn.functional.normalize(sum(per_template) / 2, dim=-1)
    torch.testing.assert_close(label_features(model, list(FLAT_COLOURS), tokenizer, templates), expected)
    siglip_probs = classify(tiny_clip(loss="siglip").eval(), images, list(FLAT_COLOURS), tokenizer)
    assert siglip_probs.shape == (4, 4) and ((siglip_probs > 0) & (siglip_probs < 1)).all()
    assert not torch.allclose(siglip_probs.sum(dim=1), torch.ones(4))  # independent per label
    with pytest.raises(ValueError, match="expected exactly one {}"):
        classify(model, images, ["red"], tokenizer, ["red things"])


def test_label_features_are_pure_and_the_cache_lives_beside_the_model(monkeypatch):
    model = tiny_clip().eval()
    tokenizer = WordTokenizer(WORDS)
    calls = []
    original = model.encode_text
    monkeypatch.setattr(model, "encode_text", lambda text: calls.append(len(text)) or original(text))
    first = label_features(model, ["red", "blue"], tokenizer)
    torch.testing.assert_close(label_features(model, ["red", "blue"], tokenizer), first)
    assert len(calls) == 2  # a pure function: computed again on every call
    cache = LabelFeatureCache(model, tokenizer, size=2)
    cached = cache(["red", "blue"])
    assert cache(["red", "blue"]) is cached and len(calls) == 3
    torch.testing.assert_close(cached, first)
    cache(["red", "green"])
    cache(["red", "yellow"])  # the oldest entry goes: the cache holds `size` label sets
    assert len(calls) == 5
    cache(["red", "blue"])
    assert len(calls) == 6


def test_labels_have_one_grammar():
    assert parse_labels("cat, dog,cat , ") == ["cat", "dog"]
    assert parse_labels("a cat, sitting\na dog\n\n") == ["a cat, sitting", "a dog"]  # lines win over commas
    with pytest.raises(ValueError, match="labels: no labels"):
        parse_labels(" , ")


def test_similarity_and_rank():
    model = tiny_clip().eval()
    images = colour_images(per_colour=2)
    text = random_text(3, 16)
    scores = similarity(model, images, text)
    assert scores.shape == (8, 3)
    assert scores.abs().max() <= 1 + 1e-6
    best = rank(model, images, text[1], keep=3)
    assert best.tolist() == scores[:, 1].argsort(descending=True)[:3].tolist()
    with pytest.raises(ValueError, match="keep=9"):
        rank(model, images, text[1], keep=9)
    with pytest.raises(ValueError, match="expected one text"):
        rank(model, images, text, keep=1)


def test_preprocess_resizes_the_shorter_side_and_centre_crops():
    image = Image.new("RGB", (90, 30), "white")
    image.paste((255, 0, 0), (30, 0, 60, 30))  # a red centre square between white sides
    tensor = preprocess(image, 32)
    assert tensor.shape == (3, 32, 32) and tensor.dtype == torch.float32
    assert 0.0 <= tensor.min() and tensor.max() <= 1.0
    torch.testing.assert_close(tensor[:, 16, 16], torch.tensor([1.0, 0.0, 0.0]))
    assert tensor[1:].mean() < 0.05  # the white sides were cropped away


def test_a_siglip_shaped_model_classifies_ranks_and_guides():
    from helpers import tiny_clip_config

    from clipdalle.guide import guide
    from clipdalle.models.clip import CLIP
    from clipdalle.models.dvae import DiscreteVAE, DVAEConfig

    torch.manual_seed(0)
    config = tiny_clip_config(architecture="siglip", text_pooling="last", loss="siglip", activation="gelu_tanh")
    model = CLIP(config).eval()
    tokenizer = WordTokenizer(WORDS)
    probs = classify(model, colour_images(), list(FLAT_COLOURS), tokenizer, ["a {} icon"])
    assert probs.shape == (4, 4) and ((probs > 0) & (probs < 1)).all()  # a sigmoid per label
    assert rank(model, colour_images(), tokenizer(["a red icon"], 16), keep=2).shape == (2,)
    vae = DiscreteVAE(DVAEConfig(image_size=16, vocab_size=8, n_embd=8, n_hidden=8)).eval()
    result = guide(vae, model, tokenizer, "a red icon", steps=2, seed=0)
    assert result.image.shape == (3, 16, 16)
