"""The dock follows z-stacks: a 3-D model restores a (Z, Y, X) layer as one volume at the layer's z-step (another
z-step refused in one line, or resampled when *resample z* is ticked; a 2-D layer refused), a 2-D model still
restores it plane by plane, and a bead z-stack layer calibrates into a 3-D PSF grid and a best-focus map."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import wait_idle
from test_dock import _notifications

from napari_coordgate._widgets._train_tab import BUILTIN
from napari_coordgate.app.state import State
from napari_coordgate.engine import predict

Z_STEP = 0.3
PIXEL = 0.1


@pytest.fixture(scope="module")
def saved3d(random_3d_model):
    return random_3d_model((32, 32), {"offset": 0.0, "scale": 1.0}, Z_STEP)


def _volume(shape=(8, 32, 32)):
    return np.random.default_rng(0).random(shape).astype(np.float32)


def _add_stack(viewer, data, z_step, name="stack", units="µm"):
    return viewer.add_image(data, name=name, scale=(z_step, PIXEL, PIXEL), units=(units,) * 3)


def _apply(dock, qtbot, name="stack"):
    dock.apply_tab.image.setCurrentText(name)
    dock.apply_tab.device.value = "cpu"
    dock.apply_tab.apply_btn.click()
    wait_idle(qtbot, dock)


def test_a_3d_model_restores_a_zstack_layer_as_one_volume_keeping_its_scale(viewer_dock, qtbot, saved3d):
    viewer, dock = viewer_dock
    dock.set_model(saved3d, "test")
    vol = _volume()
    _add_stack(viewer, vol, Z_STEP)

    _apply(dock, qtbot)

    out = viewer.layers["stack (CoordGate)"]
    np.testing.assert_array_equal(out.data, predict(saved3d, vol, z_step_um=Z_STEP, device="cpu"))
    assert tuple(out.scale) == pytest.approx((Z_STEP, PIXEL, PIXEL))
    assert [str(u) for u in out.units] == ["micrometer"] * 3


def test_a_zstack_in_nanometres_is_read_at_its_z_step_in_micrometres(viewer_dock, qtbot, saved3d):
    viewer, dock = viewer_dock
    dock.set_model(saved3d, "test")
    viewer.add_image(_volume(), name="stack", scale=(1000 * Z_STEP, 100, 100), units="nm")

    _apply(dock, qtbot)

    assert "stack (CoordGate)" in viewer.layers


def test_another_z_step_is_refused_in_one_line_and_resampled_when_ticked(viewer_dock, qtbot, saved3d):
    viewer, dock = viewer_dock
    dock.set_model(saved3d, "test")
    vol = _volume()
    _add_stack(viewer, vol, 2 * Z_STEP)
    seen = _notifications()

    _apply(dock, qtbot)

    assert "stack (CoordGate)" not in viewer.layers and dock.state is State.IDLE
    msg = [m for m in seen if "z-step" in m]
    assert len(msg) == 1 and "\n" not in msg[0] and "resample z" in msg[0]
    dock.apply_tab.resample_z.value = True
    _apply(dock, qtbot)
    np.testing.assert_array_equal(viewer.layers["stack (CoordGate)"].data,
                                  predict(saved3d, vol, z_step_um=2 * Z_STEP, resample_z=True, device="cpu"))


def test_a_zstack_opened_by_napari_takes_the_z_step_its_file_states(viewer_dock, qtbot, saved3d, tmp_path):
    import tifffile

    viewer, dock = viewer_dock
    dock.set_model(saved3d, "test")
    path = tmp_path / "stack.tif"
    tifffile.imwrite(path, _volume(), imagej=True, resolution=(10.0, 10.0),
                     metadata={"unit": "um", "axes": "ZYX", "spacing": 2 * Z_STEP})
    layer = viewer.open(str(path), plugin="napari")[0]
    assert [str(u) for u in layer.units] == ["pixel"] * 3  # napari's reader keeps no physical scale
    seen = _notifications()

    _apply(dock, qtbot, layer.name)

    assert f"{layer.name} (CoordGate)" not in viewer.layers
    assert any(f"z-step is {2 * Z_STEP:g} µm" in m for m in seen)


def test_a_3d_model_on_a_2d_layer_is_refused_and_nothing_runs(viewer_dock, qtbot, saved3d):
    viewer, dock = viewer_dock
    dock.set_model(saved3d, "test")
    viewer.add_image(_volume((32, 32)), name="plane")
    seen = _notifications()

    _apply(dock, qtbot, "plane")

    assert "plane (CoordGate)" not in viewer.layers and dock.state is State.IDLE
    msg = [m for m in seen if "3-D model" in m]
    assert len(msg) == 1 and "\n" not in msg[0] and "2-D model" in msg[0]


def test_a_2d_model_restores_a_zstack_layer_plane_by_plane(viewer_dock, qtbot, model):
    viewer, dock = viewer_dock
    dock.set_model(model, "test")
    stack = _volume((3, 96, 80))
    _add_stack(viewer, stack, Z_STEP)

    _apply(dock, qtbot)

    out = viewer.layers["stack (CoordGate)"].data
    np.testing.assert_array_equal(out[1], predict(model, stack[1], device="cpu"))
    assert tuple(viewer.layers["stack (CoordGate)"].scale) == pytest.approx((Z_STEP, PIXEL, PIXEL))


def test_a_bead_zstack_layer_calibrates_into_a_3d_psf_grid_and_a_focus_map_saved_as_cgpsf(viewer_dock, qtbot, tmp_path):
    from napari_coordgate.model_io import resolve_psf
    from napari_coordgate.samples.beadstack import AstigmaticBeam3D, bead_zstack

    viewer, dock = viewer_dock
    stack, _ = bead_zstack(AstigmaticBeam3D(), (25, 192, 192), 30, photons=3000, seed=5, psf_size=25)
    viewer.add_image(stack.astype(np.float32), name="beads", scale=(0.1, 0.065, 0.065), units="µm")
    tab = dock.calibrate_tab

    tab.run_btn.click()
    wait_idle(qtbot, dock, timeout=180_000)

    assert tab.result is not None, dock.status.text()
    psfs = tab.result.model.node_psfs
    k, d, s = psfs.shape[0], psfs.shape[2], psfs.shape[-1]
    grid = viewer.layers["3-D PSF grid, node PSFs over z (beads)"]
    assert grid.data.shape == (d, k * s + 2 * (k + 1), k * s + 2 * (k + 1))
    assert tuple(grid.scale) == pytest.approx((0.1, 0.065, 0.065))
    focus = viewer.layers["best focus, µm from the centre's (beads)"]
    assert focus.data.shape == (192, 192) and tuple(focus.scale) == pytest.approx((0.065, 0.065))
    assert focus.data[95:97, 95:97].max() == pytest.approx(0.0, abs=0.01)  # relative to the centre
    assert "bead FWHM (beads)" not in viewer.layers and "beads (beads)" in viewer.layers
    assert tab.result.model.z_step_um == pytest.approx(0.1) and tab.result.model.pixel_size_um == pytest.approx(0.065)
    tab.save(str(tmp_path / "scope3d"))
    assert resolve_psf(tmp_path / "scope3d.cgpsf").to_record()[0] == tab.result.model.to_record()[0]
    tab.use_btn.click()  # a 3-D PSF model trains a 3-D model on the built-in 3-D specimens at its field
    assert dock.tabs.currentWidget() is dock.train_tab and dock.train_tab.mode.currentText() == BUILTIN
    assert dock.train_tab.plan_label.text().startswith("3-D model, z-step 0.1 µm") and "x 192 x 192" in \
        dock.train_tab.plan_label.text()


def test_a_3d_layer_without_a_z_step_is_calibrated_plane_by_plane_and_the_user_is_told(viewer_dock, qtbot):
    viewer, dock = viewer_dock
    noise = np.random.default_rng(0).poisson(20.0, (3, 96, 96)).astype(np.float32)
    viewer.add_image(noise, name="beads", scale=(0.25, 0.13, 0.13))  # napari's default units: no length unit
    seen = _notifications()

    dock.calibrate_tab.run_btn.click()
    wait_idle(qtbot, dock, timeout=120_000)

    msg = [m for m in seen if "no z-step" in m]
    assert len(msg) == 1 and "\n" not in msg[0] and "3 planes" in msg[0] and "--z-step" in msg[0]
    assert not any("3-D PSF grid" in layer.name or "best focus" in layer.name for layer in viewer.layers)
