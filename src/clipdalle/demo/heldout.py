"""The evaluation of a pipeline run on a collection of one's own: every figure on its held-out split, beside the same
figure on training images (OUT/eval.json with "kind": "collection", drawn by demo/collection_report.py).

What it measures (DEFINITIONS below says it in the report's words):
  dVAE   reconstruction PSNR of held-out and training images;
  CLIP   contrastive loss and text<->image recall@1/5 over held-out pairs (and as many training pairs), zero-shot
         classification of held-out images among frequent caption words;
  DALL·E loss over held-out and training (caption, codes) pairs; samples for training captions and held-out
         captions, CLIP-reranked: R-precision, diversity within a prompt, the share of distinct code grids and of
         exact copies of a training image's codes, FID on CLIP features against the real held-out images.

The run's own CLIP reranks the samples and, unless a `judge` CLIP is given, also scores them; a judge (for instance a
CLIP trained once on the whole collection) makes the figures of two runs comparable when their own CLIPs differ.
Per-prompt values are kept (`per_prompt`) so that two runs on the same split can be compared with paired bootstrap
intervals (`compare`).
"""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import checkpoint, evaluate, pretrained
from ..data.loader import SampleStream, make_loader
from ..data.sources import open_source
from ..zero_shot import encode_images, encode_texts, label_features
from .evaluation import (
    GENERATION_BATCH,
    bootstrap_interval,
    contact_sheet,
    frechet_distance,
    r_precision_hits,
    sample_prompts,
)

R_PRECISION_R = 100  # candidates per image: its own prompt and 99 others of its set (all others when fewer)
TRAINING_IMAGES = 2048  # training images read for the training-side figures (and the copy check's codes: all)
ZERO_SHOT_WORDS = 100  # the most frequent caption words a held-out image is classified among
MIN_WORD_COUNT = 3  # a word must appear in this many training captions to be a zero-shot class
GALLERY_ROWS = 4  # prompts per set in the gallery
GALLERY_SAMPLES = 8  # samples shown per prompt
STOP_WORDS = frozenset(
    "a an the of in on at to and or with for from by is are was be as it its this that these those into over under "
    "picture image photo icon text word written background".split()
)

DEFINITIONS = {
    "split": "Held out: the images of the collection's validation split (see the data report), never trained on.",
    "losses": (
        "Validation losses of each model on every held-out image (with its first caption), beside the same figure on "
        "training images: dVAE PSNR of the reconstruction from hard codes; CLIP contrastive loss over all pairs of "
        "the set together (so training and held-out use sets of the same size); DALL·E loss in nats per token "
        "(1 : 7 text : image) and bits per image token, on the codes of this run's own dVAE (runs with different "
        "dVAEs are compared on different codes)."
    ),
    "retrieval": "Recall@k over the held-out pairs: the share of queries whose own image (caption) is in the top k.",
    "zero_shot": (
        "Held-out images classified among the most frequent words of the training captions (stop words left out); a "
        "hit when the top word (any of the top 5) is in the image's captions. Chance: the mean share of the words "
        "that are in an image's captions."
    ),
    "prompts": (
        "Training captions: the first caption of training images drawn with a seeded generator; held-out captions: "
        "the first caption of held-out images. Each prompt is sampled n times; the kept sample is the one generate() "
        "keeps with the plan's sampling settings: the one the run's own CLIP scores highest (with a shortlist, the "
        "most typical of its best)."
    ),
    "r_precision": (
        "For each image, its own prompt and up to 99 other prompts of its set are scored by the judging CLIP; a hit "
        "when its own prompt scores highest. Kept: the reranked samples; per sample: all n; real: the images the "
        "held-out captions belong to (the ceiling)."
    ),
    "diversity": (
        "Within a prompt: the mean pairwise cosine distance of the judging CLIP's image features of its n samples "
        "(0 = the same image n times), and the share of distinct code grids among them (1 / n = all the same). "
        "Copies: the share of samples whose code grid equals a training image's."
    ),
    "fid": (
        "Fréchet distance between Gaussians of the judging CLIP's image features (not Inception's) of generated "
        "images for the held-out captions and of all real held-out images; 'real' is the floor: the held-out "
        "images the prompts belong to, as many as the kept samples."
    ),
}


# ------------------------------------------------------------------------------------------ reading a split


def read_split(
    data: str | Path, image_size: int, holdout: str | None = None, val_fraction: float = 0.0, limit: int | None = None
) -> tuple[torch.Tensor, list[list[str]]]:
    """(images (N, 3, S, S), every caption of each) of a dataset, in its order: all of it, or the samples `holdout`
    ("train" or "val") keeps by the key hash; at most `limit` (every k-th, to spread over the collection)."""
    stream = SampleStream(
        open_source(data, captions="required"),
        image_size=image_size,
        batch_size=256,
        shuffle=False,
        infinite=False,
        holdout=holdout,
        val_fraction=val_fraction,
        keep_all_captions=True,
    )
    images, captions = [], []
    for batch in make_loader(stream, num_workers=0):
        images.append(batch["images"])
        captions += [text.split("\n") for text in batch["captions"]]
    if not captions:
        raise ValueError(f"{data}: no readable images in the {holdout or 'given'} split")
    images_all = torch.cat(images)
    if limit is not None and len(captions) > limit:
        chosen = np.linspace(0, len(captions) - 1, limit).round().astype(int)
        return images_all[torch.from_numpy(chosen)], [captions[index] for index in chosen]
    return images_all, captions


def caption_words(captions: list[list[str]], count: int = ZERO_SHOT_WORDS) -> list[str]:
    """The `count` most frequent words (letters only, 3 or more, not STOP_WORDS) in at least MIN_WORD_COUNT images'
    captions, most frequent first (ties alphabetical)."""
    frequency: dict[str, int] = {}
    for texts in captions:
        for word in set(words_of(texts)):
            frequency[word] = frequency.get(word, 0) + 1
    ranked = sorted(
        (word for word, seen in frequency.items() if seen >= MIN_WORD_COUNT), key=lambda w: (-frequency[w], w)
    )
    return ranked[:count]


def words_of(texts: list[str]) -> list[str]:
    return [word for text in texts for word in re.findall(r"[a-z]{3,}", text.lower()) if word not in STOP_WORDS]


# ------------------------------------------------------------------------------------------ figures


@torch.no_grad()
def encode_codes(vae: Any, images: torch.Tensor) -> torch.Tensor:
    """The dVAE's codes (N, h*w) of images (N, 3, H, W), 256 at a time."""
    return torch.cat([vae.encode(images[start : start + 256]).flatten(1) for start in range(0, len(images), 256)])


@torch.no_grad()
def loss_figures(
    model: Any, vae: Any, tokenizer: Any, clip_bundle: Any, images: torch.Tensor, captions: list[str]
) -> dict[str, Any]:
    """dVAE PSNR, CLIP loss and recall, DALL·E loss of one set of images with one caption each."""
    from ..models.dvae import psnr

    clip_model, _, clip_tokenizer = clip_bundle
    codes = encode_codes(vae, images)  # (N, h*w)
    grid = vae.config.grid_size
    psnr_sum = sum(
        float(psnr(vae.decode(codes[start : start + 256].view(-1, grid, grid)), images[start : start + 256]).sum())
        for start in range(0, len(images), 256)
    )
    dalle_batches = [
        {"text": tokenizer(captions[start : start + 64], model.config.text_length), "codes": codes[start : start + 64]}
        for start in range(0, len(captions), 64)
    ]
    clip_batches = [
        {
            "images": images[start : start + 256],
            "text": clip_tokenizer(captions[start : start + 256], clip_model.config.context_length),
        }
        for start in range(0, len(captions), 256)
    ]
    return {
        "images": len(images),
        "dvae_psnr": psnr_sum / len(images),
        "clip": evaluate.clip_metrics(clip_model, clip_batches),
        "dalle": evaluate.dalle_metrics(model, dalle_batches),
    }


@torch.no_grad()
def zero_shot_figures(clip_bundle: Any, images: torch.Tensor, captions: list[list[str]], words: list[str]):
    """Top-1 and top-5 accuracy of held-out images among `words` (a hit: a top word is in the image's captions)."""
    clip_model, _, clip_tokenizer = clip_bundle
    features = encode_images(clip_model, images)  # (N, D)
    scores = features @ label_features(clip_model, words, clip_tokenizer).T  # (N, W)
    top = scores.topk(min(5, len(words)), dim=1).indices  # (N, 5)
    top1, top5, chance, judged = 0, 0, 0.0, 0
    for row, texts in enumerate(captions):
        truth = {index for index, word in enumerate(words) if word in set(words_of(texts))}
        if not truth:
            continue
        judged += 1
        top1 += int(top[row, 0]) in truth
        top5 += bool(truth & set(top[row].tolist()))
        chance += len(truth) / len(words)
    if judged == 0:
        return {"words": len(words), "images": 0}
    return {
        "words": len(words),
        "examples": words[:12],
        "images": judged,
        "top1": top1 / judged,
        "top5": top5 / judged,
        "chance_top1": chance / judged,
    }


@torch.no_grad()
def sample_figures(
    generated: dict[str, torch.Tensor],
    prompts: list[str],
    judge: Any,
    seed: int,
    training_codes: torch.Tensor,
    real: torch.Tensor | None = None,
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """R-precision, diversity, distinct grids and copies of one prompt set's samples (P, n), judged by `judge`."""
    judge_model, _, judge_tokenizer = judge
    images, codes, scores = generated["images"], generated["codes"], generated["scores"]
    P, n = scores.shape
    kept = generated["kept"]  # (P,) the sample the run's own CLIP keeps
    rows = torch.arange(P)
    features = encode_images(judge_model, images.flatten(0, 1)).view(P, n, -1)  # (P, n, D)
    prompt_features = encode_texts(judge_model, judge_tokenizer, prompts)  # (P, D)
    similarity = features.flatten(0, 1) @ prompt_features.T  # (P*n, P)
    truth = rows.repeat_interleave(n)  # (P*n,)
    r = min(R_PRECISION_R, P)
    kept_hits = r_precision_hits(similarity[rows * n + kept], truth[rows * n + kept], r, seed)  # (P,)
    sample_hits = r_precision_hits(similarity, truth, r, seed).view(P, n).double().mean(1)  # (P,)
    diversity = evaluate.within_prompt_diversity(features) if n > 1 else torch.zeros(P, dtype=torch.double)
    distinct = evaluate.distinct_share(codes)  # (P,)
    figures = {
        "prompts": P,
        "samples": n,
        "r": r,
        "r_precision_kept": float(kept_hits.double().mean()),
        "r_precision_per_sample": float(sample_hits.mean()),
        "diversity": float(diversity.mean()),
        "distinct_grids": float(distinct.mean()),
        "copies": evaluate.copy_share(codes.flatten(0, 1), training_codes),
        "truncated_prompts": generated.get("truncated_prompts", 0),
    }
    if real is not None:
        real_features = encode_images(judge_model, real)  # (P, D)
        figures["r_precision_real"] = float(
            r_precision_hits(real_features @ prompt_features.T, rows, r, seed).double().mean()
        )
    per_prompt = {
        "r_precision_kept": kept_hits.double(),
        "r_precision_per_sample": sample_hits,
        "diversity": diversity,
        "distinct_grids": distinct,
    }
    return figures, {"features": features, "kept": kept, "per_prompt": per_prompt}


def fid_figures(val_features: torch.Tensor, kept: torch.Tensor, real_prompt_features: torch.Tensor, real_all):
    rows = torch.arange(len(kept))
    return {
        "label": "FID on CLIP image features",
        "real_images": len(real_all),
        "generated_kept": frechet_distance(val_features[rows, kept], real_all),
        "generated_all_samples": frechet_distance(val_features.flatten(0, 1), real_all),
        "real_prompt_images": frechet_distance(real_prompt_features, real_all),
    }


# ------------------------------------------------------------------------------------------ the whole evaluation


def choose_prompts(captions: list[list[str]], count: int, seed: int) -> list[int]:
    """Indices of up to `count` images whose first captions differ, drawn with a seeded generator, in drawn order."""
    order = np.random.default_rng(seed).permutation(len(captions))
    chosen, seen = [], set()
    for index in order.tolist():
        if captions[index][0] not in seen:
            seen.add(captions[index][0])
            chosen.append(index)
        if len(chosen) == count:
            break
    return chosen


def evaluate_collection(
    out: str | Path,
    *,
    train_data: str | Path,
    val_data: str | Path | None = None,
    val_fraction: float = 0.0,
    clip: str | Path,
    judge: str | Path | None = None,
    prompts: int = 100,
    samples: int = 8,
    seed: int = 0,
    sampling: dict[str, Any] | None = None,
    weights: str = "best",
    progress: bool = True,
) -> dict[str, Any]:
    """Every figure of a collection run (see DEFINITIONS) from OUT/dalle (its dVAE and tokenizer) and the CLIP at
    `clip`, on the held-out split: `val_data`, or the `val_fraction` hash hold-out of `train_data`. Writes
    OUT/eval/gallery.png and returns the JSON-ready metrics."""
    from tqdm import tqdm

    out = Path(out)
    started = time.perf_counter()
    timings: dict[str, float] = {}
    clock = [started]

    def lap(name: str) -> None:
        now = time.perf_counter()
        timings[name] = round(now - clock[0], 1)
        clock[0] = now

    if prompts < 2 or samples < 1:
        raise ValueError(
            f"evaluate_collection: needs 2 or more prompts and 1 or more samples, got {prompts}, {samples}"
        )
    model, vae, tokenizer = checkpoint.load_dalle(out / "dalle", which=weights)
    own = pretrained.load(clip, which=weights)
    judge_bundle = pretrained.load(judge) if judge is not None else own
    size = vae.config.image_size
    if val_data is not None:
        val_images, val_captions = read_split(val_data, size)
        train_images, train_captions = read_split(train_data, size, limit=TRAINING_IMAGES)
    else:
        val_images, val_captions = read_split(train_data, size, "val", val_fraction)
        train_images, train_captions = read_split(train_data, size, "train", val_fraction, limit=TRAINING_IMAGES)
    lap("load models and images")

    matched = min(len(val_images), len(train_images))  # CLIP's loss over N pairs grows with N: compare like sizes
    losses_val = loss_figures(model, vae, tokenizer, own, val_images, [c[0] for c in val_captions])
    losses_train = loss_figures(
        model, vae, tokenizer, own, train_images[:matched], [c[0] for c in train_captions[:matched]]
    )
    train_codes = encode_codes(vae, train_images)  # (N, h*w): what a copy of a training image would be
    words = caption_words(train_captions)
    zero_shot = zero_shot_figures(own, val_images, val_captions, words) if words else {"words": 0, "images": 0}
    lap("losses, retrieval, zero-shot")

    sampling = dict(sampling or {})
    chosen = {
        "train": choose_prompts(train_captions, prompts, seed),
        "val": choose_prompts(val_captions, prompts, seed + 1),
    }
    texts = {
        "train": [train_captions[index][0] for index in chosen["train"]],
        "val": [val_captions[index][0] for index in chosen["val"]],
    }
    real = {"train": train_images[chosen["train"]], "val": val_images[chosen["val"]]}
    bar = tqdm(
        total=samples * sum(map(len, texts.values())), desc="evaluation samples", unit="img", disable=not progress
    )
    generated = {}
    for offset, split in enumerate(("train", "val")):
        base = seed * 10_000_000 + offset * 1_000_000
        generated[split] = sample_prompts(model, vae, tokenizer, own, texts[split], samples, base, sampling, bar)
    bar.close()
    lap("generation")

    generation, tensors = {}, {}
    for split in ("train", "val"):
        generation[split], tensors[split] = sample_figures(
            generated[split], texts[split], judge_bundle, seed, train_codes, real[split]
        )
    own_generation = None
    if judge is not None:  # the run's own CLIP's view too, as a user of this run would measure
        own_generation = {
            split: sample_figures(generated[split], texts[split], own, seed, train_codes, real[split])[0]
            for split in ("train", "val")
        }
    real_val_features = encode_images(judge_bundle[0], val_images)
    fid = fid_figures(
        tensors["val"]["features"],
        tensors["val"]["kept"],
        encode_images(judge_bundle[0], real["val"]),
        real_val_features,
    )
    lap("R-precision, diversity, FID")

    eval_dir = out / "eval"
    eval_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for split, label in (("train", "training caption"), ("val", "held-out caption")):
        for index in range(min(GALLERY_ROWS, len(texts[split]))):
            shown = generated[split]["scores"][index][:GALLERY_SAMPLES]
            kept = int(generated[split]["kept"][index])
            rows.append(
                {
                    "title": f"{label}: {texts[split][index]}",
                    "images": torch.cat(
                        [real[split][index : index + 1], generated[split]["images"][index][: len(shown)]]
                    ),
                    "labels": ["real"] + [f"{float(score):.3f}" for score in shown],
                    "marked": [False] + [column == kept for column in range(len(shown))],
                }
            )
    checkpoint.atomic_write(eval_dir / "gallery.png", lambda tmp: contact_sheet(rows).save(tmp, format="PNG"))
    lap("gallery")
    timings["total"] = round(time.perf_counter() - started, 1)
    per_prompt = {split: {k: v.tolist() for k, v in tensors[split]["per_prompt"].items()} for split in tensors}
    return {
        "kind": "collection",
        "settings": {
            "prompts_per_set": prompts,
            "samples_per_prompt": samples,
            "seed": seed,
            "sampling": sampling,
            "generation_batch": GENERATION_BATCH,
            "image_size": size,
            "weights": weights,
            "clip": str(clip),
            "judge": str(judge) if judge is not None else "the run's own CLIP",
            "held_out_images": len(val_images),
            "training_images_read": len(train_images),
        },
        "definitions": DEFINITIONS,
        "losses": {"held_out": losses_val, "training": losses_train},
        "zero_shot": zero_shot,
        "generation": generation,
        "generation_own_clip": own_generation,
        "fid": fid,
        "per_prompt": per_prompt,
        "prompts": texts,
        "gallery": {"picture": "eval/gallery.png", "rows": [row["title"] for row in rows]},
        "timings_s": timings,
    }


# ------------------------------------------------------------------------------------------ two runs side by side


HEADLINE = (
    ("held-out DALL·E loss (nats/token)", ("losses", "held_out", "dalle", "loss"), "lower"),
    ("held-out CLIP loss", ("losses", "held_out", "clip", "loss"), "lower"),
    ("held-out CLIP text->image R@1", ("losses", "held_out", "clip", "text_to_image_r1"), "higher"),
    ("held-out dVAE PSNR (dB)", ("losses", "held_out", "dvae_psnr"), "higher"),
    ("held-out captions: R-precision, kept", ("generation", "val", "r_precision_kept"), "higher"),
    ("held-out captions: R-precision, per sample", ("generation", "val", "r_precision_per_sample"), "higher"),
    ("held-out captions: diversity", ("generation", "val", "diversity"), "higher"),
    ("held-out captions: distinct grids", ("generation", "val", "distinct_grids"), "higher"),
    ("training captions: R-precision, kept", ("generation", "train", "r_precision_kept"), "higher"),
    ("training captions: diversity", ("generation", "train", "diversity"), "higher"),
    ("training captions: copies of training codes", ("generation", "train", "copies"), "lower"),
    ("held-out FID on CLIP features, kept", ("fid", "generated_kept"), "lower"),
)
PAIRED = {  # headline rows with per-prompt values, compared with paired bootstrap intervals
    ("generation", "val", "r_precision_kept"): ("val", "r_precision_kept"),
    ("generation", "val", "r_precision_per_sample"): ("val", "r_precision_per_sample"),
    ("generation", "val", "diversity"): ("val", "diversity"),
    ("generation", "val", "distinct_grids"): ("val", "distinct_grids"),
    ("generation", "train", "r_precision_kept"): ("train", "r_precision_kept"),
    ("generation", "train", "diversity"): ("train", "diversity"),
}


def _at(values: dict[str, Any], path: tuple[str, ...]) -> Any:
    for key in path:
        if not isinstance(values, dict) or key not in values:
            return None
        values = values[key]
    return values


def compare(metrics: dict[str, Any], baseline: dict[str, Any], seed: int = 0) -> list[dict[str, Any]]:
    """Rows {"figure", "run", "baseline", "difference", "interval", "better"}: this run against another on the same
    split. Per-prompt figures get a 95 % paired bootstrap interval of the difference (when both runs sampled the same
    prompts); "better" is True/False when the interval (or, without one, the difference) is wholly on one side."""
    rows = []
    same_prompts = metrics.get("prompts") == baseline.get("prompts")
    for label, path, direction in HEADLINE:
        mine, theirs = _at(metrics, path), _at(baseline, path)
        if mine is None or theirs is None:
            continue
        interval = None
        if path in PAIRED and same_prompts:
            split, name = PAIRED[path]
            a = torch.tensor(metrics["per_prompt"][split][name], dtype=torch.double)
            b = torch.tensor(baseline["per_prompt"][split][name], dtype=torch.double)
            if len(a) == len(b) and len(a) > 1:
                interval = bootstrap_interval(lambda r, a=a, b=b: (a[r] - b[r]).mean(1), len(a), seed)
        sign = 1 if direction == "higher" else -1
        if interval is not None:
            better = (
                True
                if sign * interval[0] > 0 and sign * interval[1] > 0
                else False
                if sign * interval[0] < 0 and sign * interval[1] < 0
                else None
            )
        else:
            better = (sign * (mine - theirs) > 0) if mine != theirs else None
        rows.append(
            {
                "figure": label,
                "run": mine,
                "baseline": theirs,
                "difference": mine - theirs,
                "interval": interval,
                "direction": direction,
                "better": better,
            }
        )
    return rows


def log(message: str) -> None:
    print(f"evaluation: {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------ the dVAE stage


@torch.no_grad()
def evaluate_tokenizer(
    vae_dir: Path,
    data: str | Path,
    image_size: int,
    *,
    holdout: str | None = None,
    val_fraction: float = 0.0,
    judge: Any = None,
    batch_size: int = 256,
) -> dict[str, Any]:
    """Round-trips every held-out image (all of `data`, or its `holdout="val"` share) through the dVAE: PSNR, codes
    used, perplexity; VAE_DIR/reconstructions.png shows 32 pairs. `judge(keys, reconstructions)` -> the number it
    accepts, reported as `colour_accuracy` (the icons' colour judge)."""
    from ..models.dvae import perplexity, psnr
    from ..transforms import make_grid, save_image

    model = checkpoint.load_model(vae_dir, expect="dvae")
    stream = SampleStream(
        open_source(data, captions="none"),
        image_size=image_size,
        batch_size=batch_size,
        shuffle=False,
        infinite=False,
        holdout=holdout,
        val_fraction=val_fraction,
    )
    right, total, psnr_sum = 0, 0, 0.0
    usage = torch.zeros(model.config.vocab_size)
    shown: list[torch.Tensor] = []
    for batch in make_loader(stream, num_workers=1):
        images = batch["images"]
        if not len(images):
            continue
        codes = model.encode(images)
        reconstructions = model.decode(codes)
        usage += torch.bincount(codes.flatten(), minlength=usage.numel()).float()
        psnr_sum += float(psnr(reconstructions, images).sum())
        if judge is not None:
            right += judge(batch["keys"], reconstructions)
        total += len(images)
        if len(shown) < 2:
            shown.append(torch.stack([images[:16], reconstructions[:16]], 1).flatten(0, 1))  # (32, 3, H, W) pairs
    if total == 0:
        raise ValueError(f"{data}: no held-out images to evaluate the dVAE on")
    save_image(make_grid(torch.cat(shown), n_col=16), vae_dir / "reconstructions.png")
    results = {
        "images": total,
        "psnr": psnr_sum / total,
        "codes_used": int((usage > 0).sum()),
        "vocab_size": model.config.vocab_size,
        "perplexity": perplexity(usage),
    }
    if judge is not None:
        results["colour_accuracy"] = right / total
    return results
