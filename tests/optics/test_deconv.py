import numpy as np
import pytest
from skimage import data, transform
from skimage.metrics import peak_signal_noise_ratio

from napari_coordgate.optics.blur import SpatiallyVaryingBlur
from napari_coordgate.optics.deconv import (
    central_psf,
    richardson_lucy_central,
    sv_richardson_lucy,
    wiener_central,
)
from napari_coordgate.optics.models import psf_at
from napari_coordgate.optics.psf import PRESETS

EDGE = PRESETS["edge_defocus_astigmatism"]


@pytest.fixture(scope="module")
def specimen():
    image = transform.resize(data.camera().astype(np.float64) / 255.0, (96, 112), anti_aliasing=True)
    sharp = image.astype(np.float32)
    blurred = SpatiallyVaryingBlur(EDGE, sharp.shape).forward(sharp)
    return sharp, blurred


def _psnr(ref, x, mask=None):
    if mask is None:
        return peak_signal_noise_ratio(ref, x, data_range=1.0)
    mse = float(np.mean((ref[mask] - x[mask]) ** 2))
    return 10 * np.log10(1.0 / mse)


def _edge_mask(shape):
    y = np.linspace(-1, 1, shape[0])[:, None]
    x = np.linspace(-1, 1, shape[1])[None, :]
    return np.hypot(y, x) >= 1.0


@pytest.mark.parametrize(
    "method",
    [
        lambda im: richardson_lucy_central(im, EDGE, 8),
        lambda im: wiener_central(im, EDGE, 0.02),
        lambda im: sv_richardson_lucy(im, EDGE, 8),
    ],
    ids=["rl_central", "wiener_central", "sv_rl"],
)
def test_baselines_return_float32_in_input_units(specimen, method):
    _, blurred = specimen

    unit = method(blurred)
    scaled = method(blurred.astype(np.float64) * 1000.0)

    assert unit.dtype == scaled.dtype == np.float32
    assert unit.shape == blurred.shape
    np.testing.assert_allclose(scaled, unit * 1000.0, rtol=2e-3, atol=2e-3 * 1000 * float(unit.max()))
    assert abs(float(unit.mean()) - float(blurred.mean())) < 0.05 * float(blurred.mean())


@pytest.mark.parametrize("method", [richardson_lucy_central, sv_richardson_lucy, wiener_central])
def test_baselines_treat_a_stack_plane_by_plane(specimen, method):
    _, blurred = specimen
    stack = np.stack([blurred, blurred[::-1].copy()])
    arg = 0.02 if method is wiener_central else 4

    out = method(stack, EDGE, arg)

    assert out.shape == stack.shape and out.dtype == np.float32
    np.testing.assert_allclose(out[1], method(stack[1], EDGE, arg), atol=1e-5)


def test_sv_rl_improves_psnr(specimen):
    sharp, blurred = specimen

    restored = sv_richardson_lucy(blurred, EDGE, 20)

    assert _psnr(sharp, restored) > _psnr(sharp, blurred) + 2.0


def test_sv_rl_stays_finite_on_black_regions():
    sharp = np.zeros((48, 56), dtype=np.float32)
    sharp[10:20, 12:30] = 1.0  # mostly black: blurred values there are FFT round-off
    blurred = SpatiallyVaryingBlur(EDGE, sharp.shape).forward(sharp)

    restored = sv_richardson_lucy(blurred, EDGE, 60)

    assert np.isfinite(restored).all() and restored.min() >= 0
    assert _psnr(sharp, restored) > _psnr(sharp, blurred) + 2.0


def test_sv_rl_beats_central_rl_at_the_field_edge(specimen):
    sharp, blurred = specimen
    edge = _edge_mask(sharp.shape)

    central = richardson_lucy_central(blurred, EDGE, 20)
    varying = sv_richardson_lucy(blurred, EDGE, 20)

    assert _psnr(sharp, varying, edge) > _psnr(sharp, central, edge) + 0.5


def test_rl_central_improves_psnr_for_a_uniform_blur():
    sharp = transform.resize(data.camera() / 255.0, (64, 64), anti_aliasing=True).astype(np.float32)
    cfg = PRESETS["gaussian"].replace(sigma_radial_h2=0.0, sigma_tangential_h2=0.0, sigma_px=1.5)
    blurred = SpatiallyVaryingBlur(cfg, sharp.shape).forward(sharp)

    restored = richardson_lucy_central(blurred, cfg, 20)
    restored_wiener = wiener_central(blurred, cfg, 0.005)

    assert _psnr(sharp, restored) > _psnr(sharp, blurred) + 1.0
    assert _psnr(sharp, restored_wiener) > _psnr(sharp, blurred) + 1.0


def test_sv_rl_cancel(specimen):
    _, blurred = specimen
    op = SpatiallyVaryingBlur(EDGE, blurred.shape)
    calls = {"stop": 0}
    progress = []

    def should_stop():
        calls["stop"] += 1
        return calls["stop"] > 3

    stopped = sv_richardson_lucy(blurred, op, 50, should_stop=should_stop, on_iteration=lambda *a: progress.append(a))

    assert progress == [(1, 50), (2, 50), (3, 50)]
    # a stop returns exactly the estimate of the iterations that ran
    np.testing.assert_array_equal(stopped, sv_richardson_lucy(blurred, op, 3))


def test_sv_rl_cancel_leaves_unstarted_planes_as_they_were(specimen):
    _, blurred = specimen
    stack = np.stack([blurred, blurred * 0.5])
    calls = {"n": 0}

    def should_stop():
        calls["n"] += 1
        return calls["n"] > 2

    out = sv_richardson_lucy(stack, EDGE, 5, should_stop=should_stop)

    np.testing.assert_array_equal(out[1], stack[1])
    assert not np.array_equal(out[0], stack[0])


def test_zero_iterations_return_the_input(specimen):
    _, blurred = specimen

    np.testing.assert_array_equal(sv_richardson_lucy(blurred, EDGE, 0), blurred)
    np.testing.assert_array_equal(richardson_lucy_central(blurred, EDGE, 0), blurred)


def test_sv_rl_models_a_known_background(specimen):
    sharp, blurred = specimen

    restored = sv_richardson_lucy(blurred + 0.2, EDGE, 20, background=0.2)

    assert _psnr(sharp, restored) > _psnr(sharp, blurred) + 2.0


def test_sv_rl_rejects_an_operator_for_another_frame(specimen):
    _, blurred = specimen
    op = SpatiallyVaryingBlur(EDGE, (32, 32))

    with pytest.raises(ValueError, match="built for"):
        sv_richardson_lucy(blurred, op, 2)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda im: richardson_lucy_central(im, EDGE, -1), "iterations"),
        (lambda im: sv_richardson_lucy(im, EDGE, 2.5), "iterations"),
        (lambda im: wiener_central(im, EDGE, 0.0), "balance"),
        (lambda im: sv_richardson_lucy(im, EDGE, 2, background=-1.0), "background"),
        (lambda im: richardson_lucy_central(np.where(im > 0.5, np.nan, im), EDGE, 2), "NaN"),
        (lambda im: sv_richardson_lucy(im[:0], EDGE, 2), "empty"),
    ],
)
def test_bad_arguments_are_named(specimen, call, message):
    _, blurred = specimen

    with pytest.raises(ValueError, match=message):
        call(blurred)


def test_central_psf_is_the_psf_at_the_frame_centre():
    np.testing.assert_array_equal(central_psf(EDGE, (50, 70)), psf_at(EDGE, 0.0, 0.0, (50, 70)))


def test_wiener_kernels_sum_to_one_and_the_central_one_deconvolves_the_centre():
    import torch

    from napari_coordgate.metrics import psnr
    from napari_coordgate.nn.prefilter import FilterBank
    from napari_coordgate.optics.deconv import wiener_kernels
    from napari_coordgate.samples.specimens import specimen_fields

    shape = (96, 96)
    op = SpatiallyVaryingBlur("edge_defocus_astigmatism", shape)
    sharp = specimen_fields(1, shape, seed=3, sources=("procedural",))[0]
    blurred = op.forward(sharp)
    k = wiener_kernels("edge_defocus_astigmatism", shape, grid=3, size=31, balance=1e-3)
    assert k.shape == (9, 31, 31) and k.dtype == np.float32
    np.testing.assert_allclose(k.sum(axis=(1, 2)), 1.0, atol=1e-4)
    bank = FilterBank(9, 31)
    bank.set_kernels(k)
    with torch.no_grad():
        out = bank(torch.from_numpy(blurred)[None, None])[0].numpy()
    centre = (slice(36, 60), slice(36, 60))
    # at the centre the central kernel (index 4) deconvolves: closer to the sharp image than the blur
    assert psnr(sharp[centre], out[4][centre], data_range=1) > psnr(sharp[centre], blurred[centre], data_range=1) + 2


def test_wiener_kernels_reject_bad_arguments():
    from napari_coordgate.optics.deconv import wiener_kernels

    with pytest.raises(ValueError, match="odd"):
        wiener_kernels("gaussian", (64, 64), 3, 8)
    with pytest.raises(ValueError, match="balance"):
        wiener_kernels("gaussian", (64, 64), 3, 9, balance=0.0)


def test_sv_wiener_with_the_models_grid_beats_central_wiener_at_the_edge():
    from napari_coordgate.optics.deconv import sv_wiener
    from napari_coordgate.samples.specimens import specimen_fields

    shape = (96, 96)
    op = SpatiallyVaryingBlur(EDGE, shape)
    sharp = specimen_fields(1, shape, seed=3, sources=("procedural",))[0]
    blurred = op.forward(sharp)
    sv = sv_wiener(blurred, EDGE, balance=1e-3)
    central = wiener_central(blurred, EDGE, balance=1e-3)
    assert sv.shape == shape and sv.dtype == np.float32
    border = np.ones(shape, bool)
    border[16:-16, 16:-16] = False
    def border_psnr(img):
        return peak_signal_noise_ratio(sharp[border], img[border], data_range=1)

    assert border_psnr(sv) > border_psnr(central) + 1


def test_sv_rl_of_a_corner_region_uses_the_psfs_of_its_place_in_the_field(specimen):
    sharp, blurred = specimen  # 96 x 112, blurred as one field
    crop = (slice(0, 48), slice(0, 56))

    placed = sv_richardson_lucy(blurred[crop], EDGE, 15, offset=(0, 0), full_field=(96, 112))
    as_if_whole = sv_richardson_lucy(blurred[crop], EDGE, 15)
    op = SpatiallyVaryingBlur(EDGE, (48, 56), offset=(0, 0), full_field=(96, 112))

    np.testing.assert_array_equal(placed, sv_richardson_lucy(blurred[crop], op, 15))
    assert _psnr(sharp[crop], placed) > _psnr(sharp[crop], as_if_whole) + 3.0  # measured +7.4 dB


def test_rl_central_of_a_region_uses_the_psf_at_the_centre_of_its_field(specimen):
    _, blurred = specimen
    off_axis = EDGE.replace(axis_y=0.6)  # the centre PSF then depends on the field's shape
    roi = blurred[:48, :56]

    in_field = richardson_lucy_central(roi, off_axis, 5, full_field=(96, 300))

    np.testing.assert_array_equal(richardson_lucy_central(roi, off_axis, 5, full_field=(48, 56)),
                                  richardson_lucy_central(roi, off_axis, 5))
    assert not np.allclose(in_field, richardson_lucy_central(roi, off_axis, 5), atol=1e-4)
