"""The PSF-model interface: the pupil model implements it, one resolver names every PSF model, and the optics
work with any implementation (``fake_psf``: a grid of Gaussians from tests/conftest.py)."""

import json
import warnings

import numpy as np
import pytest
import torch

from napari_coordgate.config import ConfigError
from napari_coordgate.coords import grid_positions
from napari_coordgate.model_io import ModelFileError, resolve_psf, save_psf_model
from napari_coordgate.optics.blur import SpatiallyVaryingBlur, binned_psf_config, synthesize_pairs
from napari_coordgate.optics.deconv import (
    central_psf,
    richardson_lucy_central,
    sv_richardson_lucy,
    sv_wiener,
    wiener_central,
    wiener_kernels,
)
from napari_coordgate.optics.models import (
    get_psf_config,
    get_psf_model,
    psf_grid,
    psf_model_from_record,
    psf_model_kinds,
    render_psf_grid,
)
from napari_coordgate.optics.psf import (
    PRESETS,
    PSFConfig,
    _psfs_polar,
    field_polar,
)
from napari_coordgate.optics.psfmodel import PSFModel

PRESET_NAMES = list(PRESETS)


# -- PSFConfig conforms ---------------------------------------------------------------------------------------
def test_psf_config_is_a_registered_psf_model_of_kind_pupil():
    cfg = PRESETS["edge_defocus_astigmatism"]

    assert isinstance(cfg, PSFModel) and cfg.kind == "pupil" and "pupil" in psf_model_kinds()
    assert (cfg.name, cfg.psf_size, cfg.grid, cfg.pixel_size_um) == ("edge_defocus_astigmatism", 25, 7, 0.16)
    assert "edge_defocus_astigmatism" in cfg.describe() and "field-dependent" in cfg.describe()


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_psfs_at_gives_unit_sum_psfs_of_the_declared_size(name):
    cfg = PRESETS[name].replace(grid=3)
    y, x = np.array([[-1.0, 0.0], [0.5, 1.0]]), np.array([[-1.0, 0.0], [-0.3, 1.0]])

    psfs = cfg.psfs_at(y, x, (40, 60))

    assert psfs.shape == (2, 2, cfg.psf_size, cfg.psf_size) and psfs.dtype == np.float64
    np.testing.assert_allclose(psfs.sum(axis=(-2, -1)), 1.0, atol=1e-12)
    np.testing.assert_array_equal(cfg.psf_at(0.5, -0.3, (40, 60)), psfs[1, 0])


@pytest.mark.parametrize("name", PRESET_NAMES)
@pytest.mark.parametrize("field_shape", [None, (40, 70)])
def test_psf_grid_is_exactly_the_pupil_model_at_the_nodes(name, field_shape):
    # the formula of psf_grid before the interface: field height and angle of each node, then the PSFs
    cfg = PRESETS[name].replace(grid=3)
    nodes = grid_positions(3)
    yy, xx = np.meshgrid(nodes, nodes, indexing="ij")
    expected = _psfs_polar(cfg, *field_polar(cfg, yy, xx, field_shape))

    psfs, ys, xs = cfg.psf_grid(field_shape)

    np.testing.assert_array_equal(psfs, expected)
    np.testing.assert_array_equal(psf_grid(cfg, field_shape)[0], expected)  # the module function too
    np.testing.assert_array_equal(ys, nodes)
    np.testing.assert_array_equal(xs, nodes)


@pytest.mark.filterwarnings("ignore::napari_coordgate.optics.psf.UndersamplingWarning")
def test_binned_is_the_config_in_binned_pixels():
    gauss, pupil = PRESETS["gaussian"], PRESETS["edge_defocus_astigmatism"]

    assert gauss.binned(1) is gauss
    assert gauss.binned(2) == gauss.replace(sigma_px=0.5, psf_size=11)
    assert gauss.binned(3) == gauss.replace(sigma_px=1 / 3, psf_size=7)
    assert pupil.binned(2) == pupil.replace(pixel_size_um=0.32, psf_size=13)
    assert pupil.binned(16) == pupil.replace(pixel_size_um=0.16 * 16, psf_size=3)  # at least 3 px
    assert binned_psf_config("gaussian", 2) == gauss.binned(2)  # the old name is the same rule


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_binned_refuses_a_bad_binning(bad):
    with pytest.raises(ValueError, match="binning must be a positive integer"):
        PRESETS["gaussian"].binned(bad)


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_record_round_trip_rebuilds_the_same_config(name):
    cfg = PRESETS[name].replace(name="mine", axis_x=0.25)

    meta, arrays = cfg.to_record()

    assert meta["kind"] == "pupil" and arrays == {}
    json.dumps(meta)  # JSON as it is
    assert psf_model_from_record(meta, arrays) == cfg
    assert psf_model_from_record(cfg.to_dict()) == cfg  # a PSFConfig dict (kind "psf"): schema-1 model files
    assert psf_model_from_record({k: v for k, v in meta.items() if k != "kind"}) == cfg


def test_a_pupil_record_with_arrays_is_refused():
    meta, _ = PRESETS["gaussian"].to_record()
    with pytest.raises(ConfigError, match="no arrays"):
        psf_model_from_record(meta, {"psfs": np.zeros((1, 3, 3))})


def test_with_provenance_returns_a_copy_that_carries_it():
    cfg = PRESETS["gaussian"]

    tagged = cfg.with_provenance({"beads": 120})

    assert tagged.provenance == {"beads": 120} and tagged == cfg
    assert cfg.provenance == {}  # the preset itself is untouched


# -- one resolver ---------------------------------------------------------------------------------------------
def test_resolve_psf_resolves_every_kind_of_spec_files_included(tmp_path, fake_psf):
    cfg = PRESETS["strong_astigmatism"].replace(name="mine")
    (tmp_path / "cfg.json").write_text(cfg.to_json())
    save_psf_model(tmp_path / "beads", fake_psf)

    assert resolve_psf(fake_psf) is fake_psf
    assert resolve_psf(cfg) is cfg
    assert resolve_psf("gaussian") is PRESETS["gaussian"]
    assert resolve_psf(tmp_path / "cfg.json") == cfg
    assert resolve_psf(str(tmp_path / "cfg.json")) == cfg
    assert resolve_psf(cfg.to_dict()) == cfg
    assert resolve_psf(cfg.to_record()[0]) == cfg
    assert resolve_psf({"model": "gaussian"}) == PSFConfig(model="gaussian")
    for spec in (tmp_path / "beads.cgpsf", str(tmp_path / "beads.cgpsf"), tmp_path / "beads"):  # suffix rule
        loaded = resolve_psf(spec)
        assert type(loaded).__name__ == "GaussianGridPSF"
        np.testing.assert_array_equal(loaded.sigmas, fake_psf.sigmas)


def test_unknown_preset_lists_the_presets_and_the_file_kinds():
    with pytest.raises(ConfigError) as info:
        get_psf_model("edge_blur")
    for name in PRESETS:
        assert name in str(info.value)
    assert ".json" in str(info.value) and ".cgpsf" in str(info.value)


def test_unknown_kind_is_a_clear_error():
    with pytest.raises(ValueError, match=r"unknown PSF model kind 'zernike_v9'.*upgrade napari-coordgate"):
        get_psf_model({"kind": "zernike_v9", "coefficients": [1, 2]})


def test_a_record_missing_its_arrays_is_refused_by_its_kind(fake_psf):
    with pytest.raises(ValueError, match="needs the array 'sigmas'"):
        get_psf_model(fake_psf.to_record()[0])  # a dict carries no arrays


def test_corrupt_psf_model_file_is_a_clear_error(tmp_path):
    path = tmp_path / "broken.cgpsf"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header" + b"\0" * 20)
    with pytest.raises(ModelFileError, match="broken.cgpsf"):
        resolve_psf(path)
    with pytest.raises(ModelFileError, match="PSF model file .*missing.cgpsf does not exist"):
        resolve_psf(tmp_path / "missing.cgpsf")


@pytest.mark.parametrize("spec, match", [(42, "got int"), ([1, 2], "got list")])
def test_something_that_names_no_psf_model_is_a_clear_error(spec, match):
    with pytest.raises(ConfigError, match=match):
        get_psf_model(spec)


def test_invalid_json_config_names_the_file(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text("{na: 1")
    with pytest.raises(ConfigError, match=r"invalid JSON .*bad\.json"):
        resolve_psf(path)


def test_get_psf_config_refuses_a_psf_model_of_another_kind(fake_psf):
    assert get_psf_config("gaussian") is PRESETS["gaussian"]
    with pytest.raises(ConfigError, match="is not a pupil/Gaussian PSF config"):
        get_psf_config(fake_psf)


# -- the optics with another kind of PSF model --------------------------------------------------------------
def _image(shape=(32, 40), seed=0):
    rng = np.random.default_rng(seed)
    img = np.zeros(shape, np.float32)
    img[rng.integers(2, shape[0] - 2, 30), rng.integers(2, shape[1] - 2, 30)] = 1.0
    return img


def test_the_fake_model_keeps_the_interface_contract(fake_psf):
    psfs = fake_psf.psfs_at(np.array([-1.0, 0.2]), np.array([1.0, -0.4]), (32, 40))
    np.testing.assert_allclose(psfs.sum(axis=(-2, -1)), 1.0)
    grid, ys, xs = fake_psf.psf_grid((32, 40))
    assert grid.shape == (3, 3, 9, 9) and ys.tolist() == [-1.0, 0.0, 1.0]
    assert render_psf_grid(fake_psf, (32, 40), gap=1).shape == (3 * 9 + 4,) * 2


def test_blur_of_any_psf_model_uses_its_grid_and_keeps_the_adjoint_exact(fake_psf):
    img = _image()
    op = SpatiallyVaryingBlur(fake_psf, img.shape, dtype=torch.float64)

    blurred = op.forward(img)

    np.testing.assert_array_equal(op.psfs, fake_psf.psf_grid(img.shape)[0])
    assert "fake beads" in repr(op) and "K=3" in repr(op)
    assert blurred.shape == img.shape and abs(blurred.sum() - img.sum()) < 0.05 * img.sum()
    # wider PSFs at the bottom right: a point there is spread more (lower peak) than at the top left
    corner = np.zeros_like(img)
    corner[2, 2] = corner[-3, -3] = 1.0
    out = op.forward(corner)
    assert out[2, 2] > 1.5 * out[-3, -3]
    y = np.random.default_rng(1).random(img.shape)
    assert np.isclose(float((op.forward(img) * y).sum()), float((img * op.adjoint(y)).sum()), rtol=1e-5)


def test_blur_refuses_a_psf_model_whose_grid_breaks_the_contract(fake_psf):
    class Wrong(type(fake_psf)):
        def psf_grid(self, field_shape=None, k=None):
            psfs, ys, xs = super().psf_grid(field_shape, k)
            return psfs[:, :, 1:, 1:], ys, xs  # even-sized PSFs

    with pytest.raises(ValueError, match="psf_grid gave PSFs of shape"):
        SpatiallyVaryingBlur(Wrong(fake_psf.sigmas), (16, 16))


def test_baselines_and_pairs_run_on_any_psf_model(fake_psf):
    sharp = _image()
    _, blurred = synthesize_pairs(sharp, fake_psf, photons=None)
    err = lambda a: float(np.abs(a - sharp).mean())  # noqa: E731

    np.testing.assert_array_equal(central_psf(fake_psf, sharp.shape), fake_psf.psf_at(0, 0, sharp.shape))
    assert wiener_kernels(fake_psf, sharp.shape, grid=2, size=15).shape == (4, 15, 15)
    restored = {
        "rl": richardson_lucy_central(blurred, fake_psf, 10),
        "wiener": wiener_central(blurred, fake_psf),
        "sv_rl": sv_richardson_lucy(blurred, fake_psf, 10),
        "sv_wiener": sv_wiener(blurred, fake_psf, size=15),
    }
    for name, out in restored.items():
        assert out.shape == sharp.shape and np.isfinite(out).all(), name
    assert err(restored["sv_rl"]) < err(blurred)


def test_sv_rl_of_a_region_uses_the_psfs_of_its_place_for_any_psf_model(fake_psf):
    img = _image((32, 32))
    full = SpatiallyVaryingBlur(fake_psf, (32, 32)).forward(img)
    part = SpatiallyVaryingBlur(fake_psf, (16, 16), offset=(16, 16), full_field=(32, 32))

    # away from the region's border (where the reflection differs) the region blurs as the whole field does
    np.testing.assert_allclose(part.forward(img[16:, 16:])[5:-5, 5:-5], full[16:, 16:][5:-5, 5:-5], atol=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = sv_richardson_lucy(full[16:, 16:], fake_psf.binned(1), 3, offset=(16, 16), full_field=(32, 32))
    assert out.shape == (16, 16)


# -- records and files that are no PSF model (issue 20) -------------------------------------------------------
def _measured_record(**changes):
    from napari_coordgate.optics.measured import MeasuredGridPSF

    psfs = np.zeros((3, 3, 17, 17))
    psfs[:, :, 8, 8] = 1.0
    meta, arrays = MeasuredGridPSF(psfs).to_record()
    return {**meta, **changes}, arrays


@pytest.mark.parametrize("changes, match", [
    ({"grid": 5000}, r"'grid' must be an integer from 1 to 64, got 5000"),
    ({"grid": 0}, r"'grid' must be an integer from 1 to 64"),
    ({"nodes": 10**6}, r"'nodes' must be an integer from 1 to 64"),
    ({"psf_size": 100001}, r"'psf_size' must be an odd integer from 3 to 255"),
    ({"grid": "many"}, r"'grid' must be an integer"),
    ({"field_shape": [0, 0]}, r"'field_shape' must be \[height, width\]"),
], ids=["grid-5000", "grid-0", "nodes", "psf-size", "grid-type", "field-shape"])
def test_a_record_declaring_impossible_sizes_is_refused_before_anything_is_built(changes, match, monkeypatch):
    from napari_coordgate.optics.measured import MeasuredGridPSF

    meta, arrays = _measured_record(**changes)
    monkeypatch.setattr(MeasuredGridPSF, "psf_grid", lambda *a, **k: pytest.fail("allocated from the record"))

    with pytest.raises(ValueError, match=match) as info:
        psf_model_from_record(meta, arrays)
    assert "\n" not in str(info.value)


def test_a_measured_grid_model_refuses_a_blur_grid_beyond_the_pupil_models_bound():
    from napari_coordgate.optics.measured import MeasuredGridPSF

    psfs = _measured_record()[1]["psfs"]
    assert MeasuredGridPSF(psfs, blur_grid=64).grid == 64
    with pytest.raises(ValueError, match="blur_grid must be from 1 to 64, got 5000"):
        MeasuredGridPSF(psfs, blur_grid=5000)


def _tiny_model_file(path):
    from napari_coordgate.config import ModelConfig
    from napari_coordgate.model_io import SavedModel, save_model
    from napari_coordgate.nn import build_model

    cfg = ModelConfig(depth=1, channels=2)
    return save_model(path, SavedModel(build_model(cfg), cfg, (16, 16)))


def test_a_model_file_given_as_a_psf_model_says_what_it_is_and_what_a_psf_model_is(tmp_path):
    path = _tiny_model_file(tmp_path / "net")

    with pytest.raises(ConfigError) as info:
        resolve_psf(path)
    message = str(info.value)
    assert "net.cgmodel" in message and "napari-coordgate model file" in message and "not a PSF model" in message
    assert "preset" in message and ".json" in message and ".cgpsf" in message
    assert "codec" not in message and "\n" not in message


def test_a_checkpoint_or_another_binary_file_given_as_a_psf_model_says_what_it_is(tmp_path):
    from napari_coordgate import model_io as modelio
    from napari_coordgate.model_io import save_checkpoint

    ck = save_checkpoint(tmp_path / "run", weights={"w": torch.zeros(2)}, best={"w": torch.ones(2)},
                         optimizer={"state": {}, "param_groups": []}, rng_tensors={}, state={})
    renamed = tmp_path / "model.bin"
    renamed.write_bytes(_tiny_model_file(tmp_path / "m").read_bytes())  # the kind is read from the file itself
    package = tmp_path / "pack.zip"
    package.write_bytes(b"PK\x03\x04" + b"\0" * 60)
    image = tmp_path / "beads.tif"
    image.write_bytes(b"II*\x00" + bytes(range(256)) * 4)

    for path, what in [(ck, "napari-coordgate checkpoint file"), (renamed, "napari-coordgate model file"),
                       (package, "zip file"), (image, "not a text file")]:
        with pytest.raises(ConfigError, match=what) as info:
            resolve_psf(path)
        assert path.name in str(info.value) and ".cgpsf" in str(info.value) and "codec" not in str(info.value)
    assert modelio.CHECKPOINT_SUFFIX == ".cgckpt"


def test_a_psf_model_file_under_another_name_is_read_as_one(tmp_path, fake_psf):
    path = tmp_path / "beads.psf"
    path.write_bytes(save_psf_model(tmp_path / "beads", fake_psf).read_bytes())

    np.testing.assert_array_equal(resolve_psf(path).sigmas, fake_psf.sigmas)


# -- the pupil_poly model with more Zernike terms ------------------------------------------------------------------

POLY_OPTICS = dict(na=0.8, wavelength_um=0.52, refractive_index=1.0, pixel_size_um=0.16, psf_size=15)


def _poly_with_trefoil():
    from napari_coordgate.optics.psf import ZERNIKE_TERMS
    from napari_coordgate.optics.pupil_poly import PupilPolyPSF

    coef = np.zeros((len(ZERNIKE_TERMS), 6))
    coef[0, [0, 3, 5]] = [0.05, 0.1, 0.1]
    coef[ZERNIKE_TERMS.index("trefoil_0"), [0, 1]] = [0.08, 0.04]
    coef[ZERNIKE_TERMS.index("astig2_45"), 4] = 0.03
    return PupilPolyPSF(coef, **POLY_OPTICS, name="with trefoil")


def test_a_pupil_poly_model_with_trefoil_round_trips_as_a_version_2_record_with_the_same_psfs():
    from napari_coordgate.optics.psf import ZERNIKE_TERMS

    model = _poly_with_trefoil()
    meta, arrays = model.to_record()
    back = psf_model_from_record(json.loads(json.dumps(meta)), arrays)
    y, x = np.array([-1.0, 0.3, 0.9]), np.array([0.5, -0.2, 1.0])

    assert meta["version"] == 2 and meta["terms"] == list(ZERNIKE_TERMS) and back.terms == ZERNIKE_TERMS
    np.testing.assert_array_equal(back.coefficients, model.coefficients)
    np.testing.assert_array_equal(back.psfs_at(y, x), model.psfs_at(y, x))
    assert "10 Zernike" in back.describe()


def test_a_six_term_pupil_poly_record_is_written_as_before_so_older_releases_read_it():
    from napari_coordgate.optics.psf import PRIMARY_TERMS
    from napari_coordgate.optics.pupil_poly import PupilPolyPSF

    model = PupilPolyPSF.from_psf_config("edge_defocus_astigmatism", psf_size=15)
    meta, arrays = model.to_record()

    assert meta["version"] == 1 and meta["terms"] == list(PRIMARY_TERMS) and arrays["coefficients"].shape == (6, 6)
    assert model.terms == PRIMARY_TERMS


def test_the_further_terms_change_the_psfs_and_their_pupil_is_sampled_for_them():
    from napari_coordgate.optics.psf import pupil_samples
    from napari_coordgate.optics.pupil_poly import PupilPolyPSF

    model = _poly_with_trefoil()
    primary = PupilPolyPSF(model.coefficients[:6], **POLY_OPTICS)
    y, x = np.array([0.0, 1.0]), np.array([0.0, 1.0])

    assert np.abs(model.psfs_at(y, x) - primary.psfs_at(y, x)).max() > 0.05 * primary.psfs_at(y, x).max()
    assert model._samples > primary._samples == pupil_samples(primary._cfg)


@pytest.mark.parametrize("edit, match", [
    (lambda m, a: m.update(terms=m["terms"][:5] + ["trefoil_0"]), "terms"),
    (lambda m, a: m.update(terms=m["terms"][::-1]), "terms"),
    (lambda m, a: a.update(coefficients=a["coefficients"][:6]), "one row per term"),
    (lambda m, a: m.update(version=4), "newer"),
    (lambda m, a: m.update(monomials=m["monomials"][:5] + ["x3"]), "monomials"),
    (lambda m, a: m.update(monomials=m["monomials"] + ["x3", "x2y", "xy2", "y3"]), "one column per monomial"),
])
def test_a_pupil_poly_record_whose_terms_do_not_match_is_refused(edit, match):
    meta, arrays = _poly_with_trefoil().to_record()
    edit(meta, arrays)
    with pytest.raises(ValueError, match=match):
        psf_model_from_record(meta, arrays)


@pytest.mark.parametrize("rows, columns", [(5, 6), (11, 6), (6, 7), (6, 3)])
def test_a_pupil_poly_model_needs_the_primary_terms_at_most_all_terms_and_a_quadratic_or_cubic_law(rows, columns):
    from napari_coordgate.optics.pupil_poly import PupilPolyPSF

    with pytest.raises(ValueError, match="shape"):
        PupilPolyPSF(np.zeros((rows, columns)), **POLY_OPTICS)


def test_a_cubic_field_law_round_trips_as_a_version_3_record_and_bends_the_focal_surface():
    from napari_coordgate.optics.pupil_poly import MONOMIALS, PupilPolyPSF

    quadratic = _poly_with_trefoil()
    coef = np.zeros((quadratic.coefficients.shape[0], len(MONOMIALS)))
    coef[:, :6] = quadratic.coefficients
    coef[0, MONOMIALS.index("x3")] = 0.1  # defocus grows as x³ on top of the quadratic
    cubic = PupilPolyPSF(coef, **POLY_OPTICS, name="bent")
    meta, arrays = cubic.to_record()
    back = psf_model_from_record(json.loads(json.dumps(meta)), arrays)
    y, x = np.array([0.0, 0.2, -0.5]), np.array([1.0, 0.0, -1.0])

    assert meta["version"] == 3 and meta["monomials"] == list(MONOMIALS) and back.degree == 3
    np.testing.assert_array_equal(back.psfs_at(y, x), cubic.psfs_at(y, x))
    assert "cubic" in back.describe() and quadratic.degree == 2
    # defocus moves by 0.1 x³: +0.1 waves at x = 1, -0.1 at x = -1, unchanged on the axis x = 0
    np.testing.assert_allclose(cubic.zernike_at(y, x)[:, 0] - quadratic.zernike_at(y, x)[:, 0], [0.1, 0.0, -0.1],
                               atol=1e-12)
    assert np.abs(cubic.psfs_at(0.0, 1.0) - quadratic.psfs_at(0.0, 1.0)).max() > 0.02 * quadratic.psfs_at(0, 1).max()
    # on the axis only the pupil's sampling differs (sampled for the larger defocus the cubic reaches)
    axis = quadratic.psfs_at(0.2, 0.0)
    assert np.abs(cubic.psfs_at(0.2, 0.0) - axis).max() < 0.01 * axis.max()
