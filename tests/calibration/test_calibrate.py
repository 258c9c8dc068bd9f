"""Bead calibration: detection, the two PSF models and their interface, the fits, errors, report, benchmark."""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.spatial import cKDTree

from napari_coordgate.calibration.calibrate import CalibrationCancelled, CalibrationError, calibrate
from napari_coordgate.calibration.detect import find_beads, reject_by_window
from napari_coordgate.calibration.patches import fit_amplitude_shift
from napari_coordgate.calibration.pupilfit import TorchPupil, fit_pupil_poly
from napari_coordgate.optics.measured import MeasuredGridPSF
from napari_coordgate.optics.models import psf_model_from_record, psfs_at
from napari_coordgate.optics.psf import PRESETS, Pupil, pupil_samples
from napari_coordgate.optics.pupil_poly import QUADRATIC, PupilPolyPSF
from napari_coordgate.samples.beads import EllipticalOptics, PupilOptics, bead_slide, psf_error

BENCH = Path(__file__).parents[2] / "benchmarks"
OPTICS = {"na": 0.8, "wavelength_um": 0.52, "immersion": 1.0, "pixel_size_um": 0.16}
GAUSS = EllipticalOptics(width=1.3, radial=0.8, tangential=0.2, beta=None, twist=0.3, psf_size=19)


def _match(table, truth, kinds=("bead",)):
    """For each planted bead of ``kinds``: distance to the nearest spot and that spot's row."""
    sel = np.isin(truth["kind"], kinds)
    tree = cKDTree(np.stack([table.y, table.x], axis=1))
    d, i = tree.query(np.stack([truth["y"][sel], truth["x"][sel]], axis=1))
    return sel, d, i


# ------------------------------------------------------------------------------------------- pupil PSF


def test_torch_pupil_of_the_optics_is_the_pupil_of_the_psf_config():
    cfg = PRESETS["edge_defocus_astigmatism"]
    rng = np.random.default_rng(0)
    coeffs = rng.normal(0.0, 0.1, (6, 6))
    expected = Pupil(cfg).psfs_numpy(coeffs)
    pupil64 = TorchPupil(cfg.na, cfg.wavelength_um, cfg.refractive_index, cfg.pixel_size_um, cfg.psf_size,
                         cfg.oversample, pupil_samples(cfg), dtype=torch.float64)
    pupil32 = TorchPupil(cfg.na, cfg.wavelength_um, cfg.refractive_index, cfg.pixel_size_um, cfg.psf_size,
                         cfg.oversample, pupil_samples(cfg), dtype=torch.float32)
    np.testing.assert_array_equal(pupil64.psfs(torch.as_tensor(coeffs)).numpy(), expected)
    assert np.abs(pupil32.psfs(torch.as_tensor(coeffs)).numpy() - expected).max() < 1e-5


def test_torch_pupil_shift_moves_the_psf_and_derivatives_match_finite_differences():
    pupil = TorchPupil(0.8, 0.52, 1.0, 0.16, 15, 3, 48, dtype=torch.float64)
    coeffs = torch.as_tensor(np.random.default_rng(1).normal(0.0, 0.1, (3, 6)))
    shifts = torch.as_tensor([[0.3, -0.2]] * 3, dtype=torch.float64)
    psf, dpsf = pupil.psfs_and_derivatives(coeffs, shifts)
    assert torch.allclose(psf, pupil.psfs(coeffs, shifts))
    # a one-pixel shift is a one-pixel move (away from the crop's border)
    moved = pupil.psfs(coeffs, torch.as_tensor([[1.0, 0.0]] * 3, dtype=torch.float64))
    still = pupil.psfs(coeffs)
    a, b = moved[:, 4:14, 1:14], still[:, 3:13, 1:14]  # the same region of the PSF, each crop normalised alone
    a, b = a / a.sum(dim=(1, 2), keepdim=True), b / b.sum(dim=(1, 2), keepdim=True)
    assert float((a - b).abs().max()) < 1e-3 * float(b.max())
    eps = 1e-6
    for k in range(8):
        c, s = coeffs.clone(), shifts.clone()
        (c[:, k] if k < 6 else s[:, k - 6]).add_(eps)
        numeric = (pupil.psfs(c, s) - psf) / eps
        assert float((numeric - dpsf[:, k]).abs().max()) < 1e-4 * float(dpsf[:, k].abs().max())


# ------------------------------------------------------------------------------------------- detection


@pytest.fixture(scope="module")
def slide():
    image, truth = bead_slide(GAUSS, (384, 384), n_beads=60, photons=3000, n_saturated=2, n_touching=2,
                              hot_fraction=3e-4, seed=3)
    return image, truth


def test_detection_finds_planted_beads_at_sub_pixel_precision(slide):
    image, truth = slide
    table, _, _ = find_beads(image)
    reject_by_window(table, [image.shape], 19, 3)
    sel, d, row = _match(table, truth)
    assert (d < 1.0).mean() >= 0.95  # every ordinary bead becomes a spot
    used = table.accepted[row] & (d < 1.0)
    assert used.sum() >= 20
    assert d[used].max() < 0.2  # sub-pixel centres of the accepted beads


def test_detection_rejects_hot_pixels_saturated_touching_and_edge_beads_with_the_right_reasons(slide):
    image, truth = slide
    table, _, _ = find_beads(image)
    reject_by_window(table, [image.shape], 19, 3)
    # every hot pixel is a "hot pixel" row and never a bead
    hot = truth["hot"]
    assert len(hot) > 10
    rows = {(int(y), int(x)) for y, x, r in zip(table.y, table.x, table.reason) if r == "hot pixel"}
    on_bead = cKDTree(np.stack([truth["y"], truth["x"]], 1)).query(hot.astype(float))[0] < 3
    assert all((int(y), int(x)) in rows for (y, x), b in zip(hot, on_bead) if not b)
    accepted = np.stack([table.y[table.accepted], table.x[table.accepted]], 1)
    assert cKDTree(accepted).query(hot.astype(float))[0].min() > 1.0 or on_bead.any()
    # saturated beads
    _, d, row = _match(table, truth, ("saturated",))
    assert list(table.reason[row]) == ["saturated"] * 2
    # touching pairs (2.5-4 px apart, about a PSF width): told apart and used once both are modelled, or one
    # rejected object (a clump, or an elongated spot the robust grid fit calls an outlier)
    result = calibrate(image, model="grid")
    _, d, row = _match(result.beads, truth, ("touching",))
    told_apart = (result.beads.reason[row] == "") & (d < 0.3)
    assert set(result.beads.reason[row][~told_apart]) <= {"clump", "outlier", "too large"}
    # beads whose window leaves the frame
    sel, d, row = _match(table, truth)
    ys, xs = truth["y"][sel], truth["x"][sel]
    near_edge = (np.minimum.reduce([ys, xs, 383 - ys, 383 - xs]) < 10) & (d < 1)
    assert near_edge.any()
    assert set(table.reason[row[near_edge]]) <= {"edge", "saturated", "too close", "clump"}
    assert "edge" in set(table.reason[row[near_edge]])


def test_detection_rejects_faint_beads_and_keeps_close_pairs_whose_light_is_modelled():
    optics = EllipticalOptics(width=1.3, radial=0.0, tangential=0.0, beta=None, psf_size=15)
    # plant by hand: two beads 7 px apart, one faint bead, one isolated bright bead
    image = np.full((192, 192), 100.0) + np.random.default_rng(0).normal(0, 3.0, (192, 192))
    for (y, x, amp) in ((60.3, 60.6, 2000.0), (60.2, 67.7, 2000.0), (130.4, 60.1, 12.0), (120.6, 130.2, 2000.0)):
        psf = optics.psfs(np.array([0.0]), np.array([0.0]), y - round(y), x - round(x))[0]
        iy, ix = round(y), round(x)
        image[iy - 7 : iy + 8, ix - 7 : ix + 8] += amp / psf.max() * psf
    table, _, _ = find_beads(image)
    reject_by_window(table, [image.shape], 15, 3)
    tree = cKDTree(np.stack([table.y, table.x], 1))
    reasons = [table.reason[tree.query([y, x])[1]] for y, x in ((60.3, 60.6), (60.2, 67.7), (130.4, 60.1),
                                                                 (120.6, 130.2))]
    assert reasons[:2] == ["", ""]  # 7 px apart, 2.3 FWHM: each one's light is removed from the other's window
    assert reasons[2] in ("too faint", "") and (reasons[2] == "too faint" or tree.query([130.4, 60.1])[0] > 2)
    assert reasons[3] == ""


# ----------------------------------------------------------------------------------- PSF model interface


def _measured_model(k=3, s=9, seed=0):
    rng = np.random.default_rng(seed)
    yy, xx = np.meshgrid(np.arange(s) - s // 2, np.arange(s) - s // 2, indexing="ij")
    psfs = np.empty((k, k, s, s))
    for i in range(k):
        for j in range(k):
            sy, sx = 1.0 + 0.3 * i + 0.05 * rng.random(), 1.0 + 0.2 * j
            g = np.exp(-0.5 * ((yy / sy) ** 2 + (xx / sx) ** 2))
            psfs[i, j] = g / g.sum()
    filled = np.zeros((k, k), bool)
    filled[0, 0] = True
    return MeasuredGridPSF(psfs, filled=filled, pixel_size_um=0.1, name="test", provenance={"bead_count": 3})


def _pupil_model():
    return PupilPolyPSF.from_psf_config("edge_defocus_astigmatism", (64, 96), grid=5)


@pytest.mark.parametrize("make", [_measured_model, _pupil_model], ids=["measured_grid", "pupil_poly"])
def test_psf_models_keep_the_interface(make):
    model = make()
    rng = np.random.default_rng(0)
    y, x = rng.uniform(-1, 1, (2, 3)), rng.uniform(-1, 1, (2, 3))
    psfs = model.psfs_at(y, x, (64, 96))
    s = model.psf_size
    assert psfs.shape == (2, 3, s, s) and psfs.dtype == np.float64 and s % 2 == 1
    assert np.allclose(psfs.sum(axis=(-2, -1)), 1.0) and psfs.min() >= 0
    assert np.allclose(model.psf_at(float(y[0, 0]), float(x[0, 0]), (64, 96)), psfs[0, 0], rtol=1e-10, atol=1e-14)
    grid, ys, xs = model.psf_grid((64, 96))
    assert grid.shape == (model.grid, model.grid, s, s) and np.allclose(ys, np.linspace(-1, 1, model.grid))
    # binning: odd size, unit sum, pixels b times larger, the same model family
    for b in (2, 3):
        binned = model.binned(b)
        assert binned.kind == model.kind and binned.psf_size % 2 == 1
        assert binned.psf_size in (math.ceil(s / b), math.ceil(s / b) + 1) or binned.psf_size == 3
        assert binned.pixel_size_um == pytest.approx(model.pixel_size_um * b)
        bp = binned.psf_at(0.0, 0.0)
        assert bp.sum() == pytest.approx(1.0) and np.unravel_index(bp.argmax(), bp.shape) == (
            binned.psf_size // 2, binned.psf_size // 2)
    assert model.binned(1) is model
    # record: JSON-able meta, float arrays, bit-exact round trip through the registry
    meta, arrays = model.to_record()
    json.dumps(meta)
    assert meta["kind"] == model.kind and all(a.dtype.kind == "f" for a in arrays.values())
    twin = psf_model_from_record(json.loads(json.dumps(meta)), {k: v.copy() for k, v in arrays.items()})
    assert type(twin) is type(model)
    meta2, arrays2 = twin.to_record()
    assert meta2 == meta and all(np.array_equal(arrays[k], arrays2[k]) for k in arrays)
    assert np.array_equal(twin.psfs_at(y, x, (64, 96)), psfs)
    assert model.kind in model.describe()


def test_measured_grid_returns_its_nodes_and_interpolates_between_them():
    model = _measured_model(k=4)
    grid, ys, xs = model.psf_grid()
    assert np.array_equal(grid, model.node_psfs) and np.array_equal(ys, np.linspace(-1, 1, 4))
    # halfway between two nodes: the average of their PSFs (renormalised)
    mid = model.psf_at(-1.0, -1.0 + 1.0 / 3.0)
    expected = 0.5 * (model.node_psfs[0, 0] + model.node_psfs[0, 1])
    assert np.allclose(mid, expected / expected.sum())
    # another K interpolates
    assert model.psf_grid(k=3)[0].shape == (3, 3, 9, 9)


def test_synthetic_optics_as_psf_models_give_their_exact_psfs_at_the_nodes():
    coarse, fine = GAUSS.as_psf_model(5, pixel_size_um=0.16), GAUSS.as_psf_model(9)
    assert coarse.kind == "measured_grid" and coarse.grid == coarse.nodes == 5 and coarse.pixel_size_um == 0.16
    t = np.linspace(-1.0, 1.0, 5)
    yy, xx = np.meshgrid(t, t, indexing="ij")
    assert np.allclose(coarse.psfs_at(yy, xx), GAUSS.psfs(yy.ravel(), xx.ravel()).reshape(5, 5, 19, 19), atol=1e-12)
    # between the nodes only the interpolation errs, and less on a finer grid
    off_nodes = [psf_error(m, GAUSS, (64, 64), n=4) for m in (coarse, fine)]
    assert off_nodes[1].max() < off_nodes[0].max() and off_nodes[1].max() < 0.05, [e.max() for e in off_nodes]
    optics = PupilOptics("edge_defocus_astigmatism", (64, 64), psf_size=21)
    assert optics.as_psf_model() is optics.cfg and optics.as_psf_model(5).grid == 5
    assert psf_error(optics.as_psf_model(), optics, (64, 64)).max() < 0.01


def test_pupil_poly_from_a_preset_gives_the_presets_psfs():
    cfg = PRESETS["edge_defocus_astigmatism"]
    model = PupilPolyPSF.from_psf_config(cfg, (100, 160))
    y, x = np.array([-1.0, 0.2, 1.0]), np.array([1.0, -0.5, -1.0])
    ref = psfs_at(cfg, y, x, (100, 160))
    # the model samples its pupil for its own coefficients (the preset's pupil grid differs a little)
    assert np.abs(model.psfs_at(y, x, (100, 160)) - ref).max() < 2e-3 * ref.max()
    assert model.coefficients.shape == (6, QUADRATIC) and model.degree == 2


@pytest.mark.parametrize("change, message", [
    (lambda m, a: a.update(psfs=a["psfs"][:, :, :-1]), "shape"),
    (lambda m, a: a.update(psfs=a["psfs"] * 2), "sum to one"),
    (lambda m, a: m.update(version=99), "newer"),
    (lambda m, a: a.update(filled=np.full((3, 3), 0.5)), "filled"),
    (lambda m, a: a.pop("psfs"), "no 'psfs'"),
])
def test_measured_grid_record_edited_into_nonsense_is_refused(change, message):
    meta, arrays = _measured_model().to_record()
    change(meta, arrays)
    with pytest.raises(ValueError, match=message):
        psf_model_from_record(meta, arrays)


def test_pupil_poly_record_with_runaway_coefficients_is_refused():
    meta, arrays = _pupil_model().to_record()
    arrays["coefficients"] = arrays["coefficients"] * 100
    with pytest.raises(ValueError, match="waves"):
        psf_model_from_record(meta, arrays)


# ------------------------------------------------------------------------------------------------ fits


def test_measured_grid_recovers_a_field_varying_gaussian_psf():
    image, _ = bead_slide(GAUSS, (512, 512), n_beads=160, photons=3000, n_saturated=1, n_touching=1, seed=5)
    result = calibrate(image, model="grid", pixel_size_um=0.16)
    assert result.chosen == "grid" and result.model.kind == "measured_grid"
    assert result.model.pixel_size_um == 0.16
    err = psf_error(result.model, GAUSS, image.shape)
    assert np.median(err) < 0.1 and np.percentile(err, 80) < 0.2, err.round(3)


def test_pupil_poly_fit_recovers_known_coefficients_on_a_noiseless_case():
    truth = np.zeros((6, 6))
    truth[0, [0, 3, 5]] = [0.05, 0.12, 0.12]  # defocus: constant + field curvature
    truth[1, [3, 5]] = [0.1, -0.1]  # astigmatism 0°
    truth[2, 4] = 0.2  # astigmatism 45°
    truth[3, 1] = truth[4, 2] = 0.06  # coma along the radius
    s = 15
    model = PupilPolyPSF(truth, na=0.8, wavelength_um=0.52, refractive_index=1.0, pixel_size_um=0.16, psf_size=s)
    rng = np.random.default_rng(0)
    n = 36
    yn, xn = rng.uniform(-1, 1, n), rng.uniform(-1, 1, n)
    shifts = rng.uniform(-0.5, 0.5, (n, 2))
    pupil = TorchPupil(0.8, 0.52, 1.0, 0.16, s, 3, 64, dtype=torch.float64)
    data = pupil.psfs(torch.as_tensor(model.zernike_at(yn, xn)), torch.as_tensor(shifts)).numpy()
    data = data * rng.uniform(500, 1000, (n, 1, 1)) + 10.0
    nodes = model.psf_grid(k=4)[0]  # what a measured grid would give
    fit = fit_pupil_poly(data, yn, xn, shifts + rng.normal(0, 0.2, (n, 2)), np.full(n, 1.0), na=0.8,
                         wavelength_um=0.52, refractive_index=1.0, pixel_size_um=0.16, node_psfs=nodes)
    got = fit.model.coefficients.copy()
    even = [0, 1, 2, 5]
    if np.sum(got[even] * truth[even]) < 0:  # the in-focus PSF cannot tell the common sign of the even terms
        got[even] *= -1
    assert np.abs(got - truth).max() < 0.01, (got - truth).round(3)


def test_pupil_fit_on_the_test_device_matches_the_cpu(device):
    model = PupilPolyPSF.from_psf_config("edge_defocus_astigmatism", (64, 64), psf_size=15)
    rng = np.random.default_rng(1)
    n = 20
    yn, xn = rng.uniform(-1, 1, n), rng.uniform(-1, 1, n)
    shifts = rng.uniform(-0.5, 0.5, (n, 2))
    pupil = TorchPupil(0.8, 0.52, 1.0, 0.16, 15, 3, 48, dtype=torch.float64)
    data = 800 * pupil.psfs(torch.as_tensor(model.zernike_at(yn, xn)), torch.as_tensor(shifts)).numpy() + 5
    kwargs = dict(na=0.8, wavelength_um=0.52, refractive_index=1.0, pixel_size_um=0.16, init=model.coefficients,
                  max_iterations=3, polish_iterations=0, extent_energy=None)
    here = fit_pupil_poly(data, yn, xn, shifts, np.ones(n), device=device, **kwargs)
    cpu = fit_pupil_poly(data, yn, xn, shifts, np.ones(n), device="cpu", **kwargs)
    assert np.abs(here.model.coefficients - cpu.model.coefficients).max() < 1e-3
    assert np.abs(here.model.coefficients - model.coefficients).max() < 5e-3


def test_auto_prefers_the_pupil_model_for_pupil_optics():
    optics = PupilOptics("edge_defocus_astigmatism", (320, 320), psf_size=31)
    image, _ = bead_slide(optics, (320, 320), n_beads=70, photons=3000, seed=2)
    result = calibrate(image, psf_size=21, **OPTICS)
    assert result.residuals["pupil"] is not None and result.residuals["grid"] is not None
    assert result.chosen == "pupil" and result.model.kind == "pupil_poly"
    assert result.residuals["pupil"] < result.residuals["grid"]
    assert np.median(psf_error(result.model, optics, image.shape)) < 0.15


def test_grid_is_used_without_optics_and_a_series_pools_its_images():
    a, _ = bead_slide(GAUSS, (256, 256), n_beads=30, photons=3000, seed=7)
    b, _ = bead_slide(GAUSS, (256, 256), n_beads=30, photons=3000, seed=8)
    updates = []
    result = calibrate(np.stack([a, b]), report=updates.append)
    assert result.chosen == "grid" and result.residuals["pupil"] is None
    used = result.beads.image[result.beads.accepted]
    assert set(used) == {0, 1}
    assert updates[-1].stage == "done" and updates[-1].progress == 1.0
    assert result.model.provenance["bead_count"] == result.n_beads and result.model.provenance["images"] == 2


# ------------------------------------------------------------------------------------- result and report


def test_report_png_json_and_coverage_warnings(tmp_path):
    image, truth = bead_slide(GAUSS, (320, 320), n_beads=80, photons=3000, seed=9)
    # an empty top-left corner
    image[:120, :120] = np.median(image) + np.random.default_rng(0).normal(0, 3, (120, 120))
    result = calibrate(image, model="grid", source="beads.tif")
    assert any("no beads in the top-left corner" in w and "extrapolated" in w for w in result.warnings)
    path = result.report_png(tmp_path / "report.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 20000
    data = json.loads(result.to_json())
    assert data["chosen"] == "grid" and data["counts"]["accepted"] == result.n_beads
    assert len(data["beads"]["x"]) == len(result.beads)
    assert data["provenance"]["source"] == ["beads.tif"] and "date" in data["provenance"]
    assert result.model.name == "measured from beads.tif"
    for column in ("fwhm_x", "fwhm_y", "ellipticity", "orientation_deg", "residual", "reason"):
        assert column in data["beads"]
    assert "beads used" in result.summary()


# --------------------------------------------------------------------------------------------- errors


def test_clear_errors_for_images_that_cannot_be_calibrated():
    rng = np.random.default_rng(0)
    noise = rng.normal(100, 3, (128, 128))
    with pytest.raises(CalibrationError, match="no beads found"):
        calibrate(noise)
    with pytest.raises(CalibrationError, match="RGB"):
        calibrate(np.zeros((64, 64, 3)))
    with pytest.raises(CalibrationError, match="z-stack"):
        calibrate(np.zeros((2, 3, 64, 64)))
    with pytest.raises(CalibrationError, match="NaN"):
        bad = noise.copy()
        bad[3, 4] = np.nan
        calibrate(bad)
    with pytest.raises(CalibrationError, match="constant"):
        calibrate(np.full((64, 64), 7.0))
    with pytest.raises(CalibrationError, match="empty"):
        calibrate(np.zeros((0, 64)))
    with pytest.raises(CalibrationError, match="needs the NA"):
        calibrate(noise, model="pupil", na=0.8)
    with pytest.raises(CalibrationError, match="model must be"):
        calibrate(noise, model="best")


def test_all_saturated_and_too_few_beads_are_refused_with_the_count_needed():
    image, truth = bead_slide(GAUSS, (256, 256), n_beads=12, photons=3000, hot_fraction=0, seed=4,
                              brightness=(0.9, 1.0), full_well=500.0)
    with pytest.raises(CalibrationError, match="saturated"):
        calibrate(image)
    image, truth = bead_slide(GAUSS, (256, 256), n_beads=4, photons=3000, hot_fraction=0, seed=4)
    with pytest.raises(CalibrationError, match=r"needs at least 5 usable beads, found \d"):
        calibrate(image)
    image, truth = bead_slide(GAUSS, (256, 256), n_beads=12, photons=3000, hot_fraction=0, seed=4)
    with pytest.raises(CalibrationError, match="pupil model needs at least 10"):
        calibrate(image[:, :100], model="pupil", **OPTICS)


def test_stop_before_any_model_raises_cancelled():
    image, _ = bead_slide(GAUSS, (128, 128), n_beads=10, photons=3000, seed=1)
    with pytest.raises(CalibrationCancelled):
        calibrate(image, should_stop=lambda: True)


def test_fit_amplitude_shift_finds_a_far_shift():
    optics = EllipticalOptics(width=1.5, radial=0, tangential=0, beta=None, psf_size=15)
    psf = optics.psfs(np.zeros(1), np.zeros(1))
    data = 300 * optics.psfs(np.zeros(1), np.zeros(1), np.array([1.3]), np.array([-0.8])) + 5
    fit = fit_amplitude_shift(psf, data, np.zeros((1, 2)), np.ones(1))
    assert np.allclose(fit["shift"], [[1.3, -0.8]], atol=0.02)
    assert fit["amplitude"][0] == pytest.approx(300, rel=0.02) and fit["offset"][0] == pytest.approx(5, abs=0.5)


# ------------------------------------------------------------------------------------------ benchmark


def test_calibration_benchmark_quick_mode_prints_its_table():
    result = subprocess.run([sys.executable, str(BENCH / "bench_calibrate.py"), "--quick"], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| moffat") or line.startswith("| pupil")]
    assert len(rows) == 2, result.stdout
    assert "err median" in result.stdout


def test_calibration_benchmark_replicas_quick_mode_prints_its_table():
    result = subprocess.run([sys.executable, str(BENCH / "bench_calibrate.py"), "--real", "--quick"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| Moffat")]
    assert len(rows) == 2, result.stdout
    assert "lost %" in result.stdout and "8-bit" in result.stdout


def test_holdout_beads_are_kept_out_of_every_fit_and_listed_in_the_json_report():
    import json

    image, _ = bead_slide(GAUSS, (256, 256), n_beads=40, photons=3000, seed=7)
    full = calibrate(image, model="grid")
    held = calibrate(image, model="grid", holdout=0.25)
    marked = held.beads.holdout
    assert marked.sum() == round(0.25 * full.n_beads)
    assert held.n_beads == full.n_beads - marked.sum()
    assert np.all(held.beads.accepted[marked])  # usable beads, just not used
    assert not np.any(held.beads.held_out[marked])  # nor used to choose between the models
    report = json.loads(held.to_json())
    assert sum(report["beads"]["holdout"]) == marked.sum()
    assert held.model.provenance["holdout_beads"] == marked.sum()


def test_dim_sharp_8bit_beads_are_beads_and_single_pixel_spikes_stay_hot_pixels():
    # an undersampled PSF (sigma 0.55 px) on an 8-bit camera: a bead puts only about a quarter of its peak into
    # its neighbours, which a fixed rule takes for a hot pixel; judged against the spots around it, it is a bead
    optics = EllipticalOptics(width=0.55, radial=0.0, tangential=0.0, beta=None, psf_size=9)
    image, truth = bead_slide(optics, (256, 256), n_beads=60, photons=60, background=0.2, read_noise=1.0,
                              hot_fraction=3e-4, offset=10, seed=1)
    image = np.clip(np.round(image), 0, 255).astype(np.uint8)
    table, _, _ = find_beads(image)
    tree = cKDTree(np.stack([table.y, table.x], 1))
    d, row = tree.query(np.stack([truth["y"], truth["x"]], 1))
    found = d < 1.0
    assert found.mean() >= 0.95
    assert (table.reason[row[found]] == "hot pixel").mean() <= 0.1  # 14 of 59 with a fixed rule
    dh, rh = tree.query(truth["hot"].astype(float))
    assert (table.reason[rh[dh < 0.5]] == "hot pixel").sum() >= 0.9 * len(truth["hot"])


def test_noise_of_an_8bit_image_whose_differences_are_mostly_zero_is_not_zero():
    from napari_coordgate.calibration.detect import robust_noise

    rng = np.random.default_rng(0)
    for sigma in (0.4, 0.8, 3.0):
        image = np.round(20 + rng.normal(0, sigma, (128, 128))).astype(np.uint8)
        expected = np.sqrt(sigma**2 + 1 / 12)  # the noise plus the rounding's
        assert robust_noise(image) == pytest.approx(expected, rel=0.25)
    # a float image keeps the plain estimate
    image = 20 + rng.normal(0, 0.5, (128, 128))
    assert robust_noise(image) == pytest.approx(0.5, rel=0.1)
