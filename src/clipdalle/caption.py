"""Captions for images, two ways: composed from label tables ranked by CLIP, or written by a trained captioner.

**CLIP ranking** (clip-interrogator's idea: score an image against tables of terms and keep the best of each).
Tables come from a label file, from the captions of an index (cut by templates such as "a {colour} icon of
{thing}"), or from the CLIP run's own vocabulary. Each table is scored alone first ("red", "cup"), then, in
`passes` rounds of coordinate ascent, each table again inside the full templates with the other slots at their
current best ("a red icon of a cup"), the templates' features averaged per term (the CLIP paper's prompt
ensembling). The caption is the first template filled with the best terms; each table reports its best terms
with their cosine scores.

**A trained captioner** (clipdalle.models.captioner: the DALL·E stream reversed): the image is encoded to dVAE
codes, `n` captions are sampled from the model, and CLIP reranks them by their similarity with the image.

A label file has one term per line, in tables headed `[name]`, and the templates that join them:

    # the first template writes the caption; all of them score it
    template: a {colour} icon of a {thing}
    template: {thing} icon in {colour}
    [colour]
    red
    blue
    [thing]
    cup
    dog

Lines starting with # are comments. A file without `[name]` headers is one table `label` with the template
"{label}". An article written before a slot ("a {thing}") becomes "a" or "an" to fit the term.
"""

from __future__ import annotations

import re
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from . import checkpoint
from .io import atomic_write
from .models.captioner import Captioner
from .runtime import device_of, eval_mode, unwrap
from .zero_shot import encode_images, encode_texts

PASSES = 2  # rounds of coordinate ascent over the tables after each is scored alone
TOP_TERMS = 3  # best terms reported per table
VOCABULARY_TERMS = 5  # words of a vocabulary table joined into a caption
MIN_WORD_LENGTH = 3  # vocabulary tokens shorter than this are not words worth a caption
_SLOT = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
_ARTICLE_SLOT = re.compile(r"\b(a|an) \{([A-Za-z_][A-Za-z0-9_]*)\}", re.IGNORECASE)


# ------------------------------------------------------------------------------------------ label tables


@dataclass
class LabelTables:
    tables: dict[str, list[str]]  # table name -> distinct terms, in file order
    templates: list[str] = field(default_factory=list)  # each names every table once as {name}; [] joins terms

    def __post_init__(self) -> None:
        if not self.tables:
            raise ValueError("label tables: no tables; expected at least one table with terms")
        for name, terms in self.tables.items():
            if not terms:
                raise ValueError(f"label table [{name}]: has no terms; add one per line under it")
        for template in self.templates:
            slots = _SLOT.findall(template)
            if sorted(slots) != sorted(self.tables):
                raise ValueError(
                    f"template {template!r}: names the slots {{{'}, {'.join(slots)}}}, expected each table once: "
                    f"{{{'}, {'.join(self.tables)}}}"
                )


def article_for(word: str) -> str:
    """'an' before a vowel letter, else 'a' (spelling, not sound: "an hour" and "a unicorn" come out wrong)."""
    return "an" if word[:1].lower() in "aeiou" else "a"


def fill(template: str, terms: dict[str, str]) -> str:
    """The template with each {slot} replaced by its term, an article before a slot fitted to the term."""
    text = _ARTICLE_SLOT.sub(lambda match: f"{article_for(terms[match.group(2)])} {{{match.group(2)}}}", template)
    return _SLOT.sub(lambda match: terms[match.group(1)], text)


def parse_label_tables(text: str, source: str = "labels") -> LabelTables:
    """A label file's text (see the module's docstring) -> LabelTables; errors name the line."""
    tables: dict[str, list[str]] = {}
    templates: list[str] = []
    current: str | None = None
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("template:"):
            templates.append(line[len("template:") :].strip())
        elif line.startswith("[") and line.endswith("]"):
            current = line[1:-1].strip()
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", current):
                raise ValueError(f"{source}:{number}: table name {current!r}: expected a word such as [colour]")
            if current in tables:
                raise ValueError(f"{source}:{number}: table [{current}] appears twice")
            tables[current] = []
        else:
            if current is None:
                current = "label"
                tables[current] = []
            if line not in tables[current]:
                tables[current].append(line)
    if not tables:
        raise ValueError(f"{source}: no labels; expected one term per line (or tables headed [name])")
    if not templates and list(tables) == ["label"]:
        templates = ["{label}"]
    return LabelTables(tables, templates)


def read_label_tables(path: str | Path) -> LabelTables:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such labels file")
    return parse_label_tables(path.read_text(encoding="utf-8"), str(path))


def _template_pattern(template: str) -> re.Pattern:
    """A template as a regular expression over captions: each {slot} a lazy named group, an article before a slot
    matching either article."""
    pattern, position = "", 0
    for match in re.finditer(r"\b(?:a|an) (?=\{)|\{([A-Za-z_][A-Za-z0-9_]*)\}", template, re.IGNORECASE):
        pattern += re.escape(template[position : match.start()])
        pattern += f"(?P<{match.group(1)}>.+?)" if match.group(1) else "(?:a|an) "
        position = match.end()
    return re.compile(pattern + re.escape(template[position:]) + "$", re.IGNORECASE)


def tables_from_captions(captions: list[str], templates: list[str] | None = None) -> LabelTables:
    """Tables cut from captions (one per line) by `templates`: each caption line that a template matches adds
    its slot values to the tables. Without templates, one table `caption` of the distinct lines."""
    lines = list(dict.fromkeys(line.strip() for caption in captions for line in caption.splitlines() if line.strip()))
    if not lines:
        raise ValueError("the index has no captions to take terms from; give a labels file instead")
    if not templates:
        return LabelTables({"caption": lines}, ["{caption}"])
    patterns = [_template_pattern(template) for template in templates]
    slots = list(dict.fromkeys(_SLOT.findall(templates[0])))
    tables: dict[str, list[str]] = {slot: [] for slot in slots}
    seen: dict[str, set[str]] = {slot: set() for slot in slots}
    for line in lines:
        for pattern in patterns:
            match = pattern.match(line)
            if match is None:
                continue
            for slot, value in match.groupdict().items():
                if slot in tables and value not in seen[slot]:
                    seen[slot].add(value)
                    tables[slot].append(value)
            break
    empty = [slot for slot, terms in tables.items() if not terms]
    if empty:
        raise ValueError(
            f"templates {templates}: no caption line matched them, so the tables {{{'}, {'.join(empty)}}} are "
            f"empty; a caption looks like {lines[0]!r}"
        )
    return LabelTables(tables, list(templates))


def vocabulary_table(tokenizer: Any) -> LabelTables:
    """One table `word` of the whole words in a tokenizer's vocabulary (a CaptionTokenizer's byte-level BPE
    tokens that start a word, or an OpenAI BPE's tokens that end one), joined into a caption of the best
    VOCABULARY_TERMS."""
    if hasattr(tokenizer, "tokenizer"):  # CaptionTokenizer: "Ġword" starts a word after a space
        tokens = [token[1:] for token in tokenizer.tokenizer.get_vocab() if token.startswith("Ġ")]
    elif hasattr(tokenizer, "vocab"):  # ClipTokenizer: "word</w>" ends a word
        tokens = [token[: -len("</w>")] for token in tokenizer.vocab if token.endswith("</w>")]
    else:
        raise ValueError(f"{type(tokenizer).__name__}: cannot list the words of this tokenizer; give a labels file")
    words = sorted({token for token in tokens if token.isalpha() and token.isascii() and len(token) >= MIN_WORD_LENGTH})
    if not words:
        raise ValueError("the CLIP's tokenizer has no whole words to caption with; give a labels file")
    return LabelTables({"word": words}, [])


# ------------------------------------------------------------------------------------------ CLIP ranking


class TextFeatureCache:
    """Unit CLIP features of texts, each encoded once: the terms and filled templates `rank_terms` scores repeat
    within a call and, on a server, across requests. Keeps the `size` most recently used texts; thread-safe."""

    def __init__(self, model: Any, tokenizer: Any, size: int = 100_000):
        self.model, self.tokenizer, self.size = model, tokenizer, size
        self.known: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.lock = threading.Lock()

    def __call__(self, texts: list[str]) -> torch.Tensor:
        with self.lock:
            missing = [text for text in dict.fromkeys(texts) if text not in self.known]
        encoded = encode_texts(self.model, self.tokenizer, missing).float().cpu() if missing else []
        with self.lock:
            self.known.update(zip(missing, encoded))
            found = {text: self.known[text] for text in texts}  # held here: a trim below cannot lose them
            for text in found:
                self.known.move_to_end(text)
            while len(self.known) > max(self.size, len(found)):
                self.known.popitem(last=False)
        return torch.stack([found[text] for text in texts])  # (N, D)


def _ensemble(features: TextFeatureCache, templates: list[str], contexts: list[dict[str, str]]) -> torch.Tensor:
    """Per context (a full assignment of the slots), the mean of its templates' features, renormalised: (N, D)."""
    texts = [fill(template, context) for context in contexts for template in templates]
    stacked = features(texts).view(len(contexts), len(templates), -1)  # (N, N_tpl, D)
    return F.normalize(stacked.mean(dim=1), dim=-1)


def rank_terms(
    model: Any,
    tokenizer: Any,
    images: torch.Tensor,
    tables: LabelTables,
    passes: int = PASSES,
    top: int = TOP_TERMS,
    cache: TextFeatureCache | None = None,
) -> list[dict[str, Any]]:
    """CLIP-ranked captions of images (B, 3, H, W) in [0, 1] (see the module's docstring): per image {"caption",
    "score" (cosine of the image and the caption), "method": "clip", "terms": {table: [{"term", "score"}]}}.
    `cache`: the model's text features kept between calls (a server's)."""
    model = unwrap(model)
    image_features = encode_images(model, images).float().cpu()  # (B, D)
    features = cache if cache is not None else TextFeatureCache(model, tokenizer)
    names = list(tables.tables)
    scores: dict[str, torch.Tensor] = {}  # table -> (B, N_terms) cosines of the latest round
    for name in names:
        scores[name] = image_features @ features(tables.tables[name]).T  # each term alone
    if tables.templates and len(names) > 1:
        for _ in range(passes):
            for name in names:
                scores[name] = _scores_in_context(image_features, features, tables, scores, name)
    elif tables.templates and tables.templates != ["{" + names[0] + "}"]:
        name = names[0]
        contexts = [{name: term} for term in tables.tables[name]]
        scores[name] = image_features @ _ensemble(features, tables.templates, contexts).T
    results = []
    for row in range(len(images)):
        terms = {}
        for name in names:
            values, order = scores[name][row].topk(min(top, scores[name].shape[1]))
            terms[name] = [{"term": tables.tables[name][i], "score": round(float(v), 6)} for v, i in zip(values, order)]
        if tables.templates:
            caption = fill(tables.templates[0], {name: terms[name][0]["term"] for name in names})
        else:
            words = scores[names[0]][row].topk(min(VOCABULARY_TERMS, scores[names[0]].shape[1])).indices
            caption = ", ".join(tables.tables[names[0]][i] for i in words)
        results.append({"caption": caption, "method": "clip", "terms": terms})
    caption_features = features([result["caption"] for result in results])  # (B, D)
    for result, score in zip(results, (image_features * caption_features).sum(dim=1).tolist()):
        result["score"] = round(score, 6)
    return results


def _scores_in_context(
    image_features: torch.Tensor,
    features: TextFeatureCache,
    tables: LabelTables,
    scores: dict[str, torch.Tensor],
    name: str,
) -> torch.Tensor:
    """(B, N_terms) scores of table `name`'s terms inside the templates, the other slots at each image's best."""
    others = [other for other in tables.tables if other != name]
    best = {other: scores[other].argmax(dim=1).tolist() for other in others}  # per image
    result = torch.empty_like(scores[name])
    groups: dict[tuple[int, ...], list[int]] = {}
    for row in range(len(image_features)):
        groups.setdefault(tuple(best[other][row] for other in others), []).append(row)
    for key, rows in groups.items():
        fixed = {other: tables.tables[other][index] for other, index in zip(others, key)}
        contexts = [{**fixed, name: term} for term in tables.tables[name]]
        text = _ensemble(features, tables.templates, contexts)  # (N_terms, D)
        result[rows] = image_features[rows] @ text.T
    return result


# ------------------------------------------------------------------------------------------ the captioner


def load_captioner(run_dir: str | Path, device: str | torch.device = "cpu") -> tuple[Captioner, Any, Any]:
    """A captioner run as (model, its dVAE from RUN/vae, its caption tokenizer), in eval mode."""
    return checkpoint.load_code_model(run_dir, expect="captioner", device=device)


@torch.no_grad()
def sample_captions(
    model: Captioner,
    codes: torch.Tensor,
    tokenizer: Any,
    n: int = 16,
    temperature: float = 1.0,
    top_k: int | None = None,
    seed: int = 0,
) -> tuple[list[list[str]], torch.Tensor]:
    """n captions per code grid of codes (B, h*w): (texts, B lists of n; log-likelihoods (B, n) in nats of the
    sampled tokens up to <eos>). temperature 0 is greedy (n rows of the same caption)."""
    model = unwrap(model)
    if n < 1:
        raise ValueError(f"n must be at least 1 caption per image, got {n}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    config = model.config
    B = codes.shape[0]
    device = device_of(model)
    rows = codes.reshape(B, -1).to(device).repeat_interleave(n, dim=0)  # (B*n, N)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    tokens = torch.full((B * n, config.text_length), tokenizer.pad_id, dtype=torch.long, device=device)
    tokens[:, 0] = tokenizer.bos_id
    log_likelihood = torch.zeros(B * n, device=device)
    finished = torch.zeros(B * n, dtype=torch.bool, device=device)
    never = torch.tensor([tokenizer.pad_id, tokenizer.bos_id], device=device)  # never written inside a caption
    caches = model.new_caches()
    with eval_mode(model):
        logits = model.start(rows, tokens[:, :1], caches)  # (B*n, V)
        for position in range(1, config.text_length):
            if position == config.text_length - 1:  # the last position can only end the caption
                chosen = torch.full_like(finished, tokenizer.eos_id, dtype=torch.long)
            elif temperature == 0:
                chosen = logits.index_fill(1, never, float("-inf")).argmax(dim=-1)
            else:
                filtered = logits.index_fill(1, never, float("-inf")) / temperature
                if top_k is not None and top_k < filtered.shape[-1]:
                    threshold = filtered.topk(top_k, dim=-1).values[:, -1:]
                    filtered = filtered.masked_fill(filtered < threshold, float("-inf"))
                probabilities = filtered.softmax(dim=-1).cpu()
                chosen = torch.multinomial(probabilities, 1, generator=generator)[:, 0].to(device)
            step_ll = logits.log_softmax(dim=-1).gather(1, chosen[:, None])[:, 0]
            log_likelihood += torch.where(finished, torch.zeros_like(step_ll), step_ll)
            tokens[:, position] = torch.where(finished, torch.full_like(chosen, tokenizer.pad_id), chosen)
            finished |= chosen == tokenizer.eos_id
            if bool(finished.all()) or position == config.text_length - 1:
                break
            logits = model.step(tokens[:, position], position, caches)
    texts = tokenizer.decode(tokens.cpu())
    return [texts[row * n : (row + 1) * n] for row in range(B)], log_likelihood.view(B, n).cpu()


def captioner_captions(
    clip: tuple[Any, Any, Any],
    captioner: tuple[Captioner, Any, Any],
    images: torch.Tensor,
    n: int = 16,
    temperature: float = 1.0,
    top_k: int | None = None,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Captions of images (B, 3, H, W) in [0, 1] by the captioner, n samples each reranked by CLIP: per image
    {"caption", "score" (CLIP cosine), "method": "captioner", "candidates": [{"caption", "score",
    "log_likelihood"}] best first}."""
    clip_model, _, clip_tokenizer = clip
    model, vae, tokenizer = captioner
    size = vae.config.image_size
    pictures = images if images.shape[-1] == size else F.interpolate(images, size=(size, size), mode="bilinear")
    with eval_mode(vae), torch.no_grad():
        codes = vae.encode(pictures.to(device_of(vae)))  # (B, h, w)
    texts, log_likelihood = sample_captions(model, codes, tokenizer, n, temperature, top_k, seed)
    image_features = encode_images(clip_model, images).float().cpu()  # (B, D)
    results = []
    for row, candidates in enumerate(texts):
        distinct = list(dict.fromkeys(text.strip() for text in candidates if text.strip())) or [""]
        text_features = encode_texts(clip_model, clip_tokenizer, distinct).float().cpu()  # (n', D)
        scores = (text_features @ image_features[row]).tolist()
        best_likelihood = {}
        for text, value in zip(candidates, log_likelihood[row].tolist()):
            best_likelihood[text.strip()] = max(value, best_likelihood.get(text.strip(), float("-inf")))
        ranked = sorted(zip(distinct, scores), key=lambda pair: -pair[1])
        listed = [
            {"caption": text, "score": round(score, 6), "log_likelihood": round(best_likelihood.get(text, 0.0), 4)}
            for text, score in ranked
        ]
        results.append({"caption": listed[0]["caption"], "score": listed[0]["score"], "method": "captioner",
                        "candidates": listed})  # fmt: skip
    return results


# ------------------------------------------------------------------------------------------ files


def write_caption_files(paths: list[Path], captions: list[str], overwrite: bool = False) -> dict[str, list[str]]:
    """A same-stem .txt beside each image holding its caption; an existing .txt is kept unless `overwrite`.
    Returns {"written": [...], "kept": [...]} (the .txt paths)."""
    written, kept = [], []
    for path, caption in zip(paths, captions):
        target = Path(path).with_suffix(".txt")
        if target.exists() and not overwrite:
            kept.append(str(target))
            continue
        atomic_write(target, lambda temporary, text=caption: temporary.write_text(text + "\n", encoding="utf-8"))
        written.append(str(target))
    return {"written": written, "kept": kept}
