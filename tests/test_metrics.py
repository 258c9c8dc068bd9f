import math

import numpy as np
import pytest

from napari_coordgate.metrics import error_map, field_radius, psnr, quality_report, radial_profile, ring_psnr, ssim


def _gt():
    return np.random.default_rng(0).random((2, 48, 64))


def test_psnr_uses_the_ground_truth_range_and_matches_definition():
    gt = _gt()
    noisy = gt + 0.01
    expected = 10 * math.log10(np.ptp(gt) ** 2 / 1e-4)
    assert psnr(gt, noisy) == pytest.approx(expected, rel=1e-6)
    assert psnr(gt * 100, noisy * 100) == pytest.approx(expected, rel=1e-6)  # unit-free


def test_ssim_is_one_for_identical_and_lower_for_noise():
    gt = _gt()
    assert ssim(gt, gt) == pytest.approx(1.0)
    assert ssim(gt, gt + np.random.default_rng(1).normal(0, 0.2, gt.shape)) < 0.9


def test_field_radius_reaches_sqrt2_in_corners_and_zero_at_centre():
    r = field_radius((5, 7))
    assert r[2, 3] == 0 and r[0, 0] == pytest.approx(math.sqrt(2))


def test_edge_only_error_shows_in_edge_ring_and_error_map():
    gt = _gt()
    bad = gt.copy()
    r = field_radius(gt.shape[-2:])
    bad[:, r >= 1] += 0.1
    rings = {d["name"]: d["psnr"] for d in ring_psnr(gt, bad)}
    assert math.isinf(rings["centre"]) and math.isinf(rings["middle"]) and rings["edge"] < 30
    em = error_map(gt, bad, bin=4)
    assert em.shape == (48, 64) and em[0, 0] > 0 and em[24, 32] == 0
    centres, prof = radial_profile(gt, bad, n_bins=6)
    assert np.isinf(prof[0]) and np.isfinite(prof[-1])


def test_report_is_json_able_with_required_keys():
    import json

    gt = _gt()
    rep = quality_report(gt, gt + 0.01, gt + 0.05)
    text = json.dumps(rep)
    for key in ("psnr", "ssim", "psnr_blurred", "ssim_blurred", "psnr_by_ring"):
        assert key in rep
    assert rep["psnr"] > rep["psnr_blurred"]
    assert {"r_min", "r_max", "psnr"} <= set(rep["psnr_by_ring"][0])
    assert "NaN" not in text


def test_mismatched_or_constant_inputs_are_rejected():
    with pytest.raises(ValueError, match="same shape"):
        psnr(np.zeros((4, 4)), np.zeros((4, 5)))
    with pytest.raises(ValueError, match="constant"):
        psnr(np.ones((4, 4)), np.zeros((4, 4)))
