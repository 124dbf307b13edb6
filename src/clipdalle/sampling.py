"""Sampling from the DALL·E transformer: text to images, region editing (inpainting) and variations.

The caption goes through the transformer once, then the codes are decoded one position per step with a
preallocated key/value cache per layer (clipdalle.layers.KVCache), many prompts and samples in one batch.
Each step's logits over the image codebook pass through pure filters (temperature, top-k, top-p) and a code
is drawn by the Gumbel-max trick from noise that comes from one random generator per sample, so a sample
depends only on its seed: `Generation.seeds[i]` regenerates image i on its own (`n=1, seed=seeds[i]`).

Classifier-free guidance (Ho & Salimans 2022; for DALL·E, Crowson): the conditional streams and as many
unconditional ones (the empty caption, which caption dropout trained) run in one batch of 2B rows, each row
with its own cache rows, and sampling uses uncond + cond_scale * (cond - uncond); cond_scale 1 skips the
unconditional half and is plain sampling.

Ranking: with a CLIP bundle every sample is scored by CLIP similarity with its prompt, else by the model's
log-likelihood of its codes (nats, under the conditional model at temperature 1 without filters), and the best
`keep` per prompt are returned, best first. With `shortlist` > 1, CLIP's `shortlist` x `keep` best are candidates
and the `keep` most typical of them are returned: those whose CLIP image features agree most, on average, with the
prompt's other samples (minimum Bayes risk selection; Kumar & Byrne 2004). CLIP's single best is sometimes an
outlier whose score is a fluke; RESULTS.md ("The demo") measures what this choice changes.

Region editing (DALL·E paper, figure 2): the codes of the cells overlapping the region are resampled in raster
order while all other codes are fed as given, so the new content is consistent with the image after the region
too when ranked by the likelihood of the whole sequence; the output keeps the original pixels outside the
region exactly and blends the decoded pixels in over a few pixels inside its border.
"""

from __future__ import annotations

import math
import secrets
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .models.dalle import DALLE, PAD_ID, empty_captions
from .models.decoding import ImageStep
from .runtime import device_of, eval_mode, unwrap
from .transforms import load_image
from .zero_shot import encode_images, encode_texts

SAMPLING_SETTINGS = ("temperature", "top_k", "top_p", "cond_scale", "shortlist")  # the keywords a preset or served
# folder may set for generate()/inpaint()/variations() (`check_sampling_settings`)
DEFAULT_BATCH_SIZE = 64  # samples per forward pass (x2 rows with guidance); 64 keeps 2 CPU cores busy
NOISE_CHUNK_ELEMENTS = 1 << 16  # per sample, noise is drawn for this many logits at once (256 KiB of floats)

ShouldStop = Callable[[], bool] | None  # asked between sampling steps and batches; True stops the work


class GenerationStopped(Exception):
    """`should_stop()` said True: the caller no longer wants the samples (e.g. a server's client left)."""


def _check_stop(should_stop: ShouldStop) -> None:
    if should_stop is not None and should_stop():
        raise GenerationStopped("generation stopped: should_stop() returned True")


@dataclass
class Generation:
    """Samples, best first within each prompt; prompts in the order given. M = prompts x keep."""

    images: torch.Tensor  # (M, 3, H, W) in [0, 1]
    codes: torch.Tensor  # (M, h, w) dVAE codes the images were decoded from
    prompts: list[str]  # the prompt of each sample, as given (before truncation)
    seeds: list[int]  # the seed of each sample: n=1 with this seed regenerates it
    log_likelihood: torch.Tensor  # (M,) log p(codes | caption) in nats over the image tokens
    clip_scores: torch.Tensor | None  # (M,) CLIP cosine similarity with the prompt, or None without CLIP
    clip_features: torch.Tensor | None = None  # (M, D) the images' L2-normalised CLIP features, or None without CLIP


# ------------------------------------------------------------------------------------------ pure filters


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """logits / temperature (temperature > 0); below 1 sharpens, above 1 flattens. 0 means greedy: see
    `choose_codes`."""
    if temperature <= 0:
        raise ValueError(f"apply_temperature: temperature must be > 0, got {temperature} (0 is greedy decoding)")
    return logits if temperature == 1 else logits / temperature


def top_k_filter(logits: torch.Tensor, k: int | None) -> torch.Tensor:
    """Keeps the k largest logits of each row (ties at the k-th value are kept), sets the rest to -inf.
    k counts image codes: k >= the vocabulary keeps everything."""
    if k is None or k >= logits.shape[-1]:
        return logits
    if k < 1:
        raise ValueError(f"top_k must be at least 1, got {k}")
    threshold = logits.topk(k, dim=-1).values[..., -1:]  # (..., 1)
    return logits.masked_fill(logits < threshold, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float | None) -> torch.Tensor:
    """Nucleus filter (Holtzman et al. 2020): keeps the smallest set of most likely codes whose probability
    reaches p, always at least the most likely one; sets the rest to -inf."""
    if p is None or p >= 1:
        return logits
    if not 0 < p:
        raise ValueError(f"top_p must be in (0, 1], got {p}")
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probabilities = sorted_logits.softmax(dim=-1)
    mass_before = probabilities.cumsum(dim=-1) - probabilities  # probability of the more likely codes
    drop_sorted = mass_before >= p
    drop = drop_sorted.scatter(-1, order, drop_sorted)  # back to vocabulary order
    return logits.masked_fill(drop, float("-inf"))


def guided_logits(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance: uncond + scale * (cond - uncond); scale 1 gives cond, 0 the unconditional."""
    return uncond + scale * (cond - uncond)


def gumbel_noise(uniform: torch.Tensor) -> torch.Tensor:
    """-log(-log(u)) for u uniform in [0, 1): argmax(logits + noise) samples from softmax(logits)."""
    return -torch.log(-torch.log(uniform.clamp(min=torch.finfo(uniform.dtype).tiny)))


def code_log_probs(logits: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """log p(code) under softmax(logits): logits (..., V), codes (...) -> (...), in fp32 whatever the logits' dtype
    (a sum of 256 bf16 log-probabilities would carry bf16's rounding into the ranking)."""
    return logits.float().log_softmax(-1).gather(-1, codes[..., None])[..., 0]


def choose_codes(
    logits: torch.Tensor,
    noise: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
) -> torch.Tensor:
    """Draws one code per row of logits (B, V) with Gumbel noise (B, V): temperature, then top-k, then top-p,
    then argmax(logits + noise). temperature 0 is greedy: the most likely code, noise unused."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = top_p_filter(top_k_filter(apply_temperature(logits, temperature), top_k), top_p)
    return (logits + noise).argmax(dim=-1)


# ------------------------------------------------------------------------------------------ noise per sample


class SampleNoise:
    """Gumbel noise (B, V) for each of `length` code indices, from one generator per sample seeded with its seed,
    so a sample's draws do not depend on the batch it runs in. Indices must be asked in increasing order.

    The generators are CPU generators on every device, so a seed gives the same noise on a GPU as on the CPU;
    the uniform draws travel to `device` and the logarithms run there."""

    def __init__(self, seeds: Sequence[int], vocab_size: int, length: int, device: torch.device | str = "cpu"):
        self.generators = [torch.Generator().manual_seed(int(seed)) for seed in seeds]
        self.vocab_size = vocab_size
        self.device = device
        self.chunk = min(length, max(1, NOISE_CHUNK_ELEMENTS // vocab_size))  # code indices per draw
        self.loaded = -1  # index of the chunk in `block`
        self.block: torch.Tensor | None = None  # (B, chunk, V)

    def at(self, index: int) -> torch.Tensor:
        """Noise (B, V) for code index `index`."""
        wanted = index // self.chunk
        if wanted < self.loaded:
            raise ValueError(f"SampleNoise: index {index} asked after a later chunk was drawn")
        while self.loaded < wanted:  # skipped chunks are drawn too: each sample's stream stays aligned to its seed
            uniform = torch.stack([torch.rand(self.chunk, self.vocab_size, generator=g) for g in self.generators])
            self.loaded += 1
            self.block = gumbel_noise(uniform.to(self.device)) if self.loaded == wanted else None  # (B, chunk, V)
        return self.block[:, index % self.chunk]


# ------------------------------------------------------------------------------------------ incremental decoding


class Decoder:
    """Incremental decoding of B captions with one preallocated KV cache per layer.

    With guidance (cond_scale != 1) the batch holds B conditional rows and B unconditional rows (the empty
    caption) after them, so each stream has its own cache rows and both run in one forward pass. `start` and
    `extend` return (logits to sample from, conditional logits), each (B, t, V); without guidance both are the
    conditional logits."""

    def __init__(self, model: nn.Module, text: torch.Tensor, cond_scale: float = 1.0):
        self.model: DALLE = unwrap(model)
        self.batch_size = text.shape[0]
        self.cond_scale = cond_scale
        self.guided = cond_scale != 1
        if self.guided:
            unconditional = empty_captions(self.batch_size, self.model.config, text.device)
            text = torch.cat([text, unconditional])  # (2B, T)
        self.text = text
        self.caches = self.model.new_caches()
        self.image_step = ImageStep(self.model)  # one code per row with thin-product weights, copied per decoder

    @torch.no_grad()
    def start(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Feeds the captions and <soi>: logits of code 0, (B, 1, V) twice. A caption that several rows share (n
        samples of a prompt, the unconditional rows of guidance) goes through the transformer once and its keys
        and values are copied to those rows."""
        unique, rows = torch.unique(self.text, dim=0, return_inverse=True)  # (U, T), (R,): row i reads unique[rows[i]]
        if unique.shape[0] == self.text.shape[0]:
            return self._split(self.model.start(self.text, self.caches))
        shared = self.model.new_caches()
        logits = self.model.start(unique, shared)[rows]  # (R, 1, V)
        for cache, source in zip(self.caches, shared):
            cache.fill_from(source, rows)
        return self._split(logits)

    @torch.no_grad()
    def extend(self, codes: torch.Tensor, first: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Feeds codes (B, t) of cells first .. first + t - 1: logits of codes first + 1 .. first + t."""
        if codes.shape[1] == 1:
            logits, cond = self.step(codes[:, 0], first)
            return logits[:, None], cond[:, None]  # (B, 1, V) each
        if self.guided:
            codes = torch.cat([codes, codes])  # (2B, t): the unconditional rows read the same codes
        return self._split(self.model.extend(codes, first, self.caches))

    def step(self, codes: torch.Tensor, cell: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Feeds codes (B,) of cell `cell`: logits of code cell + 1, (B, V) twice (the sampler's inner loop)."""
        if self.guided:
            codes = torch.cat([codes, codes])  # (2B,): the unconditional rows read the same codes
        return self._split(self.image_step(codes, cell, self.caches))

    def _split(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.guided:
            return logits, logits
        cond, uncond = logits[: self.batch_size], logits[self.batch_size :]
        return guided_logits(cond, uncond, self.cond_scale), cond


@torch.no_grad()
def sample_codes(
    model: nn.Module,
    text: torch.Tensor,
    seeds: Sequence[int],
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    cond_scale: float = 1.0,
    given: torch.Tensor | None = None,
    resample: torch.Tensor | None = None,
    should_stop: ShouldStop = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes (B, N) for captions text (B, T), one seed per row, and their log-likelihood (B,) in nats.

    With `resample` (N,) booleans, only those cells are drawn and the others are taken from `given` (B, N);
    runs of given cells are fed in one chunk. The log-likelihood sums log p(code) over all N cells (given ones
    too) under the conditional model, at temperature 1 and without filters. `should_stop()` is asked before each
    step; True raises GenerationStopped."""
    model = unwrap(model)
    N = model.config.image_length
    B = text.shape[0]
    if len(seeds) != B:
        raise ValueError(f"sample_codes: got {len(seeds)} seeds for {B} captions; give one seed per row")
    if resample is not None:
        resample = resample.reshape(-1).bool().cpu()  # (N,)
        if given is None or resample.numel() != N:
            raise ValueError(f"sample_codes: resample must have {N} entries and comes with given codes (B, {N})")
        given = given.reshape(B, N).to(text.device)  # (B, N)
    fixed = [False] * N if resample is None else (~resample).tolist()
    noise = SampleNoise(seeds, model.config.image_vocab_size, N, text.device)
    codes = torch.empty(B, N, dtype=torch.long, device=text.device)
    log_likelihood = torch.zeros(B, device=text.device)
    with torch.inference_mode():  # no autograd bookkeeping on the ~90 small ops per step; outputs are made outside
        decoder = Decoder(model, text, cond_scale)
        logits, cond = (out[:, 0] for out in decoder.start())  # for code 0, (B, V) each
        cell = 0
        while True:
            _check_stop(should_stop)
            end = cell + 1
            if fixed[cell]:
                while end < N and fixed[end]:
                    end += 1
                codes[:, cell:end] = given[:, cell:end]
            else:
                codes[:, cell] = choose_codes(logits, noise.at(cell), temperature, top_k, top_p)
            log_likelihood += code_log_probs(cond, codes[:, cell])
            if end == cell + 1 and end < N:  # one code: the sampler's inner loop
                logits, cond = decoder.step(codes[:, cell], cell)  # for code cell + 1
            elif cell < N - 1:  # a run of given codes, fed at once (the last code is never fed)
                logits_out, cond_out = decoder.extend(codes[:, cell : min(end, N - 1)], cell)  # codes cell + 1 ..
                inner = end - cell - 1  # the given codes after the run's first, predicted inside the run
                log_likelihood += code_log_probs(cond_out[:, :inner], codes[:, cell + 1 : end]).sum(1)
                logits, cond = logits_out[:, -1], cond_out[:, -1]
            if end >= N:
                break
            cell = end
    return codes, log_likelihood


# ------------------------------------------------------------------------------------------ prompts and ranking


def encode_prompts(tokenizer: Any, prompts: Sequence[str], length: int) -> torch.Tensor:
    """Prompts -> text (P, length). An empty prompt is the empty caption (unconditional); a prompt longer than
    `length` tokens is truncated with a warning."""
    rows = tokenizer.encode(list(prompts), length + 1)  # one more column: non-pad there means it did not fit
    for prompt, row in zip(prompts, rows):
        if int(row[length]) != tokenizer.pad_id:
            shown = prompt if len(prompt) <= 60 else prompt[:57] + "..."
            warnings.warn(
                f"prompt {shown!r} is longer than the model's {length} text tokens; it was truncated",
                stacklevel=3,
            )
    text = tokenizer.encode(list(prompts), length)
    empty = torch.tensor([not prompt.strip() for prompt in prompts], dtype=torch.bool)
    return text.masked_fill(empty[:, None], PAD_ID)


def clip_scores(clip: Any, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
    """CLIP cosine similarity (M,) of each image (M, 3, H, W) with its prompt, using a loaded CLIP bundle
    `(model, preprocess, tokenizer)` as returned by `clipdalle.clip.load` (images are resized to its input)."""
    return clip_scores_and_features(clip, images, prompts)[0]


def clip_scores_and_features(
    clip: Any, images: torch.Tensor, prompts: Sequence[str]
) -> tuple[torch.Tensor, torch.Tensor]:
    """`clip_scores` and the images' L2-normalised CLIP features (M, D), both on the CPU, each image encoded once."""
    if not isinstance(clip, (tuple, list)) or len(clip) != 3:
        raise ValueError(
            "clip must be the (model, preprocess, tokenizer) bundle returned by clipdalle.clip.load(path), "
            f"got {type(clip).__name__}"
        )
    clip_model, _, clip_tokenizer = clip
    clip_model = unwrap(clip_model)
    unique = list(dict.fromkeys(prompts))
    position = {prompt: index for index, prompt in enumerate(unique)}
    with torch.no_grad():
        text_features = encode_texts(clip_model, clip_tokenizer, unique).float().cpu()  # (U, D)
        features = encode_images(clip_model, images).float().cpu()  # (M, D)
    rows = torch.tensor([position[prompt] for prompt in prompts], dtype=torch.long)  # (M,) each image's prompt
    return (features * text_features[rows]).sum(dim=1), features


def best_per_group(scores: torch.Tensor, group_size: int, keep: int) -> torch.Tensor:
    """Indices of the `keep` best scores in each consecutive group of `group_size`, best first per group."""
    if scores.numel() % group_size:
        raise ValueError(f"best_per_group: {scores.numel()} scores do not split into groups of {group_size}")
    grouped = scores.reshape(-1, group_size)  # (P, n)
    order = grouped.argsort(dim=1, descending=True, stable=True)[:, :keep]  # (P, keep)
    offsets = torch.arange(grouped.shape[0])[:, None] * group_size
    return (order + offsets).reshape(-1)  # (P*keep,)


def consensus(features: torch.Tensor, group_size: int) -> torch.Tensor:
    """Each sample's mean cosine similarity (M,) to the other samples of its group, from L2-normalised features
    (M, D) in consecutive groups of `group_size`: how typical of its prompt's samples it is (0 for a group of 1)."""
    if features.shape[0] % group_size:
        raise ValueError(f"consensus: {features.shape[0]} samples do not split into groups of {group_size}")
    grouped = features.reshape(-1, group_size, features.shape[-1])  # (P, n, D)
    gram = grouped @ grouped.transpose(1, 2)  # (P, n, n)
    others = gram.sum(dim=2) - gram.diagonal(dim1=1, dim2=2)  # (P, n) similarity to the other n - 1 samples
    return (others / max(group_size - 1, 1)).reshape(-1)


def shortlisted_per_group(
    scores: torch.Tensor, features: torch.Tensor, group_size: int, keep: int, shortlist: int
) -> torch.Tensor:
    """Indices of the samples kept in each consecutive group of `group_size`: CLIP's `shortlist` x `keep` best
    `scores` (at most the group) are the candidates, and the `keep` most typical of them (`consensus` over the
    whole group) are kept, most typical first. `shortlist` 1 is `best_per_group`. Of two samples CLIP finds about
    equally good, the one that looks like what the prompt usually gives is kept rather than an outlier (minimum
    Bayes risk selection, with CLIP's image space as the measure of agreement)."""
    if shortlist == 1:
        return best_per_group(scores, group_size, keep)
    count = min(group_size, shortlist * keep)
    candidates = best_per_group(scores, group_size, count).view(-1, count)  # (P, count), CLIP's best first
    typical = consensus(features, group_size)[candidates]  # (P, candidates)
    order = typical.argsort(dim=1, descending=True, stable=True)[:, :keep]  # (P, keep)
    return candidates.gather(1, order).reshape(-1)  # (P*keep,)


# ------------------------------------------------------------------------------------------ public API


def generate(
    model: nn.Module,
    vae: nn.Module,
    tokenizer: Any,
    prompts: str | Sequence[str],
    n: int = 1,
    keep: int | None = None,
    clip: Any = None,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    cond_scale: float = 1.0,
    shortlist: int = 1,
    seed: int | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    should_stop: ShouldStop = None,
) -> Generation:
    """`n` samples per prompt; returns the best `keep` (default all n) per prompt, best first.

    `clip` is a loaded CLIP bundle `(model, preprocess, tokenizer)` from `clipdalle.clip.load`: samples are
    ranked by CLIP similarity with their prompt; without it, by log-likelihood. With `shortlist` > 1 (and a CLIP),
    CLIP shortlists `shortlist` x `keep` samples per prompt and the `keep` most typical of them are returned
    (`shortlisted_per_group`). `top_k` counts image codes.
    `temperature` 0 is greedy. `cond_scale` > 1 strengthens the caption (classifier-free guidance; the model
    must have been trained with caption dropout). Sample i gets seed `seed + i` (prompt-major); without `seed`
    a random base is drawn and reported in `Generation.seeds`. `should_stop` (e.g. a server's "client left") is
    asked between sampling steps and batches; when it says True, GenerationStopped is raised."""
    model, vae = unwrap(model), unwrap(vae)
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise ValueError("generate: got no prompts; give at least one (an empty string samples unconditionally)")
    keep = _check_request(
        model, vae, tokenizer, n, keep, clip, temperature, top_k, top_p, cond_scale, shortlist, batch_size
    )
    device = model.start_of_image_embedding.device
    text = encode_prompts(tokenizer, prompts, model.config.text_length).to(device)  # (P, T)
    base = seed if seed is not None else secrets.randbelow(2**31)
    rows = torch.arange(len(prompts), device=device).repeat_interleave(n)  # (P*n,) prompt of each sample
    seeds = [base + index for index in range(len(prompts) * n)]
    settings = dict(temperature=temperature, top_k=top_k, top_p=top_p, cond_scale=cond_scale)
    with eval_mode(model, vae):
        codes, log_likelihood = _sample_batches(model, text[rows], seeds, batch_size, settings, should_stop=should_stop)
        images = _decode_batches(vae, codes, batch_size, should_stop)
    row_prompts = [prompts[int(index)] for index in rows]
    return _select(images, codes, row_prompts, seeds, log_likelihood, clip, n, keep, shortlist, vae.config.grid_size)


def inpaint(
    model: nn.Module,
    vae: nn.Module,
    tokenizer: Any,
    image: torch.Tensor,
    region: Sequence[int] | torch.Tensor,
    prompt: str,
    n: int = 1,
    keep: int | None = None,
    clip: Any = None,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    cond_scale: float = 1.0,
    shortlist: int = 1,
    seed: int | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    blend_radius: int | None = None,
    should_stop: ShouldStop = None,
) -> Generation:
    """Regenerates a region of `image` (3, H, W) in [0, 1] consistent with `prompt`; `n` candidates, the best
    `keep` returned. `region` is a box (x0, y0, x1, y1) in pixels, end exclusive, or a mask (H, W) that is
    True (or > 0.5) where to regenerate (see `mask_from_image`). The codes of every cell overlapping the region
    are resampled in raster order, the others fed as given. Candidates are ranked by CLIP with `clip`, else by
    the log-likelihood of the whole sequence (which counts the given codes after the region). The output keeps
    the original pixels outside the region exactly; inside, the decoded pixels are blended in over
    `blend_radius` pixels (default: a quarter of a cell) from its border. `should_stop` as in `generate`."""
    model, vae = unwrap(model), unwrap(vae)
    keep = _check_request(
        model, vae, tokenizer, n, keep, clip, temperature, top_k, top_p, cond_scale, shortlist, batch_size
    )
    image = _check_image(image, vae)  # (1, 3, H, W)
    H, W = image.shape[-2:]
    mask = region_mask(region, H, W)  # (H, W)
    cell_size = H // vae.config.grid_size
    if int(mask.sum()) < cell_size * cell_size:
        raise ValueError(
            f"inpaint: the region covers {int(mask.sum())} pixels, smaller than one {cell_size} x {cell_size} cell "
            f"of the code grid; choose a region of at least {cell_size * cell_size} pixels"
        )
    cells = cells_in_region(mask, vae.config.grid_size)  # (h, w)
    radius = max(1, cell_size // 4) if blend_radius is None else blend_radius
    settings = dict(temperature=temperature, top_k=top_k, top_p=top_p, cond_scale=cond_scale)
    generation = _resample(
        model, vae, tokenizer, image, cells, prompt, n, keep, clip, shortlist, seed, batch_size, settings,
        should_stop,
    )  # fmt: skip
    alpha = blend_weights(mask, radius).to(generation.images)  # (H, W)
    source = image.to(generation.images)
    blended = source * (1 - alpha) + generation.images * alpha  # (M, 3, H, W)
    generation.images = torch.where(mask.to(blended.device), blended, source)
    return generation


def variations(
    model: nn.Module,
    vae: nn.Module,
    tokenizer: Any,
    image: torch.Tensor,
    prompt: str,
    n: int = 1,
    keep_rows: int | None = None,
    keep: int | None = None,
    clip: Any = None,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    cond_scale: float = 1.0,
    shortlist: int = 1,
    seed: int | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    should_stop: ShouldStop = None,
) -> Generation:
    """Variations of `image` (3, H, W): its top `keep_rows` code rows (default half the grid) are kept and the
    rest resampled given `prompt` (OpenAI primed DALL·E with the top rows of an image the same way). Ranked
    like `inpaint`; the images are decoded whole. `should_stop` as in `generate`."""
    model, vae = unwrap(model), unwrap(vae)
    keep = _check_request(
        model, vae, tokenizer, n, keep, clip, temperature, top_k, top_p, cond_scale, shortlist, batch_size
    )
    grid = vae.config.grid_size
    keep_rows = grid // 2 if keep_rows is None else keep_rows
    if not 0 <= keep_rows < grid:
        raise ValueError(
            f"variations: keep_rows={keep_rows} must be between 0 and {grid - 1} (the grid has {grid} rows and at "
            f"least one row must be resampled)"
        )
    image = _check_image(image, vae)
    cells = torch.zeros(grid, grid, dtype=torch.bool)
    cells[keep_rows:] = True
    settings = dict(temperature=temperature, top_k=top_k, top_p=top_p, cond_scale=cond_scale)
    return _resample(
        model, vae, tokenizer, image, cells, prompt, n, keep, clip, shortlist, seed, batch_size, settings,
        should_stop,
    )  # fmt: skip


# ------------------------------------------------------------------------------------------ regions


def parse_box(text: str, name: str = "box") -> list[int]:
    """ "x0,y0,x1,y1" (pixels, end exclusive) -> [x0, y0, x1, y1]; a ValueError naming `name` otherwise."""
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        values = []
    if len(values) != 4:
        raise ValueError(f"{name} {text[:40]!r}: expected x0,y0,x1,y1 in pixels (end exclusive), e.g. 8,8,24,24")
    return values


def region_mask(region: Sequence[int] | torch.Tensor, height: int, width: int) -> torch.Tensor:
    """A box (x0, y0, x1, y1) in pixels (end exclusive) or a mask (H, W) / (1, H, W) -> BoolTensor (H, W),
    True where to regenerate. A box must lie inside the image; a mask must match its size and select pixels."""
    if isinstance(region, torch.Tensor):
        mask = region[0] if region.dim() == 3 and region.shape[0] == 1 else region
        if tuple(mask.shape) != (height, width):
            raise ValueError(
                f"region mask has shape {tuple(region.shape)}, expected ({height}, {width}) like the image"
            )
        mask = mask.bool() if mask.dtype == torch.bool else mask > 0.5
        if not bool(mask.any()):
            raise ValueError("region mask selects no pixels; mark the area to regenerate as True (or white)")
        return mask.cpu()
    if len(region) != 4 or not all(isinstance(value, int) for value in region):
        raise ValueError(f"region box must be 4 integers x0,y0,x1,y1 in pixels, got {region!r}")
    x0, y0, x1, y1 = region
    if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
        raise ValueError(
            f"region box {x0},{y0},{x1},{y1} is not inside the {width} x {height} image; expected "
            f"0 <= x0 < x1 <= {width} and 0 <= y0 < y1 <= {height} (end exclusive)"
        )
    mask = torch.zeros(height, width, dtype=torch.bool)
    mask[y0:y1, x0:x1] = True
    return mask


def cells_in_region(mask: torch.Tensor, grid_size: int) -> torch.Tensor:
    """BoolTensor (h, w): the code cells that overlap the pixel mask (H, W)."""
    H, W = mask.shape
    if H % grid_size or W % grid_size:
        raise ValueError(f"cells_in_region: a {W} x {H} mask does not split into a {grid_size} x {grid_size} grid")
    cell = H // grid_size
    return F.max_pool2d(mask[None, None].float(), kernel_size=cell)[0, 0] > 0  # (h, w)


def blend_weights(mask: torch.Tensor, radius: int) -> torch.Tensor:
    """Float (H, W) weights of the new pixels: 0 outside the mask, rising from about 1/2 at its border to 1 at
    `radius` pixels inside (a box blur of the mask, kept only inside it)."""
    if radius < 0:
        raise ValueError(f"blend radius must be >= 0 pixels, got {radius}")
    inside = mask.float()
    if radius == 0:
        return inside
    padded = F.pad(inside[None, None], (radius,) * 4, mode="replicate")  # the image edge is not a border
    blurred = F.avg_pool2d(padded, kernel_size=2 * radius + 1, stride=1)[0, 0]  # (H, W)
    return blurred * inside


def mask_from_image(image: Any, size: int) -> torch.Tensor:
    """A mask picture (a path or a PIL image) -> BoolTensor (size, size), True where to regenerate: its white
    area, and its transparent area (composited on white). Resized and centre-cropped like
    `clipdalle.transforms.load_image`, so it lines up with the image it masks."""
    pixels = load_image(image, size, name="mask")  # (3, size, size) in [0, 1]
    return pixels.min(dim=0).values > 0.5  # light in every channel: white, not a saturated colour


# ------------------------------------------------------------------------------------------ internals


def check_sampling_settings(settings: Any, source: str) -> dict[str, Any]:
    """`settings` as stored sampling settings (a preset's eval.sampling, a pipeline's eval.json): an object whose
    keys are among SAMPLING_SETTINGS and whose values are numbers (top_k and shortlist whole); one-line ValueError
    naming `source` otherwise. Ranges are checked where they are used (generate())."""
    if not isinstance(settings, dict) or set(settings) - set(SAMPLING_SETTINGS):
        raise ValueError(
            f"{source}: sampling must be an object with keys among {', '.join(SAMPLING_SETTINGS)}, got {settings!r}"
        )
    for key, value in settings.items():
        whole = key in ("top_k", "shortlist")
        if isinstance(value, bool) or not isinstance(value, int if whole else (int, float)):
            kind = "a whole number" if whole else "a number"
            raise ValueError(f"{source}: sampling {key} must be {kind}, got {value!r}")
    return dict(settings)


def _check_request(
    model: nn.Module,
    vae: nn.Module,
    tokenizer: Any,
    n: int,
    keep: int | None,
    clip: Any,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    cond_scale: float,
    shortlist: int,
    batch_size: int,
) -> int:
    """Validates what every public function takes; returns `keep` with its default (n)."""
    config = model.config
    if getattr(model, "model_type", None) != "dalle":
        raise ValueError(f"expected a DALL·E model, got {type(model).__name__}; load a dalle run")
    if vae.config.vocab_size != config.image_vocab_size or vae.config.grid_size != config.grid_size:
        raise ValueError(
            f"the dVAE ({vae.config.vocab_size} codes, {vae.config.grid_size} x {vae.config.grid_size} grid) does not "
            f"match the DALL·E model ({config.image_vocab_size} codes, {config.grid_size} x {config.grid_size} grid); "
            "use the dVAE the model was trained with (RUN/vae)"
        )
    if tokenizer.vocab_size > config.text_vocab_size:
        raise ValueError(
            f"the tokenizer has {tokenizer.vocab_size} ids but the model reads {config.text_vocab_size}; use the "
            "tokenizer the model was trained with (RUN/tokenizer.json)"
        )
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive number of samples per prompt, got {n!r}")
    keep = n if keep is None else keep
    if not isinstance(keep, int) or keep < 1 or keep > n:
        raise ValueError(f"keep={keep!r} must be between 1 and n={n} (the samples drawn per prompt); raise n")
    if temperature < 0 or math.isnan(temperature):
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be at least 1 image code (or None for all), got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] (or None), got {top_p}")
    if cond_scale < 0:
        raise ValueError(f"cond_scale must be >= 0 (1 = no guidance, 3 = strong guidance), got {cond_scale}")
    if not isinstance(shortlist, int) or isinstance(shortlist, bool) or shortlist < 1:
        raise ValueError(f"shortlist must be a whole number >= 1 (1 = keep CLIP's best), got {shortlist!r}")
    if shortlist > 1 and clip is None:
        raise ValueError(
            f"shortlist={shortlist} needs a CLIP (clip=...) to shortlist and compare the samples; pass one or use 1"
        )
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    return keep


def _check_image(image: torch.Tensor, vae: nn.Module) -> torch.Tensor:
    size = vae.config.image_size
    batch = image[None] if image.dim() == 3 else image
    if batch.dim() != 4 or tuple(batch.shape) != (1, 3, size, size):
        raise ValueError(
            f"expected one image of shape (3, {size}, {size}) in [0, 1] (the dVAE's image_size), got "
            f"{tuple(image.shape)}; resize it first (clipdalle.transforms.load_image(path, {size}))"
        )
    return batch.float()


def _sample_batches(
    model: DALLE,
    text: torch.Tensor,
    seeds: list[int],
    batch_size: int,
    settings: dict,
    given: torch.Tensor | None = None,
    resample: torch.Tensor | None = None,
    should_stop: ShouldStop = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    codes, log_likelihood = [], []
    for begin in range(0, text.shape[0], batch_size):
        end = begin + batch_size
        batch_given = None if given is None else given[begin:end]
        batch_codes, batch_ll = sample_codes(
            model, text[begin:end], seeds[begin:end], given=batch_given, resample=resample, should_stop=should_stop,
            **settings,
        )  # fmt: skip
        codes.append(batch_codes)
        log_likelihood.append(batch_ll)
    return torch.cat(codes), torch.cat(log_likelihood)


def _decode_batches(
    vae: nn.Module, codes: torch.Tensor, batch_size: int, should_stop: ShouldStop = None
) -> torch.Tensor:
    """Images (M, 3, H, W) in fp32 (also when decoded under autocast) from codes (M, h*w)."""
    grid = vae.config.grid_size
    images = []
    for begin in range(0, len(codes), batch_size):
        _check_stop(should_stop)
        images.append(vae.decode(codes[begin : begin + batch_size].view(-1, grid, grid)))  # codes (b, h, w)
    return torch.cat(images).float()  # (M, 3, H, W)


def _resample(
    model: DALLE,
    vae: nn.Module,
    tokenizer: Any,
    image: torch.Tensor,
    cells: torch.Tensor,
    prompt: str,
    n: int,
    keep: int,
    clip: Any,
    shortlist: int,
    seed: int | None,
    batch_size: int,
    settings: dict,
    should_stop: ShouldStop = None,
) -> Generation:
    """n samples of `image` (1, 3, H, W) with the codes of `cells` (h, w) resampled and its other codes kept."""
    device = model.start_of_image_embedding.device
    text = encode_prompts(tokenizer, [prompt], model.config.text_length).to(device)  # (1, T)
    base = seed if seed is not None else secrets.randbelow(2**31)
    seeds = [base + index for index in range(n)]
    with eval_mode(model, vae):
        original = vae.encode(image.to(device_of(vae)))  # (1, h, w)
        given = original.reshape(1, -1).to(device).expand(n, -1)  # (n, N)
        codes, log_likelihood = _sample_batches(
            model, text.expand(n, -1), seeds, batch_size, settings, given=given, resample=cells.reshape(-1),
            should_stop=should_stop,
        )  # text (n, T), resample (h*w,)  # fmt: skip
        images = _decode_batches(vae, codes, batch_size, should_stop)
        return _select(
            images, codes, [prompt] * n, seeds, log_likelihood, clip, n, keep, shortlist, vae.config.grid_size
        )


def _select(
    images: torch.Tensor,
    codes: torch.Tensor,
    prompts: list[str],
    seeds: list[int],
    log_likelihood: torch.Tensor,
    clip: Any,
    n: int,
    keep: int,
    shortlist: int,
    grid: int,
) -> Generation:
    """Scores every sample (CLIP, else log-likelihood) and keeps `keep` of each prompt's n: the best, or with
    `shortlist` > 1 the most typical of CLIP's `shortlist` x `keep` best (`shortlisted_per_group`)."""
    if clip is not None:
        scores, features = clip_scores_and_features(clip, images, prompts)
        chosen = shortlisted_per_group(scores, features, n, keep, shortlist)  # (P*keep,)
    else:
        scores = features = None
        chosen = best_per_group(log_likelihood.float().cpu(), n, keep)  # (P*keep,)
    device_chosen = chosen.to(images.device)
    return Generation(
        images=images[device_chosen],
        codes=codes[chosen.to(codes.device)].reshape(-1, grid, grid),  # (M, h, w)
        prompts=[prompts[int(i)] for i in chosen],
        seeds=[seeds[int(i)] for i in chosen],
        log_likelihood=log_likelihood[chosen.to(log_likelihood.device)].cpu(),
        clip_scores=None if scores is None else scores[chosen],
        clip_features=None if features is None else features[chosen],
    )
