"""3-D PSF models (issue 24): the pupil model through focus and the measured 3-D grid, behind the PSF-model
interface; the interface's 2-D defaults stay as they were."""

import numpy as np
import pytest

from napari_coordgate.config import ConfigError
from napari_coordgate.optics.measured import MeasuredGridPSF
from napari_coordgate.optics.models import get_psf_model, psf_model_from_record, psf_model_kinds
from napari_coordgate.optics.psf import PRESETS, PSFConfig
from napari_coordgate.optics.psf3d import PRESETS_3D, MeasuredGrid3DPSF, Pupil3DPSF
from napari_coordgate.optics.psfmodel import check_record_sizes

# small optics: 11 px PSFs of 0.1 µm pixels, 9 planes 0.2 µm apart, a 3 x 3 grid
SMALL = PSFConfig(name="small", na=0.8, wavelength_um=0.52, pixel_size_um=0.1, psf_size=11, grid=3)


def _pupil3d(**changes):
    fields = {"z_step_um": 0.2, "psf_depth": 9, **changes}
    return Pupil3DPSF.from_pupil(fields.pop("pupil", SMALL), **fields)


def _random_grid(k=3, d=5, s=7, seed=0):
    return np.random.default_rng(seed).random((k, k, d, s, s))


def _sharpest_plane(vol):
    return int(np.argmax(vol.max(axis=(1, 2))))


def test_the_3d_kinds_are_registered_and_say_they_are_3d():
    pupil, measured = _pupil3d(), MeasuredGrid3DPSF(_random_grid(), z_step_um=0.3)

    assert {"pupil3d", "measured_grid3d"} <= set(psf_model_kinds())
    for model, step in ((pupil, 0.2), (measured, 0.3)):
        assert model.ndim == 3 and model.z_step_um == step and model.psf_depth % 2 == 1
        assert "3-D" in model.describe() and f"{step:g} µm" in model.describe()


@pytest.mark.parametrize("model", [PRESETS["edge_defocus_astigmatism"], MeasuredGridPSF(np.ones((2, 2, 5, 5)))])
def test_2d_models_keep_their_2d_answers(model):
    assert model.ndim == 2 and model.z_step_um is None and model.psf_depth == 1
    assert "3-D" not in model.describe()
    assert model.psf_at(0.3, -0.2).shape == (model.psf_size, model.psf_size)


def test_pupil3d_psfs_sum_to_one_over_the_volume_with_the_declared_shape():
    model = _pupil3d(tilt_y_um=0.2, pupil=SMALL.replace(astig_h2=0.2, coma_h=0.1))
    y, x = np.array([[-1.0, 0.0], [0.5, 1.0]]), np.array([[1.0, 0.0], [-0.5, 1.0]])

    psfs = model.psfs_at(y, x, (40, 60))

    assert psfs.shape == (2, 2, 9, 11, 11) and psfs.dtype == np.float64
    np.testing.assert_allclose(psfs.sum(axis=(-3, -2, -1)), 1.0, atol=1e-12)
    assert psfs.min() >= 0


def test_an_aberration_free_pupil_is_centred_and_symmetric_through_focus():
    vol = _pupil3d().psf_at(0.0, 0.0)

    np.testing.assert_allclose(vol, vol[::-1], atol=1e-12)  # plane +z equals plane -z
    np.testing.assert_allclose(vol, vol[:, ::-1, ::-1], atol=1e-12)  # centred on the middle pixel
    assert _sharpest_plane(vol) == 4  # in focus in the middle plane
    offsets = np.indices(vol.shape) - np.array([4.0, 5.0, 5.0])[:, None, None, None]
    np.testing.assert_allclose((offsets * vol).sum(axis=(1, 2, 3)), 0.0, atol=1e-12)  # centroid on the middle voxel


def test_the_in_focus_plane_is_the_2d_pupil_psf():
    cfg = SMALL.replace(astig_h2=0.2, coma_h=0.1, defocus_h2=0.1)
    vol = _pupil3d(pupil=cfg).psf_at(0.7, -0.4)

    plane = vol[4] / vol[4].sum()

    # the 3-D model samples its pupil more finely (for the defocus phase): the same PSF up to that sampling
    np.testing.assert_allclose(plane, cfg.psf_at(0.7, -0.4), atol=2e-3 * plane.max())


@pytest.mark.parametrize("changes, where, plane", [
    ({"tilt_y_um": 0.4, "tilt_x_um": 0.2}, (1.0, 1.0), 4 + 3),  # focus 0.6 µm: 3 planes of 0.2 µm
    ({"tilt_y_um": 0.4, "tilt_x_um": 0.2}, (-1.0, 1.0), 4 - 1),
    ({"tilt_y_um": 0.4, "tilt_x_um": 0.2}, (0.0, 0.0), 4),
    ({"curvature_um": 0.4}, (1.0, -1.0), 4 + 2),  # h = 1 at a corner
    ({"curvature_um": -0.4}, (-1.0, -1.0), 4 - 2),
    ({"curvature_um": 0.4}, (0.0, 0.0), 4),
])
def test_best_focus_moves_with_tilt_and_curvature_where_focus_says(changes, where, plane):
    model = _pupil3d(**changes)

    vol = model.psf_at(*where)

    assert _sharpest_plane(vol) == plane
    assert model.focus_um(*where) == pytest.approx((plane - 4) * 0.2)
    dz = plane - 4  # the volume is the focal one moved by dz planes: symmetric about its sharpest plane
    lo, hi = max(0, 2 * dz), min(9, 9 + 2 * dz)
    np.testing.assert_allclose(vol[lo:hi], vol[lo:hi][::-1], atol=1e-12)


def test_a_depth_that_misses_the_best_focus_is_refused_with_the_depth_it_needs():
    with pytest.raises(ConfigError, match="raise psf_depth to at least 11"):
        _pupil3d(tilt_y_um=0.5, curvature_um=0.4)  # 0.9 µm > 4 planes of 0.2 µm
    with pytest.raises(ConfigError, match="odd"):
        _pupil3d(psf_depth=8)
    with pytest.raises(ConfigError, match="pupil model"):
        Pupil3DPSF.from_pupil(PRESETS["gaussian"], z_step_um=0.2, psf_depth=9)


def test_pupil3d_record_round_trips_without_arrays_and_through_a_dict():
    model = _pupil3d(tilt_x_um=-0.3, curvature_um=0.2, pupil=SMALL.replace(astig_h2=0.1), name="scope")

    meta, arrays = model.to_record()
    again = psf_model_from_record(meta, arrays)

    assert arrays == {} and meta["kind"] == "pupil3d" and again == model
    assert get_psf_model(meta) == model
    assert Pupil3DPSF.from_json(model.to_json()) == model
    np.testing.assert_array_equal(again.psf_at(0.5, 0.5), model.psf_at(0.5, 0.5))


def test_pupil3d_binned_bins_x_and_y_only():
    model = _pupil3d(tilt_y_um=0.2)

    binned = model.binned(2)

    assert binned.pixel_size_um == pytest.approx(0.2) and binned.psf_size == 7
    assert (binned.psf_depth, binned.z_step_um, binned.tilt_y_um) == (9, 0.2, 0.2)
    assert model.binned(1) is model


def test_the_3d_preset_blurs_a_z_stack_with_curvature_tilt_and_astigmatism():
    model = PRESETS_3D["tilted_curved_3d"]

    assert model.tilt_y_um and model.tilt_x_um and model.curvature_um and model.pupil.astig_h2
    assert model.psf_depth >= 15 and model.max_focus_shift_um() < model.z_step_um * (model.psf_depth // 2)
    assert psf_model_from_record(*model.to_record()) == model


def test_measured_grid3d_interpolates_its_nodes_bilinearly():
    grid = _random_grid()
    model = MeasuredGrid3DPSF(grid, z_step_um=0.25)
    nodes = grid / grid.sum(axis=(2, 3, 4), keepdims=True)

    np.testing.assert_allclose(model.psf_at(-1.0, 1.0), nodes[0, 2], atol=1e-14)
    np.testing.assert_allclose(model.psf_at(-0.5, 0.0), (nodes[0, 1] + nodes[1, 1]) / 2, atol=1e-14)
    np.testing.assert_allclose(model.psf_at(0.5, 0.5), nodes[1:, 1:].mean(axis=(0, 1)), atol=1e-14)
    psfs, ys, _ = model.psf_grid()
    assert psfs.shape == (3, 3, 5, 7, 7) and list(ys) == [-1.0, 0.0, 1.0]


def test_measured_grid3d_record_round_trips_and_binned_keeps_z():
    model = MeasuredGrid3DPSF(_random_grid(k=2, s=9), z_step_um=0.3, pixel_size_um=0.1, name="beads",
                              filled=np.array([[True, False], [False, False]]))

    again = psf_model_from_record(*model.to_record())
    binned = model.binned(2)

    np.testing.assert_array_equal(again.node_psfs, model.node_psfs)
    assert (again.z_step_um, again.pixel_size_um, again.name, again.filled[0, 0]) == (0.3, 0.1, "beads", True)
    assert binned.node_psfs.shape == (2, 2, 5, 5, 5) and binned.z_step_um == 0.3
    assert binned.pixel_size_um == pytest.approx(0.2)
    np.testing.assert_allclose(binned.node_psfs.sum(axis=(2, 3, 4)), 1.0)


@pytest.mark.parametrize("edit, match", [
    (lambda m, a: a.update(psfs=a["psfs"][..., :1, :, :].repeat(2, axis=2)), "planes|psf_depth"),
    (lambda m, a: a.update(psfs=a["psfs"][:, :, 0]), "expected"),
    (lambda m, a: a.update(psfs=a["psfs"] * 2), "do not sum to one"),
    (lambda m, a: m.pop("z_step_um"), "z_step_um"),
    (lambda m, a: m.update(z_step_um=-1.0), "z_step_um"),
    (lambda m, a: m.update(psf_depth=7), "psf_depth"),
])
def test_a_bad_measured_grid3d_record_is_refused_with_what_is_wrong(edit, match):
    meta, arrays = MeasuredGrid3DPSF(_random_grid(), z_step_um=0.2).to_record()
    edit(meta, arrays)

    with pytest.raises(ValueError, match=match):
        psf_model_from_record(meta, arrays)


@pytest.mark.parametrize("psfs, match", [
    (np.ones((2, 2, 4, 5, 5)), "odd number of planes"),
    (np.ones((2, 2, 3, 4, 4)), "odd side"),
    (-np.ones((2, 2, 3, 5, 5)), "non-negative"),
    (np.ones((2, 3, 3, 5, 5)), r"\(K, K, D, s, s\)"),
])
def test_measured_grid3d_refuses_impossible_psfs(psfs, match):
    with pytest.raises(ValueError, match=match):
        MeasuredGrid3DPSF(psfs, z_step_um=0.2)


@pytest.mark.parametrize("depth", [0, 4, 257, 2.5, True])
def test_a_record_declaring_an_impossible_depth_is_refused_before_anything_is_built(depth):
    with pytest.raises(ValueError, match="psf_depth"):
        check_record_sizes({"psf_depth": depth})
