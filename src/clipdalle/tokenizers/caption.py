"""The caption tokenizer: byte-level BPE trained on the captions (Hugging Face `tokenizers`).

Text is NFKC-normalised and lowercased (captions are matched case-insensitively), then split into bytes, so
any UTF-8 text (accents, CJK, emoji) encodes without unknown tokens. A caption becomes a fixed-length row:

    <bos> t1 t2 ... tn <eos> <pad> <pad> ...      ids: <pad> = 0, <bos> = 1, <eos> = 2

and a caption too long for the row is cut so that <eos> is still its last token. The whole tokenizer is one
Hugging Face `tokenizer.json`, readable by any `tokenizers` binding.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from ..io import atomic_write

# ids 0, 1, 2 in the order BpeTrainer assigns them. <eos> is 1, not 2: Hugging Face's CLIP text model treats an
# eos_token_id of 2 as "pool at the largest id" (its legacy OpenAI behaviour), so a CLIP trained with our
# tokenizer could not be converted to that layout if <eos> were 2.
SPECIAL_TOKENS = ("<pad>", "<eos>", "<bos>")
BYTE_ALPHABET_SIZE = 256  # the byte-level pre-tokenizer maps every byte to one printable character
MIN_VOCAB_SIZE = BYTE_ALPHABET_SIZE + len(SPECIAL_TOKENS)


def _check_length(length: int) -> None:
    if not isinstance(length, int) or length < 2:
        raise ValueError(f"length must be an integer of at least 2 (room for <bos> and <eos>), got {length!r}")


def _frame(ids: list[int], length: int, bos_id: int, eos_id: int, pad_id: int) -> list[int]:
    """<bos> ids <eos> padded with <pad> to `length`; a long text keeps <bos>, its first tokens and <eos>."""
    body = ids[: length - 2]
    return [bos_id, *body, eos_id] + [pad_id] * (length - 2 - len(body))


class CaptionTokenizer:
    """Byte-level BPE with fixed special ids; `tokenizer(texts, length)` -> LongTensor (N, length)."""

    pad_id = 0
    eos_id = 1
    bos_id = 2

    def __init__(self, tokenizer: Tokenizer, context_length: int | None = None):
        self.tokenizer = tokenizer
        self.context_length = context_length  # default length of encode(); a model's loader sets its own

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> CaptionTokenizer:
        """Learns BPE merges from `texts` until the vocabulary (bytes + specials + merges) has `vocab_size` entries.

        The vocabulary can end smaller when the texts run out of pairs to merge; `vocab_size` reports the real size.
        """
        if not isinstance(vocab_size, int) or vocab_size < MIN_VOCAB_SIZE:
            raise ValueError(
                f"vocab_size must be at least {MIN_VOCAB_SIZE} ({BYTE_ALPHABET_SIZE} bytes + "
                f"{len(SPECIAL_TOKENS)} special tokens), got {vocab_size!r}"
            )
        tokenizer = Tokenizer(models.BPE())
        tokenizer.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
        # no prefix space: decode(encode(text)) gives the text back without a leading space
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=list(SPECIAL_TOKENS),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte, seen in training or not
            show_progress=False,
        )
        tokenizer.train_from_iterator(texts, trainer=trainer)
        # recorded in tokenizer.json so other readers frame captions the same way
        tokenizer.post_processor = processors.TemplateProcessing(
            single="<bos> $A <eos>",
            special_tokens=[("<bos>", cls.bos_id), ("<eos>", cls.eos_id)],
        )
        result = cls(tokenizer)
        result._check_specials("trained tokenizer")
        return result

    @classmethod
    def load(cls, path: str | Path) -> CaptionTokenizer:
        """Reads a tokenizer.json written by `save`; ValueError naming the file if it is missing, corrupt or foreign."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise ValueError(f"{path}: cannot read caption tokenizer ({error})") from None
        try:
            json.loads(text)
            tokenizer = Tokenizer.from_str(text)
        except Exception as error:  # the Rust side raises plain Exception subclasses for any malformed field
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise ValueError(f"{path}: not a valid tokenizer.json ({reason})") from None
        result = cls(tokenizer)
        result._check_specials(str(path))
        return result

    def save(self, path: str | Path) -> None:
        """Writes the single tokenizer.json atomically (temporary name, then rename)."""
        text = self.tokenizer.to_str(pretty=True)
        atomic_write(path, lambda temporary: temporary.write_text(text, encoding="utf-8"))

    def _check_specials(self, source: str) -> None:
        found = tuple(self.tokenizer.id_to_token(index) for index in range(len(SPECIAL_TOKENS)))
        if found != SPECIAL_TOKENS:
            raise ValueError(
                f"{source}: not a clipdalle caption tokenizer: ids 0-2 are {found}, expected {SPECIAL_TOKENS}"
            )
        if not isinstance(self.tokenizer.pre_tokenizer, pre_tokenizers.ByteLevel):
            raise ValueError(f"{source}: not a clipdalle caption tokenizer: its pre-tokenizer is not byte-level")

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def encode(self, texts: str | list[str], length: int | None = None) -> torch.Tensor:
        """Texts -> LongTensor (N, length): <bos> tokens <eos> then <pad>; long texts are cut, keeping <eos> last.

        `length` defaults to `context_length`, which a model's loader sets (`clip.load` sets the CLIP's)."""
        if length is None:
            if self.context_length is None:
                raise ValueError("encode: give the token length, e.g. tokenizer(texts, 32)")
            length = self.context_length
        _check_length(length)
        if isinstance(texts, str):
            texts = [texts]
        if not all(isinstance(text, str) for text in texts):
            raise ValueError("texts must be a string or a list of strings")
        encodings = self.tokenizer.encode_batch(list(texts), add_special_tokens=False)
        rows = [_frame(encoding.ids, length, self.bos_id, self.eos_id, self.pad_id) for encoding in encodings]
        return torch.tensor(rows, dtype=torch.long).reshape(len(rows), length)  # (N, length), also when N = 0

    __call__ = encode

    def decode(self, ids: torch.Tensor | list[list[int]] | list[int]) -> list[str]:
        """Token ids (N, T), (T,), a list of rows or one row -> one string per row, special tokens dropped."""
        if isinstance(ids, torch.Tensor):
            if ids.ndim not in (1, 2):
                raise ValueError(f"ids must be (T,) or (N, T), got shape {tuple(ids.shape)}")
            ids = ids.tolist()
        rows = [ids] if not ids or not isinstance(ids[0], (list, tuple)) else ids
        if not all(isinstance(token, int) for row in rows for token in row):
            raise ValueError("ids must be integers: a tensor, a list of ints or a list of lists of ints")
        return self.tokenizer.decode_batch([list(row) for row in rows], skip_special_tokens=True)
