"""The planner's choices for several data shapes, budgets and machines (a fixed machine: no probe is run)."""

import pytest

from clipdalle.demo import plan
from clipdalle.demo.plan import Machine, make_plan, parse_budget

QUIET_2_CORES = Machine("cpu", 2, probe_one=60.0, probe_all=110.0)  # both cores free: stages alone use both
BUSY_2_CORES = Machine("cpu", 2, probe_one=60.0, probe_all=5.0)  # another job on the cores: one thread is faster


def report(train=2650, val=150, side=32, p99_tokens=14, kind="folder"):
    """A data report as demo/inspection.py writes it, with only what the planner reads."""
    return {
        "data": "/photos",
        "kind": kind,
        "sizes": {"short_side": {"median": side}},
        "captions": {"tokens": {"p99": p99_tokens}},
        "split": {"train": train, "val": val, "val_fraction": val / (train + val)},
    }


def rungs(spec):
    """(dVAE n_hidden, CLIP width or None, DALL·E n_embd) of a plan."""
    clip = spec["clip"].get("model", {}).get("vision_n_embd")
    return spec["vae"]["model"]["n_hidden"], clip, spec["dalle"]["model"]["n_embd"]


def test_budgets_parse_and_bad_ones_are_one_line_errors():
    assert parse_budget("25m") == 1500 and parse_budget("2h") == 7200 and parse_budget("1h30m") == 5400
    assert parse_budget("90s") == 90 and parse_budget("600") == 600
    for text in ("soon", "25 minutes", "10s", "2h5"):
        with pytest.raises(ValueError, match="--budget"):
            parse_budget(text)


def test_a_longer_budget_gets_larger_models_and_more_time():
    short = make_plan(report(), budget_s=1500, machine=BUSY_2_CORES)
    long = make_plan(report(), budget_s=7200, machine=BUSY_2_CORES)
    assert all(a <= b for a, b in zip(rungs(short), rungs(long))) and rungs(short) != rungs(long)
    for spec, budget in ((short, 1500), (long, 7200)):
        expected = sum(spec["expected_s"].values())
        assert 0.8 * budget <= expected <= plan.BUDGET_MARGIN * budget + 1  # the budget is used, and kept
        for kind in ("vae", "clip", "dalle"):
            train = spec[kind]["train"]
            assert train["steps"] >= plan.MIN_STEPS[kind]  # enough time for the minimum at the chosen rung
            assert train["max_seconds"] <= 1.1 * spec["expected_s"]["DALL·E training"] + 1 or kind != "dalle"
            assert train["eval_every"] == max(10, train["steps"] // plan.EVALUATIONS)
    assert short["images"] == {"size": 32, "grid": 8} and long["text_length"] == 24  # 14 tokens + 4 for templates


def test_big_images_train_at_64_px_only_when_the_dvae_gets_its_steps():
    pictures = report(train=1150, val=120, side=64)
    short = make_plan(pictures, budget_s=1500, machine=BUSY_2_CORES)
    long = make_plan(pictures, budget_s=8 * 3600, machine=BUSY_2_CORES)
    assert short["images"]["size"] == 32 and long["images"]["size"] == 64
    assert long["vae"]["model"]["n_downsample"] == 3  # 64 px to the same 8 x 8 grid
    assert "the largest at which the dVAE gets" in " ".join(short["choices"])
    small_images = make_plan(report(side=24), budget_s=8 * 3600, machine=BUSY_2_CORES)
    assert small_images["images"]["size"] == 32  # never below 32 px, never above the images


def test_free_cores_run_dalle_on_all_of_them_and_a_busy_machine_on_one():
    quiet = make_plan(report(), budget_s=1500, machine=QUIET_2_CORES)
    busy = make_plan(report(), budget_s=1500, machine=BUSY_2_CORES)
    assert quiet["threads"] == {"pair": 1, "alone": 2} and busy["threads"] == {"pair": 1, "alone": 1}
    compute = {
        name: spec["dalle"]["train"]["steps"] * plan.flops_of("dalle", plan.plan_configs(spec)["dalle"][0])
        for name, spec in (("quiet", quiet), ("busy", busy))
    }
    assert compute["quiet"] > 1.3 * compute["busy"]  # two free cores: more DALL·E training in the same time
    assert "more threads would be slower" in " ".join(busy["choices"])


def test_small_collections_cap_batches_and_the_split_sets_evaluation_sizes():
    tiny = make_plan(report(train=160, val=24), budget_s=600, machine=BUSY_2_CORES)
    assert tiny["vae"]["train"]["batch_size"] == 20 and tiny["dalle"]["train"]["batch_size"] == 20  # 160 / 8
    assert tiny["eval"]["prompts"] == 24 and tiny["eval"]["samples"] == plan.EVAL_SAMPLES


def test_an_existing_clip_trains_the_dvae_alone_and_plain_leaves_out_the_regularisation():
    with_clip = make_plan(report(), budget_s=1500, machine=BUSY_2_CORES, clip="runs/clip")
    assert with_clip["clip"] == {"existing": "runs/clip"}
    regular = make_plan(report(), budget_s=1500, machine=BUSY_2_CORES)
    plain = make_plan(report(), budget_s=1500, machine=BUSY_2_CORES, regularise=False)
    assert regular["weights"] == "best" and plain["weights"] == "last"
    assert regular["dalle"]["train"]["code_views"] == 4 and plain["dalle"]["train"].get("code_views", 1) == 1
    assert regular["dalle"]["model"]["dropout"] == plan.DALLE_DROPOUT and plain["dalle"]["model"]["dropout"] == 0
    assert regular["clip"]["train"]["early_stop"] == plan.PATIENCE and plain["clip"]["train"]["early_stop"] == 0
    assert plain["clip"]["train"]["keep_best"] is False and plain["text_length"] == 16  # no room for templates
    configs = plan.plan_configs(regular)
    assert set(configs) == {"vae", "clip", "dalle"} and configs["dalle"][0].grid_size == configs["vae"][0].grid_size


def test_a_plan_prints_its_choices_models_and_expected_times():
    text = plan.format_plan(make_plan(report(), budget_s=1500, machine=BUSY_2_CORES))
    assert "image size 32 px" in text and "DALL·E:" in text and "expected:" in text and "of 25.0 min" in text
    with pytest.raises(ValueError, match="unknown section"):
        plan.plan_configs({**make_plan(report(), budget_s=1500, machine=BUSY_2_CORES), "icons": {}}, "p")
