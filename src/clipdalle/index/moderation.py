"""Content moderation with text concepts: which images are closer to a concept than its threshold, and thresholds
calibrated on labelled images (the F1-best threshold per concept, with its precision and recall).

    concepts.txt   one `concept<TAB>threshold` per line (threshold optional: calibrated or DEFAULT_THRESHOLD)
    labels.csv     `image,concept` rows, concept `none` for a clean image

The index (`Index.moderate`) and the server (`/api/moderate`) both flag through `flag`.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np

DEFAULT_THRESHOLD = 0.25  # cosine above which an image is flagged for a concept with no threshold given


def best_f1_threshold(scores: np.ndarray, positive: np.ndarray) -> tuple[float, float, float, float]:
    """(threshold, precision, recall, f1) for flagging scores >= threshold, the threshold maximising F1 among
    the positives' scores (ties: the higher threshold, fewer false alarms). No positives: (inf, 0, 0, 0)."""
    if not positive.any():
        return math.inf, 0.0, 0.0, 0.0
    best = (math.inf, 0.0, 0.0, -1.0)
    for threshold in sorted(set(scores[positive].tolist()), reverse=True):
        flagged = scores >= threshold
        true_positives = int((flagged & positive).sum())
        precision = true_positives / int(flagged.sum())
        recall = true_positives / int(positive.sum())
        f1 = 2 * precision * recall / (precision + recall) if true_positives else 0.0
        if f1 > best[3]:
            best = (float(threshold), precision, recall, f1)
    return best


def thresholds(
    concepts: list[tuple[str, float | None]], calibration: dict[str, dict] | None = None
) -> list[tuple[float, str]]:
    """(threshold, where it came from: "file" | "calibrated" | "default") per concept: the concepts file's own,
    else a finite calibrated one, else DEFAULT_THRESHOLD."""
    calibration = calibration or {}
    chosen = []
    for name, threshold in concepts:
        if threshold is not None:
            chosen.append((threshold, "file"))
        elif name in calibration and math.isfinite(calibration[name]["threshold"]):
            chosen.append((calibration[name]["threshold"], "calibrated"))
        else:
            chosen.append((DEFAULT_THRESHOLD, "default"))
    return chosen


def flag(scores: np.ndarray, concept_thresholds: list[float]) -> np.ndarray:
    """Booleans (N, C): image n is flagged for concept c when its cosine score (N, C) reaches the threshold."""
    return scores >= np.asarray(concept_thresholds, dtype=np.float32)[None, :]


def calibrate(
    scores: np.ndarray, labelled_rows: np.ndarray, labelled_concepts: list[set[str]], names: list[str]
) -> dict[str, dict]:
    """Per concept: the F1-maximising threshold on the labelled images (rows `labelled_rows` of `scores` (N, C),
    image i carrying the concepts `labelled_concepts[i]`), with precision, recall and F1 there."""
    results = {}
    for column, name in enumerate(names):
        positive = np.array([name in concepts for concepts in labelled_concepts], dtype=bool)
        threshold, precision, recall, f1 = best_f1_threshold(scores[labelled_rows, column], positive)
        results[name] = {
            "threshold": threshold,
            "precision": precision,
            "recall": recall,
            "f1": f1,
            "positives": int(positive.sum()),
            "labelled": len(labelled_concepts),
        }
    return results


def read_concepts(path: str | Path) -> list[tuple[str, float | None]]:
    """[(concept, threshold or None)] from a concepts file (see `parse_concepts`)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: concepts file not found")
    return parse_concepts(path.read_text(encoding="utf-8-sig"), source=str(path))


def parse_concepts(text: str, source: str = "concepts") -> list[tuple[str, float | None]]:
    """[(concept, threshold or None)] from lines `concept<TAB>threshold` (threshold optional; blank lines and
    lines starting with # are skipped); errors name `source` and the line."""
    concepts: list[tuple[str, float | None]] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        parts = line.split("\t")
        name = parts[0].strip()
        if not name or len(parts) > 2:
            raise ValueError(f"{source}:{number}: expected 'concept' or 'concept<TAB>threshold', got {line!r}")
        threshold = None
        if len(parts) == 2 and parts[1].strip():
            try:
                threshold = float(parts[1])
            except ValueError:
                raise ValueError(f"{source}:{number}: threshold {parts[1].strip()!r} is not a number") from None
            if not -1.0 <= threshold <= 1.0:
                raise ValueError(f"{source}:{number}: threshold {threshold} is not a cosine in [-1, 1]")
        concepts.append((name, threshold))
    if not concepts:
        raise ValueError(f"{source}: no concepts; expected one 'concept<TAB>threshold' per line")
    return concepts


def read_labels(path: str | Path) -> list[tuple[int, str, str]]:
    """[(line number, image, concept)] from a CSV with columns `image,concept` (concept `none` = clean)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: labels file not found")
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        if reader.fieldnames is None or not {"image", "concept"} <= set(reader.fieldnames):
            raise ValueError(f"{path}: expected a header with columns 'image,concept', got {reader.fieldnames}")
        labels = [
            (number, row["image"].strip(), (row["concept"] or "").strip()) for number, row in enumerate(reader, start=2)
        ]
    if not labels:
        raise ValueError(f"{path}: no labelled images")
    return labels
