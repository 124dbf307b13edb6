import json
from dataclasses import dataclass

import pytest
import torch

from clipdalle import checkpoint


@dataclass
class ToyConfig:
    width: int = 4  # toy width


class Toy(torch.nn.Module):
    model_type = "toy"
    config_class = ToyConfig

    def __init__(self, config: ToyConfig):
        super().__init__()
        self.config = config
        self.linear = torch.nn.Linear(config.width, config.width)
        self.tied = self.linear  # shared tensors are stored once


@pytest.fixture(autouse=True)
def register_toy(monkeypatch):
    monkeypatch.setitem(checkpoint.MODEL_CLASSES, "toy", Toy)


def test_save_and_load_model_is_bit_equal(tmp_path):
    model = Toy(ToyConfig(width=5))
    checkpoint.save_model(tmp_path / "run", model)
    loaded = checkpoint.load_model(tmp_path / "run")
    x = torch.randn(3, 5)
    assert torch.equal(model.linear(x), loaded.linear(x))
    values = json.loads((tmp_path / "run" / "config.json").read_text())
    assert values["clipdalle"] == {"model_type": "toy", "format_version": 1}
    assert values["model"] == {"width": 5}


def test_wrapped_models_save_without_prefixes(tmp_path):
    model = Toy(ToyConfig())
    wrapper = torch.nn.Module()
    wrapper.module = model
    checkpoint.save_weights(tmp_path / "w.safetensors", wrapper)
    from safetensors.torch import load_file

    assert all(not name.startswith("module.") for name in load_file(tmp_path / "w.safetensors"))


def test_load_is_strict_and_names_the_file(tmp_path):
    checkpoint.save_model(tmp_path / "run", Toy(ToyConfig(width=4)))
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    config["model"]["width"] = 6
    (tmp_path / "run" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="model.safetensors: weights do not match .*size mismatch for linear"):
        checkpoint.load_model(tmp_path / "run")


def test_wrong_kind_of_directory_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such run directory"):
        checkpoint.load_model(tmp_path / "missing")
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text('{"model_type": "clip"}')
    with pytest.raises(ValueError, match="not a clipdalle run config .*found model_type 'clip'"):
        checkpoint.load_model(tmp_path / "hf")
    checkpoint.save_model(tmp_path / "run", Toy(ToyConfig()))
    with pytest.raises(ValueError, match="is a toy run, expected a dvae run"):
        checkpoint.load_model(tmp_path / "run", expect="dvae")


def test_checkpoint_commit_and_recovery(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    model = Toy(ToyConfig())
    checkpoint.save_checkpoint(run, model, {"step": 3, "optimizer": {}})
    assert checkpoint.checkpoint_step(run) == 3
    assert checkpoint.load_train_state(run)["step"] == 3
    # A kill between the two renames of step 5: state renamed, weights still under the commit name.
    with torch.no_grad():
        model.linear.weight.add_(1.0)
    checkpoint.save_checkpoint(run, model, {"step": 5, "optimizer": {}})
    (run / "model.safetensors").rename(run / ".model.safetensors.commit")
    checkpoint.recover(run)
    assert checkpoint.checkpoint_step(run) == 5
    assert not list(run.glob(".*"))


def test_recover_drops_an_unfinished_commit(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    checkpoint.save_checkpoint(run, Toy(ToyConfig()), {"step": 2})
    (run / ".model.safetensors.commit").write_bytes(b"partial")
    (run / ".train_state.pt.commit").write_bytes(b"partial")
    checkpoint.recover(run)
    assert checkpoint.checkpoint_step(run) == 2 and checkpoint.load_train_state(run)["step"] == 2
    assert not list(run.glob(".*"))
