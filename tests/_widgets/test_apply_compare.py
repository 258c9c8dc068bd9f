"""The Apply tab's classical comparison: which PSF model it uses, and the image's place in the training field."""

from __future__ import annotations

import dataclasses

import numpy as np
from conftest import wait_idle

from napari_coordgate.app.state import State
from napari_coordgate.optics.deconv import richardson_lucy_central, sv_richardson_lucy
from napari_coordgate.optics.psf import PRESETS


def _notifications():
    from napari.utils.notifications import notification_manager

    seen = []
    notification_manager.notification_ready.connect(lambda ev: seen.append(ev.value.message)
                                                    if hasattr(ev, "value") else seen.append(str(ev)))
    return seen


def _with_psf(saved, name="gaussian"):
    return dataclasses.replace(saved, psf=PRESETS[name].to_dict())


def test_a_model_without_a_psf_model_says_so_and_runs_no_comparison(viewer_dock, qtbot, tiny_model, pair64):
    viewer, dock = viewer_dock
    assert tiny_model.psf is None  # trained on calibration pairs alone
    dock.set_model(tiny_model, "test")
    viewer.add_image(pair64[1], name="raw")
    dock.train_tab.preset.setCurrentText("gaussian")  # must not be used behind the model's back
    dock.apply_tab.image.setCurrentText("raw")
    seen = _notifications()

    dock.apply_tab.compare_btn.click()

    assert dock.state is State.IDLE and "raw (SV-RL)" not in viewer.layers
    msg = [m for m in seen if "no PSF model is known for this model" in m]
    assert len(msg) == 1 and "\n" not in msg[0] and "train" in msg[0]


def test_without_a_model_the_train_tabs_psf_model_is_used_and_named(viewer_dock, qtbot, pair64):
    viewer, dock = viewer_dock
    viewer.add_image(pair64[1], name="raw")
    dock.train_tab.preset.setCurrentText("gaussian")
    dock.apply_tab.image.setCurrentText("raw")
    dock.apply_tab.iterations.setValue(2)
    seen = _notifications()

    dock.apply_tab.compare_btn.click()
    wait_idle(qtbot, dock)

    assert "raw (SV-RL)" in viewer.layers
    assert any("Train tab" in m and "'gaussian'" in m for m in seen)


def test_a_models_psf_model_is_used_and_named(viewer_dock, qtbot, tiny_model, pair64):
    viewer, dock = viewer_dock
    dock.set_model(_with_psf(tiny_model), "test")
    viewer.add_image(pair64[1], name="raw")
    dock.train_tab.preset.setCurrentText("strong_astigmatism")
    dock.apply_tab.image.setCurrentText("raw")
    dock.apply_tab.iterations.setValue(2)
    seen = _notifications()

    dock.apply_tab.compare_btn.click()
    wait_idle(qtbot, dock)

    assert any("model's PSF model 'gaussian'" in m for m in seen)
    np.testing.assert_array_equal(viewer.layers["raw (SV-RL)"].data, sv_richardson_lucy(pair64[1], "gaussian", 2))


def test_a_camera_roi_is_restored_with_the_psfs_of_its_place_in_the_field(viewer_dock, qtbot, tiny_model, pair64):
    viewer, dock = viewer_dock
    dock.set_model(_with_psf(tiny_model), "test")
    roi = np.ascontiguousarray(pair64[1][16:48, 8:40])
    viewer.add_image(roi, name="roi")
    tab = dock.apply_tab
    tab.image.setCurrentText("roi")
    tab.iterations.setValue(3)
    seen = _notifications()

    tab.compare_btn.click()  # a 32x32 image of a 64x64 field needs its position, as Apply does
    wait_idle(qtbot, dock)
    assert "roi (SV-RL)" not in viewer.layers
    assert any("position in the field" in m for m in seen)

    tab.roi.setText("16, 8")
    tab.compare_btn.click()
    wait_idle(qtbot, dock)

    expected = sv_richardson_lucy(roi, "gaussian", 3, offset=(16, 8), full_field=(64, 64))
    np.testing.assert_array_equal(viewer.layers["roi (SV-RL)"].data, expected)
    assert not np.allclose(expected, sv_richardson_lucy(roi, "gaussian", 3), atol=1e-4)
    np.testing.assert_array_equal(viewer.layers["roi (RL-central)"].data,
                                  richardson_lucy_central(roi, "gaussian", 3, full_field=(64, 64)))


def test_compare_job_sees_a_binned_image_in_binned_pixels_of_the_field():
    from napari_coordgate.app.jobs import compare_job
    from napari_coordgate.optics.blur import binned_psf_config

    image = np.random.default_rng(0).random((2, 16, 32)).astype(np.float32)  # 2x2-binned, at (32, 0) of 64x64

    result = compare_job(image, PRESETS["gaussian"], 2, (64, 64), (32, 0), 2, report=lambda m: None,
                         should_stop=lambda: False)

    binned = binned_psf_config("gaussian", 2)
    np.testing.assert_array_equal(result.data["SV-RL"],
                                  sv_richardson_lucy(image, binned, 2, offset=(16, 0), full_field=(32, 32)))
    np.testing.assert_array_equal(result.data["RL-central"],
                                  richardson_lucy_central(image, binned, 2, full_field=(32, 32)))
