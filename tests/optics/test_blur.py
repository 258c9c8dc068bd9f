import subprocess
import sys

import numpy as np
import pytest
import torch
from scipy import ndimage
from skimage import data, transform

from napari_coordgate.optics.blur import (
    SpatiallyVaryingBlur,
    add_noise,
    brute_force_blur,
    check_image,
    normalized_coordinates,
    synthesize_pairs,
)
from napari_coordgate.optics.models import psf_at
from napari_coordgate.optics.psf import PRESETS, PSFConfig

EDGE = PRESETS["edge_defocus_astigmatism"]


def _camera(shape):
    image = transform.resize(data.camera().astype(np.float64) / 255.0, shape, anti_aliasing=True)
    return image.astype(np.float32)


def _rel_err(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def brute_force_case():
    """A small non-square specimen and its exact spatially varying blur (computed once: it is slow)."""
    image = _camera((40, 52))
    return image, brute_force_blur(image, EDGE)


def test_uniform_model_equals_ordinary_convolution():
    cfg = PSFConfig(astig_0=0.2, coma_x=0.1, grid=4, psf_size=15)  # aberrated, but the same everywhere
    image = np.random.default_rng(0).random((3, 37, 50))
    op = SpatiallyVaryingBlur(cfg, image.shape[-2:], dtype=torch.float64)

    blurred = op.forward(image)

    psf = psf_at(cfg, 0.0, 0.0)
    for plane, out in zip(image, blurred):
        # SciPy's "reflect" is the half-sample symmetric extension the operator documents
        np.testing.assert_allclose(out, ndimage.convolve(plane, psf, mode="reflect"), atol=1e-6)


def test_brute_force_of_uniform_model_equals_ordinary_convolution():
    cfg = PSFConfig(model="gaussian", sigma_px=1.3, psf_size=9)
    image = np.random.default_rng(1).random((12, 17))

    exact = brute_force_blur(image, cfg)

    np.testing.assert_allclose(exact, ndimage.convolve(image, psf_at(cfg, 0, 0), mode="reflect"), atol=1e-6)


@pytest.mark.parametrize(
    "cfg, shape",
    [
        (EDGE, (48, 64)),
        (PRESETS["strong_astigmatism"].replace(grid=5), (33, 29)),
        (PRESETS["gaussian"].replace(grid=1), (20, 24)),
        (PRESETS["gaussian"].replace(grid=9), (7, 40)),  # PSF larger than the frame: many reflections
    ],
)
def test_adjoint_identity(cfg, shape):
    rng = np.random.default_rng(2)
    x = rng.random(shape)
    y = rng.random(shape)
    op = SpatiallyVaryingBlur(cfg, shape)

    lhs = float(np.sum(op.forward(x).astype(np.float64) * y))
    rhs = float(np.sum(x * op.adjoint(y).astype(np.float64)))

    assert abs(lhs - rhs) <= 1e-5 * abs(lhs)


def test_adjoint_is_not_the_forward():
    # guards the identity test: a symmetric-looking operator would pass it trivially
    shape = (30, 30)
    op = SpatiallyVaryingBlur(EDGE.replace(grid=3), shape)
    y = np.random.default_rng(3).random(shape)

    assert _rel_err(op.forward(y), op.adjoint(y)) > 1e-3


def test_interpolated_blur_matches_brute_force_within_2_percent(brute_force_case):
    image, exact = brute_force_case
    assert EDGE.grid == PSFConfig().grid  # the preset uses the default K

    fast = SpatiallyVaryingBlur(EDGE, image.shape).forward(image)

    assert _rel_err(fast, exact) <= 0.02


def test_error_falls_as_grid_grows(brute_force_case):
    image, exact = brute_force_case

    errors = [_rel_err(SpatiallyVaryingBlur(EDGE.replace(grid=k), image.shape).forward(image), exact)
              for k in (2, 3, 5, 7, 9)]

    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    assert errors[0] > 2 * errors[-1]


def test_border_not_darkened():
    flat = np.full((45, 60), 3.0, dtype=np.float32)
    uniform = PSFConfig(defocus=0.3, astig_0=0.1, psf_size=25)

    blurred = SpatiallyVaryingBlur(uniform, flat.shape).forward(flat)

    # zero padding would halve the edge and quarter the corners
    np.testing.assert_allclose(blurred, 3.0, rtol=1e-5)


def test_border_not_darkened_by_a_varying_model():
    flat = np.ones((200, 240), dtype=np.float32)

    blurred = SpatiallyVaryingBlur(EDGE, flat.shape).forward(flat)

    # a flat specimen under a varying PSF is not exactly flat (light is redistributed where the PSF changes
    # within its own width), but the frame edge keeps its brightness
    ring = np.concatenate([blurred[0], blurred[-1], blurred[:, 0], blurred[:, -1]])
    assert ring.min() > 0.95 and abs(ring.mean() - 1.0) < 0.02


def test_blur_spreads_light_more_at_the_edge():
    impulses = np.zeros((64, 64), dtype=np.float32)
    impulses[32, 32] = impulses[2, 2] = 1.0
    op = SpatiallyVaryingBlur(EDGE, impulses.shape)

    blurred = op.forward(impulses)

    assert blurred[2, 2] < 0.5 * blurred[32, 32]


def test_stack_is_blurred_plane_by_plane():
    stack = np.random.default_rng(4).random((2, 3, 24, 31)).astype(np.float32)
    op = SpatiallyVaryingBlur(PRESETS["gaussian"].replace(grid=3), stack.shape[-2:])

    blurred = op.forward(stack)

    assert blurred.shape == stack.shape and blurred.dtype == np.float32
    np.testing.assert_allclose(blurred[1, 2], op.forward(stack[1, 2]), atol=1e-6)
    np.testing.assert_allclose(op.adjoint(stack)[0, 1], op.adjoint(stack[0, 1]), atol=1e-6)


def test_integer_images_are_accepted():
    image = (np.random.default_rng(5).random((20, 20)) * 255).astype(np.uint8)
    op = SpatiallyVaryingBlur("gaussian", image.shape)

    np.testing.assert_allclose(op.forward(image), op.forward(image.astype(np.float32)), atol=1e-5)


def test_operator_runs_on_the_requested_device(device):
    image = _camera((40, 48))
    cpu = SpatiallyVaryingBlur(EDGE, image.shape, device="cpu").forward(image)

    on_device = SpatiallyVaryingBlur(EDGE, image.shape, device=device)

    assert on_device.device.type == device.type
    np.testing.assert_allclose(on_device.forward(image), cpu, atol=1e-5)


@pytest.mark.parametrize(
    "image, message",
    [
        (np.array([[1.0, np.nan], [0.0, 1.0]]), "NaN or Inf"),
        (np.array([[1.0, np.inf], [0.0, 1.0]]), "NaN or Inf"),
        (np.zeros((0, 5)), "empty"),
        (np.zeros(5), "expected"),
        (np.zeros((2, 2), dtype=bool), "boolean"),
        (np.zeros((2, 2), dtype=complex), "complex"),
        (np.array([["a", "b"], ["c", "d"]]), "numeric"),
    ],
)
def test_bad_images_raise_errors_that_say_what_to_do(image, message):
    with pytest.raises(ValueError, match=message) as info:
        check_image(image)

    assert "image" in str(info.value)


def test_frame_shape_mismatch_is_a_clear_error():
    op = SpatiallyVaryingBlur("gaussian", (20, 30))

    with pytest.raises(ValueError, match=r"built for \(20, 30\)"):
        op.forward(np.zeros((30, 20)))


def test_noise_is_seeded():
    clean = _camera((32, 32))

    a = add_noise(clean, photons=200, read_noise=2.0, seed=7)
    b = add_noise(clean, photons=200, read_noise=2.0, seed=7)
    c = add_noise(clean, photons=200, read_noise=2.0, seed=8)

    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert a.dtype == np.float32 and a.shape == clean.shape


def test_noise_has_the_requested_statistics():
    flat = np.full((200, 200), 5.0)

    shot = add_noise(flat, photons=100, seed=0)  # 100 photons per pixel: relative sd 0.1
    read = add_noise(flat, photons=None, read_noise=0.5, offset=10.0, seed=0)

    assert shot.mean() == pytest.approx(5.0, rel=0.01)
    assert shot.std() == pytest.approx(0.5, rel=0.05)
    assert np.allclose(shot / 5.0 * 100, np.round(shot / 5.0 * 100), atol=1e-3)  # whole photons
    assert read.mean() == pytest.approx(15.0, rel=0.01)
    assert read.std() == pytest.approx(0.5, rel=0.05)


def test_synthesize_pairs_is_reproducible_float32():
    images = [_camera((30, 40)), _camera((30, 40))[::-1].copy()]

    sharp1, blurred1 = synthesize_pairs(images, "gaussian", seed=3, photons=500, read_noise=1.0)
    sharp2, blurred2 = synthesize_pairs(np.stack(images), "gaussian", seed=3, photons=500, read_noise=1.0)

    assert sharp1.dtype == blurred1.dtype == np.float32
    assert sharp1.shape == blurred1.shape == (2, 30, 40)
    np.testing.assert_array_equal(sharp1, np.stack(images))
    np.testing.assert_array_equal(blurred1, blurred2)
    assert not np.allclose(blurred1, SpatiallyVaryingBlur("gaussian", (30, 40)).forward(sharp1), atol=1e-3)


def test_synthesize_pairs_without_noise_is_the_blur_of_the_image_above_its_minimum():
    image = _camera((30, 40)) + 0.25  # a background: the blur acts on the light above it
    lo = image.min()

    sharp, blurred = synthesize_pairs(image, EDGE)

    np.testing.assert_array_equal(blurred, SpatiallyVaryingBlur(EDGE, image.shape).forward(image - lo) + lo)
    assert not np.array_equal(blurred, SpatiallyVaryingBlur(EDGE, image.shape).forward(image))


def test_synthesize_pairs_rejects_mixed_shapes():
    with pytest.raises(ValueError, match="different shapes"):
        synthesize_pairs([np.zeros((10, 10)), np.zeros((10, 12))], "gaussian")


def test_normalized_coordinates_match_the_network_convention():
    np.testing.assert_allclose(normalized_coordinates(5), [-1.0, -0.5, 0.0, 0.5, 1.0])
    np.testing.assert_allclose(normalized_coordinates(1), [0.0])


def test_optics_never_imports_napari_qt_or_the_network():
    code = (
        "import sys; import napari_coordgate.optics.psf, napari_coordgate.optics.blur, "
        "napari_coordgate.optics.deconv; "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('napari', 'PyQt5', 'PyQt6', 'PySide2', 'PySide6', "
        "'qtpy', 'magicgui') or m.startswith('napari_coordgate.nn')]; print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)

    assert result.returncode == 0, result.stdout + result.stderr


def test_a_region_of_the_field_is_blurred_with_the_psfs_of_its_place():
    image = _camera((96, 112))
    whole = SpatiallyVaryingBlur(EDGE, image.shape).forward(image)
    crop = (slice(4, 52), slice(50, 110))  # near the top-right corner: edge PSFs
    p = EDGE.psf_size // 2
    inner = (slice(p, -p),) * 2  # beyond the reach of the region's own reflected border

    op = SpatiallyVaryingBlur(EDGE, (48, 60), offset=(4, 50), full_field=(96, 112))
    region = op.forward(image[crop])
    as_if_whole = SpatiallyVaryingBlur(EDGE, (48, 60)).forward(image[crop])

    np.testing.assert_allclose(region[inner], whole[crop][inner], atol=1e-5)
    assert _rel_err(as_if_whole[inner], whole[crop][inner]) > 20 * _rel_err(region[inner], whole[crop][inner])


def test_adjoint_identity_for_a_region_of_the_field():
    rng = np.random.default_rng(6)
    x, y = rng.random((2, 30, 41))
    op = SpatiallyVaryingBlur(EDGE.replace(grid=5), (30, 41), offset=(60, 3), full_field=(100, 90))

    lhs = float(np.sum(op.forward(x).astype(np.float64) * y))
    rhs = float(np.sum(x * op.adjoint(y).astype(np.float64)))

    assert abs(lhs - rhs) <= 1e-5 * abs(lhs)


@pytest.mark.parametrize("offset, full_field", [((-1, 0), (64, 64)), ((40, 0), (64, 64)), ((0, 0), (20, 64))])
def test_a_region_outside_its_field_is_a_clear_error(offset, full_field):
    with pytest.raises(ValueError, match="does not fit"):
        SpatiallyVaryingBlur("gaussian", (32, 32), offset=offset, full_field=full_field)


@pytest.mark.filterwarnings("ignore::napari_coordgate.optics.psf.UndersamplingWarning")  # binning undersamples
@pytest.mark.parametrize("cfg", [PRESETS["gaussian"].replace(sigma_px=2.0), EDGE], ids=["gaussian", "pupil"])
def test_a_binned_camera_sees_the_psf_model_in_binned_pixels(cfg):
    from napari_coordgate.optics.blur import binned_psf_config

    image = _camera((128, 128))
    fine = SpatiallyVaryingBlur(cfg, image.shape).forward(image)
    bin2 = lambda a: a.reshape(64, 2, 64, 2).mean(axis=(1, 3))  # noqa: E731

    binned = binned_psf_config(cfg, 2)
    coarse = SpatiallyVaryingBlur(binned, (64, 64)).forward(bin2(image))
    unscaled = SpatiallyVaryingBlur(cfg, (64, 64)).forward(bin2(image))

    assert binned_psf_config(cfg, 1) == cfg
    assert _rel_err(coarse, bin2(fine)) < 0.02
    assert _rel_err(unscaled, bin2(fine)) > 2 * _rel_err(coarse, bin2(fine))
