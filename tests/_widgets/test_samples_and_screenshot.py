"""Sample data through the manifest, and a rendered viewer with the dock and a result layer."""

import numpy as np
from conftest import wait_idle


def test_calibration_pair_and_psf_grid_samples_open(make_napari_viewer):
    viewer = make_napari_viewer(show=True)
    viewer.open_sample("napari-coordgate", "calibration_pair")
    viewer.open_sample("napari-coordgate", "psf_grid")
    sharp, blurred, grid = viewer.layers
    assert (sharp.name, blurred.name) == ("calibration (sharp)", "calibration (blurred)")
    assert sharp.data.shape == blurred.data.shape == (256, 256)
    assert not np.array_equal(sharp.data, blurred.data)
    assert grid.name == "PSF grid (gaussian)" and grid.data.ndim == 2


def test_screenshot_of_the_dock_and_a_result_layer_is_not_blank(viewer_dock, qtbot, tiny_model, pair64, tmp_path):
    viewer, dock = viewer_dock
    dock.set_model(tiny_model, "test")
    viewer.add_image(pair64[1], name="blurred")
    dock.apply_tab.apply_btn.click()
    wait_idle(qtbot, dock)
    assert "blurred (CoordGate)" in viewer.layers
    canvas = viewer.screenshot(canvas_only=True, flash=False)
    shot = viewer.screenshot(path=str(tmp_path / "viewer.png"), canvas_only=False, flash=False)
    assert (tmp_path / "viewer.png").exists()
    assert shot.shape[1] > canvas.shape[1], "the window screenshot includes the dock"
    assert float(np.std(canvas[..., :3])) > 5.0, "canvas rendered blank"
