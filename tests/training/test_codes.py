import json

import numpy as np
import pytest
import torch
from helpers import lock_held_by_another_process

from clipdalle import checkpoint
from clipdalle.config import build_config, load_preset
from clipdalle.data.loader import SampleStream
from clipdalle.models.dvae import DiscreteVAE, DVAEConfig
from clipdalle.training import codes
from clipdalle.training.codes import ChunkWriter, build_code_cache, cache_is_current, open_code_cache
from clipdalle.transforms import load_image


def tiny_vae(tmp_path, seed=0):
    torch.manual_seed(seed)
    vae = DiscreteVAE(build_config(DVAEConfig, load_preset("vae-tiny")["model"], {"image_size": 16}))
    checkpoint.save_model(tmp_path / f"vae{seed}", vae)
    return vae, tmp_path / f"vae{seed}"


def test_cache_holds_the_codes_and_all_captions_of_every_image(shapes_folder, tmp_path):
    vae, run = tiny_vae(tmp_path)
    info = build_code_cache(vae, run, shapes_folder, tmp_path / "cache", batch_size=5, num_workers=0)
    assert info["counts"] == {"train": 32} and info["holdout"] is True
    source = open_code_cache(tmp_path / "cache", "train")
    records = {record.key: record for record in source}
    assert len(records) == 32
    record = records["circle_red_0"]
    assert record.captions == ("a red circle", "red circle")
    expected = vae.encode(load_image(shapes_folder / "circle_red_0.png", 16)[None]).flatten()
    assert torch.equal(torch.as_tensor(record.codes, dtype=torch.long), expected)


def test_stream_of_a_cache_gives_code_batches(shapes_folder, tmp_path):
    vae, run = tiny_vae(tmp_path)
    build_code_cache(vae, run, shapes_folder, tmp_path / "cache", num_workers=0)
    stream = SampleStream(open_code_cache(tmp_path / "cache", "train"), image_size=16, batch_size=8, infinite=False)
    batches = list(stream)
    assert sum(len(batch["keys"]) for batch in batches) == 32
    assert batches[0]["codes"].shape == (8, 16) and batches[0]["codes"].dtype == torch.long
    assert "images" not in batches[0] and all(caption for caption in batches[0]["captions"])


def test_a_cache_of_another_vae_is_not_current(shapes_folder, tmp_path):
    vae, run = tiny_vae(tmp_path)
    build_code_cache(vae, run, shapes_folder, tmp_path / "cache", num_workers=0)
    assert cache_is_current(tmp_path / "cache", run, shapes_folder)
    _, other_run = tiny_vae(tmp_path, seed=1)
    assert not cache_is_current(tmp_path / "cache", other_run, shapes_folder)
    assert not cache_is_current(tmp_path / "cache", run, tmp_path / "other-data")


def test_a_second_builder_of_a_cache_gets_a_one_line_error(shapes_folder, tmp_path):
    vae, run = tiny_vae(tmp_path)
    with lock_held_by_another_process(tmp_path / "cache") as other:
        with pytest.raises(ValueError, match=f"pid {other}.* to build a token cache"):
            build_code_cache(vae, run, shapes_folder, tmp_path / "cache", num_workers=0)


def test_texts_are_stored_by_their_length_not_the_longest(tmp_path):
    long_caption = ("a very long caption " * 10_000).strip()  # 200 kB
    keys = [f"key_{index}" for index in range(2000)] + ["ünïcode/κλειδί"]
    captions = ["a red circle\nred circle"] * 2000 + [long_caption + "\nçà et là"]
    writer = ChunkWriter(tmp_path, "train")
    writer.add(keys, captions, np.zeros((len(keys), 16), dtype=np.int16))
    writer.flush()
    # fixed-width unicode would take 2001 x 200 kB x 4 bytes = 1.6 GB
    assert (tmp_path / "train-00000.npz").stat().st_size < 1_000_000
    (tmp_path / "info.json").write_text(json.dumps({"format_version": codes.FORMAT_VERSION}))
    records = list(open_code_cache(tmp_path, "train"))
    assert [record.key for record in records] == keys
    assert records[0].captions == ("a red circle", "red circle")
    assert records[-1].captions == (long_caption, "çà et là")


def test_a_cache_of_an_older_format_is_rebuilt_not_misread(shapes_folder, tmp_path):
    vae, run = tiny_vae(tmp_path)
    build_code_cache(vae, run, shapes_folder, tmp_path / "cache", num_workers=0)
    info = json.loads((tmp_path / "cache" / "info.json").read_text())
    del info["format_version"]
    (tmp_path / "cache" / "info.json").write_text(json.dumps(info))
    assert not cache_is_current(tmp_path / "cache", run, shapes_folder)
    with pytest.raises(ValueError, match="a token cache of format 1, this clipdalle reads format 2; rebuild it"):
        open_code_cache(tmp_path / "cache", "train")
