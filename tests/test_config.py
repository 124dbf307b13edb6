import argparse
import json

import pytest

from clipdalle.config import (
    TrainConfig,
    add_config_flags,
    available_presets,
    build_config,
    flags_for,
    from_dict,
    load_preset,
    replace,
    to_dict,
)


def test_json_round_trip():
    config = TrainConfig(steps=7, lr=1e-3, dtype="bf16")
    assert from_dict(TrainConfig, json.loads(json.dumps(to_dict(config)))) == config


def test_ints_are_accepted_for_floats():
    assert from_dict(TrainConfig, {"lr": 1}).lr == 1.0


def test_unknown_field_lists_valid_fields():
    with pytest.raises(ValueError, match=r"unknown TrainConfig field\(s\) stepz; valid fields: steps, batch_size"):
        from_dict(TrainConfig, {"stepz": 3})


def test_wrong_type_names_the_field():
    with pytest.raises(ValueError, match="steps: expected int"):
        from_dict(TrainConfig, {"steps": "many"})
    with pytest.raises(ValueError, match="lr"):
        replace(TrainConfig(), lr="fast")


def test_flags_override_presets_and_only_given_flags_count():
    parser = argparse.ArgumentParser()
    add_config_flags(parser, TrainConfig)
    args = parser.parse_args(["--batch-size", "8", "--lr", "0.01"])
    given = flags_for(TrainConfig, args)
    assert given == {"batch_size": 8, "lr": 0.01}
    config = build_config(TrainConfig, {"batch_size": 32, "steps": 5}, given)
    assert (config.batch_size, config.steps, config.lr) == (8, 5, 0.01)


def test_flag_help_comes_from_field_comment():
    parser = argparse.ArgumentParser()
    add_config_flags(parser, TrainConfig)
    assert "peak learning rate" in parser.format_help()


def test_every_preset_builds_the_configs_it_names():
    from clipdalle.demo.icon_collection import pipeline_configs
    from clipdalle.models import CaptionerConfig, CLIPConfig, DALLEConfig, DVAEConfig

    model_configs = {"vae": DVAEConfig, "clip": CLIPConfig, "dalle": DALLEConfig, "captioner": CaptionerConfig}
    names = available_presets()
    assert {"demo", "small", "ml6", "vae-tiny", "clip-tiny", "dalle-tiny"} <= set(names)
    for name in names:
        preset = load_preset(name)
        kind = name.split("-")[0]
        if kind in model_configs:  # a model preset: {"model": ..., "train": ...}, every field known and well typed
            assert set(preset) <= {"description", "model", "train"}, name
            build_config(model_configs[kind], preset.get("model", {}), source=name)
            build_config(TrainConfig, preset.get("train", {}), source=name)
        else:  # a pipeline preset composing three model presets that fit together
            configs = pipeline_configs(preset, name)
            assert set(configs) == {"vae", "clip", "dalle"}, name


def test_missing_preset_lists_available():
    with pytest.raises(ValueError, match="not found; available presets"):
        load_preset("no-such-preset")
