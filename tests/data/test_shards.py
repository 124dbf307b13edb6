import tarfile

import pytest

from clipdalle.data.shards import ShardWriter


def _samples(count):
    return [
        (f"sample{index:03d}", {"txt": f"caption {index}", "png": bytes([index % 256]) * (index + 1)})
        for index in range(count)
    ]


def _write(folder, samples, max_count):
    with ShardWriter(folder, prefix="part", max_count=max_count) as writer:
        for key, members in samples:
            writer.write(key, members)
    return writer


def test_round_trip_with_tarfile(tmp_path):
    samples = _samples(7)
    writer = _write(tmp_path, samples, max_count=3)
    assert [path.name for path in writer.paths] == ["part-00000.tar", "part-00001.tar", "part-00002.tar"]
    assert writer.count == 7
    read = {}
    names_in_order = []
    for path in writer.paths:
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                assert member.mtime == 0 and member.uid == 0 and member.mode == 0o644
                names_in_order.append(member.name)
                read[member.name] = tar.extractfile(member).read()
    # samples in write order, each sample's members sorted by extension (WebDataset groups consecutive members)
    assert names_in_order == [f"{key}.{extension}" for key, _ in samples for extension in ("png", "txt")]
    for key, members in samples:
        assert read[f"{key}.txt"] == members["txt"].encode("utf-8")
        assert read[f"{key}.png"] == members["png"]


def test_output_is_byte_reproducible(tmp_path):
    samples = _samples(5)
    first = _write(tmp_path / "a", samples, max_count=2)
    second = _write(tmp_path / "b", samples, max_count=2)
    assert [p.read_bytes() for p in first.paths] == [p.read_bytes() for p in second.paths]
    # member order in the dict does not matter either
    reordered = [(key, dict(reversed(list(members.items())))) for key, members in samples]
    third = _write(tmp_path / "c", reordered, max_count=2)
    assert [p.read_bytes() for p in first.paths] == [p.read_bytes() for p in third.paths]


def test_unclosed_writer_leaves_no_final_shard(tmp_path):
    writer = ShardWriter(tmp_path, max_count=10)
    writer.write("a", {"txt": "hello"})
    writer.write("b", {"txt": "world"})
    assert list(tmp_path.glob("*.tar")) == []  # a killed process stops here: only a hidden temporary exists
    writer.close()
    assert [path.name for path in tmp_path.glob("*.tar")] == ["shard-00000.tar"]


def test_exception_discards_shard_in_progress_but_keeps_finished_ones(tmp_path):
    with pytest.raises(RuntimeError):
        with ShardWriter(tmp_path, max_count=2) as writer:
            for key in ("a", "b", "c"):
                writer.write(key, {"txt": key})
            raise RuntimeError("build killed")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["shard-00000.tar"]
    with tarfile.open(tmp_path / "shard-00000.tar") as tar:
        assert tar.getnames() == ["a.txt", "b.txt"]


def test_bad_keys_and_members_are_rejected(tmp_path):
    with ShardWriter(tmp_path) as writer:
        with pytest.raises(ValueError, match="contains '.'"):
            writer.write("icon.red", {"txt": "x"})
        with pytest.raises(ValueError, match="no members"):
            writer.write("icon", {})
        with pytest.raises(ValueError, match="extension"):
            writer.write("icon", {".txt": "x"})
        writer.write("icon", {"txt": "x"})
        with pytest.raises(ValueError, match="already written"):
            writer.write("icon", {"txt": "y"})
    with tarfile.open(tmp_path / "shard-00000.tar") as tar:
        assert tar.extractfile("icon.txt").read() == b"x"
