"""The check without ground truth: the beads of a bead image, and held-out beads of a calibration report found in it,
before and after deblurring (FWHM and the light within one in-focus FWHM, per field ring)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from napari_coordgate.calibration.beadcheck import bead_fwhm_report, holdout_beads, holdout_report
from napari_coordgate.coords import field_position

FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))
SHAPE = (256, 256)
GRID = np.arange(16, 256, 32, dtype=float)  # 8 x 8 beads: centre, middle and edge rings


def _radius(y, x):
    return np.hypot(field_position(y, SHAPE[0]), field_position(x, SHAPE[1]))


def _beads(ys, xs, fwhm, photons=5000.0, seed=0, noise=True):
    """Gaussian beads sampled at pixel centres on a background of 100, Poisson noise (seeded)."""
    yy, xx = np.mgrid[: SHAPE[0], : SHAPE[1]].astype(float)
    image = np.full(SHAPE, 100.0)
    for y, x, f in zip(ys, xs, fwhm):
        s = f / FWHM_PER_SIGMA
        image += photons * np.exp(-((yy - y) ** 2 + (xx - x) ** 2) / (2 * s * s))
    return np.random.default_rng(seed).poisson(image).astype(np.float32) if noise else image.astype(np.float32)


@pytest.fixture(scope="module")
def slide():
    y, x = (a.ravel() + 0.3 for a in np.meshgrid(GRID, GRID, indexing="ij"))
    blurry = _beads(y, x, 2.5 + 1.5 * _radius(y, x), seed=1)  # wider toward the edge
    sharp = _beads(y, x, np.full(y.size, 2.0), seed=2)
    return y, x, blurry, sharp


def _report(y, x, holdout, shape=SHAPE, image=None):
    n = len(y)
    return {"field_shape": list(shape), "beads": {"y": list(map(float, y)), "x": list(map(float, x)),
                                                  "holdout": list(holdout), "image": image or [0] * n}}


def test_holdout_beads_are_the_rows_of_the_first_image_the_report_marks():
    report = _report([10.0, 20.0, 30.0, 40.0], [1.0, 2.0, 3.0, 4.0], [True, False, True, True], image=[0, 0, 0, 1])
    y, x = holdout_beads(report, SHAPE)
    np.testing.assert_array_equal(y, [10.0, 30.0])
    np.testing.assert_array_equal(x, [1.0, 3.0])


@pytest.mark.parametrize("report, message", [
    ({"error": "x"}, "no bead table"),
    ({"beads": {"y": [1.0], "x": [2.0]}}, "lists no holdout beads: calibrate with --holdout"),
    (_report([1.0], [2.0], [False]), "lists no holdout beads"),
    (_report([1.0], [2.0], [True], shape=(128, 256)), "128 x 256 bead image but the image given is 256 x 256"),
])
def test_a_report_without_usable_holdout_beads_is_a_clear_error(report, message):
    with pytest.raises(ValueError, match=message):
        holdout_beads(report, SHAPE, what="report.json")


def test_a_gaussian_beads_fwhm_and_energy_are_what_their_definitions_say():
    y, x = (a.ravel() for a in np.meshgrid(GRID[2:6], GRID[2:6], indexing="ij"))
    image = _beads(y, x, np.full(y.size, 3.0), noise=False)
    rep = holdout_report(image, image, y, x)
    assert rep["radius_px"] == pytest.approx(3.0, rel=0.03)
    for bead in rep["beads"]:
        assert bead["fwhm_before"] == pytest.approx(3.0, rel=0.03)
        assert bead["energy_before"] == pytest.approx(1 - 2.0 ** -4, abs=0.01), "1 - exp(-FWHM^2 / (2 sigma^2))"


def test_a_sharper_after_image_has_smaller_beads_and_more_light_near_their_centres_in_every_ring(slide):
    y, x, blurry, sharp = slide
    held = np.arange(y.size) % 3 == 0
    rep = holdout_report(blurry, sharp, y[held], x[held])
    assert rep["matched"] == held.sum() and rep["radius_ring"] == "centre"
    centre = [b["fwhm_before"] for b in rep["beads"] if b["ring"] == "centre"]
    assert rep["radius_px"] == pytest.approx(np.median(centre))
    for before, after in zip(rep["before"]["rings"], rep["after"]["rings"]):
        assert before["beads"] > 0, before["name"]
        assert after["fwhm"] < before["fwhm"] and after["energy"] > before["energy"], before["name"]
    edge, centre = rep["before"]["rings"][2], rep["before"]["rings"][0]
    assert edge["fwhm"] > centre["fwhm"] and edge["energy"] < centre["energy"], "the blur grows toward the edge"


def test_the_same_image_before_and_after_scores_the_same(slide):
    y, x, blurry, _ = slide
    rep = holdout_report(blurry, blurry, y[::5], x[::5])
    assert rep["before"] == rep["after"]


def test_beads_are_matched_within_two_pixels_and_the_others_left_out(slide):
    y, x, blurry, sharp = slide
    listed_y = np.concatenate([y[:4] + 1.5, [y[0] + 16.0]])  # 1.5 px off: the same bead; between beads: none
    listed_x = np.concatenate([x[:4], [x[0] + 16.0]])
    rep = holdout_report(blurry, sharp, listed_y, listed_x)
    assert (rep["holdout_beads"], rep["matched"]) == (5, 4)
    with pytest.raises(ValueError, match="none of the 2 holdout beads is within 2 px"):
        holdout_report(blurry, sharp, y[:2] + 16.0, x[:2] + 16.0)


# -- bead_fwhm_report: the beads of the bead image, measured at the same place after deblurring ---------------------
def test_bead_report_measures_after_at_the_bead_images_beads_not_at_spots_the_model_made(slide):
    y, x, blurry, sharp = slide
    rng = np.random.default_rng(3)
    sy, sx = rng.uniform(8, 248, 40), rng.uniform(8, 248, 40)  # 40 sharp spots made of noise, between the beads
    far = np.min(np.hypot(sy[:, None] - y[None], sx[:, None] - x[None]), axis=1) > 8
    spotted = sharp + _beads(sy[far], sx[far], np.full(far.sum(), 1.0), photons=3000.0, noise=False) - 100.0
    clean, noisy = bead_fwhm_report(blurry, sharp), bead_fwhm_report(blurry, spotted)
    assert noisy["after"]["beads"] == noisy["before"]["beads"] == clean["after"]["beads"] >= 60
    assert noisy["after"]["positions"] == noisy["before"]["positions"]
    for ring_clean, ring_noisy in zip(clean["after"]["rings"], noisy["after"]["rings"]):
        assert ring_noisy["fwhm"] == pytest.approx(ring_clean["fwhm"], rel=0.02), ring_clean["name"]
        assert ring_noisy["fwhm"] == pytest.approx(2.0, rel=0.1), "the sharp slide's beads are 2 px"


def test_bead_report_measures_a_bead_restored_below_a_pixel_instead_of_dropping_it_as_a_hot_pixel(slide):
    y, x, blurry, _ = slide
    restored = _beads(y, x, np.full(y.size, 0.5), photons=20000.0, seed=4)  # the detector takes them for hot pixels
    rep = bead_fwhm_report(blurry, restored)
    assert rep["after"]["beads"] == rep["before"]["beads"]
    # the half-maximum area of a spot sampled at pixel centres, interpolated, is about a pixel and a third across
    assert all(0.4 < ring["fwhm"] < 1.5 for ring in rep["after"]["rings"]), rep["after"]["rings"]
    assert all(ring["fwhm"] > 2.4 for ring in rep["before"]["rings"])


def test_bead_report_ellipticity_is_one_minus_minor_over_major():
    yy, xx = np.mgrid[: SHAPE[0], : SHAPE[1]].astype(float)
    image = np.full(SHAPE, 100.0)
    y, x = (a.ravel() + 0.3 for a in np.meshgrid(GRID[1:7], GRID[1:7], indexing="ij"))
    for b, a in zip(y, x):  # sigma 3 px along x, 1.5 px along y: ellipticity 0.5
        image += 5000.0 * np.exp(-((yy - b) ** 2) / (2 * 1.5**2) - (xx - a) ** 2 / (2 * 3.0**2))
    rep = bead_fwhm_report(image, image)
    for ring in rep["before"]["rings"]:
        if ring["beads"]:
            assert ring["ellipticity"] == pytest.approx(0.5, abs=0.05), ring["name"]
    assert rep["before"] == rep["after"]
