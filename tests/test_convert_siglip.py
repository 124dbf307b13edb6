"""Shapes in common use: MLPs of any width (ViT-bigG-14's 4.9231x, Hugging Face's free intermediate_size), a text
tower wider than the image tower, and SigLIP / SigLIP 2 from transformers' SiglipModel and open_clip's layout (a
timm ViT), each checked at 1e-5 in fp32 against the reference library with random weights."""

import json

import pytest
import torch
from safetensors.torch import save_file

from clipdalle import checkpoint, convert
from clipdalle.clip import CLIP, CLIPConfig, load
from clipdalle.convert import read_checkpoint

transformers = pytest.importorskip("transformers", reason="transformers is not installed (pip install transformers)")

VOCAB = 99


def no_tokenizer(texts, length):  # load() returns the tokenizer it is given; these tests feed ids directly
    raise AssertionError("the tests pass token ids")


def randomise_(module: torch.nn.Module, seed: int) -> None:
    """Every weight random (initialisation leaves biases at 0 and norms at 1): gains near 1, the rest small."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in module.named_parameters():
            noise = torch.randn(tensor.shape, generator=generator)
            is_gain = name.endswith("weight") and tensor.dim() == 1
            tensor.copy_(1 + 0.1 * noise if is_gain else (torch.tensor(2.0) if "logit_scale" in name else 0.1 * noise))


def normalise(features) -> torch.Tensor:
    features = features if isinstance(features, torch.Tensor) else features.pooler_output
    return torch.nn.functional.normalize(features.float(), dim=-1)


def tower(width: int, mlp: int, layers: int, heads: int) -> dict:
    return {"hidden_size": width, "intermediate_size": mlp, "num_hidden_layers": layers, "num_attention_heads": heads}


def check_parity(model: CLIP, images_to_reference, text_to_reference, context_length: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    size = model.config.image_size
    images = torch.rand(3, 3, size, size, generator=generator)
    text = torch.randint(1, VOCAB, (3, context_length), generator=generator)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(images), images_to_reference(images), atol=1e-5, rtol=0)
        torch.testing.assert_close(model.encode_text(text), text_to_reference(text), atol=1e-5, rtol=0)
        return images, text


# ------------------------------------------------------------------------------------------ CLIP, any MLP width

CLIP_SHAPES = {
    # (vision tower, text tower): widths, MLP widths, layers, heads
    "mlp-4.9231x": (tower(26, 128, 2, 2), tower(26, 128, 1, 2)),  # ViT-bigG-14's ratio (8192 / 1664)
    "text-wider": (tower(32, 72, 2, 2), tower(48, 100, 2, 4)),  # Hugging Face sets intermediate_size freely
}


@pytest.mark.parametrize("shape", CLIP_SHAPES, ids=list(CLIP_SHAPES))
def test_hugging_face_clip_with_any_mlp_width(tmp_path, shape):
    vision, text_tower = CLIP_SHAPES[shape]
    torch.manual_seed(0)
    config = transformers.CLIPConfig(
        text_config={**text_tower, "vocab_size": VOCAB, "max_position_embeddings": 12, "eos_token_id": 2},
        vision_config={**vision, "image_size": 32, "patch_size": 8},
        projection_dim=24,
    )
    reference = transformers.CLIPModel(config).eval()
    randomise_(reference, seed=1)
    reference.save_pretrained(tmp_path / "hf")
    model, _, _ = load(tmp_path / "hf", tokenizer=no_tokenizer)
    assert model.config.vision_mlp_width == (
        0 if vision["intermediate_size"] == 4 * vision["hidden_size"] else vision["intermediate_size"]
    )
    assert model.config.text_mlp_width == text_tower["intermediate_size"]
    mean = torch.tensor(model.config.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(model.config.image_std).view(1, 3, 1, 1)
    check_parity(
        model,
        lambda images: normalise(reference.get_image_features(pixel_values=(images - mean) / std)),
        lambda text: normalise(reference.get_text_features(input_ids=text)),
        context_length=12,
    )
    # and back: our run written as a Hugging Face directory keeps the widths
    checkpoint.save_model(tmp_path / "run", model)
    convert.convert(tmp_path / "run", tmp_path / "hf2", to="hf")
    written = json.loads((tmp_path / "hf2" / "config.json").read_text())
    assert written["vision_config"]["intermediate_size"] == vision["intermediate_size"]
    assert written["text_config"]["intermediate_size"] == text_tower["intermediate_size"]


def test_open_clip_mlp_ratio_comes_from_the_weights(tmp_path):
    torch.manual_seed(0)
    config = CLIPConfig(
        embed_dim=16, image_size=32, vision_patch_size=8, vision_n_layer=1, vision_n_embd=26, vision_n_head=2,
        context_length=8, vocab_size=VOCAB, text_n_layer=1, text_n_embd=26, text_n_head=2, activation="gelu",
        vision_mlp_width=128, text_mlp_width=128, eos_id=2,
    )  # fmt: skip
    model = CLIP(config).eval()
    checkpoint.save_model(tmp_path / "run", model)
    folder = convert.convert(tmp_path / "run", tmp_path / "oc", to="openai")
    values = json.loads((folder / "open_clip_config.json").read_text())
    assert values["model_cfg"]["vision_cfg"]["mlp_ratio"] == pytest.approx(128 / 26)
    reloaded, _, _ = load(folder, tokenizer=no_tokenizer)
    assert reloaded.config == config


# ------------------------------------------------------------------------------------------ SigLIP, transformers

SIGLIP_SHAPES = {
    "text-wider": (tower(32, 72, 2, 2), tower(48, 100, 2, 4)),  # the text head projects 48 -> 32
    "same-width": (tower(32, 128, 1, 4), tower(32, 128, 2, 2)),
}


def hf_siglip(tmp_path, shape, seed=0):
    vision, text_tower = SIGLIP_SHAPES[shape]
    torch.manual_seed(seed)
    config = transformers.SiglipConfig(
        text_config={**text_tower, "vocab_size": VOCAB, "max_position_embeddings": 12, "projection_size": 32},
        vision_config={**vision, "image_size": 32, "patch_size": 8},
    )
    reference = transformers.SiglipModel(config).eval()
    randomise_(reference, seed=seed + 1)
    reference.save_pretrained(tmp_path / f"siglip-{shape}")
    return tmp_path / f"siglip-{shape}", reference


@pytest.mark.parametrize("shape", SIGLIP_SHAPES, ids=list(SIGLIP_SHAPES))
def test_hugging_face_siglip_parity(tmp_path, shape):
    folder, reference = hf_siglip(tmp_path, shape)
    model, _, _ = load(folder, tokenizer=no_tokenizer)
    config = model.config
    assert (config.architecture, config.loss, config.text_pooling, config.norm_eps) == (
        "siglip",
        "siglip",
        "last",
        1e-6,
    )
    assert (config.activation, config.image_mean) == ("gelu_tanh", [0.5, 0.5, 0.5])
    images, text = check_parity(
        model,
        lambda images: normalise(reference.get_image_features(pixel_values=(images - 0.5) / 0.5)),
        lambda text: normalise(reference.get_text_features(input_ids=text)),
        context_length=12,
    )
    with torch.no_grad():  # logits: scale * cosine + the learnt bias, as SiglipModel's forward
        expected = reference(input_ids=text, pixel_values=(images - 0.5) / 0.5).logits_per_image
        torch.testing.assert_close(model.logits(images, text)[0], expected, atol=1e-5, rtol=0)


def test_siglip_round_trips_through_the_hugging_face_layout(tmp_path):
    folder, reference = hf_siglip(tmp_path, "text-wider")
    model, _, _ = load(folder, tokenizer=no_tokenizer)
    checkpoint.save_model(tmp_path / "run", model)
    written = convert.convert(tmp_path / "run", tmp_path / "back", to="hf")
    again = transformers.SiglipModel.from_pretrained(written).eval()
    for name, tensor in reference.state_dict().items():
        torch.testing.assert_close(again.state_dict()[name], tensor, atol=0, rtol=0)
    with pytest.raises(ValueError, match="open_clip builds SigLIP image towers from timm"):
        convert.convert(tmp_path / "run", tmp_path / "oc", to="openai")


def test_siglip2_naflex_is_refused_with_a_reason(tmp_path):
    folder = tmp_path / "naflex"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "siglip2"}))
    with pytest.raises(ValueError, match="NaFlex variant .variable resolution. is not supported"):
        read_checkpoint(folder)


def test_siglip_from_scratch_preset_builds_and_saves(tmp_path):
    from helpers import tiny_clip_config

    config = tiny_clip_config(
        architecture="siglip", text_pooling="last", loss="siglip", activation="gelu_tanh", norm_eps=1e-6
    )
    model = CLIP(config).eval()
    checkpoint.save_model(tmp_path / "run", model)
    reloaded, _, _ = load(tmp_path / "run", tokenizer=no_tokenizer)
    text = torch.randint(3, 100, (2, config.context_length))
    assert torch.equal(reloaded.encode_text(text), model.encode_text(text))
    with pytest.raises(ValueError, match="architecture siglip reads its text at the last position"):
        tiny_clip_config(architecture="siglip")
    with pytest.raises(ValueError, match="architecture siglip has no image projection"):
        tiny_clip_config(architecture="siglip", text_pooling="last", embed_dim=8)


# ------------------------------------------------------------------------------------------ SigLIP, open_clip


def test_open_clip_siglip_parity(tmp_path, monkeypatch):
    """open_clip's SigLIP (a timm SigLIP ViT + its bidirectional text tower) against open_clip itself."""
    open_clip = pytest.importorskip("open_clip", reason="open_clip is not installed (it is in the benchmark venv)")
    pytest.importorskip("timm", reason="timm is not installed")
    from timm.models import register_model
    from timm.models.vision_transformer import _create_vision_transformer

    name = "vit_tiny_patch8_siglip_32"  # a tiny timm SigLIP ViT, registered under a test-only name

    def build(pretrained=False, **kwargs):
        args = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.25,
                    class_token=False, global_pool="map", act_layer="gelu_tanh")  # fmt: skip
        return _create_vision_transformer(name, pretrained=pretrained, **dict(args, **kwargs))

    build.__name__ = name
    register_model(build)
    monkeypatch.setitem(convert.TIMM_SIGLIP_TOWERS, name, (2, "gelu_tanh"))
    model_cfg = {
        "embed_dim": 32,
        "init_logit_bias": -10,
        "custom_text": True,
        "vision_cfg": {"image_size": 32, "timm_model_name": name, "timm_pool": "map", "timm_proj": "none"},
        "text_cfg": {
            "context_length": 12, "vocab_size": VOCAB, "width": 48, "heads": 4, "layers": 2, "mlp_ratio": 3.0,
            "no_causal_mask": True, "proj_bias": True, "pool_type": "last", "norm_kwargs": {"eps": 1e-6},
            "act_kwargs": {"approximate": "tanh"},
        },
    }  # fmt: skip
    torch.manual_seed(0)
    reference = open_clip.model.CustomTextCLIP(**{k: v for k, v in model_cfg.items() if k != "custom_text"}).eval()
    randomise_(reference, seed=3)
    folder = tmp_path / "hf-hub"
    folder.mkdir()
    save_file(
        {key: value.contiguous() for key, value in reference.state_dict().items()},
        str(folder / "open_clip_model.safetensors"),
    )
    config_json = {"model_cfg": model_cfg, "preprocess_cfg": {"mean": [0.5] * 3, "std": [0.5] * 3}}
    (folder / "open_clip_config.json").write_text(json.dumps(config_json))
    model, _, _ = load(folder, tokenizer=no_tokenizer)
    assert (model.config.architecture, model.config.text_mlp_width, model.config.vision_mlp_width) == (
        "siglip",
        144,
        72,
    )
    check_parity(
        model,
        lambda images: reference.encode_image((images - 0.5) / 0.5, normalize=True),
        lambda text: reference.encode_text(text, normalize=True),
        context_length=12,
    )
