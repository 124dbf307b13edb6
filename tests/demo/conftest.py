"""Fixtures of the demo's tests: a dozen real icons stand in for all 7,367, and one evaluated demo output with random
tiny models that the evaluation and report tests share (read-only but for the files a test adds)."""

import pytest
from helpers import SEEN_ICONS, VAL_ICONS, make_demo_out

from clipdalle.data import icons
from clipdalle.demo import evaluation as demo_eval


@pytest.fixture(scope="module")
def few_icons():
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(icons, "icon_names", lambda: sorted(SEEN_ICONS + VAL_ICONS))
        yield


@pytest.fixture(scope="session")
def evaluated(tmp_path_factory):
    """(OUT, DATA, metrics) of `evaluate_demo` on SEEN_ICONS + VAL_ICONS with random tiny models: 8 seen prompts and
    12 validation prompts (the validation set has its own count, as in the demo preset), 4 samples each."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(icons, "icon_names", lambda: sorted(SEEN_ICONS + VAL_ICONS))
        out, data = make_demo_out(tmp_path_factory.mktemp("demo"))
        metrics = demo_eval.evaluate_demo(
            out,
            data,
            seen_names=SEEN_ICONS,
            val_names=VAL_ICONS,
            prompts=8,
            val_prompts=12,
            samples=4,
            seed=0,
            progress=False,
        )
    return out, data, metrics
