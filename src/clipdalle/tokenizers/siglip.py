"""SigLIP's tokenizers: SigLIP's SentencePiece model (spiece.model) and SigLIP 2's Gemma tokenizer (tokenizer.json).

Both clean text as SigLIP was trained (big_vision's canonicalisation: lower case, ASCII punctuation removed,
whitespace runs collapsed), end each text with the end-of-sequence token and pad every row to the full context
length with the padding id, because SigLIP's text tower reads the last position of a full row.

    tokenizer = SiglipTokenizer.from_files("siglip-dir/")      # spiece.model or tokenizer.json, + tokenizer_config
    text = tokenizer(["a photo of a cat"], 64)                  # LongTensor (1, 64)

spiece.model ids equal transformers' SiglipTokenizer(texts, padding="max_length", truncation=True), which cleans the
same way; its quirks are followed (a "▁" prefix, special tokens split out of the text before cleaning).
tokenizer.json ids equal transformers' fast tokenizer on the cleaned text (what open_clip feeds it): the
special tokens it adds (its post-processor, or add_bos_token / add_eos_token in tokenizer_config.json),
truncation to the row and padding on the configured side.
"""

from __future__ import annotations

import json
import re
import string
from pathlib import Path
from typing import Any

import torch

SPIECE_FILE = "spiece.model"
TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
CONTEXT_LENGTH = 64  # SigLIP's text length (so400m: 16 in open_clip's config, 64 in transformers')
SPIECE_UNDERLINE = "▁"  # SentencePiece's word-start mark
PUNCTUATION = str.maketrans("", "", string.punctuation)
WHITESPACE = re.compile(r"\s+")


def canonicalize(text: str, lower: bool = True) -> str:
    """big_vision's text cleaning for SigLIP: lower case, ASCII punctuation removed, whitespace runs to one space,
    stripped (as transformers' SiglipTokenizer.canonicalize_text)."""
    if lower:
        text = text.lower()
    return WHITESPACE.sub(" ", text.translate(PUNCTUATION)).strip()


def _token_text(value: Any) -> str | None:
    """A special token from tokenizer_config.json: a string, or transformers' AddedToken dict {"content": ...}."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _read_settings(folder: Path) -> dict[str, Any]:
    settings: dict[str, Any] = {}
    for name in (SPECIAL_TOKENS_MAP, TOKENIZER_CONFIG):  # tokenizer_config.json wins, as in transformers
        path = folder / name
        if path.is_file():
            try:
                values = json.loads(path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}: not valid JSON ({error})") from None
            settings.update(values if isinstance(values, dict) else {})
    return settings


class SiglipTokenizer:
    """`tokenizer(texts, context_length)` -> LongTensor (N, context_length): cleaned text, end-of-sequence token,
    padding to the full length. Built by `from_files`; `encode(text)` gives one text's ids without specials."""

    def __init__(
        self,
        encode_pieces: Any,
        *,
        eos_id: int | None,
        pad_id: int,
        bos_id: int | None = None,
        pad_left: bool = False,
        vocab_size: int,
        context_length: int = CONTEXT_LENGTH,
    ):
        self._encode_pieces = encode_pieces  # text -> ids without special tokens (cleaning included)
        self.eos_id, self.pad_id, self.bos_id = eos_id, pad_id, bos_id
        self.pad_left = pad_left
        self.vocab_size = vocab_size
        self.context_length = context_length
        self._fast: Any = None  # the tokenizers.Tokenizer of a tokenizer.json, which adds its own special tokens
        self.files: list[Path] = []  # the files it was read from (copied beside an ONNX export)

    # ------------------------------------------------------------------------------------------ loading

    @classmethod
    def from_files(cls, folder: str | Path) -> SiglipTokenizer:
        """spiece.model (SigLIP; transformers' SiglipTokenizer) or tokenizer.json (SigLIP 2's Gemma tokenizer), with
        tokenizer_config.json / special_tokens_map.json beside it for the special tokens."""
        folder = Path(folder)
        settings = _read_settings(folder)
        spiece, fast = folder / SPIECE_FILE, folder / TOKENIZER_JSON
        prefer_spiece = settings.get("tokenizer_class") in ("SiglipTokenizer", None) or not fast.is_file()
        if spiece.is_file() and prefer_spiece:
            tokenizer, model_file = cls._from_sentencepiece(spiece, settings), spiece
        elif fast.is_file():
            tokenizer, model_file = cls._from_tokenizer_json(fast, settings), fast
        else:
            raise ValueError(f"{folder}: no SigLIP tokenizer ({SPIECE_FILE} or {TOKENIZER_JSON}); pass tokenizer=PATH")
        settings_files = [folder / name for name in (TOKENIZER_CONFIG, SPECIAL_TOKENS_MAP) if (folder / name).is_file()]
        tokenizer.files = [model_file, *settings_files]
        return tokenizer

    @classmethod
    def _from_sentencepiece(cls, path: Path, settings: dict[str, Any]) -> SiglipTokenizer:
        try:
            import sentencepiece
        except ImportError:
            raise ValueError(
                f"{path}: reading SigLIP's tokenizer needs sentencepiece: pip install sentencepiece"
            ) from None
        processor = sentencepiece.SentencePieceProcessor()
        try:
            processor.LoadFromSerializedProto(_spiece_proto(path, legacy=settings.get("legacy", True)))
        except (OSError, RuntimeError) as error:
            raise ValueError(f"{path}: not a SentencePiece model ({error})") from None
        eos = _token_text(settings.get("eos_token", "</s>"))
        unk = _token_text(settings.get("unk_token", "<unk>"))
        pad = _token_text(settings.get("pad_token", "</s>"))
        specials = [token for token in (eos, unk, pad) if token]
        specials += [_token_text(token) for token in settings.get("additional_special_tokens") or []]
        lower = settings.get("do_lower_case", True)
        unk_length = len(processor.encode(unk, out_type=str))
        specials = sorted(set(specials), key=len, reverse=True)
        split_pattern = re.compile("(" + "|".join(re.escape(token) for token in specials) + ")")

        def pieces_of(chunk: str) -> list[str]:
            # transformers' trick: encode "<unk>" + text and drop the unk's pieces, so SentencePiece adds no
            # word-start mark of its own in front of the text.
            pieces = processor.encode(unk + canonicalize(chunk, lower), out_type=str)
            return pieces[unk_length:] if len(pieces) >= unk_length else pieces

        def encode_pieces(text: str) -> list[int]:
            parts = split_pattern.split(SPIECE_UNDERLINE + text.replace(SPIECE_UNDERLINE, " "))  # text, special, ...
            for index in range(1, len(parts), 2):  # special tokens strip the spaces beside them
                parts[index - 1], parts[index + 1] = parts[index - 1].rstrip(), parts[index + 1].lstrip()
            pieces: list[str] = []
            for index, part in enumerate(parts):
                if index % 2:
                    pieces.append(part)
                elif part:
                    pieces += pieces_of(part)
            if len(pieces) > 1 and pieces[0] == SPIECE_UNDERLINE and pieces[1] in specials:
                pieces = pieces[1:]
            return [processor.piece_to_id(piece) for piece in pieces]

        eos_id = processor.piece_to_id(eos) if eos else None
        return cls(
            encode_pieces,
            eos_id=eos_id,
            pad_id=processor.piece_to_id(pad) if pad else 0,
            vocab_size=processor.get_piece_size(),
            context_length=_context_length(settings),
        )

    @classmethod
    def _from_tokenizer_json(cls, path: Path, settings: dict[str, Any]) -> SiglipTokenizer:
        from tokenizers import Tokenizer, processors

        try:
            tokenizer = Tokenizer.from_file(str(path))
        except Exception as error:  # the Rust side raises plain Exception subclasses for any malformed field
            raise ValueError(f"{path}: not a valid tokenizer.json ({str(error).splitlines()[0]})") from None
        bos = _token_text(settings.get("bos_token"))
        eos = _token_text(settings.get("eos_token"))
        pad = _token_text(settings.get("pad_token")) or "<pad>"
        if "add_bos_token" in settings or "add_eos_token" in settings:
            # transformers rebuilds the post-processor from these flags when tokenizer_config.json sets them
            add_bos, add_eos = bool(settings.get("add_bos_token")) and bos, bool(settings.get("add_eos_token")) and eos
            template = f"{bos + ':0 ' if add_bos else ''}$A:0{' ' + eos + ':0' if add_eos else ''}"
            used = [token for token, added in ((bos, add_bos), (eos, add_eos)) if added]
            tokenizer.post_processor = processors.TemplateProcessing(
                single=template, special_tokens=[(token, tokenizer.token_to_id(token)) for token in used]
            )
        pad_id = tokenizer.token_to_id(pad)
        if pad_id is None:
            raise ValueError(
                f"{path}: padding token {pad!r} is not in the vocabulary; set pad_token in {TOKENIZER_CONFIG}"
            )
        default_side = "left" if settings.get("tokenizer_class", "").startswith("Gemma") else "right"
        result = cls(
            lambda text: tokenizer.encode(canonicalize(text), add_special_tokens=False).ids,
            eos_id=None,
            pad_id=pad_id,
            pad_left=settings.get("padding_side", default_side) == "left",
            vocab_size=tokenizer.get_vocab_size(),
            context_length=_context_length(settings),
        )
        if tokenizer.post_processor is None:
            tokenizer.post_processor = processors.TemplateProcessing(single="$A:0", special_tokens=[])
        result._fast = tokenizer
        return result

    def save(self, folder: str | Path) -> Path:
        """Copies the files it was read from into `folder` (a tokenizer_config.json too: `{}` when there was none,
        which reads back the same), where `from_files` reads them back."""
        from ..io import atomic_write

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        for path in self.files:
            data = path.read_bytes()
            atomic_write(folder / path.name, lambda temporary, data=data: temporary.write_bytes(data))
        if not (folder / TOKENIZER_CONFIG).is_file():
            atomic_write(folder / TOKENIZER_CONFIG, lambda temporary: temporary.write_text("{}\n"))
        return folder

    # ------------------------------------------------------------------------------------------ encoding

    def encode(self, text: str) -> list[int]:
        """Ids of one text after cleaning, without special tokens."""
        return list(self._encode_pieces(text))

    def __call__(self, texts: str | list[str], context_length: int | None = None) -> torch.LongTensor:
        """Token ids (N, context_length): each text's ids and the end-of-sequence token, cut to fit, then padded."""
        length = context_length or self.context_length
        if length < 2:
            raise ValueError(f"context_length={length} leaves no room for a token and the end token; expected >= 2")
        if isinstance(texts, str):
            texts = [texts]
        if not all(isinstance(text, str) for text in texts):
            raise ValueError("texts must be a string or a list of strings")
        rows = []
        for text in texts:
            if self._fast is not None:  # the tokenizer.json's special tokens, made room for before cutting
                encoding = self._fast.encode(canonicalize(text), add_special_tokens=False)
                special_count = self._fast.post_processor.num_special_tokens_to_add(False)
                encoding.truncate(max(length - special_count, 0))
                ids = self._fast.post_process(encoding).ids
            else:
                ids = self.encode(text)[: length - 1]
                if not ids or ids[-1] != self.eos_id:  # transformers adds no second end token after a literal one
                    ids.append(self.eos_id)
            padding = [self.pad_id] * (length - len(ids))
            rows.append(padding + ids if self.pad_left else ids + padding)
        return torch.tensor(rows, dtype=torch.long).reshape(len(rows), length)  # (N, length), also when N = 0


def _context_length(settings: dict[str, Any]) -> int:
    length = settings.get("model_max_length")
    return length if isinstance(length, int) and 2 <= length <= 4096 else CONTEXT_LENGTH


def _spiece_proto(path: Path, legacy: bool) -> bytes:
    """The SentencePiece model's bytes; with legacy=False (tokenizer_config.json), without the dummy word-start
    prefix, as transformers loads it."""
    data = path.read_bytes()
    if legacy:
        return data
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto.FromString(data)
    proto.normalizer_spec.add_dummy_prefix = False
    return proto.SerializeToString()
