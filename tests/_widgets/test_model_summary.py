"""The Model tab's summary says what a model was trained on (plain function; no viewer)."""

from __future__ import annotations

import pytest

from napari_coordgate._widgets._model_tab import model_summary
from napari_coordgate.config import ModelConfig
from napari_coordgate.model_io import SavedModel
from napari_coordgate.optics.psf import PRESETS


def _trained_on(source: str | None, psf: bool, prefilter: str = "none") -> str:
    training = {} if source is None else {"training": {"source": source}}
    saved = SavedModel(model=None, config=ModelConfig(depth=1, channels=2, prefilter=prefilter), field_shape=(64, 64),
                       psf=PRESETS["gaussian"].to_dict() if psf else None, provenance=training)
    return dict(model_summary(saved, "test"))["trained on"]


def test_pairs_with_a_wiener_first_stage_are_reported_as_calibration_pairs():
    assert _trained_on("calibration", psf=True, prefilter="wiener") == (
        "calibration pairs (Wiener first stage from PSF model 'gaussian')")


@pytest.mark.parametrize("source, psf, prefilter, expected", [
    ("psf", True, "none", "PSF model 'gaussian'"),
    ("psf", True, "wiener", "PSF model 'gaussian'"),
    (None, True, "none", "PSF model 'gaussian'"),  # files from before provenance named the source
    ("calibration", False, "none", "calibration pairs"),
    ("calibration", True, "none", "calibration pairs (optics: PSF model 'gaussian')"),
])
def test_the_training_source_decides_what_the_summary_says(source, psf, prefilter, expected):
    assert _trained_on(source, psf, prefilter) == expected


def test_the_psf_model_row_describes_any_psf_model_and_where_it_came_from(fake_psf):
    prov = {"source": ["/data/beads_01.tif", "/data/beads_02.tif"], "bead_count": 212, "fit_residual": 0.0312}
    saved = SavedModel(model=None, config=ModelConfig(depth=1, channels=2), field_shape=(64, 64),
                       psf=fake_psf.with_provenance(prov), provenance={"training": {"source": "psf"}, "psf": prov})

    rows = dict(model_summary(saved, "test"))

    assert rows["trained on"] == "PSF model 'fake beads'"
    assert rows["PSF model"] == (f"{fake_psf.describe()}; from beads_01.tif, beads_02.tif, 212 beads, "
                                 "fit residual 0.0312")
    assert dict(model_summary(SavedModel(None, ModelConfig(depth=1, channels=2), (8, 8)), "x"))["PSF model"] == "none"
    assert dict(model_summary(SavedModel(None, ModelConfig(depth=1, channels=2), (8, 8), psf="gaussian"), "x"))[
        "PSF model"] == PRESETS["gaussian"].describe()


def test_the_summary_says_how_the_model_reads_intensities():
    cfg = ModelConfig(depth=1, channels=2)
    per_image = SavedModel(None, cfg, (8, 8), {"offset": 0.0, "scale": 1.0, "percentiles": [0.1, 99.9]})
    fixed = SavedModel(None, cfg, (8, 8), {"offset": 100.0, "scale": 4000.0})
    assert dict(model_summary(per_image, "x"))["intensity"].startswith("per image (0.1-99.9 percentiles)")
    assert dict(model_summary(fixed, "x"))["intensity"] == ("fixed (offset 100, scale 4000): give images in the "
                                                             "training units")
