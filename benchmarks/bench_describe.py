"""Describe, explain, find, measured on the validation icons (389 icon families no model trained on, 8 colours).

    python benchmarks/bench_describe.py caption --clip runs/demo/clip --data data/icons-32px-8c --index runs/demo/index
    python benchmarks/bench_describe.py explain    --clip runs/demo/clip --data data/icons-32px-8c
    python benchmarks/bench_describe.py duplicates --clip runs/demo/clip --data data/icons-32px-8c --work /tmp/dups
    python benchmarks/bench_describe.py colour     --data data/icons-32px-8c
    python benchmarks/bench_describe.py query      --index runs/demo/index
    python benchmarks/bench_describe.py sync       --clip runs/demo/clip --data data/icons-32px-8c --work /tmp/sync

caption: CLIP ranking with the tables cut from the index's captions (colour, thing) against zero-shot name
classification and, with --captioner, the trained captioner; colour and icon name right at top-1, BLEU-4 against
the five true captions beside constant captions. explain: the pointing game on canvases of 2-4 icons. duplicates:
copies of validation icons (resized, JPEG, 90 % crop, mirrored) indexed beside all originals, precision and recall
of the pairs above each threshold. colour: the pixel method's ink-direction and JPEG steps on the copies, on JPEG
copies made in other ways and on recolours. query: image arithmetic (an icon in one colour - its colour + another
colour) against text and image queries. sync: a sync of an unchanged and of a changed folder against a build.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
from machine import matmul_gflops
from PIL import Image

from clipdalle import caption, explain, pretrained
from clipdalle.data import icons
from clipdalle.data.sources import open_source
from clipdalle.demo.evaluation import name_phrase
from clipdalle.evaluate import cider_d, corpus_bleu
from clipdalle.transforms import resize_crop, to_tensor
from clipdalle.zero_shot import encode_images, encode_texts

COLOURS = list(icons.PALETTE)
TEMPLATES = [  # the five phrasings of data/icons.captions_for, most specific first (the first match cuts a line)
    "a {colour} icon of a {thing}",
    "an icon of a {colour} {thing}",
    "a {colour} {thing} icon",
    "{thing} icon in {colour}",
    "{colour} {thing}",
]


def val_icons(data: Path, split: str = "val", every: int = 1) -> dict:
    """Every validation icon (or every `every`-th icon of `split`): {"names", "colours", "captions" (5 each),
    "images" (N, 3, 32, 32), "pngs" (bytes)}."""
    found = {"names": [], "colours": [], "captions": [], "images": [], "pngs": []}
    for number, record in enumerate(open_source(data / split, captions="required")):
        if number % every:
            continue
        name, colour = record.key.split("/")[-1].split("__")
        found["names"].append(name)
        found["colours"].append(colour)
        found["captions"].append(list(record.captions))
        found["pngs"].append(record.read_bytes())
        found["images"].append(to_tensor(resize_crop(record.decode(), 32)))
    found["images"] = torch.stack(found["images"])
    return found


def machine_line() -> str:
    return f"load {os.getloadavg()[0]:.1f}, matmul {matmul_gflops():.0f} GFLOP/s"


# ------------------------------------------------------------------------------------------ captions


def measure_captions(args: argparse.Namespace) -> dict:
    from clipdalle.index.store import stored_captions

    model, _, tokenizer = pretrained.load(args.clip)
    icons_found = val_icons(Path(args.data))
    images, names, colours = icons_found["images"], icons_found["names"], icons_found["colours"]
    references = icons_found["captions"]
    things = [name.replace("-", " ") for name in names]
    results: dict = {"images": len(names), "names": len(set(names))}

    # zero-shot name classification, the demo evaluation's protocol ("an icon of a cup")
    distinct = sorted(set(names))
    text = encode_texts(model, tokenizer, [f"an icon of {name_phrase(name)}" for name in distinct])
    predicted = (encode_images(model, images) @ text.T).argmax(dim=1).tolist()
    results["zero_shot_name_top1"] = float(np.mean([distinct[p] == n for p, n in zip(predicted, names)]))

    tables = caption.tables_from_captions(stored_captions(args.index), TEMPLATES)
    variants = {
        "terms alone (passes 0)": dict(passes=0, templates=TEMPLATES),
        "first template, passes 2": dict(passes=2, templates=TEMPLATES[:1]),
        "5 templates, passes 2 (default)": dict(passes=2, templates=TEMPLATES),
    }
    results["clip"] = {}
    for label, options in variants.items():
        started = time.perf_counter()
        chosen = caption.LabelTables(tables.tables, options["templates"])
        ranked = caption.rank_terms(model, tokenizer, images, chosen, passes=options["passes"])
        seconds = time.perf_counter() - started
        hypotheses = [result["caption"] for result in ranked]
        results["clip"][label] = {
            "colour_right": float(np.mean([r["terms"]["colour"][0]["term"] == c for r, c in zip(ranked, colours)])),
            "name_right": float(np.mean([r["terms"]["thing"][0]["term"] == t for r, t in zip(ranked, things)])),
            "name_top3": float(
                np.mean([t in [x["term"] for x in r["terms"]["thing"]] for r, t in zip(ranked, things)])
            ),
            "bleu4": corpus_bleu(hypotheses, references),
            "cider_d": cider_d(hypotheses, references),
            "seconds": round(seconds, 1),
            "example": hypotheses[0],
        }
    constants = {
        "constant 'a red icon of a circle'": ["a red icon of a circle"] * len(names),
        "true colour, constant name 'circle'": [
            caption.fill(TEMPLATES[0], {"colour": c, "thing": "circle"}) for c in colours
        ],
        "true caption 1 of 5 (against all 5)": [refs[0] for refs in references],
    }
    results["baselines"] = {
        label: {"bleu4": corpus_bleu(hypotheses, references), "cider_d": cider_d(hypotheses, references)}
        for label, hypotheses in constants.items()
    }
    if args.captioner:
        results["captioner"] = measure_captioner(args, images, colours, things, references)
        seen = val_icons(Path(args.data), "train", every=args.seen_every)  # families the captioner trained on
        seen_things = [name.replace("-", " ") for name in seen["names"]]
        results["captioner_seen_icons"] = measure_captioner(
            args, seen["images"], seen["colours"], seen_things, seen["captions"]
        )
    return results


def measure_captioner(args: argparse.Namespace, images, colours, things, references) -> dict:
    """The captioner's captions (n samples each, reranked by CLIP): colour and name contained, BLEU-4, CIDEr-D."""
    clip = pretrained.load(args.clip)
    captioner = caption.load_captioner(args.captioner)
    started = time.perf_counter()
    sampled = []
    for start in range(0, len(images), 64):
        sampled += caption.captioner_captions(clip, captioner, images[start : start + 64], n=args.n, seed=0)
    hypotheses = [result["caption"] for result in sampled]
    return {
        "images": len(hypotheses),
        "samples": args.n,
        "colour_right": float(np.mean([f" {c} " in f" {h} " for h, c in zip(hypotheses, colours)])),
        "name_right": float(np.mean([f" {t} " in f" {h} " for h, t in zip(hypotheses, things)])),
        "exactly_a_true_caption": float(np.mean([h in refs for h, refs in zip(hypotheses, references)])),
        "bleu4": corpus_bleu(hypotheses, references),
        "cider_d": cider_d(hypotheses, references),
        "seconds": round(time.perf_counter() - started, 1),
        "examples": hypotheses[:5],
    }


# ------------------------------------------------------------------------------------------ pointing game


def canvases(found: dict, count: int, icons_per_canvas: int, same_colour: bool, seed: int) -> list[dict]:
    """Canvases of 64 px with `icons_per_canvas` different icons of 32 px at random non-overlapping places."""
    rng = np.random.default_rng(seed)
    by_name_colour = {(n, c): i for i, (n, c) in enumerate(zip(found["names"], found["colours"]))}
    names = sorted(set(found["names"]))
    made = []
    while len(made) < count:
        chosen = rng.choice(len(names), size=icons_per_canvas, replace=False)
        colour = COLOURS[rng.integers(len(COLOURS))]
        picks = [
            by_name_colour[(names[n], colour if same_colour else COLOURS[rng.integers(len(COLOURS))])] for n in chosen
        ]
        boxes: list[tuple[int, int]] = []
        if icons_per_canvas == 4:  # four 32 px icons fit a 64 px canvas only as its 2 x 2 grid
            boxes = [(0, 0), (32, 0), (0, 32), (32, 32)]
        misses = 0
        while len(boxes) < icons_per_canvas:
            x, y = (int(v) for v in rng.integers(0, 33, size=2) // 4 * 4)  # on a 4 px lattice
            if all(abs(x - bx) >= 32 or abs(y - by) >= 32 for bx, by in boxes):
                boxes.append((x, y))
            else:
                misses += 1
            if misses == 50:  # the icons placed so far leave no room for the next one: start again
                boxes, misses = [], 0
        canvas = torch.ones(3, 64, 64)
        for pick, (x, y) in zip(picks, boxes):
            canvas[:, y : y + 32, x : x + 32] = found["images"][pick]
        target = int(rng.integers(icons_per_canvas))
        made.append({"canvas": canvas, "boxes": boxes, "picks": picks, "target": target})
    return made


def measure_pointing(args: argparse.Namespace) -> dict:
    model, _, tokenizer = pretrained.load(args.clip)
    found = val_icons(Path(args.data))
    size = model.config.image_size
    results = {"canvas": 64, "icon": 32, "model_input": size, "canvases_per_setting": args.canvases}
    neutral = encode_texts(model, tokenizer, ["an icon"])  # (1, D): where the map goes without a name
    for same_colour in (False, True):
        for count in (2, 3, 4):
            made = canvases(found, args.canvases, count, same_colour, seed=args.seed + count + 10 * same_colour)
            pictures = torch.nn.functional.interpolate(
                torch.stack([m["canvas"] for m in made]), size=(size, size), mode="bilinear", antialias=True
            )  # (N, 3, S, S)
            named = [found["captions"][m["picks"][m["target"]]][0] for m in made]
            text = encode_texts(model, tokenizer, named)  # (N, D)
            setting = {}
            for method in explain.METHODS:
                for label, features in ((method, text), (f"{method}, query 'an icon'", neutral)):
                    maps, _ = explain.relevance_maps(model, pictures, features, method)
                    peaks = explain.peak(maps, 64)  # (N, 2) in canvas pixels
                    hits = []
                    for m, (x, y) in zip(made, peaks.tolist()):
                        bx, by = m["boxes"][m["target"]]
                        hits.append(bx <= x < bx + 32 and by <= y < by + 32)
                    setting[label] = float(np.mean(hits))
            setting["chance (area share)"] = 32 * 32 / (64 * 64)
            key = f"{count} icons, {'same colour' if same_colour else 'random colours'}"
            results[key] = setting
            print(key, json.dumps(setting), flush=True)
    return results


# ------------------------------------------------------------------------------------------ near-duplicates


COPY_KINDS = ("resized", "jpeg", "crop90", "flipped")


def make_copy(png: bytes, kind: str) -> tuple[bytes, str]:
    image = Image.open(io.BytesIO(png)).convert("RGB")
    if kind == "resized":
        image = image.resize((24, 24), Image.Resampling.LANCZOS)
    elif kind == "crop90":
        side = round(image.width * 0.9)
        left = (image.width - side) // 2
        image = image.crop((left, left, left + side, left + side))
    elif kind == "flipped":
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    buffer = io.BytesIO()
    if kind == "jpeg":
        image.save(buffer, format="JPEG", quality=20)
        return buffer.getvalue(), ".jpg"
    image.save(buffer, format="PNG")
    return buffer.getvalue(), ".png"


def measure_duplicates(args: argparse.Namespace) -> dict:
    from clipdalle import index as index_module
    from clipdalle.index import duplicates, pixel_match

    if args.colour_threshold is not None:
        pixel_match.COLOUR_THRESHOLD = args.colour_threshold
    found = val_icons(Path(args.data))
    work = Path(args.work)
    folder = work / "images"
    if not (work / "index" / "info.json").exists():
        shutil.rmtree(work, ignore_errors=True)
        folder.mkdir(parents=True)
        rng = np.random.default_rng(args.seed)
        sources = sorted(rng.choice(len(found["names"]), size=args.sources, replace=False).tolist())
        for number, png in enumerate(found["pngs"]):
            (folder / f"{number:05d}.png").write_bytes(png)
        for number in sources:
            for kind in COPY_KINDS:
                data, suffix = make_copy(found["pngs"][number], kind)
                (folder / f"{number:05d}-{kind}{suffix}").write_bytes(data)
        index_module.build_index(args.clip, folder, work / "index", num_workers=0)

    def point(pairs: np.ndarray, threshold: float) -> dict:
        """Copies found, pair precision and the rest for the pairs (P, 2) one threshold keeps."""
        kept = {tuple(pair) for pair in pairs.tolist()}
        found_true = kept & true_pairs
        copy_found = [pair in kept for pair in copy_pairs]
        groups = duplicates.group_pairs(np.array(sorted(kept), dtype=np.int64).reshape(-1, 2))
        grouped_pairs = {(min(a, b), max(a, b)) for group in groups for a in group for b in group if a < b}
        result = {
            "threshold": threshold,
            "pairs": len(kept),
            "pair_precision": len(found_true) / max(1, len(kept)),
            "pair_recall": len(found_true) / len(true_pairs),
            "copies_found": float(np.mean(copy_found)),
            "copies_found_by_kind": {
                kind: float(np.mean([hit for c, hit in zip(copy_pairs.values(), copy_found) if kind_of[c] == kind]))
                for kind in COPY_KINDS
            },
            "false_pairs_same_family_and_colour": sum(family[a] == family[b] for a, b in kept - true_pairs),
            "false_pairs_same_icon_other_colour": sum(
                names[a] == names[b] and family[a] != family[b] for a, b in kept - true_pairs
            ),
            "pair_precision_recolours_aside": len(found_true)
            / max(1, len(kept) - sum(names[a] == names[b] for a, b in kept - true_pairs)),
            "group_precision": len(grouped_pairs & true_pairs) / max(1, len(grouped_pairs)),
            "group_recall": len(grouped_pairs & true_pairs) / len(true_pairs),
        }
        print(json.dumps(result), flush=True)
        return result

    with index_module.Index.open(work / "index") as opened:
        ids, embeddings = opened.embeddings()
        rows = opened.rows(ids.tolist())
        source_of = {i: int(Path(rows[i]["path"]).stem.split("-")[0]) for i in ids.tolist()}
        kind_of = {i: (Path(rows[i]["path"]).stem.split("-") + ["original"])[1] for i in ids.tolist()}
        family = {i: (icons.family_of(found["names"][source_of[i]]), found["colours"][source_of[i]]) for i in source_of}
        names = {i: found["names"][source_of[i]] for i in source_of}
        copies = [i for i in ids.tolist() if kind_of[i] != "original"]
        original_of = {source_of[i]: i for i in ids.tolist() if kind_of[i] == "original"}
        true_pairs: set[tuple[int, int]] = set()  # every two stored images made from one source icon
        for source in {source_of[i] for i in copies}:
            group = [i for i in ids.tolist() if source_of[i] == source]
            true_pairs |= {(min(a, b), max(a, b)) for a in group for b in group if a < b}
        copy_pairs = {(min(c, original_of[source_of[c]]), max(c, original_of[source_of[c]])): c for c in copies}
        started = time.perf_counter()
        clip_pairs, clip_scores = duplicates.pairs_above(opened.faiss_index, ids, embeddings, min(args.thresholds))
        clip_seconds = time.perf_counter() - started
        curves = {"clip": [point(clip_pairs[clip_scores > t], t) for t in args.thresholds]}
        started = time.perf_counter()  # the pixel method as find_duplicates runs it, every candidate kept
        default_clip = clip_pairs[clip_scores > duplicates.DEFAULT_THRESHOLD]
        checked, distances, candidates, _ = duplicates.pixel_checked_pairs(opened, ids, default_clip, 1.0, False)
        pixel_seconds = time.perf_counter() - started
        candidate_copies = float(np.mean([pair in {tuple(p) for p in checked.tolist()} for pair in copy_pairs]))
        curves["pixels"] = [point(checked[distances <= t], t) for t in args.pixel_thresholds]
        info = opened.info
    return {"images": len(ids), "copies": len(copies), "byte_identical_copies_stored_once": info["duplicates"],
            "true_pairs": len(true_pairs), "pixel_candidates": candidates, "copies_among_candidates": candidate_copies,
            "seconds": {"clip_pairs": round(clip_seconds, 1), "pixel_check": round(pixel_seconds, 1)},
            "curves": curves}  # fmt: skip


def saved_jpeg(image: Image.Image, **options) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", **options)
    return Image.open(io.BytesIO(buffer.getvalue()))


def measure_colour_steps(args: argparse.Namespace) -> dict:
    """The pixel method's steps 4 and 5 on the same seeded source icons as `duplicates`. Step 4: the ink-direction
    angle between each source and its four copies (as `duplicates` makes them) and its recolours (the same icon in
    the other palette colours). Step 5: the re-encoding distance of JPEG copies at quality 20 made as the
    calibration makes them and in ways it never saw (re-saved, from pixels off by up to 2 levels as another decoder
    or colour conversion gives, after a first save at quality 95, without chroma subsampling), and of the recolours
    against the calibrated copy."""
    from clipdalle.index import pixel_match

    found = val_icons(Path(args.data))
    rng = np.random.default_rng(args.seed)
    sources = sorted(rng.choice(len(found["names"]), size=args.sources, replace=False).tolist())
    of_name: dict[str, list[int]] = {}
    for number, name in enumerate(found["names"]):
        of_name.setdefault(name, []).append(number)
    noise = np.random.default_rng(args.seed + 1)
    angles: dict[str, list[float]] = {}
    distances: dict[str, list[float]] = {}
    for number in sources:
        original = Image.open(io.BytesIO(found["pngs"][number])).convert("RGB")
        recolours = [Image.open(io.BytesIO(found["pngs"][other])).convert("RGB")
                     for other in of_name[found["names"][number]] if other != number]  # fmt: skip
        views = {kind: Image.open(io.BytesIO(make_copy(found["pngs"][number], kind)[0])) for kind in COPY_KINDS}
        views.update({f"recolour {i}": recolour for i, recolour in enumerate(recolours)})
        thumbs = pixel_match.thumbnails([original, *views.values()])
        pairs = np.array([[0, row] for row in range(1, len(thumbs))], dtype=np.int64)
        for kind, angle in zip(views, pixel_match.ink_angles(thumbs, pairs).tolist()):
            angles.setdefault(kind.split(" ")[0] if kind.startswith("recolour") else kind, []).append(angle)
        pixels = np.asarray(original).astype(np.int16)
        nudged = Image.fromarray(np.clip(pixels + noise.integers(-2, 3, pixels.shape), 0, 255).astype(np.uint8))
        copies = {
            "as calibrated (quality 20)": saved_jpeg(original, quality=20),
            "progressive, optimised": saved_jpeg(original, quality=20, progressive=True, optimize=True),
            "from pixels off by <= 2 levels": saved_jpeg(nudged, quality=20),
            "saved twice at quality 20": saved_jpeg(saved_jpeg(original, quality=20).convert("RGB"), quality=20),
            "quality 95, then 20": saved_jpeg(saved_jpeg(original, quality=95).convert("RGB"), quality=20),
            "no chroma subsampling": saved_jpeg(original, quality=20, subsampling=0),
        }
        for kind, copy in copies.items():
            distance = pixel_match.reencoding_distance(original, copy, pixel_match.jpeg_settings(copy))
            distances.setdefault(kind, []).append(distance)
        copy = copies["as calibrated (quality 20)"]
        for recolour in recolours:
            distance = pixel_match.reencoding_distance(recolour, copy, pixel_match.jpeg_settings(copy))
            distances.setdefault("recolour (another palette colour)", []).append(distance)

    def summary(values: list[float], thresholds: list[float]) -> dict:
        values = np.array(values, dtype=np.float64)
        finite = values[np.isfinite(values)]
        return {"pairs": len(values), "not_applicable": int(len(values) - len(finite)),
                "min": round(float(finite.min()), 3), "median": round(float(np.median(finite)), 3),
                "p99": round(float(np.percentile(finite, 99)), 3), "max": round(float(finite.max()), 3),
                "within": {str(t): round(float(np.mean(finite <= t)), 4) for t in thresholds}}  # fmt: skip

    angle_thresholds = [pixel_match.INK_ANGLE_THRESHOLD]
    reencode_thresholds = sorted({0.1, 0.15, 0.2, 0.25, 0.3, pixel_match.REENCODE_THRESHOLD})
    return {
        "sources": len(sources),
        "ink_angle": {kind: summary(values, angle_thresholds) for kind, values in angles.items()},
        "reencoding": {kind: summary(values, reencode_thresholds) for kind, values in distances.items()},
    }


# ------------------------------------------------------------------------------------------ combined queries


def measure_query(args: argparse.Namespace) -> dict:
    """Image arithmetic on the index of validation icons: for an icon in colour A, the target is the same icon in
    colour B. Queries: the image alone, the text 'a B icon' alone, the true caption of the target, and the
    image - 'a A icon' + 'a B icon'. R@1 and R@10 over the stored images."""
    from clipdalle.index import Index
    from clipdalle.index.query import Term, combine, term_features

    rng = np.random.default_rng(args.seed)
    with Index.open(args.index) as opened:
        ids, _ = opened.embeddings()
        rows = opened.rows(ids.tolist())
        key_of = {i: Path(rows[i]["path"]).name.split(":")[-1].rsplit(".", 1)[0] for i in ids.tolist()}
        by_key = {key: i for i, key in key_of.items()}
        queries = rng.choice(ids, size=min(args.queries, len(ids)), replace=False).tolist()
        recalls: dict[str, list[tuple[bool, bool]]] = {}
        for image_id in queries:
            name, colour = key_of[image_id].split("__")
            other = [c for c in COLOURS if c != colour][int(rng.integers(7))]
            target = by_key.get(f"{name}__{other}")
            if target is None:
                continue
            forms = {
                "image alone": [Term("image_id", str(image_id))],
                "text 'a B icon' alone": [Term("text", f"a {other} icon")],
                "the target's true caption": [Term("text", icons.captions_for(name, other)[0])],
                "image - 'a A icon' + 'a B icon'": [
                    Term("image_id", str(image_id)),
                    Term("text", f"a {colour} icon", -1.0),
                    Term("text", f"a {other} icon"),
                ],  # fmt: skip
                "image + 'a B icon'": [Term("image_id", str(image_id)), Term("text", f"a {other} icon")],
            }
            for label, terms in forms.items():
                features = combine(term_features(opened, terms), [t.weight for t in terms])
                hits = [hit["id"] for hit in opened.search_features(features, k=10)[0]]
                recalls.setdefault(label, []).append((hits[:1] == [target], target in hits))
    return {
        label: {"queries": len(values), "r1": float(np.mean([a for a, _ in values])),
                "r10": float(np.mean([b for _, b in values]))}
        for label, values in recalls.items()
    }  # fmt: skip


# ------------------------------------------------------------------------------------------ sync


def measure_sync(args: argparse.Namespace) -> dict:
    from clipdalle import index as index_module
    from clipdalle.index.sync import sync_folder

    found = val_icons(Path(args.data))
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    folder = work / "images"
    folder.mkdir(parents=True)
    for number, (png, captions) in enumerate(zip(found["pngs"], found["captions"])):
        (folder / f"{number:05d}.png").write_bytes(png)
        (folder / f"{number:05d}.txt").write_text("\n".join(captions) + "\n")
    timings = {}
    started = time.perf_counter()
    index_module.build_index(args.clip, folder, work / "index", num_workers=0)
    timings["build"] = time.perf_counter() - started
    started = time.perf_counter()
    sync_folder(work / "index", folder, num_workers=0)
    timings["first sync (hashes every file once)"] = time.perf_counter() - started
    started = time.perf_counter()
    unchanged = sync_folder(work / "index", folder, num_workers=0)
    timings["sync, nothing changed"] = time.perf_counter() - started
    rng = np.random.default_rng(args.seed)
    files = sorted(folder.glob("*.png"))
    chosen = rng.choice(len(files), size=len(files) // 50, replace=False)  # 2 %: half removed, half changed
    for position, file_number in enumerate(chosen.tolist()):
        if position % 2:
            files[file_number].unlink()
        else:
            image = Image.open(files[file_number]).transpose(Image.Transpose.FLIP_TOP_BOTTOM)
            image.save(files[file_number])
    for number in range(len(chosen) // 2):  # and as many new files (copies of other icons, flipped)
        image = Image.open(files[(number * 7) % len(files)]).transpose(Image.Transpose.ROTATE_90)
        image.save(folder / f"new-{number:04d}.png")
    started = time.perf_counter()
    changed = sync_folder(work / "index", folder, num_workers=0)
    timings["sync, 2 % changed or removed and 1 % new"] = time.perf_counter() - started
    return {"files": len(files), "seconds": {k: round(v, 2) for k, v in timings.items()}, "unchanged": unchanged,
            "changed": changed}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("caption", "explain", "duplicates", "colour", "query", "sync"))
    parser.add_argument("--clip", help="CLIP run (the demo's)")
    parser.add_argument("--data", help="the icon dataset folder (val/ shards)")
    parser.add_argument("--index", help="index of the validation icons (the demo's)")
    parser.add_argument("--captioner", default=None, help="caption: also measure this captioner run")
    parser.add_argument("-n", type=int, default=16, help="caption: captioner samples per image")
    parser.add_argument("--seen-every", type=int, default=100, help="caption: every n-th training icon, seen families")
    parser.add_argument("--canvases", type=int, default=500, help="explain: canvases per setting")
    parser.add_argument("--sources", type=int, default=500, help="duplicates: icons copied")
    parser.add_argument("--thresholds", type=float, nargs="+",
                        default=[0.8, 0.85, 0.9, 0.92, 0.94, 0.95, 0.96, 0.97, 0.98, 0.99, 0.995])  # fmt: skip
    parser.add_argument("--pixel-thresholds", type=float, nargs="+",
                        default=[0.3, 0.34, 0.38, 0.4, 0.42, 0.44, 0.46, 0.5, 0.55])  # fmt: skip
    parser.add_argument("--colour-threshold", type=float, default=None,
                        help="duplicates: the pixel method's colour check (1 turns it off)")  # fmt: skip
    parser.add_argument("--queries", type=int, default=500, help="query: queries")
    parser.add_argument("--work", default=None, help="duplicates, sync: a scratch folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="also write the results as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("THREADS", "1")))
    print(f"# {' '.join(sys.argv)}; {machine_line()}", flush=True)
    measure = {"caption": measure_captions, "explain": measure_pointing, "duplicates": measure_duplicates,
               "colour": measure_colour_steps, "query": measure_query, "sync": measure_sync}[args.what]  # fmt: skip
    started = time.perf_counter()
    results = measure(args)
    results["wall_seconds"] = round(time.perf_counter() - started, 1)
    results["machine_at_end"] = machine_line()
    text = json.dumps(results, indent=2, default=str)
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
