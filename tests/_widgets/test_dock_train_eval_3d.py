"""The Train and Evaluate tabs follow z-stacks: a 3-D PSF model trains a 3-D model (on sharp (Z, Y, X) layers or the
built-in 3-D specimens), a 2-D one a 2-D model (on sharp layers, or the built-in fields of the chosen set), what a
3-D model refuses is one notification and nothing starts; Evaluate scores (Z, Y, X) layers by depth and adds the
error map as a volume."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import make_tiny, wait_idle
from test_dock import _notifications

from napari_coordgate._widgets._train_tab import BUILTIN, PAIRS, SIMULATED
from napari_coordgate.app.state import State
from napari_coordgate.optics.psf import PSFConfig
from napari_coordgate.optics.psf3d import Pupil3DPSF
from napari_coordgate.samples.volumes import specimen_volumes

Z_STEP, PIXEL = 0.25, 0.13  # the 3-D preset's
TIMEOUT = 90_000


def _tiny_3d_psf(field=(32, 32)):
    """A small 3-D pupil model that names its field, as one measured from a bead z-stack does."""
    pupil = PSFConfig(name="tiny3d", na=0.8, wavelength_um=0.52, pixel_size_um=PIXEL, refractive_index=1.0,
                      psf_size=9, grid=3)
    return Pupil3DPSF.from_pupil(pupil, z_step_um=Z_STEP, psf_depth=5).with_provenance({"field_shape": list(field)})


def _add_stack(viewer, name="sharp", shape=(8, 32, 32), z_step=Z_STEP, seed=0):
    vol = specimen_volumes(1, shape, seed=seed, anisotropy=z_step / PIXEL)[0]
    return viewer.add_image(vol, name=name, scale=(z_step, PIXEL, PIXEL), units=("µm",) * 3)


def _tiny_3d(dock):
    make_tiny(dock, epochs=1, steps=2)
    dock.train_tab.crop.value = 16


def _train(dock, qtbot):
    dock.train_tab.start_btn.click()
    wait_idle(qtbot, dock, timeout=TIMEOUT)
    assert dock.last_result is not None, dock.status.text()
    return dock.model


def test_a_3d_psf_model_trains_a_3d_model_on_a_sharp_zstack_layer(viewer_dock, qtbot):
    viewer, dock = viewer_dock
    _add_stack(viewer)
    t = dock.train_tab
    t.mode.setCurrentText(SIMULATED)
    t.set_psf_model(_tiny_3d_psf(), "tiny 3-D")
    t.sharp.setCurrentText("sharp")
    assert t.plan_label.text().startswith(f"3-D model, z-step {Z_STEP:g} µm")
    _tiny_3d(dock)

    saved = _train(dock, qtbot)

    assert saved.config.ndim == 3 and saved.z_step_um == pytest.approx(Z_STEP)
    assert saved.psf.ndim == 3


def test_the_built_in_3d_specimens_train_a_3d_model_at_a_measured_psf_models_field(viewer_dock, qtbot):
    _, dock = viewer_dock
    t = dock.train_tab
    t.use_psf_model(_tiny_3d_psf(), "measured 3-D")  # no stack layer: the built-in specimens are chosen
    assert t.mode.currentText() == BUILTIN
    assert "built-in volumes of 32 x 32 x 32" in t.plan_label.text()
    _tiny_3d(dock)

    saved = _train(dock, qtbot)

    assert saved.config.ndim == 3 and tuple(saved.field_shape) == (32, 32)


def test_the_built_in_fields_of_the_chosen_set_train_a_2d_model_at_a_measured_2d_psf_models_field(viewer_dock, qtbot):
    from napari_coordgate.optics.psf import PRESETS

    _, dock = viewer_dock
    t = dock.train_tab
    t.use_psf_model(_tiny_3d_psf(), "measured 3-D")
    assert not t.specimens.isEnabled(), "3-D models train on procedural volumes: no set to choose"
    t.use_psf_model(PRESETS["gaussian"].with_provenance({"field_shape": [64, 64]}), "measured 2-D")
    assert t.mode.currentText() == BUILTIN and t.specimens.isEnabled()
    assert t.plan_label.text() == "2-D model (plane by plane), 32 built-in fields of 64 x 64 (mixed)"
    t.specimens.setCurrentText("fluorescence")
    assert t.plan_label.text().endswith("of 64 x 64 (fluorescence)")
    t.mode.setCurrentText(SIMULATED)
    assert not t.specimens.isEnabled(), "a choice only for the built-in specimens"
    t.mode.setCurrentText(BUILTIN)
    t.psf_box.setChecked(True)  # other optics, the same field: still the built-in fields
    assert t.specimens.isEnabled() and t.plan_label.text().endswith("of 64 x 64 (fluorescence)")
    source = t.source()
    assert source.specimens == "fluorescence" and source.psf.provenance["field_shape"] == [64, 64]
    make_tiny(dock, epochs=1, steps=2)

    saved = _train(dock, qtbot)

    assert saved.config.ndim == 2 and tuple(saved.field_shape) == (64, 64)


def test_zstack_calibration_pairs_train_a_3d_model_at_their_z_step(viewer_dock, qtbot):
    from scipy.ndimage import gaussian_filter

    viewer, dock = viewer_dock
    sharp = _add_stack(viewer, "sharp", z_step=0.3).data
    viewer.add_image(gaussian_filter(sharp, (1.0, 1.2, 1.2)), name="blurred", scale=(0.3, PIXEL, PIXEL),
                     units=("µm",) * 3)
    t = dock.train_tab
    t.mode.setCurrentText(PAIRS)
    t.sharp.setCurrentText("sharp")
    t.blurred.setCurrentText("blurred")
    assert t.plan_label.text().startswith("3-D model, z-step 0.3 µm")
    _tiny_3d(dock)

    saved = _train(dock, qtbot)

    assert saved.config.ndim == 3 and saved.z_step_um == pytest.approx(0.3)


def test_fine_tuning_a_model_of_the_other_dimensionality_is_refused_in_one_line(viewer_dock, random_3d_model):
    viewer, dock = viewer_dock
    dock.set_model(random_3d_model((64, 64), {"offset": 0.0, "scale": 1.0}, Z_STEP), "test")
    viewer.add_image(np.random.default_rng(0).random((64, 64)).astype(np.float32), name="sharp")
    t = dock.train_tab
    t.mode.setCurrentText(SIMULATED)
    t.preset.setCurrentText("gaussian")
    t.finetune.setChecked(True)
    seen = _notifications()

    t.start_btn.click()

    msg = [m for m in seen if "the current model is 3-D" in m]
    assert len(msg) == 1 and "\n" not in msg[0] and dock.state is State.IDLE and not dock.runner.busy


def test_a_3d_preset_is_offered_and_a_2d_psf_model_still_trains_a_2d_model(viewer_dock, qtbot, pair64):
    viewer, dock = viewer_dock
    t = dock.train_tab
    assert t.preset.findText("tilted_curved_3d") >= 0
    viewer.add_image(pair64[0], name="sharp")
    t.mode.setCurrentText(SIMULATED)
    t.preset.setCurrentText("gaussian")
    t.sharp.setCurrentText("sharp")
    assert t.plan_label.text().startswith("2-D model")
    make_tiny(dock)

    assert _train(dock, qtbot).config.ndim == 2


def _wiener_with_3d_psf(viewer, t):
    _add_stack(viewer)
    t.mode.setCurrentText(SIMULATED)
    t.set_psf_model(_tiny_3d_psf(), "tiny 3-D")
    t.prefilter.value = "wiener"
    return "2-D only"


def _zstack_with_2d_psf(viewer, t):
    _add_stack(viewer)
    t.mode.setCurrentText(SIMULATED)
    t.preset.setCurrentText("gaussian")
    return "PSF model is 2-D"


def _pairs_of_two_z_steps(viewer, t):
    _add_stack(viewer, "sharp")
    _add_stack(viewer, "blurred", z_step=2 * Z_STEP)
    t.mode.setCurrentText(PAIRS)
    t.sharp.setCurrentText("sharp")
    t.blurred.setCurrentText("blurred")
    return "share one z-step"


def _plane_with_3d_psf(viewer, t):
    viewer.add_image(np.random.default_rng(0).random((32, 32)).astype(np.float32), name="sharp")
    t.mode.setCurrentText(SIMULATED)
    t.set_psf_model(_tiny_3d_psf(), "tiny 3-D")
    return "pick a sharp (Z, Y, X) layer"


@pytest.mark.parametrize("arrange", [_wiener_with_3d_psf, _zstack_with_2d_psf, _pairs_of_two_z_steps,
                                     _plane_with_3d_psf])
def test_what_a_3d_model_refuses_is_one_notification_and_nothing_starts(viewer_dock, qtbot, arrange):
    viewer, dock = viewer_dock
    t = dock.train_tab
    words = arrange(viewer, t)
    t.sharp.setCurrentText("sharp")
    seen = _notifications()

    t.start_btn.click()

    msg = [m for m in seen if words in m]
    assert len(msg) == 1 and "\n" not in msg[0], seen
    assert dock.state is State.IDLE and not dock.runner.busy and dock.model is None
    assert t.plan_label.text().startswith("nothing:")


def test_adapting_a_3d_model_is_refused_in_one_line(viewer_dock, random_3d_model):
    viewer, dock = viewer_dock
    dock.set_model(random_3d_model((32, 32), {"offset": 0.0, "scale": 1.0}, Z_STEP), "test")
    _add_stack(viewer, "blurred")
    seen = _notifications()

    dock.train_tab.adapt_btn.click()

    msg = [m for m in seen if "3-D model" in m]
    assert len(msg) == 1 and "2-D models only" in msg[0] and "\n" not in msg[0]
    assert dock.state is State.IDLE and not dock.runner.busy


def _evaluate(dock, qtbot, picks: dict):
    """Evaluate with the layers ``picks`` names for each of the tab's pickers; the tab once it is done."""
    tab = dock.eval_tab
    for picker, name in picks.items():
        getattr(tab, picker).setCurrentText(name)
    tab.eval_btn.click()
    wait_idle(qtbot, dock)
    return tab


def test_evaluating_zstack_layers_reports_psnr_by_depth_and_adds_a_3d_error_map(viewer_dock, qtbot):
    viewer, dock = viewer_dock
    gt = _add_stack(viewer, "truth", seed=1).data
    viewer.add_image(gt + 0.01 * np.arange(8, dtype=np.float32)[:, None, None], name="restored",
                     scale=(Z_STEP, PIXEL, PIXEL), units=("µm",) * 3)
    _add_stack(viewer, "blurred", seed=2)

    tab = _evaluate(dock, qtbot, {"gt": "truth", "restored": "restored", "blurred": "blurred"})

    rows = [tab.table.verticalHeaderItem(i).text() for i in range(tab.table.rowCount())]
    assert rows[:2] == ["PSNR (dB)", "SSIM"] and "PSNR plane 0 (dB)" in rows and "PSNR plane 7 (dB)" in rows
    assert len(rows) > 2 + 8, "the rings' rows come before the depth's"
    emap = viewer.layers["error map (restored)"]
    assert emap.data.shape == (8, 32, 32) and tuple(emap.scale) == pytest.approx((Z_STEP, PIXEL, PIXEL))
