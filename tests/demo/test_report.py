"""The demo's HTML report: every section present, images embedded, nothing fetched from elsewhere."""

import json
import re
import sys

import pytest
import torch
from test_demo_eval import SEEN_ICONS, VAL_ICONS, make_demo_out

from clipdalle import checkpoint
from clipdalle.data import icons
from clipdalle.demo import evaluation as demo_eval
from clipdalle.demo import report
from clipdalle.transforms import save_image

METRICS_CSV = "step,split,name,value\n10,train,loss,2.5\n20,train,loss,1.9\n20,val,loss,2.1\n20,train,lr,0.001\n"


@pytest.fixture(scope="module")
def demo_out(tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(icons, "icon_names", lambda: sorted(SEEN_ICONS + VAL_ICONS))
        out, data = make_demo_out(tmp_path_factory.mktemp("report"))
        metrics = demo_eval.evaluate_demo(
            out, data, seen_names=SEEN_ICONS, val_names=VAL_ICONS, prompts=8, samples=4, progress=False
        )
    checkpoint.write_json(out / "eval.json", metrics)
    timings = {"icon dataset": 30.0, "dVAE training": 300.5, "DALL·E training": 720.0, "evaluation": 150.2}
    checkpoint.write_json(out / "timings.json", timings)
    checkpoint.write_json(out / "summary.json", {"preset": "demo", "timings_s": timings, "vae": {"psnr": 26.2}})
    checkpoint.write_json(out / "dalle" / "subset.json", {"families": ["heart", "home"], "names": ["heart", "home"]})
    for folder in ("vae", "clip", "dalle"):
        (out / folder / "metrics.csv").write_text(METRICS_CSV)
    save_image(torch.rand(3, 20, 30), out / "vae" / "loss.png")  # the vae's plot is embedded, the others redrawn
    save_image(torch.rand(4, 3, 16, 16), out / "vae" / "reconstructions.png")
    return out


def test_report_has_every_section_with_embedded_images(demo_out):
    path = report.write_report(demo_out)
    assert path == demo_out / "report.html"
    page = path.read_text(encoding="utf-8")
    for anchor, title in report.SECTIONS:
        assert f'<section id="{anchor}"><h2>{title}</h2>' in page, anchor
    sources = re.findall(r'<img src="([^"]*)"', page)
    assert len(sources) == 8  # reconstructions, 3 loss plots, gallery, inpainting, variation, guided
    assert all(source.startswith("data:image/png;base64,") and len(source) > 100 for source in sources)
    assert "http://" not in page and "https://" not in page and 'src="/' not in page and "<link" not in page
    assert "missing:" not in page
    metrics = json.loads((demo_out / "eval.json").read_text())
    for row in metrics["quality_bar"]:
        assert row["name"] in page
    assert "FID on CLIP image features" in page and "CLIP R-precision" in page and "recall@5" in page
    assert page.count("<th>purple</th>") == 2  # the confusion matrix header and the colour-by-colour table
    assert "heart, home" in page and "2 icon families" in page  # the DALL·E subset
    assert "<td>DALL·E training</td><td>720.0</td>" in page and "<td>1200.7</td>" in page  # stages and total
    assert "<td>1170.7</td><td>19.5</td>" in page  # without building the icons: the 25-minute budget
    assert f"<td>torch</td><td>{torch.__version__}</td>" in page
    assert "dVAE: " in page and str(demo_out / "dalle" / "config.json") in page


def test_report_names_what_is_missing(tmp_path):
    page = report.write_report(tmp_path).read_text()
    assert page.count("missing:") >= 6 and "no evaluation yet" in page
    assert "every training icon" in page  # no subset.json: DALL·E saw all training icons


def test_loss_plot_falls_back_to_pil(tmp_path, monkeypatch):
    path = tmp_path / "metrics.csv"
    path.write_text(METRICS_CSV)
    series = report.read_metrics(path)
    assert series["loss"]["val"] == ([20], [2.1])
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    png = report.plot_losses(series, "DALL·E")
    assert png.startswith(b"\x89PNG")
    assert report.plot_losses({}, "empty") is None
