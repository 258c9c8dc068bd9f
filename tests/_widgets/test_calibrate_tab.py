"""The Calibrate tab: a bead layer -> beads as points (a colour per reason, reason on hover), the PSF grid and FWHM
map as layers, and the measured model as the Train tab's PSF source; the fit runs in a process. Too few beads: still
an error, with every candidate shown and what to change. The form comes from CalibrateConfig."""

from __future__ import annotations

import numpy as np
from conftest import wait_idle

from napari_coordgate._widgets._train_tab import BUILTIN, PAIRS
from napari_coordgate.calibration.report import reason_colour
from napari_coordgate.config import CalibrateConfig, field_specs
from napari_coordgate.samples.beads import EllipticalOptics, bead_slide

OPTICS = EllipticalOptics(width=1.3, radial=0.8, tangential=0.2, beta=None, twist=0.3, psf_size=19)


def test_calibrating_a_bead_layer_shows_beads_grid_and_fwhm_and_feeds_training(viewer_dock, qtbot, tmp_path):
    viewer, dock = viewer_dock
    image, _ = bead_slide(OPTICS, (256, 256), n_beads=60, photons=3000, n_saturated=1, seed=3)
    viewer.add_image(image.astype(np.uint16), name="beads")
    tab = dock.calibrate_tab
    assert not tab.use_btn.isEnabled(), "nothing to use before a calibration"
    tab.model.value = "grid"
    tab.run_btn.click()
    wait_idle(qtbot, dock, timeout=180_000)
    assert tab.result is not None, dock.status.text()
    points = viewer.layers["beads (beads)"]
    reasons = set(points.properties["reason"])
    assert "accepted" in reasons and len(reasons) > 1, "rejected beads are shown with their reason"
    assert len({tuple(c) for c in points.border_color}) == len(reasons), "a colour per reason"
    assert viewer.layers["bead FWHM (beads)"].data.shape == (256, 256)
    assert "PSF grid (beads)" in viewer.layers
    assert tab.use_btn.isEnabled()
    dock.train_tab.mode.setCurrentText(PAIRS)
    tab.use_btn.click()
    assert dock.training_psf_model() is tab.result.model
    assert dock.train_tab.mode.currentText() == BUILTIN and dock.tabs.currentWidget() is dock.train_tab
    assert dock.train_tab.plan_label.text() == "2-D model (plane by plane), 25 built-in fields of 256 x 256 (mixed)"
    assert dock.train_tab.specimens.isEnabled(), "no sharp images needed: the built-in specimens at its field"
    tab.save(str(tmp_path / "scope"))
    assert (tmp_path / "scope.cgpsf").is_file()


def test_calibrating_an_image_without_beads_is_a_notification(viewer_dock, qtbot):
    from test_dock import _notifications

    viewer, dock = viewer_dock
    seen = _notifications()
    viewer.add_image(np.random.default_rng(0).normal(100, 2, (128, 128)).astype(np.float32), name="noise")
    dock.calibrate_tab.beads.setCurrentText("noise")
    dock.calibrate_tab.run_btn.click()
    wait_idle(qtbot, dock, timeout=120_000)
    qtbot.waitUntil(lambda: any("no beads found" in m for m in seen), timeout=5000)
    assert dock.calibrate_tab.result is None and "PSF grid (noise)" not in viewer.layers
    shown = viewer.layers["beads (noise)"].properties["reason"] if "beads (noise)" in viewer.layers else []
    assert "accepted" not in shown, "only what was rejected, and why"


def test_too_few_beads_still_show_every_candidate_by_reason_with_what_to_change(viewer_dock, qtbot):
    from test_dock import _notifications

    viewer, dock = viewer_dock
    seen = _notifications()
    image, _ = bead_slide(OPTICS, (128, 128), n_beads=4, photons=3000, hot_fraction=1e-3, seed=1)
    viewer.add_image(image.astype(np.uint16), name="sparse")
    tab = dock.calibrate_tab
    tab.model.value = "grid"
    tab.run_btn.click()
    wait_idle(qtbot, dock, timeout=120_000)
    assert tab.result is None and not tab.use_btn.isEnabled()
    points = viewer.layers["beads (sparse)"]
    reasons = list(points.properties["reason"])
    assert "hot pixel" in reasons and "accepted" in reasons
    for reason, colour in zip(reasons, points.border_color):
        np.testing.assert_allclose(colour[:3], [int(reason_colour(reason)[i:i + 2], 16) / 255 for i in (1, 3, 5)])
    assert "needs at least 5 usable beads" in tab.summary.text() and "finer pixel size" in tab.summary.text()
    assert dock.status.text().startswith("failed: the measured grid needs at least 5")
    qtbot.waitUntil(lambda: any("needs at least 5" in m for m in seen), timeout=5000)
    assert "PSF grid (sparse)" not in viewer.layers


def test_the_form_is_calibrate_config_with_its_bounds_and_not_given_fields(viewer_dock):
    viewer, dock = viewer_dock
    tab = dock.calibrate_tab
    grid = field_specs(CalibrateConfig, ["grid"])[0]
    assert (tab.grid.min + 1, tab.grid.max) == (grid.lo, grid.hi) == (1, 25), "below 1: not given"
    assert tab.config() == CalibrateConfig(device=dock.training_device())
    tab.grid.value, tab.bead_diameter_nm.value, tab.holdout.value, tab.wavelength_nm.value = 9, 175.0, 0.2, 520
    tab.pixel_size_um.value = 0.1625
    cfg = tab.config()
    assert (cfg.grid, cfg.bead_diameter_nm, cfg.holdout, cfg.wavelength_nm) == (9, 175.0, 0.2, 520.0)
    assert cfg.pixel_size_um == 0.1625, "four decimals"
    tab.pixel_size_um.value = tab.pixel_size_um.min
    microns = {"scale": (0.1, 0.1), "units": ("micrometer", "micrometer")}
    assert tab.config(microns).pixel_size_um == 0.1, "the layer's pixel size when the form has none"
    assert tab.config({"scale": (1.0, 1.0), "units": ("pixel", "pixel")}).pixel_size_um is None
