"""A finite bead's image and its removal from measured PSFs (issue 22, item 1)."""

import numpy as np
import pytest

from napari_coordgate.calibration import CalibrationError
from napari_coordgate.calibration.beadsize import remove_bead
from napari_coordgate.calibration.calibrate import calibrate
from napari_coordgate.optics.bead import bead_diameter_px, blur_by_bead, sphere_kernel, sphere_otf
from napari_coordgate.samples.beads import EllipticalOptics, _bead_psfs, bead_slide, psf_error

OPTICS = {"na": 0.8, "wavelength_um": 0.52, "immersion": 1.0, "pixel_size_um": 0.16}


def _rel(a, b):
    return np.linalg.norm((a - b).reshape(len(a), -1), axis=1) / np.linalg.norm(b.reshape(len(b), -1), axis=1)


def test_sphere_otf_is_one_at_dc_and_first_vanishes_at_1_43_over_the_diameter():
    d = 5.0
    otf = sphere_otf((512, 512), d)
    assert otf[0, 0] == pytest.approx(1.0)
    f = np.fft.fftfreq(512)
    row = otf[0, : 256]
    first_zero = f[np.argmax(row < 0)]
    assert first_zero == pytest.approx(1.4303 / d, abs=2 / 512)
    assert np.allclose(sphere_otf((16, 16), 0.0), 1.0)


def test_sphere_kernel_has_unit_sum_and_the_projected_sphere_s_second_moment():
    d = 4.0
    k = sphere_kernel(d, 31)
    c = np.arange(31) - 15
    assert k.sum() == pytest.approx(1.0)
    # a projected uniform sphere of radius R has <x²> = R² / 5 along each axis
    assert float((k.sum(axis=0) * c**2).sum()) == pytest.approx((d / 2) ** 2 / 5, rel=0.05)


def test_bead_diameter_in_nm_becomes_pixels_and_needs_a_pixel_size():
    assert bead_diameter_px(200, 0.08) == pytest.approx(2.5)
    assert bead_diameter_px(None, None) == 0.0
    with pytest.raises(ValueError, match="pixel size"):
        bead_diameter_px(200, None)
    with pytest.raises(ValueError, match="bead diameter"):
        bead_diameter_px(-5, 0.1)


def test_remove_bead_recovers_the_point_psf_from_beads_rendered_as_many_points():
    # the beads are summed from shifted PSFs (samples.beads), not made with the sphere_otf the removal divides by
    optics = EllipticalOptics(width=1.8, radial=0.9, tangential=0.25, beta=3.0, psf_size=31)
    y, x, z = np.array([0.0, 0.8]), np.array([0.0, -0.8]), np.zeros(2)
    true = optics.psfs(y, x, z, z)
    beads = _bead_psfs(optics, y, x, z, z, 2.5)
    rng = np.random.default_rng(0)
    noisy = beads + rng.normal(0, 2e-5, beads.shape)
    restored, noise = remove_bead(noisy, 2.5, np.full(2, 2e-5))
    before, after = _rel(beads, true), _rel(restored, true)
    assert np.all(before > 0.1)
    assert np.all(after < 0.4 * before)
    assert np.all(noise > 2e-5)  # dividing by the bead amplifies the noise
    assert np.allclose(restored.sum(axis=(1, 2)), noisy.sum(axis=(1, 2)), rtol=5e-3)


def test_blur_by_bead_keeps_the_flux_and_broadens():
    psf = np.zeros((1, 15, 15))
    psf[0, 7, 7] = 1.0
    out = blur_by_bead(psf, 3.0)
    assert out.sum() == pytest.approx(1.0, abs=5e-3)
    assert out.max() < 0.5
    assert np.array_equal(blur_by_bead(psf, 0.0), psf)


def test_calibrate_with_the_bead_diameter_measures_a_sharper_psf_than_point_sources():
    optics = EllipticalOptics(width=1.8, radial=0.6, tangential=0.2, beta=3.0, psf_size=25)
    image, _ = bead_slide(optics, (384, 384), n_beads=90, photons=3000, seed=3, bead_diameter_px=2.5)
    point = calibrate(image, model="grid", **OPTICS)
    sized = calibrate(image, model="grid", bead_diameter_nm=400.0, **OPTICS)  # 0.4 µm / 0.16 µm = 2.5 px
    e_point = np.median(psf_error(point.model, optics, image.shape))
    e_sized = np.median(psf_error(sized.model, optics, image.shape))
    assert e_sized < 0.6 * e_point
    assert any("point sources" in w for w in point.warnings)
    assert not any("point sources" in w for w in sized.warnings)


def test_calibrate_refuses_a_bead_diameter_without_a_pixel_size():
    image, _ = bead_slide(EllipticalOptics(psf_size=21), (64, 64), n_beads=5, photons=1000, seed=0)
    with pytest.raises(CalibrationError, match="pixel size"):
        calibrate(image, model="grid", bead_diameter_nm=200.0)
