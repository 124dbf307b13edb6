"""The discrete VAE: DALL·E's image tokenizer (Ramesh et al. 2021, section 2.1 and appendix A).

An image (B, 3, H, W) in [0, 1] is encoded to a grid of h x w = (H / 2**n_downsample)^2 cells, each cell one of
`vocab_size` codes; the decoder turns a grid of codes back into an image. The DALL·E transformer then models text
followed by these codes. Two ways to make the discrete bottleneck trainable:

- "gumbel" (the paper): the encoder gives logits over the codes per cell; training decodes the gumbel-softmax
  relaxation, a soft mix of codebook vectors, at a temperature annealed from 1 to 1/16, and a KL term pulls the
  per-cell distribution towards uniform so all codes stay in use (App. A.2).
- "vq" (VQ-VAE, van den Oord et al. 2017): the encoder gives a vector per cell, snapped to its nearest codebook
  entry; gradients pass straight through the snap, the codebook is an exponential moving average of the vectors
  assigned to each entry, and entries nobody uses are restarted from encoder outputs (Jukebox, Dhariwal et al.
  2020). Under DistributedDataParallel the statistics are summed over ranks so every rank keeps one codebook.

Layout: strided 4x4 convolutions halve the resolution `n_downsample` times, `n_resblock` residual blocks work at
the code-grid resolution, and the decoder mirrors this with transposed convolutions; the same layout as
DALLE-pytorch's DiscreteVAE, which benchmarks/bench_vae.py compares against. The decoder's output layer is
linear: a sigmoid output saturates, and on mostly-white icons it can collapse to an all-white image.
The reconstruction loss is MSE, L1, or the paper's logit-Laplace; on the 32 px icons L1 keeps colours right
where MSE blurs thin strokes towards white (99.7 % vs 98.7 % right colour, same settings; benchmarks/RESULTS.md).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

QUANTIZERS = ("vq", "gumbel")
RECON_LOSSES = ("mse", "l1", "laplace")

# The loss weights (`pixel_weights`) reach their full foreground weight at a summed distance from white of 120 on
# the 0-765 scale (about a sixth of full ink in one channel: past the faint anti-aliased fringe of a stroke),
# expressed on the [0, 3] scale the tensors use.
FOREGROUND_DISTANCE = 120 / 255
# Logit-Laplace squeezes pixels into [eps, 1 - eps] so their logits stay finite (DALL·E paper, section A.3).
LAPLACE_EPSILON = 0.1
# The KL weight ramps up from 0 over this share of the run: the paper ramps it over the first 5,000 of
# 3,000,000 updates; short CPU runs need the codebook to settle for longer before the KL term pushes.
KL_RAMP_FRACTION = 0.1
# Encoder and decoder run on chunks of the batch whose largest activation stays under 16 MiB. glibc serves bigger
# allocations (above 32 MiB at most) with fresh mmap'd pages every time, and first-touch page faults then cost as
# much as the arithmetic: at 64 px, batch 64, chunks of 16 images train ~15 % faster (benchmarks/bench_vae.py).
ACTIVATION_CHUNK_BYTES = 16 * 2**20
# Laplace smoothing of the EMA code counts, so an entry with no assignments never divides by zero.
EMA_EPSILON = 1e-5


@dataclass
class DVAEConfig:
    image_size: int = 32  # input height and width in pixels; 32 px icons are the demo's data
    n_downsample: int = 2  # stride-2 stages; 32 px -> 8x8 grid = 64 image tokens for the transformer
    vocab_size: int = 512  # codebook entries K; 512 keeps the transformer's output layer small
    n_embd: int = 256  # codebook vector size (DALLE-pytorch's codebook_dim)
    n_hidden: int = 64  # convolution width throughout encoder and decoder
    n_resblock: int = 1  # residual blocks at the code-grid resolution, in the encoder and again in the decoder
    quantizer: str = "vq"  # "vq" (EMA codebook, straight-through) or "gumbel" (DALL·E's relaxation); see module doc
    recon_loss: str = "mse"  # "mse", "l1" (sharper: the median, not the mean) or "laplace" (logit-Laplace, DALL·E A.3)
    foreground_weight: float = 0.0  # extra reconstruction weight on non-white pixels; colour lives in few pixels
    temperature_start: float = 1.0  # gumbel: relaxation temperature at the first step (DALL·E paper A.2)
    temperature_end: float = 0.0625  # gumbel: temperature at the last step, 1/16 as in the paper (cosine anneal)
    kl_weight: float = 0.003  # gumbel: weight of KL(q || uniform) per cell vs the per-pixel recon loss (tuned on icons)
    commitment: float = 0.25  # vq: weight pulling encoder outputs towards their code (VQ-VAE paper's beta)
    ema_decay: float = 0.99  # vq: decay of the codebook's moving averages; 0.99 adapts within ~100 steps
    dead_code_threshold: float = 0.1  # vq: restart a code whose EMA usage is below this share of the uniform 1/K

    def __post_init__(self) -> None:
        for name in ("image_size", "n_downsample", "vocab_size", "n_embd", "n_hidden"):
            if getattr(self, name) < 1:
                raise ValueError(f"DVAEConfig.{name} must be at least 1, got {getattr(self, name)}")
        if self.n_resblock < 0:
            raise ValueError(f"DVAEConfig.n_resblock must be 0 or more, got {self.n_resblock}")
        if self.image_size % 2**self.n_downsample:
            raise ValueError(
                f"DVAEConfig.image_size {self.image_size} is not divisible by 2**n_downsample = "
                f"{2**self.n_downsample}; choose an image_size that is a multiple of it or fewer downsamplings"
            )
        if self.quantizer not in QUANTIZERS:
            raise ValueError(f"DVAEConfig.quantizer {self.quantizer!r}: expected one of {', '.join(QUANTIZERS)}")
        if self.recon_loss not in RECON_LOSSES:
            raise ValueError(f"DVAEConfig.recon_loss {self.recon_loss!r}: expected one of {', '.join(RECON_LOSSES)}")
        if not 0 < self.temperature_end <= self.temperature_start:
            raise ValueError(
                f"DVAEConfig.temperature_start {self.temperature_start} / temperature_end {self.temperature_end}: "
                "expected 0 < temperature_end <= temperature_start"
            )
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"DVAEConfig.ema_decay must be in [0, 1), got {self.ema_decay}")
        for name in ("foreground_weight", "kl_weight", "commitment", "dead_code_threshold"):
            if getattr(self, name) < 0:
                raise ValueError(f"DVAEConfig.{name} must be 0 or more, got {getattr(self, name)}")

    @property
    def grid_size(self) -> int:
        """Cells per side of the code grid: image_size / 2**n_downsample."""
        return self.image_size // 2**self.n_downsample

    @property
    def out_channels(self) -> int:
        """Decoder outputs: RGB, or for logit-Laplace a location and a log-scale per channel."""
        return 6 if self.recon_loss == "laplace" else 3


# ------------------------------------------------------------------------------------------ small pure pieces


def normalise(images: torch.Tensor) -> torch.Tensor:
    """[0, 1] -> [-1, 1]: centred inputs for the first convolution."""
    return images * 2 - 1


def denormalise(outputs: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1]: the inverse of `normalise` (not clamped)."""
    return outputs * 0.5 + 0.5


def temperature_at(progress: float, start: float, end: float) -> float:
    """Gumbel-softmax temperature, cosine-annealed in log space from `start` (progress 0) to `end` (progress 1)."""
    progress = min(max(progress, 0.0), 1.0)
    mix = 0.5 * (1 - math.cos(math.pi * progress))
    return math.exp(math.log(start) + mix * (math.log(end) - math.log(start)))


def kl_weight_at(progress: float, weight: float) -> float:
    """The KL weight, ramped linearly from 0 over the first KL_RAMP_FRACTION of the run (DALL·E paper A.2)."""
    return weight * min(1.0, max(progress, 0.0) / KL_RAMP_FRACTION)


def gumbel_softmax(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """softmax((logits + g) / temperature) over the last dim, g ~ Gumbel(0, 1): the relaxed one-hot sample of
    the DALL·E paper (section 2.1). The noise is -log(-log(u)) with u ~ U[0, 1), which CPUs draw faster than
    torch's exponential sampler (F.gumbel_softmax's -log(Exponential)); u = 0 gives g = -inf, a zero weight."""
    noise = torch.rand_like(logits, dtype=torch.float32).log_().neg_().log_().neg_()  # fp32 under autocast too
    return torch.softmax((logits + noise) / temperature, dim=-1)


def kl_to_uniform(logits: torch.Tensor) -> torch.Tensor:
    """Mean over cells of KL(softmax(logits) || uniform) in nats; logits (..., K). 0 when every code is equally
    likely, log K when one code is certain."""
    log_probs = F.log_softmax(logits, dim=-1)
    return (log_probs.exp() * log_probs).sum(-1).mean() + math.log(logits.shape[-1])


def pixel_weights(images: torch.Tensor, foreground_weight: float) -> torch.Tensor:
    """Per-pixel loss weights (B, 1, H, W): 1 on white, rising to 1 + foreground_weight on pixels at least
    FOREGROUND_DISTANCE from white. Icons are ~80 % white, so an unweighted loss spends most of its effort on
    background and lets hues drift (orange -> yellow) and thin dark strokes blur to grey."""
    distance = (1 - images).sum(dim=1, keepdim=True)  # (B, 1, H, W) in [0, 3]
    return 1 + foreground_weight * (distance / FOREGROUND_DISTANCE).clamp(max=1)


def weighted_mse(reconstruction: torch.Tensor, images: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Mean squared error on the [0, 1] scale, each pixel weighted by `weights` (B, 1, H, W)."""
    squared = (reconstruction - images).pow(2)  # (B, 3, H, W)
    return (squared * weights).sum() / (weights.sum() * images.shape[1])


def weighted_l1(reconstruction: torch.Tensor, images: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Mean absolute error on the [0, 1] scale, each pixel weighted by `weights` (B, 1, H, W). Where a code
    leaves a stroke's exact position uncertain, the L1 optimum is the median pixel (ink or paper), while the
    MSE optimum is the mean: a lighter blur whose colour drifts towards white."""
    absolute = (reconstruction - images).abs()  # (B, 3, H, W)
    return (absolute * weights).sum() / (weights.sum() * images.shape[1])


def laplace_squeeze(images: torch.Tensor) -> torch.Tensor:
    """[0, 1] -> [eps, 1 - eps], the range the logit-Laplace distribution is defined on (DALL·E paper A.3)."""
    return (1 - 2 * LAPLACE_EPSILON) * images + LAPLACE_EPSILON


def laplace_unsqueeze(values: torch.Tensor) -> torch.Tensor:
    """[eps, 1 - eps] -> [0, 1]: the inverse of `laplace_squeeze`."""
    return (values - LAPLACE_EPSILON) / (1 - 2 * LAPLACE_EPSILON)


def logit_laplace_nll(
    images: torch.Tensor, location: torch.Tensor, log_scale: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """Weighted mean negative log-likelihood per pixel channel of `images` under the logit-Laplace distribution
    with `location` (in logit space) and `log_scale` (DALL·E paper A.3):
    -log p(x) = log(2 b) + log(x (1 - x)) + |logit(x) - location| / b, x squeezed into [eps, 1 - eps]."""
    squeezed = laplace_squeeze(images)
    nll = (
        math.log(2)
        + log_scale
        + torch.log(squeezed * (1 - squeezed))
        + (torch.logit(squeezed) - location).abs() * torch.exp(-log_scale)
    )  # (B, 3, H, W)
    return (nll * weights).sum() / (weights.sum() * images.shape[1])


def psnr(reconstruction: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB per image (B,), on reconstructions clamped to [0, 1]."""
    mse = (reconstruction.clamp(0, 1) - images).pow(2).flatten(1).mean(1)  # (B,)
    return 10 * torch.log10(1 / mse.clamp(min=1e-10))


def perplexity(counts: torch.Tensor) -> float:
    """exp(entropy) of a code histogram: the number of equally used codes it is worth (1 ... vocab_size)."""
    probs = counts.float() / counts.sum().clamp(min=1)
    entropy = -(probs * probs.clamp(min=1e-12).log()).sum()
    return float(entropy.exp())


# ------------------------------------------------------------------------------------------ blocks


class ResBlock(nn.Module):
    """x + conv1x1(relu(conv3x3(relu(conv3x3(x))))), at constant width (the block DALLE-pytorch uses)."""

    def __init__(self, width: int):
        super().__init__()
        self.conv1 = nn.Conv2d(width, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        self.conv3 = nn.Conv2d(width, width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.conv1(x), inplace=True)
        h = F.relu(self.conv2(h), inplace=True)
        return x + self.conv3(h)


def images_per_chunk(floats_per_image: int) -> int:
    """How many images keep an activation of `floats_per_image` floats each under ACTIVATION_CHUNK_BYTES."""
    return max(1, ACTIVATION_CHUNK_BYTES // (4 * floats_per_image))


def run_in_chunks(
    function: Callable[[torch.Tensor], torch.Tensor], inputs: torch.Tensor, chunk_size: int
) -> torch.Tensor:
    """function(inputs), computed `chunk_size` items at a time along the batch dimension and concatenated. On the
    CPU only: the page faults that chunking avoids are glibc's, and a GPU runs one launch over the whole batch
    faster than many (the ml6 dVAE's decoder would otherwise run 64 chunks of 2 images at batch 128)."""
    if len(inputs) <= chunk_size or inputs.device.type != "cpu":
        return function(inputs)
    return torch.cat([function(chunk) for chunk in inputs.split(chunk_size)])


class Encoder(nn.Module):
    """images (B, 3, H, W) in [0, 1] -> cell features (B, h, w, n_hidden)."""

    def __init__(self, config: DVAEConfig):
        super().__init__()
        widths = [3] + [config.n_hidden] * config.n_downsample
        self.downsample = nn.ModuleList(
            nn.Conv2d(width_in, width_out, 4, stride=2, padding=1) for width_in, width_out in zip(widths, widths[1:])
        )
        self.blocks = nn.ModuleList(ResBlock(config.n_hidden) for _ in range(config.n_resblock))
        self.chunk_size = images_per_chunk(config.n_hidden * (config.image_size // 2) ** 2)  # first conv's output

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return run_in_chunks(self._forward, images, self.chunk_size)

    def _forward(self, images: torch.Tensor) -> torch.Tensor:
        # channels_last: oneDNN's convolutions run fastest on it, and the cell features come out as a plain
        # (B, h, w, C) view with no copy.
        x = normalise(images).contiguous(memory_format=torch.channels_last)
        for conv in self.downsample:
            x = F.relu(conv(x), inplace=True)
        for block in self.blocks:
            x = block(x)
        return x.permute(0, 2, 3, 1)  # (B, h, w, C)


class Decoder(nn.Module):
    """cell features (B, h, w, n_hidden) -> decoder outputs (B, out_channels, H, W) on the [-1, 1] scale."""

    def __init__(self, config: DVAEConfig):
        super().__init__()
        self.blocks = nn.ModuleList(ResBlock(config.n_hidden) for _ in range(config.n_resblock))
        self.upsample = nn.ModuleList(
            nn.ConvTranspose2d(config.n_hidden, config.n_hidden, 4, stride=2, padding=1)
            for _ in range(config.n_downsample)
        )
        self.output = nn.Conv2d(config.n_hidden, config.out_channels, 1)  # linear: no sigmoid (see module doc)
        self.chunk_size = images_per_chunk(config.n_hidden * config.image_size**2)  # last upsampling's output

    def forward(self, cells: torch.Tensor) -> torch.Tensor:
        return run_in_chunks(self._forward, cells, self.chunk_size)

    def _forward(self, cells: torch.Tensor) -> torch.Tensor:
        x = cells.permute(0, 3, 1, 2)  # (B, C, h, w), channels_last in memory
        x = x.contiguous(memory_format=torch.channels_last)
        for block in self.blocks:
            x = block(x)
        for conv in self.upsample:
            x = F.relu(conv(x), inplace=True)
        return self.output(x)


# ------------------------------------------------------------------------------------------ quantizers


class GumbelQuantizer(nn.Module):
    """Cell features -> logits over the codes; codes -> codebook vectors (DALL·E paper section 2.1)."""

    def __init__(self, config: DVAEConfig):
        super().__init__()
        self.to_logits = nn.Linear(config.n_hidden, config.vocab_size)
        self.embedding = nn.Embedding(config.vocab_size, config.n_embd)

    def logits(self, cells: torch.Tensor) -> torch.Tensor:
        return self.to_logits(cells)  # (B, h, w, K)

    def codes(self, cells: torch.Tensor) -> torch.Tensor:
        return self.logits(cells).argmax(dim=-1)

    def codebook(self) -> torch.Tensor:
        return self.embedding.weight  # (K, n_embd)


class VectorQuantizer(nn.Module):
    """Cell features -> a vector per cell snapped to the nearest of `vocab_size` codebook entries. The codebook
    is not trained by gradients: it is the moving average of the vectors assigned to each entry (VQ-VAE paper,
    appendix A.1), kept in persistent buffers so it is saved with the weights."""

    def __init__(self, config: DVAEConfig):
        super().__init__()
        self.to_vector = nn.Linear(config.n_hidden, config.n_embd)
        self.decay = config.ema_decay
        self.dead_code_threshold = config.dead_code_threshold
        self.register_buffer("embedding", torch.randn(config.vocab_size, config.n_embd))
        self.register_buffer("ema_sum", self.embedding.clone())
        # Zero counts make every entry "dead" at the first training step, so the whole codebook starts as
        # encoder outputs of the first batch: a data-dependent initialisation for free.
        self.register_buffer("ema_count", torch.zeros(config.vocab_size))

    def vectors(self, cells: torch.Tensor) -> torch.Tensor:
        return self.to_vector(cells)  # (B, h, w, n_embd)

    def scores(self, cells: torch.Tensor) -> torch.Tensor:
        """(..., K) with argmax = the entry nearest to each cell's vector v = W c + b: argmin |v - e|^2 =
        argmax (v.e - |e|^2 / 2) = argmax (c.(W^T e) + b.e - |e|^2 / 2). Folding the vector layer into the
        codebook scores each cell against K rows of n_hidden numbers instead of n_embd: 4x less work at the
        default sizes, and the vectors themselves are never needed to find the codes. In fp32 under autocast too:
        neighbouring entries' scores can differ by less than bf16's 3 significant digits resolve."""
        embedding, layer = self.embedding.float(), self.to_vector
        with torch.autocast(cells.device.type, enabled=False):
            weight = embedding @ layer.weight.float()  # (K, n_hidden)
            bias = embedding @ layer.bias.float() - 0.5 * embedding.pow(2).sum(1)  # (K,)
            return F.linear(cells.float(), weight, bias)

    def nearest(self, vectors: torch.Tensor) -> torch.Tensor:
        """Index of the nearest codebook entry to each vector (..., n_embd)."""
        scores = vectors @ self.embedding.t() - 0.5 * self.embedding.pow(2).sum(1)  # (..., K)
        return scores.argmax(dim=-1)

    def codes(self, cells: torch.Tensor) -> torch.Tensor:
        return self.scores(cells).argmax(dim=-1)

    def codebook(self) -> torch.Tensor:
        return self.embedding  # (K, n_embd)

    @torch.no_grad()
    def update(self, vectors: torch.Tensor, codes: torch.Tensor) -> int:
        """One EMA step of the codebook from this batch's `vectors` (N, n_embd) and their `codes` (N,), then
        restarts dead entries; returns how many were restarted. Under torch.distributed the counts and sums are
        all-reduced and the restart vectors broadcast from rank 0, so every rank ends with the same codebook. The
        statistics are fp32 whatever the vectors' dtype (bf16 under autocast): the buffers are fp32."""
        vocab_size = self.embedding.shape[0]
        vectors = vectors.float()
        counts = torch.bincount(codes, minlength=vocab_size).to(vectors.dtype)  # (K,)
        sums = torch.zeros_like(self.ema_sum).index_add_(0, codes, vectors)  # (K, n_embd)
        distributed = dist.is_available() and dist.is_initialized()
        if distributed:
            dist.all_reduce(counts)
            dist.all_reduce(sums)
        self.ema_count.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.ema_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        total = self.ema_count.sum()
        smoothed = (self.ema_count + EMA_EPSILON) / (total + vocab_size * EMA_EPSILON) * total  # (K,)
        self.embedding.copy_(self.ema_sum / smoothed.clamp(min=EMA_EPSILON).unsqueeze(1))  # (K, n_embd)

        # The step's count of all vectors (over all ranks) sets the scale: a code is dead when its EMA usage is
        # below `dead_code_threshold` times the share it would get if all codes were used equally.
        floor = self.dead_code_threshold * float(counts.sum()) / vocab_size
        dead = (self.ema_count < floor).nonzero().squeeze(1)  # the same on every rank: counts were all-reduced
        if len(dead) == 0:
            return 0
        # Restart from encoder outputs the codebook represents worst (sampled in proportion to their squared
        # distance to their code, as in k-means++): rare colours and thin strokes, not yet more white cells.
        errors = (vectors - self.embedding[codes]).pow(2).sum(1)  # (N,)
        chosen = torch.multinomial(errors + 1e-12, len(dead), replacement=len(dead) > len(vectors))
        restart = vectors[chosen].contiguous()  # (n_dead, n_embd)
        if distributed:
            dist.broadcast(restart, src=0)
        self.embedding[dead] = restart
        self.ema_sum[dead] = restart * floor
        self.ema_count[dead] = floor
        return len(dead)


# ------------------------------------------------------------------------------------------ the model


@dataclass
class DVAEOutput:
    """What the training pass gives, whatever the quantizer and mode: every field is always set."""

    reconstruction: torch.Tensor  # (B, 3, H, W) on the [0, 1] scale, not clamped
    codes: torch.Tensor  # (B, h, w) long: the hard code of every cell
    decoder_output: torch.Tensor  # (B, out_channels, H, W): the decoder's raw output (logit-Laplace parameters too)
    quantizer_loss: torch.Tensor  # gumbel: mean KL(q || uniform) per cell; vq: mean |z - sg(e)|^2 (commitment)
    restarted: int  # vq: codes restarted in this training step (0 in eval mode and for gumbel)


class DiscreteVAE(nn.Module):
    model_type = "dvae"
    config_class = DVAEConfig

    def __init__(self, config: DVAEConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.quantizer = GumbelQuantizer(config) if config.quantizer == "gumbel" else VectorQuantizer(config)
        self.decoder_input = nn.Linear(config.n_embd, config.n_hidden)
        self.decoder = Decoder(config)

    # -------------------------------------------------------------------------------------- public API

    @torch.inference_mode()
    def _encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.quantizer.codes(self.encoder(images))

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W) in [0, 1] -> codes LongTensor (B, h, w). No gradients, no noise, no codebook
        update, whatever the module's mode."""
        self._check_images(images)
        return self._encode(images).clone()  # a normal tensor (usable in autograd), not an inference tensor

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes LongTensor (B, h, w) or (B, h*w) -> images (B, 3, H, W) clamped to [0, 1]."""
        codes = self._check_codes(codes)
        cells = F.embedding(codes, self.cell_table())  # (B, h, w, n_hidden)
        return self._to_images(self.decoder(cells)).clamp(0, 1)

    def decode_soft(self, weights: torch.Tensor) -> torch.Tensor:
        """weights (B, h, w, K), a probability over the codes per cell (e.g. softmax of logits), -> images
        (B, 3, H, W), not clamped, differentiable in `weights`: each cell decodes the weighted mix of codebook
        vectors, as the gumbel relaxation does in training. One-hot weights give `decode(codes)` exactly."""
        grid, vocab = self.config.grid_size, self.config.vocab_size
        if weights.dim() != 4 or tuple(weights.shape[1:]) != (grid, grid, vocab):
            raise ValueError(
                f"decode_soft: expected weights of shape (B, {grid}, {grid}, {vocab}), got {tuple(weights.shape)}"
            )
        sums = weights.detach().sum(-1)
        if not torch.allclose(sums, torch.ones_like(sums), atol=1e-3):
            raise ValueError(
                f"decode_soft: weights must sum to 1 over the codes in every cell (got sums from "
                f"{float(sums.min()):.3g} to {float(sums.max()):.3g}); pass weights.softmax(-1) for logits"
            )
        cells = weights @ self.cell_table()  # (B, h, w, n_hidden)
        return self._to_images(self.decoder(cells))

    def forward(self, images: torch.Tensor, temperature: float = 1.0) -> DVAEOutput:
        """The training pass. In train mode "gumbel" decodes the relaxed code mix at `temperature` and "vq"
        updates its codebook; in eval mode both decode the hard codes, as `decode(encode(images))` does."""
        self._check_images(images)
        cells = self.encoder(images)  # (B, h, w, n_hidden)
        restarted = 0
        if isinstance(self.quantizer, GumbelQuantizer):
            logits = self.quantizer.logits(cells)  # (B, h, w, K)
            codes = logits.argmax(dim=-1)
            quantizer_loss = kl_to_uniform(logits)
            if self.training:
                relaxed = gumbel_softmax(logits, temperature)  # (B, h, w, K)
                decoder_cells = relaxed @ self.cell_table()  # (B, h, w, n_hidden)
            else:
                decoder_cells = F.embedding(codes, self.cell_table())
        else:
            vectors = self.quantizer.vectors(cells)  # (B, h, w, n_embd)
            with torch.no_grad():
                codes = self.quantizer.codes(cells)  # as `encode` finds them, so eval forward == decode(encode)
            quantized = F.embedding(codes, self.quantizer.embedding)  # (B, h, w, n_embd)
            quantizer_loss = F.mse_loss(vectors, quantized)
            if self.training:
                flat = vectors.detach().reshape(-1, vectors.shape[-1])  # (B*h*w, n_embd)
                restarted = self.quantizer.update(flat, codes.reshape(-1))  # codes (B*h*w,)
            straight_through = vectors + (quantized - vectors).detach()  # value of `quantized`, gradient to vectors
            decoder_cells = self.decoder_input(straight_through)
        outputs = self.decoder(decoder_cells)
        return DVAEOutput(
            reconstruction=self._to_images(outputs),
            codes=codes,
            decoder_output=outputs,
            quantizer_loss=quantizer_loss,
            restarted=restarted,
        )

    # -------------------------------------------------------------------------------------- internals

    def cell_table(self) -> torch.Tensor:
        """(K, n_hidden): every code's codebook vector through the decoder's input layer. A cell's decoder
        input is one row (a hard code) or a probability-weighted mix of rows (the relaxation), which is the same
        as mixing codebook vectors first because the layer is linear and the weights sum to 1; computed per
        call it is K rows instead of B*h*w, 4x less work than the codebook mix at batch 64 and 8x8 cells."""
        return self.decoder_input(self.quantizer.codebook())

    def _to_images(self, outputs: torch.Tensor) -> torch.Tensor:
        if self.config.recon_loss == "laplace":
            return laplace_unsqueeze(torch.sigmoid(outputs[:, :3]))
        return denormalise(outputs)

    def _check_images(self, images: torch.Tensor) -> None:
        size = self.config.image_size
        if images.dim() != 4 or tuple(images.shape[1:]) != (3, size, size):
            raise ValueError(
                f"expected images of shape (B, 3, {size}, {size}) in [0, 1] (config.image_size {size}), "
                f"got {tuple(images.shape)}; resize them or build the model with another image_size"
            )

    def _check_codes(self, codes: torch.Tensor) -> torch.Tensor:
        grid, vocab = self.config.grid_size, self.config.vocab_size
        if codes.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"decode: expected integer codes, got dtype {codes.dtype}")
        if codes.dim() == 2 and codes.shape[1] == grid * grid:
            codes = codes.view(codes.shape[0], grid, grid)  # (B, h, w)
        if codes.dim() != 3 or tuple(codes.shape[1:]) != (grid, grid):
            raise ValueError(
                f"decode: expected codes of shape (B, {grid}, {grid}) or (B, {grid * grid}), got {tuple(codes.shape)}"
            )
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= vocab):
            raise ValueError(
                f"decode: codes must be in [0, {vocab}) (vocab_size), got values from {int(codes.min())} to "
                f"{int(codes.max())}"
            )
        return codes.long()


# ------------------------------------------------------------------------------------------ the loss


def quantizer_weight(config: DVAEConfig, progress: float) -> float:
    """The weight of the quantizer's term at `progress` in [0, 1]: the ramped KL weight (gumbel) or the commitment
    weight (vq)."""
    return kl_weight_at(progress, config.kl_weight) if config.quantizer == "gumbel" else config.commitment


def reconstruction_loss(output: DVAEOutput, images: torch.Tensor, config: DVAEConfig) -> torch.Tensor:
    weights = pixel_weights(images, config.foreground_weight)
    if config.recon_loss == "laplace":
        location, log_scale = output.decoder_output[:, :3], output.decoder_output[:, 3:]
        return logit_laplace_nll(images, location, log_scale, weights)
    if config.recon_loss == "l1":
        return weighted_l1(output.reconstruction, images, weights)
    if config.foreground_weight == 0:
        return F.mse_loss(output.reconstruction, images)  # the same value, without the all-ones weights
    return weighted_mse(output.reconstruction, images, weights)


def loss(output: DVAEOutput, images: torch.Tensor, config: DVAEConfig, progress: float) -> torch.Tensor:
    """Reconstruction (weighted towards foreground pixels) + the quantizer's term at its weight for `progress`."""
    return reconstruction_loss(output, images, config) + quantizer_weight(config, progress) * output.quantizer_loss
