"""CLIP weights in other layouts: reading OpenAI, open_clip and Hugging Face checkpoints, and writing them.

Our parameter names are OpenAI's (and open_clip's), so those state dicts load as they are; Hugging Face's
`CLIPModel` differs by a rename table, separate q/k/v projections and transposed projection matrices. Sizes
are read from the weights as OpenAI's `build_model` does; what the weights cannot tell (the activation, the
number of heads, the pixel mean and std) comes from the layout's config file or its documented default.

    found = read_checkpoint("ViT-B-32.pt")                 # config + OpenAI-named fp32 state dict
    convert("ViT-B-32.pt", "vit-b-32-hf", to="hf")         # a directory transformers' CLIPModel loads
"""

from __future__ import annotations

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


@dataclass
class ForeignCheckpoint:
    config: CLIPConfig  # sizes from the weights, the rest from the layout's config or defaults
    state_dict: dict[str, torch.Tensor]  # OpenAI names, floating tensors in fp32
    layout: str  # openai | openai-torchscript | open_clip | hf
    tokenizer_path: Path | None  # tokenizer files found beside the weights (None: use an installed one)


# ------------------------------------------------------------------------------------------ rename tables


def openai_to_hf(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """OpenAI-named CLIP ViT weights -> Hugging Face CLIPModel names (q/k/v split, projections transposed)."""
    if any(key.startswith("visual.layer1.") for key in state_dict):
        raise ValueError("Hugging Face CLIPModel has no ResNet image tower; only ViT CLIP models convert to it")
    if "logit_bias" in state_dict:
        raise ValueError("Hugging Face CLIPModel has no logit_bias; SigLIP-trained models do not convert to it")
    converted: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        if key in RENAMES:
            converted[RENAMES[key]] = tensor
        elif key in TRANSPOSED_RENAMES:
            converted[TRANSPOSED_RENAMES[key]] = tensor.t().contiguous()
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


def hf_to_openai(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Hugging Face CLIPModel weights -> OpenAI names (q/k/v merged into in_proj, projections transposed)."""
    renames = {hf: openai for openai, hf in RENAMES.items()}
    transposed = {hf: openai for openai, hf in TRANSPOSED_RENAMES.items()}
    prefixes = {hf: openai for openai, hf in BLOCK_PREFIXES.items()}
    block_renames = {hf: openai for openai, hf in BLOCK_RENAMES.items()}
    converted: dict[str, torch.Tensor] = {}
    projections: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state_dict.items():
        if key.endswith("position_ids"):  # a buffer older transformers versions saved; not a weight
            continue
        if key in renames:
            converted[renames[key]] = tensor
        elif key in transposed:
            converted[transposed[key]] = tensor.t().contiguous()
        else:
            prefix, index, name = _split_block_key(key, prefixes)
            openai_prefix = f"{prefixes[prefix]}{index}."
            match = re.fullmatch(r"self_attn\.(q_proj|k_proj|v_proj)\.(weight|bias)", name)
            if match:
                fused = f"{openai_prefix}attn.in_proj_{match.group(2)}"
                projections.setdefault(fused, {})[match.group(1)] = tensor
            elif name in block_renames:
                converted[openai_prefix + block_renames[name]] = tensor
            else:
                raise ValueError(f"unknown Hugging Face CLIP weight {key!r}")
    for fused, parts in projections.items():
        if set(parts) != set(QKV):
            raise ValueError(f"Hugging Face CLIP weights: {fused} lacks {', '.join(sorted(set(QKV) - set(parts)))}")
        converted[fused] = torch.cat([parts[name] for name in QKV], dim=0)
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
) -> CLIPConfig:
    """Sizes from OpenAI-named weights (OpenAI's build_model rules; heads default to width // 64)."""
    required = ("token_embedding.weight", "positional_embedding", "text_projection", "ln_final.weight")
    missing = [key for key in required if key not in state_dict]
    if missing:
        raise ValueError(f"not CLIP weights: missing {', '.join(missing)}")

    def count_blocks(prefix: str) -> int:
        return len({key[len(prefix) :].split(".")[0] for key in state_dict if key.startswith(prefix)})

    text_width = state_dict["ln_final.weight"].shape[0]
    values: dict[str, Any] = {
        "embed_dim": state_dict["text_projection"].shape[1],
        "context_length": state_dict["positional_embedding"].shape[0],
        "vocab_size": state_dict["token_embedding.weight"].shape[0],
        "text_n_embd": text_width,
        "text_n_layer": count_blocks("transformer.resblocks."),
        "text_n_head": text_n_head or max(1, text_width // 64),
        "activation": activation,
        "image_mean": list(image_mean or OPENAI_IMAGE_MEAN),
        "image_std": list(image_std or OPENAI_IMAGE_STD),
        "text_pooling": text_pooling,
        "eos_id": eos_id,
        "loss": "siglip" if "logit_bias" in state_dict else "contrastive",
    }
    if "visual.proj" in state_dict:
        width, _, patch, _ = state_dict["visual.conv1.weight"].shape
        grid = round((state_dict["visual.positional_embedding"].shape[0] - 1) ** 0.5)
        values.update(
            image_size=patch * grid,
            vision_patch_size=patch,
            vision_n_embd=width,
            vision_n_layer=count_blocks("visual.transformer.resblocks."),
            vision_n_head=vision_n_head or max(1, width // 64),
            vision_layers=[],
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
        raise ValueError("not CLIP weights: no visual.proj (ViT) and no visual.attnpool (ResNet)")
    return CLIPConfig(**values)


def hf_config(config: CLIPConfig) -> dict[str, Any]:
    """The config.json of a Hugging Face CLIPModel with our sizes."""
    if config.is_resnet:
        raise ValueError("Hugging Face CLIPModel has no ResNet image tower; only ViT CLIP models convert to it")
    if config.text_pooling == "first_eos" and config.eos_id == HF_LEGACY_ARGMAX_EOS:
        raise ValueError(
            f"text_pooling first_eos with eos_id {config.eos_id} cannot be written for Hugging Face: transformers "
            f"reads eos_token_id {HF_LEGACY_ARGMAX_EOS} as argmax pooling"
        )
    # argmax pooling is written as transformers' legacy eos_token_id 2, which selects exactly argmax pooling.
    eos_token_id = HF_LEGACY_ARGMAX_EOS if config.text_pooling == "argmax" else config.eos_id
    common = {"hidden_act": config.activation, "layer_norm_eps": 1e-5, "projection_dim": config.embed_dim}
    return {
        "architectures": ["CLIPModel"],
        "model_type": "clip",
        "projection_dim": config.embed_dim,
        "logit_scale_init_value": 2.6592,
        "text_config": {
            "model_type": "clip_text_model",
            "vocab_size": config.vocab_size,
            "hidden_size": config.text_n_embd,
            "intermediate_size": 4 * config.text_n_embd,
            "num_hidden_layers": config.text_n_layer,
            "num_attention_heads": config.text_n_head,
            "max_position_embeddings": config.context_length,
            "eos_token_id": eos_token_id,
            # OpenAI's vocabulary ends with <|startoftext|>, <|endoftext|>; other tokenizers' start ids are not kept.
            "bos_token_id": config.vocab_size - 2 if config.text_pooling == "argmax" else None,
            "pad_token_id": 0,
            **common,
        },
        "vision_config": {
            "model_type": "clip_vision_model",
            "hidden_size": config.vision_n_embd,
            "intermediate_size": 4 * config.vision_n_embd,
            "num_hidden_layers": config.vision_n_layer,
            "num_attention_heads": config.vision_n_head,
            "image_size": config.image_size,
            "patch_size": config.vision_patch_size,
            "num_channels": 3,
            **common,
        },
    }


def hf_preprocessor_config(config: CLIPConfig) -> dict[str, Any]:
    """preprocessor_config.json for transformers' CLIPImageProcessor: our size, mean and std."""
    return {
        "image_processor_type": "CLIPImageProcessor",
        "do_convert_rgb": True,
        "do_resize": True,
        "size": {"shortest_edge": config.image_size},
        "resample": 3,  # bicubic, as OpenAI's preprocessing
        "do_center_crop": True,
        "crop_size": {"height": config.image_size, "width": config.image_size},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(config.image_mean),
        "image_std": list(config.image_std),
    }


def config_from_hf(
    values: dict[str, Any],
    state_dict: dict[str, torch.Tensor],
    preprocessor: dict[str, Any] | None = None,
    quick_gelu: bool | None = None,
) -> CLIPConfig:
    """CLIPConfig for OpenAI-named weights converted from a Hugging Face CLIPModel with config.json `values`."""
    text = {**(values.get("text_config") or {}), **(values.get("text_config_dict") or {})}
    vision = {**(values.get("vision_config") or {}), **(values.get("vision_config_dict") or {})}
    activations = {text.get("hidden_act", "quick_gelu"), vision.get("hidden_act", "quick_gelu")}
    if quick_gelu is not None:
        activation = "quick_gelu" if quick_gelu else "gelu"
    elif len(activations) == 1 and activations <= {"gelu", "quick_gelu"}:
        (activation,) = activations
    else:
        raise ValueError(
            f"Hugging Face config hidden_act {' / '.join(sorted(activations))}: expected gelu or quick_gelu, the "
            f"same in both towers; pass quick_gelu=True or False to choose"
        )
    for tower, settings, width in (("text", text, "ln_final.weight"), ("vision", vision, "visual.ln_post.weight")):
        hidden = state_dict[width].shape[0]
        if settings.get("intermediate_size", 4 * hidden) != 4 * hidden:
            raise ValueError(
                f"Hugging Face {tower}_config intermediate_size {settings['intermediate_size']}: clipdalle's CLIP "
                f"has an MLP 4x the width ({4 * hidden})"
            )
        if abs(settings.get("layer_norm_eps", 1e-5) - 1e-5) > 1e-12:
            raise ValueError(f"Hugging Face {tower}_config layer_norm_eps {settings['layer_norm_eps']}: expected 1e-05")
    eos_token_id = text.get("eos_token_id", 49407)  # transformers' CLIPTextConfig default
    preprocessor = preprocessor or {}
    return config_from_state_dict(
        state_dict,
        activation=activation,
        vision_n_head=vision.get("num_attention_heads", 12),
        text_n_head=text.get("num_attention_heads", 8),
        image_mean=preprocessor.get("image_mean"),
        image_std=preprocessor.get("image_std"),
        text_pooling="argmax" if eos_token_id == HF_LEGACY_ARGMAX_EOS else "first_eos",
        eos_id=eos_token_id,
    )


def open_clip_config(config: CLIPConfig) -> dict[str, Any]:
    """open_clip_config.json for our weights in OpenAI names (what open_clip's hub loader reads)."""
    vision: dict[str, Any] = {"image_size": config.image_size, "width": config.vision_n_embd}
    if config.is_resnet:
        vision.update(layers=list(config.vision_layers), head_width=config.vision_n_embd * 32 // config.vision_n_head)
    else:
        vision.update(
            layers=config.vision_n_layer,
            patch_size=config.vision_patch_size,
            head_width=config.vision_n_embd // config.vision_n_head,
        )
    return {
        "model_cfg": {
            "embed_dim": config.embed_dim,
            "quick_gelu": config.activation == "quick_gelu",
            "vision_cfg": vision,
            "text_cfg": {
                "context_length": config.context_length,
                "vocab_size": config.vocab_size,
                "width": config.text_n_embd,
                "heads": config.text_n_head,
                "layers": config.text_n_layer,
            },
        },
        "preprocess_cfg": {"mean": list(config.image_mean), "std": list(config.image_std)},
    }


# Settings of open_clip towers we implement; any other setting that is set (truthy) is refused.
OPEN_CLIP_TOWER_KEYS = {
    "vision_cfg": {"image_size", "layers", "width", "head_width", "patch_size", "mlp_ratio", "pool_type"},
    "text_cfg": {"context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio", "pool_type"},
}
OPEN_CLIP_MODEL_KEYS = {"embed_dim", "quick_gelu", "vision_cfg", "text_cfg", "init_logit_scale", "init_logit_bias"}
OPEN_CLIP_HARMLESS = {"hf_tokenizer_name", "tokenizer_kwargs"}  # which tokenizer: not the model's concern


def config_from_open_clip(
    values: dict[str, Any], state_dict: dict[str, torch.Tensor], quick_gelu: bool | None = None
) -> CLIPConfig:
    """CLIPConfig from an open_clip_config.json ({"model_cfg": ..., "preprocess_cfg": ...}) and its weights."""
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
    if vision.get("mlp_ratio", 4) != 4 or text.get("mlp_ratio", 4) != 4:
        unsupported.append("mlp_ratio other than 4")
    if vision.get("pool_type", "tok") != "tok" or text.get("pool_type", "argmax") != "argmax":
        unsupported.append(f"pool_type {vision.get('pool_type')}/{text.get('pool_type')} (expected tok/argmax)")
    if unsupported:
        raise ValueError(f"open_clip settings not supported by clipdalle's CLIP: {', '.join(unsupported)}")
    vision_width = vision.get("width", 768)
    head_width = vision.get("head_width", 64)
    is_resnet = isinstance(vision.get("layers"), (list, tuple))
    preprocess_cfg = values.get("preprocess_cfg") or {}
    if quick_gelu is None:
        quick_gelu = bool(model_cfg.get("quick_gelu", False))
    return config_from_state_dict(
        state_dict,
        activation="quick_gelu" if quick_gelu else "gelu",
        vision_n_head=(vision_width * 32 if is_resnet else vision_width) // head_width,
        text_n_head=text.get("heads", 8),
        image_mean=preprocess_cfg.get("mean"),
        image_std=preprocess_cfg.get("std"),
    )


# ------------------------------------------------------------------------------------------ reading


def is_torchscript(path: str | Path) -> bool:
    """TorchScript archives are zip files with a code/ folder; torch.save zips have data.pkl and no code."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any("/code/" in name or name.endswith("/constants.pkl") for name in archive.namelist())


def read_state_dict(path: str | Path, *, trust_torchscript: bool = False) -> dict[str, torch.Tensor]:
    """A weights file as a flat dict of tensors: .safetensors, or a torch pickle read with weights_only=True."""
    return _read_weights_file(Path(path), trust_torchscript)[0]


def _read_weights_file(path: Path, trust_torchscript: bool) -> tuple[dict[str, torch.Tensor], str]:
    """(tensors, kind): kind is safetensors | torchscript | state_dict | training_checkpoint."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu"), "safetensors"
    if is_torchscript(path):
        if not trust_torchscript:
            raise ValueError(
                f"{path}: is a TorchScript archive, which runs code when loaded; pass trust_torchscript=True only "
                f"if you trust its source (OpenAI's own release files are such archives)"
            )
        return dict(torch.jit.load(str(path), map_location="cpu").state_dict()), "torchscript"
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
    """Drops DDP/compile prefixes and TorchScript's extra integers, and casts fp16/bf16 weights to fp32."""
    cleaned = {}
    for key, tensor in state_dict.items():
        for prefix in ("module.", "_orig_mod."):
            key = key.removeprefix(prefix)
        if key in TORCHSCRIPT_EXTRAS or key == "attn_mask":
            continue
        cleaned[key] = tensor.float() if tensor.is_floating_point() else tensor
    return cleaned


def read_checkpoint(
    path: str | Path, *, quick_gelu: bool | None = None, trust_torchscript: bool = False
) -> ForeignCheckpoint:
    """Config and OpenAI-named fp32 weights from an OpenAI, open_clip or Hugging Face checkpoint on disk."""
    path = Path(path)
    if path.is_dir():
        if (path / OPEN_CLIP_CONFIG).is_file():
            return _read_open_clip_directory(path, quick_gelu)
        if (path / "config.json").is_file():
            values = read_json(path / "config.json")
            if values.get("model_type") == "clip" or "CLIPModel" in (values.get("architectures") or []):
                return _read_hf_directory(path, values, quick_gelu)
            found = f"config.json with model_type {values.get('model_type')!r}"
        else:
            found = f"files {', '.join(sorted(item.name for item in path.iterdir())[:8]) or 'none'}"
        raise ValueError(
            f"{path}: not a CLIP checkpoint clipdalle reads (found {found}); expected a clipdalle run, an open_clip "
            f"directory ({OPEN_CLIP_CONFIG}) or a Hugging Face CLIPModel directory"
        )
    raw, kind = _read_weights_file(path, trust_torchscript)
    state_dict = clean_state_dict(raw)
    if any(key.startswith(("text_model.", "vision_model.")) for key in state_dict):
        raise ValueError(f"{path}: Hugging Face CLIP weights; pass the directory that holds them with its config.json")
    if "token_embedding.weight" not in state_dict or not any(key.startswith("visual.") for key in state_dict):
        keys = ", ".join(list(state_dict)[:5]) or "none"
        raise ValueError(f"{path}: not OpenAI/open_clip CLIP weights (found keys {keys}, ...)")
    # OpenAI's files (TorchScript archives, or their state dicts saved as .pt) are QuickGELU models; open_clip's
    # .bin/.safetensors and training checkpoints use GELU unless the model name says "-quickgelu".
    is_openai = kind == "torchscript" or (kind == "state_dict" and path.suffix in (".pt", ".pth"))
    layout = {"torchscript": "openai-torchscript", "state_dict": "openai"}[kind] if is_openai else "open_clip"
    if quick_gelu is None:
        quick_gelu = is_openai or "quickgelu" in path.name.lower()
    config = config_from_state_dict(state_dict, activation="quick_gelu" if quick_gelu else "gelu")
    return ForeignCheckpoint(config, state_dict, layout, tokenizer_beside(path.parent))


def _read_open_clip_directory(path: Path, quick_gelu: bool | None) -> ForeignCheckpoint:
    weights = _first_existing(path, OPEN_CLIP_WEIGHTS)
    state_dict = clean_state_dict(read_state_dict(weights))
    config = config_from_open_clip(read_json(path / OPEN_CLIP_CONFIG), state_dict, quick_gelu)
    return ForeignCheckpoint(config, state_dict, "open_clip", tokenizer_beside(path))


def _read_hf_directory(path: Path, values: dict[str, Any], quick_gelu: bool | None) -> ForeignCheckpoint:
    weights = _first_existing(path, HF_WEIGHTS)
    state_dict = clean_state_dict(hf_to_openai(read_state_dict(weights)))
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


def tokenizer_beside(folder: Path) -> Path | None:
    """A Hugging Face tokenizer directory (vocab.json + merges.txt) or OpenAI's merges file in `folder`."""
    if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        return folder
    if (folder / OPENAI_MERGES_FILE).is_file():
        return folder / OPENAI_MERGES_FILE
    return None


# ------------------------------------------------------------------------------------------ writing


def read_any(
    path: str | Path, *, quick_gelu: bool | None = None, trust_torchscript: bool = False
) -> tuple[CLIPConfig, dict[str, torch.Tensor]]:
    """Config and OpenAI-named weights from a clipdalle run or any layout `read_checkpoint` reads."""
    path = Path(path)
    if checkpoint.is_run(path):
        values = checkpoint.read_config(path)
        if values["clipdalle"]["model_type"] != "clip":
            raise ValueError(f"{path}: is a {values['clipdalle']['model_type']} run, expected a clip run")
        config = from_dict(CLIPConfig, values.get("model", {}), source=str(path / checkpoint.CONFIG_FILE))
        return config, read_state_dict(path / checkpoint.WEIGHTS_FILE)
    found = read_checkpoint(path, quick_gelu=quick_gelu, trust_torchscript=trust_torchscript)
    return found.config, found.state_dict


def convert(
    src: str | Path,
    dst: str | Path,
    to: str = "hf",
    *,
    quick_gelu: bool | None = None,
    trust_torchscript: bool = False,
) -> Path:
    """Writes the CLIP at `src` (any layout `load` reads) in another layout, with safetensors weights.

    to="hf": a directory with config.json, preprocessor_config.json and model.safetensors for transformers'
    CLIPModel. to="openai": OpenAI/open_clip names; `dst` ending in .safetensors is a bare weights file, else a
    directory with open_clip_model.safetensors and open_clip_config.json (which keeps heads and activation)."""
    from safetensors.torch import save_file

    if to not in ("hf", "openai"):
        raise ValueError(f"convert: to={to!r}; expected 'hf' or 'openai'")
    config, state_dict = read_any(src, quick_gelu=quick_gelu, trust_torchscript=trust_torchscript)
    dst = Path(dst)

    def write_weights(path: Path, tensors: dict[str, torch.Tensor]) -> None:
        contiguous = {key: tensor.contiguous() for key, tensor in tensors.items()}
        atomic_write(path, lambda tmp: save_file(contiguous, str(tmp), metadata={"format": "pt"}))

    if to == "openai" and config.text_pooling != "argmax":
        raise ValueError(
            f"{src}: text_pooling {config.text_pooling} (eos_id {config.eos_id}) has no OpenAI/open_clip equivalent "
            f"(they pool at argmax); keep the clipdalle run directory, or convert to='hf'"
        )
    if to == "hf":
        hf_values = hf_config(config)
        write_weights(dst / "model.safetensors", openai_to_hf(state_dict))
        write_json(dst / "preprocessor_config.json", hf_preprocessor_config(config))
        write_json(dst / "config.json", hf_values)
    elif dst.suffix == ".safetensors":
        write_weights(dst, state_dict)
    else:
        write_weights(dst / OPEN_CLIP_WEIGHTS[0], state_dict)
        write_json(dst / OPEN_CLIP_CONFIG, open_clip_config(config))
    return dst
