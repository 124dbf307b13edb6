"""ONNX: the two exported graphs give torch's features at 1e-4 for several batch sizes, for a CLIP (our caption
tokenizer) and a SigLIP (a transformers repo with its SentencePiece tokenizer), and the onnx backend serves
classification, index build and search like the torch one."""

import json
import shutil

import pytest
import torch
from helpers import assert_one_line_error, run

from clipdalle import backends, cli, zero_shot
from clipdalle.pretrained import load

pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install 'clipdalle[onnx]')")
pytest.importorskip("onnxscript", reason="onnxscript is not installed (pip install 'clipdalle[onnx]')")


@pytest.fixture(scope="module")
def clip_export(tiny_clip_run, tmp_path_factory):
    """The tiny CLIP run exported through the CLI."""
    out = tmp_path_factory.mktemp("onnx") / "clip"
    assert cli.main(["export", "onnx", "--clip", str(tiny_clip_run), "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def siglip_export(served_root, tmp_path_factory):
    """A transformers SigLIP repo exported by load_encoder(backend="onnx") into a cache of its own."""
    source = served_root / "hub" / "org" / "tiny-siglip"
    cache = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CLIPDALLE_CACHE", str(cache))
        encoder, _, _ = backends.load_encoder(source, backend="onnx")
        folder = backends.export_folder(source)
    assert isinstance(encoder, backends.OnnxCLIP) and folder.is_relative_to(cache)
    return source, folder


def check_towers_equal(model, encoder, tokenizer, texts):
    size = model.config.image_size
    for batch in (1, 3, 8):
        images = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(batch))
        text = tokenizer((texts * batch)[:batch], model.config.context_length)
        with torch.no_grad():
            torch.testing.assert_close(encoder.encode_image(images), model.encode_image(images), atol=1e-4, rtol=0)
            torch.testing.assert_close(encoder.encode_text(text), model.encode_text(text), atol=1e-4, rtol=0)


def test_clip_graphs_equal_torch(tiny_clip_run, clip_export):
    model, _, tokenizer = load(tiny_clip_run)
    encoder, _, onnx_tokenizer = backends.load_onnx(clip_export)
    texts = ["a red circle", "a blue square on the left of a green cross", "a", "red red red red red red red"]
    check_towers_equal(model, encoder, tokenizer, texts)
    assert torch.equal(onnx_tokenizer(texts, 16), tokenizer(texts, 16))
    values = json.loads((clip_export / "clipdalle_onnx.json").read_text())
    assert values["config"] == json.loads((tiny_clip_run / "config.json").read_text())["model"]
    assert values["image_input"]["shape"] == ["batch", 3, 32, 32] and values["tokenizer"] == "caption"
    short = tokenizer(["a red circle"], 5)  # shorter rows than the context, as CLIP.encode_text takes them
    torch.testing.assert_close(encoder.encode_text(short), model.encode_text(short), atol=1e-4, rtol=0)


def test_siglip_graphs_equal_torch(siglip_export):
    source, folder = siglip_export
    model, _, tokenizer = load(source)
    encoder, _, onnx_tokenizer = backends.load_onnx(folder)
    texts = ["a photo of a cat", "two green triangles in the snow", "dog"]
    check_towers_equal(model, encoder, tokenizer, texts)
    assert torch.equal(onnx_tokenizer(texts, 16), tokenizer(texts, 16))
    assert {"spiece.model", "tokenizer_config.json"} <= {path.name for path in folder.iterdir()}
    images = torch.rand(2, 3, 32, 32)
    expected = zero_shot.classify(model, images, ["cat", "dog"], tokenizer)
    torch.testing.assert_close(
        zero_shot.classify(encoder, images, ["cat", "dog"], tokenizer), expected, atol=1e-4, rtol=0
    )
    with pytest.MonkeyPatch.context() as patch:  # exported once: a second load reuses the cached graphs
        patch.setattr(backends, "export_onnx", lambda *args, **kwargs: pytest.fail("exported twice"))
        patch.setenv("CLIPDALLE_CACHE", str(folder.parents[1]))
        backends.load_encoder(source, backend="onnx")


def test_backend_choice_and_its_errors(clip_export, monkeypatch):
    assert backends.resolve_backend("torch") == "torch"
    monkeypatch.setenv("CLIPDALLE_BACKEND", "onnx")
    assert backends.resolve_backend("auto") == "onnx" and backends.resolve_backend("auto", device="cuda") == "torch"
    monkeypatch.delenv("CLIPDALLE_BACKEND")
    assert backends.resolve_backend("auto") == backends.DEFAULT_BACKEND
    monkeypatch.setattr(backends, "onnx_available", lambda: False)
    assert backends.resolve_backend("auto") == "torch"  # auto falls back where onnxruntime is missing
    with pytest.raises(ValueError, match="--backend 'tpu': expected one of auto, torch, onnx"):
        backends.resolve_backend("tpu")
    with pytest.raises(ValueError, match="--backend onnx runs on the CPU"):
        backends.resolve_backend("onnx", device="cuda")
    with pytest.raises(ValueError, match="an ONNX export runs on onnxruntime; use --backend onnx"):
        backends.load_encoder(clip_export, backend="torch")


def test_classify_index_and_search_on_the_onnx_backend(
    capsys, tiny_clip_run, clip_export, shapes_32, tmp_path, monkeypatch
):
    pytest.importorskip("faiss")
    cache = tmp_path / "cache"  # the run's export where load_encoder looks for it: nothing is exported again
    monkeypatch.setenv("CLIPDALLE_CACHE", str(cache))
    shutil.copytree(clip_export, backends.export_folder(tiny_clip_run))
    monkeypatch.setattr(backends, "export_onnx", lambda *args, **kwargs: pytest.fail("exported again"))
    images = [str(path) for path in sorted(shapes_32.glob("*.png"))[:4]]
    results = {}
    for backend in ("torch", "onnx"):
        code, out, err = run(capsys, "classify", *images, "--clip", str(tiny_clip_run), "--labels", "red,blue,green",
                             "--json", "--backend", backend)  # fmt: skip
        assert code == 0, err
        results[backend] = json.loads(out)
    for torch_row, onnx_row in zip(results["torch"], results["onnx"]):
        assert [item["label"] for item in torch_row["top"]] == [item["label"] for item in onnx_row["top"]]
        for torch_item, onnx_item in zip(torch_row["top"], onnx_row["top"]):
            assert abs(torch_item["prob"] - onnx_item["prob"]) < 1e-4
    index = tmp_path / "index"
    code, _, err = run(capsys, "index", "build", "--clip", str(tiny_clip_run), "--data", str(shapes_32),
                       "--out", str(index), "--backend", "onnx")  # fmt: skip
    assert code == 0, err
    found = {}
    for backend in ("torch", "onnx"):
        code, out, err = run(capsys, "search", "a red circle", "--index", str(index), "--json", "--backend", backend)
        assert code == 0, err
        found[backend] = json.loads(out)
    assert [hit["id"] for hit in found["torch"]] == [hit["id"] for hit in found["onnx"]]
    code, _, err = run(
        capsys, "classify", images[0], "--clip", str(clip_export), "--labels", "a,b", "--backend", "torch"
    )
    assert_one_line_error(code, err, "an ONNX export runs on onnxruntime; use --backend onnx")
