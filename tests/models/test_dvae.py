"""The discrete VAE: shapes and ranges, learning, schedules, save/load, config errors, the codebook under DDP."""

import json
import math
import multiprocessing
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import draw_shape

from clipdalle.checkpoint import load_model, save_model
from clipdalle.config import TrainConfig, from_dict, load_preset
from clipdalle.evaluate import vae_metrics, vae_picture
from clipdalle.models.dvae import (
    DiscreteVAE,
    DVAEConfig,
    kl_to_uniform,
    kl_weight_at,
    logit_laplace_nll,
    pixel_weights,
    psnr,
    run_in_chunks,
    temperature_at,
)
from clipdalle.training.objectives import vae_loss as loss_fn

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def tiny(**changes) -> DVAEConfig:
    values = dict(image_size=16, n_downsample=2, vocab_size=16, n_embd=16, n_hidden=16, n_resblock=1)
    return DVAEConfig(**{**values, **changes})


def shape_images(size: int = 16) -> torch.Tensor:
    """Four coloured shapes on white (B, 3, size, size) in [0, 1]."""
    pictures = [
        draw_shape(shape, colour, size)
        for shape, colour in (("circle", "red"), ("square", "green"), ("triangle", "blue"), ("cross", "black"))
    ]
    array = np.stack([np.asarray(picture, dtype=np.float32) / 255 for picture in pictures])  # (B, H, W, 3)
    return torch.from_numpy(array).permute(0, 3, 1, 2).contiguous()  # (B, 3, H, W)


def batch_of(images: torch.Tensor) -> dict:
    return {"keys": [str(i) for i in range(len(images))], "images": images, "captions": [""] * len(images)}


def train_steps(model: DiscreteVAE, images: torch.Tensor, steps: int, lr: float = 3e-3) -> list[float]:
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    for step in range(steps):
        loss, _ = loss_fn(model, batch_of(images), step / steps)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


# ------------------------------------------------------------------------------------------ contracts


@pytest.mark.parametrize("quantizer", ["vq", "gumbel"])
@pytest.mark.parametrize("n_downsample", [2, 3])
def test_shapes_dtypes_and_ranges(quantizer, n_downsample):
    torch.manual_seed(0)
    config = tiny(image_size=8 * 2**n_downsample, n_downsample=n_downsample, quantizer=quantizer)
    model = DiscreteVAE(config)
    images = torch.rand(3, 3, config.image_size, config.image_size)

    codes = model.encode(images)
    assert config.grid_size == 8
    assert codes.shape == (3, 8, 8) and codes.dtype == torch.long
    assert 0 <= int(codes.min()) and int(codes.max()) < config.vocab_size

    decoded = model.decode(codes)
    assert decoded.shape == images.shape and decoded.dtype == torch.float32
    assert float(decoded.min()) >= 0 and float(decoded.max()) <= 1
    assert torch.equal(model.decode(codes.flatten(1)), decoded)  # (B, h*w) is accepted too

    output = model(images, temperature=0.5)
    assert output.reconstruction.shape == images.shape
    assert output.codes.shape == (3, 8, 8) and output.codes.dtype == torch.long
    assert output.decoder_output.shape == (3, config.out_channels, config.image_size, config.image_size)
    assert output.quantizer_loss.ndim == 0 and output.quantizer_loss.requires_grad and output.restarted >= 0


@pytest.mark.parametrize("quantizer", ["vq", "gumbel"])
def test_eval_forward_is_decode_of_encode(quantizer):
    torch.manual_seed(0)
    model = DiscreteVAE(tiny(quantizer=quantizer))
    images = torch.rand(2, 3, 16, 16)
    train_steps(model, images, 2)
    model.eval()
    with torch.no_grad():
        output = model(images)
    codes = model.encode(images)
    assert torch.equal(output.codes, codes)
    torch.testing.assert_close(output.reconstruction.clamp(0, 1), model.decode(codes))


def test_chunked_encoder_and_decoder_match_whole_batches():
    # Large images run through the convolutions a few images at a time (see ACTIVATION_CHUNK_BYTES).
    torch.manual_seed(0)
    model = DiscreteVAE(tiny()).eval()
    images = torch.rand(5, 3, 16, 16)
    whole_codes, whole_output = model.encode(images), model(images).reconstruction
    model.encoder.chunk_size = model.decoder.chunk_size = 2
    torch.testing.assert_close(model(images).reconstruction, whole_output)
    assert torch.equal(model.encode(images), whole_codes)


def test_chunks_are_for_the_cpu_only():
    calls = []

    def record(chunk: torch.Tensor) -> torch.Tensor:
        calls.append(len(chunk))
        return chunk

    run_in_chunks(record, torch.empty(5, 3), 2)
    run_in_chunks(record, torch.empty(5, 3, device="meta"), 2)  # any other device: one call, the whole batch
    assert calls == [2, 2, 1, 5]


def test_vq_scores_find_the_nearest_codebook_vector():
    torch.manual_seed(0)
    quantizer = DiscreteVAE(tiny(quantizer="vq")).quantizer
    cells = torch.randn(2, 4, 4, 16)
    assert torch.equal(quantizer.codes(cells), quantizer.nearest(quantizer.vectors(cells)))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        scores = quantizer.scores(cells)
    assert scores.dtype == torch.float32 and torch.equal(scores, quantizer.scores(cells))


def test_vq_update_from_bf16_vectors_keeps_fp32_statistics():
    torch.manual_seed(0)
    quantizer = DiscreteVAE(tiny(quantizer="vq")).quantizer
    vectors = torch.randn(64, 16)
    codes = torch.randint(0, 16, (64,))
    reference = DiscreteVAE(tiny(quantizer="vq")).quantizer
    reference.load_state_dict(quantizer.state_dict())
    torch.manual_seed(1)
    quantizer.update(vectors.bfloat16(), codes)
    torch.manual_seed(1)
    reference.update(vectors.bfloat16().float(), codes)
    for name, buffer in quantizer.named_buffers():
        assert buffer.dtype == torch.float32 and torch.equal(buffer, dict(reference.named_buffers())[name]), name


def test_encode_is_pure_and_its_codes_work_in_autograd():
    torch.manual_seed(0)
    model = DiscreteVAE(tiny(quantizer="vq"))
    images = torch.rand(2, 3, 16, 16)
    model.train()
    before = {name: buffer.clone() for name, buffer in model.named_buffers()}
    codes = model.encode(images)
    assert torch.equal(codes, model.encode(images))  # no noise
    for name, buffer in model.named_buffers():
        assert torch.equal(buffer, before[name]), f"encode changed {name}"
    # A DALL·E training step embeds the codes; an inference-mode tensor would fail in backward.
    embedding = torch.nn.Embedding(16, 4)
    embedding(codes).sum().backward()
    assert embedding.weight.grad is not None


def test_decode_soft_mixes_codes_and_is_differentiable():
    torch.manual_seed(0)
    model = DiscreteVAE(tiny(quantizer="gumbel"))
    codes = torch.randint(0, 16, (2, 4, 4))
    one_hot = torch.nn.functional.one_hot(codes, 16).float()  # (B, h, w, K)
    torch.testing.assert_close(model.decode_soft(one_hot).clamp(0, 1), model.decode(codes))

    logits = torch.randn(2, 4, 4, 16, requires_grad=True)
    images = model.decode_soft(logits.softmax(-1))
    assert images.shape == (2, 3, 16, 16)
    images.mean().backward()
    assert logits.grad is not None and float(logits.grad.abs().sum()) > 0
    with pytest.raises(ValueError, match="sum to 1"):
        model.decode_soft(torch.randn(2, 4, 4, 16))
    with pytest.raises(ValueError, match=r"\(B, 4, 4, 16\)"):
        model.decode_soft(torch.ones(2, 4, 4, 8) / 8)


def test_bad_inputs_are_clear_errors():
    model = DiscreteVAE(tiny())
    with pytest.raises(ValueError, match=r"\(B, 3, 16, 16\).*got \(2, 3, 32, 32\)"):
        model.encode(torch.rand(2, 3, 32, 32))
    with pytest.raises(ValueError, match=r"\[0, 16\).*got values from 0 to 16"):
        model.decode(torch.tensor([[0] * 15 + [16]]))
    with pytest.raises(ValueError, match=r"\(B, 4, 4\) or \(B, 16\)"):
        model.decode(torch.zeros(1, 5, dtype=torch.long))


# ------------------------------------------------------------------------------------------ config


@pytest.mark.parametrize(
    "values, field",
    [
        ({"image_size": 20, "n_downsample": 3}, "image_size"),
        ({"quantizer": "kmeans"}, "quantizer"),
        ({"recon_loss": "l2"}, "recon_loss"),
        ({"n_hidden": 0}, "n_hidden"),
        ({"ema_decay": 1.0}, "ema_decay"),
        ({"temperature_end": 2.0}, "temperature_end"),
        ({"foreground_weight": -1.0}, "foreground_weight"),
    ],
)
def test_bad_config_values_name_the_field(values, field):
    with pytest.raises(ValueError, match=field):
        DVAEConfig(**values)
    with pytest.raises(ValueError, match=field):  # the same from JSON, as a preset or run config is read
        from_dict(DVAEConfig, json.loads(json.dumps(values)))


@pytest.mark.parametrize("name", ["vae-tiny", "vae-demo"])
def test_presets_are_valid(name):
    preset = load_preset(str(CONFIGS / f"{name}.json"))
    config = from_dict(DVAEConfig, preset["model"], name)
    from_dict(TrainConfig, preset["train"], name)
    DiscreteVAE(config)


# ------------------------------------------------------------------------------------------ math


def test_schedules_anneal_temperature_and_ramp_kl():
    assert temperature_at(0.0, 1.0, 1 / 16) == pytest.approx(1.0)
    assert temperature_at(1.0, 1.0, 1 / 16) == pytest.approx(1 / 16)
    values = [temperature_at(p / 10, 1.0, 1 / 16) for p in range(11)]
    assert all(a > b for a, b in zip(values, values[1:]))
    assert kl_weight_at(0.0, 0.5) == 0.0 and kl_weight_at(1.0, 0.5) == 0.5


@pytest.mark.parametrize("progress", [0.0, 1.0])
def test_loss_fn_follows_the_schedules(progress):
    torch.manual_seed(0)
    config = tiny(quantizer="gumbel", kl_weight=0.01)
    model = DiscreteVAE(config)
    loss, metrics = loss_fn(model, batch_of(torch.rand(4, 3, 16, 16)), progress)
    assert loss.requires_grad and math.isfinite(loss.item())
    expected_temperature = config.temperature_start if progress == 0 else config.temperature_end
    assert metrics["temperature"] == pytest.approx(expected_temperature)
    assert metrics["kl_weight"] == pytest.approx(0.0 if progress == 0 else 0.01)
    assert metrics["loss"] == pytest.approx(metrics["recon"] + metrics["kl_weight"] * metrics["kl"], rel=1e-5)
    assert {"psnr", "perplexity", "codes_used"} <= set(metrics)


def test_kl_to_uniform_bounds():
    assert float(kl_to_uniform(torch.zeros(3, 8))) == pytest.approx(0.0, abs=1e-6)
    certain = torch.full((3, 8), -1e4)
    certain[:, 2] = 0
    assert float(kl_to_uniform(certain)) == pytest.approx(math.log(8), abs=1e-4)


def test_foreground_pixels_weigh_more():
    images = torch.ones(1, 3, 1, 3)
    images[0, :, 0, 1] = torch.tensor([33, 33, 33]) / 255  # black
    images[0, :, 0, 2] = torch.tensor([253, 252, 250]) / 255  # near white: background
    weights = pixel_weights(images, foreground_weight=4.0)
    assert weights[0, 0, 0, 0] == 1.0 and weights[0, 0, 0, 1] == 5.0
    assert 1.0 < float(weights[0, 0, 0, 2]) < 1.5


def test_logit_laplace_nll_is_the_density():
    torch.manual_seed(0)
    images = torch.rand(2, 3, 4, 4)
    location, log_scale = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4) * 0.3
    squeezed = 0.8 * images + 0.1
    laplace = torch.distributions.Laplace(location, log_scale.exp())
    # change of variables y = logit(x): log p(x) = log p(y) - log(x (1 - x))
    expected = -(laplace.log_prob(torch.logit(squeezed)) - torch.log(squeezed * (1 - squeezed))).mean()
    nll = logit_laplace_nll(images, location, log_scale, torch.ones(2, 1, 4, 4))
    torch.testing.assert_close(nll, expected)


# ------------------------------------------------------------------------------------------ learning


@pytest.mark.parametrize("quantizer, recon_loss", [("vq", "mse"), ("gumbel", "mse"), ("vq", "l1"), ("vq", "laplace")])
def test_tiny_model_overfits_four_shapes(quantizer, recon_loss):
    torch.manual_seed(0)
    config = tiny(quantizer=quantizer, recon_loss=recon_loss, n_hidden=32, foreground_weight=2.0, kl_weight=0.003)
    model = DiscreteVAE(config)
    images = shape_images()
    metrics_before = vae_metrics(model, [batch_of(images)])
    losses = train_steps(model, images, 150)
    metrics_after, grid = vae_metrics(model, [batch_of(images)]), vae_picture(model, [batch_of(images)])
    if recon_loss == "mse":
        assert losses[-1] < losses[0] / 5, losses[::10]
    assert metrics_after["psnr"] > metrics_before["psnr"] + 8, (metrics_before, metrics_after)
    assert grid.shape == (3, 2 * 16 + 3 * 2, 4 * 16 + 5 * 2)  # originals over reconstructions, 2 px padding

    # Decoded codes re-encode mostly to themselves (a tokenizer users can round-trip); reported, loosely checked.
    codes = model.encode(images)
    agreement = (model.encode(model.decode(codes)) == codes).float().mean().item()
    print(f"{quantizer}/{recon_loss}: psnr {metrics_after['psnr']:.1f} dB, re-encode agreement {agreement:.2f}")
    assert agreement > 0.3  # chance is 1 / 16


def test_save_and_load_give_identical_encode_and_decode(tmp_path):
    torch.manual_seed(0)
    for quantizer in ("vq", "gumbel"):
        model = DiscreteVAE(tiny(quantizer=quantizer))
        images = torch.rand(4, 3, 16, 16)
        train_steps(model, images, 3)  # moves the VQ codebook buffers away from their initial values
        run_dir = save_model(tmp_path / quantizer, model)
        loaded = load_model(run_dir, expect="dvae")
        assert loaded.config == model.config
        codes = model.encode(images)
        assert torch.equal(loaded.encode(images), codes)
        assert torch.equal(loaded.decode(codes), model.decode(codes))


# ------------------------------------------------------------------------------------------ the VQ codebook


def test_dead_codes_restart_from_encoder_outputs():
    torch.manual_seed(0)
    model = DiscreteVAE(tiny(quantizer="vq", dead_code_threshold=0.5))
    quantizer = model.quantizer
    vectors = torch.randn(64, 16)
    quantizer.ema_count.fill_(100.0)
    quantizer.ema_count[:4] = 0  # four codes nobody has used
    codes = quantizer.nearest(vectors)
    restarted = quantizer.update(vectors, codes)
    assert restarted >= 4
    for code in range(4):
        distances = (vectors - quantizer.embedding[code]).norm(dim=1)
        assert float(distances.min()) < 1e-5, "a restarted code is one of the batch's encoder outputs"


def _ddp_worker(rank: int, world: int, init_file: str, results: dict) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = DiscreteVAE(tiny(quantizer="vq"))
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.Adam(ddp.parameters(), lr=1e-3)
    restarted = 0
    for step in range(4):
        torch.manual_seed(1000 * rank + step)  # every rank sees different images and draws different noise
        loss, metrics = loss_fn(ddp, batch_of(torch.rand(8, 3, 16, 16)), step / 4)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        restarted += metrics["restarted"]
    results[rank] = {
        "embedding": model.quantizer.embedding.clone(),
        "ema_count": model.quantizer.ema_count.clone(),
        "restarted": restarted,
    }
    dist.destroy_process_group()
    os._exit(0)  # results stored: skip the interpreter's teardown, where gloo's threads can abort a finished rank


def test_vq_codebook_is_identical_on_every_rank_under_ddp(tmp_path):
    context = multiprocessing.get_context("spawn")
    with context.Manager() as manager:
        results = manager.dict()
        processes = [
            context.Process(target=_ddp_worker, args=(rank, 2, str(tmp_path / "init"), results)) for rank in range(2)
        ]
        for process in processes:
            process.start()
        for process in processes:
            process.join(timeout=120)
        assert all(process.exitcode == 0 for process in processes)
        results = dict(results)
    assert results[0]["restarted"] > 0 and results[0]["restarted"] == results[1]["restarted"]
    assert torch.equal(results[0]["ema_count"], results[1]["ema_count"])
    assert torch.equal(results[0]["embedding"], results[1]["embedding"])


def test_psnr_of_a_perfect_and_a_grey_reconstruction():
    images = torch.ones(2, 3, 4, 4) * 0.25
    assert float(psnr(images, images).min()) > 90
    assert float(psnr(torch.full_like(images, 0.75), images)[0]) == pytest.approx(10 * math.log10(4), abs=1e-4)
