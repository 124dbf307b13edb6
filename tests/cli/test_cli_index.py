"""The meme finder from the command line: build an index, search it by text and by image, moderate."""

import hashlib
import json
from pathlib import Path

import pytest
from helpers import assert_one_line_error, run

pytest.importorskip("faiss")


def test_info_and_search_by_text_and_image(capsys, built_index, shapes_32):
    code, out, err = run(capsys, "index", "info", "--index", str(built_index))
    assert code == 0, err
    distinct = {hashlib.sha256(path.read_bytes()).hexdigest() for path in shapes_32.glob("*.png")}
    assert json.loads(out)["count"] == len(distinct) < 64  # identical images are stored once
    code, out, err = run(capsys, "search", "a red circle", "--index", str(built_index), "-k", "5", "--json")
    assert code == 0, err
    results = json.loads(out)
    assert len(results) == 5 and {"id", "path", "caption", "score"} <= set(results[0])
    assert results[0]["score"] >= results[-1]["score"]
    image = shapes_32 / "square_blue_1.png"
    code, out, err = run(capsys, "search", "--image", str(image), "--index", str(built_index), "-k", "1", "--json")
    assert code == 0, err
    found = json.loads(out)[0]
    assert found["score"] > 0.999 and Path(found["path"]).read_bytes() == image.read_bytes()


def test_moderate_and_errors(capsys, built_index, tmp_path):
    concepts = tmp_path / "concepts.txt"
    concepts.write_text("a red circle\t0.5\na black cross\n")
    code, out, err = run(capsys, "moderate", "--index", str(built_index), "--concepts", str(concepts), "--json")
    assert code == 0, err
    assert [c["concept"] for c in json.loads(out)["concepts"]] == ["a red circle", "a black cross"]
    code, _, err = run(capsys, "search", "--index", str(built_index))
    assert_one_line_error(code, err, "give a text query")
    code, _, err = run(capsys, "search", "x", "--index", str(tmp_path / "nothing"))
    assert_one_line_error(code, err, "nothing")
    code, _, err = run(capsys, "index", "remove", "--index", str(built_index), "--ids", "a,b")
    assert_one_line_error(code, err, "expected comma-separated integer ids")
