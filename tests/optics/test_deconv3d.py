"""3-D deconvolution baselines (issue 24): Richardson–Lucy with the central 3-D PSF and spatially varying 3-D RL
sharpen a blurred noisy point cloud; series, stops and progress; 2-D and 3-D models are not mixed up."""

import numpy as np
import pytest
import torch
from scipy import ndimage

from napari_coordgate.optics.blur import add_noise
from napari_coordgate.optics.blur3d import SpatiallyVaryingBlur3D
from napari_coordgate.optics.deconv import richardson_lucy_central, sv_richardson_lucy, sv_wiener, wiener_central
from napari_coordgate.optics.deconv3d import richardson_lucy_3d_central, sv_richardson_lucy_3d
from napari_coordgate.optics.psf import PRESETS, PSFConfig
from napari_coordgate.optics.psf3d import Pupil3DPSF

MODEL = Pupil3DPSF.from_pupil(
    PSFConfig(name="small", na=0.8, pixel_size_um=0.1, psf_size=11, grid=3, astig_h2=0.3, coma_h=0.15),
    z_step_um=0.2, psf_depth=9, tilt_y_um=0.3, curvature_um=0.4,
)
SHAPE = (9, 32, 32)


def _psnr(reference, estimate):
    return 10 * np.log10(reference.max() ** 2 / np.mean((reference - estimate) ** 2))


@pytest.fixture(scope="module")
def point_cloud():
    """(sharp, blurred + Poisson noise, operator): 40 beads (points smoothed over a voxel: RL needs hundreds of
    iterations to rebuild single voxels) on a faint background, blurred by MODEL."""
    rng = np.random.default_rng(0)
    points = np.zeros(SHAPE)
    points[rng.integers(1, 8, 40), rng.integers(2, 30, 40), rng.integers(2, 30, 40)] = 1.0
    sharp = ndimage.gaussian_filter(points, 1.0)
    sharp = sharp / sharp.max() + 0.02
    op = SpatiallyVaryingBlur3D(MODEL, SHAPE)
    blurred = op.forward(sharp)
    noisy = add_noise(blurred.reshape(1, -1), photons=2000.0, seed=1).reshape(SHAPE)
    return sharp, noisy, op


def test_3d_rl_improves_psnr_of_a_blurred_noisy_point_cloud_and_the_sv_model_most(point_cloud):
    sharp, noisy, op = point_cloud

    central = richardson_lucy_3d_central(noisy, MODEL, iterations=30)
    varying = sv_richardson_lucy_3d(noisy, op, iterations=30)

    assert central.shape == varying.shape == SHAPE and central.dtype == varying.dtype == np.float32
    assert _psnr(sharp, central) > _psnr(sharp, noisy) + 0.5
    assert _psnr(sharp, varying) > _psnr(sharp, central) + 0.3


def test_sv_rl_3d_of_a_series_is_volume_by_volume_and_reports_progress(point_cloud):
    _, noisy, op = point_cloud
    series = np.stack([noisy, noisy[::-1]])
    calls = []

    out = sv_richardson_lucy_3d(series, MODEL, iterations=3, on_iteration=lambda done, n: calls.append((done, n)))

    np.testing.assert_allclose(out[1], sv_richardson_lucy_3d(noisy[::-1], op, iterations=3), atol=1e-5)
    assert calls == [(1, 3), (2, 3), (3, 3)] * 2


def test_on_estimate_sees_each_iteration_whose_last_is_the_result(point_cloud):
    _, noisy, op = point_cloud
    seen = {}

    out = sv_richardson_lucy_3d(noisy, op, iterations=4, on_estimate=lambda done, x: seen.update({done: x.copy()}))

    assert sorted(seen) == [1, 2, 3, 4]
    np.testing.assert_array_equal(seen[4], out)
    np.testing.assert_array_equal(seen[2], sv_richardson_lucy_3d(noisy, op, iterations=2))


def test_a_stop_returns_the_estimate_so_far_and_later_volumes_unchanged(point_cloud):
    _, noisy, op = point_cloud
    asked = []

    def stop():
        asked.append(1)
        return len(asked) > 2

    out = sv_richardson_lucy_3d(np.stack([noisy, noisy]), op, iterations=10, should_stop=stop)

    np.testing.assert_allclose(out[0], sv_richardson_lucy_3d(noisy, op, iterations=2), atol=1e-6)
    np.testing.assert_array_equal(out[1], noisy)
    np.testing.assert_array_equal(sv_richardson_lucy_3d(noisy, op, iterations=0), noisy)


def test_central_rl_3d_of_a_uniform_model_is_sv_rl_3d():
    uniform = MODEL.replace(pupil=MODEL.pupil.replace(astig_h2=0.0, coma_h=0.0), tilt_y_um=0.0, curvature_um=0.0)
    volume = np.random.default_rng(2).random((5, 16, 16)).astype(np.float32)

    central = richardson_lucy_3d_central(volume, uniform, iterations=4, background=0.1)
    varying = sv_richardson_lucy_3d(volume, uniform, iterations=4, background=0.1, device="cpu")

    np.testing.assert_allclose(central, varying, atol=1e-5)


@pytest.mark.parametrize("call, match", [
    (lambda v: sv_richardson_lucy_3d(v, MODEL, iterations=-1), "iterations"),
    (lambda v: sv_richardson_lucy_3d(v, MODEL, background=-1.0), "background"),
    (lambda v: sv_richardson_lucy_3d(v[0], MODEL), r"expected a volume \(D, H, W\).*2-D functions"),
    (lambda v: sv_richardson_lucy_3d(v, SpatiallyVaryingBlur3D(MODEL, (9, 16, 16))), "built for"),
    (lambda v: richardson_lucy_3d_central(v, PRESETS["gaussian"]), "2-D PSF model; use richardson_lucy_central"),
    (lambda v: sv_richardson_lucy_3d(v[None, None], MODEL), r"or a series \(T, D, H, W\), got shape \(1, 1, 9"),
])
def test_bad_arguments_are_refused_with_what_to_do(call, match):
    with pytest.raises(ValueError, match=match):
        call(np.ones(SHAPE, dtype=np.float32))


@pytest.mark.parametrize("baseline", [richardson_lucy_central, wiener_central, sv_richardson_lucy, sv_wiener])
def test_the_2d_baselines_refuse_a_3d_model_saying_what_to_use(baseline):
    with pytest.raises(ValueError, match=r"is a 3-D PSF model \(z-step 0.2 µm\); use .*3d"):
        baseline(np.ones((32, 32), dtype=np.float32), MODEL)


def test_the_operator_runs_in_float64_too(point_cloud):
    _, noisy, _ = point_cloud
    op64 = SpatiallyVaryingBlur3D(MODEL, SHAPE, dtype=torch.float64)

    out = sv_richardson_lucy_3d(noisy, op64, iterations=2)

    np.testing.assert_allclose(out, sv_richardson_lucy_3d(noisy, MODEL, iterations=2), rtol=1e-4, atol=1e-6)
