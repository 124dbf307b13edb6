"""Helpers the tests share: synthetic coloured shapes with captions, and running the CLI in-process."""

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

from clipdalle import checkpoint, cli
from clipdalle.config import build_config, from_dict, load_preset, replace
from clipdalle.data import icons
from clipdalle.models.clip import CLIP, CLIPConfig
from clipdalle.models.dalle import DALLE, PAD_ID, DALLEConfig
from clipdalle.models.dvae import DiscreteVAE, DVAEConfig
from clipdalle.tokenizers import CaptionTokenizer
from clipdalle.training import objectives

COLOURS = {"red": (229, 57, 53), "green": (67, 160, 71), "blue": (30, 136, 229), "black": (33, 33, 33)}
SHAPES = ("circle", "square", "triangle", "cross")


def draw_shape(shape: str, colour: str, size: int = 32, jitter: int = 0) -> Image.Image:
    image = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(image)
    margin = size // 5 + jitter
    box = (margin, margin, size - 1 - margin, size - 1 - margin)
    rgb = COLOURS[colour]
    if shape == "circle":
        draw.ellipse(box, fill=rgb)
    elif shape == "square":
        draw.rectangle(box, fill=rgb)
    elif shape == "triangle":
        draw.polygon(
            [(size // 2, margin), (margin, size - 1 - margin), (size - 1 - margin, size - 1 - margin)], fill=rgb
        )
    else:
        width = max(2, size // 8)
        draw.rectangle((size // 2 - width, margin, size // 2 + width, size - 1 - margin), fill=rgb)
        draw.rectangle((margin, size // 2 - width, size - 1 - margin, size // 2 + width), fill=rgb)
    return image


def make_shapes_folder(root: Path, size: int = 32, repeats: int = 1, seed: int = 0) -> Path:
    """A folder dataset: PNG + same-stem .txt captions, every (shape, colour) pair `repeats` times."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for repeat in range(repeats):
        for shape in SHAPES:
            for colour in COLOURS:
                stem = f"{shape}_{colour}_{repeat}"
                draw_shape(shape, colour, size, jitter=int(rng.integers(0, 3))).save(root / f"{stem}.png")
                (root / f"{stem}.txt").write_text(f"a {colour} {shape}\n{colour} {shape}\n")
    return root


def run(capsys, *args):
    """`clipdalle ARGS` in this process: (exit code, stdout, stderr)."""
    code = cli.main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code, err, *fragments):
    """A failed command: exit code 1 and exactly one line on stderr (no traceback) containing `fragments`."""
    assert code == 1
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith(("warning", "\r"))]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


# ------------------------------------------------------------------------------------------ tiny CLIPs


BOS, EOS = CaptionTokenizer.bos_id, CaptionTokenizer.eos_id
FLAT_COLOURS = {"red": (1.0, 0.1, 0.1), "green": (0.1, 0.9, 0.1), "blue": (0.1, 0.1, 1.0), "yellow": (1.0, 0.9, 0.1)}


def tiny_clip_config(**overrides) -> CLIPConfig:
    return build_config(CLIPConfig, load_preset("clip-tiny")["model"], overrides)


def tiny_clip(seed: int = 0, **overrides) -> CLIP:
    """The clip-tiny preset (a few thousand parameters, 32 px, 16 tokens) with seeded random weights."""
    torch.manual_seed(seed)
    return CLIP(tiny_clip_config(**overrides))


class WordTokenizer:
    """Stand-in for clipdalle.tokenizers.CaptionTokenizer in tests: an id per word, <bos>, <eos>, padding 0."""

    def __init__(self, words):
        self.ids = {word: index + 3 for index, word in enumerate(words)}

    def __call__(self, texts, length):
        rows = []
        for text in texts:
            ids = [BOS, *(self.ids[word] for word in text.split()), EOS]
            rows.append(ids + [0] * (length - len(ids)))
        return torch.tensor(rows)


WORDS = ["a", "photo", "of", "an", "icon", "in", "shape", *FLAT_COLOURS]


def colour_images(noise_seed: int = 0, per_colour: int = 1) -> torch.Tensor:
    """Flat colour squares with a little noise, (len(FLAT_COLOURS) * per_colour, 3, 32, 32) in [0, 1]."""
    generator = torch.Generator().manual_seed(noise_seed)
    colours = torch.tensor(list(FLAT_COLOURS.values())).repeat_interleave(per_colour, dim=0)  # (N, 3)
    images = colours.view(-1, 3, 1, 1).expand(-1, 3, 32, 32)  # (N, 3, 32, 32)
    return (images + 0.05 * torch.randn(images.shape, generator=generator)).clamp(0, 1)


def random_text(batch: int, length: int, seed: int = 0, vocab: int = 64) -> torch.Tensor:
    """Token ids with <bos>, words in [3, vocab), <eos> at varying positions, zero padding after it."""
    generator = torch.Generator().manual_seed(seed)
    text = torch.zeros(batch, length, dtype=torch.long)
    for row in range(batch):
        words = int(torch.randint(1, length - 2, (1,), generator=generator))
        text[row, 0] = BOS
        text[row, 1 : 1 + words] = torch.randint(3, vocab, (words,), generator=generator)
        text[row, 1 + words] = EOS
    return text


STEPS = {"contrastive": 40, "siglip": 80}  # SigLIP first spends steps moving its bias from -10


def train_colour_clip(loss_name: str) -> tuple[CLIP, list[float]]:
    """A tiny CLIP trained to match flat colour squares with "a COLOUR icon": (model in eval mode, losses)."""
    from clipdalle.training.objectives import clip_loss as loss_fn

    model = tiny_clip(seed=1, loss=loss_name)
    tokenizer = WordTokenizer(WORDS)
    text = tokenizer([f"a {colour} icon" for colour in FLAT_COLOURS], 16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    losses = []
    for step in range(STEPS[loss_name]):
        batch = {"images": colour_images(noise_seed=step), "text": text}
        loss, _ = loss_fn(model, batch, step / STEPS[loss_name])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        model.after_step()
        losses.append(loss.item())
    return model.eval(), losses


# ------------------------------------------------------------------------------------------ tiny DALL·E


def tiny_dalle_config(**changes) -> DALLEConfig:
    values = dict(
        text_length=5,
        text_vocab_size=40,
        image_vocab_size=12,
        grid_size=4,
        n_layer=4,
        n_head=2,
        n_embd=16,
        attn=["full", "row", "col", "conv"],
        conv_kernel=3,
    )
    values.update(changes)
    return DALLEConfig(**values)


def tiny_dalle(**changes) -> DALLE:
    """A 4-layer DALL·E of width 16 over 5 caption tokens and a 4 x 4 grid of 12 codes, every attention pattern."""
    torch.manual_seed(0)
    return DALLE(tiny_dalle_config(**changes)).eval()


def random_dalle_batch(config: DALLEConfig, batch_size: int = 3, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    text = torch.randint(3, config.text_vocab_size, (batch_size, config.text_length), generator=generator)
    text[:, -2:] = PAD_ID  # captions end in padding
    codes = torch.randint(0, config.image_vocab_size, (batch_size, config.image_length), generator=generator)
    return text, codes


# ------------------------------------------------------------------------------------------ the demo's runs


VAL_ICONS = ["cup", "dog", "cube", "pencil"]  # validation icons (held-out families)
SEEN_ICONS = ["account", "home", "heart", "circle", "square", "alpha-a", "arrow-up", "battery", "bell", "star"]
BOLD_ICONS = ["account", "home", "heart", "circle", "square", "battery", "bell", "star"]  # judged exactly at 32 px


def make_demo_out(root: Path, size: int = 16) -> tuple[Path, Path]:
    """OUT with random tiny vae/clip/dalle runs (the DALL·E one with its dVAE and tokenizer) and an icon dataset
    of SEEN_ICONS + VAL_ICONS at `size` px; call with icons.icon_names patched to those names."""
    data = root / "data"
    icons.build_icons(data, size=size, colours=8, names=SEEN_ICONS + VAL_ICONS, progress=False)
    out = root / "out"
    captions = [
        caption
        for name in SEEN_ICONS + VAL_ICONS
        for colour in icons.PALETTE
        for caption in icons.captions_for(name, colour)
    ]
    tokenizer = CaptionTokenizer.train(captions + [f"a {colour} icon" for colour in icons.PALETTE], 300)
    torch.manual_seed(0)
    vae = DiscreteVAE(replace(from_dict(DVAEConfig, load_preset("vae-tiny")["model"]), image_size=size))
    for run in (out / "vae", out / "dalle" / "vae"):
        checkpoint.save_model(run, vae)
    checkpoint.write_json(out / "vae" / "eval.json", {"colour_accuracy": 0.995, "psnr": 20.0, "images": 32})
    dalle_config = replace(from_dict(DALLEConfig, load_preset("dalle-tiny")["model"]), text_length=32)
    checkpoint.save_model(out / "dalle", DALLE(dalle_config))
    tokenizer.save(out / "dalle" / checkpoint.TOKENIZER_FILE)
    clip_config = from_dict(CLIPConfig, load_preset("clip-tiny")["model"])
    clip_config = replace(clip_config, image_size=size, vision_patch_size=4, context_length=32)
    checkpoint.save_model(out / "clip", CLIP(clip_config))
    tokenizer.save(out / "clip" / checkpoint.TOKENIZER_FILE)
    return out, data


# ------------------------------------------------------------------------------------------ one step of each model


TRAINING_CASES = ("vae-vq", "vae-gumbel", "clip", "dalle")


def tiny_training_case(name: str, batch_size: int = 4, seed: int = 0) -> tuple[torch.nn.Module, Any, dict]:
    """(model in train mode, its objective from clipdalle.training.objectives, a random batch) for one of
    TRAINING_CASES: the tiny presets' dVAE with either quantizer, CLIP and DALL·E."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    if name.startswith("vae-"):
        model = DiscreteVAE(build_config(DVAEConfig, load_preset("vae-tiny")["model"], {"quantizer": name[4:]}))
        size = model.config.image_size
        images = torch.rand(batch_size, 3, size, size, generator=generator)
        return model.train(), objectives.vae_loss, {"keys": list(range(batch_size)), "images": images}
    if name == "clip":
        model = tiny_clip(seed)
        size, length = model.config.image_size, model.config.context_length
        images = torch.rand(batch_size, 3, size, size, generator=generator)
        batch = {"keys": list(range(batch_size)), "images": images, "text": random_text(batch_size, length, seed)}
        return model.train(), objectives.clip_loss, batch
    if name == "dalle":
        model = DALLE(build_config(DALLEConfig, load_preset("dalle-tiny")["model"]))
        text, codes = random_dalle_batch(model.config, batch_size, seed + 1)
        return model.train(), objectives.dalle_loss, {"keys": list(range(batch_size)), "text": text, "codes": codes}
    raise ValueError(f"tiny_training_case: {name!r} is not one of {', '.join(TRAINING_CASES)}")


# ------------------------------------------------------------------------------------------ a second writer


@contextlib.contextmanager
def lock_held_by_another_process(directory: Path):
    """Another process holds `clipdalle.io.DirectoryLock(directory)` inside the block; yields its pid."""
    script = (
        "import sys; from clipdalle.io import DirectoryLock; lock = DirectoryLock(sys.argv[1]).acquire(); "
        "print('locked', flush=True); sys.stdin.read()"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    command = [sys.executable, "-c", script, str(directory)]
    holder = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert holder.stdout.readline().strip() == "locked"
        yield holder.pid
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)


# ------------------------------------------------------------------------------------------ servers and jobs


@contextlib.contextmanager
def serving(app):
    """Runs `app` with uvicorn on a thread, on a loopback socket bound here (so no other process takes the port);
    yields its base URL."""
    import uvicorn

    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start serving the app")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        listener.close()


class BlockingJobs:
    """Jobs that wait for `release`, counting how many run at once (`peak`) and recording the order they end."""

    def __init__(self):
        self.release = threading.Event()
        self.lock = threading.Lock()
        self.running = self.peak = 0
        self.finished = []

    def job(self, result=None, timeout: float = 10):
        def run():
            with self.lock:
                self.running += 1
                self.peak = max(self.peak, self.running)
            self.release.wait(timeout)
            with self.lock:
                self.running -= 1
                self.finished.append(result)
            return result

        return run


# ------------------------------------------------------------------------------------------ tiny captioner


def fit_captioner(model, codes: torch.Tensor, text: torch.Tensor, steps: int, lr: float = 1e-2) -> float:
    """Trains a captioner on one fixed batch (codes (B, N), text (B, T)) with AdamW; returns the last loss."""
    from clipdalle.models.captioner import loss

    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    for _ in range(steps):
        value = loss(model, codes, text)
        optimizer.zero_grad()
        value.backward()
        optimizer.step()
    model.eval()
    return value.item()
