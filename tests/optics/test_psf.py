import json
import warnings
from pathlib import Path

import numpy as np
import pytest

from napari_coordgate.config import ConfigError
from napari_coordgate.model_io import resolve_psf
from napari_coordgate.optics.models import get_psf_config, psf_at, psf_grid, render_psf_grid
from napari_coordgate.optics.psf import (
    PRESETS,
    PSFConfig,
    Pupil,
    UndersamplingWarning,
    field_polar,
    pupil_samples,
)


def _moments(psf):
    """Centroid (y, x) and covariance matrix of a PSF, in pixels."""
    s = psf.shape[0]
    u = np.arange(s) - s // 2
    yy, xx = np.meshgrid(u, u, indexing="ij")
    my, mx = (psf * yy).sum(), (psf * xx).sum()
    dy, dx = yy - my, xx - mx
    cov = np.array([[(psf * dy * dy).sum(), (psf * dy * dx).sum()], [(psf * dx * dy).sum(), (psf * dx * dx).sum()]])
    return np.array([my, mx]), cov


@pytest.mark.parametrize("name", sorted(PRESETS))
@pytest.mark.parametrize("pos", [(0.0, 0.0), (1.0, 1.0), (-0.5, 0.8)])
def test_psf_sums_to_one(name, pos):
    psf = psf_at(PRESETS[name], *pos, field_shape=(60, 90))

    assert psf.shape == (PRESETS[name].psf_size,) * 2
    assert psf.min() >= 0
    assert psf.sum() == pytest.approx(1.0, abs=1e-9)


def test_aberration_free_psf_is_centred_and_round():
    psf = psf_at(PRESETS["diffraction_limited"], 0.7, -0.3)

    centroid, cov = _moments(psf)
    np.testing.assert_allclose(centroid, 0.0, atol=1e-9)
    np.testing.assert_allclose(psf, psf.T, atol=1e-12)
    np.testing.assert_allclose(psf, psf[::-1, ::-1], atol=1e-12)
    assert psf.argmax() == psf.size // 2


@pytest.mark.parametrize("name", ["edge_defocus_astigmatism", "strong_astigmatism", "gaussian"])
def test_edge_psf_wider_than_centre(name):
    cfg = PRESETS[name]

    centre = psf_at(cfg, 0.0, 0.0)
    corner = psf_at(cfg, 1.0, 1.0)

    assert np.trace(_moments(corner)[1]) > 1.5 * np.trace(_moments(centre)[1])
    assert corner.max() < 0.5 * centre.max()


def test_field_dependence_is_symmetric_about_the_axis():
    cfg = PRESETS["edge_defocus_astigmatism"]

    right = psf_at(cfg, 0.0, 0.9)
    bottom = psf_at(cfg, 0.9, 0.0)

    # swapping the image axes maps the field point (0, 0.9) onto (0.9, 0) and every aberration with it
    np.testing.assert_allclose(bottom, right.T, atol=1e-10)
    assert not np.allclose(right, right.T, atol=1e-4)  # but the PSF itself is not round there


def test_astigmatism_is_oriented_along_the_radius():
    # astigmatism alone has isotropic second moments; a little defocus turns it into a line focus
    cfg = PSFConfig(astig_h2=0.3, defocus=0.15, psf_size=25)

    _, cov = _moments(psf_at(cfg, 0.8, 0.8))  # field angle 45°

    evals, evecs = np.linalg.eigh(cov)
    long_axis = evecs[:, np.argmax(evals)]
    assert evals.max() > 1.3 * evals.min()
    # principal axes along the radius (1, 1)/√2 or across it (1, -1)/√2
    assert abs(abs(long_axis[0]) - abs(long_axis[1])) < 1e-6


def test_non_square_frame_keeps_the_field_round():
    cfg = PRESETS["edge_defocus_astigmatism"]
    shape = (101, 201)  # half-sides 50 and 100 pixels
    d = 40.0

    h_y, _ = field_polar(cfg, d / 50.0, 0.0, shape)
    h_x, _ = field_polar(cfg, 0.0, d / 100.0, shape)
    h_corner, _ = field_polar(cfg, 1.0, -1.0, shape)

    assert h_y == pytest.approx(h_x)
    assert h_corner == pytest.approx(1.0)
    np.testing.assert_allclose(psf_at(cfg, d / 50.0, 0.0, shape), psf_at(cfg, 0.0, d / 100.0, shape).T, atol=1e-10)


def test_off_centre_axis_moves_the_sharpest_point():
    cfg = PRESETS["edge_defocus_astigmatism"].replace(axis_y=0.4, axis_x=-0.3)

    at_axis = psf_at(cfg, 0.4, -0.3)
    at_centre = psf_at(cfg, 0.0, 0.0)

    # every field-dependent term vanishes on the axis: the PSF there has the symmetry of the aperture
    np.testing.assert_allclose(at_axis, at_axis.T, atol=1e-12)
    np.testing.assert_allclose(at_axis, at_axis[::-1], atol=1e-12)
    assert not np.allclose(at_centre, at_centre[::-1], atol=1e-4)
    assert at_centre.max() < 0.9 * at_axis.max()


def test_gaussian_width_follows_the_config():
    cfg = PSFConfig(model="gaussian", sigma_px=1.2, sigma_radial_h2=1.0, sigma_tangential_h2=0.25, psf_size=31)

    _, cov = _moments(psf_at(cfg, 0.0, 1.0))  # field angle 0: radial = x; h² = 1/2 on a square frame

    # binning to pixels adds the variance of a uniform pixel, 1/12
    assert np.sqrt(cov[1, 1] - 1 / 12) == pytest.approx(1.2 * (1 + 1.0 * 0.5), rel=0.02)
    assert np.sqrt(cov[0, 0] - 1 / 12) == pytest.approx(1.2 * (1 + 0.25 * 0.5), rel=0.02)


def test_undersampling_warns_but_still_computes():
    cfg = PSFConfig(na=0.8, wavelength_um=0.52, pixel_size_um=0.3)

    with pytest.warns(UndersamplingWarning, match="pixel_size_um"):
        psf = psf_at(cfg, 0.0, 0.0)

    assert psf.sum() == pytest.approx(1.0)
    # the binned PSF of an undersampling camera is narrower in pixels than that of a fine one
    fine = psf_at(PSFConfig(), 0.0, 0.0)
    assert psf.max() > fine.max()


def test_well_sampled_presets_do_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error", UndersamplingWarning)
        for cfg in PRESETS.values():
            psf_grid(cfg.replace(grid=2), (32, 32))


@pytest.mark.parametrize(
    "fields, names",
    [
        (dict(na=1.5, refractive_index=1.33), ["na", "refractive_index"]),
        (dict(wavelength_um=-0.5), ["wavelength_um"]),
        (dict(grid=0), ["grid"]),
        (dict(psf_size=20), ["psf_size"]),
        (dict(oversample=2), ["oversample"]),
        (dict(model="zernike"), ["model"]),
        (dict(defocus_h2=float("nan")), ["defocus_h2"]),
    ],
)
def test_bad_config_errors_name_the_field(fields, names):
    with pytest.raises(ConfigError) as info:
        PSFConfig(**fields)

    for name in names:
        assert f"PSFConfig.{name}" in str(info.value)


def test_unknown_keys_are_rejected_by_name():
    with pytest.raises(ConfigError, match="wavelength_nm"):
        get_psf_config({"wavelength_nm": 520})


def test_unknown_preset_lists_the_valid_ones():
    with pytest.raises(ConfigError) as info:
        get_psf_config("edge_blur")

    for name in PRESETS:
        assert name in str(info.value)


def test_config_round_trips_through_a_json_file(tmp_path):
    cfg = PRESETS["strong_astigmatism"].replace(name="mine", axis_x=0.25)
    path = tmp_path / "psf.json"
    path.write_text(cfg.to_json())

    assert get_psf_config(resolve_psf(path)) == cfg
    assert get_psf_config(resolve_psf(str(path))) == cfg
    assert get_psf_config(json.loads(cfg.to_json())) == cfg
    assert PSFConfig.from_dict(cfg.to_dict()) == cfg


def test_missing_json_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read PSF config file"):
        resolve_psf(tmp_path / "nope.json")


def test_presets_are_named_after_their_key():
    assert {"edge_defocus_astigmatism", "strong_astigmatism", "gaussian"} <= set(PRESETS)
    for key, cfg in PRESETS.items():
        assert cfg.name == key
        assert get_psf_config(key) is cfg
    assert PRESETS["gaussian"].model == "gaussian"


def test_psf_grid_holds_the_psf_of_each_node():
    cfg = PRESETS["edge_defocus_astigmatism"].replace(grid=3)

    psfs, ys, xs = psf_grid(cfg, (40, 70))

    assert psfs.shape == (3, 3, cfg.psf_size, cfg.psf_size)
    np.testing.assert_allclose(ys, [-1, 0, 1])
    np.testing.assert_allclose(psfs[2, 0], psf_at(cfg, ys[2], xs[0], (40, 70)), atol=1e-12)
    np.testing.assert_allclose(psfs[1, 1], psf_at(cfg, 0.0, 0.0, (40, 70)), atol=1e-12)


def test_single_node_grid_is_the_centre():
    cfg = PRESETS["gaussian"].replace(grid=1)

    psfs, ys, xs = psf_grid(cfg)

    assert psfs.shape[:2] == (1, 1) and ys.tolist() == [0.0] and xs.tolist() == [0.0]


def test_render_psf_grid_tiles_every_psf():
    cfg = PRESETS["gaussian"].replace(grid=4)
    s, gap = cfg.psf_size, 3

    image = render_psf_grid(cfg, (50, 50), gap=gap)

    assert image.dtype == np.float32 and image.shape == (4 * s + 5 * gap,) * 2
    tiles = [image[gap + i * (s + gap) :][:s, gap + j * (s + gap) :][:, :s] for i in range(4) for j in range(4)]
    assert all(t.max() == pytest.approx(1.0) for t in tiles)
    assert image[:gap].max() == 0 and image[:, :gap].max() == 0


def test_render_psf_grid_global_normalisation_shows_the_peak_loss():
    image = render_psf_grid(PRESETS["gaussian"].replace(grid=3), normalize="global", gap=0)
    s = PRESETS["gaussian"].psf_size

    assert image[s : 2 * s, s : 2 * s].max() == pytest.approx(1.0)
    assert image[:s, :s].max() < 0.5


def test_large_psf_window_has_no_periodic_copies(monkeypatch):
    import napari_coordgate.optics.psf as psf_module

    cfg = PSFConfig(psf_size=101)
    wide = psf_at(cfg, 0.0, 0.0)
    monkeypatch.setattr(psf_module, "_MIN_PUPIL_SAMPLES", 400)  # a finely sampled pupil as reference
    reference = psf_at(cfg, 0.0, 0.0)

    # a coarsely sampled pupil makes the field periodic: copies of the Airy pattern raise the faint tails
    # at the window edge (to ~20x their true level without the wrap-around rule)
    band = (slice(0, 10), slice(None))
    np.testing.assert_allclose(wide[band], reference[band], atol=2e-5 * reference.max())
    np.testing.assert_allclose(wide, reference, atol=5e-3 * reference.max())


def test_is_uniform_flags_field_dependent_terms():
    assert PSFConfig(astig_0=0.3, coma_y=0.1).is_uniform
    assert not PRESETS["edge_defocus_astigmatism"].is_uniform
    assert not PRESETS["gaussian"].is_uniform
    assert PRESETS["gaussian"].replace(sigma_radial_h2=0.0, sigma_tangential_h2=0.0).is_uniform


def test_a_pupil_psf_is_the_same_whatever_else_is_computed_with_it():
    pupil = Pupil(PRESETS["strong_astigmatism"].replace(psf_size=15))
    coeffs = np.random.default_rng(0).normal(0.0, 0.1, (5, 6))

    batch = pupil.psfs_numpy(coeffs)

    for i in range(5):
        np.testing.assert_array_equal(pupil.psfs_numpy(coeffs[i : i + 1])[0], batch[i])
    np.testing.assert_allclose(batch.sum(axis=(1, 2)), 1.0, rtol=0, atol=1e-12)


def test_pupil_samples_grow_with_the_aberrations_and_the_margin():
    cfg = PRESETS["diffraction_limited"]
    plain = pupil_samples(cfg)
    strong = pupil_samples(cfg, worst=np.full(6, 0.5))

    assert plain % 2 == 0 and plain >= 32 and strong > plain
    assert pupil_samples(cfg, worst=np.full(6, 0.5), margin=1.0) < strong
    assert pupil_samples(PRESETS["strong_astigmatism"]) > pupil_samples(PRESETS["strong_astigmatism"].replace(
        astig_0=0.0, astig_h2=0.0, defocus_h2=0.0, coma_h=0.0))


# -- the Zernike terms beyond the primary six ----------------------------------------------------------------------


def _disc(n=801):
    """Polar coordinates of a fine grid's points inside the unit disc, and the area of one point."""
    t = (np.arange(n) - (n - 1) / 2) * (2.0 / n)
    yy, xx = np.meshgrid(t, t, indexing="ij")
    inside = np.hypot(yy, xx) < 1.0
    return np.hypot(yy, xx)[inside], np.arctan2(yy, xx)[inside], (2.0 / n) ** 2


def _noll(n, m, rho, theta):
    """Noll's Zernike polynomial (n, m) written out from its general formula (m < 0: the sine term)."""
    from math import factorial

    k = abs(m)
    radial = sum((-1) ** j * factorial(n - j)
                 / (factorial(j) * factorial((n + k) // 2 - j) * factorial((n - k) // 2 - j))
                 * rho ** (n - 2 * j) for j in range((n - k) // 2 + 1))
    if m == 0:
        return np.sqrt(n + 1) * radial
    return np.sqrt(2 * (n + 1)) * radial * (np.cos(k * theta) if m > 0 else np.sin(k * theta))


def test_zernike_terms_are_the_noll_polynomials_of_their_orders_orthonormal_over_the_pupil():
    from napari_coordgate.optics.psf import PRIMARY_TERMS, ZERNIKE_ORDERS, ZERNIKE_TERMS, _zernike_basis

    rho, theta, area = _disc()
    basis = np.array(_zernike_basis(rho, theta))

    assert len(ZERNIKE_TERMS) == len(ZERNIKE_ORDERS) == basis.shape[0] >= 10
    assert ZERNIKE_TERMS[:6] == PRIMARY_TERMS == ("defocus", "astig_0", "astig_45", "coma_x", "coma_y", "spherical")
    assert {"trefoil_0", "trefoil_30", "astig2_0", "astig2_45"} <= set(ZERNIKE_TERMS)
    for b, (n, m) in zip(basis, ZERNIKE_ORDERS):
        np.testing.assert_allclose(b, _noll(n, m, rho, theta), atol=1e-12)
    gram = basis @ basis.T * area / np.pi  # mean over the disc: unit RMS (Noll) and orthogonal
    np.testing.assert_allclose(gram, np.eye(len(basis)), atol=3e-3)


def test_max_slope_of_each_term_is_its_steepest_gradient_over_the_pupil():
    from napari_coordgate.optics.psf import _MAX_SLOPE, _zernike_basis

    t = np.linspace(-1, 1, 1201)
    yy, xx = np.meshgrid(t, t, indexing="ij")
    rho, theta = np.hypot(yy, xx), np.arctan2(yy, xx)
    inside = rho <= 1.0
    for b, slope in zip(_zernike_basis(rho, theta), _MAX_SLOPE):
        gy, gx = np.gradient(b, t, t)
        steepest = np.hypot(gy, gx)[inside & (rho < 0.999)].max()
        assert abs(steepest - slope) < 0.01 * slope, (steepest, slope)


def test_pupil_presets_give_the_psfs_they_gave_before_the_further_terms():
    # tests/data/pupil_presets_psfs.npz was written by the code of commit b91323f (six Zernike terms)
    stored = np.load(Path(__file__).parents[1] / "data" / "pupil_presets_psfs.npz")
    y, x = np.array([-1.0, 0.25, 1.0]), np.array([1.0, -0.5, -0.9])
    assert sorted(stored.files) == sorted(n for n, c in PRESETS.items() if c.model == "pupil")
    for name in stored.files:
        # to rounding: other CPUs' FFTs and BLAS round differently (5e-16 relative on an AMD EPYC)
        np.testing.assert_allclose(PRESETS[name].psfs_at(y, x, (100, 160)), stored[name], rtol=1e-12, atol=0)


def test_zero_further_terms_leave_every_psf_as_the_primary_terms_give_it():
    from napari_coordgate.optics.psf import ZERNIKE_TERMS

    pupil = Pupil(PRESETS["edge_defocus_astigmatism"])
    primary = np.random.default_rng(0).normal(0.0, 0.1, (4, 6))
    padded = np.concatenate([primary, np.zeros((4, len(ZERNIKE_TERMS) - 6))], axis=1)

    np.testing.assert_array_equal(pupil.psfs_numpy(padded), pupil.psfs_numpy(primary))
    with pytest.raises(ValueError, match="Zernike coefficients"):
        pupil.psfs_numpy(np.zeros((1, len(ZERNIKE_TERMS) + 1)))


def test_trefoil_and_secondary_astigmatism_give_psfs_of_their_symmetry():
    from napari_coordgate.optics.psf import ZERNIKE_TERMS

    pupil = Pupil(PRESETS["diffraction_limited"].replace(psf_size=15), samples=96)
    coef = np.zeros((3, len(ZERNIKE_TERMS)))
    coef[0, ZERNIKE_TERMS.index("trefoil_0")] = 0.15  # cos 3θ: even in θ, odd under a half turn
    coef[1, ZERNIKE_TERMS.index("astig2_0")] = 0.15  # cos 2θ: even in θ and under a half turn
    trefoil, astig2, perfect = pupil.psfs_numpy(coef)

    np.testing.assert_allclose(trefoil, trefoil[::-1, :], atol=1e-12)  # mirror y -> -y
    assert np.abs(trefoil - trefoil[::-1, ::-1]).max() > 0.05 * trefoil.max()  # odd: not centrosymmetric
    np.testing.assert_allclose(astig2, astig2[::-1, :], atol=1e-12)  # cos 2θ: mirror y -> -y
    np.testing.assert_allclose(astig2, astig2[::-1, ::-1], atol=1e-12)  # even: centrosymmetric
    assert trefoil.max() < 0.8 * perfect.max() and astig2.max() < 0.8 * perfect.max()


def test_pair_bound_gives_each_term_of_a_pair_their_sum():
    from napari_coordgate.optics.psf import ZERNIKE_TERMS, pair_bound

    bound = np.arange(1.0, len(ZERNIKE_TERMS) + 1)
    got = dict(zip(ZERNIKE_TERMS, pair_bound(bound)))
    b = dict(zip(ZERNIKE_TERMS, bound))

    assert got["defocus"] == b["defocus"] and got["spherical"] == b["spherical"]
    for pair in [("astig_0", "astig_45"), ("coma_x", "coma_y"), ("trefoil_0", "trefoil_30"),
                 ("astig2_0", "astig2_45")]:
        assert got[pair[0]] == got[pair[1]] == b[pair[0]] + b[pair[1]]
    np.testing.assert_array_equal(pair_bound(bound[:6]), pair_bound(bound)[:6])  # fewer terms: the same rule


def test_pupil_samples_grow_with_the_further_terms_and_refuse_too_many():
    from napari_coordgate.optics.psf import ZERNIKE_TERMS

    cfg = PRESETS["diffraction_limited"]
    primary = np.full(6, 0.1)
    assert pupil_samples(cfg, primary) == pupil_samples(cfg, np.concatenate([primary, np.zeros(4)]))
    assert pupil_samples(cfg, np.concatenate([primary, [0.0, 0.0, 0.3, 0.3]])) > pupil_samples(cfg, primary)
    with pytest.raises(ValueError, match="at most"):
        pupil_samples(cfg, np.zeros(len(ZERNIKE_TERMS) + 1))
