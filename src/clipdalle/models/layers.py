"""Shared transformer blocks for CLIP and DALL·E: pre-LN residual attention blocks with OpenAI's parameter names.

A block holds `ln_1`, `attn` (`in_proj_weight`, `in_proj_bias`, `out_proj`: the names nn.MultiheadAttention
uses, so OpenAI and open_clip checkpoints load with strict=True), `ln_2` and `mlp.c_fc` / `mlp.c_proj`.
Attention itself runs through `F.scaled_dot_product_attention` on batch-first (B, nh, T, hs) tensors, and
takes an optional `KVCache` so that a decoder can feed one new position at a time (the one-position fast paths
of DALL·E sampling live beside the model, in clipdalle.models.decoding).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 and cast back to the input's dtype (OpenAI's subclass, for fp16/bf16)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).to(x.dtype)


def apply_layer_norm(norm: LayerNorm, x: torch.Tensor) -> torch.Tensor:
    """`norm(x)`, without the casts and the module call when x is fp32 already: a decoding step calls it 9 times."""
    if x.dtype != torch.float32:
        return norm(x)
    return F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the GELU approximation OpenAI's CLIP weights were trained with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


def tanh_gelu() -> nn.Module:
    """GELU's tanh approximation: what SigLIP's towers use (transformers' gelu_pytorch_tanh, timm's gelu_tanh)."""
    return nn.GELU(approximate="tanh")


ACTIVATIONS = {"gelu": nn.GELU, "quick_gelu": QuickGELU, "gelu_tanh": tanh_gelu}


def make_activation(name: str) -> nn.Module:
    if name not in ACTIVATIONS:
        raise ValueError(f"activation {name!r}: expected one of {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]()


# ------------------------------------------------------------------------------------------ masks


def causal_mask(query_length: int, key_length: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Boolean (query_length, key_length) mask, True where a query may attend.

    The queries are the last `query_length` of `key_length` positions (bottom-right aligned), as when new
    positions are appended after cached ones; with equal lengths it is the usual lower triangle."""
    if query_length > key_length:
        raise ValueError(f"causal_mask: query_length {query_length} exceeds key_length {key_length}")
    offset = key_length - query_length
    query_positions = torch.arange(query_length, device=device).unsqueeze(1) + offset  # (T_q, 1)
    key_positions = torch.arange(key_length, device=device).unsqueeze(0)  # (1, T_k)
    return key_positions <= query_positions


def merge_masks(allowed: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Combines a boolean `allowed` mask with an optional boolean or additive float mask (SDPA conventions)."""
    if mask is None:
        return allowed
    if mask.dtype == torch.bool:
        return allowed & mask
    return mask.masked_fill(~allowed, float("-inf"))


# ------------------------------------------------------------------------------------------ attention


class KVCache:
    """Keys and values of the positions one attention layer has seen so far, in buffers written in place.

    Pass one per layer to `Transformer.forward(..., caches=...)`; every call writes its new positions after the
    cached ones and attends to all of them. `KVCache(capacity)` allocates its buffers at the first call (batch,
    heads, dtype and device come from it), so a decoder that knows its sequence length writes one position per
    step into memory allocated once, with no torch.cat per step. Without a capacity the buffers start at the first
    call's length and double when full (amortised O(1) copies per position).
    `keys` / `values` are views (B, nh, T_past, hs) of the filled part, each (B, nh) slice contiguous, so that a new
    position is one contiguous write per head and a single query's attention reads each head's keys as one block.
    """

    def __init__(self, capacity: int | None = None) -> None:
        if capacity is not None and capacity < 1:
            raise ValueError(f"KVCache: capacity must be at least 1 position (or None to grow), got {capacity}")
        self.capacity = capacity
        self.length = 0
        self._keys: torch.Tensor | None = None  # (B, nh, allocated, hs)
        self._values: torch.Tensor | None = None  # (B, nh, allocated, hs)

    def __len__(self) -> int:
        return self.length

    @property
    def keys(self) -> torch.Tensor | None:
        return None if self._keys is None else self._keys[:, :, : self.length]  # (B, nh, T_past, hs)

    @property
    def values(self) -> torch.Tensor | None:
        return None if self._values is None else self._values[:, :, : self.length]  # (B, nh, T_past, hs)

    def reset(self) -> None:
        """Forgets the cached positions and keeps the buffers for the next sequence of the same batch shape."""
        self.length = 0

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Writes (B, nh, T_new, hs) keys and values after the cached ones; returns views of all of them
        (B, nh, T_past + T_new, hs)."""
        B, nh, T_new, hs = keys.shape
        end = self.length + T_new
        if self.capacity is not None and end > self.capacity:
            raise ValueError(
                f"KVCache: {self.length} cached + {T_new} new positions exceed the capacity of {self.capacity}; "
                f"build the cache with a larger capacity or reset() it between sequences"
            )
        if self._keys is None:
            self._allocate(keys, self.capacity if self.capacity is not None else T_new)
        elif self._values.shape[:2] != (B, nh) or self._values.shape[3] != hs:
            raise ValueError(
                f"KVCache: got keys of shape {tuple(keys.shape)}, but the cache holds (B, nh, T, hs) = "
                f"{tuple(self._values.shape)}; use one cache per layer and batch"
            )
        elif end > self._values.shape[2]:  # growing cache (no capacity): double, keeping what is there
            old_keys, old_values = self.keys, self.values
            self._allocate(keys, max(end, 2 * self._values.shape[2]))
            self._keys[:, :, : self.length] = old_keys
            self._values[:, :, : self.length] = old_values
        self._keys[:, :, self.length : end] = keys
        self._values[:, :, self.length : end] = values
        self.length = end
        return self.keys, self.values

    def fill_from(self, source: KVCache, rows: torch.Tensor) -> None:
        """Fills this empty cache with the positions cached in `source`, row `rows[i]` of it becoming row i: many
        samples of one prompt start from the prompt's keys and values, computed once. rows (B,) indexes source's
        batch."""
        if self.length:
            raise ValueError(f"KVCache.fill_from: this cache already holds {self.length} positions; use a new one")
        if source._keys is None:
            raise ValueError("KVCache.fill_from: the source cache is empty; feed the prompt into it first")
        size = source.length if self.capacity is None else self.capacity
        if source.length > size:
            raise ValueError(
                f"KVCache.fill_from: the source holds {source.length} positions, more than the capacity of {size}"
            )
        keys, values = source.keys[rows], source.values[rows]  # (B, nh, T, hs) each
        self._allocate(values, size)
        self._keys[:, :, : source.length] = keys
        self._values[:, :, : source.length] = values
        self.length = source.length

    def _allocate(self, like: torch.Tensor, size: int) -> None:
        B, nh, _, hs = like.shape
        self._keys = like.new_empty(B, nh, size, hs)
        self._values = like.new_empty(B, nh, size, hs)


class SelfAttention(nn.Module):
    """Multi-head self-attention with nn.MultiheadAttention's parameter names, batch-first, on SDPA."""

    def __init__(self, n_embd: int, n_head: int, dropout: float = 0.0):
        super().__init__()
        if n_head < 1 or n_embd % n_head != 0:
            raise ValueError(
                f"attention: n_embd {n_embd} is not divisible by n_head {n_head}; choose n_head dividing it"
            )
        self.n_head = n_head
        self.dropout = dropout
        self.in_proj_weight = nn.Parameter(torch.empty(3 * n_embd, n_embd))  # query, key, value rows stacked
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * n_embd))
        self.out_proj = nn.Linear(n_embd, n_embd)
        nn.init.xavier_uniform_(self.in_proj_weight)  # nn.MultiheadAttention's initialisation
        nn.init.zeros_(self.out_proj.bias)

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        is_causal: bool = False,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """x (B, T, C) -> (B, T, C). `mask` (T, T_k) or (B, nh, T, T_k): boolean (True = attend) or additive.

        With a `cache`, x holds the new positions only; they attend to the cached ones and to themselves."""
        B, T, C = x.shape
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).split(C, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        if cache is not None:
            past = len(cache)
            cached_k, cached_v = cache.append(k, v)  # (B, nh, past + T, hs)
            if past > 0:  # with nothing before them, the new k, v are all there is: SDPA's fast path takes them
                k, v = cached_k, cached_v  # views of the filled part of the cache
            if is_causal and past > 0:
                # SDPA's is_causal aligns the triangle top-left; new queries sit at the end (bottom-right).
                mask = merge_masks(causal_mask(T, past + T, device=x.device), mask)
                is_causal = False
        if is_causal and mask is not None:  # SDPA accepts one or the other
            mask = merge_masks(causal_mask(T, T, device=x.device), mask)
            is_causal = False
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0, is_causal=is_causal
        )  # (B, nh, T, hs)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, C)
        return self.out_proj(y)

    def forward_at(self, x: torch.Tensor, positions: torch.Tensor, is_causal: bool = False) -> torch.Tensor:
        """x (B, T, C), positions (B,) -> (B, C): the output of `forward` at one position per row only.

        Keys and values come from every position, the query from the chosen one; with `is_causal` it sees the
        positions up to itself. Saves the query, mixing and output projection of the other T - 1 positions."""
        B, T, C = x.shape
        key_value_weight, key_value_bias = self.in_proj_weight[C:], self.in_proj_bias[C:]
        k, v = F.linear(x, key_value_weight, key_value_bias).split(C, dim=2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        chosen = x[torch.arange(B, device=x.device), positions]  # (B, C)
        q = F.linear(chosen, self.in_proj_weight[:C], self.in_proj_bias[:C])  # (B, C)
        q = q.view(B, self.n_head, 1, C // self.n_head)  # (B, nh, 1, hs)
        mask = None
        if is_causal:
            key_positions = torch.arange(T, device=x.device)
            mask = (key_positions[None, :] <= positions[:, None]).view(B, 1, 1, T)  # (B, 1, 1, T)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0
        )  # (B, nh, 1, hs)
        return self.out_proj(y.reshape(B, C))  # (B, C)


class MLP(nn.Module):
    """c_fc -> activation -> c_proj; the hidden width is 4x by default, as in GPT-2 and CLIP (ViT-bigG-14 and
    SigLIP so400m use others)."""

    def __init__(self, n_embd: int, activation: str = "gelu", hidden_width: int | None = None):
        super().__init__()
        hidden_width = hidden_width or 4 * n_embd
        self.c_fc = nn.Linear(n_embd, hidden_width)
        self.activation = make_activation(activation)
        self.c_proj = nn.Linear(hidden_width, n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.activation(self.c_fc(x)))


class ResidualAttentionBlock(nn.Module):
    """x + attn(ln_1(x)), then x + mlp(ln_2(x)) (pre-LN, GPT-2 / CLIP)."""

    def __init__(
        self,
        n_embd: int,
        n_head: int,
        activation: str = "gelu",
        dropout: float = 0.0,
        mlp_width: int | None = None,
        norm_eps: float = 1e-5,
    ):
        super().__init__()
        self.ln_1 = LayerNorm(n_embd, eps=norm_eps)
        self.attn = SelfAttention(n_embd, n_head, dropout)
        self.ln_2 = LayerNorm(n_embd, eps=norm_eps)
        self.mlp = MLP(n_embd, activation, mlp_width)
        self.residual_dropout = nn.Dropout(dropout)

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        is_causal: bool = False,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        x = x + self.residual_dropout(self.attn(self.ln_1(x), mask, is_causal, cache))
        return x + self.residual_dropout(self.mlp(self.ln_2(x)))

    def forward_at(self, x: torch.Tensor, positions: torch.Tensor, is_causal: bool = False) -> torch.Tensor:
        """x (B, T, C), positions (B,) -> (B, C): `forward`'s output at one position per row, computing the
        attention query and the MLP there only."""
        chosen = x[torch.arange(x.shape[0], device=x.device), positions]  # (B, C)
        chosen = chosen + self.residual_dropout(self.attn.forward_at(self.ln_1(x), positions, is_causal))
        return chosen + self.residual_dropout(self.mlp(self.ln_2(chosen)))


class Transformer(nn.Module):
    """A stack of `ResidualAttentionBlock`s named `resblocks.N` (OpenAI's names), batch-first (B, T, C)."""

    def __init__(
        self,
        n_embd: int,
        n_layer: int,
        n_head: int,
        activation: str = "gelu",
        dropout: float = 0.0,
        grad_checkpointing: bool = False,
        mlp_width: int | None = None,
        norm_eps: float = 1e-5,
    ):
        super().__init__()
        self.n_embd = n_embd
        self.n_layer = n_layer
        self.grad_checkpointing = grad_checkpointing
        self.resblocks = nn.ModuleList(
            [ResidualAttentionBlock(n_embd, n_head, activation, dropout, mlp_width, norm_eps) for _ in range(n_layer)]
        )

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        is_causal: bool = False,
        caches: list[KVCache] | None = None,
    ) -> torch.Tensor:
        """x (B, T, C) -> (B, T, C). `caches`: one `KVCache` per block for incremental decoding."""
        if caches is not None and len(caches) != len(self.resblocks):
            raise ValueError(f"caches: got {len(caches)}, expected one per block ({len(self.resblocks)})")
        recompute = self.grad_checkpointing and self.training and torch.is_grad_enabled() and caches is None
        for index, block in enumerate(self.resblocks):
            if recompute:
                # Activation checkpointing: keep only block inputs, recompute the rest during backward.
                x = checkpoint(block, x, mask, is_causal, use_reentrant=False)
            else:
                x = block(x, mask, is_causal, None if caches is None else caches[index])
        return x

    def forward_at(self, x: torch.Tensor, positions: torch.Tensor, is_causal: bool = False) -> torch.Tensor:
        """x (B, T, C), positions (B,) -> (B, C): `forward(x, is_causal=is_causal)` read at one position per row
        (CLIP's class token or end-of-text token). The last block runs its query and MLP at those positions
        only, since no later block reads the others: 1 / n_layer less work per token, same result."""
        if positions.shape != (x.shape[0],):
            raise ValueError(
                f"forward_at: expected one position per row, shape ({x.shape[0]},), got {tuple(positions.shape)}"
            )
        if len(self.resblocks) == 0:
            return x[torch.arange(x.shape[0], device=x.device), positions]  # (B, C)
        recompute = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        *blocks, last = self.resblocks
        for block in blocks:
            if recompute:
                x = checkpoint(block, x, None, is_causal, use_reentrant=False)
            else:
                x = block(x, None, is_causal)
        if recompute:
            return checkpoint(last.forward_at, x, positions, is_causal, use_reentrant=False)
        return last.forward_at(x, positions, is_causal)


def init_transformer_(transformer: Transformer) -> None:
    """OpenAI CLIP's initialisation: normal weights scaled by width and depth (residual projections smaller)."""
    width, depth = transformer.n_embd, transformer.n_layer
    attn_std = width**-0.5
    proj_std = width**-0.5 * (2 * depth) ** -0.5
    fc_std = (2 * width) ** -0.5
    for block in transformer.resblocks:
        nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
        nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
        nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
        nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)


def init_gpt2_(model: nn.Module, transformer: Transformer, parameters: list[nn.Parameter]) -> None:
    """GPT-2's initialisation (DALL·E's and the captioner's): Linear and Embedding weights and the given extra
    parameters (position embeddings) N(0, 0.02), biases 0, residual projections scaled by 1/sqrt(2 * n_layer)."""
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
    for parameter in parameters:
        nn.init.normal_(parameter, std=0.02)
    for block in transformer.resblocks:
        nn.init.normal_(block.attn.in_proj_weight, std=0.02)
        nn.init.zeros_(block.attn.in_proj_bias)
        for projection in (block.attn.out_proj, block.mlp.c_proj):
            nn.init.normal_(projection.weight, std=0.02 / math.sqrt(2 * transformer.n_layer))
