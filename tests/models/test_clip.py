"""CLIP: shapes, text properties (causality, padding), losses, save/load, presets."""

import math

import pytest
import torch
from helpers import (
    BOS,
    EOS,
    FLAT_COLOURS,
    WORDS,
    WordTokenizer,
    colour_images,
    random_text,
    tiny_clip,
    tiny_clip_config,
)
from PIL import Image

from clipdalle import checkpoint
from clipdalle.clip import load
from clipdalle.config import available_presets, build_config, load_preset
from clipdalle.models.clip import CLIP, CLIPConfig, contrastive_loss, pooling_positions, siglip_loss
from clipdalle.tokenizers import CaptionTokenizer

# ------------------------------------------------------------------------------------------ contracts


def test_parameter_names_are_openai_names():
    names = set(tiny_clip().state_dict())
    for name in [
        "visual.conv1.weight",
        "visual.class_embedding",
        "visual.positional_embedding",
        "visual.ln_pre.weight",
        "visual.transformer.resblocks.0.attn.in_proj_weight",
        "visual.ln_post.bias",
        "visual.proj",
        "token_embedding.weight",
        "positional_embedding",
        "transformer.resblocks.0.mlp.c_fc.weight",
        "ln_final.weight",
        "text_projection",
        "logit_scale",
    ]:
        assert name in names
    assert "logit_bias" not in names and "logit_bias" in tiny_clip(loss="siglip").state_dict()
    resnet = set(tiny_resnet().state_dict())
    for name in ["visual.bn3.running_var", "visual.layer2.0.downsample.0.weight", "visual.attnpool.q_proj.bias"]:
        assert name in resnet


def tiny_resnet(**overrides) -> CLIP:
    torch.manual_seed(0)
    return CLIP(
        tiny_clip_config(vision_layers=[1, 1, 1, 1], vision_n_embd=8, vision_n_head=4, image_size=64, **overrides)
    )


@pytest.mark.parametrize("make", [tiny_clip, tiny_resnet], ids=["vit", "resnet"])
def test_shapes_and_unit_norm_features(make):
    model = make().eval()
    size = model.config.image_size
    images, text = torch.rand(3, 3, size, size), random_text(3, 16)
    image_features, text_features = model.encode_image(images), model.encode_text(text)
    assert image_features.shape == text_features.shape == (3, 16)
    torch.testing.assert_close(image_features.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(text_features.norm(dim=-1), torch.ones(3))
    pair = model(images[:2], text)  # forward: the two feature matrices, whatever the process group
    torch.testing.assert_close(pair[0], image_features[:2])
    torch.testing.assert_close(pair[1], text_features)
    logits_per_image, logits_per_text = model.logits(images[:2], text)  # OpenAI's forward: (B_img, B_txt)
    assert logits_per_image.shape == (2, 3)
    torch.testing.assert_close(logits_per_text, logits_per_image.t())
    scale = model.logit_scale.exp()
    torch.testing.assert_close(logits_per_image, scale * image_features[:2] @ text_features.t())


def test_encode_image_normalises_with_the_configured_mean_and_std():
    model = tiny_clip().eval()
    images = torch.rand(2, 3, 32, 32)
    other = tiny_clip(image_mean=[0.0, 0.0, 0.0], image_std=[1.0, 1.0, 1.0]).eval()
    mean, std = torch.tensor(model.config.image_mean), torch.tensor(model.config.image_std)
    shifted = (images - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    torch.testing.assert_close(model.encode_image(images), other.encode_image(shifted))


def test_bad_inputs_and_configs_are_value_errors():
    model = tiny_clip()
    with pytest.raises(ValueError, match=r"expected images of shape \(B, 3, 32, 32\), got \(2, 3, 16, 16\)"):
        model.encode_image(torch.rand(2, 3, 16, 16))
    with pytest.raises(ValueError, match=r"1 <= T <= 16, got \(2, 20\)"):
        model.encode_text(torch.zeros(2, 20, dtype=torch.long))
    with pytest.raises(ValueError, match="expected integer token ids"):
        model.encode_text(torch.zeros(2, 4))
    with pytest.raises(ValueError, match="activation 'relu'"):
        tiny_clip_config(activation="relu")
    with pytest.raises(ValueError, match="text_n_embd 16 is not divisible by text_n_head 3"):
        tiny_clip_config(text_n_head=3)
    with pytest.raises(ValueError, match="image_size 30 is not divisible by vision_patch_size 8"):
        tiny_clip_config(image_size=30)
    with pytest.raises(ValueError, match="4 stages"):
        tiny_clip_config(vision_layers=[1, 1])


# ------------------------------------------------------------------------------------------ text properties


def test_pooling_positions():
    text = torch.tensor([[1, 5, 2, 0], [1, 2, 7, 2], [1, 5, 6, 7]])
    assert pooling_positions(text, "first_eos", 2).tolist() == [2, 1, 3]  # no eos: the last position
    assert pooling_positions(torch.tensor([[4, 9, 3, 0]]), "argmax", 2).tolist() == [1]


def test_tokens_after_end_of_text_never_change_the_feature():
    model = tiny_clip().eval()
    text = random_text(4, 16, seed=1)
    features = model.encode_text(text)
    changed = text.clone()
    for row in range(4):
        end = int((text[row] == EOS).nonzero()[0])
        changed[row, end + 1 :] = torch.randint(3, 64, (16 - end - 1,))
    torch.testing.assert_close(model.encode_text(changed), features, atol=1e-6, rtol=0)
    changed[:, 1] = (text[:, 1] - 3 + 1) % 61 + 3  # a word before the end does change it
    assert (model.encode_text(changed) - features).abs().amax(dim=1).min() > 1e-4


def test_padding_and_batch_neighbours_do_not_change_text_features():
    model = tiny_clip().eval()
    short = torch.tensor([[BOS, 7, 8, EOS, 0, 0]])
    long = torch.tensor([[BOS, 9, 10, 11, 12, 13, 14, EOS]])
    alone = model.encode_text(short)
    padded = model.encode_text(torch.cat([short, torch.zeros(1, 10, dtype=torch.long)], dim=1))  # to 16
    short_in_batch = torch.zeros(2, 16, dtype=torch.long)
    short_in_batch[0, :6], short_in_batch[1, :8] = short[0], long[0]
    batched = model.encode_text(short_in_batch)
    torch.testing.assert_close(padded, alone, atol=1e-6, rtol=0)
    torch.testing.assert_close(batched[:1], alone, atol=1e-6, rtol=0)
    torch.testing.assert_close(batched[1:], model.encode_text(long), atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------------------ losses


def test_contrastive_loss_matches_its_definition_and_is_low_for_identical_features():
    torch.manual_seed(0)
    image_features = torch.nn.functional.normalize(torch.randn(6, 8), dim=-1)
    text_features = torch.nn.functional.normalize(torch.randn(6, 8), dim=-1)
    scale = torch.tensor(10.0)
    logits = scale * image_features @ text_features.t()
    labels = torch.arange(6)
    expected = (
        torch.nn.functional.cross_entropy(logits, labels) + torch.nn.functional.cross_entropy(logits.t(), labels)
    ) / 2
    torch.testing.assert_close(contrastive_loss(image_features, text_features, scale), expected)
    orthogonal = torch.eye(6, 8)
    assert contrastive_loss(orthogonal, orthogonal, torch.tensor(100.0)) < 1e-6
    assert contrastive_loss(orthogonal, orthogonal.roll(1, dims=0), torch.tensor(100.0)) > 50


def test_siglip_loss_matches_its_definition_and_prefers_matching_pairs():
    torch.manual_seed(0)
    image_features = torch.nn.functional.normalize(torch.randn(5, 8), dim=-1)
    text_features = torch.nn.functional.normalize(torch.randn(5, 8), dim=-1)
    scale, bias = torch.tensor(10.0), torch.tensor(-5.0)
    logits = scale * image_features @ text_features.t() + bias
    signs = 2 * torch.eye(5) - 1
    expected = -torch.nn.functional.logsigmoid(signs * logits).sum() / 5
    torch.testing.assert_close(siglip_loss(image_features, text_features, scale, bias), expected)
    orthogonal = torch.eye(5, 8)
    assert siglip_loss(orthogonal, orthogonal, scale, bias) < 0.05
    assert siglip_loss(orthogonal, orthogonal.roll(1, dims=0), scale, bias) > 5


def test_clamp_logit_scale_after_step():
    model = tiny_clip()
    with torch.no_grad():
        model.logit_scale.fill_(7.0)
    model.after_step()
    assert model.logit_scale.item() == pytest.approx(math.log(100))


# ------------------------------------------------------------------------------------------ save / load, presets


def test_save_and_load_are_bit_equal(tmp_path):
    model = tiny_clip(seed=3).eval()
    checkpoint.save_model(tmp_path / "run", model)
    loaded = checkpoint.load_model(tmp_path / "run", expect="clip")
    images, text = colour_images(), random_text(4, 16)
    assert torch.equal(loaded.encode_image(images), model.encode_image(images))
    assert torch.equal(loaded.encode_text(text), model.encode_text(text))
    assert loaded.config == model.config
    tokenizer = WordTokenizer(WORDS)
    via_load, prepare, same_tokenizer = load(tmp_path / "run", tokenizer=tokenizer)
    assert same_tokenizer is tokenizer and not via_load.training
    assert torch.equal(via_load.encode_text(text), model.encode_text(text))
    assert prepare(Image.new("RGB", (40, 50))).shape == (3, 32, 32)
    with pytest.raises(ValueError, match=r"no tokenizer.json \(nor vocab.json \+ merges.txt\); pass tokenizer=PATH"):
        load(tmp_path / "run")


def test_load_reads_the_runs_caption_tokenizer(tmp_path):
    captions = [f"a {colour} icon of a {shape}" for colour in FLAT_COLOURS for shape in ("star", "cloud", "heart")]
    tokenizer = CaptionTokenizer.train(captions, vocab_size=300)
    model = tiny_clip(vocab_size=tokenizer.vocab_size).eval()
    checkpoint.save_model(tmp_path / "run", model)
    tokenizer.save(tmp_path / "run" / checkpoint.TOKENIZER_FILE)
    loaded, _, loaded_tokenizer = load(tmp_path / "run")
    assert isinstance(loaded_tokenizer, CaptionTokenizer)
    text = loaded_tokenizer(["a red icon of a star"], loaded.config.context_length)
    assert torch.equal(text, tokenizer(["a red icon of a star"], 16))
    assert torch.equal(loaded.encode_text(text), model.encode_text(text))


def test_presets_build_and_openai_shapes_have_openai_parameter_counts():
    names = [name for name in available_presets() if name.startswith("clip-")]
    assert {"clip-tiny", "clip-demo", "clip-vit-b-32", "clip-vit-b-16", "clip-vit-l-14", "clip-rn50"} <= set(names)
    counts = {"clip-vit-b-32": 151_277_313, "clip-vit-b-16": 149_620_737, "clip-vit-l-14": 427_616_513}
    counts["clip-rn50"] = 102_007_137  # OpenAI's published counts
    counts["clip-siglip-b-16"] = 203_155_970  # transformers' SiglipModel() with its default (ViT-B/16) config
    for name in names:
        config = build_config(CLIPConfig, load_preset(name)["model"], source=name)
        with torch.device("meta"):  # shapes only: no memory, no initialisation cost
            model = CLIP(config)
        parameters = sum(param.numel() for param in model.parameters())
        if name in counts:
            assert parameters == counts[name], name
    assert sum(param.numel() for param in tiny_clip().parameters()) < 20_000
    for name in ("clip-tiny", "clip-demo"):  # trained with our caption tokenizer: pool at its end token
        model = load_preset(name)["model"]
        assert (model["text_pooling"], model["eos_id"]) == ("first_eos", CaptionTokenizer.eos_id), name
