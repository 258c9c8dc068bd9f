"""What the dock reads from a layer's axes: the z-step from a length unit (none from napari's default pixel), which
model restores which layer (one-line refusals that say what to do) and the settings a z-stack calibration takes."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from napari_coordgate.app.axes import (
    axis_step_um,
    check_model_fits,
    layer_z_step_um,
    source_steps_um,
    z_step_um,
    zstack_settings,
)
from napari_coordgate.config import CalibrateConfig


@pytest.mark.parametrize("scale, unit, step", [(0.3, "micrometer", 0.3), (0.3, "µm", 0.3), (300, "nanometer", 0.3),
                                               (0.0003, "mm", 0.3), (0.3, "pixel", None), (0.3, None, None),
                                               (0.0, "µm", None)])
def test_an_axis_step_is_in_micrometres_only_for_a_length_unit(scale, unit, step):
    assert axis_step_um(scale, unit) == (pytest.approx(step) if step is not None else None)


def test_the_z_step_is_the_third_last_axis_and_unknown_for_a_plane():
    assert z_step_um((2.0, 0.3, 0.1, 0.1), ("second", "µm", "µm", "µm")) == pytest.approx(0.3)
    assert z_step_um((0.1, 0.1), ("µm", "µm")) is None


def _imagej_stack(path, shape=(8, 32, 32), spacing=0.6):
    tifffile.imwrite(path, np.zeros(shape, np.float32), imagej=True, resolution=(10.0, 10.0),
                     metadata={"unit": "um", "axes": "ZYX", "spacing": spacing})
    return str(path)


def test_a_layer_without_a_length_unit_takes_the_z_step_its_file_states(tmp_path):
    path = _imagej_stack(tmp_path / "z.tif")
    assert source_steps_um(path, (8, 32, 32)) == (pytest.approx(0.6), pytest.approx(0.1))
    assert layer_z_step_um((1, 1, 1), ("pixel",) * 3, (8, 32, 32), path) == pytest.approx(0.6)
    assert layer_z_step_um((0.3, 1, 1), ("µm",) * 3, (8, 32, 32), path) == pytest.approx(0.3)  # the layer's first


def test_a_file_of_another_shape_or_none_says_nothing(tmp_path):
    path = _imagej_stack(tmp_path / "z.tif")
    assert source_steps_um(path, (4, 32, 32)) == (None, None)  # the layer is not that image (a crop, a projection)
    assert source_steps_um(tmp_path / "missing.tif", (8, 32, 32)) == (None, None)
    assert source_steps_um(None, (8, 32, 32)) == (None, None)
    assert layer_z_step_um((1, 1), ("pixel",) * 2, (32, 32), path) is None


def test_a_2d_model_fits_any_image():
    check_model_fits(2, None, (5, 3, 64, 64), 0, 0.4, False)


def test_a_3d_model_refuses_planes_and_a_channel_axis_among_z_y_x():
    with pytest.raises(ValueError, match="3-D model.*2-D model"):
        check_model_fits(3, 0.2, (64, 64), None, None, False)
    with pytest.raises(ValueError, match="3-D model"):
        check_model_fits(3, 0.2, (2, 64, 64), 0, None, False)  # channels of planes
    with pytest.raises(ValueError, match="before Z, Y, X"):
        check_model_fits(3, 0.2, (2, 8, 64, 64), 1, None, False)
    check_model_fits(3, 0.2, (2, 8, 64, 64), 0, 0.2, False)


def test_a_3d_model_refuses_another_z_step_in_one_line_unless_resampled():
    with pytest.raises(ValueError, match="resample z") as exc:
        check_model_fits(3, 0.2, (8, 64, 64), None, 0.4, False)
    assert "\n" not in str(exc.value)
    check_model_fits(3, 0.2, (8, 64, 64), None, 0.4, True)
    check_model_fits(3, 0.2, (8, 64, 64), None, 0.203, False)  # within the engine's tolerance
    check_model_fits(3, 0.2, (8, 64, 64), None, None, False)  # unknown: the model's is assumed


def test_a_zstack_calibration_takes_the_grid_settings_and_names_the_others():
    cfg = CalibrateConfig(grid=3, psf_size=21, pixel_size_um=0.065, min_snr=4.0, na=1.4, holdout=0.2)
    settings, ignored = zstack_settings(cfg, 0.1)
    assert settings == {"z_step_um": 0.1, "pixel_size_um": 0.065, "grid": 3, "psf_size": 21, "min_snr": 4.0}
    assert ignored == ["NA", "holdout fraction"]
    assert zstack_settings(CalibrateConfig(model="grid"), 0.1)[1] == []
