"""The training objectives: CLIP's loss for the loop, gathered across processes, and learning on a tiny task."""

import math
import os

import pytest
import torch
import torch.distributed as dist
from helpers import (
    FLAT_COLOURS,
    TRAINING_CASES,
    WORDS,
    WordTokenizer,
    colour_images,
    random_dalle_batch,
    random_text,
    tiny_clip,
    tiny_dalle,
    tiny_training_case,
    train_colour_clip,
)

from clipdalle.evaluate import dalle_metrics
from clipdalle.models.clip import CLIP
from clipdalle.models.dalle import weighted_loss
from clipdalle.runtime import unwrap
from clipdalle.training.objectives import clip_loss as loss_fn
from clipdalle.training.objectives import dalle_loss
from clipdalle.zero_shot import classify


def test_loss_fn_for_the_training_loop():
    for loss_name in ("contrastive", "siglip"):
        model = tiny_clip(loss=loss_name)
        batch = {"keys": list("abcd"), "images": colour_images(), "text": random_text(4, 16), "captions": []}
        loss, metrics = loss_fn(model, batch, 0.5)
        assert loss.requires_grad and loss.ndim == 0
        assert set(metrics) == {"loss", "accuracy", "logit_scale"} and metrics["loss"] == pytest.approx(loss.item())
        loss.backward()
        assert model.token_embedding.weight.grad is not None and model.logit_scale.grad is not None
    with pytest.raises(ValueError, match="batch has no 'text' token ids"):
        loss_fn(model, {"images": colour_images(), "captions": ["red"] * 4}, 0.0)


@pytest.mark.parametrize("name", TRAINING_CASES)
def test_every_objective_runs_under_bf16_autocast(name):
    # What the GPU presets do (dtype bf16): weights, gradients and the dVAE's codebook statistics stay fp32.
    model, objective, batch = tiny_training_case(name)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, metrics = objective(model, batch, 0.5)
    loss.backward()
    assert loss.dtype == torch.float32 and math.isfinite(loss.item()) and math.isfinite(metrics["loss"])
    for parameter_name, parameter in model.named_parameters():
        assert parameter.dtype == torch.float32 and torch.isfinite(parameter.grad).all(), parameter_name
    assert all(buffer.dtype in (torch.float32, torch.bool) for buffer in model.buffers())


# ------------------------------------------------------------------------------------------ distributed


def _global_batch() -> dict:
    return {"images": colour_images(noise_seed=3, per_colour=2), "text": random_text(8, 16, seed=4)}


def _losses_and_grads(model, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    loss, _ = loss_fn(model, batch, 0.0)
    loss.backward()
    module = unwrap(model)
    return loss.detach(), {name: param.grad.clone() for name, param in module.named_parameters()}


def _distributed_worker(rank: int, world: int, store_path: str, result_path: str) -> None:
    torch.set_num_threads(1)
    # A file store, not a TCP port: a port probed free can be taken before rank 0 binds it.
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world)
    try:
        results = {}
        for loss_name in ("contrastive", "siglip"):
            model = torch.nn.parallel.DistributedDataParallel(tiny_clip(seed=5, loss=loss_name))
            batch = _global_batch()
            rows = len(batch["images"]) // world
            local = {key: value[rank * rows : (rank + 1) * rows] for key, value in batch.items()}
            loss, grads = _losses_and_grads(model, local)
            dist.all_reduce(loss)  # DDP averages gradients; the reported loss is averaged the same way
            results[loss_name] = (loss / world, grads)
        if rank == 0:
            torch.save(results, result_path)
        dist.barrier()  # neither rank tears gloo down while the other still talks to it
    finally:
        dist.destroy_process_group()
    # Done and the results saved: leave without the interpreter's teardown, where gloo's threads once aborted a
    # finished rank ("terminate called without an active exception", SIGABRT) under a loaded full suite.
    os._exit(0)


def test_two_process_gather_with_grad_equals_the_global_batch_loss_and_gradients(tmp_path):
    result_path = tmp_path / "result.pt"
    store_path = tmp_path / "store"
    torch.multiprocessing.spawn(_distributed_worker, args=(2, str(store_path), str(result_path)), nprocs=2)
    results = torch.load(result_path, weights_only=True)
    for loss_name in ("contrastive", "siglip"):
        expected_loss, expected_grads = _losses_and_grads(tiny_clip(seed=5, loss=loss_name), _global_batch())
        loss, grads = results[loss_name]
        torch.testing.assert_close(loss, expected_loss, atol=1e-6, rtol=1e-5)
        assert set(grads) == set(expected_grads)
        for name, grad in grads.items():
            torch.testing.assert_close(grad, expected_grads[name], atol=1e-6, rtol=1e-4, msg=f"{loss_name}: {name}")


# ------------------------------------------------------------------------------------------ learning


@pytest.fixture(scope="module", params=["contrastive", "siglip"])
def trained(request) -> tuple[CLIP, list[float]]:
    return train_colour_clip(request.param)


def test_tiny_model_learns_pairs_and_beats_chance_zero_shot(trained):
    model, losses = trained
    assert sum(losses[-5:]) / 5 < 0.3 * sum(losses[:5]) / 5
    probs = classify(model, colour_images(noise_seed=99), list(FLAT_COLOURS), WordTokenizer(WORDS), ["a {} icon"])
    assert probs.argmax(dim=1).tolist() == [0, 1, 2, 3]  # chance would be 1 in 4 per image


# ------------------------------------------------------------------------------------------ DALL·E


def test_loss_fn_weights_text_and_image_and_reports_bits():
    model = tiny_dalle(caption_dropout=0.0)
    text, codes = random_dalle_batch(model.config)
    model.train()
    loss, metrics = dalle_loss(model, {"text": text, "codes": codes}, 0.5)
    assert set(metrics) == {"loss", "text_loss", "image_loss", "image_bits"}
    assert metrics["image_bits"] == pytest.approx(metrics["image_loss"] / math.log(2))
    assert metrics["loss"] == pytest.approx((metrics["text_loss"] + 7 * metrics["image_loss"]) / 8, rel=1e-6)
    assert metrics["image_loss"] == pytest.approx(math.log(12), rel=0.1)  # near uniform at initialisation
    loss.backward()
    assert model.image_embedding.weight.grad.abs().sum() > 0 and model.text_embedding.weight.grad.abs().sum() > 0
    model.eval()
    metrics_eval = dalle_metrics(model, [{"text": text, "codes": codes}])
    assert metrics_eval["image_bits"] == pytest.approx(metrics["image_bits"], rel=1e-5)
    assert weighted_loss(torch.tensor(2.0), torch.tensor(1.0), 0.0, 1.0) == 1.0


def test_dalle_overfits_a_tiny_batch():
    model = tiny_dalle(caption_dropout=0.0, n_embd=32)
    text, codes = random_dalle_batch(model.config, batch_size=4)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    model.train()
    for step in range(60):
        loss, metrics = dalle_loss(model, {"text": text, "codes": codes}, step / 60)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert metrics["image_bits"] < 0.05  # from log2(12) = 3.6 bits per image token
