"""CLIP weights in other layouts: reading OpenAI, open_clip and Hugging Face checkpoints, and writing them.

Our parameter names are OpenAI's (and open_clip's), so those state dicts load as they are; Hugging Face's
`CLIPModel` and `SiglipModel` differ by a rename table, separate q/k/v projections and (CLIP) transposed projection
matrices; open_clip's SigLIP image tower is a timm ViT, another rename table. Sizes, MLP widths included, are read
from the weights as OpenAI's `build_model` does; what the weights cannot tell (the activation, the number of
heads, the pixel mean and std) comes from the layout's config file or its documented default. OpenAI's release
files are TorchScript archives: their tensors are read by a restricted unpickler that runs none of their code.

    found = read_checkpoint("ViT-B-32.pt")                 # config + OpenAI-named fp32 state dict
    convert("ViT-B-32.pt", "vit-b-32-hf", to="hf")         # a directory transformers' CLIPModel loads
"""

from __future__ import annotations

import collections
import pickle
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import checkpoint
from .config import from_dict
from .io import atomic_write, read_json, write_json
from .models.clip import OPENAI_IMAGE_MEAN, OPENAI_IMAGE_STD, CLIPConfig

OPENAI_MERGES_FILE = "bpe_simple_vocab_16e6.txt.gz"  # the BPE merges OpenAI's clip and open_clip ship
OPEN_CLIP_CONFIG = "open_clip_config.json"
OPEN_CLIP_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
HF_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
HF_WEIGHTS_INDEX = "model.safetensors.index.json"  # a sharded checkpoint: which shard holds each weight
HF_LEGACY_ARGMAX_EOS = 2  # transformers pools the text at argmax(ids) when text_config.eos_token_id == 2
TORCHSCRIPT_EXTRAS = ("input_resolution", "context_length", "vocab_size")  # OpenAI's archives carry these ints

# OpenAI name -> Hugging Face name, outside the transformer blocks.
RENAMES = {
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",  # sic: Hugging Face's spelling
    "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
    "logit_scale": "logit_scale",
}
# OpenAI (in, out) matrices -> Hugging Face nn.Linear weights (out, in).
TRANSPOSED_RENAMES = {"visual.proj": "visual_projection.weight", "text_projection": "text_projection.weight"}
# Block prefixes, then names inside a block; the fused in_proj is split into q_proj, k_proj, v_proj.
BLOCK_PREFIXES = {
    "transformer.resblocks.": "text_model.encoder.layers.",
    "visual.transformer.resblocks.": "vision_model.encoder.layers.",
}
BLOCK_RENAMES = {
    "ln_1.weight": "layer_norm1.weight",
    "ln_1.bias": "layer_norm1.bias",
    "ln_2.weight": "layer_norm2.weight",
    "ln_2.bias": "layer_norm2.bias",
    "attn.out_proj.weight": "self_attn.out_proj.weight",
    "attn.out_proj.bias": "self_attn.out_proj.bias",
    "mlp.c_fc.weight": "mlp.fc1.weight",
    "mlp.c_fc.bias": "mlp.fc1.bias",
    "mlp.c_proj.weight": "mlp.fc2.weight",
    "mlp.c_proj.bias": "mlp.fc2.bias",
}
QKV = ("q_proj", "k_proj", "v_proj")

# Hugging Face SiglipModel: the same blocks (and block prefixes) as CLIPModel, its own names around them, and no
# transposed matrices (its text head is an nn.Linear, as ours is for SigLIP).
SIGLIP_RENAMES = {
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
    "text_projection.weight": "text_model.head.weight",
    "text_projection.bias": "text_model.head.bias",
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.conv1.bias": "vision_model.embeddings.patch_embedding.bias",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
    "visual.attn_pool.probe": "vision_model.head.probe",
    "visual.attn_pool.in_proj_weight": "vision_model.head.attention.in_proj_weight",
    "visual.attn_pool.in_proj_bias": "vision_model.head.attention.in_proj_bias",
    "visual.attn_pool.out_proj.weight": "vision_model.head.attention.out_proj.weight",
    "visual.attn_pool.out_proj.bias": "vision_model.head.attention.out_proj.bias",
    "visual.attn_pool.ln.weight": "vision_model.head.layernorm.weight",
    "visual.attn_pool.ln.bias": "vision_model.head.layernorm.bias",
    "visual.attn_pool.mlp.c_fc.weight": "vision_model.head.mlp.fc1.weight",
    "visual.attn_pool.mlp.c_fc.bias": "vision_model.head.mlp.fc1.bias",
    "visual.attn_pool.mlp.c_proj.weight": "vision_model.head.mlp.fc2.weight",
    "visual.attn_pool.mlp.c_proj.bias": "vision_model.head.mlp.fc2.bias",
    "logit_scale": "logit_scale",
    "logit_bias": "logit_bias",
}
SCALARS = ("logit_scale", "logit_bias")  # shape () here and in open_clip, (1,) in Hugging Face's SiglipModel

# open_clip's SigLIP: a timm ViT under visual.trunk (timm's names) and a text tower under text. (our names).
TIMM_RENAMES = {
    "visual.trunk.patch_embed.proj.weight": "visual.conv1.weight",
    "visual.trunk.patch_embed.proj.bias": "visual.conv1.bias",
    "visual.trunk.pos_embed": "visual.positional_embedding",  # (1, h*w, C) there, (h*w, C) here
    "visual.trunk.norm.weight": "visual.ln_post.weight",
    "visual.trunk.norm.bias": "visual.ln_post.bias",
    "visual.trunk.attn_pool.latent": "visual.attn_pool.probe",
    "visual.trunk.attn_pool.proj.weight": "visual.attn_pool.out_proj.weight",
    "visual.trunk.attn_pool.proj.bias": "visual.attn_pool.out_proj.bias",
    "visual.trunk.attn_pool.norm.weight": "visual.attn_pool.ln.weight",
    "visual.trunk.attn_pool.norm.bias": "visual.attn_pool.ln.bias",
    "visual.trunk.attn_pool.mlp.fc1.weight": "visual.attn_pool.mlp.c_fc.weight",
    "visual.trunk.attn_pool.mlp.fc1.bias": "visual.attn_pool.mlp.c_fc.bias",
    "visual.trunk.attn_pool.mlp.fc2.weight": "visual.attn_pool.mlp.c_proj.weight",
    "visual.trunk.attn_pool.mlp.fc2.bias": "visual.attn_pool.mlp.c_proj.bias",
}
TIMM_BLOCK_RENAMES = {
    "norm1": "ln_1",
    "attn.qkv.weight": "attn.in_proj_weight",  # timm's fused qkv rows are query, key, value: in_proj's order
    "attn.qkv.bias": "attn.in_proj_bias",
    "attn.proj": "attn.out_proj",
    "norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}
# timm's SigLIP image towers that open_clip builds by name: heads and activation (the weights give the rest).
TIMM_SIGLIP_TOWERS = {
    "vit_base_patch16_siglip_224": (12, "gelu"),
    "vit_base_patch16_siglip_256": (12, "gelu"),
    "vit_base_patch16_siglip_384": (12, "gelu"),
    "vit_base_patch16_siglip_512": (12, "gelu"),
    "vit_base_patch32_siglip_256": (12, "gelu_tanh"),
    "vit_large_patch16_siglip_256": (16, "gelu"),
    "vit_large_patch16_siglip_384": (16, "gelu"),
    "vit_large_patch16_siglip_512": (16, "gelu_tanh"),
    "vit_so400m_patch14_siglip_224": (16, "gelu"),
    "vit_so400m_patch14_siglip_378": (16, "gelu"),
    "vit_so400m_patch14_siglip_384": (16, "gelu"),
    "vit_so400m_patch16_siglip_256": (16, "gelu_tanh"),
    "vit_so400m_patch16_siglip_384": (16, "gelu_tanh"),
    "vit_so400m_patch16_siglip_512": (16, "gelu_tanh"),
    "vit_giantopt_patch16_siglip_256": (16, "gelu_tanh"),
    "vit_giantopt_patch16_siglip_384": (16, "gelu_tanh"),
}


@dataclass
class ForeignCheckpoint:
    config: CLIPConfig  # sizes from the weights, the rest from the layout's config or defaults
    state_dict: dict[str, torch.Tensor]  # OpenAI names, floating tensors in fp32
    layout: str  # openai | openai-torchscript | open_clip | hf
    tokenizer_path: Path | None  # tokenizer files found beside the weights (None: use an installed one)


# ------------------------------------------------------------------------------------------ rename tables


def openai_to_hf(state_dict: dict[str, torch.Tensor], siglip: bool = False) -> dict[str, torch.Tensor]:
    """OpenAI-named CLIP ViT weights -> Hugging Face CLIPModel names (q/k/v split, projections transposed), or with
    `siglip` our SigLIP's weights -> SiglipModel names."""
    if any(key.startswith("visual.layer1.") for key in state_dict):
        raise ValueError("Hugging Face CLIPModel has no ResNet image tower; only ViT CLIP models convert to it")
    if "logit_bias" in state_dict and not siglip:
        raise ValueError("Hugging Face CLIPModel has no logit_bias; SigLIP-trained models do not convert to it")
    renames, transposed = (SIGLIP_RENAMES, {}) if siglip else (RENAMES, TRANSPOSED_RENAMES)
    converted: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        if key in renames:
            converted[renames[key]] = tensor.reshape(1) if siglip and key in SCALARS else tensor
        elif key in transposed:
            converted[transposed[key]] = tensor.t().contiguous()
        else:
            prefix, index, name = _split_block_key(key, BLOCK_PREFIXES)
            hf_prefix = f"{BLOCK_PREFIXES[prefix]}{index}."
            if name in ("attn.in_proj_weight", "attn.in_proj_bias"):
                suffix = "weight" if name.endswith("weight") else "bias"
                for projection, part in zip(QKV, tensor.chunk(3, dim=0)):
                    converted[f"{hf_prefix}self_attn.{projection}.{suffix}"] = part.contiguous()
            elif name in BLOCK_RENAMES:
                converted[hf_prefix + BLOCK_RENAMES[name]] = tensor
            else:
                raise ValueError(f"no Hugging Face name for CLIP weight {key!r}")
    return converted


def hf_to_openai(state_dict: dict[str, torch.Tensor], siglip: bool = False) -> dict[str, torch.Tensor]:
    """Hugging Face CLIPModel (or with `siglip`, SiglipModel) weights -> our names (q/k/v merged into in_proj,
    CLIP's projections transposed)."""
    renames = {hf: ours for ours, hf in (SIGLIP_RENAMES if siglip else RENAMES).items()}
    transposed = {} if siglip else {hf: ours for ours, hf in TRANSPOSED_RENAMES.items()}
    prefixes = {hf: ours for ours, hf in BLOCK_PREFIXES.items()}
    block_renames = {hf: ours for ours, hf in BLOCK_RENAMES.items()}
    converted: dict[str, torch.Tensor] = {}
    projections: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state_dict.items():
        if key.endswith("position_ids"):  # a buffer older transformers versions saved; not a weight
            continue
        if key in renames:
            converted[renames[key]] = tensor.reshape(()) if renames[key] in SCALARS else tensor
        elif key in transposed:
            converted[transposed[key]] = tensor.t().contiguous()
        else:
            prefix, index, name = _split_block_key(key, prefixes)
            ours_prefix = f"{prefixes[prefix]}{index}."
            match = re.fullmatch(r"self_attn\.(q_proj|k_proj|v_proj)\.(weight|bias)", name)
            if match:
                fused = f"{ours_prefix}attn.in_proj_{match.group(2)}"
                projections.setdefault(fused, {})[match.group(1)] = tensor
            elif name in block_renames:
                converted[ours_prefix + block_renames[name]] = tensor
            else:
                raise ValueError(f"unknown Hugging Face {'SigLIP' if siglip else 'CLIP'} weight {key!r}")
    for fused, parts in projections.items():
        if set(parts) != set(QKV):
            raise ValueError(f"Hugging Face CLIP weights: {fused} lacks {', '.join(sorted(set(QKV) - set(parts)))}")
        converted[fused] = torch.cat([parts[name] for name in QKV], dim=0)
    return converted


def timm_to_openai(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """open_clip's SigLIP weights (a timm ViT under visual.trunk, the text tower under text.) -> our names."""
    converted: dict[str, torch.Tensor] = {}
    pooling_query: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        if key in TIMM_RENAMES:
            converted[TIMM_RENAMES[key]] = tensor[0] if key == "visual.trunk.pos_embed" else tensor
        elif key.startswith("visual.trunk.attn_pool.") and key.rsplit(".", 2)[-2] in ("q", "kv"):
            pooling_query[key.removeprefix("visual.trunk.attn_pool.")] = tensor  # q.weight, kv.bias, ...
        elif key.startswith("visual.trunk.blocks."):
            index, _, name = key.removeprefix("visual.trunk.blocks.").partition(".")
            old = next((old for old in TIMM_BLOCK_RENAMES if name == old or name.startswith(old + ".")), None)
            if old is None or not index.isdigit():
                raise ValueError(f"unknown timm ViT weight {key!r}")
            converted[f"visual.transformer.resblocks.{index}.{TIMM_BLOCK_RENAMES[old]}{name[len(old) :]}"] = tensor
        elif key.startswith("text."):
            converted[key.removeprefix("text.")] = tensor
        elif key in SCALARS:
            converted[key] = tensor
        else:
            raise ValueError(f"unknown open_clip SigLIP weight {key!r}")
    for suffix in ("weight", "bias"):  # timm keeps the probe's query apart from the keys and values
        if f"q.{suffix}" not in pooling_query or f"kv.{suffix}" not in pooling_query:
            raise ValueError(f"open_clip SigLIP weights: visual.trunk.attn_pool lacks q.{suffix} or kv.{suffix}")
        parts = [pooling_query[f"q.{suffix}"], pooling_query[f"kv.{suffix}"]]
        converted[f"visual.attn_pool.in_proj_{suffix}"] = torch.cat(parts, dim=0)
    return converted


def _split_block_key(key: str, prefixes: dict[str, str]) -> tuple[str, int, str]:
    """'transformer.resblocks.3.ln_1.weight' -> ('transformer.resblocks.', 3, 'ln_1.weight')."""
    for prefix in sorted(prefixes, key=len, reverse=True):  # the longer vision prefix contains the text one
        if key.startswith(prefix):
            index, _, name = key[len(prefix) :].partition(".")
            if index.isdigit():
                return prefix, int(index), name
    raise ValueError(f"unknown CLIP weight {key!r}")


# ------------------------------------------------------------------------------------------ configs


def config_from_state_dict(
    state_dict: dict[str, torch.Tensor],
    *,
    activation: str,
    vision_n_head: int | None = None,
    text_n_head: int | None = None,
    image_mean: list[float] | None = None,
    image_std: list[float] | None = None,
    text_pooling: str = "argmax",
    eos_id: int = 2,
    text_activation: str = "",
    norm_eps: float | None = None,
) -> CLIPConfig:
    """Sizes from our (OpenAI-named) weights, MLP widths included (OpenAI's build_model rules; heads default to
    width // 64). SigLIP weights (visual.attn_pool) give a SigLIP config: last-position text, LayerNorm eps 1e-6."""
    required = ("token_embedding.weight", "positional_embedding", "ln_final.weight")
    missing = [key for key in required if key not in state_dict]
    if missing or not any(key.startswith("text_projection") for key in state_dict):
        raise ValueError(f"not CLIP weights: missing {', '.join(missing or ['text_projection'])}")

    def count_blocks(prefix: str) -> int:
        return len({key[len(prefix) :].split(".")[0] for key in state_dict if key.startswith(prefix)})

    def mlp_width(prefix: str, width: int) -> int:
        """The first block's MLP hidden width, 0 when it is the usual 4x (so default configs stay equal)."""
        key = f"{prefix}0.mlp.c_fc.weight"
        hidden = state_dict[key].shape[0] if key in state_dict else 4 * width
        return 0 if hidden == 4 * width else hidden

    siglip = "visual.attn_pool.probe" in state_dict
    text_width = state_dict["ln_final.weight"].shape[0]
    embed_dim = state_dict["text_projection.weight"].shape[0] if siglip else state_dict["text_projection"].shape[1]
    values: dict[str, Any] = {
        "embed_dim": embed_dim,
        "context_length": state_dict["positional_embedding"].shape[0],
        "vocab_size": state_dict["token_embedding.weight"].shape[0],
        "text_n_embd": text_width,
        "text_n_layer": count_blocks("transformer.resblocks."),
        "text_n_head": text_n_head or max(1, text_width // 64),
        "text_mlp_width": mlp_width("transformer.resblocks.", text_width),
        "activation": activation,
        "text_activation": "" if text_activation == activation else text_activation,
        "image_mean": list(image_mean or OPENAI_IMAGE_MEAN),
        "image_std": list(image_std or OPENAI_IMAGE_STD),
        "text_pooling": "last" if siglip else text_pooling,
        "eos_id": eos_id,
        "loss": "siglip" if "logit_bias" in state_dict else "contrastive",
        "architecture": "siglip" if siglip else "clip",
        "norm_eps": norm_eps if norm_eps is not None else (1e-6 if siglip else 1e-5),
    }
    if "visual.proj" in state_dict or siglip:
        width, _, patch, _ = state_dict["visual.conv1.weight"].shape
        positions = state_dict["visual.positional_embedding"].shape[0]
        grid = round((positions if siglip else positions - 1) ** 0.5)  # SigLIP has no class token
        values.update(
            image_size=patch * grid,
            vision_patch_size=patch,
            vision_n_embd=width,
            vision_n_layer=count_blocks("visual.transformer.resblocks."),
            vision_n_head=vision_n_head or max(1, width // 64),
            vision_layers=[],
            vision_mlp_width=mlp_width("visual.transformer.resblocks.", width),
        )
    elif "visual.attnpool.positional_embedding" in state_dict:
        width = state_dict["visual.layer1.0.conv1.weight"].shape[0]
        grid = round((state_dict["visual.attnpool.positional_embedding"].shape[0] - 1) ** 0.5)
        values.update(
            image_size=grid * 32,
            vision_n_embd=width,
            vision_layers=[count_blocks(f"visual.layer{stage}.") for stage in (1, 2, 3, 4)],
            vision_n_head=vision_n_head or width * 32 // 64,
        )
    else:
        raise ValueError(
            "not CLIP weights: no visual.proj (ViT), visual.attn_pool (SigLIP) or visual.attnpool (ResNet)"
        )
    return CLIPConfig(**values)


HF_ACTIVATIONS = {"gelu": "gelu", "quick_gelu": "quick_gelu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh"}
HF_ACTIVATION_NAMES = {"gelu": "gelu", "quick_gelu": "quick_gelu", "gelu_tanh": "gelu_pytorch_tanh"}
HF_MODEL_TYPES = ("clip", "siglip")


def hf_config(config: CLIPConfig) -> dict[str, Any]:
    """The config.json of a Hugging Face CLIPModel (or SiglipModel, for SigLIP) with our sizes."""
    if config.is_resnet:
        raise ValueError("Hugging Face CLIPModel has no ResNet image tower; only ViT CLIP models convert to it")
    if config.text_pooling == "first_eos" and config.eos_id == HF_LEGACY_ARGMAX_EOS:
        raise ValueError(
            f"text_pooling first_eos with eos_id {config.eos_id} cannot be written for Hugging Face: transformers "
            f"reads eos_token_id {HF_LEGACY_ARGMAX_EOS} as argmax pooling"
        )
    if config.text_pooling == "last" and not config.is_siglip:
        raise ValueError("text_pooling last on a CLIP text tower has no Hugging Face CLIPModel equivalent")
    text: dict[str, Any] = {
        "vocab_size": config.vocab_size,
        "hidden_size": config.text_n_embd,
        "intermediate_size": config.text_mlp_width or 4 * config.text_n_embd,
        "num_hidden_layers": config.text_n_layer,
        "num_attention_heads": config.text_n_head,
        "max_position_embeddings": config.context_length,
        "hidden_act": HF_ACTIVATION_NAMES[config.text_act],
        "layer_norm_eps": config.norm_eps,
    }
    vision: dict[str, Any] = {
        "hidden_size": config.vision_n_embd,
        "intermediate_size": config.vision_mlp_width or 4 * config.vision_n_embd,
        "num_hidden_layers": config.vision_n_layer,
        "num_attention_heads": config.vision_n_head,
        "image_size": config.image_size,
        "patch_size": config.vision_patch_size,
        "num_channels": 3,
        "hidden_act": HF_ACTIVATION_NAMES[config.activation],
        "layer_norm_eps": config.norm_eps,
    }
    if config.is_siglip:
        return {
            "architectures": ["SiglipModel"],
            "model_type": "siglip",
            "text_config": {"model_type": "siglip_text_model", "projection_size": config.embed_dim, **text},
            "vision_config": {"model_type": "siglip_vision_model", **vision},
        }
    # argmax pooling is written as transformers' legacy eos_token_id 2, which selects exactly argmax pooling.
    eos_token_id = HF_LEGACY_ARGMAX_EOS if config.text_pooling == "argmax" else config.eos_id
    return {
        "architectures": ["CLIPModel"],
        "model_type": "clip",
        "projection_dim": config.embed_dim,
        "logit_scale_init_value": 2.6592,
        "text_config": {
            "model_type": "clip_text_model",
            **text,
            "eos_token_id": eos_token_id,
            # OpenAI's vocabulary ends with <|startoftext|>, <|endoftext|>; other tokenizers' start ids are not kept.
            "bos_token_id": config.vocab_size - 2 if config.text_pooling == "argmax" else None,
            "pad_token_id": 0,
            "projection_dim": config.embed_dim,
        },
        "vision_config": {"model_type": "clip_vision_model", **vision, "projection_dim": config.embed_dim},
    }


def hf_preprocessor_config(config: CLIPConfig) -> dict[str, Any]:
    """preprocessor_config.json for transformers' CLIPImageProcessor (SiglipImageProcessor): size, mean and std."""
    size = config.image_size
    common = {"do_convert_rgb": True, "do_resize": True, "resample": 3, "do_rescale": True, "rescale_factor": 1 / 255}
    normalise = {"do_normalize": True, "image_mean": list(config.image_mean), "image_std": list(config.image_std)}
    if config.is_siglip:  # SigLIP resizes to the square without cropping
        return {
            "image_processor_type": "SiglipImageProcessor",
            **common,
            "size": {"height": size, "width": size},
            **normalise,
        }
    return {
        "image_processor_type": "CLIPImageProcessor",
        **common,  # bicubic, as OpenAI's preprocessing
        "size": {"shortest_edge": size},
        "do_center_crop": True,
        "crop_size": {"height": size, "width": size},
        **normalise,
    }


def config_from_hf(
    values: dict[str, Any],
    state_dict: dict[str, torch.Tensor],
    preprocessor: dict[str, Any] | None = None,
    quick_gelu: bool | None = None,
) -> CLIPConfig:
    """CLIPConfig for our weights converted from a Hugging Face CLIPModel or SiglipModel with config.json `values`."""
    siglip = values.get("model_type") == "siglip"
    text = {**(values.get("text_config") or {}), **(values.get("text_config_dict") or {})}
    vision = {**(values.get("vision_config") or {}), **(values.get("vision_config_dict") or {})}
    default_act, default_eps = ("gelu_pytorch_tanh", 1e-6) if siglip else ("quick_gelu", 1e-5)
    activations = {}
    for tower, settings in (("vision", vision), ("text", text)):
        name = settings.get("hidden_act", default_act)
        if quick_gelu is not None:
            activations[tower] = "quick_gelu" if quick_gelu else "gelu"
        elif name in HF_ACTIVATIONS:
            activations[tower] = HF_ACTIVATIONS[name]
        else:
            raise ValueError(
                f"Hugging Face {tower}_config hidden_act {name!r}: expected one of {', '.join(HF_ACTIVATIONS)}; "
                f"pass quick_gelu=True or False to choose"
            )
    epsilons = {settings.get("layer_norm_eps", default_eps) for settings in (text, vision)}
    if len(epsilons) != 1:
        raise ValueError(
            f"Hugging Face config layer_norm_eps {' / '.join(str(eps) for eps in sorted(epsilons))}: clipdalle uses "
            f"one epsilon for both towers"
        )
    eos_token_id = text.get("eos_token_id", 49407)  # transformers' CLIPTextConfig default
    preprocessor = preprocessor or {}
    default_mean = [0.5, 0.5, 0.5] if siglip else None  # SigLIP normalises to [-1, 1]
    return config_from_state_dict(
        state_dict,
        activation=activations["vision"],
        text_activation=activations["text"],
        vision_n_head=vision.get("num_attention_heads", 12),
        text_n_head=text.get("num_attention_heads", 12 if siglip else 8),
        image_mean=preprocessor.get("image_mean", default_mean),
        image_std=preprocessor.get("image_std", default_mean),
        text_pooling="argmax" if eos_token_id == HF_LEGACY_ARGMAX_EOS else "first_eos",
        eos_id=eos_token_id if isinstance(eos_token_id, int) and not siglip else CLIPConfig.eos_id,
        norm_eps=epsilons.pop(),
    )


def open_clip_config(config: CLIPConfig) -> dict[str, Any]:
    """open_clip_config.json for our weights in OpenAI names (what open_clip's hub loader reads)."""
    if config.is_siglip:
        raise ValueError("open_clip builds SigLIP image towers from timm; convert SigLIP models with --to hf")
    vision: dict[str, Any] = {"image_size": config.image_size, "width": config.vision_n_embd}
    if config.is_resnet:
        vision.update(layers=list(config.vision_layers), head_width=config.vision_n_embd * 32 // config.vision_n_head)
    else:
        vision.update(
            layers=config.vision_n_layer,
            patch_size=config.vision_patch_size,
            head_width=config.vision_n_embd // config.vision_n_head,
        )
        if config.vision_mlp_width:
            vision["mlp_ratio"] = config.vision_mlp_width / config.vision_n_embd
    text: dict[str, Any] = {
        "context_length": config.context_length,
        "vocab_size": config.vocab_size,
        "width": config.text_n_embd,
        "heads": config.text_n_head,
        "layers": config.text_n_layer,
    }
    if config.text_mlp_width:
        text["mlp_ratio"] = config.text_mlp_width / config.text_n_embd
    if config.text_activation or config.activation == "gelu_tanh" or config.norm_eps != 1e-5:
        raise ValueError(
            "open_clip's CLIP towers share one activation (gelu or quick_gelu) and LayerNorm eps 1e-5; keep the "
            "clipdalle run directory, or convert with --to hf"
        )
    return {
        "model_cfg": {
            "embed_dim": config.embed_dim,
            "quick_gelu": config.activation == "quick_gelu",
            "vision_cfg": vision,
            "text_cfg": text,
        },
        "preprocess_cfg": {"mean": list(config.image_mean), "std": list(config.image_std)},
    }


# Settings of open_clip towers we implement; any other setting that is set (truthy) is refused.
OPEN_CLIP_TOWER_KEYS = {
    "vision_cfg": {
        "image_size", "layers", "width", "head_width", "patch_size", "mlp_ratio", "pool_type",
        "timm_model_name", "timm_model_pretrained", "timm_pool", "timm_proj",
    },
    "text_cfg": {
        "context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio", "pool_type", "no_causal_mask",
        "proj_bias", "norm_kwargs", "act_kwargs",
    },
}  # fmt: skip
OPEN_CLIP_MODEL_KEYS = {
    "embed_dim", "quick_gelu", "vision_cfg", "text_cfg", "init_logit_scale", "init_logit_bias", "custom_text",
}  # fmt: skip
OPEN_CLIP_HARMLESS = {"hf_tokenizer_name", "tokenizer_kwargs"}  # which tokenizer: not the model's concern


def config_from_open_clip(
    values: dict[str, Any], state_dict: dict[str, torch.Tensor], quick_gelu: bool | None = None
) -> CLIPConfig:
    """CLIPConfig from an open_clip_config.json ({"model_cfg": ..., "preprocess_cfg": ...}) and its weights in our
    names: a CLIP (open_clip's own towers) or a SigLIP (a timm SigLIP image tower and a bidirectional text tower)."""
    model_cfg = values.get("model_cfg", values)
    vision = model_cfg.get("vision_cfg") or {}
    text = model_cfg.get("text_cfg") or {}
    unsupported = [
        f"{name}={value!r}" for name, value in model_cfg.items() if name not in OPEN_CLIP_MODEL_KEYS and value
    ]
    for section, settings in (("vision_cfg", vision), ("text_cfg", text)):
        allowed = OPEN_CLIP_TOWER_KEYS[section] | OPEN_CLIP_HARMLESS
        unsupported += [
            f"{section}.{name}={value!r}" for name, value in settings.items() if name not in allowed and value
        ]
    timm_name = vision.get("timm_model_name")
    siglip = timm_name is not None
    if siglip and timm_name not in TIMM_SIGLIP_TOWERS:
        unsupported.append(f"vision_cfg.timm_model_name={timm_name!r} (clipdalle reads timm's SigLIP ViTs)")
    expected = (
        {"timm_pool": "map", "timm_proj": "none", "pool_type": "last", "no_causal_mask": True, "proj_bias": True}
        if siglip
        else {"pool_type": "tok", "text_pool_type": "argmax", "no_causal_mask": False, "proj_bias": False}
    )
    found = {
        "timm_pool": vision.get("timm_pool", "avg"),
        "timm_proj": vision.get("timm_proj", "linear"),
        "pool_type": text.get("pool_type", "argmax") if siglip else vision.get("pool_type", "tok"),
        "text_pool_type": text.get("pool_type", "argmax"),
        "no_causal_mask": bool(text.get("no_causal_mask", False)),
        "proj_bias": bool(text.get("proj_bias", False)),
    }
    unsupported += [
        f"{name}={found[name]!r} (expected {value!r})" for name, value in expected.items() if found[name] != value
    ]
    if unsupported:
        raise ValueError(f"open_clip settings not supported by clipdalle's CLIP: {', '.join(unsupported)}")
    if quick_gelu is None:
        quick_gelu = bool(model_cfg.get("quick_gelu", False))
    approximate = (text.get("act_kwargs") or {}).get("approximate", "none")
    text_activation = "quick_gelu" if quick_gelu else ("gelu_tanh" if approximate == "tanh" else "gelu")
    text_eps = (text.get("norm_kwargs") or {}).get("eps", 1e-5)
    vision_eps = 1e-6 if siglip else 1e-5  # timm's ViT LayerNorm; open_clip's own towers
    if text_eps != vision_eps:
        raise ValueError(f"open_clip text_cfg.norm_kwargs eps {text_eps}: clipdalle's towers share eps {vision_eps}")
    preprocess_cfg = values.get("preprocess_cfg") or {}
    if siglip:
        vision_n_head, activation = TIMM_SIGLIP_TOWERS[timm_name]
    else:
        vision_width = vision.get("width", 768)
        is_resnet = isinstance(vision.get("layers"), (list, tuple))
        vision_n_head = (vision_width * 32 if is_resnet else vision_width) // vision.get("head_width", 64)
        activation = text_activation
    return config_from_state_dict(
        state_dict,
        activation=activation,
        text_activation=text_activation,
        vision_n_head=vision_n_head,
        text_n_head=text.get("heads", 8),
        image_mean=preprocess_cfg.get("mean"),
        image_std=preprocess_cfg.get("std"),
        norm_eps=vision_eps,
    )


# ------------------------------------------------------------------------------------------ reading


def is_torchscript(path: str | Path) -> bool:
    """TorchScript archives are zip files with a code/ folder; torch.save zips have data.pkl and no code."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any("/code/" in name or name.endswith("/constants.pkl") for name in archive.namelist())


STORAGE_DTYPES = {
    "FloatStorage": torch.float32,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "DoubleStorage": torch.float64,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}


class _ScriptedModule:
    """Stands for any `__torch__.*` class of a TorchScript archive: keeps its attributes, runs nothing."""

    def __setstate__(self, state: Any) -> None:
        self.state = state if isinstance(state, dict) else {}


def _rebuild_tensor(storage: torch.Tensor, offset: int, size: tuple, stride: tuple, *_: Any) -> torch.Tensor:
    return storage.as_strided(size, stride, offset)


class _TensorsOnlyUnpickler(pickle.Unpickler):
    """Reads a TorchScript archive's data.pkl allowing tensors, storages, dicts and attribute holders only: the
    same guarantee as torch.load(weights_only=True), which refuses TorchScript archives outright."""

    def __init__(self, file: Any, archive: zipfile.ZipFile, root: str):
        super().__init__(file)
        self.archive, self.root = archive, root

    def find_class(self, module: str, name: str) -> Any:
        if module.startswith("__torch__"):
            return _ScriptedModule
        if (module, name) in (("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_tensor")):
            return _rebuild_tensor
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if module == "torch" and name in STORAGE_DTYPES:
            return STORAGE_DTYPES[name]
        raise pickle.UnpicklingError(f"refusing {module}.{name}: only tensors are read from a TorchScript archive")

    def persistent_load(self, pid: Any) -> torch.Tensor:
        _, dtype, key, _, numel = pid  # ("storage", dtype, key, location, numel)
        data = bytearray(self.archive.read(f"{self.root}data/{key}"))
        if not data:
            return torch.empty(0, dtype=dtype)
        return torch.frombuffer(data, dtype=dtype)[:numel]


def read_torchscript_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The parameters and buffers of a TorchScript archive (OpenAI's release files), by attribute path, without
    running any of its code."""
    with zipfile.ZipFile(path) as archive:
        pickle_name = next((name for name in archive.namelist() if name.endswith("data.pkl")), None)
        if pickle_name is None:
            raise ValueError(f"{path}: a TorchScript archive without data.pkl")
        root = pickle_name[: -len("data.pkl")]
        with archive.open(pickle_name) as handle:
            try:
                top = _TensorsOnlyUnpickler(handle, archive, root).load()
            except (pickle.UnpicklingError, KeyError, ValueError, TypeError) as error:
                raise ValueError(f"{path}: not a TorchScript archive of weights ({error})") from None
    tensors: dict[str, torch.Tensor] = {}

    def collect(module: Any, prefix: str) -> None:
        for name, value in getattr(module, "state", {}).items():
            if isinstance(value, torch.Tensor):
                tensors[prefix + name] = value
            elif isinstance(value, _ScriptedModule):
                collect(value, f"{prefix}{name}.")

    collect(top, "")
    return tensors


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A weights file as a flat dict of tensors: .safetensors, a TorchScript archive's tensors, or a torch pickle
    read with weights_only=True. Nothing in a file can run code."""
    return _read_weights_file(Path(path))[0]


def _read_weights_file(path: Path) -> tuple[dict[str, torch.Tensor], str]:
    """(tensors, kind): kind is safetensors | torchscript | state_dict | training_checkpoint."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu"), "safetensors"
        except Exception as error:  # safetensors raises its own SafetensorError for a damaged header
            raise ValueError(f"{path}: not a readable safetensors file ({error})") from None
    if is_torchscript(path):
        return read_torchscript_weights(path), "torchscript"
    try:
        values = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle and zip errors have many types; the message names the file either way
        first_line = next((line for line in str(error).splitlines() if line.strip()), "")
        raise ValueError(f"{path}: not a readable weights file ({type(error).__name__}: {first_line})") from None
    kind = "state_dict"
    if isinstance(values, dict) and isinstance(values.get("state_dict"), dict):  # an open_clip training checkpoint
        values, kind = values["state_dict"], "training_checkpoint"
    if not isinstance(values, dict) or not all(isinstance(tensor, torch.Tensor) for tensor in values.values()):
        raise ValueError(f"{path}: expected a state dict of tensors, found {type(values).__name__}")
    return values, kind


def clean_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drops DDP/compile prefixes and TorchScript's extra integers, casts fp16/bf16 weights to fp32, and renames
    open_clip's timm SigLIP towers."""
    cleaned = {}
    for key, tensor in state_dict.items():
        for prefix in ("module.", "_orig_mod."):
            key = key.removeprefix(prefix)
        if key in TORCHSCRIPT_EXTRAS or key.endswith("attn_mask"):
            continue
        cleaned[key] = tensor.float() if tensor.is_floating_point() else tensor
    if any(key.startswith("visual.trunk.") for key in cleaned):
        cleaned = timm_to_openai(cleaned)
    return cleaned


def read_checkpoint(
    path: str | Path, *, quick_gelu: bool | None = None, open_clip_config: dict[str, Any] | None = None
) -> ForeignCheckpoint:
    """Config and OpenAI-named fp32 weights from an OpenAI, open_clip or Hugging Face checkpoint on disk. A bare
    open_clip weights file takes its model's `open_clip_config` (what open_clip_config.json holds) when given."""
    path = Path(path)
    if path.is_dir():
        if (path / OPEN_CLIP_CONFIG).is_file():
            return _read_open_clip_directory(path, quick_gelu)
        if (path / "config.json").is_file():
            values = read_json(path / "config.json")
            model_type = values.get("model_type")
            if model_type in HF_MODEL_TYPES:
                return _read_hf_directory(path, values, quick_gelu)
            found = f"config.json with model_type {model_type!r}"
            if model_type == "siglip2":
                found += ": SigLIP 2's NaFlex variant (variable resolution) is not supported, its fixed-size ones are"
        else:
            found = f"files {', '.join(sorted(item.name for item in path.iterdir())[:8]) or 'none'}"
        raise ValueError(
            f"{path}: not a CLIP checkpoint clipdalle reads (found {found}); expected a clipdalle run, an open_clip "
            f"directory ({OPEN_CLIP_CONFIG}) or a Hugging Face CLIPModel or SiglipModel directory"
        )
    raw, kind = _read_weights_file(path)
    state_dict = clean_state_dict(raw)
    if any(key.startswith(("text_model.", "vision_model.")) for key in state_dict):
        raise ValueError(f"{path}: Hugging Face CLIP weights; pass the directory that holds them with its config.json")
    if "token_embedding.weight" not in state_dict or not any(key.startswith("visual.") for key in state_dict):
        keys = ", ".join(list(state_dict)[:5]) or "none"
        raise ValueError(f"{path}: not OpenAI/open_clip CLIP weights (found keys {keys}, ...)")
    if open_clip_config is not None:
        config = config_from_open_clip(open_clip_config, state_dict, quick_gelu)
        return ForeignCheckpoint(config, state_dict, "open_clip", tokenizer_beside(path.parent))
    if "visual.attn_pool.probe" in state_dict:
        raise ValueError(f"{path}: SigLIP weights without their open_clip_config.json; pass the directory holding both")
    # OpenAI's files (TorchScript archives, or their state dicts saved as .pt) are QuickGELU models; open_clip's
    # .bin/.safetensors and training checkpoints use GELU unless the model name says "-quickgelu".
    is_openai = kind == "torchscript" or (kind == "state_dict" and path.suffix in (".pt", ".pth"))
    layout = {"torchscript": "openai-torchscript", "state_dict": "openai"}[kind] if is_openai else "open_clip"
    if quick_gelu is None:
        quick_gelu = is_openai or "quickgelu" in path.name.lower()
    config = config_from_state_dict(state_dict, activation="quick_gelu" if quick_gelu else "gelu")
    return ForeignCheckpoint(config, state_dict, layout, tokenizer_beside(path.parent))


def _read_open_clip_directory(path: Path, quick_gelu: bool | None) -> ForeignCheckpoint:
    (weights,) = weights_files(path)
    state_dict = clean_state_dict(read_state_dict(weights))
    config = config_from_open_clip(read_json(path / OPEN_CLIP_CONFIG), state_dict, quick_gelu)
    return ForeignCheckpoint(config, state_dict, "open_clip", tokenizer_beside(path))


def weights_files(folder: Path) -> list[Path]:
    """The weights files a CLIP directory's loader reads, in order: an open_clip directory's first of
    OPEN_CLIP_WEIGHTS; a Hugging Face directory's shards (listed by model.safetensors.index.json) or its first of
    HF_WEIGHTS. What an index hashes, so the hash is of the loaded weights."""
    if (folder / OPEN_CLIP_CONFIG).is_file():
        return [_first_existing(folder, OPEN_CLIP_WEIGHTS)]
    index = folder / HF_WEIGHTS_INDEX
    if index.is_file():
        shards = sorted(set(read_json(index).get("weight_map", {}).values()))
        if not shards:
            raise ValueError(f"{index}: no weight_map; expected the shard file of every weight")
        return [folder / shard for shard in shards]
    return [_first_existing(folder, HF_WEIGHTS)]


def read_hf_weights(folder: Path) -> dict[str, torch.Tensor]:
    """model.safetensors, the shards a model.safetensors.index.json lists, or pytorch_model.bin."""
    tensors: dict[str, torch.Tensor] = {}
    for weights in weights_files(folder):
        tensors.update(read_state_dict(weights))
    return tensors


def _read_hf_directory(path: Path, values: dict[str, Any], quick_gelu: bool | None) -> ForeignCheckpoint:
    siglip = values["model_type"] == "siglip"
    state_dict = clean_state_dict(hf_to_openai(read_hf_weights(path), siglip=siglip))
    preprocessor_path = path / "preprocessor_config.json"
    preprocessor = read_json(preprocessor_path) if preprocessor_path.is_file() else None
    config = config_from_hf(values, state_dict, preprocessor, quick_gelu)
    return ForeignCheckpoint(config, state_dict, "hf", tokenizer_beside(path))


def _first_existing(folder: Path, names: tuple[str, ...]) -> Path:
    for name in names:
        if (folder / name).is_file():
            return folder / name
    found = ", ".join(sorted(item.name for item in folder.iterdir())[:8]) or "nothing"
    raise ValueError(f"{folder}: no weights file ({' or '.join(names)}); found {found}")


TOKENIZER_FILES = ("vocab.json", "merges.txt", OPENAI_MERGES_FILE, "spiece.model", "tokenizer.json")


def tokenizer_beside(folder: Path) -> Path | None:
    """The tokenizer in `folder`: OpenAI's merges file, or the folder when it holds a Hugging Face tokenizer
    (vocab.json + merges.txt for CLIP; spiece.model or tokenizer.json for SigLIP)."""
    if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        return folder
    if (folder / OPENAI_MERGES_FILE).is_file():
        return folder / OPENAI_MERGES_FILE
    if (folder / "spiece.model").is_file() or (folder / "tokenizer.json").is_file():
        return folder
    return None


# ------------------------------------------------------------------------------------------ writing


def read_any(path: str | Path, *, quick_gelu: bool | None = None) -> tuple[CLIPConfig, dict[str, torch.Tensor]]:
    """Config and OpenAI-named weights from a clipdalle run or any layout `read_checkpoint` reads."""
    path = Path(path)
    if checkpoint.is_run(path):
        values = checkpoint.read_config(path)
        if values["clipdalle"]["model_type"] != "clip":
            raise ValueError(f"{path}: is a {values['clipdalle']['model_type']} run, expected a clip run")
        config = from_dict(CLIPConfig, values.get("model", {}), source=str(path / checkpoint.CONFIG_FILE))
        return config, read_state_dict(path / checkpoint.WEIGHTS_FILE)
    found = read_checkpoint(path, quick_gelu=quick_gelu)
    return found.config, found.state_dict


def convert(
    src: str | Path,
    dst: str | Path,
    to: str = "hf",
    *,
    quick_gelu: bool | None = None,
) -> Path:
    """Writes the CLIP at `src` (any layout `load` reads) in another layout, with safetensors weights.

    to="hf": a directory with config.json, preprocessor_config.json and model.safetensors for transformers'
    CLIPModel. to="openai": OpenAI/open_clip names; `dst` ending in .safetensors is a bare weights file, else a
    directory with open_clip_model.safetensors and open_clip_config.json (which keeps heads and activation)."""
    from safetensors.torch import save_file

    if to not in ("hf", "openai"):
        raise ValueError(f"convert: to={to!r}; expected 'hf' or 'openai'")
    config, state_dict = read_any(src, quick_gelu=quick_gelu)
    dst = Path(dst)

    def write_weights(path: Path, tensors: dict[str, torch.Tensor]) -> None:
        contiguous = {key: tensor.contiguous() for key, tensor in tensors.items()}
        atomic_write(path, lambda tmp: save_file(contiguous, str(tmp), metadata={"format": "pt"}))

    if to == "openai" and config.is_siglip:
        raise ValueError(f"{src}: open_clip builds SigLIP image towers from timm; convert SigLIP models with to='hf'")
    if to == "openai" and config.text_pooling != "argmax":
        raise ValueError(
            f"{src}: text_pooling {config.text_pooling} (eos_id {config.eos_id}) has no OpenAI/open_clip equivalent "
            f"(they pool at argmax); keep the clipdalle run directory, or convert to='hf'"
        )
    if to == "hf":
        hf_values = hf_config(config)
        write_weights(dst / "model.safetensors", openai_to_hf(state_dict, siglip=config.is_siglip))
        write_json(dst / "preprocessor_config.json", hf_preprocessor_config(config))
        write_json(dst / "config.json", hf_values)
    elif dst.suffix == ".safetensors":
        write_weights(dst, state_dict)
    else:
        write_weights(dst / OPEN_CLIP_WEIGHTS[0], state_dict)
        write_json(dst / OPEN_CLIP_CONFIG, open_clip_config(config))
    return dst
