"""Training that stops at its best: RUN/best/ holds the weights of the lowest validation loss and loading prefers
them, early stopping on a patience of evaluations, a time limit, epochs as the step count, caption templates and
cached code views."""

import pytest
import torch
from test_train import Toy, ToyConfig, config, register_toy, toy_batches, toy_loss  # noqa: F401 (autouse fixture)

from clipdalle import checkpoint, cli, pretrained
from clipdalle.config import TrainConfig, from_dict, load_preset
from clipdalle.data.loader import Augment, SampleStream
from clipdalle.demo import jobs
from clipdalle.io import file_sha256
from clipdalle.models.dvae import DiscreteVAE, DVAEConfig
from clipdalle.training.codes import build_code_cache, cache_is_current, open_code_cache
from clipdalle.training.loop import BestLoss, train
from clipdalle.training.recipes import caption_templates


def scripted_evaluate(losses):
    """An evaluation whose validation loss follows `losses` (one per call) and records the weights it saw."""
    seen = []

    def evaluate(model, batches):
        seen.append({name: tensor.clone() for name, tensor in model.state_dict().items()})
        return {"loss": losses[len(seen) - 1]}, None

    return evaluate, seen


def val_batches():
    return toy_batches(1)(0)


def test_best_loss_tracks_the_lowest_and_counts_evaluations_since():
    best = BestLoss()
    assert best.update(3.0, 10) and best.update(2.0, 20)
    assert not best.update(2.5, 30) and not best.update(float("nan"), 40) and not best.update(None, 50)
    assert (best.loss, best.step, best.evaluations_since) == (2.0, 20, 3)
    assert best.patience_spent(3) and not best.patience_spent(4) and not best.patience_spent(0)


def test_best_weights_are_kept_and_loaded_by_default(tmp_path):
    evaluate, seen = scripted_evaluate([3.0, 1.0, 2.0])
    run = tmp_path / "run"
    torch.manual_seed(0)
    model = train(Toy(ToyConfig()), toy_loss, toy_batches(), run, config(), val_batches=val_batches, evaluate=evaluate)
    assert checkpoint.best_checkpoint(run) == {"step": 20, "val_loss": 1.0}
    best = checkpoint.load_model(run)
    for name, tensor in best.state_dict().items():
        assert torch.equal(tensor, seen[1][name]), name  # the weights evaluated at step 20
    last = checkpoint.load_model(run, which="last")
    for name, tensor in last.state_dict().items():
        assert torch.equal(tensor, model.state_dict()[name]), name
    assert not torch.equal(best.linear.weight, last.linear.weight)
    assert checkpoint.weights_path(run) == run / "best" / "model.safetensors"
    assert checkpoint.weights_path(run, "last") == run / "model.safetensors"
    assert checkpoint.load_model(run / "best").linear.weight.equal(best.linear.weight)  # best/ loads on its own
    with pytest.raises(ValueError, match="which weights: expected one of best, last"):
        checkpoint.weights_path(run, "first")


def test_without_keep_best_loading_takes_the_last_weights(tmp_path):
    evaluate, _ = scripted_evaluate([3.0, 1.0, 2.0])
    run = tmp_path / "run"
    train(Toy(ToyConfig()), toy_loss, toy_batches(), run, config(keep_best=False), val_batches=val_batches,
          evaluate=evaluate)  # fmt: skip
    assert not (run / "best").exists() and checkpoint.best_checkpoint(run) is None
    assert checkpoint.weights_path(run) == run / "model.safetensors"


def test_early_stopping_ends_the_run_and_resume_does_not_restart_it(tmp_path, capsys):
    evaluate, seen = scripted_evaluate([3.0, 1.0, 2.0, 2.5, 2.6, 2.7])
    run = tmp_path / "run"
    settings = config(steps=60, eval_every=10, save_every=50, early_stop=2)
    train(Toy(ToyConfig()), toy_loss, toy_batches(), run, settings, val_batches=val_batches, evaluate=evaluate)
    assert len(seen) == 4  # evaluations at 10, 20 (best), 30, 40: two without a lower loss
    assert checkpoint.checkpoint_step(run) == 40 and checkpoint.checkpoint_stopped(run) == "early_stop"
    assert "stopped early at step 40" in capsys.readouterr().out
    assert checkpoint.best_checkpoint(run)["step"] == 20
    assert jobs.training_finished(run)  # the pipeline counts it as done

    more, _ = scripted_evaluate([0.1] * 10)
    train(Toy(ToyConfig()), toy_loss, toy_batches(), run, settings, val_batches=val_batches, evaluate=more, resume=True)
    assert "nothing to resume" in capsys.readouterr().err and checkpoint.checkpoint_step(run) == 40


def test_a_time_limit_stops_with_a_checkpoint(tmp_path, monkeypatch):
    clock = iter(range(0, 10_000, 1))  # each call of perf_counter is one second later
    monkeypatch.setattr("clipdalle.training.loop.time.perf_counter", lambda: float(next(clock)))
    run = tmp_path / "run"
    train(Toy(ToyConfig()), toy_loss, toy_batches(), run, config(steps=1000, max_seconds=20, save_every=500))
    step = checkpoint.checkpoint_step(run)
    assert 1 <= step < 30 and checkpoint.checkpoint_stopped(run) == "time_limit"
    assert jobs.training_finished(run)


def test_epochs_set_the_steps_from_the_training_split(capsys, shapes_folder, tmp_path):
    # 32 images; with val_fraction 0 every one trains: 3 epochs of 32 at batch 8 = 12 steps
    out = tmp_path / "vae"
    argv = ["train", "vae", "--data", str(shapes_folder), "--out", str(out), "--preset", "tiny", "--epochs", "3",
            "--val-fraction", "0", "--eval-every", "100"]  # fmt: skip
    assert cli.main(argv) == 0
    assert "3 epochs of 32 training samples at 8 per step: 12 steps" in capsys.readouterr().err
    assert checkpoint.checkpoint_step(out) == 12 and checkpoint.read_config(out)["train"]["steps"] == 12


def test_epochs_count_the_extra_data_and_the_cached_codes_of_dalle(capsys, shapes_folder, tmp_path):
    # the dVAE reads the 32 shapes and, mixed in, the same 32 twice (--extra-data PATH:2): 1 epoch of 96 at batch 8
    vae = tmp_path / "vae"
    argv = ["train", "vae", "--data", str(shapes_folder), "--extra-data", f"{shapes_folder}:2", "--out", str(vae),
            "--preset", "tiny", "--epochs", "1", "--val-fraction", "0", "--eval-every", "100"]  # fmt: skip
    assert cli.main(argv) == 0
    assert "1 epochs of 96 training samples at 8 per step: 12 steps" in capsys.readouterr().err
    assert checkpoint.checkpoint_step(vae) == 12
    # DALL·E counts the codes it caches, and trains for the steps it counted: 2 epochs of 32 at batch 8
    dalle = tmp_path / "dalle"
    argv = ["train", "dalle", "--data", str(shapes_folder), "--vae", str(vae), "--out", str(dalle), "--preset", "tiny",
            "--epochs", "2", "--val-fraction", "0", "--eval-every", "100"]  # fmt: skip
    assert cli.main(argv) == 0
    assert "2 epochs of 32 training samples at 8 per step: 8 steps" in capsys.readouterr().err
    assert checkpoint.checkpoint_step(dalle) == 8 and checkpoint.read_config(dalle)["train"]["steps"] == 8


def test_caption_templates_apply_to_training_captions_only(shapes_folder):
    from clipdalle.data.sources import open_source

    source = open_source(shapes_folder)
    stream = SampleStream(source, image_size=16, batch_size=32, infinite=False, caption_templates=("a photo of {}",))
    captions = next(iter(stream))["captions"]
    assert all(caption.startswith("a photo of ") for caption in captions)
    with pytest.raises(ValueError, match="exactly one"):
        caption_templates(TrainConfig(caption_templates="{}|no slot"))


def test_a_cache_with_views_gives_one_view_per_epoch(shapes_folder, tmp_path):
    torch.manual_seed(0)
    vae = DiscreteVAE(from_dict(DVAEConfig, load_preset("vae-tiny")["model"]))
    vae_run = tmp_path / "vae"
    checkpoint.save_model(vae_run, vae)
    augment = Augment(min_scale=0.5, max_shift=0.1)
    info = build_code_cache(vae, vae_run, shapes_folder, tmp_path / "codes", views=3, augment=augment, num_workers=0)
    assert info["views"] == {"views": 3, "min_scale": 0.5, "max_shift": 0.1}
    assert cache_is_current(tmp_path / "codes", vae_run, shapes_folder, 3, augment)
    assert not cache_is_current(tmp_path / "codes", vae_run, shapes_folder)  # a cache of one view is another cache
    record = next(iter(open_code_cache(tmp_path / "codes", "train")))
    assert record.codes.shape == (3, 16)  # the centre crop and two augmented views of a 4 x 4 grid
    assert not (record.codes[0] == record.codes[1]).all() or not (record.codes[0] == record.codes[2]).all()
    stream = SampleStream(open_code_cache(tmp_path / "codes", "train"), image_size=16, batch_size=32, seed=0)
    batches = iter(stream)
    epochs = [next(batches)["codes"] for _ in range(6)]  # 32 images a batch: one batch per epoch
    assert len({tuple(codes.flatten().tolist()) for codes in epochs}) > 1
    with pytest.raises(ValueError, match="need an augmentation"):
        build_code_cache(vae, vae_run, shapes_folder, tmp_path / "other", views=2)


def test_pretrained_load_and_weights_sha256_follow_the_best_weights(tiny_clip_run):
    # the session's tiny CLIP evaluated at steps 20 and 30 (tiny preset: eval_every 20, and the last step)
    assert checkpoint.weights_path(tiny_clip_run) == tiny_clip_run / checkpoint.BEST_DIR / checkpoint.WEIGHTS_FILE
    assert pretrained.weights_sha256(tiny_clip_run) == file_sha256(checkpoint.weights_path(tiny_clip_run))
    model, _, _ = pretrained.load(tiny_clip_run, which="last")
    last = checkpoint.load_model(tiny_clip_run, which="last")
    assert torch.equal(model.logit_scale, last.logit_scale)


def test_with_a_time_limit_the_schedule_follows_the_clock_when_it_is_ahead_of_the_steps():
    from clipdalle.training.loop import schedule_step

    limited = TrainConfig(steps=1000, max_seconds=100)
    assert schedule_step(200, limited, elapsed=10) == 200  # steps ahead of the clock
    assert schedule_step(200, limited, elapsed=50) == 500  # a slow run: half the time gone, half the decay done
    assert schedule_step(200, limited, elapsed=500) == 1000
    assert schedule_step(200, TrainConfig(steps=1000), elapsed=500) == 200  # no limit: steps alone
