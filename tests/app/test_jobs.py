"""The Calibrate tab's job: the calibration runs in a separate process, which also draws the PSF grid and the FWHM
map; a failure with its bead table comes back whole, as the outcome's error."""

from __future__ import annotations

import numpy as np
import pytest

from napari_coordgate.app.jobs import calibrate_job
from napari_coordgate.calibration import CalibrationError
from napari_coordgate.calibration.calibrate import calibrate
from napari_coordgate.calibration.report import bead_fwhm_map
from napari_coordgate.config import CalibrateConfig
from napari_coordgate.samples.beads import EllipticalOptics, bead_slide

OPTICS = EllipticalOptics(width=1.3, radial=0.8, tangential=0.2, beta=None, twist=0.3, psf_size=19)
GRID = CalibrateConfig(model="grid", device="cpu")


def _run(image, cfg=GRID):
    updates = []
    outcome = calibrate_job(image, cfg, ["beads.tif"], report=updates.append, should_stop=lambda: False)
    return outcome, updates


def test_a_failed_calibrations_bead_table_crosses_the_process_boundary_whole():
    image, _ = bead_slide(OPTICS, (128, 128), n_beads=4, photons=3000, hot_fraction=1e-3, seed=1)
    image = image.astype(np.uint16)
    with pytest.raises(CalibrationError) as here:
        calibrate(image, **GRID.calibrate_kwargs())
    outcome, _ = _run(image)
    error = outcome.error
    assert isinstance(error, CalibrationError) and str(error) == str(here.value) and outcome.result is None
    assert error.field_shape == (128, 128) and error.beads.counts() == here.value.beads.counts()
    for column in ("y", "x", "fwhm_x", "snr"):
        np.testing.assert_array_equal(getattr(error.beads, column), getattr(here.value.beads, column))
    assert list(error.beads.reason) == list(here.value.beads.reason)


def test_a_failure_without_a_table_is_raised():
    with pytest.raises(CalibrationError, match="constant"):
        _run(np.zeros((64, 64), np.uint16))


def test_a_calibration_comes_back_with_its_psf_grid_and_fwhm_map_drawn_in_the_process():
    image, _ = bead_slide(OPTICS, (192, 192), n_beads=50, photons=3000, seed=3)
    outcome, updates = _run(image.astype(np.uint16))
    result = outcome.result
    assert outcome.error is None and result.model.provenance["source"] == ["beads.tif"]
    np.testing.assert_array_equal(outcome.fwhm_map, bead_fwhm_map(result.beads, result.field_shape))
    assert outcome.psf_grid.ndim == 2 and outcome.psf_grid.shape[0] >= result.model.psf_size
    assert updates and updates[-1].text.startswith("drawing")
