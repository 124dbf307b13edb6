"""ClipTokenizer vs OpenAI's SimpleTokenizer on short captions: texts/s, interleaved, median of the ratios.

    .venv/bin/python benchmarks/bench_clip_tokenizer.py                          # reference: clip-anytorch's file
    .venv-ref/bin/python benchmarks/bench_clip_tokenizer.py --reference open_clip  # reference: open_clip 3.3.0

The reference `clip` package is never imported (its __init__ needs torchvision): its simple_tokenizer.py is
loaded by file path and padded into a LongTensor the way open_clip's `SimpleTokenizer.__call__` does.
Both tokenizers keep a per-word cache; "cold" times a fresh instance on its first pass, "warm" is every later
pass. Ids are checked to be identical before timing.
"""

import argparse
import importlib.util
import random
import statistics
import time
from pathlib import Path

import torch

from clipdalle.tokenizers.clip_bpe import MERGES_FILE, ClipTokenizer

ADJECTIVES = "small big red blue green yellow orange purple black white old new shiny fluffy wooden metal tiny".split()
NOUNS = (
    "cat dog bird car house tree flower boat bicycle chair table lamp cup book phone robot dragon castle "
    "mountain river bridge city street man woman child horse train plane clock guitar pizza apple banana"
).split()
PLACES = "beach forest kitchen desert park garden street office sky ocean snow rain night sunset".split()
PREPOSITIONS = "on in under near behind above beside next to".split()
EXTRAS = ["café", "naïve", "東京", "😀", "smörgåsbord", "Ärger", "R&B", "rock & roll", "it's", "they're"]


def make_captions(count: int, seed: int) -> list[str]:
    """Seeded short captions (4 to 14 words): mostly plain ASCII, some capitals, digits, punctuation and ~5%
    with accents, CJK, emoji or '&' (which take the full ftfy path)."""
    rng = random.Random(seed)
    captions = []
    for _ in range(count):
        words = ["A" if rng.random() < 0.3 else "a", rng.choice(ADJECTIVES), rng.choice(NOUNS)]
        words += [rng.choice(PREPOSITIONS), "the", rng.choice(ADJECTIVES), rng.choice(PLACES)]
        if rng.random() < 0.3:
            words += ["with", str(rng.randint(2, 12)), rng.choice(NOUNS) + "s"]
        if rng.random() < 0.05:
            words.insert(rng.randrange(len(words)), rng.choice(EXTRAS))
        if rng.random() < 0.2:
            words[2] = words[2].upper()
        captions.append(" ".join(words) + rng.choice(["", ".", "!", " ..."]))
    return captions


def load_reference(name: str):
    """(SimpleTokenizer instance factory, merges file) from clip-anytorch's files or from open_clip."""
    if name == "open_clip":
        import open_clip.tokenizer

        path = Path(open_clip.tokenizer.default_bpe())
        return (lambda: open_clip.tokenizer.SimpleTokenizer(str(path))), path
    spec = importlib.util.find_spec("clip")
    if spec is None:
        raise SystemExit("clip-anytorch is not installed: pip install --no-deps clip-anytorch")
    folder = Path(spec.submodule_search_locations[0])
    module_spec = importlib.util.spec_from_file_location("reference_simple_tokenizer", folder / "simple_tokenizer.py")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    path = folder / MERGES_FILE
    return (lambda: module.SimpleTokenizer(str(path))), path


def reference_call(tokenizer, texts: list[str], context_length: int) -> torch.Tensor:
    """open_clip's SimpleTokenizer.__call__ for tokenizers that only have encode (OpenAI's file)."""
    if hasattr(tokenizer, "context_length"):
        return tokenizer(texts, context_length=context_length)
    sot, eot = tokenizer.encoder["<|startoftext|>"], tokenizer.encoder["<|endoftext|>"]
    all_tokens = [[sot] + tokenizer.encode(text) + [eot] for text in texts]
    result = torch.zeros(len(all_tokens), context_length, dtype=torch.long)
    for i, tokens in enumerate(all_tokens):
        if len(tokens) > context_length:
            tokens = tokens[:context_length]
            tokens[-1] = eot
        result[i, : len(tokens)] = torch.tensor(tokens)
    return result


def seconds(function) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=10_000, help="captions per pass")
    parser.add_argument("--rounds", type=int, default=9, help="interleaved warm passes of each tokenizer")
    parser.add_argument("--reference", choices=["clip", "open_clip"], default="clip")
    args = parser.parse_args()

    make_reference, path = load_reference(args.reference)
    captions = make_captions(args.count, seed=0)
    ours, theirs = ClipTokenizer.from_files(path), make_reference()

    cold_ours = seconds(lambda: ours(captions))
    cold_theirs = seconds(lambda: reference_call(theirs, captions, 77))
    if not torch.equal(ours(captions), reference_call(theirs, captions, 77)):
        raise SystemExit("ids differ from the reference: not timing")

    call_ratios, encode_ratios, call_ours, call_theirs = [], [], [], []
    for _ in range(args.rounds):  # A B A B: the machine is shared and noisy
        ours_time = seconds(lambda: ours(captions))
        theirs_time = seconds(lambda: reference_call(theirs, captions, 77))
        call_ours.append(ours_time)
        call_theirs.append(theirs_time)
        call_ratios.append(theirs_time / ours_time)
        ours_time = seconds(lambda: [ours.encode(text) for text in captions])
        theirs_time = seconds(lambda: [theirs.encode(text) for text in captions])
        encode_ratios.append(theirs_time / ours_time)

    count = len(captions)
    print(f"{count} captions, reference {args.reference} ({path.name}), {args.rounds} interleaved rounds")
    print(f"cold first pass -> LongTensor: ours {count / cold_ours:,.0f} texts/s, reference {count / cold_theirs:,.0f}")
    print(
        f"warm -> LongTensor (N, 77): ours {count / statistics.median(call_ours):,.0f} texts/s, "
        f"reference {count / statistics.median(call_theirs):,.0f}, "
        f"median speed-up {statistics.median(call_ratios):.2f}x (range {min(call_ratios):.2f}-{max(call_ratios):.2f})"
    )
    print(f"warm encode only: median speed-up {statistics.median(encode_ratios):.2f}x")


if __name__ == "__main__":
    main()
