"""A captioner: the DALL·E transformer's stream reversed, the image's dVAE codes first and the caption after them.

    c_0 c_1 ... c_{N-1}  t_0 t_1 ... t_{T-2}          inputs, N + T - 1 positions (t_0 is <bos>)
    -   -   ...  -       t_1 t_2 ... t_{T-1}          what each caption position predicts

The codes are a prefix the model is given, not predicts, so they attend to each other in both directions (a
prefix language model, as in SimVLM: Wang et al. 2021, "SimVLM: Simple Visual Language Model Pretraining with
Weak Supervision") while every caption position sees the whole image and the caption before it. Codes are
embedded with a row and a column embedding per grid cell, caption tokens with a learned position embedding, as
in clipdalle.models.dalle; the blocks are the shared pre-LN blocks of clipdalle.models.layers.

A separate model rather than a mode of DALLE: the masks, embeddings and heads differ, and DALL·E's checkpoints and
decoding fast paths stay as they are. The loss is the cross-entropy of the caption tokens up to and including
<eos>; the padding after it is not predicted (a sampler stops at <eos>).

    model = Captioner(CaptionerConfig(...))
    logits = model(codes, text)                        # codes (B, h*w), text (B, T) -> (B, T - 1, text_vocab_size)
    caches = model.new_caches(); logits = model.start(codes, text[:, :1], caches)   # then model.step(...)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .layers import KVCache, LayerNorm, Transformer, init_gpt2_

PAD_ID = 0  # the caption tokenizer's <pad>: never a target


@dataclass
class CaptionerConfig:
    text_length: int = 32  # caption tokens <bos> ... <eos> <pad>...; 32 fits the icons' captions
    text_vocab_size: int = 1000  # caption tokenizer's vocabulary; must match the tokenizer
    image_vocab_size: int = 512  # dVAE codebook entries; must match the dVAE the codes come from
    grid_size: int = 8  # the dVAE's code grid is grid_size x grid_size
    n_layer: int = 4  # transformer blocks
    n_head: int = 4  # attention heads per block
    n_embd: int = 128  # width of the residual stream; captions are short, so narrower than DALL·E
    dropout: float = 0.0  # on embeddings, attention weights and residual branches

    def __post_init__(self) -> None:
        for name in ("text_vocab_size", "image_vocab_size", "grid_size", "n_layer", "n_head"):
            if getattr(self, name) < 1:
                raise ValueError(f"CaptionerConfig.{name} must be at least 1, got {getattr(self, name)}")
        if self.text_length < 2:
            raise ValueError(
                f"CaptionerConfig.text_length must be at least 2 (<bos> and <eos>), got {self.text_length}"
            )
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"CaptionerConfig: n_embd {self.n_embd} is not divisible by n_head {self.n_head}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"CaptionerConfig.dropout must be in [0, 1), got {self.dropout}")

    @property
    def image_length(self) -> int:
        """N: codes per image."""
        return self.grid_size * self.grid_size

    @property
    def sequence_length(self) -> int:
        """Positions the transformer reads: N codes and T - 1 caption tokens (the last is only predicted)."""
        return self.image_length + self.text_length - 1


def prefix_mask(config: CaptionerConfig) -> torch.Tensor:
    """Boolean (L, L) mask, True where a query may attend: codes see all codes; caption positions see all codes
    and the caption up to themselves."""
    positions = torch.arange(config.sequence_length)
    query, key = positions[:, None], positions[None, :]  # (L, 1), (1, L)
    return (key <= query) | (key < config.image_length)


class Captioner(nn.Module):
    """dVAE codes, then caption tokens, in one stream; `forward(codes, text) -> text_logits`."""

    model_type = "captioner"
    config_class = CaptionerConfig

    def __init__(self, config: CaptionerConfig):
        super().__init__()
        self.config = config
        C = config.n_embd
        self.image_embedding = nn.Embedding(config.image_vocab_size, C)
        self.row_position_embedding = nn.Parameter(torch.zeros(config.grid_size, C))
        self.column_position_embedding = nn.Parameter(torch.zeros(config.grid_size, C))
        self.text_embedding = nn.Embedding(config.text_vocab_size, C)
        self.text_position_embedding = nn.Parameter(torch.zeros(config.text_length, C))
        self.embedding_dropout = nn.Dropout(config.dropout)
        self.transformer = Transformer(C, config.n_layer, config.n_head, activation="gelu", dropout=config.dropout)
        self.ln_final = LayerNorm(C)
        self.text_head = nn.Linear(C, config.text_vocab_size)
        self.register_buffer("mask", prefix_mask(config), persistent=False)
        self._init_weights()

    def _init_weights(self) -> None:
        """GPT-2's initialisation, as DALL·E's (clipdalle.models.layers.init_gpt2_)."""
        positions = [self.row_position_embedding, self.column_position_embedding, self.text_position_embedding]
        init_gpt2_(self, self.transformer, positions)

    # -------------------------------------------------------------------------------------- embeddings

    def embed_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (B, N) -> (B, N, C): code embedding + its cell's row and column embeddings."""
        rows = self.row_position_embedding[:, None]  # (h, 1, C)
        columns = self.column_position_embedding[None, :]  # (1, w, C)
        return self.image_embedding(codes) + (rows + columns).flatten(0, 1)  # (B, N, C)

    def embed_text(self, text: torch.Tensor, start: int = 0) -> torch.Tensor:
        """text (B, t), caption positions start .. start + t - 1 -> (B, t, C)."""
        return self.text_embedding(text) + self.text_position_embedding[start : start + text.shape[1]]

    # -------------------------------------------------------------------------------------- forward

    def forward(self, codes: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """codes (B, N) (or (B, h, w)) and text (B, t) with 1 <= t <= T -> logits (B, min(t, T - 1), V): row i
        predicts text[:, i + 1]."""
        codes, text = self._check_inputs(codes, text)
        N = self.config.image_length
        fed = text[:, : self.config.text_length - 1]  # the last token is predicted, never read
        x = torch.cat([self.embed_codes(codes), self.embed_text(fed)], dim=1)  # (B, N + t, C)
        L = x.shape[1]
        x = self.transformer(self.embedding_dropout(x), mask=self.mask[:L, :L])
        return self.text_head(self.ln_final(x[:, N:]))  # (B, t, V)

    # -------------------------------------------------------------------------------------- incremental decoding

    def new_caches(self) -> list[KVCache]:
        return [KVCache(self.config.sequence_length) for _ in self.transformer.resblocks]

    def start(self, codes: torch.Tensor, text: torch.Tensor, caches: list[KVCache]) -> torch.Tensor:
        """Feeds the codes and the first caption tokens text (B, t) into empty caches; returns the logits of the
        next token (B, V)."""
        codes, text = self._check_inputs(codes, text)
        if any(len(cache) for cache in caches):
            raise ValueError("start: the caches already hold positions; use new_caches() for each batch")
        x = torch.cat([self.embed_codes(codes), self.embed_text(text)], dim=1)  # (B, N + t, C)
        L = x.shape[1]
        x = self.transformer(x, mask=self.mask[:L, :L], caches=caches)
        return self.text_head(self.ln_final(x[:, -1]))  # (B, V)

    def step(self, tokens: torch.Tensor, position: int, caches: list[KVCache]) -> torch.Tensor:
        """Feeds tokens (B,) at caption position `position`; returns the logits of the next token (B, V). A new
        caption position sees everything cached, so no mask is needed."""
        if len(caches[0]) != self.config.image_length + position:
            raise ValueError(f"step: the caches hold {len(caches[0])} positions, not codes + {position} tokens")
        if not 0 < position < self.config.text_length - 1:
            raise ValueError(f"step: caption position {position} is outside 1 .. {self.config.text_length - 2}")
        x = self.transformer(self.embed_text(tokens[:, None], position), caches=caches)  # (B, 1, C)
        return self.text_head(self.ln_final(x[:, 0]))  # (B, V)

    # -------------------------------------------------------------------------------------- checks

    def _check_inputs(self, codes: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        config = self.config
        if codes.dim() == 3:
            codes = codes.reshape(codes.shape[0], -1)  # (B, h*w)
        if codes.dim() != 2 or codes.shape[1] != config.image_length:
            raise ValueError(
                f"expected codes of shape (B, {config.image_length}) (a {config.grid_size} x {config.grid_size} "
                f"grid), got {tuple(codes.shape)}"
            )
        if text.dim() != 2 or text.shape[0] != codes.shape[0] or not 1 <= text.shape[1] <= config.text_length:
            raise ValueError(
                f"expected text token ids of shape ({codes.shape[0]}, t) with 1 <= t <= {config.text_length}, got "
                f"{tuple(text.shape)}"
            )
        for name, values, limit in (("codes", codes, config.image_vocab_size), ("text", text, config.text_vocab_size)):
            if values.numel() and (int(values.min()) < 0 or int(values.max()) >= limit):
                raise ValueError(
                    f"{name} must be in [0, {limit}), got values from {int(values.min())} to {int(values.max())}; "
                    "was the model built for another dVAE or tokenizer?"
                )
        return codes.long(), text.long()


# ------------------------------------------------------------------------------------------ the loss


def loss(model: nn.Module, codes: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy in nats per caption token up to and including <eos>, through `model(...)`: the padding
    after <eos> is PAD_ID, which the loss ignores."""
    logits = model(codes, text)  # (B, T - 1, V)
    targets = text[:, 1:].reshape(-1)  # (B*(T-1),)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets, ignore_index=PAD_ID)
