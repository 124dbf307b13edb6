"""The one training loop, shared by the dVAE, CLIP and DALL·E, driven by a `loss_fn` from training.objectives.

Runs unchanged in one process or under `torchrun --nproc_per_node N` (gloo on CPU, nccl on GPU): rank 0 logs
and saves, every rank reads its own share of the data. A run is resumable at every checkpoint, bit for bit:
random state is re-seeded from (seed, step, rank) at each step and the data stream restarts at the batch
where the checkpoint left it, so a killed-and-resumed run ends with the same weights as an uninterrupted one.

Each evaluation that lowers the validation loss writes RUN/best/ (`checkpoint.save_best`), which loading prefers;
`config.early_stop` evaluations in a row without a lower loss end the run, and so does `config.max_seconds` of
training; either way the run ends with a checkpoint that records why (`checkpoint.checkpoint_stopped`).
"""

from __future__ import annotations

import contextlib
import csv
import math
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tqdm import tqdm

from .. import checkpoint
from ..config import TrainConfig
from ..io import DirectoryLock, atomic_write
from ..runtime import autocast, barrier, distributed_context, init_distributed, resolve_device, resolve_dtype, to_device
from ..transforms import save_image

LossFn = Callable[[torch.nn.Module, dict, float], tuple[torch.Tensor, dict[str, float]]]
EvaluateFn = Callable[[torch.nn.Module, list[dict]], tuple[dict[str, float], torch.Tensor | None]]


# ------------------------------------------------------------------------------------------ small pure pieces


def lr_at(step: int, config: TrainConfig) -> float:
    """Linear warmup to `lr`, then cosine decay to `lr * min_lr_ratio` at the last step."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    span = max(1, config.steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / span)
    floor = config.lr * config.min_lr_ratio
    return floor + 0.5 * (config.lr - floor) * (1 + math.cos(math.pi * progress))


def schedule_step(step: int, config: TrainConfig, elapsed: float) -> float:
    """The step the schedules (learning rate, loss schedules) are at: `step`, or further on when a time limit is set
    and the run is slower than its steps (elapsed / max_seconds of the way), so a run stopped by its time limit has
    finished its decay. Steps alone decide without a time limit (a resumed run then replays exactly)."""
    if config.max_seconds <= 0:
        return float(step)
    return max(float(step), min(1.0, elapsed / config.max_seconds) * config.steps)


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


@dataclass
class BestLoss:
    """The lowest validation loss so far, its step, and the evaluations since (early stopping's patience count)."""

    loss: float = math.inf
    step: int = 0
    evaluations_since: int = 0

    def update(self, loss: float | None, step: int) -> bool:
        """Records an evaluation's loss; True when it is a new lowest one (a NaN or missing loss never is)."""
        if loss is not None and math.isfinite(loss) and loss < self.loss:
            self.loss, self.step, self.evaluations_since = float(loss), step, 0
            return True
        self.evaluations_since += 1
        return False

    def patience_spent(self, patience: int) -> bool:
        return patience > 0 and self.evaluations_since >= patience


def seed_step(seed: int, step: int, rank: int) -> None:
    """Random state as a function of (seed, step, rank): dropout and sampling noise replay exactly on resume."""
    torch.manual_seed((seed * 1_000_003 + step * 1009 + rank) % (2**63))


# ------------------------------------------------------------------------------------------ metrics


class MetricsLog:
    """RUN/metrics.csv in long format (step, split, name, value) and RUN/loss.png drawn from it."""

    def __init__(self, run_dir: Path, resume_step: int | None):
        self.path = run_dir / "metrics.csv"
        self.plot_path = run_dir / "loss.png"
        rows = self.read() if resume_step is not None else []
        rows = [row for row in rows if int(row["step"]) <= (resume_step or 0)]  # drop rows past the checkpoint
        atomic_write(self.path, lambda tmp: self._write(tmp, rows))

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
        names = [name for name in series if name not in ("lr", "skipped_images", "skipped_steps")] or list(series)
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
        atomic_write(self.plot_path, lambda tmp: figure.savefig(tmp, dpi=90, format="png"))
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
    config.json at the start, and checkpoints, metrics.csv, loss.png and samples/ as it goes. One process writes a
    run at a time (rank 0 holds RUN/.lock); a second gets a one-line error.

    A step whose loss or gradient is NaN or infinite changes nothing (it is counted in `skipped_steps`);
    `config.max_skipped_steps` of them in a row stop the run with a one-line error, its last checkpoint intact."""
    run_dir = Path(run_dir)
    rank, _, _ = distributed_context()
    with DirectoryLock(run_dir, "train this run") if rank == 0 else contextlib.nullcontext():
        return _train(model, loss_fn, train_batches, run_dir, config, val_batches, evaluate, resume, items_key)


def _train(
    model: torch.nn.Module,
    loss_fn: LossFn,
    train_batches: Callable[[int], Iterator[dict]],
    run_dir: Path,
    config: TrainConfig,
    val_batches: Callable[[], Iterable[dict]] | None,
    evaluate: EvaluateFn | None,
    resume: bool,
    items_key: str,
) -> torch.nn.Module:
    rank, world, local_rank = distributed_context()
    device = resolve_device(config.device, local_rank)
    init_distributed(device)
    dtype = resolve_dtype(config.dtype)
    is_main = rank == 0

    model.to(device)
    # fused=True: one kernel over all parameters instead of a Python loop per tensor, which dominates a small
    # model's step with a large embedding (benchmarks/RESULTS.md, CLIP section).
    optimizer = torch.optim.AdamW(
        parameter_groups(model, config.weight_decay), lr=config.lr, betas=(config.beta1, config.beta2), fused=True
    )
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    step, skipped_steps, skipped_in_a_row = 0, 0, 0
    best = BestLoss()
    if resume:
        checkpoint.recover(run_dir) if is_main else None
        barrier()
        state = checkpoint.load_train_state(run_dir)
        checkpoint.load_weights(run_dir / checkpoint.WEIGHTS_FILE, model)
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        step = int(state["step"])
        skipped_steps = int(state.get("skipped_steps", 0))
        best = BestLoss(**state.get("best", {}))
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
    running: dict[str, float] = {}  # summed metrics of the good steps since the last log row
    good_since = 0  # steps in `running`
    started = time.perf_counter()
    stopped: str | None = None  # "early_stop" or "time_limit" once the run ends before its last step

    def save(step: int) -> None:
        if is_main:
            train_state = {
                "step": step,
                "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict(),
                "data_position": step * config.grad_accum,
                "world_size": world,
                "skipped_steps": skipped_steps,
                "best": vars(best),
                "stopped": stopped,
            }
            checkpoint.save_checkpoint(run_dir, raw_model, train_state)
            checkpoint.save_config(run_dir, raw_model, config)
        barrier()

    if resume and best.patience_spent(config.early_stop) and step < config.steps:
        if is_main:
            print(
                f"{run_dir}: stopped early at step {step} (no lower validation loss in {best.evaluations_since} "
                f"evaluations, the best {best.loss:.4g} at step {best.step}); nothing to resume",
                file=sys.stderr,
            )
        step = config.steps  # the loop below does not run; the run is left as it was

    while step < config.steps:
        at = step
        if config.max_seconds > 0:  # every rank follows rank 0's clock
            at = schedule_step(step, config, rank_zero_value(time.perf_counter() - started, device))
        lr = lr_at(int(at), config)
        for group in optimizer.param_groups:
            group["lr"] = lr
        seed_step(config.seed, step, rank)
        model.train()
        step_metrics: dict[str, float] = {}
        finite = True
        for micro_step in range(config.grad_accum):
            batch = to_device(next(data), device)
            skipped_total += batch.get("skipped", 0)
            if batch.get("epoch", 0) > last_epoch:
                last_epoch = batch["epoch"]
                if is_main and skipped_total:
                    progress_bar.write(f"epoch {last_epoch}: {skipped_total} unreadable sample(s) skipped so far")
            items_since += len(batch[items_key])
            sync = world == 1 or micro_step == config.grad_accum - 1
            with contextlib.nullcontext() if sync else model.no_sync(), autocast(device, dtype):
                loss, metrics = loss_fn(model, batch, at / config.steps)
                scaler.scale(loss / config.grad_accum).backward()
            finite = finite and math.isfinite(float(loss.detach()))
            for name, value in metrics.items():
                step_metrics[name] = step_metrics.get(name, 0.0) + float(value) / config.grad_accum
        if config.grad_clip > 0:
            scaler.unscale_(optimizer)
            step_metrics["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip))
            # fp16: an overflowing gradient is the GradScaler's to handle (it skips the step and lowers the scale)
            finite = finite and (scaler.is_enabled() or math.isfinite(step_metrics["grad_norm"]))
        elif not scaler.is_enabled():
            finite = finite and gradients_are_finite(model)
        if world > 1:  # every rank takes the same decision (a rank's NaN loss reaches all gradients anyway)
            finite = all_ranks_agree(finite, device)
        if finite:
            scaler.step(optimizer)
            scaler.update()
            skipped_in_a_row = 0
            for name, value in step_metrics.items():
                running[name] = running.get(name, 0.0) + value
            good_since += 1
        else:
            skipped_steps += 1
            skipped_in_a_row += 1
            if skipped_in_a_row >= config.max_skipped_steps:
                progress_bar.close()
                raise ValueError(
                    f"{run_dir}: the loss or the gradients were NaN or infinite at {skipped_in_a_row} steps in a row "
                    f"(steps {step + 2 - skipped_in_a_row} to {step + 1}; each was skipped); the last checkpoint "
                    f"(step {checkpoint.checkpoint_step(run_dir) or 'none'}) holds good weights: lower --lr or "
                    "check the data, then --resume"
                )
        optimizer.zero_grad(set_to_none=True)
        if finite and hasattr(raw_model, "after_step"):  # e.g. CLIP clamps its logit scale
            raw_model.after_step()
        step += 1
        progress_bar.update(1)

        if is_main and (step % config.log_every == 0 or step == config.steps):
            elapsed = time.perf_counter() - time_since
            rate = items_since * world / max(elapsed, 1e-9)
            averaged = {name: value / max(1, good_since) for name, value in running.items()}
            counts = {"skipped_images": skipped_total, "skipped_steps": skipped_steps}
            log.add(step, "train", {**averaged, "lr": lr, "items_per_s": rate, **counts})
            progress_bar.set_postfix(loss=f"{averaged.get('loss', float('nan')):.4f}", items_s=f"{rate:.0f}")
            running, good_since, items_since, time_since = {}, 0, 0, time.perf_counter()
        elif not is_main and step % config.log_every == 0:
            running, good_since = {}, 0

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
                        save_image(grid.float().cpu(), run_dir / "samples" / f"step_{step:06d}.png")
                    summary = ", ".join(f"{name} {value:.4g}" for name, value in val_metrics.items())
                    if best.update(val_metrics.get("loss"), step):
                        summary += " (best so far)"
                        if config.keep_best:
                            checkpoint.save_best(run_dir, raw_model, config, step, best.loss)
                    progress_bar.write(f"step {step}: {summary}")
            if is_main:
                log.plot()
            patience_spent = is_main and best.patience_spent(config.early_stop)
            if config.early_stop > 0 and rank_zero_says(patience_spent, device) and step < config.steps:
                stopped = "early_stop"
                if is_main:
                    progress_bar.write(
                        f"stopped early at step {step}: no lower validation loss in {config.early_stop} evaluations "
                        f"(the best, {best.loss:.4g}, at step {best.step})"
                    )
            barrier()

        if config.max_seconds > 0 and stopped is None and step < config.steps:
            too_long = time.perf_counter() - started >= config.max_seconds
            if rank_zero_says(is_main and too_long, device):
                stopped = "time_limit"
                if is_main:
                    progress_bar.write(f"stopped at step {step} of {config.steps}: time limit {config.max_seconds:g} s")
        if step % config.save_every == 0 or step == config.steps or stopped:
            save(step)
        if stopped:
            break

    progress_bar.close()
    if is_main and skipped_total:
        print(f"{skipped_total} unreadable sample(s) skipped (see skipped_images in metrics.csv)", file=sys.stderr)
    if is_main and skipped_steps:
        print(f"{skipped_steps} step(s) with a NaN or infinite loss skipped (see metrics.csv)", file=sys.stderr)
    del data
    if dist.is_initialized():
        dist.destroy_process_group()
    return raw_model


def rank_zero_says(flag: bool, device: torch.device) -> bool:
    """Rank 0's `flag` on every rank (one broadcast under torch.distributed; the flag itself otherwise)."""
    return rank_zero_value(1.0 if flag else 0.0, device) == 1.0


def rank_zero_value(number: float, device: torch.device) -> float:
    """Rank 0's `number` on every rank (one broadcast under torch.distributed; the number itself otherwise)."""
    if not dist.is_initialized():
        return number
    value = torch.tensor([float(number)], dtype=torch.float64, device=device)
    dist.broadcast(value, src=0)
    return float(value.item())


def gradients_are_finite(model: torch.nn.Module) -> bool:
    """No NaN or infinity in any gradient (one fused norm over all of them)."""
    gradients = [param.grad for param in model.parameters() if param.grad is not None]
    return not gradients or bool(torch.isfinite(torch.nn.utils.get_total_norm(gradients)))


def all_ranks_agree(flag: bool, device: torch.device) -> bool:
    """True when `flag` is True on every rank (one all-reduce of a single number)."""
    value = torch.tensor([0.0 if flag else 1.0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item() == 0.0)


def _take(items: Iterable[dict], count: int) -> list[dict]:
    taken = []
    for item in items:
        if len(taken) >= count:
            break
        if len(item.get("keys", [None])) > 0:
            taken.append(item)
    return taken
