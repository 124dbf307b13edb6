"""Models by name against a local server (tests/fake_servers.py) standing for OpenAI's URLs and the Hugging Face Hub:
a by-name load equals loading the same files locally; checksums, resumption, atomic writes, offline use."""

import pytest
import torch

from clipdalle import hub
from clipdalle.pretrained import load, locate, weights_sha256

IMAGES = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def assert_same_model(by_name, local, text_length=16):
    model, _, tokenizer = by_name
    reference, _, reference_tokenizer = local
    assert model.config == reference.config
    text = tokenizer(["a photo of a cat", "cat"], text_length)
    assert torch.equal(text, reference_tokenizer(["a photo of a cat", "cat"], text_length))
    with torch.no_grad():
        assert torch.equal(model.encode_image(IMAGES), reference.encode_image(IMAGES))
        assert torch.equal(model.encode_text(text), reference.encode_text(text))


def test_names_are_told_apart_from_paths():
    assert hub.kind_of("ViT-B/32") == "openai" and hub.kind_of("ViT-L/14@336px") == "openai"
    assert hub.kind_of("ViT-B-32/laion2b_s34b_b79k") == "open_clip"
    assert hub.kind_of("hf-hub:timm/ViT-B-16-SigLIP") == "hf-hub"
    assert hub.kind_of("google/siglip-base-patch16-224") == "transformers"
    for path in ("runs/clip/", "a/b/c", "model.pt", "../x/y", "/abs/path"):
        assert hub.kind_of(path) is None, path
    with pytest.raises(FileNotFoundError, match="not a model name clipdalle knows .see `clipdalle models list`"):
        locate("no/such/path/here")
    with pytest.raises(ValueError, match="open_clip has no ViT-B-32 weights tagged 'nope' on the Hub; tags: "):
        hub.resolve("ViT-B-32/nope")


def test_openai_name_downloads_verifies_and_equals_the_local_file(model_server, served_root, tmp_path):
    by_name = load("ViT-B/32")
    cached = tmp_path / "cache" / "openai" / "good.pt"
    assert cached.is_file() and not list(cached.parent.glob("*.part"))
    assert by_name[0].config.activation == "quick_gelu"  # OpenAI's weights: QuickGELU
    local = load(served_root / "source" / "good.pt", tokenizer=served_root / "hub/openai/clip-vit-base-patch32")
    assert_same_model(by_name, local)
    assert weights_sha256("ViT-B/32") == hub.OPENAI_MODELS["ViT-B/32"].split("/")[0]
    requests = len(model_server.requests)
    load("ViT-B/32")  # cached: no request at all, not even a check
    assert len(model_server.requests) == requests


def test_a_file_whose_bytes_do_not_match_its_checksum_is_refused_and_removed(model_server, tmp_path):
    with pytest.raises(ValueError, match=r"RN50: the download from .* has SHA-256 [0-9a-f]{64}, expected 0{64}"):
        load("RN50")
    folder = tmp_path / "cache" / "openai"
    assert not (folder / "other.pt").exists() and not (folder / "other.pt.part").exists()  # nor a part


def test_a_corrupt_download_is_refused_then_fetched_again(model_server, tmp_path):
    path = "/clip/models/" + hub.OPENAI_MODELS["ViT-B/32"]
    model_server.corrupt.add(path)
    with pytest.raises(ValueError, match="has SHA-256 .* the file was removed, run the command again"):
        load("ViT-B/32")
    assert not (tmp_path / "cache" / "openai" / "good.pt").exists()
    model_server.corrupt.clear()
    load("ViT-B/32")
    assert (tmp_path / "cache" / "openai" / "good.pt").is_file()


def test_a_download_cut_off_half_way_resumes(model_server, served_root, tmp_path):
    path = "/clip/models/" + hub.OPENAI_MODELS["ViT-B/32"]
    size = (served_root / "source" / "good.pt").stat().st_size
    model_server.cut_after[path] = size // 2
    with pytest.raises(ValueError, match="run the command again to resume it"):
        load("ViT-B/32")
    part = tmp_path / "cache" / "openai" / "good.pt.part"
    assert part.stat().st_size == size // 2 and not (tmp_path / "cache" / "openai" / "good.pt").exists()
    load("ViT-B/32")
    ranges = [seen_range for method, seen, seen_range in model_server.requests if seen == path]
    assert ranges == [None, f"bytes={size // 2}-"]  # the second request asked for the rest only
    assert hub.file_sha256(tmp_path / "cache" / "openai" / "good.pt") == hub.OPENAI_MODELS["ViT-B/32"].split("/")[0]


def test_transformers_siglip_repo_by_name(model_server, served_root):
    by_name = load("org/tiny-siglip")
    assert by_name[0].config.architecture == "siglip"
    assert_same_model(by_name, load(served_root / "hub" / "org" / "tiny-siglip"))
    assert {path for method, path, _ in model_server.requests if method == "GET"} >= {
        "/org/tiny-siglip/resolve/main/config.json",
        "/org/tiny-siglip/resolve/main/model.safetensors",
        "/org/tiny-siglip/resolve/main/spiece.model",
    }
    requests = len(model_server.requests)
    load("org/tiny-siglip")  # every file cached: no request to the Hub
    assert len(model_server.requests) == requests
    with pytest.raises(ValueError, match="org/missing: no such local path, nor Hugging Face repo"):
        load("org/missing")


def test_open_clip_hub_repo_and_tag_by_name(model_server, served_root, monkeypatch):
    local = load(
        served_root / "hub" / "org" / "tiny-openclip", tokenizer=served_root / "hub/openai/clip-vit-base-patch32"
    )
    assert_same_model(load("hf-hub:org/tiny-openclip"), local)
    # an ARCH/PRETRAINED tag: weights from the repo, the architecture from open_clip's table, QuickGELU from the tag
    config = __import__("json").loads((served_root / "hub/org/tiny-openclip/open_clip_config.json").read_text())
    table = {"archs": {"ViT-T-16": config["model_cfg"]}, "tags": {"ViT-T-16/test": {"repo": "org/tiny-openclip"}}}
    monkeypatch.setattr(hub, "open_clip_table", lambda: table)
    assert_same_model(load("ViT-T-16/test"), local)
    table["tags"]["ViT-T-16/test"]["quick_gelu"] = True
    assert load("ViT-T-16/test")[0].config.activation == "quick_gelu"


@pytest.mark.parametrize("variable", ["CLIPDALLE_OFFLINE", "HF_HUB_OFFLINE"])
def test_offline_loads_cached_models_without_network_and_names_missing_ones(model_server, monkeypatch, variable):
    load("ViT-B/32")
    load("org/tiny-siglip")
    monkeypatch.setenv(variable, "1")
    requests = len(model_server.requests)
    load("ViT-B/32")
    load("org/tiny-siglip")
    assert len(model_server.requests) == requests  # nothing asked of the network
    for name in ("RN50", "hf-hub:org/tiny-openclip"):
        with pytest.raises(ValueError) as error:
            load(name)
        message = str(error.value)
        assert "\n" not in message and name in message and f"clipdalle models download {name}" in message
    assert len(model_server.requests) == requests


def test_refresh_asks_the_hub_again(model_server):
    hub.resolve("org/tiny-siglip")
    heads = model_server.count("HEAD")
    hub.resolve("org/tiny-siglip", fetch="refresh")
    assert model_server.count("HEAD") > heads
