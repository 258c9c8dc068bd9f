"""The pupil fit (calibration.pupilfit): the images of finite beads in its forward model, and the Zernike terms beyond
the primary six, fitted only when the beads show them."""

import numpy as np
import pytest
import torch

from napari_coordgate.calibration.pupilfit import TorchPupil, fit_pupil_poly
from napari_coordgate.coords import field_position
from napari_coordgate.optics.psf import PRIMARY_TERMS, ZERNIKE_TERMS, PSFConfig, pupil_samples
from napari_coordgate.optics.pupil_poly import PupilPolyPSF
from napari_coordgate.samples.beads import PupilOptics, bead_slide, psf_error

OPTICS = dict(na=0.8, wavelength_um=0.52, refractive_index=1.0, pixel_size_um=0.16)
T = len(ZERNIKE_TERMS)


def _coefficients(n, seed):
    """(n, T) small random Zernike coefficients, trefoil and secondary astigmatism included."""
    return np.random.default_rng(seed).normal(0.0, 0.08, (n, T))


# ------------------------------------------------------------------------------------------- bead images


def test_bead_images_are_the_psfs_of_points_spread_over_the_projected_sphere():
    d, s = 2.5, 15
    coeffs = torch.as_tensor(_coefficients(2, 0))
    shifts = torch.as_tensor([[0.2, -0.3], [-0.4, 0.1]], dtype=torch.float64)
    bead = TorchPupil(**OPTICS, psf_size=s, pupil_samples=64, bead_diameter_px=d).psfs(coeffs, shifts).numpy()
    # independently: point PSFs at points 0.1 px apart over the bead's disc, weighted by the sphere's thickness
    # there, on a crop wide enough to hold what the bead spreads in, then cut to the same square
    wide = TorchPupil(**OPTICS, psf_size=s + 8, pupil_samples=64)
    t = (np.arange(25) - 12) * 0.1
    py, px = (a.ravel() for a in np.meshgrid(t, t, indexing="ij"))
    thick = np.sqrt(np.clip((d / 2) ** 2 - py**2 - px**2, 0.0, None))
    keep = thick > 0
    py, px, w = py[keep], px[keep], thick[keep] / thick[keep].sum()
    for i in range(2):
        sub = torch.as_tensor(np.stack([py, px], 1)) + shifts[i]
        psfs = wide.psfs(coeffs[i].expand(len(w), -1), sub).numpy()
        ref = np.tensordot(w, psfs, axes=1)[4:-4, 4:-4]
        ref /= ref.sum()
        assert np.abs(bead[i] - ref).max() < 0.01 * ref.max(), np.abs(bead[i] - ref).max() / ref.max()
    # and they are broader than the PSFs of points
    point = TorchPupil(**OPTICS, psf_size=s, pupil_samples=64).psfs(coeffs, shifts).numpy()
    assert np.all(bead.max(axis=(1, 2)) < 0.9 * point.max(axis=(1, 2)))


def test_a_vanishing_bead_gives_the_psf_of_a_point():
    coeffs = torch.as_tensor(_coefficients(3, 1))
    point = TorchPupil(**OPTICS, psf_size=13, pupil_samples=48).psfs(coeffs)
    tiny = TorchPupil(**OPTICS, psf_size=13, pupil_samples=48, bead_diameter_px=1e-3).psfs(coeffs)

    assert float((tiny - point).abs().max()) < 1e-6
    with pytest.raises(ValueError, match="bead_diameter_px"):
        TorchPupil(**OPTICS, psf_size=13, bead_diameter_px=-1.0)


@pytest.mark.parametrize("diameter", [0.0, 2.5])
def test_derivatives_of_bead_images_and_of_every_term_match_finite_differences(diameter):
    pupil = TorchPupil(**OPTICS, psf_size=13, pupil_samples=64, bead_diameter_px=diameter)
    coeffs = torch.as_tensor(_coefficients(3, 2))
    shifts = torch.as_tensor([[0.3, -0.2]] * 3, dtype=torch.float64)

    psf, dpsf = pupil.psfs_and_derivatives(coeffs, shifts)

    assert dpsf.shape == (3, T + 2, 13, 13)
    assert torch.allclose(psf, pupil.psfs(coeffs, shifts))
    eps = 1e-6
    for k in range(T + 2):
        c, s = coeffs.clone(), shifts.clone()
        (c[:, k] if k < T else s[:, k - T]).add_(eps)
        numeric = (pupil.psfs(c, s) - psf) / eps
        assert float((numeric - dpsf[:, k]).abs().max()) < 1e-4 * float(dpsf[:, k].abs().max()), ZERNIKE_TERMS[k:]
    # fewer terms: the derivatives of those
    _, d6 = pupil.psfs_and_derivatives(coeffs[:, :6], shifts)
    assert d6.shape == (3, 8, 13, 13)


def test_for_aberrations_samples_the_pupil_for_any_number_of_terms():
    cfg = PSFConfig(**OPTICS, psf_size=15)
    bound = np.array([0.3, 0.1, 0.2, 0.1, 0.05, 0.05])
    old = bound.copy()  # the rule for six terms, as it was written before the further ones
    old[1:3], old[3:5] = bound[1] + bound[2], bound[3] + bound[4]

    six = TorchPupil.for_aberrations(**OPTICS, psf_size=15, bound=bound)
    ten = TorchPupil.for_aberrations(**OPTICS, psf_size=15, bound=np.concatenate([bound, [0.1, 0.0, 0.0, 0.1]]))

    assert six.m == pupil_samples(cfg, old, margin=1.0)
    assert ten.m > six.m


# ------------------------------------------------------------------------------------------- finite beads


def test_finite_beads_fitted_with_their_diameter_give_a_much_smaller_psf_error():
    # 2.5 px beads on a slide rendered as point sources over each sphere (samples.beads), not by the transfer
    # function the fit multiplies by; the same start (the true coefficients) for both fits
    h = w = 224
    d, s = 2.5, 17
    optics = PupilOptics("edge_defocus_astigmatism", (h, w), psf_size=25)
    g = np.linspace(14, h - 15, 6)
    rng = np.random.default_rng(0)
    ys, xs = (a.ravel() + rng.uniform(-0.5, 0.5, 36) for a in np.meshgrid(g, g, indexing="ij"))
    image, _ = bead_slide(optics, (h, w), n_beads=0, photons=3000, hot_fraction=0, offset=0.0, seed=1,
                          bead_diameter_px=d, positions=(ys, xs))
    iy, ix = np.round(ys).astype(int), np.round(xs).astype(int)
    data = np.stack([image[a - s // 2 : a + s // 2 + 1, b - s // 2 : b + s // 2 + 1] for a, b in zip(iy, ix)])
    start = PupilPolyPSF.from_psf_config(optics.cfg, (h, w)).coefficients
    args = (data.astype(np.float64), field_position(ys, h), field_position(xs, w), np.stack([ys - iy, xs - ix], 1),
            np.full(36, 8.0))
    truth = PupilOptics("edge_defocus_astigmatism", (h, w), psf_size=41)  # holds the fitted models' halos

    errors = {}
    for diameter in (0.0, d):
        fit = fit_pupil_poly(*args, **OPTICS, init=start, bead_diameter_px=diameter)
        errors[diameter] = np.median(psf_error(fit.model, truth, (h, w)))
        assert fit.model.terms == PRIMARY_TERMS  # the model stays the PSF of a point, with the start's terms

    assert errors[d] < 0.06 and errors[d] < 0.3 * errors[0.0], errors


# ------------------------------------------------------------------------------------------- further terms


class _PolyOptics:
    """True optics for psf_error: a PupilPolyPSF's PSFs on a crop wide enough for their halos."""

    def __init__(self, coef, size=61):
        self.model, self.psf_size = PupilPolyPSF(coef, **OPTICS, psf_size=size), size

    def psfs(self, y, x, dy=None, dx=None):
        return self.model.psfs_at(np.asarray(y), np.asarray(x))


def _beads(coef, n=24, s=13, seed=0, photons=3000.0):
    """Noisy bead squares of a PupilPolyPSF at random field positions, and the fit's arguments for them."""
    rng = np.random.default_rng(seed)
    yn, xn = rng.uniform(-1, 1, n), rng.uniform(-1, 1, n)
    shifts = rng.uniform(-0.5, 0.5, (n, 2))
    z = PupilPolyPSF(coef, **OPTICS, psf_size=s).zernike_at(yn, xn)
    psf = TorchPupil(**OPTICS, psf_size=s, pupil_samples=96).psfs(torch.as_tensor(z), torch.as_tensor(shifts)).numpy()
    expected = photons * rng.uniform(0.6, 1.0, (n, 1, 1)) * psf / psf.max(axis=(1, 2), keepdims=True) + 60.0
    data = rng.poisson(expected) + rng.normal(0.0, 2.0, expected.shape)
    nodes = PupilPolyPSF(coef, **OPTICS, psf_size=s).psf_grid(k=4)[0]
    return (data, yn, xn, shifts + rng.normal(0, 0.1, (n, 2)), np.full(n, 8.0)), nodes


def _primary():
    coef = np.zeros((6, 6))
    coef[0, [0, 3, 5]] = [0.05, 0.15, 0.15]
    coef[1, [3, 5]] = [0.12, -0.12]
    coef[2, 4] = 0.2
    coef[3, 1] = coef[4, 2] = 0.08
    return coef


def test_trefoil_is_fitted_when_the_beads_show_it():
    coef = np.zeros((T, 6))
    coef[:6] = _primary()
    coef[ZERNIKE_TERMS.index("trefoil_0"), [0, 1]] = [0.08, 0.04]
    coef[ZERNIKE_TERMS.index("trefoil_30"), 2] = 0.04
    coef[ZERNIKE_TERMS.index("astig2_0"), 3] = 0.03
    args, nodes = _beads(coef)

    fit = fit_pupil_poly(*args, **OPTICS, node_psfs=nodes, max_iterations=10)

    assert fit.extension_score > 2.0 and fit.extension_held_out < 0.5 and fit.model.terms == ZERNIKE_TERMS
    trefoil = ZERNIKE_TERMS.index("trefoil_0")
    assert abs(fit.model.coefficients[trefoil, 0] - 0.08) < 0.02
    assert np.median(psf_error(fit.model, _PolyOptics(coef), (256, 256))) < 0.05


def test_optics_without_further_aberrations_keep_the_primary_terms():
    args, nodes = _beads(_primary())

    fit = fit_pupil_poly(*args, **OPTICS, node_psfs=nodes, max_iterations=10)
    forced = fit_pupil_poly(*args, **OPTICS, init=fit.model.coefficients, terms=T, max_iterations=5,
                            polish_iterations=2)

    assert fit.extension_score < 1.0 and fit.model.terms == PRIMARY_TERMS
    assert np.median(psf_error(fit.model, _PolyOptics(_primary()), (256, 256))) < 0.05
    # asked for, the further terms come out near zero
    assert forced.model.terms == ZERNIKE_TERMS and np.abs(forced.model.coefficients[6:]).max() < 0.03


@pytest.mark.parametrize("terms, init, match", [(5, None, "from 6"), (T + 1, None, f"to {T}"),
                                                 (6, np.zeros((T, 6)), f"from {T}")])
def test_a_number_of_terms_the_fit_cannot_give_is_refused(terms, init, match):
    args, _ = _beads(_primary(), n=3, s=9)
    with pytest.raises(ValueError, match=match):
        fit_pupil_poly(*args, **OPTICS, terms=terms, init=init)


# ------------------------------------------------------------------------------------------- starts from grid nodes


def test_start_squares_hold_the_light_of_defocused_rings():
    from napari_coordgate.calibration.pupilfit import _core_side
    from napari_coordgate.samples.beads import TiltedOptics

    optics = TiltedOptics((512, 512), psf_size=41)
    sharp, ring = optics.psfs(np.array([0.0, 0.0]), np.array([-1.0, 1.0]))  # in focus on the left, 0.6 waves right
    assert _core_side(sharp[None]) == 19  # a sharp PSF keeps the cheap square
    side = _core_side(np.stack([sharp, ring]))
    lo = (41 - side) // 2
    assert 19 < side < 41 and side % 2 == 1
    assert ring[lo : lo + side, lo : lo + side].sum() >= 0.95 * ring.sum()


def test_starts_from_exact_nodes_of_a_tilted_system_give_its_aberrations_at_the_nodes():
    """Defocused rings 20 px across on the right of the field: each node's start fit sees the whole ring, and the
    quadratic through the 3 x 3 nodes' fits (trefoil included) is the truth there (the system's cubic bend vanishes
    at the nodes), up to the even terms' common sign, which the PSF cannot tell."""
    from napari_coordgate.calibration.pupilfit import _EVEN, init_from_nodes
    from napari_coordgate.optics.pupil_poly import monomials
    from napari_coordgate.samples.beads import TiltedOptics

    torch.manual_seed(0)
    optics = TiltedOptics((1024, 1024), psf_size=41)
    nodes = np.asarray(optics.as_psf_model(3).node_psfs)
    coef, _ = init_from_nodes(nodes, **OPTICS, terms=8)
    t = np.array([-1.0, 0.0, 1.0])
    yy, xx = (a.ravel() for a in np.meshgrid(t, t, indexing="ij"))
    got, true = monomials(yy, xx) @ coef.T, optics.coefficients(yy, xx)[:, :8]
    flipped = got.copy()
    flipped[:, [e for e in _EVEN if e < 8]] *= -1
    err = min(np.abs(got - true).max(), np.abs(flipped - true).max())
    assert err < 0.02, err


# ------------------------------------------------------------------------------------------- a bent focal surface


def _bent(y, x, bend):
    """(N, 6) primary coefficients of a tilted specimen whose focal surface bends as ``bend`` sin(pi x) (not a
    polynomial: outside the fit's family either way), with astigmatism and coma across the field."""
    z = np.zeros((len(y), 6))
    z[:, 0] = 0.05 + 0.125 * (x + 1) + bend * np.sin(np.pi * x) + 0.1 * y * y
    z[:, 1], z[:, 2], z[:, 3], z[:, 4] = 0.1 * (x * x - y * y), 0.15 * x * y, 0.06 * x, 0.06 * y
    return z


class _BentOptics:
    """True optics for psf_error: :func:`_bent`'s PSFs, finely sampled pupil, on a crop wide enough for halos."""

    psf_size = 61

    def __init__(self, bend):
        self.bend, self.pupil = bend, TorchPupil(**OPTICS, psf_size=61, pupil_samples=128)

    def psfs(self, y, x, dy=None, dx=None):
        y, x = np.atleast_1d(y).ravel(), np.atleast_1d(x).ravel()
        return self.pupil.psfs(torch.as_tensor(_bent(y, x, self.bend))).numpy()


def _bent_beads(bend, n=48, s=15, seed=0):
    rng = np.random.default_rng(seed)
    yn, xn = rng.uniform(-1, 1, n), rng.uniform(-1, 1, n)
    shifts = rng.uniform(-0.5, 0.5, (n, 2))
    pupil = TorchPupil(**OPTICS, psf_size=s, pupil_samples=128)
    psf = pupil.psfs(torch.as_tensor(_bent(yn, xn, bend)), torch.as_tensor(shifts)).numpy()
    expected = 3000.0 * rng.uniform(0.6, 1.0, (n, 1, 1)) * psf / psf.max(axis=(1, 2), keepdims=True) + 60.0
    data = rng.poisson(expected) + rng.normal(0.0, 2.0, expected.shape)
    t = np.linspace(-1, 1, 4)
    yy, xx = (a.ravel() for a in np.meshgrid(t, t, indexing="ij"))
    nodes = pupil.psfs(torch.as_tensor(_bent(yy, xx, bend))).numpy().reshape(4, 4, s, s)
    return (data, yn, xn, shifts + rng.normal(0, 0.1, (n, 2)), np.full(n, 8.0)), nodes


def test_a_focal_surface_a_quadratic_cannot_follow_gets_a_cubic_defocus_law_and_a_much_smaller_psf_error():
    torch.manual_seed(0)
    args, nodes = _bent_beads(0.08)

    quadratic = fit_pupil_poly(*args, **OPTICS, node_psfs=nodes, max_iterations=10, terms=6, degree=2)
    auto = fit_pupil_poly(*args, **OPTICS, node_psfs=nodes, max_iterations=10, terms=6)

    assert quadratic.model.degree == 2 and auto.model.degree == 3
    assert auto.bend_score > 10 and auto.bend_held_out < 0.7
    errors = [np.median(psf_error(f.model, _BentOptics(0.08), (256, 256))) for f in (quadratic, auto)]
    assert errors[1] < 0.1 < 0.3 < errors[0], errors
    # only defocus bends: the other terms keep a quadratic law
    assert np.all(auto.model.coefficients[1:, 6:] == 0) and abs(auto.model.coefficients[0, 6]) > 0.1
    # refitted from its own coefficients (the calibration's final refit), it stays cubic
    again = fit_pupil_poly(*args, **OPTICS, init=auto.model.coefficients, max_iterations=0, polish_iterations=2)
    assert again.model.degree == 3 and np.abs(again.model.coefficients - auto.model.coefficients).max() < 0.02


def test_a_flat_focal_surface_keeps_the_quadratic_law():
    torch.manual_seed(0)
    args, nodes = _bent_beads(0.0)

    fit = fit_pupil_poly(*args, **OPTICS, node_psfs=nodes, max_iterations=10, terms=6)

    assert fit.bend_score < 2.0 and fit.model.degree == 2
    assert np.median(psf_error(fit.model, _BentOptics(0.0), (256, 256))) < 0.03


@pytest.mark.parametrize("degree, init, match", [(4, None, "2 or 3"), (1, None, "2 or 3"),
                                                 (2, np.zeros((6, 10)), "start is cubic")])
def test_a_field_law_the_fit_cannot_give_is_refused(degree, init, match):
    args, _ = _bent_beads(0.0, n=3, s=9)
    with pytest.raises(ValueError, match=match):
        fit_pupil_poly(*args, **OPTICS, degree=degree, init=init)


def test_pixels_marked_nan_are_not_a_beads_data_and_what_lies_there_does_not_move_the_fit():
    (data, yn, xn, shifts, noise), nodes = _beads(_primary(), n=24, s=15)
    junk = data.copy()
    junk[::2, :3, :] += 2000.0  # half the beads with a neighbour's glare along the top of their squares
    cut = junk.copy()
    cut[::2, :3, :] = np.nan  # ... beyond their windows: not their data
    common = dict(**OPTICS, node_psfs=nodes, max_iterations=10, terms=6, degree=2)

    clean = fit_pupil_poly(data, yn, xn, shifts, noise, **common)
    masked = fit_pupil_poly(cut, yn, xn, shifts, noise, **common)
    read = fit_pupil_poly(junk, yn, xn, shifts, noise, **common)

    truth = _PolyOptics(_primary())
    err = {name: np.median(psf_error(f.model, truth, (256, 256)))
           for name, f in (("clean", clean), ("masked", masked), ("read", read))}
    assert err["masked"] < err["clean"] + 0.01 and err["masked"] < 0.04, err
    assert err["read"] > 1.5 * err["masked"], err  # the robust weights alone do not undo the glare
    assert masked.weights[::2].min() > 0.3  # the masked beads are trusted: their own pixels fit
