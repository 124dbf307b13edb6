"""The demo's evaluation: its judges and figures on constructed cases, and evaluate_demo end to end on tiny random
models over a handful of real icons (the icon list is cut to a few names, so the shape judge ranks among them)."""

import json
import math

import numpy as np
import pytest
import torch
from helpers import BOLD_ICONS, SEEN_ICONS, VAL_ICONS

from clipdalle import checkpoint
from clipdalle.data import icons
from clipdalle.demo import evaluation as demo_eval
from clipdalle.tokenizers import CaptionTokenizer
from clipdalle.zero_shot import encode_images, encode_texts

# ------------------------------------------------------------------------------------------ end to end


def test_evaluate_demo_returns_every_figure_in_range(evaluated):
    out, _, metrics = evaluated
    json.dumps(metrics)  # the pipeline writes it to OUT/eval.json as is
    assert metrics["settings"]["prompts_per_set"] == {"seen": 8, "val": 12}
    for split, prompts in (("seen", 8), ("val", 12)):
        figures = metrics["generation"][split]
        assert figures["prompts"] == prompts and figures["samples"] == 4 and figures["truncated_prompts"] == 0
        colour = figures["colour_fidelity"]
        for key in ("per_sample", "best_of_n", "real_icons", "dvae_reconstructions"):
            assert 0 <= colour[key] <= 1, key
        assert colour["real_icons"] == 1.0  # the judge on the real icons of the prompts
        assert set(colour["per_sample_by_colour"]) == set(icons.PALETTE)  # 8+ prompts cycle through all 8 colours
        misses = colour["kept_misses"]  # every kept sample the judge calls wrong, with its ink's core colour
        assert len(misses) == round((1 - colour["best_of_n"]) * figures["prompts"])
        for miss in misses:
            asked = miss["prompt"].split()[1]  # "a red icon of ..."
            assert asked in icons.PALETTE and miss["judged"] != asked and 0 <= miss["right_samples"] < 4
            assert miss["core_ink"] in [*icons.PALETTE, "no ink"]
        shape = figures["shape_rank"]
        assert shape["icons"] == len(SEEN_ICONS + VAL_ICONS)
        for key in ("per_sample", "best_of_n", "oracle_best_of_n", "dvae_reconstructions", "chance"):
            assert 1 <= shape[key]["median"] <= shape["icons"], key
            assert 0 <= shape[key]["within_1"] <= shape[key]["within_10"] <= shape[key]["within_100"] <= 1, key
        assert shape["per_sample"]["count"] == 4 * prompts and shape["best_of_n"]["count"] == prompts
        assert shape["real_icons"]["median"] == 1 and shape["real_icons"]["within_1"] == 1.0
        assert shape["oracle_best_of_n"]["median"] <= shape["best_of_n"]["median"]
        assert figures["r_precision"]["r"] == prompts  # all other prompts of the set compete (fewer than R_PRECISION_R)
        assert 0 <= figures["r_precision"]["kept"] <= 1 and 0 <= figures["r_precision"]["random"] <= 1
        assert figures["clip_score"]["kept_mean"] >= figures["clip_score"]["all_mean"]  # kept = CLIP's best
    zero_shot = metrics["zero_shot"]
    assert zero_shot["images"] == len(VAL_ICONS) * 8 and zero_shot["names"] == len(VAL_ICONS)
    assert np.array(zero_shot["colour_confusion"]).shape == (8, 8)
    assert sum(map(sum, zero_shot["colour_confusion"])) == zero_shot["images"]
    assert 0 <= zero_shot["name_top1"] <= zero_shot["name_top5"] <= 1
    assert zero_shot["chance_top1"] == 1 / 4 and zero_shot["chance_top5"] == 1.0
    retrieval = metrics["retrieval"]
    assert 0 <= retrieval["text_to_image_r1"] <= retrieval["text_to_image_r5"] <= 1
    fid = metrics["fid"]
    assert fid["label"] == "FID on CLIP image features" and fid["real_images"] == len(VAL_ICONS) * 8
    for key in ("generated_kept", "generated_random", "generated_all_samples", "real_prompt_icons"):
        assert math.isfinite(fid[key]) and fid[key] >= 0, key
    assert len(metrics["gallery"]["rows"]) == 8 and all(
        len(row["clip_scores"]) == 4 for row in metrics["gallery"]["rows"]
    )
    examples = metrics["examples"]
    assert len(examples["inpainting"]["clip_scores"]) == demo_eval.EXAMPLE_CANDIDATES
    assert examples["inpainting"]["box"] == [8, 0, 16, 16]
    assert examples["guided"]["steps"] == demo_eval.GUIDE_STEPS and examples["guided"]["seconds"] > 0
    for picture in ("gallery", "inpainting", "variation", "guided"):
        assert (out / "eval" / f"{picture}.png").stat().st_size > 0
    assert {row["name"] for row in metrics["quality_bar"]} >= {
        "CLIP zero-shot colour accuracy, validation icons",
        "Colour fidelity best of 4, seen icons",
        "Reranking helps CLIP R-precision, validation icons",
    }
    assert set(metrics["definitions"]) >= {"colour_fidelity", "shape_rank", "r_precision", "fid", "zero_shot"}
    assert metrics["timings_s"]["total"] > 0


def test_samples_come_back_in_draw_order_with_their_clip_scores(evaluated):
    out, _, _ = evaluated
    from clipdalle import clip
    from clipdalle.sampling import generate

    model = checkpoint.load_model(out / "dalle")
    vae = checkpoint.load_model(out / "dalle" / "vae")
    tokenizer = CaptionTokenizer.load(out / "dalle" / "tokenizer.json")
    bundle = clip.load(out / "clip")
    prompts = ["a red icon of a heart", "a blue icon of a home"]
    sampled = demo_eval.sample_prompts(model, vae, tokenizer, bundle, prompts, 3, seed=7, sampling={})
    assert sampled["images"].shape == (2, 3, 3, 16, 16) and sampled["codes"].shape == (2, 3, 4, 4)
    alone = generate(model, vae, tokenizer, prompts[1], n=1, seed=7 + 1 * 3 + 2)  # prompt 1, draw 2
    assert torch.equal(alone.codes[0], sampled["codes"][1, 2])
    features = encode_images(bundle[0], sampled["images"].flatten(0, 1))  # (6, D)
    prompt_features = encode_texts(bundle[0], bundle[2], prompts)  # (2, D)
    own = (features.view(2, 3, -1) * prompt_features[:, None]).sum(-1)  # (2, 3)
    assert torch.allclose(own, sampled["scores"], atol=1e-5)
    assert torch.equal(sampled["kept"], sampled["scores"].argmax(1))  # no shortlist: CLIP's best
    # With a shortlist the evaluation judges the very sample generate() keeps with keep=1 and the same settings.
    changed = False
    for shortlist in (2, 3):
        listed = demo_eval.sample_prompts(
            model, vae, tokenizer, bundle, prompts, 6, seed=7, sampling={"shortlist": shortlist}
        )
        kept = generate(model, vae, tokenizer, prompts, n=6, keep=1, clip=bundle, seed=7, shortlist=shortlist)
        assert listed["kept"].tolist() == [seed - 7 - 6 * prompt for prompt, seed in enumerate(kept.seeds)]
        changed |= not torch.equal(listed["kept"], listed["scores"].argmax(1))
    assert changed, "no shortlist moved the kept sample here; the check above would pass without it"


def test_evaluate_demo_names_a_missing_run(few_icons, tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "info.json").write_text(json.dumps({"size": 16, "colours": list(icons.PALETTE)}))
    with pytest.raises(ValueError, match=r"out/dalle is not a finished run"):
        demo_eval.evaluate_demo(tmp_path / "out", tmp_path / "data", seen_names=SEEN_ICONS, val_names=VAL_ICONS)
    with pytest.raises(ValueError, match=r"at least 2 prompts per set .* got prompts=1"):
        demo_eval.evaluate_demo(tmp_path, tmp_path / "data", seen_names=SEEN_ICONS, val_names=VAL_ICONS, prompts=1)
    with pytest.raises(ValueError, match=r"at least 2 prompts per set .* val_prompts=1"):
        demo_eval.evaluate_demo(tmp_path, tmp_path / "data", seen_names=SEEN_ICONS, val_names=VAL_ICONS, val_prompts=1)


# ------------------------------------------------------------------------------------------ judges


def test_judges_are_right_on_the_real_icons(few_icons):
    colours = list(icons.PALETTE)
    judge = demo_eval.IconJudge(32, colours)
    names = [name for name in BOLD_ICONS for _ in colours]
    colour_indices = [index for _ in BOLD_ICONS for index in range(len(colours))]
    real = judge.real_icons(names, colour_indices)
    assert demo_eval.colour_hits(real, colour_indices).all()  # colour fidelity 100 % on the true images
    assert (judge.shape_ranks(real, names, colour_indices) == 1).all()  # each true icon is its own rank 1
    wrong = BOLD_ICONS[1:] + BOLD_ICONS[:1]
    assert (judge.shape_ranks(real[:: len(colours)], wrong, [0] * len(wrong)) > 1).all()
    # the table lookup gives exactly the judge's own foreground masks of the rendered icons
    for colour_index in (2, 7):
        everything = judge.real_icons(judge.names, [colour_index] * len(judge.names))
        assert torch.equal(judge.references(colour_index), icons.foreground_mask(everything))


def test_named_icon_rank_counts_only_strictly_better_icons():
    iou = torch.tensor([[0.9, 0.5, 0.9, 0.1], [0.2, 0.8, 0.3, 0.7], [0.2, 0.8, 0.3, 0.7]])
    ranks = demo_eval.named_icon_ranks(iou, torch.tensor([0, 0, 3]))
    assert ranks.tolist() == [1, 4, 2]  # a tie with an identical glyph keeps rank 1
    summary = demo_eval.rank_summary(torch.tensor([1, 3, 20, 500, 2]))
    assert summary == {"median": 3.0, "count": 5, "within_1": 0.2, "within_10": 0.6, "within_100": 0.8}


def test_prompt_set_is_seeded_and_cycles_colours():
    colours = list(icons.PALETTE)
    first = demo_eval.prompt_set(SEEN_ICONS, 8, 3, colours)
    assert first == demo_eval.prompt_set(list(reversed(SEEN_ICONS)), 8, 3, colours)  # order of the input is irrelevant
    assert [colour for _, colour in first] == colours and len({name for name, _ in first}) == 8
    assert first != demo_eval.prompt_set(SEEN_ICONS, 8, 4, colours)
    long = demo_eval.prompt_set(SEEN_ICONS[:3], 7, 0, colours)
    assert len(long) == 7 and {name for name, _ in long} == set(SEEN_ICONS[:3])
    # more prompts than icons: no (icon, colour) pair twice until every icon has met every colour
    for names, count in ((SEEN_ICONS[:3], 24), (SEEN_ICONS[:5], 37), (SEEN_ICONS, 100)):
        pairs = demo_eval.prompt_set(names, count, 1, colours)
        assert len(pairs) == count and len(set(pairs)) == min(count, len(names) * len(colours))
    every = demo_eval.prompt_set(SEEN_ICONS[:3], 26, 2, colours)  # all 24 pairs, then the next pass begins
    assert set(every[:24]) == {(name, colour) for name in SEEN_ICONS[:3] for colour in colours}
    with pytest.raises(ValueError, match="no icon names"):
        demo_eval.prompt_set([], 4, 0, colours)


# ------------------------------------------------------------------------------------------ figures


def test_r_precision_on_a_constructed_case():
    # 4 images x 5 prompts: images 0 and 2 score their own prompt highest, 1 and 3 lowest, so the result does not
    # depend on which others are drawn
    similarity = torch.tensor(
        [
            [0.9, 0.1, 0.2, 0.3, 0.4],
            [0.5, 0.0, 0.6, 0.7, 0.8],
            [0.1, 0.2, 0.9, 0.3, 0.4],
            [0.5, 0.6, 0.7, 0.0, 0.8],
        ]
    )
    truth = torch.tensor([0, 1, 2, 3])
    for r in (2, 3, 100):
        assert demo_eval.r_precision(similarity, truth, r, seed=1) == 0.5
    # image 0 beats prompt 4 only: with R = 2 it wins when prompt 4 is not its one rival (3 of 4 draws)
    second = torch.tensor([[0.5, 0.1, 0.2, 0.3, 0.9]])
    hits = [demo_eval.r_precision(second, torch.tensor([0]), 2, seed=seed) for seed in range(200)]
    assert 0.6 < sum(hits) / len(hits) < 0.9
    assert demo_eval.r_precision(second, torch.tensor([0]), 100) == 0.0  # all others compete: prompt 4 wins
    with pytest.raises(ValueError, match="at least 2"):
        demo_eval.r_precision(similarity, truth, 1)


def test_frechet_distance():
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(300, 6, generator=generator, dtype=torch.float64)
    assert abs(demo_eval.frechet_distance(features, features)) < 1e-9
    shift = torch.tensor([1.0, -2.0, 0.5, 0.0, 0.0, 3.0], dtype=torch.float64)
    assert demo_eval.frechet_distance(features, features + shift) == pytest.approx(
        float(shift.square().sum()), rel=1e-9
    )
    # uncorrelated axes: the distance has the closed form sum (sd_a - sd_b)^2 + |mean_a - mean_b|^2. Orthonormal
    # columns orthogonal to the all-ones vector have zero means and zero covariances exactly.
    basis = torch.randn(300, 7, generator=generator, dtype=torch.float64)
    basis[:, 0] = 1.0
    whitened = torch.linalg.qr(basis)[0][:, 1:] * math.sqrt(299)  # (300, 6), unit sample variances
    scales = torch.tensor([1.0, 2.0, 3.0, 1.0, 1.0, 0.5], dtype=torch.float64)
    expected = float((scales - 1).square().sum()) + 6 * 1.0**2
    assert demo_eval.frechet_distance(whitened, whitened * scales + 1.0) == pytest.approx(expected, rel=1e-9)
    scaled = features * scales
    linalg = pytest.importorskip("scipy.linalg")
    a, b = features.double().numpy(), scaled.double().numpy() + 0.3
    cov_a, cov_b = np.cov(a.T), np.cov(b.T)
    reference = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(cov_a + cov_b - 2 * linalg.sqrtm(cov_a @ cov_b).real)
    assert demo_eval.frechet_distance(features, scaled + 0.3) == pytest.approx(reference, rel=1e-6)
    with pytest.raises(ValueError, match=r"\(N, D\) and \(M, D\)"):
        demo_eval.frechet_distance(features, features[:, :3])


def test_confusion_matrix_and_top_k():
    confusion = demo_eval.confusion_matrix(torch.tensor([0, 0, 1, 2, 2]), torch.tensor([0, 1, 1, 2, 0]), 3)
    assert confusion.tolist() == [[1, 1, 0], [0, 1, 0], [1, 0, 1]]
    scores = torch.tensor([[0.1, 0.9, 0.5], [0.3, 0.2, 0.1], [0.0, 0.1, 0.2]])
    truth = torch.tensor([2, 0, 0])
    assert demo_eval.top_k_accuracy(scores, truth, 1) == pytest.approx(1 / 3)
    assert demo_eval.top_k_accuracy(scores, truth, 2) == pytest.approx(2 / 3)
    assert demo_eval.top_k_accuracy(scores, truth, 5) == 1.0


def test_quality_bar_judges_each_target_by_its_interval(evaluated):
    _, _, metrics = evaluated
    metrics = json.loads(json.dumps(metrics))
    seen = metrics["generation"]["seen"]
    seen["colour_fidelity"].update(per_sample=0.96, best_of_n=0.99)
    seen["shape_rank"]["best_of_n"]["median"] = 100.0
    seen["shape_rank"]["per_sample"]["median"] = 900.0
    seen["r_precision"].update(kept=0.55, random=0.5)
    seen["intervals"].update(
        colour_per_sample=[0.955, 0.965],
        colour_best_of_n=[0.975, 0.995],  # the point (99 %) clears 98 %, the interval does not
        shape_median_best_of_n=[60.0, 100.0],
        shape_median_gain=[700.0, 900.0],
        r_precision_gain=[-0.01, 0.11],
    )
    metrics["zero_shot"]["colour_accuracy"] = 0.979
    rows = {row["name"]: row for row in demo_eval.quality_bar(metrics, {"colour_accuracy": 0.99}, "demo")}
    assert rows["CLIP zero-shot colour accuracy, validation icons"]["pass"] is False
    assert rows["dVAE reconstructions of validation icons, right colour"]["pass"] is True
    assert rows["Colour fidelity per sample, seen icons"]["pass"] is True
    assert rows["Colour fidelity best of 4, seen icons"]["pass"] is False
    assert "95 % CI 97.5–99.5" in rows["Colour fidelity best of 4, seen icons"]["measured"]
    assert rows["Shape: median rank of the named icon, best of 4, seen icons"]["pass"] is True  # <= 100
    assert rows["Shape: median rank of the named icon, best of 4, validation icons"]["pass"] is None  # reported
    assert rows["Reranking helps shape, seen icons"]["pass"] is True
    assert rows["Reranking helps CLIP R-precision, seen icons"]["pass"] is False  # the interval reaches below 0
    small = {row["name"]: row for row in demo_eval.quality_bar(metrics, None, "small")}
    assert small["Shape: median rank of the named icon, best of 4, seen icons"]["pass"] is False  # <= 20
    assert small["dVAE reconstructions of validation icons, right colour"]["pass"] is None
    at_floor = seen["shape_rank"]
    at_floor["best_of_n"].update(median=1.0, within_1=0.9, within_10=0.97)
    at_floor["per_sample"].update(median=1.0, within_1=0.8, within_10=0.91)
    seen["intervals"]["shape_within_1_gain"] = [0.05, 0.15]
    rows = {row["name"]: row for row in demo_eval.quality_bar(metrics, None, "demo")}
    assert rows["Reranking helps shape, seen icons"]["pass"] is True  # medians tie at 1: more at rank 1
    seen["intervals"]["shape_within_1_gain"] = [-0.02, 0.1]
    rows = {row["name"]: row for row in demo_eval.quality_bar(metrics, None, "demo")}
    assert rows["Reranking helps shape, seen icons"]["pass"] is False  # a gain the prompts do not support


def test_intervals_are_paired_bootstraps_over_prompts():
    P, n = 200, 4
    hits = torch.zeros(P, n, dtype=torch.bool)
    hits[:, 0] = True  # the first sample of every prompt has the right colour, the others not
    ranks = torch.full((P, n), 50)
    ranks[:, 0] = 1
    kept = torch.zeros(P, dtype=torch.long)  # the reranker keeps the good one
    intervals = demo_eval.set_intervals(hits, ranks, kept, torch.ones(P, dtype=torch.bool), hits, seed=0)
    assert intervals["colour_per_sample"] == [0.25, 0.25] and intervals["colour_best_of_n"] == [1.0, 1.0]
    assert intervals["colour_gain"] == [0.75, 0.75] and intervals["shape_median_best_of_n"] == [1.0, 1.0]
    noisy = torch.rand(P, generator=torch.Generator().manual_seed(0)) < 0.5
    low, high = demo_eval.bootstrap_interval(lambda rows: noisy.double()[rows].mean(1), P, seed=0)
    assert low < float(noisy.double().mean()) < high and 0.05 < high - low < 0.2  # about +-1.96 sqrt(p q / P)
