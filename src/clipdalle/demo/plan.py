"""The planner: model sizes, batches and step counts for a collection, a wall-clock budget and this machine.

`make_plan(report, budget_s=..., machine=...)` turns the data report (demo/inspection.py) into a pipeline plan: image
size and code grid, each model's width and depth (from the ladders below), batch sizes, step counts, learning rates,
regularisation, evaluation sizes, and the expected seconds of every stage. The rules, in order (their constants are
below, and benchmarks/RESULTS.md, "Scaling", has the measurements behind the time predictions):

1. Time: seconds per training step are predicted from the FLOPs of the step (counted on the real model) and the
   machine's matmul rate measured at start (demo/costs.py), with the scale and exponent measured on this machine for
   each model kind. A stage that runs alone uses all cores only when they are free (the probe on all cores beats one
   thread by 1.5x); the dVAE and CLIP always train side by side on one thread each.
2. Budget: the stages are planned to fill BUDGET_MARGIN of the budget. The fixed stages (dVAE evaluation, token cache,
   index, evaluation, report) are predicted first; of the rest, the dVAE and CLIP get PAIR_SHARE and DALL·E the
   remainder. Each training also gets a time limit of 1.1x its prediction, and DALL·E's steps are planned again from
   a fresh probe and the time left when its stage starts, so the budget holds when the machine's load changes.
3. Sizes: each model takes the largest rung of its ladder whose steps in its time reach MIN_STEPS (the step counts
   the demo presets needed); with too little time, the smallest rung with the steps it gets. The image size is the
   largest of SIZES not above the images' median shorter side at which the dVAE still gets MIN_STEPS at rung 2 or
   above (so 64 px pictures train at 32 px on short budgets); the code grid is 8 x 8 up to 64 px.
4. Data: batches are the demo's, at most an eighth of the training split; the text length covers 99 % of captions;
   the held-out split is the data report's; evaluation samples 8 images for each of up to 100 training and 100
   held-out captions.
5. Regularisation (unless plain): the best checkpoint, early stopping after PATIENCE evaluations of EVALUATIONS,
   random crops for the dVAE and CLIP, caption templates, DALL·E dropout and weight decay on 4 cached code views.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
from dataclasses import dataclass
from typing import Any

from ..config import TrainConfig, build_config, from_dict, to_dict
from ..models.clip import CLIPConfig
from ..models.dalle import DALLEConfig
from ..models.dvae import DVAEConfig
from . import costs
from .inspection import TOKENIZER_VOCAB

# The sizes the planner chooses from, smallest first. dVAE: (n_hidden, n_resblock) with 512 codes of 256 channels
# (the demo's dVAE is the second); CLIP: (width, blocks) of both towers (the demo's is the second); DALL·E:
# (n_embd, n_layer) with 32 channels per head (the demo's is the third, the `small` preset's the fourth).
VAE_LADDER = [(32, 1), (64, 1), (96, 2), (128, 2)]
CLIP_LADDER = [(64, 2), (64, 3), (128, 4), (192, 6), (256, 8)]
DALLE_LADDER = [(128, 2), (192, 3), (256, 4), (384, 6), (512, 8), (512, 12)]
CODE_VOCAB = 512  # dVAE codebook entries at every size: the demo's, and DALL·E's output layer stays small


def vae_config(image_size: int, grid_size: int, hidden: int, resblocks: int) -> DVAEConfig:
    """The demo dVAE's recipe (VQ, L1 reconstruction) at another size: `image_size` px to a `grid_size` grid."""
    return DVAEConfig(
        image_size=image_size,
        n_downsample=int(math.log2(image_size // grid_size)),
        vocab_size=CODE_VOCAB,
        n_embd=256,
        n_hidden=hidden,
        n_resblock=resblocks,
        quantizer="vq",
        recon_loss="l1",
        foreground_weight=0.0,
    )


def clip_config(image_size: int, width: int, layers: int, context_length: int, vocab_size: int) -> CLIPConfig:
    """The demo CLIP's recipe at another size: a ViT of 8 x 8 patches (patch side image_size / 8) and a text tower
    of the same width and depth, 16 channels per head, the embedding as wide as the towers."""
    return CLIPConfig(
        embed_dim=width,
        image_size=image_size,
        vision_patch_size=image_size // 8,
        vision_n_layer=layers,
        vision_n_embd=width,
        vision_n_head=max(1, width // 16),
        vision_layers=[],
        context_length=context_length,
        vocab_size=vocab_size,
        text_n_layer=layers,
        text_n_embd=width,
        text_n_head=max(1, width // 16),
        activation="gelu",
        text_pooling="first_eos",
        eos_id=1,
        loss="contrastive",
    )


def dalle_config(
    width: int, layers: int, *, text_length: int, text_vocab_size: int, grid_size: int, dropout: float = 0.0
) -> DALLEConfig:
    """The demo DALL·E's recipe (full attention, 1 : 7 text : image loss, caption dropout 0.1) at another size."""
    return DALLEConfig(
        text_length=text_length,
        text_vocab_size=text_vocab_size,
        image_vocab_size=CODE_VOCAB,
        grid_size=grid_size,
        n_layer=layers,
        n_head=max(1, width // 32),
        n_embd=width,
        dropout=dropout,
        attn=["full"],
        conv_kernel=5,
        text_loss_weight=1.0,
        image_loss_weight=7.0,
        caption_dropout=0.1,
    )


# ------------------------------------------------------------------------------------------ the rules

BUDGET_MARGIN = 0.92  # stages are planned to fill 92 % of the budget: the predictions' spread measured in RESULTS.md
PAIR_SHARE = 0.4  # the dVAE and CLIP (side by side) get 40 % of the training time and DALL·E 60 % (the demo's split)
PAIR_SHARE_WITHOUT_CLIP = 0.3  # with an existing CLIP the dVAE trains alone and DALL·E gets 70 %
MIN_STEPS = {"vae": 1500, "clip": 1000, "dalle": 1000}  # below these the demo's models were visibly unfinished
BATCH = {"vae": 64, "clip": 128, "dalle": 32}  # the demo presets' batches, capped at an eighth of the training split
EVALUATIONS = 10  # evaluations per training run: the early-stopping clock and the best checkpoint's resolution
PATIENCE = 3  # early stopping after 3 evaluations (30 % of the run) without a lower validation loss
JOB_START_S = 12.0  # a training process's start (Python, torch, listing the data), measured in the pipeline's logs
EVALUATION_FIXED_S = 2.0  # a training evaluation's picture and loss plot
STAGE_FIXED_S = {"dVAE evaluation": 5.0, "DALL·E data": 5.0, "index": 8.0, "evaluation": 15.0, "report": 5.0}
SIZES = (32, 64, 128)  # image sizes the planner considers: 8 x 8 codes up to 64 px, 16 x 16 at 128 px (GPU only)
TEXT_LENGTH_RANGE = (16, 64)  # caption tokens: the longest 1 % of captions are cut, in multiples of 8
TEMPLATES = "{}|a picture of {}|an image of {}"  # caption augmentation: how people also say it
TEMPLATE_TOKENS = 4  # tokens a template adds at most ("an image of")
EVAL_PROMPTS, EVAL_SAMPLES = 100, 8  # prompts per set (R-precision over 100) and samples per prompt (diversity)
DALLE_LR = {128: 3e-3, 192: 2.5e-3, 256: 2e-3, 384: 1e-3, 512: 7e-4}  # demo (256) and small (384) presets' values
CLIP_LR = {64: 1e-3, 128: 7e-4, 192: 5e-4, 256: 4e-4}  # the demo CLIP's 1e-3, lower as the towers widen
# Regularisation (item 2 of the issue): what a plain run (`regularise=False`) leaves out.
REGULARISED = {
    "vae": {"crop_scale": 0.8},
    "clip": {"crop_scale": 0.8, "weight_decay": 0.2, "caption_templates": TEMPLATES},
    "dalle": {"crop_scale": 0.8, "code_views": 4, "weight_decay": 0.1, "caption_templates": TEMPLATES},
}
DALLE_DROPOUT = 0.1  # on embeddings, attention and residual branches of the regularised DALL·E
PLAIN = {"vae": {}, "clip": {"weight_decay": 0.1}, "dalle": {"weight_decay": 0.01}}  # the demo presets' values
PLAIN_TEXT = "plain (no regularisation): the last weights, no early stopping, augmentation, templates or dropout"
PLAN_FILE = "plan.json"  # OUT/plan.json
PLAN_SECTIONS = (
    "description", "collection", "budget_s", "images", "text_length", "vae", "clip", "dalle", "eval", "threads",
    "weights", "regularise", "expected_s", "machine", "choices", "replanned",
)  # fmt: skip
STAGES = (
    "data report",
    "dVAE + CLIP training",
    "dVAE evaluation",
    "DALL·E data",
    "DALL·E training",
    "index",
    "evaluation",
    "report",
)


@dataclass
class Machine:
    """Where the pipeline runs and how fast, measured now (`measure_machine`)."""

    device: str  # "cpu" or "cuda"
    cores: int  # CPU cores
    probe_one: float  # GFLOP/s of the matmul probe on one thread (or the GPU)
    probe_all: float  # ... on all cores
    probe_pair: float = 0.0  # ... on each of two one-thread loops at once (dVAE and CLIP side by side); 0: probe_one

    @property
    def parallel(self) -> bool:
        """Whether a stage running alone should use all cores: only when they are free. On a busy machine two
        threads are slower than one (RESULTS.md, "Scaling": 2.4 s against 0.44 s per dVAE step at load 8.5)."""
        return self.cores > 1 and self.probe_all >= costs.PARALLEL_MIN_PROBE_GAIN * self.probe_one

    @property
    def threads_alone(self) -> int:
        return self.cores if self.parallel else 1

    @property
    def gain_alone(self) -> float:
        """Speed-up of a stage running alone on `threads_alone` threads over one thread."""
        if not self.parallel:
            return 1.0
        return min(self.probe_all / self.probe_one, costs.PARALLEL_GAIN * self.cores)


def measure_machine(device: str = "cpu", seconds: float = 0.5) -> Machine:
    """The machine now: cores and the matmul probe on one thread and on all of them (about a second)."""
    cores = os.cpu_count() or 1
    if device.startswith("cuda"):
        probe = costs.matmul_probe(1, seconds, device)
        return Machine("cuda", cores, probe, probe, probe)
    one, everything = costs.matmul_probe(1, seconds), costs.matmul_probe(cores, seconds)
    return Machine("cpu", cores, one, everything, costs.concurrent_probe(2, seconds))


def parse_budget(text: str) -> float:
    """Seconds of a wall-clock budget: "25m", "2h", "1h30m", "90s" or plain seconds."""
    cleaned = str(text).strip().lower().replace(" ", "")
    if re.fullmatch(r"\d+(\.\d+)?", cleaned):
        seconds = float(cleaned)
    else:
        parts = re.findall(r"(\d+(?:\.\d+)?)([hms])", cleaned)
        if not parts or "".join(number + unit for number, unit in parts) != cleaned:
            raise ValueError(f"--budget {text!r}: expected a duration such as 25m, 2h, 1h30m or 90s")
        seconds = sum(float(number) * {"h": 3600, "m": 60, "s": 1}[unit] for number, unit in parts)
    if seconds < 60:
        raise ValueError(f"--budget {text!r}: at least a minute is needed (the stages alone take tens of seconds)")
    return seconds


def format_seconds(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 90 else f"{seconds:.0f} s"


@functools.lru_cache(maxsize=256)
def _flops(kind: str, config_json: str) -> float:
    cls = {"vae": DVAEConfig, "clip": CLIPConfig, "dalle": DALLEConfig}[kind]
    return costs.flops_per_sample(kind, from_dict(cls, json.loads(config_json)))


def flops_of(kind: str, config: Any) -> float:
    """FLOPs of one training sample (cached per config: counting runs the model once)."""
    return _flops(kind, json.dumps(to_dict(config), sort_keys=True))


@dataclass
class Choice:
    """One model's size and schedule as planned, and why."""

    rung: int  # position in its ladder
    config: Any  # its model config
    batch: int
    steps: int
    step_s: float  # predicted seconds per step
    eval_s: float  # predicted seconds per evaluation
    seconds: float  # predicted seconds of the whole run (steps, evaluations, the process's start)

    def reason(self, kind: str, share: float) -> str:
        enough = "at least" if self.steps >= MIN_STEPS[kind] else "fewer than"
        return (
            f"{kind}: ladder rung {self.rung + 1}, {self.steps:,} steps of {self.batch} ({enough} {MIN_STEPS[kind]:,}) "
            f"at {self.step_s:.3f} s per step fill its {format_seconds(share)}"
        )


def step_seconds(kind: str, config: Any, batch: int, machine: Machine, alone: bool, source_pixels: float) -> float:
    """Predicted seconds of one training step (costs.RECORDED at one thread): alone, at the one-thread probe's rate and
    sped up when free cores let it use them all; side by side with another training, at the rate each of two
    concurrent probes got. Image models also decode the batch."""
    flops = batch * flops_of(kind, config)
    pixels = batch * source_pixels if kind in ("vae", "clip") else 0.0
    if alone:
        return costs.training_step_seconds(kind, flops, machine.probe_one, pixels) / machine.gain_alone
    return costs.training_step_seconds(kind, flops, machine.probe_pair or machine.probe_one, pixels)


def encode_seconds(kind: str, config: Any, images: int, machine: Machine, source_pixels: float) -> float:
    """Predicted seconds of the forward pass over `images` images (a third of a training step's FLOPs), decoding
    included: the dVAE's encoding for the token cache, CLIP's for the index."""
    if images <= 0:
        return 0.0
    flops = images * flops_of(kind, config) / 3
    seconds = costs.RECORDED["encode"].seconds(flops, machine.probe_one) / machine.gain_alone
    return seconds + costs.decode_seconds(images, source_pixels)


@functools.lru_cache(maxsize=64)
def _sample_flops(config_json: str) -> float:
    return costs.sample_flops(from_dict(DALLEConfig, json.loads(config_json)))


def sample_seconds(config: DALLEConfig, samples: int, machine: Machine) -> float:
    """Predicted seconds to generate `samples` DALL·E samples (in batches, KV cache), the dVAE decoding included."""
    flops = samples * _sample_flops(json.dumps(to_dict(config), sort_keys=True))
    return costs.RECORDED["dalle_sample"].seconds(flops, machine.probe_one) / machine.gain_alone


def choose_size(
    kind: str, configs: list[Any], batch: int, seconds: float, machine: Machine, alone: bool, estimate: Estimate
) -> Choice:
    """The largest rung whose steps in `seconds` (after its evaluations and start) reach MIN_STEPS[kind]; the smallest
    rung, with the steps it gets, when none does."""
    choices = []
    for rung, config in enumerate(configs):
        step = step_seconds(kind, config, batch, machine, alone, estimate.pixels)
        evaluation = estimate.training_evaluation(kind, config)
        steps = max(1, int((seconds - JOB_START_S - EVALUATIONS * evaluation) / step))
        total = JOB_START_S + EVALUATIONS * evaluation + steps * step
        choices.append(Choice(rung, config, batch, steps, step, evaluation, total))
        if steps < MIN_STEPS[kind]:
            break  # the rungs above are larger still
    fitting = [choice for choice in choices if choice.steps >= MIN_STEPS[kind]]
    return fitting[-1] if fitting else choices[0]


@dataclass
class Estimate:
    """Predicted seconds of the stages that do not train, and of a training run's evaluations, for one collection."""

    machine: Machine
    pixels: float  # source pixels of a typical image (the median shorter side, squared)
    train_images: int
    val_images: int
    views: int  # code views per training image in the token cache
    samples: int  # images the evaluation generates

    def encode(self, kind: str, config: Any, images: int) -> float:
        return encode_seconds(kind, config, images, self.machine, self.pixels)

    def training_evaluation(self, kind: str, config: Any) -> float:
        """One evaluation during training: the validation batches' forward passes (and DALL·E's 32 samples)."""
        images = min(self.val_images, 512)
        if kind == "dalle":
            return EVALUATION_FIXED_S + sample_seconds(config, 32, self.machine)
        return EVALUATION_FIXED_S + (3 if kind == "vae" else 2) * self.encode(kind, config, images)

    def fixed_stages(self, dalle: DALLEConfig, vae: DVAEConfig, clip: CLIPConfig | None) -> dict[str, float]:
        everything = self.train_images + self.val_images
        return {
            "dVAE evaluation": STAGE_FIXED_S["dVAE evaluation"] + self.encode("vae", vae, self.val_images),
            "DALL·E data": STAGE_FIXED_S["DALL·E data"]
            + self.encode("vae", vae, self.train_images * self.views + self.val_images),
            "index": STAGE_FIXED_S["index"] + (self.encode("clip", clip, everything) if clip else 30.0),
            "evaluation": STAGE_FIXED_S["evaluation"]
            + sample_seconds(dalle, self.samples, self.machine)
            + 3 * self.encode("vae", vae, everything),
            "report": STAGE_FIXED_S["report"],
        }


def text_length_for(report: dict[str, Any], regularise: bool) -> int:
    """Caption tokens: the 99th percentile caption (with <bos> and <eos>), plus a template's words, rounded up to a
    multiple of 8, within TEXT_LENGTH_RANGE."""
    low, high = TEXT_LENGTH_RANGE
    wanted = report["captions"]["tokens"]["p99"] + (TEMPLATE_TOKENS if regularise else 0)
    return int(min(high, max(low, 8 * math.ceil(wanted / 8))))


def train_settings(kind: str, choice: Choice, regularise: bool, val_images: int, seed: int) -> dict[str, Any]:
    """The TrainConfig fields of one model's run."""
    every = max(10, choice.steps // EVALUATIONS)
    if kind == "dalle":
        lr = DALLE_LR.get(choice.config.n_embd, 1e-3)
    elif kind == "clip":
        lr = CLIP_LR.get(choice.config.vision_n_embd, 4e-4)
    else:
        lr = 2e-3  # the demo dVAE's
    settings = {
        "steps": choice.steps,
        "batch_size": choice.batch,
        "lr": lr,
        "warmup_steps": max(1, min(100, choice.steps // 20)),
        "eval_every": every,
        "eval_batches": max(1, math.ceil(min(val_images, 512) / choice.batch)),
        "save_every": every,
        "log_every": max(1, min(25, every // 4)),
        "seed": seed,
        "num_workers": 0,
        "device": "auto",
        "keep_best": regularise,
        "early_stop": PATIENCE if regularise else 0,
        "max_seconds": round(choice.seconds * 1.1, 1),  # a guard: the budget holds even when the prediction is off
        **(REGULARISED if regularise else PLAIN)[kind],
    }
    return settings


def make_plan(
    report: dict[str, Any],
    *,
    budget_s: float,
    machine: Machine,
    clip: str | None = None,
    regularise: bool = True,
    spent_s: float = 0.0,
    seed: int = 0,
) -> dict[str, Any]:
    """The plan of a pipeline run on the collection `report` describes (demo/inspection.py), to finish within
    `budget_s` seconds of which `spent_s` are spent (reading the data), on `machine`: a pipeline preset with the
    chosen configs, the expected seconds of each stage, and the reasons (`choices`)."""
    split = report["split"]
    train_images, val_images = split["train"], split["val"]
    median_side = report["sizes"]["short_side"]["median"]
    sizes = [size for size in SIZES if size <= max(32, median_side) and (size < 128 or machine.device == "cuda")]
    text_length = text_length_for(report, regularise)
    vocab = TOKENIZER_VOCAB
    batch = {kind: max(4, min(wanted, train_images // 8)) for kind, wanted in BATCH.items()}
    usable = budget_s * BUDGET_MARGIN - spent_s
    prompts = min(EVAL_PROMPTS, val_images)
    pair_share = PAIR_SHARE_WITHOUT_CLIP if clip else PAIR_SHARE
    views = REGULARISED["dalle"]["code_views"] if regularise else 1
    choices: list[str] = [
        f"budget {format_seconds(budget_s)}: {format_seconds(spent_s)} spent reading the data; stages planned to fill "
        f"{BUDGET_MARGIN:.0%} of it ({format_seconds(usable)} left)",
        f"machine: {machine.cores} core(s), probe {machine.probe_one:.0f} GFLOP/s on one thread, "
        f"{machine.probe_all:.0f} on all, {machine.probe_pair:.0f} on each of two at once: a stage alone runs on "
        f"{machine.threads_alone} thread(s)"
        + ("" if machine.parallel else " (the cores are busy: more threads would be slower)"),
        f"text length {text_length} tokens: 99 % of captions have {report['captions']['tokens']['p99']} or fewer"
        + (f", plus {TEMPLATE_TOKENS} for a caption template" if regularise else ""),
    ]

    estimate = Estimate(machine, float(median_side) ** 2, train_images, val_images, views, 2 * prompts * EVAL_SAMPLES)
    plan = None
    for size in sorted(sizes, reverse=True):
        grid = 16 if size >= 128 else 8
        ladders = {
            "vae": [vae_config(size, grid, *rung) for rung in VAE_LADDER],
            "clip": [clip_config(size, *rung, context_length=text_length, vocab_size=vocab) for rung in CLIP_LADDER],
            "dalle": [
                dalle_config(*rung, text_length=text_length, text_vocab_size=vocab, grid_size=grid,
                             dropout=DALLE_DROPOUT if regularise else 0.0)
                for rung in DALLE_LADDER
            ],
        }  # fmt: skip
        # The training time depends on the chosen models through the fixed stages (evaluation samples the DALL·E,
        # the index runs CLIP): plan with the demo-sized rungs first, then once more with the chosen ones.
        fixed = estimate.fixed_stages(ladders["dalle"][2], ladders["vae"][1], None if clip else ladders["clip"][1])
        for _ in range(2):
            training = max(60.0, usable - sum(fixed.values()))
            pair_s, dalle_s = pair_share * training, (1 - pair_share) * training
            vae = choose_size("vae", ladders["vae"], batch["vae"], pair_s, machine, bool(clip), estimate)
            clip_choice = None
            if not clip:
                clip_choice = choose_size("clip", ladders["clip"], batch["clip"], pair_s, machine, False, estimate)
            dalle = choose_size("dalle", ladders["dalle"], batch["dalle"], dalle_s, machine, True, estimate)
            fixed = estimate.fixed_stages(dalle.config, vae.config, clip_choice.config if clip_choice else None)
        if (vae.steps >= MIN_STEPS["vae"] and vae.rung >= 1) or size == min(sizes):
            plan = (size, grid, vae, clip_choice, dalle, fixed, pair_s, dalle_s)
            why = (
                "not above the images'"
                if size == max(sizes)
                else f"the largest at which the dVAE gets {MIN_STEPS['vae']:,} steps at rung 2 or above; the images'"
            )
            choices.append(
                f"image size {size} px ({grid} x {grid} codes): {why} median shorter side is {median_side:g} px"
            )
            break
    size, grid, vae, clip_choice, dalle, fixed, pair_s, dalle_s = plan
    choices.append(vae.reason("vae", pair_s))
    if clip_choice:
        choices.append(clip_choice.reason("clip", pair_s))
    else:
        choices.append(f"clip: the existing CLIP {clip} reranks and indexes; the dVAE trains alone")
    choices.append(dalle.reason("dalle", dalle_s))
    choices.append(
        "regularised: best checkpoint, early stopping after "
        f"{PATIENCE} evaluations, random crops (80 % of the area at least) for the dVAE and CLIP, caption templates, "
        f"DALL·E dropout {DALLE_DROPOUT} and weight decay 0.1 on {views} cached code views per image"
        if regularise
        else PLAIN_TEXT
    )
    sections = {
        "vae": {"model": to_dict(vae.config), "train": train_settings("vae", vae, regularise, val_images, seed)},
        "dalle": {
            "model": to_dict(dalle.config),
            "train": train_settings("dalle", dalle, regularise, val_images, seed),
        },
    }
    if clip_choice:
        sections["clip"] = {
            "model": to_dict(clip_choice.config),
            "train": train_settings("clip", clip_choice, regularise, val_images, seed),
        }
    else:
        sections["clip"] = {"existing": str(clip)}
    if split.get("val_fraction") is not None and report["kind"] == "shards":
        for section in sections.values():
            if "train" in section:
                section["train"]["val_fraction"] = split["val_fraction"]
    pair_seconds = max(vae.seconds, clip_choice.seconds if clip_choice else 0.0)
    expected = {
        "data report": spent_s,
        "dVAE + CLIP training": pair_seconds,
        "dVAE evaluation": fixed["dVAE evaluation"],
        "DALL·E data": fixed["DALL·E data"],
        "DALL·E training": dalle.seconds,
        "index": fixed["index"],
        "evaluation": fixed["evaluation"],
        "report": fixed["report"],
    }
    expected = {name: round(seconds, 1) for name, seconds in expected.items()}
    return {
        "description": (
            f"planned for {report['data']}: {train_images:,} training and {val_images:,} held-out images at {size} px, "
            f"{format_seconds(budget_s)} on {machine.cores} core(s)" + ("" if regularise else ", plain")
        ),
        "collection": report["data"],
        "budget_s": budget_s,
        "images": {"size": size, "grid": grid},
        "text_length": text_length,
        **sections,
        "eval": {"prompts": prompts, "samples": EVAL_SAMPLES, "seed": seed, "sampling": {}},
        "threads": {"pair": 1, "alone": machine.threads_alone},
        "weights": "best" if regularise else "last",
        "regularise": regularise,
        "expected_s": expected,
        "machine": {
            "device": machine.device,
            "cores": machine.cores,
            "probe_one": round(machine.probe_one, 1),
            "probe_all": round(machine.probe_all, 1),
            "probe_pair": round(machine.probe_pair, 1),
        },
        "choices": choices,
    }


def plan_configs(spec: dict[str, Any], name: str = "plan") -> dict[str, tuple[Any, TrainConfig]]:
    """The (model config, train config) of each model a plan trains (no "clip" when it names an existing CLIP),
    checked to fit together."""
    unknown = sorted(set(spec) - set(PLAN_SECTIONS))
    if unknown:
        raise ValueError(f"{name}: unknown section(s) {', '.join(unknown)}; expected {', '.join(PLAN_SECTIONS)}")
    configs = {}
    for kind, cls in (("vae", DVAEConfig), ("clip", CLIPConfig), ("dalle", DALLEConfig)):
        section = spec.get(kind)
        if not isinstance(section, dict):
            raise ValueError(f"{name}: no {kind} section")
        if kind == "clip" and "existing" in section:
            continue
        model = build_config(cls, section.get("model", {}), source=f"{name}: {kind} model")
        train = build_config(TrainConfig, section.get("train", {}), source=f"{name}: {kind} train")
        configs[kind] = (model, train)
    vae, dalle = configs["vae"][0], configs["dalle"][0]
    if (dalle.image_vocab_size, dalle.grid_size) != (vae.vocab_size, vae.grid_size):
        raise ValueError(
            f"{name}: dalle image_vocab_size {dalle.image_vocab_size} and grid_size {dalle.grid_size} must be the "
            f"dVAE's vocab_size {vae.vocab_size} and grid {vae.grid_size}"
        )
    if "clip" in configs and configs["clip"][0].image_size != vae.image_size:
        clip_size = configs["clip"][0].image_size
        raise ValueError(f"{name}: clip image_size {clip_size} differs from the dVAE's {vae.image_size}")
    return configs


def without_regularisation(spec: dict[str, Any]) -> dict[str, Any]:
    """The same plan (sizes, steps, budget) without regularisation or best weights: a baseline for it (`--plain` with
    `--preset PLAN`)."""
    plain = json.loads(json.dumps(spec))
    defaults = to_dict(TrainConfig())
    for kind in ("vae", "clip", "dalle"):
        train = plain[kind].get("train")
        if train is None:
            continue
        for name in REGULARISED[kind]:
            train[name] = defaults[name]
        train.update(PLAIN[kind], keep_best=False, early_stop=0)
    plain["dalle"]["model"]["dropout"] = 0.0
    plain.update(weights="last", regularise=False, description=spec.get("description", "") + ", plain")
    plain["choices"] = [*spec.get("choices", []), "then made plain: " + PLAIN_TEXT]
    return plain


def format_plan(plan: dict[str, Any]) -> str:
    """The plan as the lines `clipdalle pipeline` prints: the choices, each model, the expected time per stage."""
    configs = plan_configs(plan)
    lines = ["plan: " + plan.get("description", "as written")]
    lines += [f"  - {choice}" for choice in plan.get("choices", [])]
    for kind, label in (("vae", "dVAE"), ("clip", "CLIP"), ("dalle", "DALL·E")):
        if kind not in configs:
            lines.append(f"  {label}: existing {plan[kind]['existing']}")
            continue
        model, train = configs[kind]
        if kind == "vae":
            shape = f"{model.image_size} px -> {model.grid_size} x {model.grid_size} codes of {model.vocab_size}, "
            shape += f"hidden {model.n_hidden} x {model.n_resblock} res block(s)"
        elif kind == "clip":
            shape = f"ViT {model.vision_n_embd} x {model.vision_n_layer} + text {model.text_n_embd} x "
            shape += f"{model.text_n_layer}, {model.context_length} tokens"
        else:
            shape = f"{model.n_embd} x {model.n_layer}, {model.text_length} caption tokens, dropout {model.dropout}"
        count = sum(p.numel() for p in costs.build_model(kind, model).parameters())
        limit = format_seconds(train.max_seconds) if train.max_seconds else "none"
        lines.append(
            f"  {label}: {shape} ({count / 1e6:.2f} M params); {train.steps:,} steps of {train.batch_size}, lr "
            f"{train.lr:g}, evaluated every {train.eval_every}, early stop {train.early_stop or 'off'}, time limit "
            f"{limit}"
        )
    expected = plan.get("expected_s", {})
    if expected:
        budget = f" of {format_seconds(plan['budget_s'])}" if plan.get("budget_s") else ""
        lines.append(
            f"  expected: {', '.join(f'{name} {format_seconds(seconds)}' for name, seconds in expected.items())}; "
            f"total {format_seconds(sum(expected.values()))}{budget}"
        )
    return "\n".join(lines)
