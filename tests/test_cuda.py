"""On a CUDA GPU, what the CPU suite cannot reach: a bf16 training step of each model through the training loop,
cached DALL·E decoding against the full forward pass in bf16, the CLIP towers in bf16 against fp32, DDP over
nccl in one process, and sampling on the GPU against the CPU.

Marked `cuda` and skipped without a GPU (CI has none); benchmarks/gpu_check.sh runs them on the device machine
(`pytest -m cuda`). CLIPDALLE_CUDA_TESTS_DEVICE=cpu runs them on the CPU instead (gloo for nccl), to check the
tests' own logic on a machine without a GPU.

Tolerances compare relative errors ‖value − reference‖ / ‖reference‖ against an fp32 reference computed on the
CPU. bf16 keeps 8 significant bits, so each rounding is off by up to 2^-9 ≈ 0.2 %; a forward pass rounds every
matrix operand and the errors add up like a random walk, which gives 0.1–1 % for these models (METHOD: bf16
operands land between 1e-3 and 1e-2). Rather than guess that figure, a test measures it on the full forward pass
and allows the fast path twice as much: the same arithmetic in another order draws an error of the same size,
while a wrong position, mask or cache entry is off by tens of percent.
"""

import copy
import csv
import itertools
import math
import os

import pytest
import torch
import torch.distributed as dist
from helpers import (
    TRAINING_CASES,
    random_dalle_batch,
    random_text,
    tiny_clip,
    tiny_dalle_config,
    tiny_training_case,
)

from clipdalle import checkpoint
from clipdalle.config import TrainConfig
from clipdalle.models.clip import CLIP, CLIPConfig, gather_features_with_grad
from clipdalle.models.dalle import DALLE
from clipdalle.models.decoding import ImageStep
from clipdalle.models.dvae import DiscreteVAE, DVAEConfig
from clipdalle.sampling import encode_prompts, generate, sample_codes
from clipdalle.tokenizers import CaptionTokenizer
from clipdalle.training.loop import train

DEVICE = os.environ.get("CLIPDALLE_CUDA_TESTS_DEVICE", "cuda")
BACKEND = "nccl" if DEVICE == "cuda" else "gloo"

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(
        DEVICE == "cuda" and not torch.cuda.is_available(),
        reason="needs a CUDA GPU (torch.cuda.is_available() is False); benchmarks/gpu_check.sh runs these on one",
    ),
]

CAPTIONS = ["a red circle", "a blue square", "a green triangle", "a black cross"]


@pytest.fixture
def exact_fp32():
    """fp32 products in full fp32 (no TF32 in cuBLAS or cuDNN), for comparisons at fp32 tolerances."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    value, reference = value.detach().float().cpu(), reference.detach().float().cpu()
    return float((value - reference).norm() / reference.norm())


def to_device(batch: dict) -> dict:
    return {key: value.to(DEVICE) if isinstance(value, torch.Tensor) else value for key, value in batch.items()}


# ------------------------------------------------------------------------------------------ training


@pytest.mark.parametrize("name", TRAINING_CASES)
def test_the_training_loop_takes_bf16_steps_of_each_model(name, tmp_path):
    model, objective, batch = tiny_training_case(name, batch_size=8)
    if DEVICE == "cuda":  # as a loader with workers delivers them: the loop's copies are then asynchronous
        batch = {key: value.pin_memory() if isinstance(value, torch.Tensor) else value for key, value in batch.items()}
    before = {key: value.clone() for key, value in model.state_dict().items()}
    config = TrainConfig(
        steps=3,
        batch_size=8,
        lr=1e-3,
        warmup_steps=1,
        eval_every=3,
        save_every=3,
        log_every=1,
        device=DEVICE,
        dtype="bf16",
    )
    run = tmp_path / "run"
    trained = train(model, objective, lambda start: itertools.repeat(batch), run, config)
    parameters = dict(trained.named_parameters())
    assert all(p.device.type == DEVICE and p.dtype == torch.float32 for p in parameters.values())
    assert all(torch.isfinite(p).all() for p in parameters.values())
    changed = {key for key, value in trained.state_dict().items() if not torch.equal(value.cpu(), before[key])}
    assert set(parameters) <= changed, set(parameters) - changed
    with open(run / "metrics.csv") as handle:
        losses = [float(row["value"]) for row in csv.DictReader(handle) if row["name"] == "loss"]
    assert len(losses) == 3 and all(math.isfinite(loss) for loss in losses)
    loaded = checkpoint.load_model(run)  # saved from the GPU, loaded on the CPU, bit for bit
    for key, value in trained.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value.cpu()), key


# ------------------------------------------------------------------------------------------ DALL·E decoding


def decoding_model() -> DALLE:
    """Every attention pattern, 80 positions, 4 heads of 32: big enough for bf16 rounding to add up."""
    config = tiny_dalle_config(
        text_length=16, text_vocab_size=300, image_vocab_size=64, grid_size=8, n_head=4, n_embd=128
    )
    torch.manual_seed(0)
    return DALLE(config).eval()


def cached_image_logits(model: DALLE, text: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """(B, N, V) as a sampler computes them: start, a run of codes through `extend`, then one `ImageStep` per code."""
    N = model.config.image_length
    caches = model.new_caches()
    with torch.no_grad():
        first = model.start(text, caches)  # code 0, (B, 1, V)
        run = model.extend(codes[:, :5], 0, caches)  # codes 1 .. 5
        step = ImageStep(model)
        rest = [step(codes[:, cell], cell, caches) for cell in range(5, N - 1)]  # codes 6 .. N-1, (B, V) each
    return torch.cat([first, run, torch.stack(rest, dim=1)], dim=1)


@pytest.mark.parametrize("precision", ["fp32", "autocast", "bf16 weights"])
def test_cached_decoding_matches_the_full_forward_pass(precision, exact_fp32):
    model = decoding_model()
    text, codes = random_dalle_batch(model.config, batch_size=8, seed=2)
    with torch.no_grad():
        reference = model(text, codes)[1]  # (B, N, V), fp32 on the CPU
    on_device = copy.deepcopy(model).to(DEVICE)
    if precision == "bf16 weights":
        on_device = on_device.to(torch.bfloat16)
    text, codes = text.to(DEVICE), codes.to(DEVICE)
    with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=precision == "autocast"):
        with torch.no_grad():
            full = on_device(text, codes)[1]
        cached = cached_image_logits(on_device, text, codes)
    spread = relative_error(full, reference)
    if precision == "fp32":
        assert spread < 1e-4 and relative_error(cached, reference) < 1e-4
    else:  # see the module docstring: bf16's own error on the full pass, twice over for the cached one
        assert 1e-4 < spread < 2e-2, f"bf16 full forward off by {spread:.2e} from fp32"
        assert relative_error(cached, reference) < 2 * spread, (relative_error(cached, reference), spread)
    assert full.dtype == cached.dtype


# ------------------------------------------------------------------------------------------ CLIP


@pytest.mark.parametrize("tower", ["vit", "resnet"])
def test_clip_towers_in_bf16_match_fp32(tower, exact_fp32):
    vision = dict(vision_patch_size=16, vision_n_layer=4, vision_n_embd=128, vision_n_head=4)
    if tower == "resnet":
        vision = dict(vision_layers=[1, 1, 1, 1], vision_n_embd=32, vision_n_head=8)
    config = CLIPConfig(
        embed_dim=64,
        image_size=64,
        context_length=32,
        vocab_size=1000,
        text_n_layer=4,
        text_n_embd=128,
        text_n_head=4,
        activation="gelu",
        text_pooling="first_eos",
        eos_id=1,
        **vision,
    )
    torch.manual_seed(0)
    model = CLIP(config).eval()
    images = torch.rand(8, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    text = random_text(8, 32, seed=2, vocab=1000)
    with torch.no_grad():
        reference = model(images, text)  # fp32 on the CPU
        on_device = copy.deepcopy(model).to(DEVICE)
        images, text = images.to(DEVICE), text.to(DEVICE)
        single = on_device(images, text)
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            half = on_device(images, text)
    for name, expected, fp32, bf16 in zip(("image", "text"), reference, single, half):
        assert relative_error(fp32, expected) < 1e-4, name
        # A cosine of 0.999 is 2.6 degrees apart: ten times what bf16 rounding turns these features by (CPU bf16:
        # cosine > 0.9999, relative error 0.3-1 %), while a broken tower points anywhere.
        cosine = torch.nn.functional.cosine_similarity(bf16.float().cpu(), expected)
        assert cosine.min() > 0.999, (name, cosine)
        assert relative_error(bf16, expected) < 2e-2, name


# ------------------------------------------------------------------------------------------ DDP


@pytest.fixture
def process_group(tmp_path):
    """A process group of one (nccl on a GPU): DDP's and the dVAE codebook's collectives run for real."""
    if DEVICE == "cuda":
        torch.cuda.set_device(0)
    dist.init_process_group(BACKEND, init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


# The dVAE's 1x1 output convolution gets channels_last gradients: the same memory order as DDP's bucket view, but
# strides of size-1 dimensions differ, and DDP warns about them.
@pytest.mark.filterwarnings("ignore:Grad strides do not match bucket view strides")
@pytest.mark.parametrize("name", TRAINING_CASES)
def test_ddp_step_equals_a_plain_step(name, process_group):
    model, objective, batch = tiny_training_case(name)
    plain = copy.deepcopy(model).to(DEVICE)
    wrapped = torch.nn.parallel.DistributedDataParallel(
        model.to(DEVICE), device_ids=[torch.cuda.current_device()] if DEVICE == "cuda" else None
    )
    batch = to_device(batch)
    states = []
    for network in (wrapped, plain):
        optimizer = torch.optim.AdamW(network.parameters(), lr=1e-3, fused=True)
        torch.manual_seed(3)  # caption dropout and codebook restarts draw the same numbers
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            loss, _ = objective(network, batch, 0.5)
        loss.backward()
        optimizer.step()
        states.append({key: value.detach().clone() for key, value in network.state_dict().items()})
    ddp_state, plain_state = states
    assert ddp_state.keys() == {f"module.{key}" for key in plain_state}
    for key, value in plain_state.items():
        torch.testing.assert_close(ddp_state[f"module.{key}"], value, msg=key)


def test_gather_with_grad_over_one_process(process_group):
    features = torch.randn(4, 8, device=DEVICE, requires_grad=True)
    gathered = gather_features_with_grad(features)
    assert torch.equal(gathered, features)
    (gathered * 2).sum().backward()
    assert torch.equal(features.grad, torch.full_like(features, 2.0))


# ------------------------------------------------------------------------------------------ sampling


def sampling_models() -> tuple[DALLE, DiscreteVAE, CaptionTokenizer]:
    tokenizer = CaptionTokenizer.train(CAPTIONS, 270)
    torch.manual_seed(0)
    vae = DiscreteVAE(DVAEConfig(image_size=16, n_downsample=2, vocab_size=16, n_embd=16, n_hidden=16)).eval()
    config = tiny_dalle_config(text_length=16, text_vocab_size=tokenizer.vocab_size, image_vocab_size=16)
    return DALLE(config).eval(), vae, tokenizer


def test_samples_on_the_device_are_the_cpu_samples(exact_fp32):
    # One CPU generator per sample on every device: a seed draws the same noise, so the codes agree wherever the
    # logits agree to the last few bits (a near-tie can still flip a code and the rest of its row with it).
    model, _, tokenizer = sampling_models()
    text = encode_prompts(tokenizer, CAPTIONS * 4, model.config.text_length)  # (16, T)
    seeds = list(range(16))
    codes, log_likelihood = sample_codes(model, text, seeds)
    device_codes, device_log_likelihood = sample_codes(copy.deepcopy(model).to(DEVICE), text.to(DEVICE), seeds)
    assert device_codes.device.type == DEVICE
    assert (device_codes.cpu() == codes).float().mean() >= 0.9
    same = (device_codes.cpu() == codes).all(dim=1)
    torch.testing.assert_close(device_log_likelihood.cpu()[same], log_likelihood[same], atol=1e-4, rtol=1e-4)


def test_generate_and_rerank_by_clip_under_autocast():
    model, vae, tokenizer = sampling_models()
    clip = (tiny_clip(vocab_size=tokenizer.vocab_size, eos_id=tokenizer.eos_id).to(DEVICE).eval(), None, tokenizer)
    model, vae = model.to(DEVICE), vae.to(DEVICE)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        result = generate(model, vae, tokenizer, ["a red circle"], n=8, keep=3, clip=clip, seed=0, batch_size=8)
    assert result.images.shape == (3, 3, 16, 16) and result.images.dtype == torch.float32
    assert result.images.device.type == DEVICE and 0 <= float(result.images.min()) <= float(result.images.max()) <= 1
    assert torch.equal(result.clip_scores, result.clip_scores.sort(descending=True).values)
    assert result.codes.min() >= 0 and result.codes.max() < 16 and len(set(result.seeds)) == 3
