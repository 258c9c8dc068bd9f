"""3-D calibration from a bead z-stack (calibration/zstack.py), on stacks rendered by a different model than the
fit's: each bead's exact analytic 3-D PSF at its own field position and sub-plane slide position."""

import numpy as np
import pytest

from napari_coordgate.calibration import CalibrationError
from napari_coordgate.calibration.zstack import best_focus, calibrate_zstack, fit_focus_surface, focus_surface
from napari_coordgate.optics.psf3d import MeasuredGrid3DPSF
from napari_coordgate.samples.beadstack import AstigmaticBeam3D, bead_zstack, focus_error, psf3d_error

OPTICS = AstigmaticBeam3D()


@pytest.fixture(scope="module")
def calibrated():
    stack, truth = bead_zstack(OPTICS, (31, 384, 384), 80, photons=3000, seed=3, psf_size=31)
    return calibrate_zstack(stack, z_step_um=0.25, pixel_size_um=0.1), stack, truth


def test_best_focus_finds_the_vertex_of_a_gaussian_profile_to_a_hundredth_of_a_plane():
    z = np.arange(30, dtype=float)
    centres = np.array([10.0, 12.3, 17.75])
    prof = 100.0 * np.exp(-0.5 * ((z[None] - centres[:, None]) / 3.0) ** 2)
    assert np.allclose(best_focus(prof), centres, atol=0.01)


def test_best_focus_is_nan_when_the_brightest_plane_is_at_the_stack_end():
    z = np.arange(20, dtype=float)
    prof = np.exp(-0.5 * ((z[None] - np.array([[0.5], [19.0]])) / 3.0) ** 2)
    assert np.isnan(best_focus(prof)).all()


def test_focus_surface_fit_ignores_a_few_outliers():
    rng = np.random.default_rng(0)
    y, x = rng.uniform(-1, 1, 200), rng.uniform(-1, 1, 200)
    coef = np.array([12.0, 1.5, -0.7, 0.9, 0.2, 0.4])
    z = focus_surface(coef, y, x) + rng.normal(0, 0.05, 200)
    z[:8] += 6.0  # debris above the slide
    got, score = fit_focus_surface(y, x, z)
    assert np.allclose(got, coef, atol=0.05)
    assert (np.abs(score[:8]) > 6).all() and (np.abs(score[8:]) < 6).all()


def test_zstack_calibration_measures_the_best_focus_map_within_a_twentieth_of_a_plane(calibrated):
    result, _, truth = calibrated
    err = focus_error(result, OPTICS, 9)
    assert np.median(err) <= 0.05
    assert abs(result.slide_plane - truth["slide_plane"]) < 0.1


def test_zstack_calibration_measures_the_3d_psfs_within_0_1_median_relative_error(calibrated):
    result, _, _ = calibrated
    model = result.model
    assert isinstance(model, MeasuredGrid3DPSF) and model.ndim == 3 and model.z_step_um == 0.25
    assert model.pixel_size_um == 0.1
    err = psf3d_error(model, OPTICS, (384, 384), 5)
    assert np.median(err) <= 0.1


def test_zstack_psfs_keep_the_focus_shift_across_the_field(calibrated):
    result, _, _ = calibrated
    model = result.model
    d = model.psf_depth
    for y, x in ((-0.8, 0.8), (0.8, -0.8), (0.0, 0.0)):
        vol = model.psfs_at(np.array([y]), np.array([x]))[0]
        peak_plane = int(np.argmax(vol.max(axis=(1, 2))))
        want = OPTICS.focus_planes(y, x) - OPTICS.focus_planes(0.0, 0.0)
        assert abs(peak_plane - d // 2 - want) <= 1.0


def test_zstack_report_is_json_with_the_focus_map_and_the_per_bead_focus(calibrated):
    import json

    result, _, _ = calibrated
    d = json.loads(result.to_json())
    assert d["ndim"] == 3 and len(d["best_focus"]["map_um_9x9"]) == 9
    assert len(d["beads"]["focus_z"]) == len(result.beads)
    assert d["model"]["kind"] == "measured_grid3d"


def test_zstack_model_roundtrips_through_a_cgpsf_file(calibrated, tmp_path):
    from napari_coordgate.model_io.psf_file import load_psf_model, save_psf_model

    result, _, _ = calibrated
    path = save_psf_model(tmp_path / "scope3d.cgpsf", result.model)
    back = load_psf_model(path)
    assert np.array_equal(back.node_psfs, result.model.node_psfs)
    assert back.provenance["calibrated"] == "z-stack"
    assert back.provenance["field_shape"] == list(result.field_shape)  # built-in training volumes are sized by it


@pytest.mark.parametrize("bad, message", [
    (np.zeros((5, 64, 64)), "at least 7 planes"),
    (np.zeros((64, 64)), "3 dimensions"),
    (np.full((9, 64, 64), np.nan), "NaN"),
    (np.ones((9, 64, 64)), "constant"),
])
def test_zstack_calibration_refuses_what_is_not_a_bead_zstack_in_one_line(bad, message):
    with pytest.raises(CalibrationError, match=message) as info:
        calibrate_zstack(bad, z_step_um=0.2)
    assert "\n" not in str(info.value)


def test_zstack_calibration_refuses_a_stack_without_beads_with_the_table():
    rng = np.random.default_rng(1)
    with pytest.raises(CalibrationError, match="no beads found") as info:
        calibrate_zstack(rng.normal(100, 2, (9, 64, 64)), z_step_um=0.2)
    assert info.value.field_shape == (64, 64)


def test_zstack_calibration_warns_when_the_beads_focus_near_the_stack_end():
    stack, _ = bead_zstack(OPTICS, (21, 256, 256), 40, photons=3000, seed=4, psf_size=25, slide_plane=3.3)
    result = calibrate_zstack(stack, z_step_um=0.25, psf_depth=5)
    assert any("first or last plane" in w for w in result.warnings)


def test_zstack_report_png_is_written(calibrated, tmp_path):
    result, _, _ = calibrated
    path = result.report_png(tmp_path / "report.png")
    assert path.stat().st_size > 10_000 and path.read_bytes()[:4] == b"\x89PNG"


def test_zstack_calibration_divides_the_beads_size_out_of_its_psfs():
    optics = AstigmaticBeam3D(sigma0=0.9)
    # 2.5 px beads (250 nm at 0.1 µm pixels), planes 2.5 px apart: rendered as points filling the sphere
    stack, _ = bead_zstack(optics, (31, 384, 384), 80, photons=3000, seed=3, psf_size=31, bead_diameter_px=2.5,
                           z_step_px=2.5)
    points = calibrate_zstack(stack, z_step_um=0.25, pixel_size_um=0.1)
    beads = calibrate_zstack(stack, z_step_um=0.25, pixel_size_um=0.1, bead_diameter_nm=250.0)
    before = np.median(psf3d_error(points.model, optics, (384, 384)))
    after = np.median(psf3d_error(beads.model, optics, (384, 384)))
    assert after <= 0.8 * before and after <= 0.1
    assert any("taken for points" in w for w in points.warnings)
    assert not any("taken for points" in w for w in beads.warnings)
    with pytest.raises(CalibrationError, match="pixel size"):
        calibrate_zstack(stack, z_step_um=0.25, bead_diameter_nm=250.0)


def test_zstack_calibration_of_a_small_crowded_stack_fails_with_a_message_not_a_crash():
    stack, _ = bead_zstack(OPTICS, (25, 128, 128), 25, photons=3000, seed=0, psf_size=25)
    with pytest.raises(CalibrationError, match="at least 5 usable beads") as info:
        calibrate_zstack(stack, z_step_um=0.25)
    assert info.value.beads is not None and "\n" not in str(info.value)


def test_a_bead_on_the_frames_last_pixel_gets_an_axial_profile_and_its_own_background():
    from napari_coordgate.calibration.detect import BeadTable
    from napari_coordgate.calibration.zstack import _profiles

    z, h, w = 9, 40, 30
    stack = np.full((z, h, w), 10.0)
    stack[:, h - 2 :, w - 2 :] += 5.0  # a brighter corner: the bead's own background
    stack[4, h - 2 :, w - 2 :] += 100.0
    y, x = np.array([h - 0.3, 20.0]), np.array([w - 0.3, 15.0])  # the first rounds to a pixel past the frame
    table = BeadTable(y=y, x=x, reason=np.array(["", ""], dtype=object))
    prof = _profiles(stack, table, np.arange(2))
    assert prof.shape == (2, z)
    # its square (kept inside the frame) holds the 4 bright corner pixels; its background is its centre pixel's
    assert prof[0].argmax() == 4 and prof[0, 0] == pytest.approx(-5 * 5.0)
    assert prof[0, 4] == pytest.approx(4 * 100.0 - 5 * 5.0)
    assert np.allclose(prof[1], 0.0)


def test_a_neighbour_on_the_frames_last_half_pixel_still_lights_the_windows_beside_it():
    from napari_coordgate.calibration.detect import BeadTable
    from napari_coordgate.calibration.zstack import _neighbour_light

    d, s, h, w, pad, win = 5, 7, 40, 40, 1, 21
    r2 = ((np.arange(s) - s // 2)[:, None] ** 2 + (np.arange(s) - s // 2)[None, :] ** 2).astype(float)
    psf = np.zeros((d, s, s))
    psf[d // 2] = np.exp(-r2 / 2.0) / np.exp(-r2 / 2.0).sum()
    model = MeasuredGrid3DPSF(np.broadcast_to(psf, (2, 2, d, s, s)), z_step_um=0.25)
    y, x = np.array([h - 0.3, h - 8.0]), np.array([20.0, 20.0])  # an edge spot past the last pixel's centre
    table = BeadTable(y=y, x=x, y_norm=y / h * 2 - 1, x_norm=x / w * 2 - 1, peak=np.array([1.0, 1.0]),
                      reason=np.array(["edge", ""], dtype=object))
    light = _neighbour_light(table, np.array([1]), model, (d + 2 * pad, h, w), pad, win, np.array([1.0]))
    assert light.shape == (1, d + 2 * pad, win, win)
    assert light.sum() == pytest.approx(1.0, abs=5e-3)  # the edge spot's light (scaled like the bead's) and only it
    assert light[0, pad + d // 2].sum() == pytest.approx(1.0, abs=5e-3)
