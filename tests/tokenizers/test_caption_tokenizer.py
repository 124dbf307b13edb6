import json

import pytest
import torch

from clipdalle.tokenizers import CaptionTokenizer

COLOURS = ["red", "orange", "yellow", "green", "blue", "purple", "pink", "black"]
THINGS = ["account", "home", "alarm clock", "umbrella", "arrow left", "cloud upload", "heart", "star outline"]
CAPTIONS = [f"a {colour} icon of a {thing}" for colour in COLOURS for thing in THINGS]


@pytest.fixture(scope="module")
def tokenizer():
    return CaptionTokenizer.train(CAPTIONS * 4, vocab_size=300)


def test_special_ids_are_fixed(tokenizer):
    assert (tokenizer.pad_id, tokenizer.eos_id, tokenizer.bos_id) == (0, 1, 2)
    assert [tokenizer.tokenizer.id_to_token(index) for index in range(3)] == ["<pad>", "<eos>", "<bos>"]
    assert 259 < tokenizer.vocab_size <= 300  # bytes + specials + some merges


def test_encode_frames_and_pads(tokenizer):
    ids = tokenizer.encode(["a red icon of a home", "blue"], length=24)
    assert ids.shape == (2, 24) and ids.dtype == torch.long
    for row in ids.tolist():
        assert row[0] == tokenizer.bos_id
        end = row.index(tokenizer.eos_id)
        assert all(token == 0 for token in row[end + 1 :])
        assert all(token > 2 for token in row[1:end])
    assert torch.equal(tokenizer.encode("blue", 24), ids[1:2])  # one string is a batch of one
    assert torch.equal(tokenizer("blue", 24), ids[1:2])
    assert tokenizer.encode([], 8).shape == (0, 8)


def test_merges_make_common_words_short(tokenizer):
    ids = tokenizer.encode("a red icon of a home", 64)[0]
    assert (ids > 2).sum() < len("a red icon of a home") / 2  # far fewer tokens than bytes


def test_truncation_keeps_eos_last(tokenizer):
    long_text = " ".join(CAPTIONS[:5])
    ids = tokenizer.encode(long_text, length=10)[0].tolist()
    assert len(ids) == 10 and ids[0] == tokenizer.bos_id and ids[-1] == tokenizer.eos_id and 0 not in ids
    full = tokenizer.encode(long_text, length=200)[0].tolist()
    assert ids[:9] == full[:9]  # the text's first tokens, then <eos>
    assert tokenizer.encode("", 2).tolist() == [[tokenizer.bos_id, tokenizer.eos_id]]
    with pytest.raises(ValueError, match="at least 2"):
        tokenizer.encode("red", 1)


@pytest.mark.parametrize(
    "text",
    [
        "A Red Icon of an Account Circle Outline",
        "Crème Brûlée à la Façade, naïve Ünïcödé",
        "日本語のテキスト 和 中文 한국어",
        "emoji 🎨👍🏽 and  double  spaces\tand tabs",
    ],
)
def test_round_trip_is_lowercase_text_for_any_utf8(tokenizer, text):
    ids = tokenizer.encode(text, 256)
    assert tokenizer.decode(ids) == [text.lower()]
    assert tokenizer.decode(ids[0]) == [text.lower()]  # (T,) and plain lists decode too
    assert tokenizer.decode(ids[0].tolist()) == [text.lower()]
    assert tokenizer.decode(ids.tolist()) == [text.lower()]


def test_case_is_ignored(tokenizer):
    assert torch.equal(tokenizer.encode("RED Home", 16), tokenizer.encode("red home", 16))


def test_save_load_gives_identical_ids(tokenizer, tmp_path):
    path = tmp_path / "run" / "tokenizer.json"
    tokenizer.save(path)
    assert [p.name for p in path.parent.iterdir()] == ["tokenizer.json"]  # no temporary left behind
    loaded = CaptionTokenizer.load(path)
    texts = CAPTIONS + ["unseen words: zebra crossing ✓", "ÉCOLE"]
    assert torch.equal(loaded.encode(texts, 32), tokenizer.encode(texts, 32))
    assert loaded.vocab_size == tokenizer.vocab_size


def test_load_rejects_bad_files(tokenizer, tmp_path):
    missing = tmp_path / "missing.json"
    with pytest.raises(ValueError, match="missing.json"):
        CaptionTokenizer.load(missing)
    corrupt = tmp_path / "corrupt.json"
    corrupt.write_text('{"version": "1.0", "model": ')
    with pytest.raises(ValueError, match="corrupt.json: not a valid tokenizer.json"):
        CaptionTokenizer.load(corrupt)
    # a valid Hugging Face tokenizer whose special tokens are elsewhere is not ours
    good = tmp_path / "good.json"
    tokenizer.save(good)
    values = json.loads(good.read_text())
    values["added_tokens"] = []
    vocab = values["model"]["vocab"]
    vocab["<bos>"], vocab["<pad>"] = vocab["<pad>"], vocab["<bos>"]
    foreign = tmp_path / "foreign.json"
    foreign.write_text(json.dumps(values))
    with pytest.raises(ValueError, match="foreign.json: not a clipdalle caption tokenizer"):
        CaptionTokenizer.load(foreign)


def test_vocab_size_below_byte_alphabet_is_an_error():
    with pytest.raises(ValueError, match="at least 259"):
        CaptionTokenizer.train(CAPTIONS, vocab_size=100)


def test_training_on_60k_captions_is_fast():
    import time

    captions = [
        f"a {colour} icon of a {THINGS[index % 8]} number {index % 97}" for index in range(7500) for colour in COLOURS
    ]
    start = time.perf_counter()
    trained = CaptionTokenizer.train(captions, vocab_size=1024)
    assert time.perf_counter() - start < 10.0
    assert trained.encode(captions[:3], 16).shape == (3, 16)
