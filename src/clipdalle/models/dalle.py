"""The DALL·E transformer (Ramesh et al. 2021, "Zero-Shot Text-to-Image Generation", section 2.2).

One decoder-only transformer models a caption followed by the dVAE's code grid as a single stream:

    t_0 t_1 ... t_{T-1}  <soi>  c_0 c_1 ... c_{N-2}          inputs, T + N positions
    t_1 ... t_{T-1}   -     c_0   c_1 c_2 ... c_{N-1}          what each position predicts

`T` caption tokens (fixed length, padded), a learned start-of-image vector, and the N = h * w codes in raster
order (the last code is predicted, never fed). Text and codes have separate embeddings; text positions are
learned 1-D embeddings, grid positions the sum of a row and a column embedding. As in the paper (section 2.2),
the padding after a caption is not one token but a distinct token per position, so "padding at position 7"
tells the model how long the caption was. The caption (and <soi>) forms the "text region" of T + 1 positions.

Each layer attends with one pattern from `config.attn` (cycled over the layers), with DALLE-pytorch's
semantics so benchmarks compare like with like: `full` is causal over the whole stream; in `row`, `col` and
`conv` the text region stays causal and every image position sees all of the text region plus the image
positions in its own grid row (`row`), its own grid column (`col`) or the k x k window above and left of it
(`conv`), never a later one. A position's grid cell is that of the code it reads. The masks are built once
per config (`attention_mask`) and applied through scaled_dot_product_attention.

Text positions predict text ids and image positions predict codes through two output heads. Separate heads
rather than one joint head masked per position: an image position never computes a logit for a text id, so
it cannot emit one, and its head is `image_vocab_size` wide instead of text + image wide (on the benchmark
config, 512 logits instead of 1,512 for each of the 64 image positions). The text head predicts the tokenizer's
ids (its <pad> meaning "the caption has ended"): the per-position pad tokens are an input-side device.

The loss weighs text : image as 1 : 7 (paper, section 2.2). Caption dropout (the empty caption, all padding)
trains the unconditional model that classifier-free guidance needs (clipdalle.sampling).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .decoding import last_block_output
from .layers import KVCache, LayerNorm, Transformer, init_gpt2_

ATTENTION_PATTERNS = ("full", "row", "col", "conv")
PAD_ID = 0  # the caption tokenizer's <pad> (CaptionTokenizer.pad_id); the model replaces it by a pad token per position


@dataclass
class DALLEConfig:
    text_length: int = 32  # caption tokens per sample, <bos> ... <eos> <pad>...; 32 fits the icons' captions
    text_vocab_size: int = 1000  # caption tokenizer's vocabulary (ids 0 .. size-1); must match the tokenizer
    image_vocab_size: int = 512  # dVAE codebook entries; must match the dVAE the codes come from
    grid_size: int = 8  # the dVAE's code grid is grid_size x grid_size (32 px icons -> 8 x 8)
    n_layer: int = 4  # transformer blocks
    n_head: int = 8  # attention heads per block; n_embd / n_head = 32 per head
    n_embd: int = 256  # width of the residual stream
    dropout: float = 0.0  # on embeddings, attention weights and residual branches; 0 for short CPU runs
    attn: list[str] = field(default_factory=lambda: ["full"])  # patterns cycled over layers: full|row|col|conv
    conv_kernel: int = 5  # side k of the causal k x k window of the `conv` pattern (DALLE-pytorch's default)
    text_loss_weight: float = 1.0  # weight of the caption loss (paper: 1/8 of the total)
    image_loss_weight: float = 7.0  # weight of the image loss (paper: 7/8); the loss is the weighted mean
    caption_dropout: float = 0.1  # share of training captions replaced by the empty caption, for guidance

    def __post_init__(self) -> None:
        for name in ("text_length", "text_vocab_size", "image_vocab_size", "grid_size", "n_layer", "n_head"):
            if getattr(self, name) < 1:
                raise ValueError(f"DALLEConfig.{name} must be at least 1, got {getattr(self, name)}")
        if self.text_length < 2:
            raise ValueError(f"DALLEConfig.text_length must be at least 2 (<bos> and <eos>), got {self.text_length}")
        if self.n_embd % self.n_head != 0:
            raise ValueError(
                f"DALLEConfig: n_embd {self.n_embd} is not divisible by n_head {self.n_head}; choose n_head dividing it"
            )
        if not self.attn or any(pattern not in ATTENTION_PATTERNS for pattern in self.attn):
            raise ValueError(
                f"DALLEConfig.attn {self.attn!r}: expected a non-empty list of {', '.join(ATTENTION_PATTERNS)} "
                f"(e.g. full,row,col,conv)"
            )
        if self.conv_kernel < 1:
            raise ValueError(f"DALLEConfig.conv_kernel must be at least 1, got {self.conv_kernel}")
        if not 0 <= self.dropout < 1 or not 0 <= self.caption_dropout <= 1:
            raise ValueError(
                f"DALLEConfig: dropout must be in [0, 1) and caption_dropout in [0, 1], got {self.dropout} and "
                f"{self.caption_dropout}"
            )
        if (
            self.text_loss_weight < 0
            or self.image_loss_weight < 0
            or self.text_loss_weight + self.image_loss_weight == 0
        ):
            raise ValueError(
                f"DALLEConfig: loss weights must be non-negative and not both 0, got text {self.text_loss_weight} "
                f"and image {self.image_loss_weight}"
            )

    @property
    def image_length(self) -> int:
        """N: codes per image."""
        return self.grid_size * self.grid_size

    @property
    def text_region(self) -> int:
        """Positions before the first code: the caption and <soi>."""
        return self.text_length + 1

    @property
    def sequence_length(self) -> int:
        """Positions the transformer reads: T caption tokens, <soi>, and N - 1 codes (the last is only predicted)."""
        return self.text_length + self.image_length

    def layer_patterns(self) -> list[str]:
        """The attention pattern of each layer: `attn` cycled over `n_layer` layers."""
        return [self.attn[index % len(self.attn)] for index in range(self.n_layer)]


# ------------------------------------------------------------------------------------------ attention masks


def attention_mask(config: DALLEConfig, pattern: str) -> torch.Tensor:
    """Boolean (L, L) mask over the input stream (L = config.sequence_length), True where a query may attend.

    Every pattern is causal. In `row`, `col` and `conv` an image query sees the whole text region (caption and
    <soi>) and, among image positions, only those in its grid row, its grid column, or the conv_kernel-wide
    square window ending at its own cell (DALLE-pytorch's axial_row, axial_col and conv_like)."""
    if pattern not in ATTENTION_PATTERNS:
        raise ValueError(f"attention pattern {pattern!r}: expected one of {', '.join(ATTENTION_PATTERNS)}")
    positions = torch.arange(config.sequence_length)
    query, key = positions[:, None], positions[None, :]  # (L, 1), (1, L)
    causal = key <= query  # (L, L)
    if pattern == "full":
        return causal
    is_image = positions >= config.text_region  # (L,)
    cell = (positions - config.text_region).clamp(min=0)  # code index of each image position
    row, column = cell // config.grid_size, cell % config.grid_size  # (L,)
    if pattern == "row":
        local = row[:, None] == row[None, :]
    elif pattern == "col":
        local = column[:, None] == column[None, :]
    else:  # conv: rows and columns within conv_kernel - 1 above / left of the query's cell
        reach = config.conv_kernel
        local = (row[None, :] > row[:, None] - reach) & (column[None, :] > column[:, None] - reach)
        local &= column[None, :] <= column[:, None]  # raster causality alone would admit cells up and to the right
    image_query_sees = ~is_image[None, :] | (local & causal)  # all of the text region, then the local causal cells
    return torch.where(is_image[:, None], image_query_sees, causal)


# ------------------------------------------------------------------------------------------ the model


class DALLE(nn.Module):
    """Caption tokens and dVAE codes in one causal stream; `forward(text, codes) -> (text_logits, image_logits)`."""

    model_type = "dalle"
    config_class = DALLEConfig

    def __init__(self, config: DALLEConfig):
        super().__init__()
        self.config = config
        T, C = config.text_length, config.n_embd
        # text ids, then one pad token per caption position (paper, section 2.2)
        self.text_embedding = nn.Embedding(config.text_vocab_size + T, C)
        self.text_position_embedding = nn.Parameter(torch.zeros(T, C))
        self.start_of_image_embedding = nn.Parameter(torch.zeros(C))
        self.image_embedding = nn.Embedding(config.image_vocab_size, C)
        self.row_position_embedding = nn.Parameter(torch.zeros(config.grid_size, C))
        self.column_position_embedding = nn.Parameter(torch.zeros(config.grid_size, C))
        self.embedding_dropout = nn.Dropout(config.dropout)
        self.transformer = Transformer(C, config.n_layer, config.n_head, activation="gelu", dropout=config.dropout)
        self.ln_final = LayerNorm(C)
        self.text_head = nn.Linear(C, config.text_vocab_size)
        self.image_head = nn.Linear(C, config.image_vocab_size)
        self.patterns = config.layer_patterns()
        for pattern in sorted(set(self.patterns)):  # built once; sliced for incremental decoding
            self.register_buffer(f"mask_{pattern}", attention_mask(config, pattern), persistent=False)
        self._init_weights()

    def _init_weights(self) -> None:
        """GPT-2's initialisation: N(0, 0.02), residual projections scaled by 1/sqrt(2 * n_layer)."""
        positions = [self.text_position_embedding, self.start_of_image_embedding]
        init_gpt2_(self, self.transformer, [*positions, self.row_position_embedding, self.column_position_embedding])

    # -------------------------------------------------------------------------------------- embeddings

    def embed_text(self, text: torch.Tensor) -> torch.Tensor:
        """text (B, T) tokenizer ids -> (B, T, C); <pad> becomes the pad token of its position."""
        T = self.config.text_length
        positions = torch.arange(T, device=text.device)
        tokens = torch.where(text == PAD_ID, self.config.text_vocab_size + positions, text)  # (B, T)
        return self.text_embedding(tokens) + self.text_position_embedding

    def embed_codes(self, codes: torch.Tensor, start: int = 0) -> torch.Tensor:
        """codes (B, t), the codes of cells start .. start + t - 1 in raster order -> (B, t, C)."""
        return self.image_embedding(codes) + self.grid_position_embedding()[start : start + codes.shape[1]]

    def grid_position_embedding(self) -> torch.Tensor:
        """(N, C): row + column embedding of every cell in raster order."""
        rows = self.row_position_embedding[:, None]  # (h, 1, C)
        columns = self.column_position_embedding[None, :]  # (1, w, C)
        return (rows + columns).flatten(0, 1)  # (h*w, C)

    def start_of_image(self, batch_size: int) -> torch.Tensor:
        return self.start_of_image_embedding.expand(batch_size, 1, -1)  # (B, 1, C)

    # -------------------------------------------------------------------------------------- transformer

    def _blocks(
        self, x: torch.Tensor, start: int, caches: list[KVCache] | None, last_only: bool = False
    ) -> torch.Tensor:
        """Runs the blocks on x (B, t, C), the positions start .. start + t - 1 (earlier ones in `caches`).
        `last_only` returns (B, 1, C), the last position only, and skips the last block's work at the others
        (their keys and values still go into `caches`); the last position must see all others in every pattern."""
        t = x.shape[1]
        for index, (block, pattern) in enumerate(zip(self.transformer.resblocks, self.patterns)):
            cache = None if caches is None else caches[index]
            if last_only and index == len(self.patterns) - 1:
                x = last_block_output(block, x, cache)
            elif pattern == "full" and start == 0:
                x = block(x, is_causal=True, cache=cache)  # SDPA's own causal path, no mask tensor
            elif pattern == "full" and t == 1:
                x = block(x, cache=cache)  # one new position sees every cached one
            else:
                mask = getattr(self, f"mask_{pattern}")[start : start + t, : start + t]  # (t, start + t)
                x = block(x, mask=mask, cache=cache)
        return self.ln_final(x)

    def forward(self, text: torch.Tensor, codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """text (B, T) ids and codes (B, n) with 0 <= n <= N (or (B, h, w)) -> (text_logits, image_logits).

        text_logits (B, T - 1, text_vocab_size): position t predicts text[:, t + 1].
        image_logits (B, min(n + 1, N), image_vocab_size): row i predicts code i (row 0 reads only the text)."""
        text, codes = self._check_inputs(text, codes)
        T, N = self.config.text_length, self.config.image_length
        B = text.shape[0]
        fed = codes[:, : N - 1]  # the last code is predicted, never read
        x = torch.cat([self.embed_text(text), self.start_of_image(B), self.embed_codes(fed)], dim=1)  # (B, L, C)
        x = self._blocks(self.embedding_dropout(x), 0, None)
        return self.text_head(x[:, : T - 1]), self.image_head(x[:, T:])

    # -------------------------------------------------------------------------------------- incremental decoding

    def new_caches(self) -> list[KVCache]:
        """One preallocated KV cache per block, sized for a whole stream (T + N positions)."""
        return [KVCache(self.config.sequence_length) for _ in self.transformer.resblocks]

    def start(self, text: torch.Tensor, caches: list[KVCache]) -> torch.Tensor:
        """Feeds the caption and <soi> into empty `caches`; returns the logits of code 0, (B, 1, image_vocab_size)."""
        text, _ = self._check_inputs(text, None)
        if any(len(cache) for cache in caches):
            raise ValueError("start: the caches already hold positions; use new_caches() for each batch")
        x = torch.cat([self.embed_text(text), self.start_of_image(text.shape[0])], dim=1)  # (B, T + 1, C)
        # <soi> is the text region's last position: causal there, it sees the whole caption in every pattern
        return self.image_head(self._blocks(x, 0, caches, last_only=True))

    def extend(self, codes: torch.Tensor, first: int, caches: list[KVCache]) -> torch.Tensor:
        """Feeds codes (B, t), the codes of cells first .. first + t - 1, after what `caches` hold; returns the
        logits (B, t, image_vocab_size) of codes first + 1 .. first + t. The last code (N - 1) is never fed."""
        t = codes.shape[1]
        if len(caches[0]) != self.config.text_region + first:
            raise ValueError(
                f"extend: the caches hold {len(caches[0])} positions, so the next code is cell "
                f"{len(caches[0]) - self.config.text_region}, not {first}"
            )
        if t < 1 or first + t > self.config.image_length - 1:
            raise ValueError(
                f"extend: cells {first} .. {first + t - 1} are not feedable; codes 0 .. "
                f"{self.config.image_length - 2} are fed (the last one is only predicted)"
            )
        x = self._blocks(self.embed_codes(codes, first), self.config.text_region + first, caches)
        return self.image_head(x)

    # -------------------------------------------------------------------------------------- checks

    def _check_inputs(self, text: torch.Tensor, codes: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        config = self.config
        if text.dim() != 2 or text.shape[1] != config.text_length or text.dtype not in (torch.long, torch.int):
            raise ValueError(
                f"expected text token ids of shape (B, {config.text_length}) (config.text_length), got "
                f"{tuple(text.shape)} of {text.dtype}; encode captions with CaptionTokenizer.encode(texts, "
                f"{config.text_length})"
            )
        if text.numel() and (int(text.min()) < 0 or int(text.max()) >= config.text_vocab_size):
            raise ValueError(
                f"text ids must be in [0, {config.text_vocab_size}) (config.text_vocab_size), got values from "
                f"{int(text.min())} to {int(text.max())}; was the model built for another tokenizer?"
            )
        if codes is None:
            return text.long(), None
        if codes.dim() == 3:
            codes = codes.reshape(codes.shape[0], -1)  # (B, h*w)
        if codes.dim() != 2 or codes.shape[0] != text.shape[0] or codes.shape[1] > config.image_length:
            raise ValueError(
                f"expected codes of shape (B, n) with n <= {config.image_length} (grid {config.grid_size} x "
                f"{config.grid_size}) for {text.shape[0]} captions, got {tuple(codes.shape)}"
            )
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= config.image_vocab_size):
            raise ValueError(
                f"codes must be in [0, {config.image_vocab_size}) (config.image_vocab_size), got values from "
                f"{int(codes.min())} to {int(codes.max())}; was the model built for another dVAE?"
            )
        return text.long(), codes.long()


# ------------------------------------------------------------------------------------------ the loss (section 2.2)


def empty_captions(batch_size: int, config: DALLEConfig, device: torch.device | str | None = None) -> torch.Tensor:
    """The empty caption (B, T): all padding. Caption dropout trains on it; guidance and empty prompts use it."""
    return torch.full((batch_size, config.text_length), PAD_ID, dtype=torch.long, device=device)


def drop_captions(text: torch.Tensor, probability: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Replaces each caption row of text (B, T) by the empty caption with `probability` (caption dropout)."""
    if probability <= 0:
        return text
    dropped = torch.rand(text.shape[0], generator=generator, device=text.device) < probability  # (B,)
    return text.masked_fill(dropped[:, None], PAD_ID)


def weighted_loss(text_loss: torch.Tensor, image_loss: torch.Tensor, text_weight: float, image_weight: float):
    """(w_t * text + w_i * image) / (w_t + w_i): DALL·E's 1 : 7 weighting keeps the loss on the nats scale."""
    return (text_weight * text_loss + image_weight * image_loss) / (text_weight + image_weight)


def nats_to_bits(nats: float) -> float:
    return nats / math.log(2)


def losses(model: nn.Module, text: torch.Tensor, codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(text loss, image loss): mean cross-entropies in nats per token, through `model(...)` (DDP syncs)."""
    codes = codes.reshape(codes.shape[0], -1)  # (B, h*w)
    text_logits, image_logits = model(text, codes)
    text_targets = text[:, 1:].reshape(-1)  # (B*(T-1),)
    text_loss = F.cross_entropy(text_logits.reshape(-1, text_logits.shape[-1]), text_targets)  # (B*(T-1), V_text)
    image_loss = F.cross_entropy(image_logits.reshape(-1, image_logits.shape[-1]), codes.reshape(-1))  # (B*N, V_img)
    return text_loss, image_loss
