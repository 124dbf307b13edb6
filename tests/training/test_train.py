"""The shared training loop with a toy model: schedule, decay groups, learning, metrics, resume, DDP."""

import csv
import math
from dataclasses import dataclass

import pytest
import torch
from helpers import lock_held_by_another_process

from clipdalle import checkpoint
from clipdalle.config import TrainConfig
from clipdalle.runtime import resolve_device, resolve_dtype
from clipdalle.training.loop import lr_at, parameter_groups, train


@dataclass
class ToyConfig:
    width: int = 8  # toy width


class Toy(torch.nn.Module):
    model_type = "toy"
    config_class = ToyConfig

    def __init__(self, config: ToyConfig):
        super().__init__()
        self.config = config
        self.embedding = torch.nn.Embedding(4, config.width)
        self.linear = torch.nn.Linear(config.width, 3)
        self.norm = torch.nn.LayerNorm(config.width)

    def forward(self, images):
        return self.linear(self.norm(images.mean((2, 3)).repeat(1, 3)[:, : self.config.width]))


def toy_loss(model, batch, progress):
    target = batch["images"].mean((2, 3))
    loss = torch.nn.functional.mse_loss(model(batch["images"]), target)
    return loss, {"loss": loss.item()}


def toy_evaluate(model, batches):
    losses = [toy_loss(model, batch, 1.0)[0].item() for batch in batches]
    return {"loss": sum(losses) / len(losses)}, torch.rand(3, 8, 8)


def toy_batches(seed=0):
    def open_batches(start_batch):
        index = start_batch
        while True:
            generator = torch.Generator().manual_seed(seed * 100_000 + index)
            images = torch.rand(8, 3, 4, 4, generator=generator)
            index += 1
            yield {"keys": [f"k{index}_{i}" for i in range(8)], "images": images, "captions": [""] * 8}

    return open_batches


@pytest.fixture(autouse=True)
def register_toy(monkeypatch):
    monkeypatch.setitem(checkpoint.MODEL_CLASSES, "toy", Toy)


def config(**changes):
    values = dict(steps=30, batch_size=8, lr=3e-2, warmup_steps=3, eval_every=10, save_every=10, log_every=5)
    return TrainConfig(**{**values, **changes})


def test_schedule_warms_up_then_decays_to_the_floor():
    cfg = TrainConfig(steps=100, warmup_steps=10, lr=1.0, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1)
    assert lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(10, cfg) == pytest.approx(1.0)
    assert lr_at(100, cfg) == pytest.approx(0.1)
    values = [lr_at(step, cfg) for step in range(10, 101)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_no_decay_on_gains_biases_and_embeddings():
    model = Toy(ToyConfig())
    decay, no_decay = parameter_groups(model, 0.1)
    assert {id(p) for p in decay["params"]} == {id(model.linear.weight)}
    assert no_decay["weight_decay"] == 0.0 and len(no_decay["params"]) == 4


def test_bad_device_and_dtype_are_clear_errors(monkeypatch):
    with pytest.raises(ValueError, match="expected auto, cpu, cuda"):
        resolve_device("tpu")
    with pytest.raises(ValueError, match="expected one of fp32, bf16, fp16"):
        resolve_dtype("fp8")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a machine with two GPUs
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda", local_rank=1) == torch.device("cuda:1")
    assert resolve_device("auto") == torch.device("cuda:0")
    with pytest.raises(ValueError, match="has 2 GPU\\(s\\), cuda:0 to cuda:1"):
        resolve_device("cuda:2")
    with pytest.raises(ValueError, match="expected auto, cpu, cuda or cuda:N"):
        resolve_device("cuda:x")


def test_training_learns_and_writes_the_run(tmp_path):
    torch.manual_seed(0)
    model = Toy(ToyConfig())
    run = tmp_path / "run"
    train(model, toy_loss, toy_batches(), run, config(), val_batches=lambda: toy_batches(1)(0), evaluate=toy_evaluate)
    with open(run / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    losses = [float(r["value"]) for r in rows if r["split"] == "train" and r["name"] == "loss"]
    assert losses[-1] < 0.5 * losses[0]
    assert {r["split"] for r in rows} == {"train", "val"}
    assert (run / "loss.png").stat().st_size > 1000
    assert sorted(p.name for p in (run / "samples").iterdir()) == [
        "step_000010.png",
        "step_000020.png",
        "step_000030.png",
    ]
    loaded = checkpoint.load_model(run)
    x = torch.rand(2, 3, 4, 4)
    assert torch.equal(loaded(x), model.eval()(x))
    assert checkpoint.checkpoint_step(run) == 30


def test_resume_equals_an_uninterrupted_run(tmp_path):
    torch.manual_seed(0)
    full = train(Toy(ToyConfig()), toy_loss, toy_batches(), tmp_path / "full", config())

    def crashing_loss(model, batch, progress):
        if progress >= 25 / 30:
            raise RuntimeError("simulated crash")
        return toy_loss(model, batch, progress)

    torch.manual_seed(0)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(Toy(ToyConfig()), crashing_loss, toy_batches(), tmp_path / "part", config())
    assert checkpoint.checkpoint_step(tmp_path / "part") == 20
    torch.manual_seed(123)  # a different init must not matter: weights come from the checkpoint
    resumed = train(Toy(ToyConfig()), toy_loss, toy_batches(), tmp_path / "part", config(), resume=True)
    for (name, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name
    with open(tmp_path / "part" / "metrics.csv") as handle:
        steps = [int(r["step"]) for r in csv.DictReader(handle) if r["name"] == "loss" and r["split"] == "train"]
    assert steps == [5, 10, 15, 20, 25, 30]  # rows logged after the checkpoint were dropped, none duplicated


def test_gradient_accumulation_reads_that_many_batches_per_step(tmp_path):
    seen = []

    def counting_loss(model, batch, progress):
        seen.append(batch["keys"][0])
        return toy_loss(model, batch, progress)

    train(Toy(ToyConfig()), counting_loss, toy_batches(), tmp_path / "run", config(steps=5, grad_accum=3))
    assert len(seen) == 15 and len(set(seen)) == 15
    assert checkpoint.load_train_state(tmp_path / "run")["data_position"] == 15


def test_bf16_autocast_trains(tmp_path):
    torch.manual_seed(0)
    model = train(Toy(ToyConfig()), toy_loss, toy_batches(), tmp_path / "run", config(steps=10, dtype="bf16"))
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in model.parameters())


def nan_at(steps_to_poison, total=30):
    """toy_loss, but NaN (with NaN gradients) at the given 0-based steps."""

    def loss_fn(model, batch, progress):
        loss, metrics = toy_loss(model, batch, progress)
        if round(progress * total) in steps_to_poison:
            loss = loss * float("nan")
            metrics = {"loss": float("nan")}
        return loss, metrics

    return loss_fn


def test_a_nan_loss_skips_its_step_and_is_counted(tmp_path):
    torch.manual_seed(0)
    model = train(Toy(ToyConfig()), nan_at({2, 17}), toy_batches(), tmp_path / "run", config())
    assert checkpoint.nonfinite_tensors(model) == []
    assert checkpoint.checkpoint_step(tmp_path / "run") == 30
    loaded = checkpoint.load_model(tmp_path / "run")
    assert all(torch.isfinite(tensor).all() for tensor in loaded.state_dict().values())
    with open(tmp_path / "run" / "metrics.csv") as handle:
        rows = [row for row in csv.DictReader(handle) if row["split"] == "train"]
    skipped = {int(row["step"]): float(row["value"]) for row in rows if row["name"] == "skipped_steps"}
    assert skipped[5] == 1 and skipped[15] == 1 and skipped[20] == 2 and skipped[30] == 2
    assert all(math.isfinite(float(row["value"])) for row in rows if row["name"] == "loss")


def test_nan_losses_in_a_row_stop_the_run_and_resume_from_the_last_good_checkpoint(tmp_path):
    run = tmp_path / "run"
    torch.manual_seed(0)
    with pytest.raises(ValueError) as raised:
        train(Toy(ToyConfig()), nan_at(set(range(13, 30))), toy_batches(), run, config(max_skipped_steps=3))
    message = str(raised.value)
    assert "\n" not in message and str(run) in message and "steps 14 to 16" in message and "step 10" in message
    assert checkpoint.checkpoint_step(run) == 10

    # The weights on disk are the good ones of step 10 (as a run that crashed there left them); --resume goes on.
    def crash_at_13(model, batch, progress):
        if round(progress * 30) >= 13:
            raise RuntimeError("simulated crash")
        return toy_loss(model, batch, progress)

    torch.manual_seed(0)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(Toy(ToyConfig()), crash_at_13, toy_batches(), tmp_path / "reference", config())
    reference = checkpoint.load_model(tmp_path / "reference").state_dict()
    for name, tensor in checkpoint.load_model(run).state_dict().items():
        assert torch.equal(reference[name], tensor), name
    resumed = train(Toy(ToyConfig()), toy_loss, toy_batches(), run, config(max_skipped_steps=3), resume=True)
    assert checkpoint.checkpoint_step(run) == 30 and checkpoint.nonfinite_tensors(resumed) == []


def test_non_finite_weights_are_never_committed(tmp_path):
    model = Toy(ToyConfig())
    checkpoint.save_checkpoint(tmp_path, model, {"step": 1})
    checkpoint.save_model(tmp_path / "model", model)
    before = (tmp_path / checkpoint.WEIGHTS_FILE).read_bytes()
    with torch.no_grad():
        model.linear.weight[0, 0] = float("inf")
        model.norm.bias[0] = float("nan")
    for save in (
        lambda: checkpoint.save_checkpoint(tmp_path, model, {"step": 2}),
        lambda: checkpoint.save_weights(tmp_path / checkpoint.WEIGHTS_FILE, model),
        lambda: checkpoint.save_model(tmp_path / "model", model),
        lambda: checkpoint.save_model(tmp_path / "new", model),
    ):
        with pytest.raises(ValueError, match="NaN or infinite values \\(2 tensor"):
            save()
    assert (tmp_path / checkpoint.WEIGHTS_FILE).read_bytes() == before
    assert checkpoint.checkpoint_step(tmp_path) == 1 and checkpoint.load_train_state(tmp_path)["step"] == 1
    assert not (tmp_path / "new").exists()
    checkpoint.load_model(tmp_path / "model")


def test_a_second_writer_of_a_run_gets_a_one_line_error(tmp_path):
    run = tmp_path / "run"
    with lock_held_by_another_process(run) as other:
        with pytest.raises(ValueError) as raised:
            train(Toy(ToyConfig()), toy_loss, toy_batches(), run, config(steps=2))
    message = str(raised.value)
    assert "\n" not in message and str(run) in message and f"pid {other}" in message
    assert not (run / checkpoint.CONFIG_FILE).exists()
    train(Toy(ToyConfig()), toy_loss, toy_batches(), run, config(steps=2))  # released: the run goes ahead
