"""Validation metrics of the models and the pictures that show them, CLIP's linear probe, and caption BLEU.

Every `*_metrics(model, batches)` takes the validation batches the training loop decoded once (dicts with
"images", "text", "codes" as the model needs) and returns a dict of floats; given no batches, each raises a
ValueError. The pictures are images (3, H, W) in [0, 1] that the training loop saves beside the metrics.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .models import captioner, dalle, dvae
from .models.clip import contrastive_loss, siglip_loss
from .pretrained import load
from .runtime import eval_mode, unwrap
from .transforms import colour_ramp, make_grid, resize_images
from .zero_shot import classify, encode_images, label_features

PICTURE_IMAGES = 8  # images shown in a dVAE reconstruction picture
HEAT_MAP_TEXTS = 32  # images and texts shown in a CLIP similarity picture
# Viridis-like colour stops (dark blue -> teal -> yellow): readable in colour and in greyscale.
HEAT_COLOURS = torch.tensor([[0.267, 0.005, 0.329], [0.128, 0.567, 0.551], [0.993, 0.906, 0.144]])


def _batch_size(batch: dict) -> int:
    return next(len(value) for value in batch.values() if isinstance(value, (torch.Tensor, list)))


def _nonempty(batches: list[dict], what: str) -> list[dict]:
    batches = [batch for batch in batches if _batch_size(batch) > 0]
    if not batches:
        raise ValueError(f"{what}: got no validation batches")
    return batches


# ------------------------------------------------------------------------------------------ retrieval pictures


def recall_at(similarity: torch.Tensor, k: int) -> float:
    """Share of rows whose matching column (the diagonal) is among their k most similar columns."""
    k = min(k, similarity.shape[1])
    top = similarity.topk(k, dim=1).indices  # (N, k)
    targets = torch.arange(similarity.shape[0], device=similarity.device).unsqueeze(1)  # (N, 1)
    return (top == targets).any(dim=1).float().mean().item()


def heat_map(values: torch.Tensor, cell: int = 8) -> torch.Tensor:
    """Matrix (N, M) -> image (3, N * cell, M * cell) in [0, 1], low values dark blue, high values yellow."""
    values = values.detach().float().cpu()
    low, high = values.min(), values.max()
    colours = colour_ramp((values - low) / (high - low).clamp_min(1e-8), HEAT_COLOURS)  # (N, M, 3)
    image = colours.permute(2, 0, 1)  # (3, N, M)
    return image.repeat_interleave(cell, dim=1).repeat_interleave(cell, dim=2).clamp(0, 1)  # (3, N*cell, M*cell)


# ------------------------------------------------------------------------------------------ dVAE


@torch.no_grad()
def vae_metrics(model: nn.Module, batches: list[dict]) -> dict[str, float]:
    """With hard codes (as users decode): "psnr" (dB, mean over images, on clamped reconstructions),
    "perplexity" and "codes_used" of the code histogram over all batches, and "loss" (the quantizer term at its
    final weight)."""
    batches = _nonempty(batches, "vae_metrics")
    with eval_mode(model) as model:
        config: dvae.DVAEConfig = model.config
        counts = torch.zeros(config.vocab_size, dtype=torch.long)
        psnr_sum, loss_sum, n_images = 0.0, 0.0, 0
        for batch in batches:
            images = batch["images"]
            output = model(images)
            loss_sum += float(dvae.loss(output, images, config, progress=1.0))
            psnr_sum += float(dvae.psnr(output.reconstruction, images).sum())
            counts += torch.bincount(output.codes.flatten().cpu(), minlength=config.vocab_size)  # (K,)
            n_images += len(images)
    return {
        "loss": loss_sum / len(batches),
        "psnr": psnr_sum / n_images,
        "perplexity": dvae.perplexity(counts),
        "codes_used": float((counts > 0).sum()),
    }


@torch.no_grad()
def vae_picture(model: nn.Module, batches: list[dict], count: int = PICTURE_IMAGES) -> torch.Tensor:
    """The first `count` validation images above their reconstructions from hard codes."""
    images = torch.cat([batch["images"] for batch in _nonempty(batches, "vae_picture")])[:count]
    with eval_mode(model) as model:
        reconstructions = model.decode(model.encode(images))
    return make_grid(torch.cat([images.cpu(), reconstructions.cpu()]), n_col=len(images))


# ------------------------------------------------------------------------------------------ CLIP


@torch.no_grad()
def clip_features(model: nn.Module, batches: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """(image_features, text_features), each (N, D) float, of all validation pairs; images of another size than
    the model's input are resized (`transforms.resize_images`), as for a pretrained CLIP on a collection's own."""
    batches = _nonempty(batches, "clip_features")
    with eval_mode(model) as model:
        size = unwrap(model).config.image_size
        image_features = torch.cat([model.encode_image(resize_images(batch["images"], size)) for batch in batches])
        image_features = image_features.float()
        text_features = torch.cat([model.encode_text(batch["text"]) for batch in batches]).float()
    return image_features, text_features


@torch.no_grad()
def clip_metrics(model: nn.Module, batches: list[dict]) -> dict[str, float]:
    """Retrieval over all pairs together: recall@1/5 image->text and text->image, and the loss."""
    image_features, text_features = clip_features(model, batches)
    model = unwrap(model)
    scale = model.logit_scale.exp().float()
    if model.config.loss == "siglip":
        loss = siglip_loss(image_features, text_features, scale, model.logit_bias.float())
    else:
        loss = contrastive_loss(image_features, text_features, scale)
    similarity = image_features @ text_features.t()  # (N, N)
    return {
        "loss": loss.item(),
        "image_to_text_r1": recall_at(similarity, 1),
        "image_to_text_r5": recall_at(similarity, 5),
        "text_to_image_r1": recall_at(similarity.t(), 1),
        "text_to_image_r5": recall_at(similarity.t(), 5),
    }


@torch.no_grad()
def clip_picture(model: nn.Module, batches: list[dict], count: int = HEAT_MAP_TEXTS) -> torch.Tensor:
    """The first `count` images' probabilities over the first `count` texts (rows: images; the diagonal should
    light up)."""
    image_features, text_features = clip_features(model, batches)
    model = unwrap(model)
    shown = min(count, len(image_features))
    logits = model.logit_scale.exp().float() * image_features[:shown] @ text_features[:shown].t()  # (n, n)
    if model.config.loss == "siglip":
        probabilities = (logits + model.logit_bias.float()).sigmoid()
    else:
        probabilities = logits.softmax(dim=1)
    return heat_map(probabilities, cell=max(4, 256 // shown))


def caption_zero_shot_accuracy(model: nn.Module, batches: list[dict], tokenizer: Any) -> float:
    """Zero-shot classification with the validation captions as the label set: an image is right when its own
    caption (or an identical one) gets the highest probability."""
    batches = _nonempty(batches, "caption_zero_shot_accuracy")
    captions = [caption for batch in batches for caption in batch["captions"]]
    labels = sorted(set(captions))
    images = torch.cat([batch["images"] for batch in batches])
    predicted = classify(model, images, labels, tokenizer).argmax(dim=1).tolist()
    return sum(labels[index] == caption for index, caption in zip(predicted, captions)) / len(captions)


# ------------------------------------------------------------------------------------------ DALL·E


@torch.no_grad()
def dalle_metrics(model: nn.Module, batches: list[dict]) -> dict[str, float]:
    """Validation losses averaged over the tokens of all batches, without caption dropout: "loss", "text_loss",
    "image_loss" (nats per token) and "image_bits" (bits per image token)."""
    batches = _nonempty(batches, "dalle_metrics")
    with eval_mode(model) as model:
        config = model.config
        totals = {"text": 0.0, "image": 0.0}
        counts = {"text": 0, "image": 0}
        for batch in batches:
            text, codes = batch["text"], batch["codes"]
            text_loss, image_loss = dalle.losses(model, text, codes)
            totals["text"] += float(text_loss) * text.shape[0] * (config.text_length - 1)
            totals["image"] += float(image_loss) * codes.shape[0] * config.image_length
            counts["text"] += text.shape[0] * (config.text_length - 1)
            counts["image"] += codes.shape[0] * config.image_length
    text_loss, image_loss = totals["text"] / counts["text"], totals["image"] / counts["image"]
    loss = dalle.weighted_loss(text_loss, image_loss, config.text_loss_weight, config.image_loss_weight)
    return {
        "loss": loss,
        "text_loss": text_loss,
        "image_loss": image_loss,
        "image_bits": dalle.nats_to_bits(image_loss),
    }


@torch.no_grad()
def captioner_metrics(model: nn.Module, batches: list[dict]) -> dict[str, float]:
    """Validation caption loss (nats per caption token, <eos> included) averaged over all batches' tokens, and its
    perplexity."""
    batches = _nonempty(batches, "captioner_metrics")
    total, count = 0.0, 0
    with eval_mode(model) as model:
        for batch in batches:
            tokens = int((batch["text"][:, 1:] != captioner.PAD_ID).sum())
            total += float(captioner.loss(model, batch["codes"], batch["text"])) * tokens
            count += tokens
    loss = total / max(1, count)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}


# ------------------------------------------------------------------------------------------ caption metrics


def _ngrams(words: list[str], n: int) -> Counter:
    return Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))


def corpus_bleu(hypotheses: list[str], references: list[list[str]], max_n: int = 4) -> float:
    """Corpus BLEU-max_n (Papineni et al. 2002) in [0, 1]: clipped n-gram precisions of all hypotheses pooled,
    their geometric mean, times the brevity penalty against the closest reference length. Lower-cased words split on
    whitespace; no smoothing (one n-gram order without a match gives 0, as in the paper)."""
    if len(hypotheses) != len(references) or not hypotheses:
        raise ValueError(f"corpus_bleu: {len(hypotheses)} hypotheses for {len(references)} reference lists")
    matches, totals = [0] * max_n, [0] * max_n
    hypothesis_length, reference_length = 0, 0
    for hypothesis, refs in zip(hypotheses, references):
        words = hypothesis.lower().split()
        ref_words = [ref.lower().split() for ref in refs]
        hypothesis_length += len(words)
        reference_length += min((abs(len(ref) - len(words)), len(ref)) for ref in ref_words)[1]
        for n in range(1, max_n + 1):
            counts = _ngrams(words, n)
            most = Counter()
            for ref in ref_words:
                most |= _ngrams(ref, n)
            matches[n - 1] += sum(min(count, most[gram]) for gram, count in counts.items())
            totals[n - 1] += max(0, len(words) - n + 1)
    if min(matches) == 0:
        return 0.0
    log_precision = sum(math.log(match / total) for match, total in zip(matches, totals)) / max_n
    brevity = (
        1.0 if hypothesis_length > reference_length else math.exp(1 - reference_length / max(1, hypothesis_length))
    )
    return brevity * math.exp(log_precision)


def cider_d(hypotheses: list[str], references: list[list[str]], max_n: int = 4, sigma: float = 6.0) -> float:
    """Corpus CIDEr-D (Vedantam et al. 2015, as coco-caption computes it): per n-gram order, the cosine of TF-IDF
    vectors with the hypothesis's counts clipped to the reference's and a Gaussian penalty on the length
    difference, averaged over orders and references, times 10; the IDF comes from the references of the corpus.
    Unlike BLEU it weighs words by rarity, so a right rare word (an icon's name) counts more than "a" or "icon"."""
    if len(hypotheses) != len(references) or not hypotheses:
        raise ValueError(f"cider_d: {len(hypotheses)} hypotheses for {len(references)} reference lists")

    def counts(text: str) -> list[Counter]:
        words = text.lower().split()
        return [_ngrams(words, n) for n in range(1, max_n + 1)]

    reference_counts = [[counts(ref) for ref in refs] for refs in references]
    frequency: Counter = Counter()  # n-gram -> images whose references hold it
    for refs in reference_counts:
        frequency.update({gram for ref in refs for order in ref for gram in order})
    log_images = math.log(float(len(references)))

    def vector(grams: list[Counter]) -> tuple[list[dict], list[float], int]:
        weights = [
            {g: c * (log_images - math.log(max(1.0, frequency[g]))) for g, c in order.items()} for order in grams
        ]
        norms = [math.sqrt(sum(value * value for value in order.values())) for order in weights]
        return weights, norms, sum(grams[0].values())

    total = 0.0
    for hypothesis, refs in zip(hypotheses, reference_counts):
        hyp, hyp_norms, hyp_length = vector(counts(hypothesis))
        score = 0.0
        for ref_grams in refs:
            ref, ref_norms, ref_length = vector(ref_grams)
            penalty = math.exp(-((hyp_length - ref_length) ** 2) / (2 * sigma**2))
            for n in range(max_n):
                dot = sum(min(value, ref[n].get(g, 0.0)) * ref[n].get(g, 0.0) for g, value in hyp[n].items())
                if hyp_norms[n] and ref_norms[n]:
                    score += penalty * dot / (hyp_norms[n] * ref_norms[n]) / max_n
        total += 10.0 * score / len(refs)
    return total / len(hypotheses)


# ------------------------------------------------------------------------------------------ generated samples


def within_prompt_diversity(features: torch.Tensor) -> torch.Tensor:
    """L2-normalised image features (P, n, D) of the n samples of each of P prompts -> (P,) their mean pairwise
    cosine distance (1 - cosine over the n(n-1) ordered pairs): 0 when a prompt's samples are one image again and
    again, larger the more they differ (CLIP image features of unrelated images are typically 0.3-0.8 apart)."""
    if features.dim() != 3 or features.shape[1] < 2:
        raise ValueError(f"within_prompt_diversity: expected features (P, n >= 2, D), got {tuple(features.shape)}")
    n = features.shape[1]
    features = features.double()
    similarity = features @ features.transpose(1, 2)  # (P, n, n)
    off_diagonal = similarity.sum((1, 2)) - similarity.diagonal(dim1=1, dim2=2).sum(1)  # (P,)
    return 1 - off_diagonal / (n * (n - 1))


def distinct_share(codes: torch.Tensor) -> torch.Tensor:
    """Code grids (P, n, ...) of the n samples of each of P prompts -> (P,) the share of distinct grids among them
    (1 / n when every sample is the same grid, 1 when all differ)."""
    grids = codes.reshape(codes.shape[0], codes.shape[1], -1)  # (P, n, h*w)
    return torch.tensor([len({tuple(row) for row in prompt.tolist()}) / grids.shape[1] for prompt in grids]).double()


def copy_share(codes: torch.Tensor, training_codes: torch.Tensor) -> float:
    """The share of code grids (M, ...) equal to one of the training images' grids (K, ...): samples that copy a
    training image code for code."""
    known = {bytes(row) for row in training_codes.reshape(len(training_codes), -1).to(torch.int16).numpy()}
    rows = codes.reshape(len(codes), -1).to(torch.int16).numpy()
    return sum(bytes(row) in known for row in rows) / max(1, len(rows))


# ------------------------------------------------------------------------------------------ linear probe


@torch.no_grad()
def linear_probe(
    clip_run: str | Path,
    data: str | Path,
    *,
    val_data: str | Path | None = None,
    val_fraction: float = 0.2,
    batch_size: int = 256,
    device: str = "cpu",
) -> dict[str, Any]:
    """Logistic regression (scikit-learn) on frozen CLIP image features of a labelled set, beside zero-shot
    accuracy with the class names as prompts. Without `val_data`, a stable hash of each sample's key holds out
    `val_fraction` for testing."""
    from sklearn.linear_model import LogisticRegression

    from .data.sources import is_validation, open_labelled
    from .transforms import BadImage

    model, preprocess, tokenizer = load(clip_run, device=device)
    skipped = 0

    def features(path: str | Path, holdout: str | None) -> tuple[torch.Tensor, list[str]]:
        nonlocal skipped
        rows, labels, images = [], [], []
        for record in open_labelled(path):
            if holdout is not None and is_validation(record.key, val_fraction) != (holdout == "val"):
                continue
            try:
                images.append(
                    preprocess(record.path if record.path is not None else record.read_bytes(), name=record.name)
                )
            except BadImage:
                skipped += 1
                continue
            labels.append(record.label)
            if len(images) == batch_size:
                rows.append(encode_images(model, torch.stack(images)).cpu())
                images = []
        if images:
            rows.append(encode_images(model, torch.stack(images)).cpu())
        if not rows:
            raise ValueError(f"{path}: no labelled images in the {holdout or 'given'} split")
        return torch.cat(rows), labels

    train_features, train_labels = features(data, "train" if val_data is None else None)
    test_features, test_labels = features(val_data or data, "val" if val_data is None else None)
    classes = sorted(set(train_labels) | set(test_labels))
    if len(set(train_labels)) < 2:
        raise ValueError(f"{data}: a linear probe needs at least two classes in the training split")
    probe = LogisticRegression(max_iter=2000, C=1.0).fit(train_features.numpy(), train_labels)
    probe_accuracy = float((probe.predict(test_features.numpy()) == test_labels).mean())
    text_features = label_features(model, classes, tokenizer).cpu()
    predicted = (test_features @ text_features.T).argmax(dim=1).tolist()
    zero_shot = sum(classes[index] == label for index, label in zip(predicted, test_labels)) / len(test_labels)
    return {
        "classes": len(classes),
        "train_images": len(train_labels),
        "test_images": len(test_labels),
        "linear_probe_accuracy": probe_accuracy,
        "zero_shot_accuracy": zero_shot,
        "chance": 1 / len(classes),
        "skipped_images": skipped,
    }
