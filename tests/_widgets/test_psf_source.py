"""Any PSF model in the dock: a .cgpsf file as the Train tab's PSF source, its PSF grid, and the Apply tab's
comparison with a model that stores such a PSF model (``fake_psf``: a grid of Gaussians from tests/conftest.py)."""

from __future__ import annotations

import dataclasses

import numpy as np
from conftest import wait_idle

from napari_coordgate._widgets._train_tab import SIMULATED
from napari_coordgate.model_io import save_psf_model
from napari_coordgate.optics.deconv import sv_richardson_lucy
from napari_coordgate.optics.psf import PRESETS


def _notifications():
    from napari.utils.notifications import notification_manager

    seen = []
    notification_manager.notification_ready.connect(lambda ev: seen.append(ev.value.message)
                                                    if hasattr(ev, "value") else seen.append(str(ev)))
    return seen


def test_a_psf_model_file_becomes_the_train_tabs_psf_source(viewer_dock, tmp_path, fake_psf, pair64, monkeypatch):
    viewer, dock = viewer_dock
    viewer.add_image(pair64[0], name="sharp")
    path = save_psf_model(tmp_path / "beads", fake_psf)
    t = dock.train_tab
    t.psf_box.setChecked(True)  # editing a preset's parameters ...
    monkeypatch.setattr("napari_coordgate._widgets._train_tab.QFileDialog.getOpenFileName",
                        lambda *a, **k: (str(path), ""))

    t.psf_file_btn.click()

    assert t.preset.currentText() == "file: beads.cgpsf"
    assert not t.psf_box.isEnabled() and not t.psf_box.isChecked()  # ... is off: a measured model has no parameters
    np.testing.assert_array_equal(t.psf_model().sigmas, fake_psf.sigmas)
    t.mode.setCurrentText(SIMULATED)
    assert t.source().psf is t.psf_model()
    t.preset.setCurrentText("gaussian")  # the presets and their editor are still there
    assert t.psf_box.isEnabled() and t.psf_model() is PRESETS["gaussian"]
    t.preset.setCurrentText("file: beads.cgpsf")
    assert t.psf_model().name == "fake beads"


def test_a_corrupt_psf_model_file_is_one_notification_and_keeps_the_psf_source(viewer_dock, tmp_path):
    _, dock = viewer_dock
    bad = tmp_path / "bad.cgpsf"
    bad.write_bytes(b"not a safetensors file at all")
    t = dock.train_tab
    t.preset.setCurrentText("strong_astigmatism")
    seen = _notifications()

    assert not t.load_psf_file(str(bad))

    assert t.preset.currentText() == "strong_astigmatism" and t.preset.findText("file: bad.cgpsf") < 0
    assert any("bad.cgpsf" in m and "\n" not in m for m in seen)


def test_show_psf_grid_of_a_psf_model_file(viewer_dock, qtbot, tmp_path, fake_psf):
    viewer, dock = viewer_dock
    dock.train_tab.load_psf_file(str(save_psf_model(tmp_path / "beads", fake_psf)))

    dock.train_tab.grid_btn.click()
    wait_idle(qtbot, dock)

    assert viewer.layers["PSF grid (fake beads)"].data.shape == (3 * 9 + 4 * 2,) * 2


def test_comparison_uses_the_models_psf_model_of_any_kind(viewer_dock, qtbot, tiny_model, pair64, fake_psf):
    viewer, dock = viewer_dock
    dock.set_model(dataclasses.replace(tiny_model, psf=fake_psf), "test")
    viewer.add_image(pair64[1], name="raw")
    dock.apply_tab.image.setCurrentText("raw")
    dock.apply_tab.iterations.setValue(2)
    seen = _notifications()

    dock.apply_tab.compare_btn.click()
    wait_idle(qtbot, dock)

    assert any("model's PSF model 'fake beads'" in m for m in seen)
    np.testing.assert_array_equal(viewer.layers["raw (SV-RL)"].data, sv_richardson_lucy(pair64[1], fake_psf, 2))
