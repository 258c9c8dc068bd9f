"""What a calibration shows without Qt: the FWHM map, the colour of each reason, and the figure and JSON of a
calibration that failed but saw its beads."""

from __future__ import annotations

import json

import numpy as np
import pytest

from napari_coordgate.calibration import CalibrationError
from napari_coordgate.calibration.detect import REASONS, BeadTable, find_beads
from napari_coordgate.calibration.report import REASON_COLOURS, bead_fwhm_map, reason_colour, write_failure_png
from napari_coordgate.calibration.result import failure_dict, failure_json
from napari_coordgate.samples.beads import EllipticalOptics, bead_slide

OPTICS = EllipticalOptics(width=1.3, radial=0.8, tangential=0.2, beta=None, twist=0.3, psf_size=19)


@pytest.fixture(scope="module")
def failed():
    """A sparse slide's spots (a few beads and hot pixels) in the error a failed calibration raises."""
    image, _ = bead_slide(OPTICS, (128, 128), n_beads=4, photons=3000, n_saturated=1, hot_fraction=1e-3, seed=1)
    table, _, _ = find_beads(image.astype(np.uint16))
    table.holdout[0] = True
    return image, CalibrationError("the measured grid needs at least 5 usable beads, found 2", beads=table,
                                   field_shape=image.shape)


def _table(y, x, fwhm, reason):
    n = len(y)
    return BeadTable(image=np.zeros(n, int), y=np.array(y, float), x=np.array(x, float), y_norm=np.zeros(n),
                     x_norm=np.zeros(n), peak=np.ones(n), background=np.zeros(n), snr=np.ones(n),
                     fwhm_x=np.array(fwhm, float), fwhm_y=np.array(fwhm, float), ellipticity=np.zeros(n),
                     orientation_deg=np.zeros(n), reason=np.array(reason, dtype=object),
                     detail=np.full(n, "", dtype=object), held_out=np.zeros(n, bool), holdout=np.zeros(n, bool),
                     residual=np.full(n, np.nan))


def test_the_fwhm_map_is_the_median_accepted_bead_fwhm_per_block_and_nan_without_beads():
    table = _table([5, 10, 20, 40, 40], [5, 12, 35, 40, 41], [2.0, 4.0, 9.0, 3.0, 100.0],
                   ["", "", "", "", "too large"])
    fwhm = bead_fwhm_map(table, (64, 48), block=32)
    assert fwhm.shape == (64, 48) and fwhm.dtype == np.float32
    assert fwhm[0, 0] == 3.0 and fwhm[31, 31] == 3.0, "median of the two beads of the first block"
    assert fwhm[0, 32] == 9.0 and fwhm[63, 40] == 3.0, "the rejected bead does not count"
    assert np.isnan(fwhm[40, 0]), "no bead in that block"


def test_every_reason_has_its_own_colour():
    assert set(REASONS) | {"accepted"} <= set(REASON_COLOURS)
    assert len(set(REASON_COLOURS.values())) == len(REASON_COLOURS)
    assert reason_colour("") == REASON_COLOURS["accepted"] and reason_colour("smudged") not in REASON_COLOURS.values()


def test_a_failed_calibrations_json_has_the_error_counts_advice_and_every_spot(failed):
    _, error = failed
    report = json.loads(failure_json(error, {"model": "grid"}))
    assert report["failed"] is True and report["error"] == str(error) and report["settings"] == {"model": "grid"}
    assert report["counts"] == error.beads.counts() and report["field_shape"] == [128, 128]
    assert len(report["advice"]) == len([k for k in error.beads.counts() if k != "accepted"])
    assert len(report["beads"]["reason"]) == len(error.beads) and report["beads"]["holdout"][0] is True


def test_a_failure_without_a_table_has_only_the_message():
    assert failure_dict(CalibrationError("no bead image given")) == {
        "failed": True, "error": "no bead image given", "settings": {}, "field_shape": None}


def test_the_failure_figure_shows_every_class_of_spot_in_its_colour(failed, tmp_path):
    from matplotlib.image import imread

    image, error = failed
    path = write_failure_png(error, image, tmp_path / "failed.png")
    rgb = imread(path)[..., :3]
    for key in error.beads.counts():
        want = np.array([int(reason_colour(key)[i:i + 2], 16) / 255 for i in (1, 3, 5)])
        assert (np.abs(rgb - want).max(axis=-1) < 0.12).any(), f"{key} is drawn in its colour"
    with pytest.raises(ValueError, match="nothing to draw"):
        write_failure_png(CalibrationError("x"), image, tmp_path / "none.png")
