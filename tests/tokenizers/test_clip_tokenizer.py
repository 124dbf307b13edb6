"""ClipTokenizer against OpenAI's SimpleTokenizer (from the clip-anytorch wheel, loaded by file path: nothing is
downloaded and `clip` itself is never imported, its __init__ needs torchvision)."""

import importlib.util
import json
import pickle
import random
from pathlib import Path

import pytest
import torch

from clipdalle.tokenizers import clip_bpe as clip_tokenizer
from clipdalle.tokenizers.clip_bpe import MERGES_FILE, ClipTokenizer, clean_text, split_words


def _reference_folder() -> Path | None:
    spec = importlib.util.find_spec("clip")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(spec.submodule_search_locations[0])
    if not (folder / "simple_tokenizer.py").is_file() or not (folder / MERGES_FILE).is_file():
        return None
    return folder


REFERENCE_FOLDER = _reference_folder()
pytestmark = pytest.mark.skipif(
    REFERENCE_FOLDER is None,
    reason="needs OpenAI's simple_tokenizer.py and merges file: pip install --no-deps clip-anytorch (test extra)",
)

CORPUS = [
    "a photo of a cat",
    "A Photo Of A CAT on the MAT.",
    "",
    "   ",
    " \t\n\r\x0b\x0c ",
    "café crème brûlée, naïve façade, smörgåsbord",
    "İSTANBUL ǅemal STRASSE ß ﬁnal Kelvin K",
    "東京タワーの夜景 中文字符 한국어 문장",
    "emoji 😀👍🏽 🇫🇷 ❤️‍🔥 family 👨‍👩‍👧",
    "!!!???...---***~~~ ((())) [a] {b} <c> @#$%^",
    "R&amp;B and rock &amp;amp; roll &lt;b&gt;bold&lt;/b&gt; &#233;t&#xE9; &nbsp;&copy;",
    "Ã©tÃ© â€œquotedâ€\x9d mojibake Ã¼ber",
    "it's don't WON'T I'm they're we've you'll he'd ’s curly ‘quote’",
    "2024 3.14 1,000,000 ½ ² ³ ٣ ४ 10k 4x4",
    "terminal \x1b[31mred\x1b[0m control\x00chars\x07 del\x7f",
    "<|startoftext|> literal specials <|ENDOFTEXT|> inside",
    "aaaaaaaaaaaaaaaaaaaa lolololololololol hahahaha zzzzzzzz",
    "line one\r\nline two\rline three\u2028four\u00a0nbsp\u3000ideographic",
    "combining e\u0301 vs é, zero\u200bwidth, bom\ufeff",
    "Ελληνικά κείμενο και Кириллица текст",
    " ".join(f"word{index} numero {index * 7}" for index in range(600)),  # very long
]


@pytest.fixture(scope="module")
def reference():
    spec = importlib.util.spec_from_file_location(
        "reference_simple_tokenizer", REFERENCE_FOLDER / "simple_tokenizer.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def openai(reference):
    return reference.SimpleTokenizer(str(REFERENCE_FOLDER / MERGES_FILE))


@pytest.fixture(scope="module")
def tokenizer():
    return ClipTokenizer.from_files(REFERENCE_FOLDER / MERGES_FILE)


def reference_tokenize(openai, texts: list[str], context_length: int) -> torch.Tensor:
    """open_clip's tokenize: sot + ids + eot, zero padded, cut to context_length with eot kept last."""
    sot, eot = openai.encoder["<|startoftext|>"], openai.encoder["<|endoftext|>"]
    result = torch.zeros(len(texts), context_length, dtype=torch.long)
    for row, text in enumerate(texts):
        tokens = [sot, *openai.encode(text), eot]
        if len(tokens) > context_length:
            tokens = tokens[:context_length]
            tokens[-1] = eot
        result[row, : len(tokens)] = torch.tensor(tokens)
    return result


def random_ascii_texts(count: int, seed: int) -> list[str]:
    """Printable ASCII with tabs, newlines and carriage returns, no '&': the fast path's domain."""
    rng = random.Random(seed)
    alphabet = [chr(code) for code in range(32, 127) if chr(code) != "&"] + ["\t", "\n", "\r", " ", " "]
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40))) for _ in range(count)]


def test_specials_and_vocabulary_size_match_openai(tokenizer, openai):
    assert tokenizer.vocab_size == len(openai.encoder) == 49408
    assert tokenizer.sot_token_id == openai.encoder["<|startoftext|>"] == 49406
    assert tokenizer.eot_token_id == openai.encoder["<|endoftext|>"] == 49407


@pytest.mark.parametrize("text", CORPUS, ids=[f"corpus{index}" for index in range(len(CORPUS))])
def test_encode_matches_openai(tokenizer, openai, text):
    assert tokenizer.encode(text) == openai.encode(text)


def test_encode_matches_openai_on_random_ascii(tokenizer, openai):
    texts = random_ascii_texts(300, seed=1) + ["a & b", "x&amp;y", "tab\tbell\x07", "\x1c\x1dgroup"]
    assert [tokenizer.encode(text) for text in texts] == [openai.encode(text) for text in texts]


@pytest.mark.parametrize("context_length", [77, 8, 2])
def test_padded_call_matches_open_clip_tokenize(tokenizer, openai, context_length):
    expected = reference_tokenize(openai, CORPUS, context_length)
    text = tokenizer(CORPUS, context_length=context_length)
    assert text.dtype == torch.long and text.shape == (len(CORPUS), context_length)
    assert torch.equal(text, expected)


def test_long_text_is_cut_with_end_token_last(tokenizer):
    long_text = CORPUS[-1]
    ids = tokenizer.encode(long_text)
    assert len(ids) > 200
    row = tokenizer(long_text)[0]
    assert row[0] == tokenizer.sot_token_id and row[-1] == tokenizer.eot_token_id
    assert row[1:-1].tolist() == ids[:75]


def test_short_text_is_zero_padded_after_end_token(tokenizer):
    row = tokenizer("a photo of a cat")[0]
    ids = tokenizer.encode("a photo of a cat")
    assert row[: len(ids) + 2].tolist() == [tokenizer.sot_token_id, *ids, tokenizer.eot_token_id]
    assert (row[len(ids) + 2 :] == 0).all()


def test_call_on_one_string_and_on_no_strings(tokenizer):
    assert torch.equal(tokenizer("a cat"), tokenizer(["a cat"]))
    assert tokenizer([], context_length=16).shape == (0, 16)


def test_context_length_below_two_is_refused(tokenizer):
    with pytest.raises(ValueError, match="context_length=1"):
        tokenizer("a cat", context_length=1)


def test_fast_path_cleaning_equals_ftfy_and_html_cleaning(reference):
    # The fast path skips ftfy.fix_text and html.unescape; on its domain the result must be OpenAI's cleaning.
    texts = random_ascii_texts(2000, seed=2) + ["a\r\nb", "  lead and trail \r", "'s 'T <|startoftext|>"]
    for text in texts:
        assert clip_tokenizer.PLAIN_ASCII_PATTERN.fullmatch(text)
        assert clean_text(text) == reference.whitespace_clean(reference.basic_clean(text)).lower(), repr(text)


def test_ascii_word_split_equals_unicode_pattern(reference):
    texts = [clean_text(text) for text in random_ascii_texts(1000, seed=3)]
    texts.append("".join(chr(code) for code in range(32, 127)))
    for text in texts:
        assert split_words(text) == clip_tokenizer.WORD_PATTERN.findall(text), repr(text)


def test_decode_inverts_encode_up_to_openai_word_spacing(tokenizer, openai):
    for text in CORPUS:
        if "<|" in text:  # a literal special string encodes to the special id, which decode treats as a marker
            continue
        ids = tokenizer.encode(text)
        assert tokenizer.decode(ids) == openai.decode(ids).strip()
    assert tokenizer.decode(tokenizer.encode("A photo of a CAT")) == "a photo of a cat"


def test_decode_of_a_padded_row_stops_at_end_token(tokenizer):
    row = tokenizer("a red bicycle")[0]
    assert tokenizer.decode(row) == "a red bicycle"
    with pytest.raises(ValueError, match="shape"):
        tokenizer.decode(tokenizer(["a", "b"]))
    with pytest.raises(ValueError, match="49408"):
        tokenizer.decode([320, 49408])


def test_hugging_face_directory_gives_the_same_ids(tokenizer, tmp_path):
    merges = clip_tokenizer.read_merges_file(REFERENCE_FOLDER / MERGES_FILE)
    vocab = clip_tokenizer.vocabulary_from_merges(merges)
    (tmp_path / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    lines = ["#version: 0.2", *(f"{first} {second}" for first, second in merges), ""]
    (tmp_path / "merges.txt").write_text("\n".join(lines), encoding="utf-8")
    from_directory = ClipTokenizer.from_files(tmp_path)
    assert from_directory.vocab_size == tokenizer.vocab_size
    assert torch.equal(from_directory(CORPUS), tokenizer(CORPUS))


def test_pickled_tokenizer_gives_the_same_ids(tokenizer):
    # DataLoader workers started with "spawn" receive the tokenizer pickled.
    restored = pickle.loads(pickle.dumps(tokenizer))
    assert torch.equal(restored(CORPUS), tokenizer(CORPUS))


def test_find_installed_uses_the_shipped_merges_file(tokenizer):
    found = ClipTokenizer.find_installed()
    assert torch.equal(found(CORPUS[:8]), tokenizer(CORPUS[:8]))


def test_find_installed_without_packages_names_the_way_out(monkeypatch):
    monkeypatch.setattr(clip_tokenizer.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match="tokenizer=PATH") as error:
        ClipTokenizer.find_installed()
    assert "\n" not in str(error.value)


def test_bad_paths_and_files_are_refused(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        ClipTokenizer.from_files(tmp_path / "missing.txt.gz")
    with pytest.raises(ValueError, match="vocab.json and merges.txt"):
        ClipTokenizer.from_files(tmp_path)
    short = tmp_path / "short.txt"
    short.write_text("#version: 0.2\ni n\nt h\n", encoding="utf-8")
    with pytest.raises(ValueError, match="expected 48894 merges"):
        ClipTokenizer.from_files(short)


def test_save_then_from_files_gives_identical_ids(tmp_path):
    tokenizer = ClipTokenizer.find_installed()
    tokenizer.save(tmp_path / "tok")
    reloaded = ClipTokenizer.from_files(tmp_path / "tok")
    texts = ["a photo of a cat", "Ünïcödé & <b>html</b> 東京 🙂", "don't stop"]
    assert torch.equal(tokenizer(texts), reloaded(texts))
