"""The main job's pipeline on a handful of icons: stages run, outputs are complete, a re-run skips them."""

import json

from clipdalle import pipeline
from clipdalle.data import icons


def test_pipeline_runs_then_skips_finished_stages(tmp_path, monkeypatch, capsys):
    names = icons.icon_names()
    subset = [n for n in names if icons.split_of(n) == "val"][:3] + [n for n in names if icons.split_of(n) == "train"][
        :9
    ]
    monkeypatch.setattr(icons, "icon_names", lambda: sorted(subset))
    preset = tmp_path / "preset.json"
    preset.write_text(
        json.dumps({"icons": {"size": 16, "colours": 2}, "vae": {"preset": "tiny", "train": {"steps": 4}}})
    )
    summary_path = pipeline.run_pipeline(str(preset), tmp_path / "out", data_dir=tmp_path / "data")
    summary = json.loads(summary_path.read_text())
    assert summary["vae"]["images"] == 6  # 3 validation icons x 2 colours
    assert 0 <= summary["vae"]["colour_accuracy"] <= 1 and summary["vae"]["psnr"] > 0
    assert set(summary["timings_s"]) == {"icon dataset", "dVAE training", "dVAE evaluation"}
    assert (tmp_path / "out" / "vae" / "reconstructions.png").exists()
    capsys.readouterr()
    pipeline.run_pipeline(str(preset), tmp_path / "out", data_dir=tmp_path / "data")
    assert capsys.readouterr().err.count("complete, skipped") == 3
