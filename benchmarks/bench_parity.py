"""SigLIP and CLIP parity at full size: clipdalle's towers against transformers' (and open_clip's, where installed).

The tests check parity on tiny random models; this checks the real shapes once, with random weights (nothing can be
downloaded here): transformers' SiglipModel() with its default config (SigLIP B/16 at 224 px: 203 M parameters), a
SiglipModel of SigLIP so400m's shapes at 224 px (MLP 4304 = 3.7362x the width), and a CLIPModel of ViT-B/32's shapes
whose MLPs are 4.9231x the width (ViT-bigG-14's ratio). Each is saved with save_pretrained, loaded by
clipdalle.clip.load, and both encode 8 images and 8 texts in fp32; the table gives the largest absolute difference
of the unit-norm features and of SigLIP's logits (scale * cosine + bias). With open_clip installed (the reference
venv) open_clip's SigLIP B/16 (timm's vit_base_patch16_siglip_224 + its text tower) is compared too.

    PYTHONPATH=src .venv/bin/python benchmarks/bench_parity.py        # transformers
    PYTHONPATH=src .venv-ref/bin/python benchmarks/bench_parity.py    # + open_clip
"""

from __future__ import annotations

import importlib.util
import json
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from clipdalle.clip import load


def no_tokenizer(texts, length):
    raise AssertionError("ids are fed directly")


def inputs(size: int, context: int, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return torch.rand(8, 3, size, size, generator=generator), torch.randint(1, vocab, (8, context), generator=generator)


def features(output) -> torch.Tensor:
    output = output if isinstance(output, torch.Tensor) else output.pooler_output
    return torch.nn.functional.normalize(output, dim=-1)


def transformers_rows(folder: Path) -> list[str]:
    import transformers

    rows = []
    so400m = {"hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27, "num_attention_heads": 16}
    cases = {
        "SigLIP B/16 (SiglipModel defaults)": transformers.SiglipConfig(),
        "SigLIP so400m shapes, 224 px": transformers.SiglipConfig(
            text_config={**so400m, "projection_size": 1152},
            vision_config={**so400m, "image_size": 224, "patch_size": 14},
        ),
        "CLIP ViT-B/32 shapes, MLP 4.9231x": transformers.CLIPConfig(
            text_config={"intermediate_size": 2521, "eos_token_id": 2},
            vision_config={"intermediate_size": 3781},
            projection_dim=512,
        ),
    }
    for label, config in cases.items():
        torch.manual_seed(0)
        siglip = isinstance(config, transformers.SiglipConfig)
        reference = (transformers.SiglipModel if siglip else transformers.CLIPModel)(config).eval()
        path = folder / label.replace(" ", "_").replace("/", "-")
        reference.save_pretrained(path)
        model, _, _ = load(path, tokenizer=no_tokenizer)
        vision, text_config = config.vision_config, config.text_config
        images, text = inputs(vision.image_size, text_config.max_position_embeddings, text_config.vocab_size)
        mean = torch.tensor(model.config.image_mean).view(1, 3, 1, 1)
        std = torch.tensor(model.config.image_std).view(1, 3, 1, 1)
        with torch.no_grad():
            expected_image = features(reference.get_image_features(pixel_values=(images - mean) / std))
            expected_text = features(reference.get_text_features(input_ids=text))
            image_difference = (model.encode_image(images) - expected_image).abs().max().item()
            text_difference = (model.encode_text(text) - expected_text).abs().max().item()
            logit_difference = "-"  # CLIP: no bias, nothing beyond the features to compare
            if siglip:
                expected = reference(input_ids=text, pixel_values=(images - mean) / std).logits_per_image
                logit_difference = f"{(model.logits(images, text)[0] - expected).abs().max().item():.1e}"
        parameters = sum(parameter.numel() for parameter in model.parameters()) / 1e6
        rows.append(
            f"| transformers | {label} | {parameters:.0f} M | {image_difference:.1e} | {text_difference:.1e} "
            f"| {logit_difference} |"
        )
        print(rows[-1], flush=True)
    return rows


def open_clip_rows(folder: Path) -> list[str]:
    import open_clip

    model_cfg = json.loads(
        (Path(open_clip.__file__).parent / "model_configs" / "ViT-B-16-SigLIP.json").read_text(encoding="utf-8")
    )
    torch.manual_seed(0)
    reference = open_clip.model.CustomTextCLIP(**{k: v for k, v in model_cfg.items() if k != "custom_text"}).eval()
    path = folder / "open_clip_siglip"
    path.mkdir()
    save_file(
        {key: value.contiguous() for key, value in reference.state_dict().items()},
        str(path / "open_clip_model.safetensors"),
    )
    config = {"model_cfg": model_cfg, "preprocess_cfg": {"mean": [0.5] * 3, "std": [0.5] * 3}}
    (path / "open_clip_config.json").write_text(json.dumps(config))
    model, _, _ = load(path, tokenizer=no_tokenizer)
    images, text = inputs(224, 64, 32000)
    with torch.no_grad():
        image_difference = (
            (model.encode_image(images) - reference.encode_image((images - 0.5) / 0.5, normalize=True))
            .abs()
            .max()
            .item()
        )
        text_difference = (model.encode_text(text) - reference.encode_text(text, normalize=True)).abs().max().item()
    return [
        f"| open_clip 3.3.0 | ViT-B-16-SigLIP (timm ViT) | 203 M | {image_difference:.1e} | {text_difference:.1e} | - |"
    ]


def main() -> None:
    torch.set_num_threads(2)
    folder = Path(tempfile.mkdtemp(prefix="bench-parity-"))
    print("| reference | model | parameters | image features | text features | SigLIP logits |")
    print("|---|---|---:|---:|---:|---:|")
    transformers_rows(folder)
    if importlib.util.find_spec("open_clip") is not None:
        for row in open_clip_rows(folder):
            print(row)
    else:
        print("(open_clip is not installed: its row is skipped; run with the reference venv)")


if __name__ == "__main__":
    main()
