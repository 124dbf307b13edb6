"""The demo's HTML report: every section present, images embedded, nothing fetched from elsewhere."""

import json
import sys
from html.parser import HTMLParser

import pytest
import torch

from clipdalle import checkpoint
from clipdalle.data import icons
from clipdalle.demo import report
from clipdalle.transforms import save_image


class PageReader(HTMLParser):
    """What a reader of the page sees: section ids with their titles, image sources, and table rows as text cells."""

    def __init__(self, page: str):
        super().__init__()
        self.sections: dict[str, str] = {}
        self.images: list[str] = []
        self.rows: list[list[str]] = []
        self._section: str | None = None
        self._in_heading = False
        self._cell: list[str] | None = None
        self.feed(page)

    def handle_starttag(self, tag: str, attrs: list) -> None:
        attributes = dict(attrs)
        if tag == "section":
            self._section = attributes.get("id")
        elif tag == "h2" and self._section is not None:
            self._in_heading = True
            self.sections[self._section] = ""
        elif tag == "img":
            self.images.append(attributes.get("src", ""))
        elif tag == "tr":
            self.rows.append([])
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag == "h2":
            self._in_heading = False
        elif tag in ("td", "th") and self._cell is not None:
            self.rows[-1].append("".join(self._cell).strip())
            self._cell = None

    def handle_data(self, data: str) -> None:
        if self._in_heading:
            self.sections[self._section] += data
        if self._cell is not None:
            self._cell.append(data)


METRICS_CSV = "step,split,name,value\n10,train,loss,2.5\n20,train,loss,1.9\n20,val,loss,2.1\n20,train,lr,0.001\n"


@pytest.fixture(scope="module")
def demo_out(evaluated):
    out, _, metrics = evaluated
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
    reader = PageReader(page)
    assert reader.sections == dict(report.SECTIONS)  # every section, in the page, with its title
    assert len(reader.images) == 8  # reconstructions, 3 loss plots, gallery, inpainting, variation, guided
    assert all(source.startswith("data:image/png;base64,") and len(source) > 100 for source in reader.images)
    assert "http://" not in page and "https://" not in page and 'src="/' not in page and "<link" not in page
    assert "missing:" not in page
    metrics = json.loads((demo_out / "eval.json").read_text())
    for row in metrics["quality_bar"]:
        assert row["name"] in page
    assert "FID on CLIP image features" in page and "CLIP R-precision" in page and "recall@5" in page
    assert any(set(icons.PALETTE) <= set(row) for row in reader.rows)  # the confusion matrix has every colour
    misses = [metrics["generation"][split]["colour_fidelity"]["kept_misses"] for split in ("seen", "val")]
    assert sum(map(len, misses)) > 0  # tiny random models keep wrong colours: the table is there to check
    for label, split in (("seen", "seen"), ("validation", "val")):  # each kept sample judged the wrong colour
        for miss in metrics["generation"][split]["colour_fidelity"]["kept_misses"]:
            assert [
                label,
                miss["prompt"],
                f"{miss['right_samples']} of 4",
                miss["judged"],
                miss["core_ink"],
            ] in reader.rows
    assert "heart, home" in page and "2 icon families" in page  # the DALL·E subset
    assert ["DALL·E training", "720.0", "12.0"] in reader.rows  # each stage's seconds and minutes
    assert ["total", "1200.7", "20.0"] in reader.rows
    budget = [row[1:] for row in reader.rows if row and row[0].startswith("from the first training stage")]
    assert budget == [["1170.7", "19.5"]]  # without building the icons: the 25-minute budget
    assert ["torch", torch.__version__] in reader.rows
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
