"""CLIP: shapes, text properties (causality, padding), losses, distributed loss, learning, zero-shot, save/load."""

import copy
import math

import pytest
import torch
import torch.distributed as dist
from PIL import Image

from clipdalle import checkpoint
from clipdalle.clip import (
    CLIP,
    CLIPConfig,
    classify,
    contrastive_loss,
    evaluate,
    heat_map,
    label_features,
    load,
    loss_fn,
    pooling_positions,
    preprocess,
    rank,
    recall_at,
    siglip_loss,
    similarity,
)
from clipdalle.config import available_presets, build_config, load_preset
from clipdalle.tokenizer import CaptionTokenizer

BOS, EOS = CaptionTokenizer.bos_id, CaptionTokenizer.eos_id
COLOURS = {"red": (1.0, 0.1, 0.1), "green": (0.1, 0.9, 0.1), "blue": (0.1, 0.1, 1.0), "yellow": (1.0, 0.9, 0.1)}


def tiny_config(**overrides) -> CLIPConfig:
    return build_config(CLIPConfig, load_preset("clip-tiny")["model"], overrides)


def tiny_model(seed: int = 0, **overrides) -> CLIP:
    torch.manual_seed(seed)
    return CLIP(tiny_config(**overrides))


class WordTokenizer:
    """Stand-in for clipdalle.tokenizer.CaptionTokenizer in tests: an id per word, <bos>, <eos>, padding 0."""

    def __init__(self, words):
        self.ids = {word: index + 3 for index, word in enumerate(words)}

    def __call__(self, texts, length):
        rows = []
        for text in texts:
            ids = [BOS, *(self.ids[word] for word in text.split()), EOS]
            rows.append(ids + [0] * (length - len(ids)))
        return torch.tensor(rows)


WORDS = ["a", "photo", "of", "an", "icon", "in", "shape", *COLOURS]


def colour_images(noise_seed: int = 0, per_colour: int = 1) -> torch.Tensor:
    """Flat colour squares with a little noise, (len(COLOURS) * per_colour, 3, 32, 32) in [0, 1]."""
    generator = torch.Generator().manual_seed(noise_seed)
    colours = torch.tensor(list(COLOURS.values())).repeat_interleave(per_colour, dim=0)  # (N, 3)
    images = colours.view(-1, 3, 1, 1).expand(-1, 3, 32, 32)  # (N, 3, 32, 32)
    return (images + 0.05 * torch.randn(images.shape, generator=generator)).clamp(0, 1)


def random_text(batch: int, length: int, seed: int = 0, vocab: int = 64) -> torch.Tensor:
    """Token ids with <bos>, words in [3, vocab), <eos> at varying positions, zero padding after it."""
    generator = torch.Generator().manual_seed(seed)
    text = torch.zeros(batch, length, dtype=torch.long)
    for row in range(batch):
        words = int(torch.randint(1, length - 2, (1,), generator=generator))
        text[row, 0] = BOS
        text[row, 1 : 1 + words] = torch.randint(3, vocab, (words,), generator=generator)
        text[row, 1 + words] = EOS
    return text


# ------------------------------------------------------------------------------------------ contracts


def test_parameter_names_are_openai_names():
    names = set(tiny_model().state_dict())
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
    assert "logit_bias" not in names and "logit_bias" in tiny_model(loss="siglip").state_dict()
    resnet = set(tiny_resnet().state_dict())
    for name in ["visual.bn3.running_var", "visual.layer2.0.downsample.0.weight", "visual.attnpool.q_proj.bias"]:
        assert name in resnet


def tiny_resnet(**overrides) -> CLIP:
    torch.manual_seed(0)
    return CLIP(tiny_config(vision_layers=[1, 1, 1, 1], vision_n_embd=8, vision_n_head=4, image_size=64, **overrides))


@pytest.mark.parametrize("make", [tiny_model, tiny_resnet], ids=["vit", "resnet"])
def test_shapes_and_unit_norm_features(make):
    model = make().eval()
    size = model.config.image_size
    images, text = torch.rand(3, 3, size, size), random_text(3, 16)
    image_features, text_features = model.encode_image(images), model.encode_text(text)
    assert image_features.shape == text_features.shape == (3, 16)
    torch.testing.assert_close(image_features.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(text_features.norm(dim=-1), torch.ones(3))
    logits_per_image, logits_per_text = model(images, text)
    assert logits_per_image.shape == (3, 3)
    torch.testing.assert_close(logits_per_text, logits_per_image.t())
    scale = model.logit_scale.exp()
    torch.testing.assert_close(logits_per_image, scale * image_features @ text_features.t())


def test_encode_image_normalises_with_the_configured_mean_and_std():
    model = tiny_model().eval()
    images = torch.rand(2, 3, 32, 32)
    other = tiny_model(image_mean=[0.0, 0.0, 0.0], image_std=[1.0, 1.0, 1.0]).eval()
    mean, std = torch.tensor(model.config.image_mean), torch.tensor(model.config.image_std)
    shifted = (images - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    torch.testing.assert_close(model.encode_image(images), other.encode_image(shifted))


def test_bad_inputs_and_configs_are_value_errors():
    model = tiny_model()
    with pytest.raises(ValueError, match=r"expected images of shape \(B, 3, 32, 32\), got \(2, 3, 16, 16\)"):
        model.encode_image(torch.rand(2, 3, 16, 16))
    with pytest.raises(ValueError, match=r"1 <= T <= 16, got \(2, 20\)"):
        model.encode_text(torch.zeros(2, 20, dtype=torch.long))
    with pytest.raises(ValueError, match="expected integer token ids"):
        model.encode_text(torch.zeros(2, 4))
    with pytest.raises(ValueError, match="activation 'relu'"):
        tiny_config(activation="relu")
    with pytest.raises(ValueError, match="text_n_embd 16 is not divisible by text_n_head 3"):
        tiny_config(text_n_head=3)
    with pytest.raises(ValueError, match="image_size 30 is not divisible by vision_patch_size 8"):
        tiny_config(image_size=30)
    with pytest.raises(ValueError, match="4 stages"):
        tiny_config(vision_layers=[1, 1])


# ------------------------------------------------------------------------------------------ text properties


def test_pooling_positions():
    text = torch.tensor([[1, 5, 2, 0], [1, 2, 7, 2], [1, 5, 6, 7]])
    assert pooling_positions(text, "first_eos", 2).tolist() == [2, 1, 3]  # no eos: the last position
    assert pooling_positions(torch.tensor([[4, 9, 3, 0]]), "argmax", 2).tolist() == [1]


def test_tokens_after_end_of_text_never_change_the_feature():
    model = tiny_model().eval()
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
    model = tiny_model().eval()
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


def test_loss_fn_for_the_training_loop():
    for loss_name in ("contrastive", "siglip"):
        model = tiny_model(loss=loss_name)
        batch = {"keys": list("abcd"), "images": colour_images(), "text": random_text(4, 16), "captions": []}
        loss, metrics = loss_fn(model, batch, 0.5)
        assert loss.requires_grad and loss.ndim == 0
        assert set(metrics) == {"loss", "accuracy", "logit_scale"} and metrics["loss"] == pytest.approx(loss.item())
        loss.backward()
        assert model.token_embedding.weight.grad is not None and model.logit_scale.grad is not None
    with pytest.raises(ValueError, match="batch has no 'text' token ids"):
        loss_fn(model, {"images": colour_images(), "captions": ["red"] * 4}, 0.0)


def test_clamp_logit_scale_after_step():
    model = tiny_model()
    with torch.no_grad():
        model.logit_scale.fill_(7.0)
    model.after_step()
    assert model.logit_scale.item() == pytest.approx(math.log(100))


# ------------------------------------------------------------------------------------------ distributed


def _global_batch() -> dict:
    return {"images": colour_images(noise_seed=3, per_colour=2), "text": random_text(8, 16, seed=4)}


def _losses_and_grads(model, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    loss, _ = loss_fn(model, batch, 0.0)
    loss.backward()
    module = checkpoint.unwrap(model)
    return loss.detach(), {name: param.grad.clone() for name, param in module.named_parameters()}


def _distributed_worker(rank: int, world: int, store_path: str, result_path: str) -> None:
    torch.set_num_threads(1)
    # A file store, not a TCP port: a port probed free can be taken before rank 0 binds it.
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world)
    try:
        results = {}
        for loss_name in ("contrastive", "siglip"):
            model = torch.nn.parallel.DistributedDataParallel(tiny_model(seed=5, loss=loss_name))
            batch = _global_batch()
            rows = len(batch["images"]) // world
            local = {key: value[rank * rows : (rank + 1) * rows] for key, value in batch.items()}
            loss, grads = _losses_and_grads(model, local)
            dist.all_reduce(loss)  # DDP averages gradients; the reported loss is averaged the same way
            results[loss_name] = (loss / world, grads)
        if rank == 0:
            torch.save(results, result_path)
        dist.barrier()  # neither rank tears gloo down while the other still talks to it
    finally:
        dist.destroy_process_group()


def test_two_process_gather_with_grad_equals_the_global_batch_loss_and_gradients(tmp_path):
    result_path = tmp_path / "result.pt"
    store_path = tmp_path / "store"
    torch.multiprocessing.spawn(_distributed_worker, args=(2, str(store_path), str(result_path)), nprocs=2)
    results = torch.load(result_path, weights_only=True)
    for loss_name in ("contrastive", "siglip"):
        expected_loss, expected_grads = _losses_and_grads(tiny_model(seed=5, loss=loss_name), _global_batch())
        loss, grads = results[loss_name]
        torch.testing.assert_close(loss, expected_loss, atol=1e-6, rtol=1e-5)
        assert set(grads) == set(expected_grads)
        for name, grad in grads.items():
            torch.testing.assert_close(grad, expected_grads[name], atol=1e-6, rtol=1e-4, msg=f"{loss_name}: {name}")


# ------------------------------------------------------------------------------------------ learning


STEPS = {"contrastive": 40, "siglip": 80}  # SigLIP first spends steps moving its bias from -10


def train_colour_model(loss_name: str) -> tuple[CLIP, list[float]]:
    model = tiny_model(seed=1, loss=loss_name)
    tokenizer = WordTokenizer(WORDS)
    text = tokenizer([f"a {colour} icon" for colour in COLOURS], 16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    losses = []
    for step in range(STEPS[loss_name]):
        batch = {"images": colour_images(noise_seed=step), "text": text}
        loss, _ = loss_fn(model, batch, step / STEPS[loss_name])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        model.after_step()
        losses.append(loss.item())
    return model.eval(), losses


@pytest.fixture(scope="module", params=["contrastive", "siglip"])
def trained(request) -> tuple[CLIP, list[float]]:
    return train_colour_model(request.param)


def test_tiny_model_learns_pairs_and_beats_chance_zero_shot(trained):
    model, losses = trained
    assert sum(losses[-5:]) / 5 < 0.3 * sum(losses[:5]) / 5
    probs = classify(model, colour_images(noise_seed=99), list(COLOURS), WordTokenizer(WORDS), ["a {} icon"])
    assert probs.argmax(dim=1).tolist() == [0, 1, 2, 3]  # chance would be 1 in 4 per image


# ------------------------------------------------------------------------------------------ zero-shot helpers


def test_classify_probabilities_and_prompt_ensembles():
    model = tiny_model().eval()
    tokenizer = WordTokenizer(WORDS)
    images = colour_images()
    templates = ["a {} icon", "a photo of a {} shape"]
    probs = classify(model, images, list(COLOURS), tokenizer, templates)
    assert probs.shape == (4, 4)
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(4))
    per_template = [model.encode_text(tokenizer([t.format(c) for c in COLOURS], 16)) for t in templates]
    expected = torch.nn.functional.normalize(sum(per_template) / 2, dim=-1)
    torch.testing.assert_close(label_features(model, list(COLOURS), tokenizer, templates), expected)
    siglip_probs = classify(tiny_model(loss="siglip").eval(), images, list(COLOURS), tokenizer)
    assert siglip_probs.shape == (4, 4) and ((siglip_probs > 0) & (siglip_probs < 1)).all()
    assert not torch.allclose(siglip_probs.sum(dim=1), torch.ones(4))  # independent per label
    with pytest.raises(ValueError, match="has no '{}'"):
        classify(model, images, ["red"], tokenizer, ["red things"])


def test_label_features_are_cached_until_the_weights_change(monkeypatch):
    model = tiny_model().eval()
    tokenizer = WordTokenizer(WORDS)
    calls = []
    original = model.encode_text
    monkeypatch.setattr(model, "encode_text", lambda text: calls.append(len(text)) or original(text))
    first = label_features(model, ["red", "blue"], tokenizer)
    second = label_features(model, ["red", "blue"], tokenizer)
    assert len(calls) == 1 and second is first
    label_features(model, ["red", "green"], tokenizer)
    assert len(calls) == 2
    with torch.no_grad():
        model.text_projection.mul_(2.0)  # e.g. an optimizer step
    label_features(model, ["red", "blue"], tokenizer)
    assert len(calls) == 3


def test_similarity_and_rank():
    model = tiny_model().eval()
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


# ------------------------------------------------------------------------------------------ evaluation


def test_evaluate_metrics_and_heat_map(trained):
    model = copy.deepcopy(trained[0])
    tokenizer = WordTokenizer(WORDS)
    batches = [
        {"images": colour_images(noise_seed=seed), "text": tokenizer([f"a {c} icon" for c in COLOURS], 16)}
        for seed in (7, 8)
    ]
    model.train()
    metrics, grid = evaluate(model, batches)
    assert model.training  # mode restored
    assert set(metrics) == {"loss", "image_to_text_r1", "image_to_text_r5", "text_to_image_r1", "text_to_image_r5"}
    assert metrics["image_to_text_r5"] == 1.0  # 8 pairs: each image's colour is among its 5 best texts
    assert metrics["image_to_text_r1"] >= 0.5  # two identical captions per colour: r@1 is at least a half
    assert grid.dim() == 3 and grid.shape[0] == 3 and grid.shape[1] == grid.shape[2] >= 64
    assert 0.0 <= grid.min() and grid.max() <= 1.0


def test_recall_and_heat_map_helpers():
    assert recall_at(torch.eye(4), 1) == 1.0
    assert recall_at(torch.eye(4).roll(1, dims=1), 1) == 0.0
    assert recall_at(torch.eye(4).roll(1, dims=1), 4) == 1.0
    image = heat_map(torch.tensor([[0.0, 1.0], [0.5, 0.25]]), cell=3)
    assert image.shape == (3, 6, 6)
    assert image[:, 0, 3].sum() > image[:, 0, 0].sum()  # high values are brighter


# ------------------------------------------------------------------------------------------ save / load, presets


def test_save_and_load_are_bit_equal(tmp_path):
    model = tiny_model(seed=3).eval()
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
    captions = [f"a {colour} icon of a {shape}" for colour in COLOURS for shape in ("star", "cloud", "heart")]
    tokenizer = CaptionTokenizer.train(captions, vocab_size=300)
    model = tiny_model(vocab_size=tokenizer.vocab_size).eval()
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
    for name in names:
        config = build_config(CLIPConfig, load_preset(name)["model"], source=name)
        with torch.device("meta"):  # shapes only: no memory, no initialisation cost
            model = CLIP(config)
        parameters = sum(param.numel() for param in model.parameters())
        if name in counts:
            assert parameters == counts[name], name
    assert sum(param.numel() for param in tiny_model().parameters()) < 20_000
    for name in ("clip-tiny", "clip-demo"):  # trained with our caption tokenizer: pool at its end token
        model = load_preset(name)["model"]
        assert (model["text_pooling"], model["eos_id"]) == ("first_eos", CaptionTokenizer.eos_id), name
