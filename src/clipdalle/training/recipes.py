"""How each model is trained from a dataset path: the data streams, the tokenizer, the objective and the
validation pictures handed to the one training loop (training.loop.train).

    train_vae(data, out, DVAEConfig(...), TrainConfig(...))
    train_clip(data, out, CLIPConfig(...), TrainConfig(...), init="ViT-B-32.pt", lock_image=True)
    train_dalle(data, out, DALLEConfig(...), TrainConfig(...), vae_run="runs/vae")
    train_captioner(data, out, CaptionerConfig(...), TrainConfig(...), vae_run="runs/vae")
"""

from __future__ import annotations

import math
import shutil
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import torch

from .. import checkpoint, evaluate, sampling
from ..config import TrainConfig, replace
from ..data.loader import Augment, SampleStream, batches, make_loader
from ..data.sources import Source, is_validation, open_mixture, open_source, resolve_splits
from ..io import DirectoryLock
from ..models import CLIP, DALLE, Captioner, DiscreteVAE
from ..pretrained import load, load_tokenizer, run_tokenizer
from ..prompts import write_training_prompts
from ..runtime import barrier, distributed_context, init_distributed, resolve_device
from ..tokenizers import CaptionTokenizer
from ..tokenizers.caption import MIN_VOCAB_SIZE
from ..transforms import make_grid
from ..zero_shot import check_templates
from . import objectives
from .codes import build_code_cache, cache_is_current, open_code_cache, weights_sha256
from .loop import train


def data_streams(
    data: str | Path,
    config: TrainConfig,
    image_size: int,
    *,
    val_data: str | Path | None = None,
    captions: str = "required",
    extra_data: list[str] | tuple[str, ...] = (),
) -> tuple[Callable[[int], Iterator[dict]], Callable[[], Iterable[dict]]]:
    """Training and validation batch functions for `train`, from a dataset path (see data/sources.py).

    A directory with train/ and val/ uses them; else `val_data`; else a stable hash of each sample's key holds
    out `config.val_fraction` of the data. `extra_data` ("PATH" or "PATH:REPEATS" each) is mixed into the training
    data only (`data.sources.open_mixture`). Training captions go through `config.caption_templates`; validation
    captions never do, so validation losses compare across runs with and without them."""
    augment = image_augment(config)
    rank, world, local_rank = distributed_context()
    train_path, val_path = resolve_splits(data, val_data)
    train_source = open_mixture(train_path, list(extra_data), captions=captions)
    if val_path is not None:
        val_source = open_source(val_path, captions=captions)
    else:
        val_source = open_source(train_path, captions=captions) if extra_data else train_source
    holdout = None if val_path is not None else "train"

    def train_stream(start_batch: int) -> SampleStream:
        return SampleStream(
            train_source,
            image_size=image_size,
            batch_size=config.batch_size,
            seed=config.seed,
            holdout=holdout,
            val_fraction=config.val_fraction,
            augment=augment,
            start_batch=start_batch,
            rank=rank,
            world_size=world,
            caption_templates=caption_templates(config) if captions != "none" else (),
            hard_negative_words=tuple(config.hard_negative_words),
            hard_negative_share=config.hard_negative_share,
        )

    def val_batches() -> Iterable[dict]:
        stream = SampleStream(
            val_source,
            image_size=image_size,
            batch_size=config.batch_size,
            seed=config.seed,
            holdout=None if val_path is not None else "val",
            val_fraction=config.val_fraction,
            shuffle=False,
            infinite=False,
        )
        return make_loader(stream, num_workers=0)

    pin_memory = resolve_device(config.device, local_rank).type == "cuda"
    return batches(train_stream, config.num_workers, pin_memory), val_batches


def image_augment(config: TrainConfig) -> Augment | None:
    """The random crop and shift of `config` (None when it asks for neither)."""
    if config.crop_scale < 1.0 or config.max_shift > 0.0:
        return Augment(min_scale=config.crop_scale, max_shift=config.max_shift)
    return None


def caption_templates(config: TrainConfig) -> tuple[str, ...]:
    """`config.caption_templates` ("{}|a picture of {}") as a tuple, each checked to hold one {} for the caption."""
    templates = tuple(template for template in config.caption_templates.split("|") if template.strip())
    check_templates(list(templates))
    return templates


def training_split(
    data: str | Path, val_data: str | Path | None = None, extra_data: list[str] | tuple[str, ...] = ()
) -> tuple[Source, str | None]:
    """(the source training reads, "train" when a hash hold-out splits it or None), as `data_streams` splits: with
    `extra_data`, the mixture, so that an epoch is a pass over everything the training stream reads."""
    train_path, val_path = resolve_splits(data, val_data)
    return open_mixture(train_path, list(extra_data), captions="none"), None if val_path is not None else "train"


def with_epochs(config: TrainConfig, source: Source, holdout: str | None) -> TrainConfig:
    """`config` with `steps` set from `epochs` (when above 0): epochs x the training samples of `source` (those
    `holdout="train"` keeps, or all) / the samples of one optimizer step (batch x accumulation x processes)."""
    if config.epochs <= 0:
        return config
    samples = sum(1 for key in source.keys() if holdout is None or not is_validation(key, config.val_fraction))
    if samples == 0:
        raise ValueError(f"{source.path}: no training samples to count epochs over")
    per_step = config.batch_size * config.grad_accum * distributed_context()[1]
    steps = max(1, math.ceil(config.epochs * samples / per_step))
    if distributed_context()[0] == 0:
        print(
            f"{config.epochs:g} epochs of {samples} training samples at {per_step} per step: {steps} steps",
            file=sys.stderr,
        )
    return replace(config, steps=steps)


def train_vae(
    data: str | Path,
    out: str | Path,
    model_config: Any,
    config: TrainConfig,
    *,
    val_data: str | Path | None = None,
    extra_data: list[str] | tuple[str, ...] = (),
    resume: bool = False,
) -> torch.nn.Module:
    """Trains the discrete VAE (images only: caption files are never opened) into the run directory `out`;
    `extra_data` is mixed into the training data (`data_streams`)."""
    config = with_epochs(config, *training_split(data, val_data, extra_data))
    train_batches, val_batches = data_streams(
        data, config, model_config.image_size, val_data=val_data, captions="none", extra_data=extra_data
    )
    torch.manual_seed(config.seed)
    model = DiscreteVAE(model_config)

    def validate(model: torch.nn.Module, batches_: list[dict]) -> tuple[dict[str, float], torch.Tensor]:
        return evaluate.vae_metrics(model, batches_), evaluate.vae_picture(model, batches_)

    return train(
        model,
        objectives.vae_loss,
        train_batches,
        out,
        config,
        val_batches=val_batches,
        evaluate=validate,
        resume=resume,
    )


def prepare_tokenizer(
    out: Path, data: str | Path, vocab_size: int, tokenizer_path: str | Path | None, resume: bool
) -> Any:
    """The caption tokenizer of a run: its own on resume, else `tokenizer_path`, else one trained on the
    training captions. Rank 0 writes RUN/tokenizer.json; the other ranks wait and read it."""
    if tokenizer_path is None and vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(
            f"the model's vocab_size {vocab_size} is below the caption tokenizer's minimum {MIN_VOCAB_SIZE} "
            f"(256 bytes + 3 special tokens); set --vocab-size {MIN_VOCAB_SIZE} or more"
        )
    path = out / checkpoint.TOKENIZER_FILE
    rank, _, local_rank = distributed_context()
    if rank == 0 and not (resume and path.exists()):
        if tokenizer_path is not None:
            tokenizer = CaptionTokenizer.load(tokenizer_path)
        else:
            source = open_source(resolve_splits(data)[0], captions="required")
            texts = (caption for record in source for caption in record.captions)
            tokenizer = CaptionTokenizer.train(texts, vocab_size)
        out.mkdir(parents=True, exist_ok=True)
        tokenizer.save(path)
    barrier()
    tokenizer = CaptionTokenizer.load(path)
    if tokenizer.vocab_size > vocab_size:
        raise ValueError(
            f"{path}: the tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is {vocab_size}; "
            f"set --vocab-size {tokenizer.vocab_size} or more"
        )
    return tokenizer


def train_clip(
    data: str | Path,
    out: str | Path,
    model_config: Any,
    config: TrainConfig,
    *,
    tokenizer_path: str | Path | None = None,
    init: str | Path | None = None,
    lock_image: bool = False,
    val_data: str | Path | None = None,
    extra_data: list[str] | tuple[str, ...] = (),
    resume: bool = False,
) -> torch.nn.Module:
    """Trains CLIP on (image, caption) pairs into `out`: from scratch with our caption tokenizer, or fine-tuned
    from `init` (a run or OpenAI / open_clip / Hugging Face weights, with their own tokenizer). `lock_image`
    freezes the image tower (LiT)."""
    out = Path(out)
    rank, _, local_rank = distributed_context()
    init_distributed(resolve_device(config.device, local_rank))
    foreign = run_tokenizer(out, siglip=model_config.is_siglip) if resume else None
    if foreign is not None and foreign.is_dir():  # a fine-tuned run keeps its foreign tokenizer (CLIP BPE, SigLIP)
        tokenizer = load_tokenizer(foreign, siglip=model_config.is_siglip)
        model = CLIP(model_config)
    elif init is not None and not resume:
        model, _, tokenizer = load(init)
        if rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            _save_tokenizer(tokenizer, out)
    else:
        tokenizer = prepare_tokenizer(out, data, model_config.vocab_size, tokenizer_path, resume)
        torch.manual_seed(config.seed)
        model = CLIP(model_config)
    if lock_image:
        for parameter in model.visual.parameters():
            parameter.requires_grad_(False)
    context_length = model.config.context_length

    def with_text(batch: dict) -> dict:
        if "text" not in batch:
            batch["text"] = tokenizer(batch["captions"], context_length).to(batch["images"].device)
        return batch

    def loss_fn(model: torch.nn.Module, batch: dict, progress: float) -> tuple[torch.Tensor, dict[str, float]]:
        return objectives.clip_loss(model, with_text(batch), progress)

    def validate(model: torch.nn.Module, batches_: list[dict]) -> tuple[dict[str, float], torch.Tensor]:
        batches_ = [with_text(batch) for batch in batches_]
        metrics = evaluate.clip_metrics(model, batches_)
        metrics["zero_shot_accuracy"] = evaluate.caption_zero_shot_accuracy(model, batches_, tokenizer)
        return metrics, evaluate.clip_picture(model, batches_)

    config = with_epochs(config, *training_split(data, val_data, extra_data))
    train_batches, val_batches = data_streams(
        data, config, model.config.image_size, val_data=val_data, extra_data=extra_data
    )
    return train(model, loss_fn, train_batches, out, config, val_batches=val_batches, evaluate=validate, resume=resume)


def _save_tokenizer(tokenizer: Any, out: Path) -> None:
    if isinstance(tokenizer, CaptionTokenizer):
        tokenizer.save(out / checkpoint.TOKENIZER_FILE)
    else:  # OpenAI's BPE (vocab.json + merges.txt) or SigLIP's files, which clip.load reads back
        tokenizer.save(out)


class CodeData(NamedTuple):
    """What a model trained on a token cache needs: the run's dVAE, its caption tokenizer, the model config with
    the dVAE's sizes, the train config (steps set from `epochs` over the cached codes), the batch functions for
    `train` (batches carry "codes" and captions) and `with_text`, which adds a batch's token ids as "text"
    (B, text_length)."""

    vae: torch.nn.Module
    tokenizer: Any
    model_config: Any
    config: TrainConfig
    train_batches: Iterator[dict]
    val_batches: Callable[[], Iterable[dict]]
    with_text: Callable[[dict], dict]


def prepare_codes(
    data: str | Path,
    out: Path,
    model_config: Any,
    config: TrainConfig,
    *,
    vae_run: str | Path,
    tokenizer_path: str | Path | None,
    tokens: str | Path | None,
    val_data: str | Path | None,
    resume: bool,
) -> CodeData:
    """The process group started, the dVAE copied into RUN/vae/ (a run refuses a different dVAE later),
    image_vocab_size and grid_size taken from it, the caption tokenizer (`prepare_tokenizer`), and the dataset's
    codes cached in `tokens` (default RUN/tokens/) and reused while the dVAE and the data are the same."""
    rank, world, local_rank = distributed_context()
    device = resolve_device(config.device, local_rank)
    init_distributed(device)
    vae_dir = out / "vae"
    if rank == 0:
        with DirectoryLock(out, "train this run"):  # the training loop takes it again for the run itself
            if (vae_dir / checkpoint.WEIGHTS_FILE).exists():
                if Path(vae_run).resolve() != vae_dir.resolve() and weights_sha256(vae_dir) != weights_sha256(vae_run):
                    raise ValueError(
                        f"{out} was trained with the dVAE in {vae_dir} (sha256 {weights_sha256(vae_dir)[:12]}), "
                        f"not with {vae_run} (sha256 {weights_sha256(vae_run)[:12]}); train a new run for "
                        "another dVAE"
                    )
            else:
                checkpoint.load_model(vae_run, expect="dvae")  # a clear error before copying anything
                ignore = shutil.ignore_patterns(checkpoint.TRAIN_STATE_FILE, ".*")
                shutil.copytree(vae_run, vae_dir, ignore=ignore, dirs_exist_ok=True)
    barrier()
    vae = checkpoint.load_model(vae_dir, expect="dvae", device=device)
    derived = {"image_vocab_size": vae.config.vocab_size, "grid_size": vae.config.grid_size}
    if any(getattr(model_config, name) != value for name, value in derived.items()):
        print(f"note: image_vocab_size and grid_size follow the dVAE: {derived}", file=sys.stderr)
        model_config = replace(model_config, **derived)
    tokenizer = prepare_tokenizer(out, data, model_config.text_vocab_size, tokenizer_path, resume)

    tokens = Path(tokens) if tokens is not None else out / "tokens"
    augment = image_augment(config) if config.code_views > 1 else None
    if rank == 0 and not cache_is_current(tokens, vae_dir, data, config.code_views, augment):
        build_code_cache(
            vae, vae_dir, data, tokens, val_data=val_data, num_workers=config.num_workers, device=device,
            views=config.code_views, augment=augment,
        )  # fmt: skip
    barrier()
    train_source = open_code_cache(tokens, "train")
    has_val = (tokens / "val-00000.npz").exists()
    config = with_epochs(config, train_source, None if has_val else "train")
    if rank == 0:  # what the model knows, for prompt suggestions and the unseen-prompt notice
        trained = (record for record in train_source if has_val or not is_validation(record.key, config.val_fraction))
        write_training_prompts(out, (caption for record in trained for caption in record.captions))
    val_source = open_code_cache(tokens, "val") if has_val else train_source

    templates = caption_templates(config)

    def train_stream(start_batch: int) -> SampleStream:
        return SampleStream(
            train_source,
            image_size=vae.config.image_size,
            batch_size=config.batch_size,
            seed=config.seed,
            holdout=None if has_val else "train",
            val_fraction=config.val_fraction,
            start_batch=start_batch,
            rank=rank,
            world_size=world,
            caption_templates=templates,
        )

    def val_batches() -> Iterable[dict]:
        stream = SampleStream(
            val_source,
            image_size=vae.config.image_size,
            batch_size=config.batch_size,
            seed=config.seed,
            holdout=None if has_val else "val",
            val_fraction=config.val_fraction,
            shuffle=False,
            infinite=False,
        )
        return make_loader(stream, num_workers=0)

    text_length = model_config.text_length

    def with_text(batch: dict) -> dict:
        if "text" not in batch:
            batch["text"] = tokenizer(batch["captions"], text_length).to(batch["codes"].device)
        return batch

    train_batches = batches(train_stream, config.num_workers, pin_memory=device.type == "cuda")
    return CodeData(vae, tokenizer, model_config, config, train_batches, val_batches, with_text)


def train_dalle(
    data: str | Path,
    out: str | Path,
    model_config: Any,
    config: TrainConfig,
    *,
    vae_run: str | Path,
    tokenizer_path: str | Path | None = None,
    tokens: str | Path | None = None,
    val_data: str | Path | None = None,
    resume: bool = False,
) -> torch.nn.Module:
    """Trains the DALL·E transformer on a dataset encoded once by the dVAE in `vae_run` (see `prepare_codes`);
    each evaluation reports validation loss in bits per image token and writes samples for fixed validation
    captions."""
    out = Path(out)
    vae, tokenizer, model_config, config, train_batches, val_batches, with_text = prepare_codes(
        data, out, model_config, config, vae_run=vae_run, tokenizer_path=tokenizer_path, tokens=tokens,
        val_data=val_data, resume=resume,
    )  # fmt: skip

    def loss_fn(model: torch.nn.Module, batch: dict, progress: float) -> tuple[torch.Tensor, dict[str, float]]:
        return objectives.dalle_loss(model, with_text(batch), progress)

    def validate(model: torch.nn.Module, batches_: list[dict]) -> tuple[dict[str, float], torch.Tensor]:
        metrics = evaluate.dalle_metrics(model, [with_text(batch) for batch in batches_])
        prompts = [caption for batch in batches_ for caption in batch["captions"]][:8]
        samples = sampling.generate(model, vae, tokenizer, prompts, n=4, seed=0)
        truth = vae.decode(torch.cat([batch["codes"] for batch in batches_])[: len(prompts)])  # (P, 3, H, W)
        rows = torch.cat([truth[:, None], samples.images.view(len(prompts), 4, *truth.shape[1:])], 1)
        return metrics, make_grid(rows.flatten(0, 1), n_col=5)  # each row: the real image, then 4 samples

    torch.manual_seed(config.seed)
    model = DALLE(model_config)
    return train(model, loss_fn, train_batches, out, config, val_batches=val_batches, evaluate=validate, resume=resume)


def train_captioner(
    data: str | Path,
    out: str | Path,
    model_config: Any,
    config: TrainConfig,
    *,
    vae_run: str | Path,
    tokenizer_path: str | Path | None = None,
    tokens: str | Path | None = None,
    val_data: str | Path | None = None,
    resume: bool = False,
) -> torch.nn.Module:
    """Trains the captioner (DALL·E's stream reversed: codes, then caption) on the dataset's captions, its images
    encoded once by the dVAE in `vae_run` (see `prepare_codes`); each evaluation reports the validation caption
    loss (nats per token) and its perplexity."""
    out = Path(out)
    _, _, model_config, config, train_batches, val_batches, with_text = prepare_codes(
        data, out, model_config, config, vae_run=vae_run, tokenizer_path=tokenizer_path, tokens=tokens,
        val_data=val_data, resume=resume,
    )  # fmt: skip

    def loss_fn(model: torch.nn.Module, batch: dict, progress: float) -> tuple[torch.Tensor, dict[str, float]]:
        return objectives.captioner_loss(model, with_text(batch), progress)

    def validate(model: torch.nn.Module, batches_: list[dict]) -> tuple[dict[str, float], None]:
        return evaluate.captioner_metrics(model, [with_text(batch) for batch in batches_]), None

    torch.manual_seed(config.seed)
    model = Captioner(model_config)
    return train(model, loss_fn, train_batches, out, config, val_batches=val_batches, evaluate=validate, resume=resume)
