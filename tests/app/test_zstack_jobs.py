"""The dock's jobs with z-stacks: a bead z-stack's calibration comes back from its process with the node PSFs tiled
plane by plane and the best-focus map at every pixel; a 3-D model restores whole volumes, checks the z-step it is
given and reports progress per volume."""

from __future__ import annotations

import numpy as np
import pytest

from napari_coordgate.app.jobs import ApplyRequest, apply_job, calibrate_job, focus_map_field, psf_grid_3d
from napari_coordgate.checks import InputError
from napari_coordgate.config import CalibrateConfig, ModelConfig, PredictConfig
from napari_coordgate.engine import predict


@pytest.fixture(scope="module")
def saved3d():
    """An untrained, seeded 3-D U-Net(2) on 0.3 µm planes."""
    import torch

    from napari_coordgate.model_io import SavedModel
    from napari_coordgate.nn import build_model

    torch.manual_seed(0)
    cfg = ModelConfig(ndim=3, depth=2, channels=4)
    net = build_model(cfg)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0.0, 0.2)
    return SavedModel(net.eval(), cfg, (32, 32), {"offset": 0.0, "scale": 1.0}, z_step_um=0.3)


def test_node_psfs_are_tiled_plane_by_plane_each_at_its_own_peak():
    psfs = np.random.default_rng(0).random((2, 2, 5, 7, 7))
    psfs[1, 1] *= 100
    tiled = psf_grid_3d(psfs, gap=2)
    assert tiled.shape == (5, 2 * 7 + 3 * 2, 2 * 7 + 3 * 2) and tiled.dtype == np.float32
    np.testing.assert_allclose(tiled[:, 2:9, 2:9], psfs[0, 0] / psfs[0, 0].max(), rtol=1e-6)
    assert tiled[:, 11:18, 11:18].max() == pytest.approx(1.0)


def test_a_bead_zstack_calibrates_in_its_process_into_a_3d_grid_and_a_focus_map():
    from napari_coordgate.samples.beadstack import AstigmaticBeam3D, bead_zstack

    stack, _ = bead_zstack(AstigmaticBeam3D(), (25, 192, 192), 30, photons=3000, seed=5, psf_size=25)
    updates = []
    outcome = calibrate_job(stack, CalibrateConfig(pixel_size_um=0.065), ["stack.tif"], 0.1, report=updates.append,
                            should_stop=lambda: False)
    result = outcome.result
    k, _, d, s, _ = result.model.psf_grid(result.field_shape)[0].shape
    assert result.model.ndim == 3 and result.model.z_step_um == pytest.approx(0.1)
    assert outcome.psf_grid.shape == (d, k * s + 2 * (k + 1), k * s + 2 * (k + 1)) and outcome.fwhm_map is None
    corners = outcome.focus_map[np.ix_([0, -1], [0, -1])]
    np.testing.assert_allclose(corners, result.focus_map_um(2), atol=1e-5)  # the same surface, at the pixels
    np.testing.assert_array_equal(outcome.focus_map, focus_map_field(result))
    assert updates[-1].text.startswith("drawing the 3-D PSF grid")


def test_a_3d_model_restores_whole_volumes_and_reports_them(saved3d):
    vols = np.random.default_rng(1).random((2, 8, 32, 32)).astype(np.float32)  # a (T, Z, Y, X) time-lapse
    updates = []
    result = apply_job(ApplyRequest(vols, [saved3d], predict=PredictConfig(device="cpu"), z_step_um=0.3),
                       report=updates.append, should_stop=lambda: False)
    np.testing.assert_array_equal(result.data, predict(saved3d, vols, device="cpu"))
    assert updates[-1].text == "volume 2 of 2"


def test_a_3d_model_checks_the_z_step_it_is_given(saved3d):
    vol = np.random.default_rng(2).random((8, 32, 32)).astype(np.float32)
    req = ApplyRequest(vol, [saved3d], predict=PredictConfig(device="cpu"), z_step_um=0.6)
    with pytest.raises(InputError, match="z-step"):
        apply_job(req, report=lambda m: None, should_stop=lambda: False)
    req.predict = PredictConfig(device="cpu", resample_z=True)
    out = apply_job(req, report=lambda m: None, should_stop=lambda: False).data
    np.testing.assert_array_equal(out, predict(saved3d, vol, z_step_um=0.6, resample_z=True, device="cpu"))


def test_with_a_3d_model_the_channel_axis_comes_before_z(saved3d):
    vols = np.zeros((2, 8, 32, 32), np.float32)
    with pytest.raises(ValueError, match="before Z, Y, X"):
        apply_job(ApplyRequest(vols, [saved3d], channel_axis=1), report=lambda m: None, should_stop=lambda: False)
