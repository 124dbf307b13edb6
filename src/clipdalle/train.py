"""The one training loop, shared by the dVAE, CLIP and DALL·E, driven by a model module's `loss_fn`.

Runs unchanged in one process or under `torchrun --nproc_per_node N` (gloo on CPU, nccl on GPU): rank 0 logs
and saves, every rank reads its own share of the data. A run is resumable at every checkpoint, bit for bit:
random state is re-seeded from (seed, step, rank) at each step and the data stream restarts at the batch
where the checkpoint left it, so a killed-and-resumed run ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import csv
import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tqdm import tqdm

from . import checkpoint
from .config import TrainConfig

LossFn = Callable[[torch.nn.Module, dict, float], tuple[torch.Tensor, dict[str, float]]]
EvaluateFn = Callable[[torch.nn.Module, list[dict]], tuple[dict[str, float], torch.Tensor | None]]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# ------------------------------------------------------------------------------------------ small pure pieces


def lr_at(step: int, config: TrainConfig) -> float:
    """Linear warmup to `lr`, then cosine decay to `lr * min_lr_ratio` at the last step."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    span = max(1, config.steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / span)
    floor = config.lr * config.min_lr_ratio
    return floor + 0.5 * (config.lr - floor) * (1 + math.cos(math.pi * progress))


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: decay on weight matrices only; gains, biases, embeddings and scales are left alone."""
    embedding_params = {
        id(param)
        for module in model.modules()
        if isinstance(module, torch.nn.Embedding)
        for param in module.parameters()
    }
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim < 2 or id(param) in embedding_params or "embedding" in name or "logit_" in name:
            no_decay.append(param)
        else:
            decay.append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        name = f"cuda:{local_rank}"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    if name != "cpu" and not name.startswith("cuda"):
        raise ValueError(f"--device {name!r}: expected auto, cpu, cuda or cuda:N")
    return torch.device(name)


def resolve_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"--dtype {name!r}: expected one of {', '.join(DTYPES)}")
    return DTYPES[name]


def seed_step(seed: int, step: int, rank: int) -> None:
    """Random state as a function of (seed, step, rank): dropout and sampling noise replay exactly on resume."""
    torch.manual_seed((seed * 1_000_003 + step * 1009 + rank) % (2**63))


# ------------------------------------------------------------------------------------------ distributed


def distributed_context() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's environment; (0, 1, 0) in a plain process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0"))


def init_distributed(device: torch.device) -> None:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


# ------------------------------------------------------------------------------------------ metrics


class MetricsLog:
    """RUN/metrics.csv in long format (step, split, name, value) and RUN/loss.png drawn from it."""

    def __init__(self, run_dir: Path, resume_step: int | None):
        self.path = run_dir / "metrics.csv"
        self.plot_path = run_dir / "loss.png"
        rows = self.read() if resume_step is not None else []
        rows = [row for row in rows if int(row["step"]) <= (resume_step or 0)]  # drop rows past the checkpoint
        checkpoint.atomic_write(self.path, lambda tmp: self._write(tmp, rows))

    def read(self) -> list[dict[str, str]]:
        if not self.path.exists():
            return []
        with open(self.path, newline="") as handle:
            return list(csv.DictReader(handle))

    @staticmethod
    def _write(path: Path, rows: list[dict[str, str]]) -> None:
        with open(path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=["step", "split", "name", "value"])
            writer.writeheader()
            writer.writerows(rows)

    def add(self, step: int, split: str, metrics: dict[str, float]) -> None:
        with open(self.path, "a", newline="") as handle:
            writer = csv.writer(handle)
            for name, value in metrics.items():
                writer.writerow([step, split, name, f"{float(value):.6g}"])

    def plot(self) -> None:
        """One panel per metric name, train and val lines; rewritten atomically."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        series: dict[str, dict[str, tuple[list[int], list[float]]]] = {}
        for row in self.read():
            steps, values = series.setdefault(row["name"], {}).setdefault(row["split"], ([], []))
            steps.append(int(row["step"]))
            values.append(float(row["value"]))
        names = [name for name in series if name not in ("lr", "skipped_images")] or list(series)
        if not names:
            return
        columns = min(3, len(names))
        rows = math.ceil(len(names) / columns)
        figure, axes = plt.subplots(rows, columns, figsize=(4.5 * columns, 3.2 * rows), squeeze=False)
        for axis, name in zip(axes.flat, names):
            for split, (steps, values) in sorted(series[name].items()):
                axis.plot(steps, values, label=split, marker="o" if split != "train" else None, markersize=3)
            axis.set_title(name)
            axis.set_xlabel("step")
            axis.grid(alpha=0.3)
            axis.legend(fontsize=8)
        for axis in list(axes.flat)[len(names) :]:
            axis.axis("off")
        figure.tight_layout()
        checkpoint.atomic_write(self.plot_path, lambda tmp: figure.savefig(tmp, dpi=90, format="png"))
        plt.close(figure)


# ------------------------------------------------------------------------------------------ the loop


def train(
    model: torch.nn.Module,
    loss_fn: LossFn,
    train_batches: Callable[[int], Iterator[dict]],
    run_dir: str | Path,
    config: TrainConfig,
    *,
    val_batches: Callable[[], Iterable[dict]] | None = None,
    evaluate: EvaluateFn | None = None,
    resume: bool = False,
    items_key: str = "keys",
) -> torch.nn.Module:
    """Trains `model` for `config.steps` optimizer steps and returns it (unwrapped, on its device).

    `train_batches(start_batch)` yields this rank's batches from `start_batch` on; `val_batches()` yields
    validation batches (the first `config.eval_batches` are used, decoded once). The run directory receives
    config.json at the start, and checkpoints, metrics.csv, loss.png and samples/ as it goes."""
    run_dir = Path(run_dir)
    rank, world, local_rank = distributed_context()
    device = resolve_device(config.device, local_rank)
    init_distributed(device)
    dtype = resolve_dtype(config.dtype)
    is_main = rank == 0

    model.to(device)
    # fused=True: one kernel over all parameters instead of a Python loop; on CPU 0.15 s instead of 0.56 s per
    # step for a CLIP with a 49,408-row embedding (benchmarks/RESULTS.md, CLIP section).
    optimizer = torch.optim.AdamW(
        parameter_groups(model, config.weight_decay), lr=config.lr, betas=(config.beta1, config.beta2), fused=True
    )
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    step = 0
    if resume:
        checkpoint.recover(run_dir) if is_main else None
        barrier()
        state = checkpoint.load_train_state(run_dir)
        checkpoint.load_weights(run_dir / checkpoint.WEIGHTS_FILE, model)
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        step = int(state["step"])
        if state.get("world_size", world) != world:
            print(
                f"warning: {run_dir} was trained with {state['world_size']} process(es), resuming with {world}: "
                "the data order after the checkpoint differs from an uninterrupted run",
                file=sys.stderr,
            )
    elif is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        checkpoint.save_config(run_dir, model, config)
    raw_model = model
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )

    log = MetricsLog(run_dir, step if resume else None) if is_main else None
    data = train_batches(step * config.grad_accum)
    val_cache: list[dict] | None = None
    skipped_total = 0
    last_epoch = 0
    progress_bar = tqdm(
        total=config.steps, initial=step, disable=not is_main, unit="step", dynamic_ncols=True, file=sys.stderr
    )
    items_since, time_since = 0, time.perf_counter()
    running: dict[str, float] = {}

    while step < config.steps:
        lr = lr_at(step, config)
        for group in optimizer.param_groups:
            group["lr"] = lr
        seed_step(config.seed, step, rank)
        model.train()
        for micro_step in range(config.grad_accum):
            batch = to_device(next(data), device)
            skipped_total += batch.get("skipped", 0)
            if batch.get("epoch", 0) > last_epoch:
                last_epoch = batch["epoch"]
                if is_main and skipped_total:
                    progress_bar.write(f"epoch {last_epoch}: {skipped_total} unreadable image(s) skipped so far")
            items_since += len(batch[items_key])
            sync = world == 1 or micro_step == config.grad_accum - 1
            with contextlib.nullcontext() if sync else model.no_sync(), autocast(device, dtype):
                loss, metrics = loss_fn(model, batch, step / config.steps)
                scaler.scale(loss / config.grad_accum).backward()
            for name, value in metrics.items():
                running[name] = running.get(name, 0.0) + float(value) / config.grad_accum
        if config.grad_clip > 0:
            scaler.unscale_(optimizer)
            running["grad_norm"] = running.get("grad_norm", 0.0) + float(
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            )
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        if hasattr(raw_model, "after_step"):  # e.g. CLIP clamps its logit scale
            raw_model.after_step()
        step += 1
        progress_bar.update(1)

        if is_main and (step % config.log_every == 0 or step == config.steps):
            elapsed = time.perf_counter() - time_since
            rate = items_since * world / max(elapsed, 1e-9)
            steps_logged = config.log_every if step % config.log_every == 0 else step % config.log_every
            averaged = {name: value / steps_logged for name, value in running.items()}
            log.add(step, "train", {**averaged, "lr": lr, "items_per_s": rate, "skipped_images": skipped_total})
            progress_bar.set_postfix(loss=f"{averaged.get('loss', float('nan')):.4f}", items_s=f"{rate:.0f}")
            running, items_since, time_since = {}, 0, time.perf_counter()
        elif not is_main and step % config.log_every == 0:
            running = {}

        if step % config.eval_every == 0 or step == config.steps:
            if is_main and evaluate is not None and val_batches is not None:
                if val_cache is None:
                    val_cache = [to_device(batch, device) for batch in _take(val_batches(), config.eval_batches)]
                if val_cache:
                    raw_model.eval()
                    with torch.no_grad(), autocast(device, dtype):
                        val_metrics, grid = evaluate(raw_model, val_cache)
                    log.add(step, "val", val_metrics)
                    if grid is not None:
                        from .transforms import save_image

                        save_image(grid.float().cpu(), run_dir / "samples" / f"step_{step:06d}.png")
                    summary = ", ".join(f"{name} {value:.4g}" for name, value in val_metrics.items())
                    progress_bar.write(f"step {step}: {summary}")
            if is_main:
                log.plot()
            barrier()

        if step % config.save_every == 0 or step == config.steps:
            if is_main:
                train_state = {
                    "step": step,
                    "optimizer": optimizer.state_dict(),
                    "scaler": scaler.state_dict(),
                    "data_position": step * config.grad_accum,
                    "world_size": world,
                }
                checkpoint.save_checkpoint(run_dir, raw_model, train_state)
                checkpoint.save_config(run_dir, raw_model, config)
            barrier()

    progress_bar.close()
    if is_main and skipped_total:
        print(f"{skipped_total} unreadable image(s) skipped (see skipped_images in metrics.csv)", file=sys.stderr)
    del data
    if dist.is_initialized():
        dist.destroy_process_group()
    return raw_model


def to_device(batch: dict, device: torch.device) -> dict:
    return {key: value.to(device) if isinstance(value, torch.Tensor) else value for key, value in batch.items()}


def autocast(device: torch.device, dtype: torch.dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _take(items: Iterable[dict], count: int) -> list[dict]:
    taken = []
    for item in items:
        if len(taken) >= count:
            break
        if len(item.get("keys", [None])) > 0:
            taken.append(item)
    return taken


# ------------------------------------------------------------------------------------------ recipes


def data_streams(
    data: str | Path,
    config: TrainConfig,
    image_size: int,
    *,
    val_data: str | Path | None = None,
    captions: str = "required",
) -> tuple[Callable[[int], Iterator[dict]], Callable[[], Iterable[dict]]]:
    """Training and validation batch functions for `train`, from a dataset path (see data/sources.py).

    A directory with train/ and val/ uses them; else `val_data`; else a stable hash of each sample's key holds
    out `config.val_fraction` of the data."""
    from .data.loader import Augment, SampleStream, batches, make_loader
    from .data.sources import open_source, resolve_splits

    augment = None
    if config.crop_scale < 1.0 or config.max_shift > 0.0:
        augment = Augment(min_scale=config.crop_scale, max_shift=config.max_shift)

    rank, world, _ = distributed_context()
    train_path, val_path = resolve_splits(data, val_data)
    train_source = open_source(train_path, captions=captions)
    val_source = open_source(val_path, captions=captions) if val_path is not None else train_source
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

    return batches(train_stream, config.num_workers), val_batches


def train_vae(
    data: str | Path,
    out: str | Path,
    model_config: Any,
    config: TrainConfig,
    *,
    val_data: str | Path | None = None,
    resume: bool = False,
) -> torch.nn.Module:
    """Trains the discrete VAE (images only; captions are not needed) into the run directory `out`."""
    from . import dvae

    train_batches, val_batches = data_streams(
        data, config, model_config.image_size, val_data=val_data, captions="optional"
    )
    torch.manual_seed(config.seed)
    model = dvae.DiscreteVAE(model_config)
    return train(
        model,
        dvae.loss_fn,
        train_batches,
        out,
        config,
        val_batches=val_batches,
        evaluate=dvae.evaluate,
        resume=resume,
    )


def prepare_tokenizer(
    out: Path, data: str | Path, vocab_size: int, tokenizer_path: str | Path | None, resume: bool
) -> Any:
    """The caption tokenizer of a run: its own on resume, else `tokenizer_path`, else one trained on the
    training captions. Rank 0 writes RUN/tokenizer.json; the other ranks wait and read it."""
    from .data.sources import open_source, resolve_splits
    from .tokenizer import MIN_VOCAB_SIZE, CaptionTokenizer

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
    resume: bool = False,
) -> torch.nn.Module:
    """Trains CLIP on (image, caption) pairs into `out`: from scratch with our caption tokenizer, or fine-tuned
    from `init` (a run or OpenAI / open_clip / Hugging Face weights, with their own tokenizer). `lock_image`
    freezes the image tower (LiT)."""
    from . import clip

    out = Path(out)
    rank, _, local_rank = distributed_context()
    init_distributed(resolve_device(config.device, local_rank))
    if resume and (out / "vocab.json").exists():  # a fine-tuned run keeps its foreign CLIP BPE
        from .clip_tokenizer import ClipTokenizer

        tokenizer = ClipTokenizer.from_files(out)
        model = clip.CLIP(model_config)
    elif init is not None and not resume:
        model, _, tokenizer = clip.load(init)
        if rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            _save_tokenizer(tokenizer, out)
    else:
        tokenizer = prepare_tokenizer(out, data, model_config.vocab_size, tokenizer_path, resume)
        torch.manual_seed(config.seed)
        model = clip.CLIP(model_config)
    if lock_image:
        for parameter in model.visual.parameters():
            parameter.requires_grad_(False)
    context_length = model.config.context_length

    def with_text(batch: dict) -> dict:
        if "text" not in batch:
            batch["text"] = tokenizer(batch["captions"], context_length).to(batch["images"].device)
        return batch

    def loss_fn(model: torch.nn.Module, batch: dict, progress: float) -> tuple[torch.Tensor, dict[str, float]]:
        return clip.loss_fn(model, with_text(batch), progress)

    def evaluate(model: torch.nn.Module, batches: list[dict]) -> tuple[dict[str, float], torch.Tensor | None]:
        batches = [with_text(batch) for batch in batches]
        metrics, grid = clip.evaluate(model, batches)
        metrics["zero_shot_accuracy"] = caption_zero_shot_accuracy(model, batches, tokenizer)
        return metrics, grid

    train_batches, val_batches = data_streams(data, config, model.config.image_size, val_data=val_data)
    return train(model, loss_fn, train_batches, out, config, val_batches=val_batches, evaluate=evaluate, resume=resume)


def caption_zero_shot_accuracy(model: torch.nn.Module, batches: list[dict], tokenizer: Any) -> float:
    """Zero-shot classification with the validation captions as the label set: an image is right when its own
    caption (or an identical one) gets the highest probability."""
    from . import clip

    captions = [caption for batch in batches for caption in batch["captions"]]
    labels = sorted(set(captions))
    images = torch.cat([batch["images"] for batch in batches])
    probabilities = clip.classify(model, images, labels, tokenizer)
    predicted = probabilities.argmax(dim=1).tolist()
    return sum(labels[index] == caption for index, caption in zip(predicted, captions)) / max(1, len(captions))


def _save_tokenizer(tokenizer: Any, out: Path) -> None:
    from .tokenizer import CaptionTokenizer

    if isinstance(tokenizer, CaptionTokenizer):
        tokenizer.save(out / checkpoint.TOKENIZER_FILE)
    else:  # OpenAI's BPE: vocab.json + merges.txt, which clip.load reads back
        tokenizer.save(out)


@torch.no_grad()
def linear_probe(
    clip_run: str | Path,
    data: str | Path,
    *,
    val_data: str | Path | None = None,
    val_fraction: float = 0.2,
    batch_size: int = 256,
    device: str = "cpu",
) -> dict[str, Any]:
    """Logistic regression (scikit-learn) on frozen CLIP image features of a labelled set, beside zero-shot
    accuracy with the class names as prompts. Without `val_data`, a stable hash of each sample's key holds out
    `val_fraction` for testing."""
    from sklearn.linear_model import LogisticRegression

    from . import clip
    from .data.sources import is_validation, open_labelled
    from .transforms import BadImage

    model, preprocess, tokenizer = clip.load(clip_run, device=device)
    skipped = 0

    def features(path: str | Path, holdout: str | None) -> tuple[torch.Tensor, list[str]]:
        nonlocal skipped
        rows, labels, images = [], [], []
        for record in open_labelled(path):
            if holdout is not None and is_validation(record.key, val_fraction) != (holdout == "val"):
                continue
            try:
                images.append(preprocess(record.path if record.path is not None else _pil(record)))
            except BadImage:
                skipped += 1
                continue
            labels.append(record.label)
            if len(images) == batch_size:
                rows.append(model.encode_image(torch.stack(images).to(device)).cpu())
                images = []
        if images:
            rows.append(model.encode_image(torch.stack(images).to(device)).cpu())
        if not rows:
            raise ValueError(f"{path}: no labelled images in the {holdout or 'given'} split")
        return torch.cat(rows), labels

    train_features, train_labels = features(data, "train" if val_data is None else None)
    test_features, test_labels = features(val_data or data, "val" if val_data is None else None)
    classes = sorted(set(train_labels) | set(test_labels))
    if len(set(train_labels)) < 2:
        raise ValueError(f"{data}: a linear probe needs at least two classes in the training split")
    probe = LogisticRegression(max_iter=2000, C=1.0).fit(train_features.numpy(), train_labels)
    probe_accuracy = float((probe.predict(test_features.numpy()) == test_labels).mean())
    text_features = clip.label_features(model, classes, tokenizer)
    predicted = (test_features.to(device) @ text_features.T).argmax(dim=1).tolist()
    zero_shot = sum(classes[index] == label for index, label in zip(predicted, test_labels)) / len(test_labels)
    return {
        "classes": len(classes),
        "train_images": len(train_labels),
        "test_images": len(test_labels),
        "linear_probe_accuracy": probe_accuracy,
        "zero_shot_accuracy": zero_shot,
        "chance": 1 / len(classes),
        "skipped_images": skipped,
    }


def _pil(record: Any) -> Any:
    from .transforms import decode_image

    return decode_image(record.read_bytes(), record.name)


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
    """Trains the DALL·E transformer on a dataset encoded once by the dVAE in `vae_run`.

    The dVAE is copied into RUN/vae/ (a run refuses a different dVAE later); the dataset's codes are cached in
    `tokens` (default RUN/tokens/) and reused while the dVAE and the data are the same; each evaluation reports
    validation loss in bits per image token and writes samples for fixed validation captions."""
    import shutil

    from . import dalle, sampling
    from .config import replace
    from .data.codes import build_code_cache, cache_is_current, open_code_cache, weights_sha256
    from .data.loader import SampleStream, batches, make_loader

    out = Path(out)
    rank, world, local_rank = distributed_context()
    device = resolve_device(config.device, local_rank)
    init_distributed(device)
    vae_dir = out / "vae"
    if rank == 0:
        if (vae_dir / checkpoint.WEIGHTS_FILE).exists():
            if Path(vae_run).resolve() != vae_dir.resolve() and weights_sha256(vae_dir) != weights_sha256(vae_run):
                raise ValueError(
                    f"{out} was trained with the dVAE in {vae_dir} (sha256 {weights_sha256(vae_dir)[:12]}), not with "
                    f"{vae_run} (sha256 {weights_sha256(vae_run)[:12]}); train a new DALL·E run for another dVAE"
                )
        else:
            checkpoint.load_model(vae_run, expect="dvae")  # a clear error before copying anything
            shutil.copytree(
                vae_run, vae_dir, ignore=shutil.ignore_patterns(checkpoint.TRAIN_STATE_FILE, ".*"), dirs_exist_ok=True
            )
    barrier()
    vae = checkpoint.load_model(vae_dir, expect="dvae", device=device)
    derived = {"image_vocab_size": vae.config.vocab_size, "grid_size": vae.config.grid_size}
    if any(getattr(model_config, name) != value for name, value in derived.items()):
        print(f"note: image_vocab_size and grid_size follow the dVAE: {derived}", file=sys.stderr)
        model_config = replace(model_config, **derived)
    tokenizer = prepare_tokenizer(out, data, model_config.text_vocab_size, tokenizer_path, resume)

    tokens = Path(tokens) if tokens is not None else out / "tokens"
    if rank == 0 and not cache_is_current(tokens, vae_dir, data):
        build_code_cache(vae, vae_dir, data, tokens, val_data=val_data, num_workers=config.num_workers, device=device)
    barrier()
    train_source = open_code_cache(tokens, "train")
    has_val = (tokens / "val-00000.npz").exists()
    val_source = open_code_cache(tokens, "val") if has_val else train_source

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

    def with_text(batch: dict) -> dict:
        if "text" not in batch:
            batch["text"] = tokenizer(batch["captions"], model_config.text_length).to(batch["codes"].device)
        return batch

    def loss_fn(model: torch.nn.Module, batch: dict, progress: float) -> tuple[torch.Tensor, dict[str, float]]:
        return dalle.loss_fn(model, with_text(batch), progress)

    def evaluate(model: torch.nn.Module, batches_: list[dict]) -> tuple[dict[str, float], torch.Tensor | None]:
        metrics, _ = dalle.evaluate(model, [with_text(batch) for batch in batches_])
        prompts = [caption for batch in batches_ for caption in batch["captions"]][:8]
        samples = sampling.generate(model, vae, tokenizer, prompts, n=4, seed=0)
        truth = vae.decode(torch.cat([batch["codes"] for batch in batches_])[: len(prompts)])  # (P, 3, H, W)
        rows = torch.cat([truth[:, None], samples.images.view(len(prompts), 4, *truth.shape[1:])], 1)
        from .transforms import make_grid

        return metrics, make_grid(rows.flatten(0, 1), n_col=5)  # each row: the real image, then 4 samples

    torch.manual_seed(config.seed)
    model = dalle.DALLE(model_config)
    return train(
        model,
        loss_fn,
        batches(train_stream, config.num_workers),
        out,
        config,
        val_batches=val_batches,
        evaluate=evaluate,
        resume=resume,
    )
