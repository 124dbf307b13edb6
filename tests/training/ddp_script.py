"""Run by tests/test_train_processes.py under torchrun: trains a toy model on a folder dataset with the real
data stream, records the keys each rank saw, and saves each rank's final weights."""

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from clipdalle.config import TrainConfig
from clipdalle.runtime import distributed_context
from clipdalle.training.loop import train
from clipdalle.training.recipes import data_streams


@dataclass
class ToyConfig:
    width: int = 6  # toy width


class Toy(torch.nn.Module):
    model_type = "toy"
    config_class = ToyConfig

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.linear = torch.nn.Linear(3, 3)

    def forward(self, images):
        return self.linear(images.mean((2, 3)))


def main(data: str, out: str) -> None:
    rank, world, _ = distributed_context()
    seen: list[str] = []

    def loss_fn(model, batch, progress):
        seen.extend(batch["keys"])
        loss = (model(batch["images"]) - 0.5).pow(2).mean()
        return loss, {"loss": loss.item()}

    config = TrainConfig(steps=4, batch_size=4, warmup_steps=1, save_every=2, eval_every=100, num_workers=1)
    train_batches, _ = data_streams(data, config, image_size=16, captions="required")
    torch.manual_seed(0)
    model = train(Toy(ToyConfig()), loss_fn, train_batches, Path(out) / "run", config)
    torch.save(model.state_dict(), Path(out) / f"weights_{rank}.pt")
    (Path(out) / f"keys_{rank}.json").write_text(json.dumps({"world": world, "keys": seen}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
