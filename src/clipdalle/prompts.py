"""What a DALL·E run was trained on, in words: prompt suggestions from its training captions, and a plain notice
when a prompt names something it never saw ("not in this model's training set: heart; expect a guess").

    RUN/prompts.json   {"captions": [the most frequent distinct training captions], "words": {word: count}}

written by `train dalle` from its token cache. A prompt is judged by its words: each word of the prompt that no
training caption contains is unknown to the model, which then draws a guess from the words it does know.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from .io import read_json, write_json

PROMPTS_FILE = "prompts.json"
MAX_CAPTIONS = 50_000  # captions kept for suggestions (most frequent first): a few MB even for large datasets
WORD_PATTERN = re.compile(r"[^\W_]+")  # runs of letters and digits, in any script


def words_of(text: str) -> list[str]:
    """The lower-cased words of a text, as the notice compares them."""
    return WORD_PATTERN.findall(text.lower())


def write_training_prompts(run_dir: str | Path, captions: Iterable[str]) -> Path:
    """RUN/prompts.json from the training captions (one string per caption)."""
    counts = Counter(" ".join(caption.split()) for caption in captions if caption.strip())
    words: Counter = Counter()
    for caption, count in counts.items():
        for word in words_of(caption):
            words[word] += count
    values = {
        "captions": [caption for caption, _ in counts.most_common(MAX_CAPTIONS)],
        "words": dict(words.most_common()),
    }
    return write_json(Path(run_dir) / PROMPTS_FILE, values)


@dataclass
class TrainingPrompts:
    captions: list[str]  # distinct training captions, most frequent first
    words: dict[str, int]  # every word of the training captions with its count
    _caption_words: list[set[str]] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._caption_words = [set(words_of(caption)) for caption in self.captions]

    @classmethod
    def load(cls, run_dir: str | Path) -> TrainingPrompts | None:
        """The run's prompts.json, or None for a run trained before it was written."""
        path = Path(run_dir) / PROMPTS_FILE
        if not path.is_file():
            return None
        values = read_json(path)
        return cls(list(values.get("captions", [])), dict(values.get("words", {})))

    def suggest(self, text: str, limit: int = 10) -> list[str]:
        """Training captions for a prompt being typed: those that start with it, then those containing all of its
        words, most frequent first."""
        typed = " ".join(text.lower().split())
        if not typed:
            return self.captions[:limit]
        starting = [caption for caption in self.captions if caption.lower().startswith(typed)]
        wanted = words_of(typed)
        containing = [
            caption
            for caption, caption_words in zip(self.captions, self._caption_words)
            if not caption.lower().startswith(typed) and all(word in caption_words for word in wanted)
        ]
        return (starting + containing)[:limit]

    def unknown_words(self, prompt: str) -> list[str]:
        """The words of `prompt` that no training caption contains, in the prompt's order."""
        return list(dict.fromkeys(word for word in words_of(prompt) if word not in self.words))

    def notice(self, prompt: str) -> str | None:
        """A one-line warning when the prompt names something the model never saw in training, else None."""
        unknown = self.unknown_words(prompt)
        if not unknown:
            return None
        return f"not in this model's training set: {', '.join(unknown)}; expect a guess"
