"""SigLIP's tokenizers give transformers' ids: SentencePiece (spiece.model) against SiglipTokenizer, and a Gemma-style
tokenizer.json (SigLIP 2) against transformers' fast tokenizer, on small models trained here on a varied corpus."""

import io
import json

import pytest
import torch

from clipdalle.tokenizers.siglip import SiglipTokenizer, canonicalize

transformers = pytest.importorskip("transformers", reason="transformers is not installed (pip install transformers)")

TRAINING_TEXT = [
    "A photo of a cat sitting on a red sofa.",
    "Two dogs playing in the snow!",
    "café au lait, naïve résumé, Ångström",
    "東京タワーの写真 and 北京的猫",
    "emoji 😀 party 🎉 time",
    "numbers 12345, 3.14 and 2nd place",
    "UPPER lower MiXeD case",
    "hyphen-ated words_with_underscores",
    "a diagram of the water cycle",
    "сфотографированный кот",
] * 10
CORPUS = [
    *TRAINING_TEXT[:10],
    "",
    "   ",
    "!!!???",
    "  leading and trailing spaces  ",
    "tabs\tand\nnew lines",
    "UNSEEN zebra qqq xylophone",
    "a </s> b",  # special tokens written in the text
    "</s>",
    "x<unk>y </s></s> z",
    "▁already marked",
    "a very long caption that goes on " * 8,
]


@pytest.fixture(scope="module")
def spiece_folder(tmp_path_factory):
    sentencepiece = pytest.importorskip("sentencepiece", reason="sentencepiece is not installed")
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(TRAINING_TEXT), model_writer=model, vocab_size=180, model_type="unigram",
        character_coverage=1.0, pad_id=0, eos_id=1, unk_id=2, bos_id=-1, hard_vocab_limit=False,
        minloglevel=2,
    )  # fmt: skip
    folder = tmp_path_factory.mktemp("siglip")
    (folder / "spiece.model").write_bytes(model.getvalue())
    return folder


@pytest.mark.parametrize("length", [16, 64])
def test_sentencepiece_ids_equal_transformers_siglip_tokenizer(spiece_folder, length):
    reference = transformers.SiglipTokenizer(str(spiece_folder / "spiece.model"))
    ours = SiglipTokenizer.from_files(spiece_folder)
    expected = reference(CORPUS, padding="max_length", max_length=length, truncation=True).input_ids
    assert ours(CORPUS, length).tolist() == expected
    assert ours(CORPUS[0], length).shape == (1, length)
    assert (ours.eos_id, ours.pad_id) == (reference.eos_token_id, reference.pad_token_id)


@pytest.mark.parametrize("legacy", [True, False])
def test_sentencepiece_reads_tokenizer_config(spiece_folder, tmp_path, legacy):
    folder = tmp_path / "with-config"
    folder.mkdir()
    (folder / "spiece.model").write_bytes((spiece_folder / "spiece.model").read_bytes())
    settings = {"tokenizer_class": "SiglipTokenizer", "pad_token": "<pad>", "model_max_length": 24, "legacy": legacy}
    (folder / "tokenizer_config.json").write_text(json.dumps(settings))
    reference = transformers.AutoTokenizer.from_pretrained(folder)
    ours = SiglipTokenizer.from_files(folder)
    assert ours.context_length == 24 and ours.pad_id == reference.pad_token_id == 0
    expected = reference(CORPUS, padding="max_length", max_length=24, truncation=True).input_ids
    assert ours(CORPUS).tolist() == expected


def gemma_folder(root, **settings):
    """A small Gemma-style byte-fallback BPE saved by transformers' GemmaTokenizer (SigLIP 2's tokenizer class)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]
    trainer_tokenizer = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    trainer_tokenizer.normalizer = normalizers.Replace(" ", "▁")
    trainer_tokenizer.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
    byte_tokens = [f"<0x{value:02X}>" for value in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=420, special_tokens=specials + byte_tokens, show_progress=False)
    trainer_tokenizer.train_from_iterator(TRAINING_TEXT, trainer)
    model = json.loads(trainer_tokenizer.to_str())["model"]
    merges = [tuple(merge) if isinstance(merge, list) else tuple(merge.split()) for merge in model["merges"]]
    tokenizer = transformers.GemmaTokenizer(vocab=model["vocab"], merges=merges, **settings)
    folder = root / "_".join(f"{key}-{value}" for key, value in settings.items())
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.parametrize(
    "settings",
    [
        {"add_bos_token": False, "add_eos_token": True, "padding_side": "right"},  # SigLIP 2's framing
        {"add_bos_token": True, "add_eos_token": True, "padding_side": "left"},
    ],
    ids=["eos-right", "bos-eos-left"],
)
def test_tokenizer_json_ids_equal_transformers_fast_tokenizer(tmp_path, settings):
    folder = gemma_folder(tmp_path, **settings)
    reference = transformers.AutoTokenizer.from_pretrained(folder)
    ours = SiglipTokenizer.from_files(folder)
    cleaned = [canonicalize(text) for text in CORPUS]  # as open_clip feeds SigLIP 2's tokenizer
    for length in (12, 64):
        expected = reference(cleaned, padding="max_length", max_length=length, truncation=True).input_ids
        assert ours(CORPUS, length).tolist() == expected


def test_canonicalize_is_big_visions_cleaning():
    assert canonicalize("  A Photo, of a CAT!!  ") == "a photo of a cat"
    assert canonicalize("hyphen-ated\twords_here") == "hyphenated wordshere"


def test_missing_files_and_bad_lengths_are_value_errors(tmp_path, spiece_folder):
    with pytest.raises(ValueError, match="no SigLIP tokenizer .spiece.model or tokenizer.json"):
        SiglipTokenizer.from_files(tmp_path)
    with pytest.raises(ValueError, match="context_length=1"):
        SiglipTokenizer.from_files(spiece_folder)(["a"], 1)
    assert SiglipTokenizer.from_files(spiece_folder)([], 8).shape == (0, 8)
    assert torch.equal(SiglipTokenizer.from_files(spiece_folder)("a cat", 8)[0, -1:], torch.tensor([1]))
