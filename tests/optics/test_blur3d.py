"""The 3-D spatially varying blur (issue 24): equal to its voxel-by-voxel reference, an exact adjoint, a point
reproduces the PSF of its place; simulated 3-D pairs; 2-D and 3-D models are not mixed up."""

import numpy as np
import pytest
import torch
from scipy import ndimage

from napari_coordgate.coords import field_position
from napari_coordgate.optics.blur import SpatiallyVaryingBlur, brute_force_blur, synthesize_pairs
from napari_coordgate.optics.blur3d import SpatiallyVaryingBlur3D, brute_force_blur3d, synthesize_pairs3d
from napari_coordgate.optics.psf import PRESETS, PSFConfig
from napari_coordgate.optics.psf3d import MeasuredGrid3DPSF, Pupil3DPSF

SMALL = Pupil3DPSF.from_pupil(
    PSFConfig(name="small", na=0.8, pixel_size_um=0.1, psf_size=9, grid=3, astig_h2=0.2, coma_h=0.1),
    z_step_um=0.2, psf_depth=7, tilt_y_um=0.2, curvature_um=0.2,
)


def _measured(k=3, d=5, s=7, seed=0):
    return MeasuredGrid3DPSF(np.random.default_rng(seed).random((k, k, d, s, s)), z_step_um=0.25)


@pytest.mark.parametrize("model, shape", [
    (SMALL, (9, 32, 32)),
    (_measured(), (9, 20, 26)),
    (_measured(k=4, d=9, s=5), (5, 11, 23)),  # PSF deeper than the volume: reflected many times in z
    (_measured(k=1, d=3, s=9), (6, 7, 12)),  # PSF wider than the frame
])
def test_fast_blur_equals_the_voxel_by_voxel_reference(model, shape):
    volume = np.random.default_rng(1).random(shape)
    op = SpatiallyVaryingBlur3D(model, shape, dtype=torch.float64)

    fast = op.forward(volume)

    np.testing.assert_allclose(fast, brute_force_blur3d(volume, model), atol=1e-6)


def test_the_exact_reference_differs_from_the_interpolated_one_by_the_grids_interpolation_error():
    volume = np.random.default_rng(8).random((5, 12, 14))
    measured = _measured(d=3, s=5)

    np.testing.assert_allclose(brute_force_blur3d(volume, measured, exact=True), brute_force_blur3d(volume, measured),
                               atol=1e-6)  # a measured grid's PSFs are its interpolated nodes
    exact = brute_force_blur3d(volume, SMALL, exact=True)
    interpolated = brute_force_blur3d(volume, SMALL)
    assert 0 < np.linalg.norm(exact - interpolated) / np.linalg.norm(exact) < 0.1  # 3.7 %: K = 3, strong aberrations


def test_a_uniform_model_is_an_ordinary_3d_convolution_with_reflected_borders():
    psf = np.random.default_rng(2).random((5, 7, 7))
    model = MeasuredGrid3DPSF(np.broadcast_to(psf, (3, 3, 5, 7, 7)), z_step_um=0.2)
    volume = np.random.default_rng(3).random((8, 15, 18))

    out = SpatiallyVaryingBlur3D(model, volume.shape, dtype=torch.float64).forward(volume)

    # SciPy's "reflect" is the half-sample symmetric extension the operator documents
    np.testing.assert_allclose(out, ndimage.convolve(volume, psf / psf.sum(), mode="reflect"), atol=1e-6)


@pytest.mark.parametrize("model, shape", [(SMALL, (9, 24, 20)), (_measured(k=4, d=9, s=5), (5, 11, 23))])
def test_adjoint_identity(model, shape):
    rng = np.random.default_rng(4)
    x, y = torch.from_numpy(rng.random((2, *shape))), torch.from_numpy(rng.random((2, *shape)))
    op = SpatiallyVaryingBlur3D(model, shape, dtype=torch.float64)

    lhs = float((op.apply(x) * y).sum())
    rhs = float((x * op.apply_adjoint(y)).sum())

    assert abs(lhs - rhs) <= 1e-12 * abs(lhs)
    np.testing.assert_allclose(op.adjoint(y.numpy()), op.apply_adjoint(y).numpy(), rtol=1e-5)


@pytest.mark.parametrize("model, where", [(_measured(), (7, 11)), (SMALL, (16, 16)), (SMALL, (16, 32))])
def test_a_point_reproduces_the_psf_of_its_place(model, where):
    shape = (11, 33, 33) if model is SMALL else (11, 20, 26)
    volume = np.zeros(shape)
    (r, c), z = where, 5
    volume[z, r, c] = 1.0
    pz, p = model.psf_depth // 2, model.psf_size // 2

    out = SpatiallyVaryingBlur3D(model, shape, dtype=torch.float64).forward(volume)

    # the pupil model's nodes sit on pixels 0, 16 and 32 of 33: there the interpolation is the model's own PSF
    psf = model.psf_at(field_position(r, shape[1]), field_position(c, shape[2]), shape[1:])
    if c + p < shape[2] and c - p >= 0:
        np.testing.assert_allclose(out[z - pz : z + pz + 1, r - p : r + p + 1, c - p : c + p + 1], psf, atol=1e-6)
        assert out.sum() == pytest.approx(1.0, abs=1e-6)
    else:  # on the last column: its mirror image beyond the edge adds the PSF moved by one column
        part = out[z - pz : z + pz + 1, r - p : r + p + 1, c - p :]
        mirrored = psf[:, :, : p + 1] + np.concatenate([np.zeros((*psf.shape[:2], 1)), psf[:, :, :p]], axis=2)
        np.testing.assert_allclose(part, mirrored, atol=1e-6)


def test_a_region_is_blurred_with_the_psfs_of_its_place_in_the_field():
    model = _measured(k=3, d=3, s=5)
    volume = np.random.default_rng(5).random((6, 30, 40))
    whole = SpatiallyVaryingBlur3D(model, volume.shape, dtype=torch.float64).forward(volume)

    region = SpatiallyVaryingBlur3D(model, (6, 14, 20), offset=(8, 12), full_field=(30, 40),
                                    dtype=torch.float64).forward(volume[:, 8:22, 12:32])

    # away from the region's own borders (2 pixels: the PSF radius) it is the whole field's blur there
    np.testing.assert_allclose(region[:, 2:-2, 2:-2], whole[:, 10:20, 14:30], atol=1e-6)


def test_operator_runs_on_the_requested_device(device):
    volume = np.random.default_rng(9).random((5, 20, 24)).astype(np.float32)
    cpu = SpatiallyVaryingBlur3D(SMALL, volume.shape, device="cpu")

    on_device = SpatiallyVaryingBlur3D(SMALL, volume.shape, device=device)

    assert on_device.device.type == device.type
    np.testing.assert_allclose(on_device.forward(volume), cpu.forward(volume), atol=1e-5)
    np.testing.assert_allclose(on_device.adjoint(volume), cpu.adjoint(volume), atol=1e-5)


def test_a_series_of_volumes_is_blurred_volume_by_volume():
    volumes = np.random.default_rng(6).random((3, 5, 12, 14)).astype(np.float32)
    op = SpatiallyVaryingBlur3D(_measured(), volumes.shape[1:])

    together = op.apply(torch.from_numpy(volumes)).numpy()

    for vol, out in zip(volumes, together):
        np.testing.assert_allclose(op.forward(vol), out, atol=1e-6)


def test_wrong_shapes_are_refused_with_what_was_expected():
    op = SpatiallyVaryingBlur3D(_measured(), (5, 12, 14))
    with pytest.raises(ValueError, match=r"built for \(5, 12, 14\)"):
        op.forward(np.zeros((5, 12, 15)))
    with pytest.raises(ValueError, match=r"\(D, H, W\)"):
        SpatiallyVaryingBlur3D(_measured(), (12, 14))
    with pytest.raises(ValueError, match="does not fit inside the field"):
        SpatiallyVaryingBlur3D(_measured(), (5, 12, 14), offset=(10, 0), full_field=(20, 20))


def test_the_2d_blur_refuses_a_3d_model_and_the_3d_blur_a_2d_model_saying_what_to_use():
    with pytest.raises(ValueError, match=r"is a 3-D PSF model \(z-step 0.2 µm\); use SpatiallyVaryingBlur3D"):
        SpatiallyVaryingBlur(SMALL, (32, 32))
    with pytest.raises(ValueError, match="is a 3-D PSF model"):
        brute_force_blur(np.zeros((8, 8)), SMALL)
    with pytest.raises(ValueError, match="is a 3-D PSF model"):
        synthesize_pairs(np.zeros((8, 8)), SMALL)
    with pytest.raises(ValueError, match="is a 2-D PSF model; use SpatiallyVaryingBlur"):
        SpatiallyVaryingBlur3D(PRESETS["gaussian"], (4, 16, 16))


def test_synthesized_3d_pairs_are_the_blur_plus_noise_on_the_scale_of_the_whole_volume():
    rng = np.random.default_rng(7)
    sharp = rng.random((2, 6, 16, 16)).astype(np.float32)
    sharp[:, :3] *= 0.01  # dim planes: on the volume's photon scale they collect few photons
    model = _measured(d=3)

    clean_sharp, clean = synthesize_pairs3d(sharp, model)
    s1, noisy = synthesize_pairs3d(sharp, model, photons=200.0, seed=3)
    _, again = synthesize_pairs3d(list(sharp), model, photons=200.0, seed=3)

    np.testing.assert_array_equal(clean_sharp, sharp)
    np.testing.assert_allclose(clean, SpatiallyVaryingBlur3D(model, sharp.shape[1:]).forward(sharp), atol=1e-5)
    np.testing.assert_array_equal(noisy, again)
    assert noisy.dtype == np.float32 and noisy.shape == sharp.shape
    # the photon scale is the volume's: a dim plane's counts are few, so its relative noise is large
    scale = 200.0 / clean.reshape(2, -1).max(axis=1)
    counts = noisy[0, 0] * scale[0]
    np.testing.assert_allclose(counts, np.round(counts), atol=1e-3)  # whole photons on that scale
    rel = np.abs(noisy[:, 0] - clean[:, 0]).mean() / clean[:, 0].mean()
    assert rel > 0.3
    one_sharp, one_blurred = synthesize_pairs3d(sharp[0], model)
    assert one_sharp.shape == one_blurred.shape == sharp.shape[1:]
