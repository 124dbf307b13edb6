"""Foreign CLIP layouts: parity with OpenAI's model.py and transformers' CLIPModel on random tiny weights,
rename round trips, activation defaults per layout, and errors for what we cannot read."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from clipdalle import checkpoint
from clipdalle.clip import CLIP, OPENAI_IMAGE_MEAN, OPENAI_IMAGE_STD, CLIPConfig, load
from clipdalle.convert import (
    config_from_open_clip,
    convert,
    hf_to_openai,
    is_torchscript,
    openai_to_hf,
    read_checkpoint,
)

VOCAB = 100  # tiny vocabulary: ids 0 (padding) .. 99 (end of text, the largest id as in OpenAI's BPE)


def no_tokenizer(texts, length):  # load() returns the tokenizer it is given; these tests feed ids directly
    raise AssertionError("the tests pass token ids")


def normalise(features: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(features.float(), dim=-1)


def pixels(images: torch.Tensor, mean=OPENAI_IMAGE_MEAN, std=OPENAI_IMAGE_STD) -> torch.Tensor:
    """What OpenAI's and Hugging Face's models take: (images - mean) / std."""
    return (images - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def token_ids(batch: int, length: int, end_id: int, seed: int = 0) -> torch.Tensor:
    """Start id, random words below end_id, one end id at varying positions, padding 0 after it."""
    generator = torch.Generator().manual_seed(seed)
    text = torch.zeros(batch, length, dtype=torch.long)
    for row in range(batch):
        words = 1 + row * (length - 3) // max(batch - 1, 1)
        text[row, 0] = end_id - 1
        text[row, 1 : 1 + words] = torch.randint(1, end_id - 1, (words,), generator=generator)
        text[row, 1 + words] = end_id
    return text


def randomise_(module: torch.nn.Module, seed: int) -> None:
    """Every parameter and buffer random (init leaves many at 0 or 1), rounded to fp16-representable values so
    that fp16 copies (OpenAI's build_model converts to fp16) hold exactly the same numbers."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
            if not tensor.is_floating_point():
                continue
            noise = torch.randn(tensor.shape, generator=generator)
            if name.endswith("running_var"):
                value = 0.5 + noise.abs()
            elif name.endswith(("ln_1.weight", "ln_2.weight", "ln_pre.weight", "ln_post.weight", "ln_final.weight")):
                value = 1 + 0.1 * noise
            elif name == "logit_scale":
                value = torch.tensor(2.0)
            else:
                value = 0.1 * noise
            tensor.copy_(value.half().float())


# ------------------------------------------------------------------------------------------ OpenAI reference


@pytest.fixture(scope="module")
def openai_model_py():
    """OpenAI's clip/model.py from the clip-anytorch wheel, loaded by path (the `clip` package itself imports
    torchvision at import time; model.py needs only torch)."""
    spec = importlib.util.find_spec("clip")
    folder = Path(spec.submodule_search_locations[0]) if spec and spec.submodule_search_locations else None
    if folder is None or not (folder / "model.py").is_file():
        pytest.skip("clip-anytorch is not installed: pip install --no-deps clip-anytorch")
    module_spec = importlib.util.spec_from_file_location("openai_clip_model", folder / "model.py")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def openai_state_dict(openai_model_py, resnet: bool) -> dict[str, torch.Tensor]:
    """A random tiny OpenAI CLIP state dict (widths of 64 so that build_model's heads = width // 64 work)."""
    torch.manual_seed(0)
    if resnet:
        vision = {"image_resolution": 64, "vision_layers": (1, 1, 1, 1), "vision_width": 8, "vision_patch_size": None}
    else:
        vision = {"image_resolution": 32, "vision_layers": 2, "vision_width": 64, "vision_patch_size": 8}
    model = openai_model_py.CLIP(
        embed_dim=32,
        **vision,
        context_length=16,
        vocab_size=VOCAB,
        transformer_width=64,
        transformer_heads=1,
        transformer_layers=2,
    )
    randomise_(model, seed=1 if resnet else 2)
    return model.state_dict()


def openai_reference(openai_model_py, state_dict):
    """OpenAI's build_model (fp16 weights, as for their release files), run in fp32."""
    return openai_model_py.build_model({key: value.clone() for key, value in state_dict.items()}).float().eval()


@pytest.mark.parametrize("resnet", [False, True], ids=["vit", "resnet"])
def test_openai_state_dict_parity_with_openai_model_py(openai_model_py, tmp_path, resnet):
    state_dict = openai_state_dict(openai_model_py, resnet)
    reference = openai_reference(openai_model_py, state_dict)
    path = tmp_path / "tiny.pt"
    torch.save({key: value.half() if value.is_floating_point() else value for key, value in state_dict.items()}, path)
    model, _, _ = load(path, tokenizer=no_tokenizer)
    assert model.config.activation == "quick_gelu" and model.config.is_resnet == resnet
    assert next(model.parameters()).dtype == torch.float32  # fp16 file, fp32 model
    size = model.config.image_size
    images = torch.rand(3, 3, size, size, generator=torch.Generator().manual_seed(3))
    text = token_ids(3, 16, end_id=VOCAB - 1)
    with torch.no_grad():
        expected_image = normalise(reference.encode_image(pixels(images)))
        expected_text = normalise(reference.encode_text(text))
        torch.testing.assert_close(model.encode_image(images), expected_image, atol=1e-5, rtol=0)
        torch.testing.assert_close(model.encode_text(text), expected_text, atol=1e-5, rtol=0)
        logits_per_image, _ = reference(pixels(images), text)
        torch.testing.assert_close(model.logits(images, text)[0], logits_per_image, atol=1e-4, rtol=0)


def test_torchscript_archive_loads_its_tensors_without_running_its_code(openai_model_py, tmp_path, monkeypatch):
    state_dict = openai_state_dict(openai_model_py, resnet=False)
    reference = openai_reference(openai_model_py, state_dict)
    images, text = torch.rand(2, 3, 32, 32), token_ids(2, 16, end_id=VOCAB - 1)
    path = tmp_path / "ViT-tiny.pt"
    torch.jit.save(torch.jit.trace(reference, (pixels(images), text), check_trace=False), str(path))
    assert is_torchscript(path)

    def refuse(*args, **kwargs):
        raise AssertionError("the archive's code must not run")

    monkeypatch.setattr(torch.jit, "load", refuse)
    model, _, _ = load(path, tokenizer=no_tokenizer)
    assert read_checkpoint(path).layout == "openai-torchscript"
    with torch.no_grad():
        expected_image = normalise(reference.encode_image(pixels(images)))
        expected_text = normalise(reference.encode_text(text))
    torch.testing.assert_close(model.encode_image(images), expected_image, atol=1e-5, rtol=0)
    torch.testing.assert_close(model.encode_text(text), expected_text, atol=1e-5, rtol=0)


def test_a_pickle_that_calls_code_is_refused(tmp_path):
    import pickle
    import zipfile

    class Payload:
        def __reduce__(self):
            return (print, ("ran",))

    path = tmp_path / "evil.pt"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("evil/data.pkl", pickle.dumps(Payload()))
        archive.writestr("evil/code/__torch__.py", "")
    with pytest.raises(ValueError, match="refusing builtins.print"):
        read_checkpoint(path)


def test_default_tokenizer_for_openai_weights_is_the_installed_bpe(openai_model_py, tmp_path):
    from clipdalle.tokenizers.clip_bpe import ClipTokenizer

    path = tmp_path / "tiny.pt"
    torch.save(openai_state_dict(openai_model_py, resnet=False), path)
    model, _, tokenizer = load(path)
    assert isinstance(tokenizer, ClipTokenizer) and tokenizer.vocab_size == 49408
    assert tokenizer(["a photo of a cat"], 77).shape == (1, 77)
    run = tmp_path / "fine-tuned"  # a run fine-tuned from OpenAI weights keeps their BPE as vocab.json + merges.txt
    checkpoint.save_model(run, model)
    tokenizer.save(run)
    _, _, run_tokenizer = load(run)
    assert isinstance(run_tokenizer, ClipTokenizer)
    assert torch.equal(run_tokenizer(["a photo of a cat"], 77), tokenizer(["a photo of a cat"], 77))


# ------------------------------------------------------------------------------------------ Hugging Face


def hf_tiny(tmp_path: Path, hidden_act: str, eos_token_id: int, seed: int = 0) -> tuple[Path, torch.nn.Module]:
    transformers = pytest.importorskip(
        "transformers", reason="transformers is not installed (pip install transformers)"
    )
    torch.manual_seed(seed)
    tower = {"hidden_size": 32, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2}
    config = transformers.CLIPConfig(
        text_config={
            **tower,
            "vocab_size": VOCAB,
            "max_position_embeddings": 16,
            "hidden_act": hidden_act,
            "eos_token_id": eos_token_id,
            "bos_token_id": VOCAB - 2,
            "pad_token_id": 0,
        },
        vision_config={**tower, "image_size": 32, "patch_size": 8, "hidden_act": hidden_act},
        projection_dim=24,
    )
    model = transformers.CLIPModel(config).eval()
    randomise_(model, seed)
    folder = tmp_path / f"hf-{hidden_act}-{eos_token_id}"
    model.save_pretrained(folder)
    return folder, model


def hf_features(model, images=None, text=None, mean=OPENAI_IMAGE_MEAN, std=OPENAI_IMAGE_STD):
    with torch.no_grad():
        if images is not None:
            output = model.get_image_features(pixel_values=pixels(images, mean, std))
        else:
            output = model.get_text_features(input_ids=text, attention_mask=(text != 0).long())
    return normalise(output if isinstance(output, torch.Tensor) else output.pooler_output)


@pytest.mark.parametrize(("hidden_act", "eos_token_id"), [("gelu", VOCAB - 1), ("quick_gelu", 2)])
def test_hugging_face_parity(tmp_path, hidden_act, eos_token_id):
    folder, reference = hf_tiny(tmp_path, hidden_act, eos_token_id)
    model, _, _ = load(folder, tokenizer=no_tokenizer)
    assert model.config.activation == hidden_act  # Hugging Face: the activation comes from hidden_act
    assert model.config.text_pooling == ("argmax" if eos_token_id == 2 else "first_eos")
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    text = token_ids(3, 16, end_id=VOCAB - 1, seed=5)
    torch.testing.assert_close(model.encode_image(images), hf_features(reference, images=images), atol=1e-5, rtol=0)
    torch.testing.assert_close(model.encode_text(text), hf_features(reference, text=text), atol=1e-5, rtol=0)
    flipped, _, _ = load(folder, tokenizer=no_tokenizer, quick_gelu=hidden_act == "gelu")
    assert flipped.config.activation != hidden_act  # quick_gelu= overrides, and the parity above would catch it:
    assert (flipped.encode_text(text) - hf_features(reference, text=text)).abs().max() > 1e-4


def test_hugging_face_first_eos_uses_the_first_end_token(tmp_path):
    folder, reference = hf_tiny(tmp_path, "gelu", eos_token_id=7)
    model, _, _ = load(folder, tokenizer=no_tokenizer)
    assert (model.config.text_pooling, model.config.eos_id) == ("first_eos", 7)
    text = torch.tensor([[98, 11, 12, 7, 0, 0], [98, 50, 7, 99, 7, 0]])  # the largest id is not the end token
    torch.testing.assert_close(model.encode_text(text), hf_features(reference, text=text), atol=1e-5, rtol=0)


def test_convert_openai_to_hf_and_back(openai_model_py, tmp_path):
    transformers = pytest.importorskip(
        "transformers", reason="transformers is not installed (pip install transformers)"
    )
    state_dict = openai_state_dict(openai_model_py, resnet=False)
    renamed = hf_to_openai(openai_to_hf(state_dict))
    assert set(renamed) == set(state_dict)
    assert all(torch.equal(renamed[key], state_dict[key]) for key in state_dict)

    source = tmp_path / "tiny.pt"
    torch.save(state_dict, source)
    hf_folder = convert(source, tmp_path / "hf", to="hf")
    reference = transformers.CLIPModel.from_pretrained(hf_folder).eval()
    original, _, _ = load(source, tokenizer=no_tokenizer)
    images, text = torch.rand(2, 3, 32, 32), token_ids(2, 16, end_id=VOCAB - 1)
    torch.testing.assert_close(hf_features(reference, images=images), original.encode_image(images), atol=1e-5, rtol=0)
    torch.testing.assert_close(hf_features(reference, text=text), original.encode_text(text), atol=1e-5, rtol=0)

    back = convert(hf_folder, tmp_path / "openai", to="openai")
    assert (back / "open_clip_config.json").is_file()
    reloaded, _, _ = load(back, tokenizer=no_tokenizer)
    assert reloaded.config == original.config
    assert all(torch.equal(reloaded.state_dict()[key], value) for key, value in original.state_dict().items())

    bare = convert(hf_folder, tmp_path / "bare-quickgelu.safetensors", to="openai")
    assert torch.equal(load(bare, tokenizer=no_tokenizer)[0].encode_text(text), original.encode_text(text))


def test_convert_refuses_what_hugging_face_cannot_hold(openai_model_py, tmp_path):
    source = tmp_path / "rn.pt"
    torch.save(openai_state_dict(openai_model_py, resnet=True), source)
    with pytest.raises(ValueError, match="no ResNet image tower"):
        convert(source, tmp_path / "hf", to="hf")
    with pytest.raises(ValueError, match="to='onnx'"):
        convert(source, tmp_path / "x", to="onnx")


def test_convert_our_run_to_hf_keeps_mean_std_and_pooling(tmp_path):
    transformers = pytest.importorskip(
        "transformers", reason="transformers is not installed (pip install transformers)"
    )
    torch.manual_seed(0)
    config = CLIPConfig(
        embed_dim=16,
        image_size=32,
        vision_patch_size=8,
        vision_n_layer=1,
        vision_n_embd=16,
        vision_n_head=2,
        context_length=16,
        vocab_size=VOCAB,
        text_n_layer=1,
        text_n_embd=16,
        text_n_head=2,
        activation="gelu",
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.25, 0.25, 0.25],
        text_pooling="first_eos",
        eos_id=5,
    )
    ours = CLIP(config).eval()
    checkpoint.save_model(tmp_path / "run", ours)
    folder = convert(tmp_path / "run", tmp_path / "hf", to="hf")
    reference = transformers.CLIPModel.from_pretrained(folder).eval()
    images = torch.rand(2, 3, 32, 32)
    text = torch.tensor([[1, 9, 5, 0], [1, 8, 50, 5]])
    expected = hf_features(reference, images=images, mean=config.image_mean, std=config.image_std)
    torch.testing.assert_close(ours.encode_image(images), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours.encode_text(text), hf_features(reference, text=text), atol=1e-5, rtol=0)
    assert load(folder, tokenizer=no_tokenizer)[0].config == config
    checkpoint.save_model(tmp_path / "run2", CLIP(CLIPConfig(**{**vars(config), "eos_id": 2})))
    with pytest.raises(ValueError, match="eos_id 2 cannot be written for Hugging Face"):
        convert(tmp_path / "run2", tmp_path / "hf2", to="hf")
    with pytest.raises(ValueError, match="text_pooling first_eos .eos_id 5. has no OpenAI/open_clip equivalent"):
        convert(tmp_path / "run", tmp_path / "openai", to="openai")


# ------------------------------------------------------------------------------------------ open_clip layouts


def tiny_openai_names(seed: int = 0, siglip: bool = False) -> dict[str, torch.Tensor]:
    """OpenAI/open_clip-named weights of one of our tiny models (64 wide so that heads = width // 64 = 1)."""
    torch.manual_seed(seed)
    config = CLIPConfig(
        embed_dim=16,
        image_size=32,
        vision_patch_size=8,
        vision_n_layer=1,
        vision_n_embd=64,
        vision_n_head=1,
        context_length=16,
        vocab_size=VOCAB,
        text_n_layer=1,
        text_n_embd=64,
        text_n_head=1,
        loss="siglip" if siglip else "contrastive",
    )
    return CLIP(config).state_dict()


def test_activation_defaults_per_layout(tmp_path):
    state_dict = tiny_openai_names()
    cases = {
        "openai.pt": "quick_gelu",  # OpenAI's state dicts
        "open_clip_pytorch_model.bin": "gelu",  # open_clip's default
        "ViT-B-32-quickgelu.safetensors": "quick_gelu",  # open_clip's -quickgelu models
        "open_clip_model.safetensors": "gelu",
    }
    for name, activation in cases.items():
        path = tmp_path / name
        save_file(state_dict, str(path)) if path.suffix == ".safetensors" else torch.save(state_dict, path)
        found = read_checkpoint(path)
        assert found.config.activation == activation, name
        assert found.layout == ("openai" if name == "openai.pt" else "open_clip")
        flipped = "gelu" if activation == "quick_gelu" else "quick_gelu"
        assert read_checkpoint(path, quick_gelu=flipped == "quick_gelu").config.activation == flipped
    training = tmp_path / "epoch_3.pt"  # open_clip's training checkpoints: wrapped, DDP prefixes
    torch.save({"epoch": 3, "state_dict": {f"module.{key}": value for key, value in state_dict.items()}}, training)
    found = read_checkpoint(training)
    assert (found.layout, found.config.activation) == ("open_clip", "gelu")
    assert set(found.state_dict) == set(state_dict)


def test_open_clip_directory_reads_its_config(tmp_path):
    state_dict = tiny_openai_names(siglip=True)
    folder = tmp_path / "hub"
    folder.mkdir()
    save_file(state_dict, str(folder / "open_clip_model.safetensors"))
    values = {
        "model_cfg": {
            "embed_dim": 16,
            "quick_gelu": True,
            "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 8, "head_width": 32},
            "text_cfg": {"context_length": 16, "vocab_size": VOCAB, "width": 64, "heads": 4, "layers": 1},
        },
        "preprocess_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]},
    }
    (folder / "open_clip_config.json").write_text(json.dumps(values))
    model, _, _ = load(folder, tokenizer=no_tokenizer)
    config = model.config
    assert (config.activation, config.vision_n_head, config.text_n_head, config.loss) == ("quick_gelu", 2, 4, "siglip")
    assert config.image_mean == [0.5, 0.5, 0.5] and "logit_bias" in model.state_dict()
    values["model_cfg"]["vision_cfg"]["timm_model_name"] = "convnext_base"
    with pytest.raises(ValueError, match="timm_model_name='convnext_base' .clipdalle reads timm's SigLIP ViTs"):
        config_from_open_clip(values, state_dict)


def assert_one_line_error(path, match):
    with pytest.raises(ValueError, match=match) as error:
        load(path)
    assert "\n" not in str(error.value)


def test_unknown_layouts_are_one_line_errors(tmp_path):
    folder = tmp_path / "something"
    folder.mkdir()
    (folder / "weights.npz").write_bytes(b"not torch")
    assert_one_line_error(folder, r"not a CLIP checkpoint clipdalle reads \(found files weights.npz\)")
    (folder / "config.json").write_text(json.dumps({"model_type": "bert"}))
    assert_one_line_error(folder, "found config.json with model_type 'bert'")
    other = tmp_path / "resnet18.safetensors"
    save_file({"conv1.weight": torch.zeros(2, 3, 1, 1), "fc.bias": torch.zeros(2)}, str(other))
    assert_one_line_error(other, r"not OpenAI/open_clip CLIP weights \(found keys conv1.weight, fc.bias")
    hf_file = tmp_path / "model.safetensors"
    save_file({"text_model.embeddings.token_embedding.weight": torch.zeros(2, 2)}, str(hf_file))
    assert_one_line_error(hf_file, "Hugging Face CLIP weights; pass the directory")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"\x00garbage")
    assert_one_line_error(junk, "junk.pt: not a readable weights file")
    with pytest.raises(FileNotFoundError, match="no such file or directory"):
        load(tmp_path / "missing.pt")
