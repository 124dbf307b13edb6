"""What each model is trained to do, as `loss_fn(model, batch, progress) -> (loss, metrics)` for the training loop.

`model` may be wrapped in DistributedDataParallel: each objective goes through `model(...)` so DDP syncs the
gradients, and reads sizes from the unwrapped model. `progress` is step / total steps in [0, 1], for schedules.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from ..models import captioner, dalle, dvae
from ..models.clip import contrastive_loss_from_logits, gather_features_with_grad, pair_logits, siglip_loss_from_logits
from ..runtime import is_gathering, unwrap


def vae_loss(model: nn.Module, batch: dict, progress: float) -> tuple[torch.Tensor, dict[str, float]]:
    """Reconstruction (weighted towards foreground pixels) + the quantizer's term (ramped KL or commitment), on
    batch {"images": (B, 3, H, W)}, at the gumbel temperature of `progress`."""
    config: dvae.DVAEConfig = unwrap(model).config
    images = batch["images"]
    temperature = dvae.temperature_at(progress, config.temperature_start, config.temperature_end)
    output = model(images, temperature=temperature)
    recon = dvae.reconstruction_loss(output, images, config)
    weight = dvae.quantizer_weight(config, progress)
    loss = recon + weight * output.quantizer_loss
    counts = torch.bincount(output.codes.flatten(), minlength=config.vocab_size)  # (K,) over B*h*w cells
    metrics = {
        "loss": loss.item(),
        "recon": recon.item(),
        "psnr": dvae.psnr(output.reconstruction.detach(), images).mean().item(),
        "perplexity": dvae.perplexity(counts),
        "codes_used": float((counts > 0).sum()),
    }
    if config.quantizer == "gumbel":
        metrics.update(kl=output.quantizer_loss.item(), temperature=temperature, kl_weight=weight)
    else:
        metrics.update(commitment=output.quantizer_loss.item(), restarted=float(output.restarted))
    return loss, metrics


def clip_loss(model: nn.Module, batch: dict, progress: float) -> tuple[torch.Tensor, dict[str, float]]:
    """CLIP's contrastive loss (or SigLIP's sigmoid loss) on batch {"images": (B, 3, H, W), "text": (B, T)}.

    Under torch.distributed the other processes' features are gathered with their gradients, so each process
    computes its rows of the global-batch loss, and DDP's gradient average over processes is the global loss's."""
    if "text" not in batch:
        raise ValueError(f"CLIP loss: batch has no 'text' token ids (keys: {', '.join(batch)}); tokenize captions")
    raw = unwrap(model)
    image_features, text_features = model(batch["images"], batch["text"])
    all_image_features, all_text_features, first_label = image_features, text_features, 0
    if is_gathering():
        all_image_features = gather_features_with_grad(image_features)
        all_text_features = gather_features_with_grad(text_features)
        first_label = dist.get_rank() * image_features.shape[0]
    scale = raw.logit_scale.exp()
    logits_per_image = pair_logits(image_features, all_text_features, scale, raw.logit_bias)  # (B, world * B)
    if raw.config.loss == "siglip":
        loss = siglip_loss_from_logits(logits_per_image, first_label)
    else:
        logits_per_text = pair_logits(text_features, all_image_features, scale, raw.logit_bias)  # (B, world * B)
        loss = contrastive_loss_from_logits(logits_per_image, logits_per_text, first_label)
    labels = torch.arange(logits_per_image.shape[0], device=logits_per_image.device) + first_label
    accuracy = (logits_per_image.argmax(dim=1) == labels).float().mean()
    return loss, {"loss": loss.item(), "accuracy": accuracy.item(), "logit_scale": scale.item()}


def dalle_loss(model: nn.Module, batch: dict, progress: float) -> tuple[torch.Tensor, dict[str, float]]:
    """Weighted text/image cross-entropy on batch {"text": (B, T), "codes": (B, h*w)}, with caption dropout in
    training mode. Metrics: loss, text_loss, image_loss (nats), image_bits (bits per image token)."""
    config = unwrap(model).config
    text = batch["text"]
    if model.training:
        text = dalle.drop_captions(text, config.caption_dropout)
    text_loss, image_loss = dalle.losses(model, text, batch["codes"])
    loss = dalle.weighted_loss(text_loss, image_loss, config.text_loss_weight, config.image_loss_weight)
    metrics = {
        "loss": float(loss.detach()),
        "text_loss": float(text_loss.detach()),
        "image_loss": float(image_loss.detach()),
        "image_bits": dalle.nats_to_bits(float(image_loss.detach())),
    }
    return loss, metrics


def captioner_loss(model: nn.Module, batch: dict, progress: float) -> tuple[torch.Tensor, dict[str, float]]:
    """Caption cross-entropy given the image's codes, on batch {"codes": (B, h*w), "text": (B, T)}."""
    loss = captioner.loss(model, batch["codes"], batch["text"])
    return loss, {"loss": float(loss.detach())}
