"""The `clipdalle` command: a table of subcommands, each a thin call into the package's functions.

Errors a user can cause (a missing file, a bad flag, a wrong kind of run) print one line on stderr and exit 1.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from . import __version__
from .config import (
    TrainConfig,
    add_config_flags,
    build_config,
    flags_for,
    load_preset,
)


class UsageError(ValueError):
    """A command-line mistake: printed as one line."""


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse would print usage and exit 2
        raise UsageError(f"{self.prog}: {message}")


def valid_options(parser: argparse.ArgumentParser) -> str:
    return ", ".join(sorted(option for action in parser._actions for option in action.option_strings))


# ------------------------------------------------------------------------------------------ commands


def cmd_data_icons(args: argparse.Namespace) -> None:
    from .data.icons import build_icons

    counts = build_icons(args.out, size=args.size, colours=args.colours, captions=args.captions)["counts"]
    print(
        f"wrote {counts['train_images'] + counts['val_images']} images of {counts['icons']} icons to {args.out} "
        f"({counts['val_icons']} icons held out for validation)"
    )


def cmd_tokenizer_train(args: argparse.Namespace) -> None:
    from .data.sources import open_source
    from .tokenizers import CaptionTokenizer

    source = open_source(args.data, captions="required")
    texts = (caption for record in source for caption in record.captions)
    tokenizer = CaptionTokenizer.train(texts, args.vocab_size)
    tokenizer.save(args.out)
    print(f"wrote {args.out} ({tokenizer.vocab_size} tokens)")


def training_configs(
    args: argparse.Namespace, model_config_class: type, model_type: str, preset_prefix: str
) -> tuple[Any, TrainConfig, bool]:
    """defaults < preset < (with --resume) the run's own config < flags given on the command line."""
    from . import checkpoint

    preset: dict[str, Any] = {}
    if args.preset:
        is_file = args.preset.endswith(".json")
        preset = load_preset(args.preset if is_file else f"{preset_prefix}-{args.preset}")
    run_model: dict[str, Any] = {}
    run_train: dict[str, Any] = {}
    resume = False
    out = Path(args.out)
    if args.resume:
        has_config, has_state = (out / checkpoint.CONFIG_FILE).exists(), (out / checkpoint.TRAIN_STATE_FILE).exists()
        if has_state and not has_config:
            raise ValueError(
                f"{out}: has {checkpoint.TRAIN_STATE_FILE} but no {checkpoint.CONFIG_FILE}, so the run's model cannot "
                "be rebuilt; restore config.json or start a new run in another --out"
            )
        if has_config:
            saved = checkpoint.read_config(out)
            if saved["clipdalle"]["model_type"] != model_type:
                raise ValueError(f"{out}: is a {saved['clipdalle']['model_type']} run, not a {model_type} run")
        if has_state:
            run_model, run_train, resume = saved.get("model", {}), saved.get("train", {}), True
        else:
            print(f"{out}: no checkpoint yet, starting a new run", file=sys.stderr)
    elif (out / checkpoint.CONFIG_FILE).exists():
        raise ValueError(f"{out}: a run already exists there; pass --resume to continue it or choose another --out")
    model_flags = flags_for(model_config_class, args)
    if resume and model_flags:
        changed = {name for name, value in model_flags.items() if run_model.get(name) != value}
        if changed:
            raise ValueError(f"{out}: cannot change model fields of a run being resumed ({', '.join(sorted(changed))})")
    model_config = build_config(
        model_config_class, preset.get("model", {}), run_model, model_flags, source=f"{model_type} config"
    )
    train_config = build_config(
        TrainConfig, preset.get("train", {}), run_train, flags_for(TrainConfig, args), source="train config"
    )
    return model_config, train_config, resume


def run_training(
    args: argparse.Namespace, model_config_class: type, model_type: str, train: Callable, **options: Any
) -> None:
    """Resolves the configs (see `training_configs`) and calls a training recipe with the common arguments."""
    preset_prefix = "vae" if model_type == "dvae" else model_type
    model_config, train_config, resume = training_configs(args, model_config_class, model_type, preset_prefix)
    train(args.data, args.out, model_config, train_config, val_data=args.val_data, resume=resume, **options)
    print(f"saved {args.out}")


def cmd_train_vae(args: argparse.Namespace) -> None:
    from .models.dvae import DVAEConfig
    from .training import train_vae

    run_training(args, DVAEConfig, "dvae", train_vae, extra_data=args.extra_data or [])


def cmd_train_clip(args: argparse.Namespace) -> None:
    from .models.clip import CLIPConfig
    from .training import train_clip

    if args.init and flags_for(CLIPConfig, args):
        given = ", ".join(f"--{name.replace('_', '-')}" for name in flags_for(CLIPConfig, args))
        raise ValueError(f"--init takes the model's shape from its weights; drop {given}")
    options = dict(tokenizer_path=args.tokenizer, init=args.init, lock_image=args.lock_image)
    options["extra_data"] = args.extra_data or []
    run_training(args, CLIPConfig, "clip", train_clip, **options)


def cmd_train_dalle(args: argparse.Namespace) -> None:
    from .models.dalle import DALLEConfig
    from .training import train_dalle

    run_training(
        args, DALLEConfig, "dalle", train_dalle, vae_run=args.vae, tokenizer_path=args.tokenizer, tokens=args.tokens
    )


def cmd_train_captioner(args: argparse.Namespace) -> None:
    from .models.captioner import CaptionerConfig
    from .training import train_captioner

    run_training(
        args, CaptionerConfig, "captioner", train_captioner, vae_run=args.vae, tokenizer_path=args.tokenizer,
        tokens=args.tokens,
    )  # fmt: skip


def cmd_tokens_cache(args: argparse.Namespace) -> None:
    from . import checkpoint
    from .runtime import resolve_device
    from .training.codes import build_code_cache

    device = resolve_device(args.device)
    vae = checkpoint.load_model(args.vae, expect="dvae", device=device)
    info = build_code_cache(vae, args.vae, args.data, args.out, val_data=args.val_data, device=device)
    print(f"wrote codes of {sum(info['counts'].values())} images to {args.out} ({info['skipped_images']} skipped)")


def load_dalle_bundle(args: argparse.Namespace) -> tuple[Any, Any, Any, Any]:
    """(DALL·E, its dVAE, its tokenizer, a CLIP bundle or None) from --dalle RUN [--clip RUN]."""
    from . import checkpoint, pretrained
    from .runtime import resolve_device

    device = resolve_device(args.device)
    which = "last" if args.last else "best"
    model, vae, tokenizer = checkpoint.load_dalle(args.dalle, device=device, which=which)
    clip_bundle = pretrained.load(args.clip, device=device, which=which) if args.clip else None
    return model, vae, tokenizer, clip_bundle


def sampling_options(args: argparse.Namespace) -> dict[str, Any]:
    return dict(
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        cond_scale=args.cond_scale,
        shortlist=args.shortlist,
        seed=args.seed,
        batch_size=args.batch_size,
    )


def write_generation(generation: Any, out: str | Path, n_col: int, notices: dict[str, str] | None = None) -> None:
    """OUT/NNN.png per image, OUT/grid.png, OUT/results.json (best first per prompt; `notice` where the prompt
    names words the model never saw)."""
    import json

    from .checkpoint import write_json
    from .transforms import save_image

    out = Path(out)
    results = []
    for index, image in enumerate(generation.images):
        name = f"{index:03d}.png"
        save_image(image, out / name)
        score = None if generation.clip_scores is None else round(float(generation.clip_scores[index]), 6)
        results.append(
            {
                "prompt": generation.prompts[index],
                "file": name,
                "seed": generation.seeds[index],
                "clip_score": score,
                "log_likelihood": round(float(generation.log_likelihood[index]), 4),
                "notice": (notices or {}).get(generation.prompts[index]),
            }
        )
    save_image(generation.images, out / "grid.png", n_col=n_col)
    write_json(out / "results.json", results)
    print(json.dumps({"images": len(results), "out": str(out)}))


def read_prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompts)
    if args.prompts_file:
        path = Path(args.prompts_file)
        if not path.exists():
            raise FileNotFoundError(f"{path}: no such prompts file")
        prompts += [line.rstrip("\n") for line in path.read_text(encoding="utf-8").splitlines()]
    if not prompts:
        raise ValueError('generate: give a prompt ("" samples unconditionally) or --prompts-file FILE')
    return prompts


def prompt_notices(dalle_run: str | Path, prompts: list[str]) -> dict[str, str]:
    """{prompt: notice} for the prompts that name words the DALL·E run never saw in training; each is printed."""
    from .prompts import TrainingPrompts

    known = TrainingPrompts.load(dalle_run)
    notices = {} if known is None else {prompt: known.notice(prompt) for prompt in prompts if prompt.strip()}
    notices = {prompt: notice for prompt, notice in notices.items() if notice}
    for prompt, notice in notices.items():
        print(f"warning: prompt {prompt!r}: {notice}", file=sys.stderr)
    return notices


def cmd_generate(args: argparse.Namespace) -> None:
    from .sampling import generate

    model, vae, tokenizer, clip_bundle = load_dalle_bundle(args)
    prompts = read_prompts(args)
    notices = prompt_notices(args.dalle, prompts)
    generation = generate(
        model, vae, tokenizer, prompts, n=args.n, keep=args.keep, clip=clip_bundle, **sampling_options(args)
    )
    write_generation(generation, args.out, n_col=args.keep or args.n, notices=notices)


def cmd_inpaint(args: argparse.Namespace) -> None:
    from .sampling import inpaint, mask_from_image, parse_box
    from .transforms import load_image

    if (args.box is None) == (args.mask is None):
        raise ValueError("inpaint: give exactly one of --box x0,y0,x1,y1 or --mask FILE")
    model, vae, tokenizer, clip_bundle = load_dalle_bundle(args)
    size = vae.config.image_size
    image = load_image(args.image, size)
    region = parse_box(args.box, "--box") if args.box else mask_from_image(args.mask, size)
    generation = inpaint(
        model, vae, tokenizer, image, region, args.prompt, n=args.n, keep=args.keep, clip=clip_bundle,
        **sampling_options(args),
    )  # fmt: skip
    write_generation(generation, args.out, n_col=args.keep or args.n, notices=prompt_notices(args.dalle, [args.prompt]))


def cmd_variations(args: argparse.Namespace) -> None:
    from .sampling import variations
    from .transforms import load_image

    model, vae, tokenizer, clip_bundle = load_dalle_bundle(args)
    image = load_image(args.image, vae.config.image_size)
    generation = variations(
        model, vae, tokenizer, image, args.prompt, n=args.n, keep_rows=args.keep_rows, keep=args.keep,
        clip=clip_bundle, **sampling_options(args),
    )  # fmt: skip
    write_generation(generation, args.out, n_col=args.keep or args.n, notices=prompt_notices(args.dalle, [args.prompt]))


def image_paths(items: Sequence[str]) -> list[Path]:
    """Files as given, folders expanded to the images inside them (sorted)."""
    from .data.sources import IMAGE_EXTENSIONS

    paths: list[Path] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
            if not found:
                raise ValueError(f"{path}: no images found (looked for {' '.join(IMAGE_EXTENSIONS)})")
            paths.extend(found)
        elif path.exists():
            paths.append(path)
        else:
            raise FileNotFoundError(f"{path}: no such image or folder")
    return paths


def read_labels(args: argparse.Namespace) -> list[str]:
    """--labels 'a,b,c' and --labels-file (one per line), in the grammar the API uses (zero_shot.parse_labels)."""
    from .zero_shot import parse_labels

    labels = parse_labels(args.labels, "--labels") if args.labels and args.labels.strip() else []
    if args.labels_file:
        path = Path(args.labels_file)
        if not path.exists():
            raise FileNotFoundError(f"{path}: no such labels file")
        labels += parse_labels(path.read_text(encoding="utf-8"), str(path))
    labels = list(dict.fromkeys(labels))
    if len(labels) < 2:
        raise ValueError("classify needs at least two labels: --labels 'cat,dog' or --labels-file FILE (one per line)")
    return labels


def cmd_classify(args: argparse.Namespace) -> None:
    import json

    from . import zero_shot
    from .backends import load_encoder
    from .runtime import resolve_device

    device = resolve_device(args.device)
    model, preprocess, tokenizer = load_encoder(args.clip, backend=args.backend, device=device)
    labels = read_labels(args)
    templates = [t for t in (args.templates or "").split("|") if t] or None
    paths, images = read_images(image_paths(args.images), preprocess, "classify")
    probabilities = zero_shot.classify(model, images.to(device), labels, tokenizer, templates).cpu()
    top = min(args.top, len(labels))
    results = []
    for path, row in zip(paths, probabilities):
        values, indices = row.topk(top)
        best = [{"label": labels[i], "prob": round(float(v), 6)} for v, i in zip(values, indices)]
        results.append({"image": str(path), "top": best})
    if args.json:
        print(json.dumps(results, indent=2, ensure_ascii=False))
        return
    kind = "sigmoid per label" if model.config.loss == "siglip" else "softmax over labels"
    print(f"# probabilities: {kind}")
    for result in results:
        ranked = ", ".join(f"{item['label']} {item['prob']:.3f}" for item in result["top"])
        print(f"{result['image']}: {ranked}")


def read_images(paths: list[Path], preprocess: Callable, command: str) -> tuple[list[Path], Any]:
    """(the readable paths, their model inputs (N, 3, S, S)); unreadable images are reported and skipped."""
    import torch

    from .transforms import BadImage

    kept, images = [], []
    for path in paths:
        try:
            images.append(preprocess(path))
            kept.append(path)
        except BadImage as error:
            print(f"skipped: {error}", file=sys.stderr)
    if not images:
        raise ValueError(f"{command}: none of the given images could be read")
    return kept, torch.stack(images)


def caption_tables(args: argparse.Namespace, tokenizer: Any) -> Any:
    """The label tables of `caption`: --labels FILE, or --index INDEX cut by --template, or the CLIP's vocabulary."""
    from . import caption

    if args.labels and args.index:
        raise ValueError("caption: give --labels FILE or --index INDEX as the source of terms, not both")
    if args.template and not args.index:
        raise ValueError("caption: --template cuts an index's captions into tables; a labels file has template: lines")
    if args.labels:
        return caption.read_label_tables(args.labels)
    if args.index:
        from .index.store import stored_captions

        return caption.tables_from_captions(stored_captions(args.index), args.template)
    return caption.vocabulary_table(tokenizer)


def cmd_caption(args: argparse.Namespace) -> None:
    from . import caption, pretrained
    from .runtime import resolve_device

    device = resolve_device(args.device)
    clip = pretrained.load(args.clip, device=device)
    model, preprocess, tokenizer = clip
    paths, images = read_images(image_paths(args.images), preprocess, "caption")
    if args.captioner:
        if args.labels or args.index:
            raise ValueError("caption: --captioner writes captions itself; drop --labels / --index")
        captioner = caption.load_captioner(args.captioner, device=device)
        results = []
        for start in range(0, len(images), args.batch_size):
            results += caption.captioner_captions(
                clip, captioner, images[start : start + args.batch_size], n=args.n, temperature=args.temperature,
                seed=args.seed,
            )  # fmt: skip
    else:
        results = caption.rank_terms(model, tokenizer, images, caption_tables(args, tokenizer))
    for path, result in zip(paths, results):
        result["image"] = str(path)
    if args.write_txt:
        files = caption.write_caption_files(paths, [result["caption"] for result in results], args.overwrite)
        if files["kept"]:
            print(f"kept {len(files['kept'])} existing .txt file(s) (--overwrite replaces them)", file=sys.stderr)
        print(f"wrote {len(files['written'])} caption file(s)", file=sys.stderr)
    if args.json:
        print_json(results)
        return
    for result in results:
        print(f"{result['image']}: {result['caption']}  ({result['score']:.3f})")


def cmd_explain(args: argparse.Namespace) -> None:
    import torch

    from . import pretrained
    from .checkpoint import write_json
    from .explain import explain_image, heat, overlay
    from .runtime import resolve_device
    from .transforms import save_image

    device = resolve_device(args.device)
    model, preprocess, tokenizer = pretrained.load(args.clip, device=device)
    _, images = read_images([Path(args.image)], preprocess, "explain")
    result = explain_image(model, tokenizer, images[0], args.text, method=args.method)
    out = Path(args.out)
    picture = overlay(images[0], heat(torch.tensor(result["relevance"])), size=max(args.size, images.shape[-1]))
    save_image(picture, out / "overlay.png")
    write_json(out / "explanation.json", {"image": str(args.image), **result})
    print(f"score {result['score']:.3f}, peak at {result['peak']}; wrote {out / 'overlay.png'}")


def cmd_probe(args: argparse.Namespace) -> None:
    import json

    from .evaluate import linear_probe
    from .runtime import resolve_device

    results = linear_probe(args.clip, args.data, val_data=args.val_data, device=str(resolve_device(args.device)))
    print(json.dumps(results, indent=2))


def cmd_convert(args: argparse.Namespace) -> None:
    from .convert import convert

    path = convert(args.source, args.out, to=args.to, quick_gelu=args.quick_gelu)
    print(f"wrote {path}")


def cmd_models_list(args: argparse.Namespace) -> None:
    from .hub import format_size, list_models

    rows = [row for row in list_models() if row["cached"] or not args.cached]
    if args.json:
        print_json(rows)
        return
    width = max((len(row["name"]) for row in rows), default=4)
    print(f"{'NAME':<{width}}  {'SOURCE':<12}  {'CACHED':<6}  SIZE")
    for row in rows:
        size = format_size(row["size_bytes"]) if row["cached"] else "-"
        print(f"{row['name']:<{width}}  {row['source']:<12}  {'yes' if row['cached'] else 'no':<6}  {size}")


def cmd_models_download(args: argparse.Namespace) -> None:
    from .hub import format_size, offline, resolve

    if offline():
        raise ValueError("models download: offline mode is on (HF_HUB_OFFLINE or CLIPDALLE_OFFLINE); unset it first")
    for name in args.names:
        files = resolve(name, fetch="refresh")
        size = sum(path.stat().st_size for path in files.files)
        print(f"{name}: {files.path} ({format_size(size)})")


def cmd_export_onnx(args: argparse.Namespace) -> None:
    from .backends import export_onnx

    out = export_onnx(args.clip, args.out, quick_gelu=args.quick_gelu)
    print(f"wrote {out} (image.onnx, text.onnx, the tokenizer, clipdalle_onnx.json)")


def cmd_guide(args: argparse.Namespace) -> None:
    import torch

    from . import checkpoint, pretrained
    from .guide import guide
    from .transforms import load_image, make_grid, save_image

    if args.init_image and args.init_dalle:
        raise ValueError("guide: give at most one of --init-image and --init-dalle")
    if not args.vae and not args.init_dalle:
        raise ValueError("guide: give --vae RUN (or --init-dalle RUN, whose dVAE is then used)")
    clip_model, _, tokenizer = pretrained.load(args.clip)
    init_codes = None
    if args.init_dalle:
        from .sampling import generate

        dalle_model, vae, dalle_tokenizer = checkpoint.load_dalle(args.init_dalle)
        init_codes = generate(dalle_model, vae, dalle_tokenizer, [args.prompt], n=1, seed=args.seed).codes[0]
    if args.vae:
        vae = checkpoint.load_model(args.vae, expect="dvae")
    if args.init_image:
        init_codes = vae.encode(load_image(args.init_image, vae.config.image_size)[None])[0]
    result = guide(
        vae, clip_model, tokenizer, args.prompt, steps=args.steps, lr=args.lr, seed=args.seed, init_codes=init_codes
    )
    out = Path(args.out)
    save_image(result.image, out / "final.png")
    save_image(make_grid(torch.stack(result.snapshots), n_col=len(result.snapshots)), out / "progress.png")
    scores = ", ".join(f"{step}: {score:.3f}" for step, score in zip(result.snapshot_steps, result.scores))
    print(f"CLIP score by step: {scores}")
    print(f"wrote {out / 'final.png'} and {out / 'progress.png'}")


def print_json(values: Any) -> None:
    import json

    print(json.dumps(values, indent=2, ensure_ascii=False))


def cmd_index_build(args: argparse.Namespace) -> None:
    from .index import build_index
    from .runtime import resolve_device

    device = str(resolve_device(args.device))
    info = build_index(
        args.clip, args.data, args.out, batch_size=args.batch_size, num_workers=args.num_workers, device=device,
        backend=args.backend,
    )  # fmt: skip
    if info:
        print_json(info)


def cmd_index_add(args: argparse.Namespace) -> None:
    from .index import add_to_index
    from .runtime import resolve_device

    device = str(resolve_device(args.device))
    print_json(add_to_index(args.index, args.data, batch_size=args.batch_size, device=device, backend=args.backend))


def cmd_index_remove(args: argparse.Namespace) -> None:
    from .index import remove_from_index

    try:
        ids = [int(item) for item in args.ids.split(",") if item.strip()]
    except ValueError:
        raise ValueError(f"--ids {args.ids!r}: expected comma-separated integer ids, e.g. 3,17,42") from None
    print(f"removed {remove_from_index(args.index, ids)} image(s)")


def cmd_index_info(args: argparse.Namespace) -> None:
    from .index import index_info

    print_json(index_info(args.index))


def cmd_index_export(args: argparse.Namespace) -> None:
    from .index import export_index

    print_json(export_index(args.index, args.out))


def cmd_index_duplicates(args: argparse.Namespace) -> None:
    from .index import Index
    from .index.duplicates import DEFAULT_THRESHOLD, find_duplicates
    from .index.pixel_match import PIXEL_THRESHOLD
    from .runtime import resolve_device

    threshold = DEFAULT_THRESHOLD if args.threshold is None else args.threshold
    pixel_threshold = PIXEL_THRESHOLD if args.pixel_threshold is None else args.pixel_threshold
    with Index.open(args.index, device=str(resolve_device(args.device))) as index:
        report = find_duplicates(
            index, threshold, method=args.method, pixel_threshold=pixel_threshold, progress=not args.json
        )
    if args.json:
        print_json(report)
        return
    rule = f"cosine > {threshold}"
    if args.method == "pixels":
        rule = f"{report['candidates']} candidate pair(s) checked on the pixels, difference <= {pixel_threshold}" + (
            f"; {report['unreadable']} image(s) unreadable, left out" if report["unreadable"] else ""
        )
    grouped = f"{report['grouped']} of {report['images']} images"
    print(f"{report['groups_total']} group(s) of near-duplicates, {grouped} ({rule})")
    for group in report["groups"]:
        farthest = group["max_pixel_distance"]
        pixels = "" if farthest is None else f", pixel difference <= {farthest:.3f}"
        print(f"{len(group['ids'])} images, cosine {group['min_score']:.3f} to {group['max_score']:.3f}{pixels}:")
        for image in group["images"]:
            print(f"  #{image['id']}  {image['path']}")


def cmd_index_sync(args: argparse.Namespace) -> None:
    from .index.sync import sync_folder
    from .runtime import resolve_device

    device = str(resolve_device(args.device))
    print_json(
        sync_folder(args.index, args.data, batch_size=args.batch_size, num_workers=args.num_workers, device=device)
    )


def query_terms(args: argparse.Namespace) -> list[Any]:
    """The search's terms: the query in the grammar of `index.query.parse_query` (image files allowed), then
    --image, --minus and --minus-image, with --weights (one per term, in that order) multiplying their weights."""
    from .index.query import Term, apply_weights, parse_query

    terms = parse_query(args.query, allow_paths=True) if args.query is not None else []
    terms += [Term("path", path) for path in args.image or []]
    terms += [Term("text", text.strip(), -1.0) for text in args.minus or []]
    terms += [Term("path", path, -1.0) for path in args.minus_image or []]
    if not terms:
        raise ValueError('search: give a text query ("a cat wearing sunglasses"), --image FILE, or both')
    if args.weights is not None:
        try:
            weights = [float(part) for part in args.weights.split(",")]
        except ValueError:
            raise ValueError(f"--weights {args.weights!r}: expected comma-separated numbers, e.g. 2,1,1") from None
        terms = apply_weights(terms, weights)
    return terms


def cmd_search(args: argparse.Namespace) -> None:
    from .index import Index
    from .index.query import search_terms
    from .runtime import resolve_device

    terms = query_terms(args)
    with Index.open(args.index, device=str(resolve_device(args.device)), backend=args.backend) as index:
        results = search_terms(index, terms, k=args.k, min_score=args.min_score)
    if args.json:
        print_json(results)
        return
    for result in results:
        caption = (result["caption"] or "").split("\n")[0]
        print(f"{result['score']:.3f}  {result['path']}  {caption}")


def cmd_moderate(args: argparse.Namespace) -> None:
    from .index import moderate
    from .runtime import resolve_device

    device = str(resolve_device(args.device))
    report = moderate(args.index, args.concepts, calibrate=args.calibrate, device=device, backend=args.backend)
    if args.json:
        print_json(report)
        return
    for concept in report["concepts"]:
        extra = ""
        if "precision" in concept:
            extra = f", precision {concept['precision']:.2f}, recall {concept['recall']:.2f}"
        print(f"{concept['concept']}: threshold {concept['threshold']:.3f} ({concept['threshold_from']}){extra}, "
              f"{concept['flagged']} flagged")  # fmt: skip
    for item in report["flagged"]:
        names = ", ".join(f"{hit['concept']} {hit['score']:.3f}" for hit in item["concepts"])
        print(f"{item['path']}: {names}")


def cmd_pipeline(args: argparse.Namespace) -> None:
    from .demo.plan import parse_budget

    if args.data == "icons":
        icon_pipeline(args)
        return
    from .demo.pipeline import run_collection

    if args.out is None:
        raise ValueError("pipeline --data DIR: give --out DIR for the models and the report")
    budget = parse_budget(args.budget) if args.budget else None if args.preset else parse_budget("25m")
    summary = run_collection(
        args.data, args.out, budget_s=budget, preset=args.preset, clip=args.clip, captions_from=args.captions_from,
        plain=args.plain, judge=args.judge_clip, baseline=args.baseline, fresh=args.fresh, dry_run=args.dry_run,
    )  # fmt: skip
    if summary is not None:
        print(f"done: {summary}")


def icon_pipeline(args: argparse.Namespace) -> None:
    """`clipdalle pipeline [--data icons]`: the demo's presets; --budget picks the largest that fits."""
    from .config import load_preset
    from .demo.icon_collection import checked_preset, preset_for_budget
    from .demo.pipeline import run_pipeline
    from .demo.plan import format_seconds, parse_budget

    collection_only = {
        "--clip": args.clip,
        "--captions-from": args.captions_from != "txt",
        "--plain": args.plain,
        "--judge-clip": args.judge_clip,
        "--baseline": args.baseline,
    }
    for flag, given in collection_only.items():
        if given:
            raise ValueError(f"{flag} applies to a collection of your own (--data DIR), not to the built-in icons")
    if args.preset and args.budget:
        raise ValueError("give --preset or --budget, not both")
    preset = args.preset or (preset_for_budget(parse_budget(args.budget)) if args.budget else "demo")
    if args.dry_run:
        spec, _ = checked_preset(preset)
        expected = spec.get("expected_s", {})
        print(f"data: the built-in icons (Material Design Icons 6), rendered into {args.data_dir}", file=sys.stderr)
        print(f"preset {preset}: {load_preset(preset).get('description', '')}", file=sys.stderr)
        stages = ", ".join(f"{name} {format_seconds(seconds)}" for name, seconds in expected.items())
        print(f"  expected: {stages}; total {format_seconds(sum(expected.values()))}", file=sys.stderr)
        print("dry run: nothing written", file=sys.stderr)
        return
    report = run_pipeline(preset, args.out or "runs/demo", fresh=args.fresh, data_dir=args.data_dir)
    print(f"done: {report}")


def cmd_serve(args: argparse.Namespace) -> None:
    import os

    from .runtime import resolve_device

    try:
        import uvicorn

        from .serve import ServeSettings, create_app, load_models, uvicorn_options
        from .serve.models import LOCAL_HOSTS
    except ImportError as error:
        raise ValueError(
            f"serve needs the server extra ({error.name} is missing): pip install 'clipdalle[serve]'"
        ) from None
    if args.pipeline_dir is None and not (args.index or args.clip or args.dalle):
        raise ValueError("serve: give a pipeline directory (clipdalle serve runs/demo) or --index/--clip/--dalle")
    api_key = args.api_key if args.api_key is not None else os.environ.get("CLIPDALLE_API_KEY") or None
    every_interface = args.host in ("0.0.0.0", "::", "")
    hosts = [*LOCAL_HOSTS, *([] if every_interface else [args.host]), *(args.allowed_host or [])]
    settings = ServeSettings(
        api_key=api_key,
        cors_origins=list(args.cors_origin or []),
        allowed_hosts=list(dict.fromkeys(hosts)),
        rerank=args.rerank,
        max_queue=args.max_queue,
        device=str(resolve_device(args.device)),
    )
    if settings.rerank < 1:
        raise ValueError(f"--rerank {settings.rerank}: expected at least 1 candidate per image")
    models = load_models(
        args.pipeline_dir, index=args.index, clip=args.clip, dalle=args.dalle, captioner=args.captioner,
        device=settings.device, backend=args.backend,
    )  # fmt: skip
    app = create_app(models, settings)
    loaded = [name for name in ("index", "clip", "dalle", "captioner") if getattr(models, name) is not None]
    print(f"serving {', '.join(loaded)} on http://{args.host}:{args.port} (API docs at /docs)", file=sys.stderr)
    if api_key is None and args.host not in LOCAL_HOSTS:
        print(
            f"warning: listening on {args.host} without --api-key: anyone who can reach it can use it", file=sys.stderr
        )
    if every_interface and not args.allowed_host:
        print(
            "note: only requests to localhost names are answered; add --allowed-host NAME for each name or address "
            "other machines use to reach this one",
            file=sys.stderr,
        )
    uvicorn.run(app, host=args.host, port=args.port, log_level="info", **uvicorn_options(settings))


# ------------------------------------------------------------------------------------------ the table


def add_training_flags(parser: argparse.ArgumentParser, model_config_class: type, extra_data: bool = False) -> None:
    parser.add_argument("--data", required=True, help="dataset: folder, .tar shards (glob/brace), or manifest")
    if extra_data:
        parser.add_argument(
            "--extra-data", action="append", metavar="PATH[:REPEATS]",
            help="another dataset mixed into the training data, read REPEATS times per epoch (repeatable)",
        )  # fmt: skip
    parser.add_argument("--out", required=True, help="run directory to write")
    parser.add_argument("--val-data", default=None, help="validation dataset (default: DATA/val or a hash hold-out)")
    parser.add_argument("--preset", default=None, help="preset name in configs/ (e.g. tiny, demo) or a .json path")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    add_config_flags(parser, model_config_class, "model")
    add_config_flags(parser, TrainConfig, "training")


def add_runtime_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (auto: CUDA when present)")


def add_backend_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--backend",
        default="auto",
        choices=("auto", "torch", "onnx"),
        help="where the CLIP runs: torch, onnx (onnxruntime; a model is exported once into the cache), or auto "
        "(the faster on this CPU, see benchmarks/RESULTS.md)",
    )


def build_parser() -> argparse.ArgumentParser:
    from .models import CaptionerConfig, CLIPConfig, DALLEConfig, DVAEConfig

    parser = Parser(prog="clipdalle", description="Train and use DALL·E and CLIP on your own images.")
    parser.add_argument("--version", action="version", version=f"clipdalle {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    def command(
        group: argparse._SubParsersAction, name: str, handler: Callable, help_text: str
    ) -> argparse.ArgumentParser:
        sub = group.add_parser(name, help=help_text, description=help_text)
        sub.set_defaults(handler=handler, command_parser=sub)
        return sub

    data = commands.add_parser("data", help="build datasets").add_subparsers(dest="what", required=True)
    icons = command(data, "icons", cmd_data_icons, "render the built-in Material Design Icons dataset")
    icons.add_argument("--out", required=True, help="output folder (train/*.tar, val/*.tar, metadata.jsonl)")
    icons.add_argument("--size", type=int, default=32, choices=(32, 64, 128), help="image size in pixels")
    icons.add_argument("--colours", type=int, default=8, choices=range(1, 9), metavar="1-8", help="palette colours")
    icons.add_argument(
        "--captions",
        default="full",
        choices=("full", "colour"),
        help="full: the icon and its colour ('a red icon of a heart'); colour: the colour alone ('a red icon')",
    )

    tokenizer = commands.add_parser("tokenizer", help="caption tokenizer").add_subparsers(dest="what", required=True)
    tok_train = command(tokenizer, "train", cmd_tokenizer_train, "train a byte-level BPE on a dataset's captions")
    tok_train.add_argument("--data", required=True, help="dataset with captions")
    tok_train.add_argument("--vocab-size", type=int, default=1000, help="vocabulary size incl. special tokens")
    tok_train.add_argument("--out", required=True, help="tokenizer.json to write")

    train = commands.add_parser("train", help="train a model").add_subparsers(dest="what", required=True)
    vae_parser = command(train, "vae", cmd_train_vae, "train the discrete VAE (image tokenizer)")
    add_training_flags(vae_parser, DVAEConfig, extra_data=True)

    train_clip_parser = command(train, "clip", cmd_train_clip, "train or fine-tune CLIP on image-caption pairs")
    add_training_flags(train_clip_parser, CLIPConfig, extra_data=True)
    train_clip_parser.add_argument("--tokenizer", default=None, help="caption tokenizer.json (default: train one)")
    train_clip_parser.add_argument("--init", default=None, help="start from a CLIP: a run, OpenAI .pt, open_clip, HF")
    train_clip_parser.add_argument("--lock-image", action="store_true", help="freeze the image tower (LiT)")

    train_dalle_parser = command(train, "dalle", cmd_train_dalle, "train the DALL·E transformer on dVAE codes")
    add_training_flags(train_dalle_parser, DALLEConfig)
    train_dalle_parser.add_argument("--vae", required=True, help="the dVAE run whose codes the model learns")
    train_dalle_parser.add_argument("--tokenizer", default=None, help="caption tokenizer.json (default: train one)")
    train_dalle_parser.add_argument("--tokens", default=None, help="token cache folder (default: OUT/tokens)")

    train_captioner_parser = command(
        train, "captioner", cmd_train_captioner, "train a captioner (DALL·E's stream reversed) on dVAE codes"
    )
    add_training_flags(train_captioner_parser, CaptionerConfig)
    train_captioner_parser.add_argument("--vae", required=True, help="the dVAE run whose codes the model reads")
    train_captioner_parser.add_argument("--tokenizer", default=None, help="caption tokenizer.json (default: train one)")
    train_captioner_parser.add_argument("--tokens", default=None, help="token cache folder (default: OUT/tokens)")

    tokens = commands.add_parser("tokens", help="dVAE token cache").add_subparsers(dest="what", required=True)
    cache = command(tokens, "cache", cmd_tokens_cache, "encode a dataset to dVAE codes once")
    cache.add_argument("--vae", required=True, help="dVAE run")
    cache.add_argument("--data", required=True, help="dataset (folder, shards, manifest)")
    cache.add_argument("--val-data", default=None, help="validation dataset (default: DATA/val if present)")
    cache.add_argument("--out", required=True, help="cache folder")
    add_runtime_flags(cache)

    def sampling_parser(name: str, handler: Callable, help_text: str) -> argparse.ArgumentParser:
        sub = command(commands, name, handler, help_text)
        sub.add_argument("--dalle", required=True, help="DALL·E run (its dVAE and tokenizer come with it)")
        sub.add_argument("--clip", default=None, help="CLIP run, weights or model name to rerank the samples")
        sub.add_argument("--out", required=True, help="output folder: NNN.png, grid.png, results.json")
        sub.add_argument("-n", type=int, default=16, help="samples per prompt")
        sub.add_argument("--keep", type=int, default=None, help="best samples kept per prompt (default: all)")
        sub.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (0: greedy)")
        sub.add_argument("--top-k", type=int, default=None, help="keep the k most likely image codes")
        sub.add_argument("--top-p", type=float, default=None, help="nucleus sampling threshold")
        sub.add_argument("--cond-scale", type=float, default=1.0, help="classifier-free guidance scale")
        sub.add_argument(
            "--shortlist",
            type=int,
            default=1,
            help="with --clip: CLIP shortlists this many x --keep samples per prompt and the most typical of them "
            "are kept (1: CLIP's best)",
        )
        sub.add_argument("--seed", type=int, default=None, help="base seed (sample i gets seed + i)")
        sub.add_argument("--batch-size", type=int, default=64, help="samples decoded at once")
        sub.add_argument("--last", action="store_true", help="the runs' last weights, not their best (RUN/best/)")
        add_runtime_flags(sub)
        return sub

    generate = sampling_parser("generate", cmd_generate, "generate images from text, reranked by CLIP")
    generate.add_argument("prompts", nargs="*", help="prompts (an empty string samples unconditionally)")
    generate.add_argument("--prompts-file", default=None, help="one prompt per line")
    inpaint = sampling_parser("inpaint", cmd_inpaint, "regenerate a region of an image to fit a prompt")
    inpaint.add_argument("prompt", help="what the whole image should show")
    inpaint.add_argument("--image", required=True, help="the image to edit")
    inpaint.add_argument("--box", default=None, help="region x0,y0,x1,y1 in pixels of the model's size")
    inpaint.add_argument("--mask", default=None, help="mask image: its transparent (or white) area is regenerated")
    variations = sampling_parser("variations", cmd_variations, "variations of an image: keep its top rows")
    variations.add_argument("prompt", help="caption for the variations")
    variations.add_argument("--image", required=True, help="the image to vary")
    variations.add_argument("--keep-rows", type=int, default=None, help="code rows kept (default: half the grid)")

    classify = command(commands, "classify", cmd_classify, "zero-shot classification of images from text labels")
    classify.add_argument("images", nargs="+", help="image files or folders")
    classify.add_argument("--clip", required=True, help="CLIP: a run, OpenAI/open_clip/HF weights or a model name")
    classify.add_argument("--labels", default=None, help="comma-separated labels")
    classify.add_argument("--labels-file", default=None, help="a file with one label per line")
    classify.add_argument("--templates", default=None, help="prompt templates separated by |, e.g. 'a photo of a {}.'")
    classify.add_argument("--top", type=int, default=5, help="labels to show per image")
    classify.add_argument("--json", action="store_true", help="print a JSON list, one object per image")
    add_runtime_flags(classify)
    add_backend_flag(classify)

    caption = command(commands, "caption", cmd_caption, "caption images: CLIP-ranked label tables or a captioner")
    caption.add_argument("images", nargs="+", help="image files or folders")
    caption.add_argument("--clip", required=True, help="CLIP: a run directory or OpenAI/open_clip/HF weights")
    caption.add_argument("--captioner", "--dalle", default=None, help="a captioner run: sample, then rerank by CLIP")
    caption.add_argument("--labels", default=None, help="label tables: one term per line, [table] headers, template:")
    caption.add_argument("--index", default=None, help="take the terms from this index's captions (see --template)")
    caption.add_argument("--template", action="append", help="with --index: e.g. 'a {colour} icon of a {thing}'")
    caption.add_argument("--write-txt", action="store_true", help="write a same-stem .txt beside each image")
    caption.add_argument("--overwrite", action="store_true", help="with --write-txt: replace existing .txt files")
    caption.add_argument("-n", type=int, default=16, help="captioner: captions sampled per image")
    caption.add_argument("--temperature", type=float, default=1.0, help="captioner: sampling temperature (0: greedy)")
    caption.add_argument("--seed", type=int, default=0, help="captioner: sampling seed")
    caption.add_argument("--batch-size", type=int, default=64, help="captioner: images sampled at once")
    caption.add_argument("--json", action="store_true", help="print a JSON list, one object per image")
    add_runtime_flags(caption)

    explain = command(commands, "explain", cmd_explain, "where in an image a text matches: a relevance map")
    explain.add_argument("image", help="the image")
    explain.add_argument("text", help="what to look for")
    explain.add_argument("--clip", required=True, help="CLIP: a run directory or OpenAI/open_clip/HF weights")
    explain.add_argument("--out", required=True, help="output folder: overlay.png, explanation.json")
    explain.add_argument("--method", default="gradient", choices=("gradient", "dense"), help="see clipdalle.explain")
    explain.add_argument("--size", type=int, default=256, help="side of overlay.png in pixels")
    add_runtime_flags(explain)

    probe = command(commands, "probe", cmd_probe, "linear probe and zero-shot accuracy on a labelled dataset")
    probe.add_argument("--clip", required=True, help="CLIP run, weights or model name (clipdalle models list)")
    probe.add_argument("--data", required=True, help="labelled data: class-per-folder or CSV image,label")
    probe.add_argument("--val-data", default=None, help="labelled test data (default: a 20 %% hash hold-out)")
    add_runtime_flags(probe)

    convert = command(commands, "convert", cmd_convert, "write a CLIP checkpoint in another layout")
    convert.add_argument("source", help="a run, OpenAI .pt, open_clip file/directory or HF directory")
    convert.add_argument("--to", required=True, choices=("hf", "openai"), help="target layout")
    convert.add_argument("--out", required=True, help="output directory (or .safetensors file for --to openai)")
    convert.add_argument("--quick-gelu", default=None, action=argparse.BooleanOptionalAction, help="activation")

    models = commands.add_parser("models", help="CLIP and SigLIP models by name").add_subparsers(
        dest="what", required=True
    )
    models_list = command(models, "list", cmd_models_list, "model names clipdalle knows, which are cached, their size")
    models_list.add_argument("--cached", action="store_true", help="only the models in the caches")
    models_list.add_argument("--json", action="store_true", help="print a JSON list instead")
    models_download = command(models, "download", cmd_models_download, "fetch models now, to use them offline later")
    models_download.add_argument("names", nargs="+", help="model names, e.g. ViT-B/32 google/siglip-base-patch16-224")

    formats = commands.add_parser("export", help="deployment formats").add_subparsers(dest="what", required=True)
    onnx = command(formats, "onnx", cmd_export_onnx, "the image and text towers as two ONNX graphs (dynamic batch)")
    onnx.add_argument("--clip", required=True, help="CLIP run, weights or model name (clipdalle models list)")
    onnx.add_argument("--out", required=True, help="output folder: image.onnx, text.onnx, tokenizer, settings")
    onnx.add_argument("--quick-gelu", default=None, action=argparse.BooleanOptionalAction, help="activation")

    guide = command(commands, "guide", cmd_guide, "CLIP-guided generation on the dVAE's code grid (VQGAN+CLIP)")
    guide.add_argument("prompt", help="what the image should show")
    guide.add_argument("--vae", default=None, help="dVAE run (default: the --init-dalle run's)")
    guide.add_argument("--clip", required=True, help="CLIP run, weights or model name (clipdalle models list)")
    guide.add_argument("--out", required=True, help="output folder (final.png, progress.png)")
    guide.add_argument("--steps", type=int, default=200, help="optimisation steps")
    guide.add_argument("--lr", type=float, default=0.2, help="Adam learning rate on the code logits")
    guide.add_argument("--seed", type=int, default=0, help="seed for the start and the cutouts")
    guide.add_argument("--init-image", default=None, help="start from this image's codes instead of noise")
    guide.add_argument("--init-dalle", default=None, help="start from a sample of this DALL·E run for the prompt")

    index = commands.add_parser("index", help="embedding index of a collection").add_subparsers(
        dest="what", required=True
    )
    build = command(index, "build", cmd_index_build, "embed a collection with CLIP into a searchable index")
    build.add_argument("--clip", required=True, help="CLIP run, weights or model name (clipdalle models list)")
    build.add_argument("--data", required=True, help="images: folder (captions optional), shards or manifest")
    build.add_argument("--out", required=True, help="index folder")
    build.add_argument("--batch-size", type=int, default=256, help="images embedded at once")
    build.add_argument("--num-workers", type=int, default=1, help="image-decoding processes")
    add_runtime_flags(build)
    add_backend_flag(build)
    add = command(index, "add", cmd_index_add, "append images to an index without a rebuild")
    add.add_argument("--index", required=True, help="index folder")
    add.add_argument("--data", required=True, help="images to add")
    add.add_argument("--batch-size", type=int, default=256, help="images embedded at once")
    add_runtime_flags(add)
    add_backend_flag(add)
    remove = command(index, "remove", cmd_index_remove, "drop images from an index by id")
    remove.add_argument("--index", required=True, help="index folder")
    remove.add_argument("--ids", required=True, help="comma-separated ids")
    info = command(index, "info", cmd_index_info, "counts, model, index type and measured recall")
    info.add_argument("--index", required=True, help="index folder")
    duplicates = command(index, "duplicates", cmd_index_duplicates, "groups of near-duplicate images")
    duplicates.add_argument("--index", required=True, help="index folder")
    duplicates.add_argument("--method", choices=("pixels", "clip"), default="pixels",
                            help="pixels (default): candidates checked on pixels; clip: cosine alone")  # fmt: skip
    duplicates.add_argument("--threshold", type=float, default=None,
                            help="CLIP cosine above which two pair or are candidates (default 0.97)")  # fmt: skip
    duplicates.add_argument("--pixel-threshold", type=float, default=None,
                            help="pixels: largest blurred difference of a near-duplicate (default 0.44)")  # fmt: skip
    duplicates.add_argument("--json", action="store_true", help="print the groups as JSON")
    add_runtime_flags(duplicates)
    sync = command(index, "sync", cmd_index_sync, "embed new and changed files of a folder, drop deleted ones")
    sync.add_argument("--index", required=True, help="index folder")
    sync.add_argument("--data", required=True, help="the folder of images to follow")
    sync.add_argument("--batch-size", type=int, default=256, help="images embedded at once")
    sync.add_argument("--num-workers", type=int, default=1, help="image-decoding processes")
    add_runtime_flags(sync)
    export = command(index, "export", cmd_index_export, "write embeddings.npy and metadata.jsonl")
    export.add_argument("--index", required=True, help="index folder")
    export.add_argument("--out", required=True, help="output folder")

    search = command(commands, "search", cmd_search, "search an index by texts and images, weighted, + and -")
    search.add_argument("query", nargs="?", default=None, help="text, or terms: '2:a red circle + ./q.png - a square'")
    search.add_argument("--index", required=True, help="index folder")
    search.add_argument("--image", action="append", help="find images similar to this one (repeatable)")
    search.add_argument("--minus", action="append", help="a text to move away from (repeatable)")
    search.add_argument("--minus-image", action="append", help="an image to move away from (repeatable)")
    search.add_argument("--weights", default=None, help="one weight per term: query terms, --image, --minus, ...")
    search.add_argument("-k", type=int, default=20, help="results")
    search.add_argument("--min-score", type=float, default=None, help="drop results below this cosine")
    search.add_argument("--json", action="store_true", help="print a JSON list of {id, path, caption, score}")
    add_runtime_flags(search)
    add_backend_flag(search)

    moderate = command(commands, "moderate", cmd_moderate, "flag images that match text concepts")
    moderate.add_argument("--index", required=True, help="index folder")
    moderate.add_argument("--concepts", required=True, help="concept<TAB>threshold per line (threshold optional)")
    moderate.add_argument("--calibrate", default=None, help="labels.csv (image,concept; 'none' = clean)")
    moderate.add_argument("--json", action="store_true", help="print the report as JSON")
    add_runtime_flags(moderate)
    add_backend_flag(moderate)

    serve = command(commands, "serve", cmd_serve, "web page, JSON API and OpenAI-compatible images API")
    serve.add_argument("pipeline_dir", nargs="?", default=None, help="a pipeline output with index/, clip/, dalle/")
    serve.add_argument("--index", default=None, help="index folder (search, similar, thumbnails)")
    serve.add_argument("--clip", default=None, help="CLIP run or model name (default: the index's)")
    serve.add_argument("--dalle", default=None, help="DALL·E run (its dVAE and tokenizer come with it) to generate")
    serve.add_argument("--captioner", default=None, help="captioner run for /api/caption (default: CLIP ranking)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    serve.add_argument("--port", type=int, default=8000, help="TCP port")
    serve.add_argument(
        "--allowed-host", action="append", help="also answer requests sent to this host name (repeatable; * for any)"
    )
    serve.add_argument("--api-key", default=None, help="bearer token required on every route (env CLIPDALLE_API_KEY)")
    serve.add_argument("--cors-origin", action="append", help="allow browser calls from this origin (repeatable)")
    serve.add_argument("--rerank", type=int, default=4, help="OpenAI routes: each image is the best of K (with CLIP)")
    serve.add_argument("--max-queue", type=int, default=8, help="generation requests admitted at once; more get 503")
    add_runtime_flags(serve)
    add_backend_flag(serve)

    pipeline = command(commands, "pipeline", cmd_pipeline, "train, index, evaluate and report on a collection")
    pipeline.add_argument("--data", default="icons", help="icons (the built-in demo), or a folder, shards or manifest")
    pipeline.add_argument("--out", default=None, help="output folder for the models and the report (icons: runs/demo)")
    pipeline.add_argument("--budget", default=None, help="wall-clock budget, e.g. 25m, 2h, 8h (--data DIR: 25m)")
    pipeline.add_argument("--preset", default=None, help="icons: demo, small, ml6; --data DIR: a plan.json to run")
    pipeline.add_argument("--clip", default=None, help="use this CLIP (run or weights) instead of training one")
    pipeline.add_argument(
        "--captions-from", default="txt", choices=("txt", "names"), help="txt: .txt files or the manifest's captions; "
        "names: folder and file names (dogs/beagle_01.jpg -> 'beagle, dogs')",
    )  # fmt: skip
    pipeline.add_argument("--dry-run", action="store_true", help="print the data report and the plan; write nothing")
    pipeline.add_argument("--plain", action="store_true", help="without regularisation or best weights (a baseline)")
    pipeline.add_argument("--judge-clip", default=None, help="also score samples with this CLIP (comparing runs)")
    pipeline.add_argument("--baseline", default=None, help="another run's OUT to compare with in the report")
    pipeline.add_argument("--data-dir", default="data", help="where built-in datasets are rendered")
    pipeline.add_argument("--fresh", action="store_true", help="start over instead of skipping finished stages")
    return parser


def one_line_warning(message: Warning | str, category: type, filename: str, lineno: int, line: Any = None) -> str:
    """Warnings as the CLI's other messages: `warning: ...` on one line, without the source line."""
    return f"warning: {message}\n"


def main(argv: Sequence[str] | None = None) -> int:
    warnings.formatwarning = one_line_warning
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
        if extra:
            sub = getattr(args, "command_parser", parser)
            raise UsageError(f"{sub.prog}: unknown option(s) {' '.join(extra)}; valid options: {valid_options(sub)}")
        args.handler(args)
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
