"""The demo's evaluation: every figure of the report and of the quality bar, from OUT/vae, OUT/clip and
OUT/dalle of a finished pipeline.

Prompts: `prompts` icons drawn with a seeded generator from the seen (DALL·E training) icons and as many from the
validation icons, colours cycled over the palette, each as its first caption ("a red icon of a heart"). Every
prompt gets `samples` samples, CLIP-reranked by `sampling.generate`; "best of n" is the sample CLIP ranks first.

Judges (defined with the quality bar, never tuned to the results):
  colour: `icons.dominant_colour(image)` equals the prompt's colour;
  shape:  rank of the named icon among all 7,367 by `icons.mask_iou` of the sample's `icons.foreground_mask`
          against the foreground masks of every icon drawn in the prompt's colour (1 + the number of icons with a
          strictly higher IoU, so a perfect copy of the named icon is rank 1 even when another glyph is identical).

Real icons are rendered with the dataset's own functions (`render_masks`, `colourise`), which gives the very
pixels the dataset's PNGs hold. Figures are written to OUT/eval/*.png; `evaluate_demo` returns a JSON-ready dict
that the pipeline writes to OUT/eval.json and `clipdalle.report` turns into OUT/report.html.
"""

from __future__ import annotations

import json
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import checkpoint
from ..data import icons
from ..zero_shot import encode_images, encode_texts

GENERATION_BATCH = 256  # sequences per generate() call: large batches keep both cores busy while decoding
R_PRECISION_R = 100  # candidates per image in CLIP R-precision: its own prompt and 99 others of the set
RANK_THRESHOLDS = (1, 10, 100)  # shape ranks reported as the share of samples at or below these
GALLERY_ROWS = 8  # prompts in the gallery: 4 seen and 4 validation icons, each in its own colour
EXAMPLE_CANDIDATES = 8  # candidates drawn for the inpainting and variation examples
GUIDE_STEPS = 60  # CLIP-guided example: Adam steps from the best DALL·E sample (a few seconds at demo size)
SHAPE_TARGETS = {"demo": 100, "small": 20}  # the quality bar's median rank of the named icon, best of n, seen icons
BOOTSTRAP_ROUNDS = 2000  # resamples of the prompts behind each 95 % interval
CONFIDENCE = 0.95  # a quality-bar target holds when this interval lies wholly on its side of the bar
SAMPLES_FILE = "samples.pt"  # OUT/eval/samples.pt: every evaluated sample with its verdicts, to rescore offline

DEFINITIONS = {
    "prompts": (
        "For each set (seen = icons of DALL·E's training families, validation = icons of held-out families), icons "
        "drawn with a seeded generator, colours cycled over the 8 palette colours, no (icon, colour) pair twice while "
        "unused ones remain, prompt = the first caption "
        "('a red icon of a heart'); every prompt sampled n times; best of n = the sample generate() keeps with the "
        "run's sampling settings: the one CLIP scores highest (with a shortlist, the most typical of CLIP's best)."
    ),
    "colour_fidelity": (
        "Share of images whose dominant colour (per-channel median of the pixels whose summed distance from white "
        "exceeds 120 of 765, nearest of the 8 palette colours) is the prompt's colour. Per sample: over all n samples "
        "of every prompt; best of n: over the CLIP-kept sample of each prompt. Kept misses: each kept sample the "
        "judge calls the wrong colour, with how many of its prompt's samples the judge calls right and the colour of "
        "the darkest quarter of its ink (the pixels its strokes cover most; a diagnosis, not the judge): on thin "
        "strokes the judge's median can land on anti-aliased edge pixels nearer a neighbouring colour."
    ),
    "shape_rank": (
        "Rank of the named icon among all 7,367 by IoU of the image's foreground mask (same threshold) with the "
        "foreground mask of every icon drawn in the prompt's colour: 1 + the number of icons with a strictly higher "
        "IoU (rank 1 = the named icon is the closest shape). Median over images, and the share with rank <= 1, 10, "
        "100. Oracle best of n: the best rank among the n samples (what a perfect reranker would keep). Chance: real "
        "icons of another prompt's name judged against this prompt's name."
    ),
    "r_precision": (
        "CLIP R-precision with R = 100: for each image, its own prompt and 99 other prompts of the same set (drawn "
        "with a seeded generator; all others when the set is smaller) are scored by CLIP cosine similarity; the "
        "image counts as a hit when its own prompt scores highest. Kept: the best-of-n images (note: chosen by the "
        "same CLIP, so this measures how well reranking aligns images with their prompt under CLIP). Random: the "
        "mean over all n samples, i.e. the expected figure for a sample picked at random."
    ),
    "fid": (
        "FID on CLIP image features (not Inception features): Fréchet distance between Gaussians fitted to the "
        "L2-normalised CLIP image embeddings of generated images for the validation prompts and of all real "
        "validation icons (every validation icon in every colour); |mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1^1/2 S2 "
        "S1^1/2)^1/2), computed in float64 with symmetric eigendecompositions. 'Real prompt icons' is the floor: the "
        "real icons of the same prompts, the same number of images as 'kept'."
    ),
    "zero_shot": (
        "CLIP zero-shot on every validation icon in every colour. Colour: the prompt 'a {colour} icon' with the "
        "highest similarity among the 8 colours; confusion matrix rows = true colour, columns = predicted. Icon name: "
        "'an icon of a {name}' among all validation icon names; top-1/top-5 accuracy beside chance (1/N, 5/N)."
    ),
    "retrieval": (
        "Text to image on the validation icons: each image's first caption is the query among all validation images "
        "(every icon in every colour); recall@k = share of queries whose own image is among the k most similar."
    ),
}


# ------------------------------------------------------------------------------------------ pure figures


def prompt_set(names: list[str], count: int, seed: int, colours: list[str]) -> list[tuple[str, str]]:
    """`count` (icon, colour) pairs: icons drawn without replacement by a seeded generator, in passes over the list
    (reshuffled each pass) when it is shorter than `count`; colours cycle in palette order over the draws, except
    that an icon never gets a colour twice before it has had them all (the next unused one in palette order), so no
    pair repeats while there are unused ones."""
    if not names:
        raise ValueError("prompt_set: got no icon names; expected at least one (seen_names / val_names)")
    if count < 1:
        raise ValueError(f"prompt_set: count must be at least 1 prompt, got {count}")
    rng = np.random.default_rng(seed)
    pool = sorted(set(names))
    had: dict[str, set[int]] = {name: set() for name in pool}  # colour indices each icon has had in this round
    pairs: list[tuple[str, str]] = []
    while len(pairs) < count:
        for index in rng.permutation(len(pool))[: count - len(pairs)]:
            name = pool[int(index)]
            if len(had[name]) == len(colours):
                had[name].clear()  # every colour used: the icon's next round may repeat pairs
            colour = len(pairs) % len(colours)
            while colour in had[name]:
                colour = (colour + 1) % len(colours)
            had[name].add(colour)
            pairs.append((name, colours[colour]))
    return pairs


def named_icon_ranks(iou: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """IoU (N, M) of N images with M icons and the named icon of each (N,) -> rank (N,) of the named icon:
    1 + the number of icons with a strictly higher IoU, so ties with an identical glyph do not count against it."""
    own = iou.gather(1, targets.view(-1, 1))  # (N, 1)
    return (iou > own).sum(dim=1) + 1


def rank_summary(ranks: torch.Tensor) -> dict[str, float]:
    """Median rank (the lower middle value for an even count, as torch.median) and the share within each
    RANK_THRESHOLDS."""
    ranks = ranks.reshape(-1).double()  # (N,)
    summary = {"median": float(ranks.median()), "count": int(ranks.numel())}
    for threshold in RANK_THRESHOLDS:
        summary[f"within_{threshold}"] = float((ranks <= threshold).double().mean())
    return summary


def r_precision_hits(similarity: torch.Tensor, truth: torch.Tensor, r: int, seed: int = 0) -> torch.Tensor:
    """CLIP R-precision per image: similarity (N, P) of N images with the P prompts of their set, truth (N,) the
    index of each image's own prompt. Each image competes with its prompt and r - 1 others drawn at random (all
    others when P <= r); a hit (True) when its own prompt scores strictly highest. Returns bool (N,)."""
    N, P = similarity.shape
    if r < 2:
        raise ValueError(f"r_precision: r must be at least 2 (its own prompt and one other), got {r}")
    others = min(r - 1, P - 1)
    if others < 1:
        raise ValueError(f"r_precision: needs at least 2 prompts in the set, got {P}")
    generator = torch.Generator().manual_seed(seed)
    hits = torch.zeros(N, dtype=torch.bool)
    for row in range(N):
        own = int(truth[row])
        drawn = torch.randperm(P - 1, generator=generator)[:others]  # positions among the P - 1 other prompts
        drawn = drawn + (drawn >= own).long()  # position -> prompt index, skipping its own
        hits[row] = bool(similarity[row, own] > similarity[row, drawn].max())
    return hits


def r_precision(similarity: torch.Tensor, truth: torch.Tensor, r: int, seed: int = 0) -> float:
    """The share of hits of `r_precision_hits`."""
    return float(r_precision_hits(similarity, truth, r, seed).double().mean())


def bootstrap_interval(statistic: Any, prompts: int, seed: int, rounds: int = BOOTSTRAP_ROUNDS) -> list[float]:
    """[low, high]: the central CONFIDENCE interval of `statistic(rows)` over `rounds` resamples of the prompts
    (rows: LongTensor (rounds, prompts) of prompt indices drawn with replacement; statistic returns (rounds,))."""
    generator = torch.Generator().manual_seed(seed)
    rows = torch.randint(0, prompts, (rounds, prompts), generator=generator)
    values = statistic(rows).double()  # (rounds,)
    tail = (1 - CONFIDENCE) / 2
    return [float(values.quantile(tail)), float(values.quantile(1 - tail))]


def trace_sqrt_product(cov_a: torch.Tensor, cov_b: torch.Tensor) -> torch.Tensor:
    """tr((A B)^1/2) for symmetric positive semi-definite A, B: A^1/2 B A^1/2 is symmetric and similar to A B, so
    the trace is the sum of the square roots of its eigenvalues (negative round-off clamped to 0)."""
    values, vectors = torch.linalg.eigh(cov_a)
    root_a = (vectors * values.clamp(min=0).sqrt()) @ vectors.T  # (D, D)
    middle = root_a @ cov_b @ root_a
    middle = (middle + middle.T) / 2  # exactly symmetric for eigvalsh
    return torch.linalg.eigvalsh(middle).clamp(min=0).sqrt().sum()


def frechet_distance(features_a: torch.Tensor, features_b: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to features (N, D) and (M, D), in float64 (Heusel et al. 2017)."""
    if features_a.ndim != 2 or features_b.ndim != 2 or features_a.shape[1] != features_b.shape[1]:
        raise ValueError(
            f"frechet_distance: expected features (N, D) and (M, D), got {tuple(features_a.shape)} and "
            f"{tuple(features_b.shape)}"
        )
    if len(features_a) < 2 or len(features_b) < 2:
        raise ValueError(
            f"frechet_distance: needs at least 2 rows per set, got {len(features_a)} and {len(features_b)}"
        )
    a, b = features_a.double(), features_b.double()
    mean_a, mean_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)  # (D, D) each
    distance = (mean_a - mean_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * trace_sqrt_product(cov_a, cov_b)
    return float(distance.clamp(min=0))


def confusion_matrix(truth: torch.Tensor, predicted: torch.Tensor, classes: int) -> torch.Tensor:
    """Counts (classes, classes): rows = true class, columns = predicted class."""
    counts = torch.bincount(truth * classes + predicted, minlength=classes * classes)  # (classes*classes,)
    return counts.view(classes, classes)  # (true, predicted)


def top_k_accuracy(scores: torch.Tensor, truth: torch.Tensor, k: int) -> float:
    """Share of rows of scores (N, L) whose true label (N,) is among their k highest."""
    top = scores.topk(min(k, scores.shape[1]), dim=1).indices  # (N, k)
    return float((top == truth.view(-1, 1)).any(dim=1).double().mean())  # truth as (N, 1)


def percent_interval(interval: list[float]) -> str:
    return f"95 % CI {100 * interval[0]:.1f}–{100 * interval[1]:.1f}"


def quality_bar(metrics: dict[str, Any], vae_eval: dict[str, Any] | None, preset: str = "demo") -> list[dict]:
    """The quality bar as rows {"name", "target", "measured", "pass"} (pass None: reported, no target).

    Figures over the sampled prompts are judged by their 95 % bootstrap interval over the prompts (`set_intervals`):
    a target holds when the whole interval is on its side of the bar, so a pass is not a lucky draw of prompts.
    Figures over every validation icon (zero-shot, dVAE) are the whole population and judged as measured."""
    rows = []

    def add(name: str, target: str, measured: str, passed: bool | None) -> None:
        rows.append({"name": name, "target": target, "measured": measured, "pass": passed})

    zero_shot = metrics["zero_shot"]["colour_accuracy"]
    add("CLIP zero-shot colour accuracy, validation icons", ">= 98 %", f"{100 * zero_shot:.1f} %", zero_shot >= 0.98)
    name = "dVAE reconstructions of validation icons, right colour"
    if vae_eval and "colour_accuracy" in vae_eval:
        accuracy = vae_eval["colour_accuracy"]
        add(name, ">= 99 %", f"{100 * accuracy:.2f} %", accuracy >= 0.99)
    else:
        add(name, ">= 99 %", "not measured (no OUT/vae/eval.json)", None)
    shape_target = SHAPE_TARGETS.get(preset)
    for split, label in (("seen", "seen icons"), ("val", "validation icons")):
        figures = metrics["generation"][split]
        n, intervals = figures["samples"], figures["intervals"]
        colour = figures["colour_fidelity"]
        low = intervals["colour_per_sample"]
        add(
            f"Colour fidelity per sample, {label}",
            ">= 95 % (whole 95 % CI)",
            f"{100 * colour['per_sample']:.1f} % ({percent_interval(low)})",
            low[0] >= 0.95,
        )
        best = intervals["colour_best_of_n"]
        add(
            f"Colour fidelity best of {n}, {label}",
            ">= 98 % (whole 95 % CI)",
            f"{100 * colour['best_of_n']:.1f} % ({percent_interval(best)})",
            best[0] >= 0.98,
        )
        shape = figures["shape_rank"]
        best_median, per_sample_median = shape["best_of_n"]["median"], shape["per_sample"]["median"]
        median_interval = intervals["shape_median_best_of_n"]
        shape_text = f"{best_median:g} (95 % CI {median_interval[0]:g}–{median_interval[1]:g})"
        if split == "seen" and shape_target is not None:
            add(
                f"Shape: median rank of the named icon, best of {n}, {label}",
                f"<= {shape_target} ({preset}; whole 95 % CI)",
                shape_text,
                median_interval[1] <= shape_target,
            )
        else:
            add(f"Shape: median rank of the named icon, best of {n}, {label}", "reported", shape_text, None)
        gain = intervals["colour_gain"]
        helps = reranking_helps(intervals, colour["best_of_n"], shape["best_of_n"], shape["per_sample"])
        add(
            f"Reranking helps colour, {label}",
            "best of n > per sample (95 % CI of the gain above 0, or every kept image right)",
            f"{100 * colour['best_of_n']:.1f} % vs {100 * colour['per_sample']:.1f} %; gain "
            f"{percent_interval(gain)} points",
            helps["colour"],
        )
        add(
            f"Reranking helps shape, {label}",
            "best-of-n median rank < per-sample (both at rank 1: more at rank 1, no fewer in the top 10), "
            "95 % CI of the gain above 0",
            f"median {best_median:g} vs {per_sample_median:g}; rank 1: {100 * shape['best_of_n']['within_1']:.1f} % "
            f"vs {100 * shape['per_sample']['within_1']:.1f} % "
            f"(gain {percent_interval(intervals['shape_within_1_gain'])} points); top 10: "
            f"{100 * shape['best_of_n']['within_10']:.1f} % vs {100 * shape['per_sample']['within_10']:.1f} %",
            helps["shape"],
        )
        precision = figures["r_precision"]
        gain = intervals["r_precision_gain"]
        add(
            f"Reranking helps CLIP R-precision, {label}",
            "kept > random (95 % CI of the gain above 0)",
            f"{100 * precision['kept']:.1f} % vs {100 * precision['random']:.1f} %; "
            f"gain {percent_interval(gain)} points",
            helps["R-precision"],
        )
    return rows


def reranking_helps(
    intervals: dict[str, list], colour_kept: float, best: dict[str, float], per_sample: dict[str, float]
) -> dict[str, bool]:
    """The quality bar's three "reranking helps" verdicts for one set: colour (the gain's interval above 0, or every
    kept image right; `colour_kept` is the kept samples' colour share), shape (`shape_reranking_helps` on the kept
    and per-sample `rank_summary`) and CLIP R-precision (its gain's interval above 0)."""
    return {
        "colour": intervals["colour_gain"][0] > 0 or colour_kept == 1.0,
        "shape": shape_reranking_helps(best, per_sample, intervals),
        "R-precision": intervals["r_precision_gain"][0] > 0,
    }


def shape_reranking_helps(best: dict[str, float], per_sample: dict[str, float], intervals: dict[str, list]) -> bool:
    """Best-of-n shape ranks (rank_summary) beat per-sample ones beyond the 95 % interval: a lower median; when both
    medians are already 1, the floor, the median cannot show it, so more kept images at rank 1 and no fewer within
    the top 10."""
    if best["median"] == per_sample["median"] == 1:
        return intervals["shape_within_1_gain"][0] > 0 and best["within_10"] >= per_sample["within_10"]
    return intervals["shape_median_gain"][0] > 0


# ------------------------------------------------------------------------------------------ icons and judges


class IconJudge:
    """All icons' glyph coverage rendered once at `size`: real icons for any (name, colour), and the shape judge's
    reference foreground masks per colour (built on first use)."""

    def __init__(self, size: int, colours: list[str]):
        self.names = icons.icon_names()
        self.index = {name: position for position, name in enumerate(self.names)}
        self.coverage = icons.render_masks(self.names, size)  # (M, H, W) uint8, 255 = ink
        self.colours = list(colours)
        self.palette = icons.palette_rgb(len(self.colours))  # (C, 3) uint8
        self._references: dict[int, torch.Tensor] = {}

    def icon_indices(self, names: list[str]) -> torch.Tensor:
        unknown = [name for name in names if name not in self.index]
        if unknown:
            raise ValueError(f"unknown icon names {unknown[:5]}; expected names from icons.icon_names()")
        return torch.tensor([self.index[name] for name in names])

    def real_icons(self, names: list[str], colour_indices: list[int]) -> torch.Tensor:
        """The dataset's pixels for each (name, colour): float (N, 3, H, W) in [0, 1]."""
        rows = self.icon_indices(names).numpy()
        pixels = icons.colourise(self.coverage[rows], self.palette[np.asarray(colour_indices, dtype=np.int64)])
        return torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255.0  # (N, 3, H, W)

    def references(self, colour_index: int) -> torch.Tensor:
        """Foreground masks bool (M, H, W) of every icon drawn in one palette colour. The verdict depends only on a
        pixel's coverage, so the judge runs once on the 256 possible coverages and the masks are a table lookup."""
        if colour_index not in self._references:
            coverages = np.arange(256, dtype=np.uint8).reshape(1, 1, 256)  # (1, 1, 256): every coverage once
            pixels = icons.colourise(coverages, self.palette[colour_index])  # (1, 1, 256, 3)
            images = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255.0  # (1, 3, 1, 256)
            table = icons.foreground_mask(images).reshape(256)  # (256,) bool
            self._references[colour_index] = table[torch.from_numpy(self.coverage).long()]  # (M, H, W)
        return self._references[colour_index]

    def shape_ranks(self, images: torch.Tensor, names: list[str], colour_indices: list[int]) -> torch.Tensor:
        """Rank (N,) of each image's named icon among all icons (see `named_icon_ranks`), per prompt colour."""
        masks = icons.foreground_mask(images)  # (N, H, W)
        targets = self.icon_indices(names)
        colour_of = torch.tensor(colour_indices)
        ranks = torch.empty(len(images), dtype=torch.long)
        for colour_index in colour_of.unique().tolist():
            rows = (colour_of == colour_index).nonzero()[:, 0]
            iou = icons.mask_iou(masks[rows], self.references(colour_index))  # (n, M)
            ranks[rows] = named_icon_ranks(iou, targets[rows])
        return ranks


def colour_hits(images: torch.Tensor, colour_indices: list[int]) -> torch.Tensor:
    """Bool (N,): the colour judge's verdict for each image and its prompt's colour index."""
    return icons.dominant_colour(images) == torch.tensor(colour_indices)


def caption_of(name: str, colour: str) -> str:
    return icons.captions_for(name, colour)[0]


def name_phrase(name: str) -> str:
    """ "a heart", "an account": the icon part of the first caption, with its article."""
    return icons.captions_for(name, "red")[0].split(" icon of ", 1)[1]


# ------------------------------------------------------------------------------------------ generation figures


def sample_prompts(
    model: Any,
    vae: Any,
    tokenizer: Any,
    clip_bundle: Any,
    prompts: list[str],
    samples: int,
    seed: int,
    sampling: dict[str, Any],
    bar: Any = None,
) -> dict[str, Any]:
    """`samples` CLIP-scored samples per prompt, GENERATION_BATCH sequences per generate() call, returned in draw
    order: images (P, n, 3, H, W), codes (P, n, h, w), scores (P, n) (CLIP cosine with the prompt), features
    (P, n, D) (the images' L2-normalised CLIP features, as generate() scored them), kept (P,) the
    sample generate() keeps with keep=1 and these `sampling` settings (CLIP's best, or with `shortlist` the more
    typical of its shortlist), and the number of prompts longer than the model's text length (truncated)."""
    from ..sampling import generate, shortlisted_per_group

    per_call = max(1, GENERATION_BATCH // samples)
    images, codes, scores, features = [], [], [], []
    truncated = 0
    for start in range(0, len(prompts), per_call):
        chunk = prompts[start : start + per_call]
        with warnings.catch_warnings(record=True) as caught:  # counted and reported, not printed per prompt
            warnings.simplefilter("always")
            generation = generate(
                model,
                vae,
                tokenizer,
                chunk,
                n=samples,
                clip=clip_bundle,
                seed=seed + start * samples,
                batch_size=GENERATION_BATCH,
                **sampling,
            )
        truncated += sum("was truncated" in str(warning.message) for warning in caught)
        order = torch.tensor(generation.seeds).argsort()  # (c*n,): seeds are base + draw index, prompt-major
        images.append(generation.images[order].cpu())
        codes.append(generation.codes[order].cpu())
        scores.append(generation.clip_scores[order])
        features.append(generation.clip_features[order])
        if bar is not None:
            bar.update(len(chunk) * samples)
    P = len(prompts)
    images_all, scores_all, features_all = torch.cat(images), torch.cat(scores), torch.cat(features)
    chosen = shortlisted_per_group(scores_all, features_all, samples, 1, sampling.get("shortlist", 1))  # (P,)
    return {
        "images": images_all.view(P, samples, *images_all.shape[1:]),  # (P, n, 3, H, W)
        "codes": torch.cat(codes).view(P, samples, *codes[0].shape[1:]),  # (P, n, h, w)
        "scores": scores_all.view(P, samples),  # (P, n)
        "features": features_all.view(P, samples, -1),  # (P, n, D)
        "kept": chosen - torch.arange(P) * samples,  # (P,) index within each prompt's samples
        "truncated_prompts": truncated,
    }


def set_intervals(
    hits: torch.Tensor,
    ranks: torch.Tensor,
    kept: torch.Tensor,
    kept_hits: torch.Tensor,
    random_hits: torch.Tensor,
    seed: int,
) -> dict[str, list[float]]:
    """95 % bootstrap intervals over the prompts of one set's figures, from per-sample colour verdicts (P, n),
    shape ranks (P, n), the kept sample of each prompt (P,), and R-precision hits of the kept (P,) and of every
    sample (P, n); the differences are paired (the same resampled prompts on both sides)."""
    P = hits.shape[0]
    rows = torch.arange(P)
    hit_rate = hits.double().mean(1)  # (P,) per prompt
    kept_hit = hits[rows, kept].double()  # (P,)
    best_ranks = ranks[rows, kept]  # (P,)
    random_rate = random_hits.double().mean(1)  # (P,)

    def within(values: torch.Tensor, threshold: int) -> torch.Tensor:
        return (values <= threshold).double()

    per_sample_within = {threshold: within(ranks, threshold).mean(1) for threshold in (1, 10)}  # (P,) each
    best_within = {threshold: within(best_ranks, threshold) for threshold in (1, 10)}  # (P,) each
    statistics = {
        "colour_per_sample": lambda r: hit_rate[r].mean(1),
        "colour_best_of_n": lambda r: kept_hit[r].mean(1),
        "colour_gain": lambda r: (kept_hit[r] - hit_rate[r]).mean(1),
        "shape_median_best_of_n": lambda r: best_ranks[r].double().median(1).values,
        "shape_median_per_sample": lambda r: ranks[r].flatten(1).double().median(1).values,
        "shape_median_gain": lambda r: (
            ranks[r].flatten(1).double().median(1).values - best_ranks[r].double().median(1).values
        ),
        "shape_within_1_gain": lambda r: (best_within[1][r] - per_sample_within[1][r]).mean(1),
        "shape_within_10_gain": lambda r: (best_within[10][r] - per_sample_within[10][r]).mean(1),
        "r_precision_gain": lambda r: (kept_hits.double()[r] - random_rate[r]).mean(1),
    }
    return {name: bootstrap_interval(statistic, P, seed) for name, statistic in statistics.items()}


def set_figures(
    pairs: list[tuple[str, str]],
    generated: dict[str, torch.Tensor],
    judge: IconJudge,
    vae: Any,
    clip_model: Any,
    clip_tokenizer: Any,
    seed: int,
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Colour, shape and CLIP figures of one prompt set, and the tensors later sections reuse."""
    names = [name for name, _ in pairs]
    colour_indices = [judge.colours.index(colour) for _, colour in pairs]
    prompts = [caption_of(name, colour) for name, colour in pairs]
    images, scores = generated["images"], generated["scores"]
    P, n = scores.shape
    flat = images.flatten(0, 1)  # (P*n, 3, H, W), prompt-major
    repeated_names = [name for name in names for _ in range(n)]
    repeated_colours = [index for index in colour_indices for _ in range(n)]
    kept = generated["kept"]  # (P,) the sample generate() keeps
    rows = torch.arange(P)

    hits = colour_hits(flat, repeated_colours).view(P, n)  # (P, n)
    ranks = judge.shape_ranks(flat, repeated_names, repeated_colours).view(P, n)  # (P, n)
    real = judge.real_icons(names, colour_indices)  # (P, 3, H, W)
    with torch.no_grad():
        reconstructed = vae.decode(vae.encode(real))  # (P, 3, H, W)
    others = names[1:] + names[:1]  # each prompt judged on the real icon of the next prompt's name
    chance = judge.real_icons(others, colour_indices)
    per_colour = {}
    for colour_index, colour in enumerate(judge.colours):
        chosen = torch.tensor(colour_indices) == colour_index
        if chosen.any():
            per_colour[colour] = float(hits[chosen].double().mean())

    misses, palette = [], list(icons.PALETTE)  # the kept samples the colour judge calls wrong, and their ink's core
    for prompt in (~hits[rows, kept]).nonzero().flatten().tolist():
        row = prompt * n + int(kept[prompt])
        image = flat[row : row + 1]  # (1, 3, H, W)
        judged, core = int(icons.dominant_colour(image)[0]), int(icons.core_ink_colour(image)[0])
        misses.append(
            {
                "prompt": prompts[prompt],
                "judged": palette[judged] if judged >= 0 else "no ink",
                "core_ink": palette[core] if core >= 0 else "no ink",
                "right_samples": int(hits[prompt].sum()),
            }
        )

    features = generated["features"].flatten(0, 1)  # (P*n, D) as generate() scored them, not encoded again
    prompt_features = encode_texts(clip_model, clip_tokenizer, prompts)  # (P, D)
    similarity = features @ prompt_features.T  # (P*n, P)
    truth = rows.repeat_interleave(n)  # (P*n,)
    kept_rows = rows * n + kept  # (P,) rows of the kept samples in `flat`
    kept_hits = r_precision_hits(similarity[kept_rows], truth[kept_rows], R_PRECISION_R, seed)  # (P,)
    random_hits = r_precision_hits(similarity, truth, R_PRECISION_R, seed).view(P, n)  # (P, n)
    figures = {
        "prompts": P,
        "samples": n,
        "truncated_prompts": generated.get("truncated_prompts", 0),
        "colour_fidelity": {
            "per_sample": float(hits.double().mean()),
            "best_of_n": float(hits[rows, kept].double().mean()),
            "real_icons": float(colour_hits(real, colour_indices).double().mean()),
            "dvae_reconstructions": float(colour_hits(reconstructed, colour_indices).double().mean()),
            "per_sample_by_colour": per_colour,
            "kept_misses": misses,
        },
        "shape_rank": {
            "per_sample": rank_summary(ranks),
            "best_of_n": rank_summary(ranks[rows, kept]),
            "oracle_best_of_n": rank_summary(ranks.min(dim=1).values),
            "real_icons": rank_summary(judge.shape_ranks(real, names, colour_indices)),
            "dvae_reconstructions": rank_summary(judge.shape_ranks(reconstructed, names, colour_indices)),
            "chance": rank_summary(judge.shape_ranks(chance, names, colour_indices)),
            "icons": len(judge.names),
        },
        "r_precision": {
            "r": min(R_PRECISION_R, P),
            "kept": float(kept_hits.double().mean()),
            "random": float(random_hits.double().mean()),
        },
        "clip_score": {"kept_mean": float(scores[rows, kept].mean()), "all_mean": float(scores.mean())},
        "intervals": set_intervals(hits, ranks, kept, kept_hits, random_hits, seed),
    }
    tensors = {
        "hits": hits,  # (P, n) colour verdicts
        "ranks": ranks,  # (P, n) shape ranks
        "features": features.view(P, n, -1),  # (P, n, D)
        "real_features": encode_images(clip_model, real),  # (P, D)
        "real": real,
        "kept": kept,
    }
    return figures, tensors


def zero_shot_figures(
    judge: IconJudge, clip_model: Any, clip_tokenizer: Any, val_names: list[str]
) -> tuple[dict[str, Any], dict[str, Any], torch.Tensor]:
    """Zero-shot colour and icon name, and text-to-image retrieval, on every validation icon in every colour.
    Returns (zero-shot figures, retrieval figures, the images' CLIP features for FID)."""
    from ..evaluate import recall_at

    names = sorted(val_names)
    C = len(judge.colours)
    image_names = [name for name in names for _ in range(C)]
    image_colours = [index for _ in names for index in range(C)]
    images = judge.real_icons(image_names, image_colours)  # (V*C, 3, H, W)
    features = encode_images(clip_model, images)  # (V*C, D)

    colour_text = encode_texts(clip_model, clip_tokenizer, [f"a {colour} icon" for colour in judge.colours])  # (C, D)
    colour_truth = torch.tensor(image_colours)
    predicted = (features @ colour_text.T).argmax(dim=1)  # (V*C, C) -> (V*C,)
    confusion = confusion_matrix(colour_truth, predicted, C)

    name_text = encode_texts(
        clip_model, clip_tokenizer, [f"an icon of {name_phrase(name)}" for name in names]
    )  # (V, D)
    name_truth = torch.arange(len(names)).repeat_interleave(C)
    name_scores = features @ name_text.T  # (V*C, V)

    captions = [caption_of(name, judge.colours[colour]) for name, colour in zip(image_names, image_colours)]
    text_to_image = encode_texts(clip_model, clip_tokenizer, captions) @ features.T  # (V*C, V*C) queries x images
    zero_shot = {
        "images": len(images),
        "colours": list(judge.colours),
        "colour_accuracy": float((predicted == colour_truth).double().mean()),
        "colour_confusion": confusion.tolist(),
        "names": len(names),
        "name_top1": top_k_accuracy(name_scores, name_truth, 1),
        "name_top5": top_k_accuracy(name_scores, name_truth, 5),
        "chance_top1": 1 / len(names),
        "chance_top5": min(5, len(names)) / len(names),
    }
    retrieval = {
        "images": len(images),
        "text_to_image_r1": recall_at(text_to_image, 1),
        "text_to_image_r5": recall_at(text_to_image, 5),
    }
    return zero_shot, retrieval, features


# ------------------------------------------------------------------------------------------ pictures

SCALE = 2  # pictures show 32 px images at 64 px
LABEL_HEIGHT = 14
TITLE_HEIGHT = 16
GAP = 4
KEPT_FRAME = (46, 160, 67)  # green frame around the kept (best-of-n) samples
REGION_COLOUR = (229, 57, 53)


def _font(size: int = 11) -> Any:
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the bitmap font
        return ImageFont.load_default()


def contact_sheet(rows: list[dict[str, Any]]) -> Any:
    """A PIL picture of rows {"title": str, "images": (k, 3, H, W), "labels": [str] * k, "marked": [bool] * k,
    "box": (x0, y0, x1, y1) drawn on the first image or None}: each row a title line, then its images enlarged
    SCALE times with a label under each and a green frame around the marked ones."""
    from PIL import Image, ImageDraw

    from ..transforms import to_pil

    side = rows[0]["images"].shape[-1] * SCALE
    cell = side + 2 * GAP
    font = _font()
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    title_width = max(int(measure.textlength(row["title"], font=font)) for row in rows) + 2 * GAP
    width = max(max(len(row["images"]) for row in rows) * cell + GAP, title_width)
    row_height = TITLE_HEIGHT + cell + LABEL_HEIGHT
    sheet = Image.new("RGB", (width, len(rows) * row_height + GAP), "white")
    draw = ImageDraw.Draw(sheet)
    for row_index, row in enumerate(rows):
        top = row_index * row_height
        draw.text((GAP, top + 2), row["title"], fill=(33, 33, 33), font=font)
        for column, image in enumerate(row["images"]):
            left = GAP + column * cell
            picture = to_pil(image).resize((side, side), Image.NEAREST)
            sheet.paste(picture, (left + GAP, top + TITLE_HEIGHT + GAP))
            if row.get("marked") and row["marked"][column]:
                box = (
                    left + 1,
                    top + TITLE_HEIGHT + 1,
                    left + side + 2 * GAP - 2,
                    top + TITLE_HEIGHT + side + 2 * GAP - 2,
                )
                draw.rectangle(box, outline=KEPT_FRAME, width=3)
            if column == 0 and row.get("box") is not None:
                x0, y0, x1, y1 = (value * SCALE for value in row["box"])
                origin = (left + GAP, top + TITLE_HEIGHT + GAP)
                draw.rectangle(
                    (origin[0] + x0, origin[1] + y0, origin[0] + x1 - 1, origin[1] + y1 - 1),
                    outline=REGION_COLOUR,
                    width=2,
                )
            label = row["labels"][column] if row.get("labels") else ""
            draw.text((left + GAP, top + TITLE_HEIGHT + cell - 1), label, fill=(66, 66, 66), font=font)
    return sheet


def _save_picture(picture: Any, path: Path) -> None:
    checkpoint.atomic_write(path, lambda temporary: picture.save(temporary, format="PNG"))


def gallery_rows(
    sets: dict[str, tuple[list[tuple[str, str]], dict[str, torch.Tensor], torch.Tensor]],
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Up to GALLERY_ROWS rows alternating seen and validation prompts (prompt i has colour i mod 8, so the rows
    cover every colour): the real icon, then all samples in draw order with CLIP scores, the kept one framed."""
    rows, records = [], []
    for index in range(GALLERY_ROWS):
        split = "seen" if index % 2 == 0 else "val"
        pairs, generated, real = sets[split]
        if index >= len(pairs):
            continue
        name, colour = pairs[index]
        scores = generated["scores"][index]
        kept = int(generated["kept"][index])
        prompt = caption_of(name, colour)
        label = "seen" if split == "seen" else "validation"
        rows.append(
            {
                "title": f"{label}: {prompt}",
                "images": torch.cat([real[index : index + 1], generated["images"][index]]),
                "labels": ["real"] + [f"{float(score):.3f}" for score in scores],
                "marked": [False] + [column == kept for column in range(len(scores))],
            }
        )
        records.append(
            {"split": split, "prompt": prompt, "clip_scores": [round(float(s), 4) for s in scores], "kept": kept}
        )
    return rows, records


def editing_examples(
    model: Any,
    vae: Any,
    tokenizer: Any,
    clip_bundle: Any,
    sources: dict[str, tuple[str, torch.Tensor]],
    seed: int,
    sampling: dict[str, Any],
    out_dir: Path,
) -> dict[str, Any]:
    """Inpainting (the right half of a validation icon regenerated) and variations (the bottom half of a seen icon's
    codes resampled), EXAMPLE_CANDIDATES candidates each, ranked by CLIP; pictures in `out_dir`."""
    from ..sampling import inpaint, variations

    prompt, image = sources["inpainting"]
    H, W = image.shape[-2:]
    box = (W // 2, 0, W, H)
    painted = inpaint(
        model, vae, tokenizer, image, list(box), prompt, n=EXAMPLE_CANDIDATES, clip=clip_bundle, seed=seed, **sampling
    )
    row = {
        "title": f"inpainting: the region in the red box regenerated for '{prompt}' (candidates best first)",
        "images": torch.cat([image[None], painted.images.cpu()]),
        "labels": ["input"] + [f"{float(score):.3f}" for score in painted.clip_scores],
    }
    _save_picture(contact_sheet([{**row, "box": box}]), out_dir / "inpainting.png")
    variation_prompt, variation_image = sources["variation"]
    varied = variations(
        model,
        vae,
        tokenizer,
        variation_image,
        variation_prompt,
        n=EXAMPLE_CANDIDATES,
        clip=clip_bundle,
        seed=seed,
        **sampling,
    )
    grid = vae.config.grid_size
    variation_row = {
        "title": f"variations: top {grid // 2} of {grid} code rows kept, the rest resampled for '{variation_prompt}'",
        "images": torch.cat([variation_image[None], varied.images.cpu()]),
        "labels": ["input"] + [f"{float(score):.3f}" for score in varied.clip_scores],
    }
    _save_picture(contact_sheet([variation_row]), out_dir / "variation.png")
    return {
        "inpainting": {
            "prompt": prompt,
            "box": list(box),
            "clip_scores": [round(float(s), 4) for s in painted.clip_scores],
            "picture": "eval/inpainting.png",
        },
        "variation": {
            "prompt": variation_prompt,
            "kept_rows": grid // 2,
            "clip_scores": [round(float(s), 4) for s in varied.clip_scores],
            "picture": "eval/variation.png",
        },
    }


def guided_example(
    vae: Any, clip_model: Any, clip_tokenizer: Any, prompt: str, init_codes: torch.Tensor, seed: int, out_dir: Path
) -> dict[str, Any]:
    """CLIP guidance (clipdalle.guide) for GUIDE_STEPS steps from the best DALL·E sample's codes."""
    from ..guide import guide

    started = time.perf_counter()
    result = guide(
        vae,
        clip_model,
        clip_tokenizer,
        prompt,
        steps=GUIDE_STEPS,
        seed=seed,
        init_codes=init_codes,
        snapshot_every=max(1, GUIDE_STEPS // 4),
    )
    seconds = time.perf_counter() - started
    row = {
        "title": f"CLIP-guided from the kept DALL·E sample: '{prompt}' (step: CLIP score)",
        "images": torch.stack(result.snapshots),
        "labels": [f"{step}: {score:.3f}" for step, score in zip(result.snapshot_steps, result.scores)],
    }
    _save_picture(contact_sheet([row]), out_dir / "guided.png")
    return {
        "prompt": prompt,
        "steps": GUIDE_STEPS,
        "snapshot_steps": result.snapshot_steps,
        "clip_scores": [round(score, 4) for score in result.scores],
        "seconds": round(seconds, 1),
        "picture": "eval/guided.png",
    }


def save_samples(path: Path, pair_sets: dict, generated: dict, tensors: dict) -> None:
    """Every evaluated sample with the judges' verdicts, so that other rerankers can be compared on the very same
    samples (benchmarks/rerank_experiment.py): per set, the prompts' icon names and colours, the images as uint8
    (P, n, 3, H, W), colour verdicts and shape ranks (P, n), and the CLIP scores that chose the kept samples."""
    from ..io import atomic_write

    values = {}
    for split, pairs in pair_sets.items():
        values[split] = {
            "names": [name for name, _ in pairs],
            "colours": [colour for _, colour in pairs],
            "images": generated[split]["images"].mul(255).round().to(torch.uint8),  # (P, n, 3, H, W)
            "hits": tensors[split]["hits"],  # (P, n)
            "ranks": tensors[split]["ranks"],  # (P, n)
            "scores": generated[split]["scores"],  # (P, n)
            "kept": generated[split]["kept"],  # (P,)
        }
    atomic_write(path, lambda temporary: torch.save(values, temporary))


# ------------------------------------------------------------------------------------------ the whole evaluation


def _log(message: str, progress: bool) -> None:
    if progress:
        print(f"evaluation: {message}", file=sys.stderr, flush=True)


def evaluation_settings(
    prompts: int, samples: int, seed: int, sampling: dict[str, Any] | None, val_prompts: int | None = None
) -> dict[str, Any]:
    """What decides an evaluation's prompts and samples, as eval.json's `settings` records it (a pipeline re-run
    compares them with its preset's): prompts per set (`val_prompts`, when given, for the validation set), samples
    per prompt, seed and sampling settings."""
    return {
        "prompts_per_set": {"seen": prompts, "val": prompts if val_prompts is None else val_prompts},
        "samples_per_prompt": samples,
        "seed": seed,
        "sampling": dict(sampling or {}),
    }


def evaluate_demo(
    out: Path,
    data: Path,
    *,
    seen_names: list[str],
    val_names: list[str],
    prompts: int = 128,
    samples: int = 16,
    seed: int = 0,
    progress: bool = True,
    preset: str = "demo",
    sampling: dict[str, Any] | None = None,
    val_prompts: int | None = None,
) -> dict[str, Any]:
    """Loads OUT/dalle (with its dVAE and tokenizer) and OUT/clip, computes every figure of the demo's report and
    quality bar (see DEFINITIONS), writes OUT/eval/{gallery,inpainting,variation,guided}.png and returns the
    metrics (JSON-ready). `data` is the icon dataset (its info.json gives size and colours); `preset` picks the
    shape target of the quality bar; `sampling` passes temperature/top_k/top_p/cond_scale to generate().
    `prompts` sets both sets' prompt count unless `val_prompts` gives the validation set its own."""
    from tqdm import tqdm

    from .. import pretrained

    out, data = Path(out), Path(data)
    timings: dict[str, float] = {}
    started = time.perf_counter()
    clock = [started]

    def lap(name: str) -> None:
        now = time.perf_counter()
        timings[name] = round(now - clock[0], 1)
        clock[0] = now

    info_path = data / "info.json"
    if not info_path.exists():
        raise ValueError(f"{info_path} not found; expected an icon dataset built by `clipdalle data icons` ({data})")
    info = json.loads(info_path.read_text())
    colours = list(info["colours"])
    run_settings = evaluation_settings(prompts, samples, seed, sampling, val_prompts)
    counts, sampling = run_settings["prompts_per_set"], run_settings["sampling"]
    if min(counts.values()) < 2 or samples < 1:
        raise ValueError(
            f"evaluate_demo: needs at least 2 prompts per set (R-precision compares prompts) and 1 sample per prompt, "
            f"got prompts={prompts} val_prompts={counts['val']} samples={samples}"
        )
    for folder in ("dalle", "clip"):
        if not (out / folder / checkpoint.CONFIG_FILE).exists():
            raise ValueError(f"{out / folder} is not a finished run (no {checkpoint.CONFIG_FILE}); train it first")
    model, vae, tokenizer = checkpoint.load_dalle(out / "dalle")
    clip_bundle = pretrained.load(out / "clip")
    clip_model, _, clip_tokenizer = clip_bundle
    if vae.config.image_size != info["size"]:
        raise ValueError(
            f"the dVAE in {out / 'dalle' / 'vae'} makes {vae.config.image_size} px images but {data} holds "
            f"{info['size']} px icons; evaluate with the dataset the models were trained on"
        )
    _log(f"rendering all icons at {info['size']} px", progress)
    judge = IconJudge(info["size"], colours)
    lap("load models, render icons")

    pair_sets = {
        "seen": prompt_set(seen_names, counts["seen"], seed, colours),
        "val": prompt_set(val_names, counts["val"], seed + 1, colours),
    }
    generated = {}
    bar = tqdm(total=sum(counts.values()) * samples, desc="evaluation samples", unit="img", disable=not progress)
    for offset, (split, pairs) in enumerate(pair_sets.items()):
        captions = [caption_of(name, colour) for name, colour in pairs]
        base = seed * 10_000_000 + offset * 1_000_000  # disjoint seeds for the two sets
        generated[split] = sample_prompts(model, vae, tokenizer, clip_bundle, captions, samples, base, sampling, bar)
    bar.close()
    lap("generation")

    _log("judging colour, shape and CLIP agreement", progress)
    generation, tensors = {}, {}
    for split, pairs in pair_sets.items():
        generation[split], tensors[split] = set_figures(
            pairs, generated[split], judge, vae, clip_model, clip_tokenizer, seed
        )
    lap("judges and R-precision")

    save_samples(out / "eval" / SAMPLES_FILE, pair_sets, generated, tensors)

    _log("CLIP zero-shot, retrieval and FID on the validation icons", progress)
    zero_shot, retrieval, real_val_features = zero_shot_figures(judge, clip_model, clip_tokenizer, val_names)
    val = tensors["val"]
    P = len(pair_sets["val"])
    rows = torch.arange(P)
    fid = {
        "label": "FID on CLIP image features",
        "real_images": len(real_val_features),
        "feature_dim": int(real_val_features.shape[1]),
        "generated_kept": frechet_distance(val["features"][rows, val["kept"]], real_val_features),
        "generated_random": frechet_distance(val["features"][:, 0], real_val_features),
        "generated_all_samples": frechet_distance(val["features"].flatten(0, 1), real_val_features),  # (P*n, D)
        "real_prompt_icons": frechet_distance(val["real_features"], real_val_features),
        "images_per_set": {"kept": P, "random": P, "all_samples": P * samples, "real_prompt_icons": P},
    }
    lap("zero-shot, retrieval, FID")

    _log("examples: gallery, inpainting, variation, CLIP guidance", progress)
    eval_dir = out / "eval"
    eval_dir.mkdir(parents=True, exist_ok=True)
    sets = {split: (pair_sets[split], generated[split], tensors[split]["real"]) for split in pair_sets}
    rows_to_draw, gallery = gallery_rows(sets)
    _save_picture(contact_sheet(rows_to_draw), eval_dir / "gallery.png")
    seen_pairs, val_pairs = pair_sets["seen"], pair_sets["val"]
    sources = {
        "inpainting": (caption_of(*val_pairs[0]), tensors["val"]["real"][0]),
        "variation": (caption_of(*seen_pairs[0]), tensors["seen"]["real"][0]),
    }
    examples = editing_examples(model, vae, tokenizer, clip_bundle, sources, seed, sampling, eval_dir)
    guided_index = min(2, P - 1)
    init_codes = generated["val"]["codes"][guided_index, int(val["kept"][guided_index])]
    examples["guided"] = guided_example(
        vae, clip_model, clip_tokenizer, caption_of(*val_pairs[guided_index]), init_codes, seed, eval_dir
    )
    lap("examples")
    timings["total"] = round(time.perf_counter() - started, 1)

    metrics = {
        "settings": {
            **run_settings,
            "generation_batch": GENERATION_BATCH,
            "image_size": info["size"],
            "colours": colours,
            "seen_icons": len(seen_names),
            "val_icons": len(val_names),
            "all_icons": len(judge.names),
            "preset": preset,
        },
        "definitions": DEFINITIONS,
        "generation": generation,
        "fid": fid,
        "zero_shot": zero_shot,
        "retrieval": retrieval,
        "gallery": {"rows": gallery, "picture": "eval/gallery.png"},
        "examples": examples,
        "timings_s": timings,
    }
    vae_eval_path = out / "vae" / "eval.json"
    vae_eval = json.loads(vae_eval_path.read_text()) if vae_eval_path.exists() else None
    metrics["quality_bar"] = quality_bar(metrics, vae_eval, preset)
    _log(f"done in {timings['total']:.0f} s", progress)
    return metrics
