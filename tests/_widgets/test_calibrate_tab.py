"""The Calibrate tab: a bead layer -> beads as points (rejected ones in another colour, reason on hover), the PSF
grid and FWHM map as layers, and the measured model as the Train tab's PSF source; the fit runs in a process."""

from __future__ import annotations

import numpy as np
from conftest import wait_idle

from napari_coordgate._widgets._train_tab import PAIRS, SIMULATED
from napari_coordgate.samples.beads import EllipticalOptics, bead_slide

OPTICS = EllipticalOptics(width=1.3, radial=0.8, tangential=0.2, beta=None, twist=0.3, psf_size=19)


def test_calibrating_a_bead_layer_shows_beads_grid_and_fwhm_and_feeds_training(viewer_dock, qtbot, tmp_path):
    viewer, dock = viewer_dock
    image, _ = bead_slide(OPTICS, (256, 256), n_beads=60, photons=3000, n_saturated=1, seed=3)
    viewer.add_image(image.astype(np.uint16), name="beads")
    tab = dock.calibrate_tab
    assert not tab.use_btn.isEnabled(), "nothing to use before a calibration"
    tab.model.setCurrentText("grid")
    tab.run_btn.click()
    wait_idle(qtbot, dock, timeout=180_000)
    assert tab.result is not None, dock.status.text()
    points = viewer.layers["beads (beads)"]
    reasons = set(points.properties["reason"])
    assert "accepted" in reasons and len(reasons) > 1, "rejected beads are shown with their reason"
    assert len({tuple(c) for c in points.border_color}) == 2, "accepted and rejected in two colours"
    assert viewer.layers["bead FWHM (beads)"].data.shape == (256, 256)
    assert "PSF grid (beads)" in viewer.layers
    assert tab.use_btn.isEnabled()
    dock.train_tab.mode.setCurrentText(PAIRS)
    tab.use_btn.click()
    assert dock.training_psf_model() is tab.result.model
    assert dock.train_tab.mode.currentText() == SIMULATED and dock.tabs.currentWidget() is dock.train_tab
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
    qtbot.waitUntil(lambda: any("bead" in m for m in seen), timeout=5000)
    assert dock.calibrate_tab.result is None and [la.name for la in viewer.layers] == ["noise"]
