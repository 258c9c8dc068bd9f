import math

import numpy as np
import pytest

from napari_coordgate.metrics import (
    RINGS,
    PSNRAccumulator,
    error_map,
    field_radius,
    psnr,
    quality_report,
    radial_profile,
    ring_masks,
    ring_psnr,
    ssim,
)


def _gt():
    return np.random.default_rng(0).random((2, 48, 64))


def test_psnr_uses_the_ground_truth_range_and_matches_definition():
    gt = _gt()
    noisy = gt + 0.01
    expected = 10 * math.log10(np.ptp(gt) ** 2 / 1e-4)
    assert psnr(gt, noisy) == pytest.approx(expected, rel=1e-6)
    assert psnr(gt * 100, noisy * 100) == pytest.approx(expected, rel=1e-6)  # unit-free


def test_masked_psnr_scores_only_the_masked_pixels_with_the_whole_ground_truths_range():
    gt = _gt()
    bad = gt.copy()
    bad[:, :, 32:] += 0.1  # error only in the right half
    left = np.zeros(gt.shape[-2:], bool)
    left[:, :32] = True

    assert psnr(gt, bad, mask=left) == math.inf
    expected = 10 * math.log10(np.ptp(gt) ** 2 / 0.01)
    assert psnr(gt, bad, mask=~left) == pytest.approx(expected, rel=1e-9)
    assert psnr(gt, bad, data_range=2.0, mask=~left) == pytest.approx(10 * math.log10(4 / 0.01), rel=1e-9)


def test_psnr_accumulated_over_planes_and_tiles_equals_psnr_of_the_whole():
    gt = _gt().astype(np.float32)
    img = gt + np.random.default_rng(2).normal(0, 0.05, gt.shape).astype(np.float32)
    acc = PSNRAccumulator(float(np.ptp(gt)))
    for plane in range(2):
        for rows in (slice(0, 20), slice(20, 48)):  # two tiles per plane
            acc.add(gt[plane, rows], img[plane, rows])

    assert acc.pixels == gt.size
    assert acc.value == pytest.approx(psnr(gt, img), rel=1e-6)
    assert math.isnan(PSNRAccumulator(1.0).value)


def test_ssim_is_one_for_identical_and_lower_for_noise():
    gt = _gt()
    assert ssim(gt, gt) == pytest.approx(1.0)
    assert ssim(gt, gt + np.random.default_rng(1).normal(0, 0.2, gt.shape)) < 0.9


def test_rings_split_the_field_radius_at_one_half_and_one():
    r = np.array([0.0, 0.4999, 0.5, 0.9999, 1.0, 1.5])

    masks = ring_masks(r)

    assert [(name, lo, hi) for name, lo, hi, _ in masks] == [(n, lo, hi) for n, lo, hi in RINGS]
    assert [name for name, _, _, _ in masks] == ["centre", "middle", "edge"]
    np.testing.assert_array_equal(np.stack([m for _, _, _, m in masks]).astype(int),
                                  [[1, 1, 0, 0, 0, 0], [0, 0, 1, 1, 0, 0], [0, 0, 0, 0, 1, 1]])


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


def test_a_corner_roi_has_only_edge_ring_pixels_and_an_empty_centre():
    import json

    gt = _gt()  # (2, 48, 64): the top-left corner of a 512 x 512 field reaches r >= 1.1 only
    bad = gt + 0.01
    rings = {d["name"]: d for d in ring_psnr(gt, bad, field_shape=(512, 512), offset=(0, 0))}
    assert rings["centre"]["pixels"] == 0 and rings["centre"]["psnr"] is None
    assert rings["middle"]["pixels"] == 0 and rings["middle"]["psnr"] is None
    assert rings["edge"]["pixels"] == 48 * 64 and rings["edge"]["psnr"] == pytest.approx(psnr(gt, bad))
    rep = quality_report(gt, bad, gt + 0.05, field_shape=(512, 512), offset=(0, 0))
    assert [d["pixels"] for d in rep["psnr_by_ring"]] == [0, 0, 48 * 64]
    assert rep["psnr_by_ring_blurred"][0]["psnr"] is None
    assert "NaN" not in json.dumps(rep)  # an empty ring is null, not an invalid NaN
    centres, prof = radial_profile(gt, bad, n_bins=6, field_shape=(512, 512), offset=(0, 0))
    assert np.isnan(prof[centres < 1.0]).all() and np.isfinite(prof[-1])


def test_a_roi_sees_the_rings_of_its_crop_of_the_whole_field():
    field = np.random.default_rng(2).random((96, 128))
    bad = field.copy()
    bad[field_radius(field.shape) >= 1] += 0.1
    crop = (slice(40, 88), slice(64, 128))
    roi = {d["name"]: d for d in ring_psnr(field[crop], bad[crop], data_range=1.0, field_shape=(96, 128),
                                            offset=(40, 64))}
    r = field_radius(field.shape)[crop]
    for name, lo, hi in (("centre", 0, 0.5), ("middle", 0.5, 1.0), ("edge", 1.0, np.inf)):
        assert roi[name]["pixels"] == int(((r >= lo) & (r < hi)).sum())
    assert roi["centre"]["psnr"] == math.inf and roi["edge"]["psnr"] < 30


def test_whole_field_geometry_is_the_default():
    gt = _gt()
    img = gt + np.random.default_rng(3).normal(0, 0.05, gt.shape)
    assert quality_report(gt, img, img * 0.9) == quality_report(gt, img, img * 0.9, field_shape=(48, 64),
                                                                offset=(0, 0))
    np.testing.assert_array_equal(radial_profile(gt, img)[1], radial_profile(gt, img, field_shape=(48, 64))[1])
