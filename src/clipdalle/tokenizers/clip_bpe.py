"""OpenAI-compatible CLIP tokenizer: the same ids as OpenAI's SimpleTokenizer, faster.

Text goes through OpenAI's cleaning (ftfy, HTML unescape twice, whitespace collapse, lower case), is split into
words with CLIP's pre-tokenisation regex, and each word is byte-encoded and merged with byte-level BPE whose last
symbol carries the end-of-word marker `</w>` (per OpenAI CLIP, simple_tokenizer.py). The merging itself runs in
Hugging Face `tokenizers` (a BPE model given the same vocabulary and merges) behind a per-word LRU cache, and
plain-ASCII text without '&' skips ftfy and html.unescape, which leave such text unchanged.

Nothing of the vocabulary ships with clipdalle: load it from a Hugging Face CLIP directory (vocab.json +
merges.txt), from OpenAI's merges file (bpe_simple_vocab_16e6.txt.gz), or from an installed `open_clip` or
`clip` package with `ClipTokenizer.find_installed()`.
"""

import functools
import gzip
import html
import importlib.util
import itertools
import json
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import ftfy
import numpy
import regex
import torch
from tokenizers.models import BPE

START_OF_TEXT = "<|startoftext|>"
END_OF_TEXT = "<|endoftext|>"
END_OF_WORD = "</w>"
MERGES_FILE = "bpe_simple_vocab_16e6.txt.gz"  # the name OpenAI's clip and open_clip ship their merges under
# OpenAI's SimpleTokenizer keeps the first 48,894 merges after the header line, so that
# 256 bytes + 256 bytes with </w> + merges + 2 specials = 49,408 ids.
N_MERGES = 49152 - 256 - 2
CONTEXT_LENGTH = 77  # OpenAI CLIP's text context
WORD_CACHE_SIZE = 1 << 16  # distinct words remembered; captions reuse a few thousand words

# CLIP's pre-tokenisation pattern (OpenAI CLIP, simple_tokenizer.py): specials, English contractions, runs of
# letters, single digits, runs of anything else that is not whitespace.
WORD_PATTERN = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)
# The same pattern for ASCII-only text, where \p{L} is [a-z] (case-insensitive) and \p{N} is [0-9]; the standard
# library's engine is faster on short strings.
ASCII_WORD_PATTERN = re.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[a-z]+|[0-9]|[^\sa-z0-9]+""", re.IGNORECASE
)
WHITESPACE_PATTERN = regex.compile(r"\s+")
# Printable ASCII except '&', plus tab, newline and carriage return. ftfy.fix_text changes such text at most by
# turning '\r' into '\n' (gone after the whitespace collapse), and html.unescape needs an '&' to do anything, so
# text matching this is cleaned without them. Other ASCII control characters are removed by ftfy: slow path.
PLAIN_ASCII_PATTERN = re.compile(r"[\t\n\r -%'-~]*")


def bytes_to_unicode() -> dict[int, str]:
    """Map each byte 0..255 to a printable character, as OpenAI's byte-level BPE does.

    Bytes that are already printable Latin-1 characters ('!'..'~', '¡'..'¬', '®'..'ÿ') stand for themselves;
    the other 68 (controls, space, soft hyphen...) take the characters from U+0100 on, in byte order. The order
    of this dict (printable bytes first) is also the order of the first 256 vocabulary entries.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {byte: chr(byte) for byte in printable}
    unprintable = [byte for byte in range(256) if byte not in mapping]
    for offset, byte in enumerate(unprintable):
        mapping[byte] = chr(256 + offset)
    return mapping


# str.translate table from a Latin-1 decoded byte string (code point == byte value) to BPE symbols.
BYTE_SYMBOLS = {byte: symbol for byte, symbol in bytes_to_unicode().items() if chr(byte) != symbol}
SYMBOL_BYTES = {symbol: byte for byte, symbol in bytes_to_unicode().items()}


def clean_text(text: str) -> str:
    """OpenAI's cleaning: ftfy.fix_text, html.unescape twice, whitespace runs to one space, strip, lower case."""
    if PLAIN_ASCII_PATTERN.fullmatch(text):
        return " ".join(text.split()).lower()
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return WHITESPACE_PATTERN.sub(" ", text).strip().lower()


def split_words(cleaned: str) -> list[str]:
    """Split cleaned text into the words that BPE merges independently (CLIP's pre-tokenisation)."""
    if cleaned.isascii():
        return ASCII_WORD_PATTERN.findall(cleaned)
    return WORD_PATTERN.findall(cleaned)


def byte_encode(word: str) -> str:
    """A word's UTF-8 bytes as BPE symbols (one printable character per byte)."""
    return word.encode("utf-8").decode("latin-1").translate(BYTE_SYMBOLS)


def byte_decode(symbols: str) -> str:
    """Inverse of byte_encode over a whole string; invalid UTF-8 (a cut multi-byte character) becomes U+FFFD."""
    return bytes(SYMBOL_BYTES[symbol] for symbol in symbols).decode("utf-8", errors="replace")


def vocabulary_from_merges(merges: Sequence[tuple[str, str]]) -> dict[str, int]:
    """The vocabulary OpenAI's SimpleTokenizer builds: bytes, bytes + </w>, one token per merge, the two specials."""
    symbols = list(bytes_to_unicode().values())
    tokens = [*symbols, *(symbol + END_OF_WORD for symbol in symbols), *(first + second for first, second in merges)]
    tokens += [START_OF_TEXT, END_OF_TEXT]
    return {token: index for index, token in enumerate(tokens)}


def parse_merges(lines: Iterable[str], source: str) -> list[tuple[str, str]]:
    """Merge pairs from the lines of a merges file: "#version" headers and blank lines skipped."""
    merges = []
    for number, line in enumerate(lines, start=1):
        if not line.strip() or (number == 1 and "#version" in line):
            continue
        pair = line.split()
        if len(pair) != 2:
            raise ValueError(f"{source} line {number}: expected a merge 'first second', got {line!r}")
        merges.append((pair[0], pair[1]))
    return merges


def read_merges_file(path: Path) -> list[tuple[str, str]]:
    """The merges OpenAI's SimpleTokenizer uses from bpe_simple_vocab_16e6.txt(.gz): lines 1..48894."""
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":  # gzip magic number
        raw = gzip.decompress(raw)
    lines = raw.decode("utf-8").split("\n")
    # Per OpenAI: drop the header line, keep the next N_MERGES lines whatever the file holds after them.
    merges = parse_merges(lines[1 : N_MERGES + 1], str(path))
    if len(merges) != N_MERGES:
        raise ValueError(f"{path}: expected {N_MERGES} merges after the header line, found {len(merges)}")
    return merges


def pad_rows(rows: list[list[int]], context_length: int, end_id: int, pad_id: int = 0) -> list[list[int]]:
    """Cut or pad token rows to context_length; a cut row keeps end_id as its last token (like open_clip)."""
    padded = []
    for row in rows:
        if len(row) > context_length:
            padded.append([*row[: context_length - 1], end_id])
        else:
            padded.append(row + [pad_id] * (context_length - len(row)))
    return padded


class ClipTokenizer:
    """Byte-level BPE with OpenAI CLIP's cleaning and vocabulary; ids identical to OpenAI's SimpleTokenizer."""

    def __init__(self, vocab: dict[str, int], merges: Sequence[tuple[str, str]]):
        for special in (START_OF_TEXT, END_OF_TEXT):
            if special not in vocab:
                raise ValueError(f"CLIP vocabulary of {len(vocab)} tokens has no {special!r}; expected both specials")
        self.vocab = vocab
        self.merges = list(merges)
        self.sot_token_id = vocab[START_OF_TEXT]
        self.eot_token_id = vocab[END_OF_TEXT]
        self.vocab_size = max(vocab.values()) + 1
        self._id_to_token = {index: token for token, index in vocab.items()}
        try:
            # cache_capacity=0: our word cache below sits in front and holds ids, not tokens.
            self._bpe = BPE(vocab, list(merges), end_of_word_suffix=END_OF_WORD, cache_capacity=0)
        except Exception as error:  # tokenizers raises its own exception types for bad merges
            raise ValueError(f"CLIP merges do not fit the vocabulary of {len(vocab)} tokens: {error}") from error
        self._word_ids = functools.lru_cache(maxsize=WORD_CACHE_SIZE)(self._merge_word)

    def __getstate__(self) -> dict:
        # The word cache wraps a bound method and cannot be pickled; DataLoader workers started with "spawn"
        # receive the tokenizer without it and build their own.
        state = self.__dict__.copy()
        del state["_word_ids"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._word_ids = functools.lru_cache(maxsize=WORD_CACHE_SIZE)(self._merge_word)

    @classmethod
    def from_files(cls, path) -> "ClipTokenizer":
        """Load from a Hugging Face CLIP directory (vocab.json + merges.txt) or OpenAI's merges file."""
        path = Path(path)
        if path.is_dir():
            vocab_file, merges_file = path / "vocab.json", path / "merges.txt"
            if not (vocab_file.is_file() and merges_file.is_file()):
                raise ValueError(
                    f"{path} is a directory without vocab.json and merges.txt; "
                    "expected a Hugging Face CLIP tokenizer directory"
                )
            vocab = json.loads(vocab_file.read_text(encoding="utf-8"))
            merges = parse_merges(merges_file.read_text(encoding="utf-8").split("\n"), str(merges_file))
            return cls(vocab, merges)
        if path.is_file():
            merges = read_merges_file(path)
            return cls(vocabulary_from_merges(merges), merges)
        raise ValueError(
            f"CLIP tokenizer path {path} does not exist; "
            f"expected {MERGES_FILE} or a directory with vocab.json and merges.txt"
        )

    def save(self, folder) -> Path:
        """Writes vocab.json + merges.txt (the Hugging Face layout `from_files` reads) into `folder`."""
        from ..io import atomic_write

        folder = Path(folder)
        vocab_text = json.dumps(self.vocab, ensure_ascii=False)
        merges_text = "#version: 0.2\n" + "".join(f"{first} {second}\n" for first, second in self.merges)
        atomic_write(folder / "vocab.json", lambda temporary: temporary.write_text(vocab_text, encoding="utf-8"))
        atomic_write(folder / "merges.txt", lambda temporary: temporary.write_text(merges_text, encoding="utf-8"))
        return folder

    @classmethod
    def find_installed(cls) -> "ClipTokenizer":
        """Load the merges file shipped inside an installed `open_clip` or `clip` package (without importing it)."""
        for package in ("open_clip", "clip"):
            try:
                spec = importlib.util.find_spec(package)
            except (ImportError, ValueError):
                continue
            if spec is None or not spec.submodule_search_locations:
                continue
            for folder in spec.submodule_search_locations:
                candidate = Path(folder) / MERGES_FILE
                if candidate.is_file():
                    return cls.from_files(candidate)
        raise ValueError(
            f"no installed open_clip or clip package ships {MERGES_FILE}; "
            "pass tokenizer=PATH (that file, or a Hugging Face CLIP directory)"
        )

    def _merge_word(self, word: str) -> tuple[int, ...]:
        if word == START_OF_TEXT:  # OpenAI's BPE cache maps the literal special strings to the special ids
            return (self.sot_token_id,)
        if word == END_OF_TEXT:
            return (self.eot_token_id,)
        return tuple(token.id for token in self._bpe.tokenize(byte_encode(word)))

    def encode(self, text: str) -> list[int]:
        """Token ids of one text, without <|startoftext|> and <|endoftext|>."""
        return list(itertools.chain.from_iterable(map(self._word_ids, split_words(clean_text(text)))))

    def __call__(self, texts: str | list[str], context_length: int = CONTEXT_LENGTH) -> torch.LongTensor:
        """Token ids (N, context_length): sot, ids, eot, zero padding; a long text is cut with eot kept last."""
        if context_length < 2:
            raise ValueError(
                f"context_length={context_length} leaves no room for <|startoftext|> and <|endoftext|>; expected >= 2"
            )
        if isinstance(texts, str):
            texts = [texts]
        rows = [[self.sot_token_id, *self.encode(text), self.eot_token_id] for text in texts]
        # numpy builds the array from nested lists ~6x faster than torch.tensor does
        padded = numpy.array(pad_rows(rows, context_length, self.eot_token_id), dtype=numpy.int64)
        return torch.from_numpy(padded.reshape(len(rows), context_length))  # (N, context_length)

    def decode(self, ids) -> str:
        """Text of token ids (list or 1-D tensor): stops at <|endoftext|>, drops <|startoftext|>, words spaced."""
        if isinstance(ids, torch.Tensor):
            if ids.dim() != 1:
                raise ValueError(
                    f"decode takes one sequence of ids, got a tensor of shape {tuple(ids.shape)}; "
                    "decode rows one by one"
                )
            ids = ids.tolist()
        symbols = []
        for index in ids:
            if index == self.eot_token_id:
                break
            if index == self.sot_token_id:
                continue
            if index not in self._id_to_token:
                raise ValueError(f"token id {index} is outside the CLIP vocabulary of {self.vocab_size} ids")
            symbols.append(self._id_to_token[index])
        # Like OpenAI's decode: bytes back to text, each end-of-word marker becomes a space.
        return byte_decode("".join(symbols)).replace(END_OF_WORD, " ").strip()
