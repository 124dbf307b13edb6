"""CLIP speed: clipdalle's CLIP against open_clip 3.3.0's, side by side in one process.

Identical configurations, random weights (speed does not depend on them; ours are copied into open_clip's
model with strict=True and both must give the same features before anything is timed):

- tiny, at 32 px and at 64 px: ViT patch 8, width 256, 4 layers, 4 heads of 64 (open_clip's head_width);
  text context 32, vocabulary 49,408, width 256, 4 layers, 4 heads; embedding 256; GELU (open_clip's default).
- ViT-B/32 (224 px, OpenAI's shapes and QuickGELU: our preset clip-vit-b-32, open_clip's ViT-B-32-quickgelu).

Captions are fixed token tensors shared by both: <|startoftext|>, 6 to 12 random word ids, <|endoftext|> (the
largest id, found by argmax pooling in both), zero-padded to the context length: 8 to 14 real tokens, as short
captions are. fp32, 2 threads.

Figures: training pairs/s at batch 128 (forward, symmetric contrastive loss, backward, AdamW step, logit-scale
clamp; ours through `clipdalle.training.objectives.clip_loss`, theirs through `open_clip.ClipLoss`), encode_image and
encode_text per second at batch 256 (ViT-B/32: batch 32), under torch.no_grad. Each is also given as a fraction
of the fp32 matmul rate (1024 x 1024) measured in every round of the same run: FLOPs are 2 x the multiply-adds
of the forward's matmuls (patch embedding, projections, attention scores and mixing, MLP, logits), training is
3 x forward, and each side is charged for the work it actually does: ours stops a text batch at its longest
caption (open_clip runs the whole context) and runs the last block of each tower at the one position it reads
(class token, end-of-text token), so the percentages compare kernel efficiency and the ratio the whole gain.

Ours and theirs alternate (A B A B ...) after a warmup and the table shows the median of the per-round ratios,
because this machine's speed drifts by tens of percent within minutes. Needs the reference venv (see
/work/shared/bench/README.md); not a test, not run in CI:

    bash ../shared/bench/reference-env.sh .venv-ref && .venv-ref/bin/pip install --no-deps -e .
    .venv-ref/bin/python benchmarks/bench_clip.py [--rounds 7] [--only train32,encode32,...] [--progress]
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from machine import matmul_gflops

from clipdalle.models.clip import CLIP, CLIPConfig
from clipdalle.training.objectives import clip_loss as loss_fn

VOCAB = 49408  # OpenAI's BPE; its last two ids are <|startoftext|> and <|endoftext|> (the largest id)
CAPTION_WORDS = (6, 12)  # word tokens per caption, inclusive: 8-14 tokens with the start and end markers
TRAIN_BATCH, ENCODE_BATCH, LARGE_ENCODE_BATCH = 128, 256, 32


@dataclass
class Shapes:
    """One configuration, spelled in our config's vocabulary; `open_clip_model` builds the same in theirs."""

    image_size: int
    patch_size: int
    vision_width: int
    vision_layers: int
    context_length: int
    text_width: int
    text_layers: int
    embed_dim: int
    quick_gelu: bool
    head_width: int = 64  # open_clip's default head_width, in both towers
    vocab_size: int = VOCAB

    @property
    def vision_heads(self) -> int:
        return self.vision_width // self.head_width

    @property
    def text_heads(self) -> int:
        return self.text_width // self.head_width

    def our_config(self) -> CLIPConfig:
        return CLIPConfig(
            embed_dim=self.embed_dim,
            image_size=self.image_size,
            vision_patch_size=self.patch_size,
            vision_n_layer=self.vision_layers,
            vision_n_embd=self.vision_width,
            vision_n_head=self.vision_heads,
            context_length=self.context_length,
            vocab_size=self.vocab_size,
            text_n_layer=self.text_layers,
            text_n_embd=self.text_width,
            text_n_head=self.text_heads,
            activation="quick_gelu" if self.quick_gelu else "gelu",
            text_pooling="argmax",
        )


TINY_32 = Shapes(32, 8, 256, 4, 32, 256, 4, 256, quick_gelu=False)
TINY_64 = Shapes(64, 8, 256, 4, 32, 256, 4, 256, quick_gelu=False)
VIT_B_32 = Shapes(224, 32, 768, 12, 77, 512, 12, 512, quick_gelu=True)


# ------------------------------------------------------------------------------------------ FLOP counts


def transformer_macs(tokens: int, width: int, layers: int) -> int:
    """Multiply-adds of one sequence through pre-LN blocks: qkv + out projections (4 C^2 per token), MLP with
    4x hidden (8 C^2 per token), attention scores and mixing (2 T^2 C, full square even when causal)."""
    return layers * (12 * tokens * width**2 + 2 * tokens**2 * width)


def pooled_transformer_macs(tokens: int, width: int, layers: int) -> int:
    """Multiply-adds when only one position's output is read (ours: `Transformer.forward_at`): the last block
    projects keys and values everywhere (2 C^2 per token) but the query, mixing, output projection and MLP of
    one position (10 C^2 + 2 T C)."""
    if layers == 0:
        return 0
    last = 2 * tokens * width**2 + 10 * width**2 + 2 * tokens * width
    return transformer_macs(tokens, width, layers - 1) + last


def image_macs(shapes: Shapes, pooled: bool) -> int:
    """Multiply-adds of one image through the ViT: patch embedding, blocks, output projection."""
    patches = (shapes.image_size // shapes.patch_size) ** 2
    patch_embedding = patches * 3 * shapes.patch_size**2 * shapes.vision_width
    blocks = (pooled_transformer_macs if pooled else transformer_macs)(
        patches + 1, shapes.vision_width, shapes.vision_layers
    )
    return patch_embedding + blocks + shapes.vision_width * shapes.embed_dim


def text_macs(shapes: Shapes, tokens: int, pooled: bool) -> int:
    """Multiply-adds of one caption run over `tokens` positions, then one pooled token through the projection."""
    blocks = (pooled_transformer_macs if pooled else transformer_macs)(tokens, shapes.text_width, shapes.text_layers)
    return blocks + shapes.text_width * shapes.embed_dim


def training_flops_per_pair(shapes: Shapes, text_tokens: int, batch_size: int, pooled: bool) -> int:
    """3 x forward (backward costs two forwards), forward = both towers + two (B, B) logit matrices per pair."""
    logits = 2 * batch_size * shapes.embed_dim
    return 3 * 2 * (image_macs(shapes, pooled) + text_macs(shapes, text_tokens, pooled) + logits)


# ------------------------------------------------------------------------------------------ machine speed


# ------------------------------------------------------------------------------------------ models and data


def open_clip_model(shapes: Shapes) -> torch.nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import open_clip.model
    vision = open_clip.model.CLIPVisionCfg(
        layers=shapes.vision_layers,
        width=shapes.vision_width,
        head_width=shapes.head_width,
        patch_size=shapes.patch_size,
        image_size=shapes.image_size,
    )
    text = open_clip.model.CLIPTextCfg(
        context_length=shapes.context_length,
        vocab_size=shapes.vocab_size,
        width=shapes.text_width,
        heads=shapes.text_heads,
        layers=shapes.text_layers,
    )
    return open_clip.model.CLIP(shapes.embed_dim, vision, text, quick_gelu=shapes.quick_gelu)


def captions(
    batch_size: int, context_length: int, generator: torch.Generator, vocab_size: int = VOCAB, end_id: int | None = None
) -> torch.Tensor:
    """(B, context) token ids: start, 6-12 word ids, end, zero padding. Start and end are the last two ids of the
    vocabulary (OpenAI's BPE: <|startoftext|>, <|endoftext|>) unless `end_id` names another end (first_eos
    pooling); word ids lie between 2 and the start id."""
    start_id, end_id = vocab_size - 2, vocab_size - 1 if end_id is None else end_id
    text = torch.zeros(batch_size, context_length, dtype=torch.long)
    words = torch.randint(CAPTION_WORDS[0], CAPTION_WORDS[1] + 1, (batch_size,), generator=generator)
    for row, count in enumerate(words.tolist()):
        text[row, 0] = start_id
        text[row, 1 : 1 + count] = torch.randint(2, start_id, (count,), generator=generator)
        text[row, 1 + count] = end_id
    return text


def processed_tokens(text: torch.Tensor) -> int:
    """Positions our encode_text runs: up to the batch's last end-of-text token."""
    return int(text.argmax(dim=1).max()) + 1


def paired_models(shapes: Shapes) -> tuple[CLIP, torch.nn.Module]:
    """Ours with random weights and open_clip's holding the same weights (same names: loads strictly)."""
    ours = CLIP(shapes.our_config())
    theirs = open_clip_model(shapes)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    return ours, theirs


def check_same_features(ours: CLIP, theirs: torch.nn.Module, images: torch.Tensor, text: torch.Tensor) -> None:
    """Both models must compute the same thing before their speeds are compared."""
    with torch.no_grad():
        pixels = (images - ours.image_mean) / ours.image_std  # open_clip expects normalised pixels
        image_gap = (ours.encode_image(images) - theirs.encode_image(pixels, normalize=True)).abs().max().item()
        text_gap = (ours.encode_text(text) - theirs.encode_text(text, normalize=True)).abs().max().item()
    if max(image_gap, text_gap) > 1e-4:
        raise RuntimeError(f"models differ: image features by {image_gap:.2e}, text features by {text_gap:.2e}")


# ------------------------------------------------------------------------------------------ workloads


@dataclass
class Workload:
    """One figure: a closure per contestant doing one unit of work on `items` samples, and FLOPs per sample."""

    name: str
    unit: str
    items: int
    ours: Callable[[], None]
    theirs: Callable[[], None]
    our_flops: int  # per sample
    their_flops: int  # per sample
    repeats: int  # calls per timed turn


def training_workload(
    name: str,
    shapes: Shapes,
    generator: torch.Generator,
    batch_size: int = TRAIN_BATCH,
    device: str = "cpu",
    dtype: torch.dtype | None = None,
) -> Workload:
    """One training step of each side on a fixed batch, on `device`, under autocast to `dtype` when given (AdamW
    fused into one kernel on a GPU, for both)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from open_clip import ClipLoss
    ours, theirs = paired_models(shapes)
    ours, theirs = ours.to(device), theirs.to(device)
    images = torch.rand(batch_size, 3, shapes.image_size, shapes.image_size, generator=generator).to(device)
    text = captions(batch_size, shapes.context_length, generator, shapes.vocab_size).to(device)
    check_same_features(ours, theirs, images[:8], text[:8])
    pixels = (images - ours.image_mean) / ours.image_std
    batch = {"images": images, "text": text}
    fused = {"fused": True} if device != "cpu" else {}
    our_optimizer = torch.optim.AdamW(ours.parameters(), lr=1e-4, **fused)
    their_optimizer = torch.optim.AdamW(theirs.parameters(), lr=1e-4, **fused)
    their_loss = ClipLoss()
    ours.train()
    theirs.train()
    precision = (lambda: nullcontext()) if dtype is None else (lambda: torch.autocast(device, dtype=dtype))

    def our_step() -> None:
        with precision():
            loss, _ = loss_fn(ours, batch, 0.5)
        loss.backward()
        our_optimizer.step()
        our_optimizer.zero_grad(set_to_none=True)
        ours.after_step()

    def their_step() -> None:
        with precision():
            image_features, text_features, logit_scale = theirs(pixels, text)
            loss = their_loss(image_features, text_features, logit_scale)
        loss.backward()
        their_optimizer.step()
        their_optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            theirs.logit_scale.clamp_(0, math.log(100))

    return Workload(
        name,
        "pairs/s",
        batch_size,
        our_step,
        their_step,
        training_flops_per_pair(shapes, processed_tokens(text), batch_size, pooled=True),
        training_flops_per_pair(shapes, shapes.context_length, batch_size, pooled=False),
        repeats=1,
    )


def encoding_workloads(
    prefix: str, shapes: Shapes, batch_size: int, generator: torch.Generator, image: bool, text: bool
) -> list[Workload]:
    ours, theirs = paired_models(shapes)
    ours.eval()
    theirs.eval()
    images = torch.rand(batch_size, 3, shapes.image_size, shapes.image_size, generator=generator)
    tokens = captions(batch_size, shapes.context_length, generator)
    check_same_features(ours, theirs, images[:8], tokens[:8])
    pixels = (images - ours.image_mean) / ours.image_std
    workloads = []

    def our_images() -> None:
        with torch.no_grad():
            ours.encode_image(images)

    def their_images() -> None:
        with torch.no_grad():
            theirs.encode_image(pixels, normalize=True)

    def our_text() -> None:
        with torch.no_grad():
            ours.encode_text(tokens)

    def their_text() -> None:
        with torch.no_grad():
            theirs.encode_text(tokens, normalize=True)

    repeats = 2 if batch_size * shapes.image_size**2 <= 256 * 32**2 else 1
    if image:
        our_flops, their_flops = 2 * image_macs(shapes, pooled=True), 2 * image_macs(shapes, pooled=False)
        workloads.append(
            Workload(
                f"{prefix} encode_image",
                "images/s",
                batch_size,
                our_images,
                their_images,
                our_flops,
                their_flops,
                repeats,
            )
        )
    if text:
        our_flops = 2 * text_macs(shapes, processed_tokens(tokens), pooled=True)
        their_flops = 2 * text_macs(shapes, shapes.context_length, pooled=False)
        workloads.append(
            Workload(f"{prefix} encode_text", "texts/s", batch_size, our_text, their_text, our_flops, their_flops, 1)
        )
    return workloads


def build_workloads(only: set[str] | None) -> list[Workload]:
    generator = torch.Generator().manual_seed(0)
    builders = {
        "train32": lambda: [training_workload("tiny 32 px train", TINY_32, generator)],
        "train64": lambda: [training_workload("tiny 64 px train", TINY_64, generator)],
        "encode32": lambda: encoding_workloads("tiny 32 px", TINY_32, ENCODE_BATCH, generator, True, True),
        "encode64": lambda: encoding_workloads("tiny 64 px", TINY_64, ENCODE_BATCH, generator, True, False),
        "vitb32": lambda: encoding_workloads("ViT-B/32", VIT_B_32, LARGE_ENCODE_BATCH, generator, True, True),
    }
    if only is not None and not only <= set(builders):
        raise ValueError(f"--only {sorted(only)}: expected names among {', '.join(builders)}")
    workloads = []
    for key, build in builders.items():
        if only is None or key in only:
            workloads.extend(build())
    return workloads


# ------------------------------------------------------------------------------------------ timing


def timed_rate(call: Callable[[], None], items: int, repeats: int) -> float:
    start = time.perf_counter()
    for _ in range(repeats):
        call()
    return items * repeats / (time.perf_counter() - start)


def run(
    workloads: list[Workload], rounds: int, progress: bool = False
) -> tuple[dict[str, dict[str, list[float]]], list[float]]:
    """Warmup, then `rounds` rounds of: matmul rate, then for each workload ours then theirs."""
    for workload in workloads:
        for _ in range(2):
            workload.ours()
            workload.theirs()
    rates = {workload.name: {"ours": [], "theirs": []} for workload in workloads}
    matmul = []
    for index in range(rounds):
        matmul.append(matmul_gflops())
        for workload in workloads:
            rates[workload.name]["ours"].append(timed_rate(workload.ours, workload.items, workload.repeats))
            rates[workload.name]["theirs"].append(timed_rate(workload.theirs, workload.items, workload.repeats))
        print(f"round {index + 1}/{rounds} done (matmul {matmul[-1]:.0f} GFLOP/s)", flush=True)
        if progress:  # the table so far, so that an interrupted run still reports
            print(report(workloads, rates, matmul), flush=True)
    return rates, matmul


def report(workloads: list[Workload], rates: dict, matmul: list[float]) -> str:
    gflops = statistics.median(matmul)
    lines = [
        f"fp32 matmul 1024^2: median {gflops:.0f} GFLOP/s (rounds {min(matmul):.0f}-{max(matmul):.0f})",
        "",
        "| figure | ours | open_clip | ours / open_clip, median (range) | ours % of matmul | open_clip % of matmul |",
        "|---|---|---|---|---|---|",
    ]
    for workload in workloads:
        ours, theirs = rates[workload.name]["ours"], rates[workload.name]["theirs"]
        ratios = [a / b for a, b in zip(ours, theirs)]
        our_rate, their_rate = statistics.median(ours), statistics.median(theirs)
        our_share = 100 * our_rate * workload.our_flops / (gflops * 1e9)
        their_share = 100 * their_rate * workload.their_flops / (gflops * 1e9)
        lines.append(
            f"| {workload.name} ({workload.unit}) | {our_rate:,.1f} | {their_rate:,.1f} | "
            f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f}) | "
            f"{our_share:.0f} % | {their_share:.0f} % |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds after the warmup")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--only", default=None, help="comma-separated: train32,train64,encode32,encode64,vitb32")
    parser.add_argument("--progress", action="store_true", help="print the table after every round")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    only = None if args.only is None else set(args.only.split(","))
    workloads = build_workloads(only)
    rates, matmul = run(workloads, args.rounds, args.progress)
    print(report(workloads, rates, matmul))


if __name__ == "__main__":
    main()
