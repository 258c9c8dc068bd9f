"""Windows per region of the field: where the PSF grows toward the corners, the beads there get windows that hold
their light, those in the centre keep small ones, and the grid's fit weighs each bead on its own window only."""

import numpy as np
import pytest

from napari_coordgate.calibration.grid import fit_grid
from napari_coordgate.calibration.patches import Patches, support_masks


def _gauss(size: int, sigma: float) -> np.ndarray:
    c = np.arange(size) - size // 2
    g = np.exp(-(c[:, None] ** 2 + c[None, :] ** 2) / (2 * sigma**2))
    return g / g.sum()


def _patches(support_left: int, n: int = 240, size: int = 31, seed: int = 0):
    """Beads over the field whose PSF is the tent interpolation along x of a sharp PSF (x = -1 and 1) and a wide
    one (x = 0), on a 3 x 3 grid; beads left of the centre have windows of ``support_left`` px (zero beyond: the
    wide PSF's light there is cut), the others the whole square. Returns (patches, truth (3, s, s) by column)."""
    rng = np.random.default_rng(seed)
    y, x = rng.uniform(-1, 1, n), rng.uniform(-1, 1, n)
    truth = np.stack([_gauss(size, 1.2), _gauss(size, 5.0), _gauss(size, 1.2)])
    t = 1.0 - np.abs(x)  # the wide PSF's weight: 1 in the centre, 0 at both sides
    psfs = (1 - t)[:, None, None] * truth[0] + t[:, None, None] * truth[1]
    support = np.where(x < 0, support_left, size)
    psfs = np.where(support_masks(support, size), psfs, 0.0)  # what each window holds
    ones = np.ones(n)
    return Patches(np.arange(n), np.zeros((n, size + 6, size + 6)), np.zeros(n), np.zeros((n, 2)), psfs, ones,
                   ones, y, x, size, 3, support), truth


def test_the_grid_fit_weighs_each_bead_on_its_own_window_and_recovers_psfs_its_small_windows_cut():
    patches, truth = _patches(support_left=21)

    fit = fit_grid(patches, 3, lam=1e-6)

    got = fit.psfs[1]  # the middle row: columns x = -1, 0, 1
    err = np.linalg.norm(got - truth, axis=(1, 2)) / np.linalg.norm(truth, axis=(1, 2))
    beyond = ~support_masks(np.array([21]), patches.psf_size)[0]
    wings = got[1][beyond].sum() / truth[1][beyond].sum()  # the wide PSF's light beyond the small windows
    assert err.max() < 0.01 and abs(wings - 1.0) < 0.02, (err, wings)
    assert np.array_equal(fit.supports[1], [21, 31, 31])  # each node as far as its beads' windows reach


@pytest.mark.parametrize("declared", ["own windows", "one window for all"])
def test_pixels_beyond_a_beads_window_are_not_read_as_darkness(declared):
    rng = np.random.default_rng(1)
    n, size = 60, 31
    psf = _gauss(size, 5.0)
    support = np.where(np.arange(n) % 2 == 0, 21, size)  # half the beads' windows cut the PSF's wings
    data = np.where(support_masks(support, size), psf, 0.0)
    ones = np.ones(n)
    patches = Patches(np.arange(n), np.zeros((n, size + 6, size + 6)), np.zeros(n), np.zeros((n, 2)), data, ones,
                      ones, rng.uniform(-1, 1, n), rng.uniform(-1, 1, n), size, 3,
                      support if declared == "own windows" else None)

    fit = fit_grid(patches, 1, lam=1e-6)

    beyond = ~support_masks(np.array([21]), size)[0]
    wings = fit.psfs[0, 0][beyond].sum() / psf[beyond].sum()
    if declared == "own windows":
        assert abs(wings - 1.0) < 0.02, wings
    else:
        assert wings < 0.7, wings  # the cut half read as zeros


def test_a_psf_five_times_wider_in_the_corners_gets_small_windows_in_the_centre_and_larger_ones_in_the_corners():
    from napari_coordgate.calibration.calibrate import calibrate
    from napari_coordgate.coords import grid_positions
    from napari_coordgate.samples.beads import EllipticalOptics, bead_slide, psf_error

    optics = EllipticalOptics(width=1.6, radial=4.0, tangential=2.5, beta=4.0, twist=0.0, psf_size=81)
    image, _ = bead_slide(optics, (512, 512), n_beads=250, photons=5000, n_saturated=0, n_touching=0, seed=0)

    result = calibrate(image, model="grid")

    windows = np.array(result.model.provenance["windows_by_region"])
    assert windows[1, 1] <= 13 and windows[[0, 0, 2, 2], [0, 2, 0, 2]].min() >= 17
    model = result.model
    t = grid_positions(model.nodes)
    yy, xx = np.meshgrid(t, t, indexing="ij")
    true = optics.psfs(yy.ravel(), xx.ravel())
    c = true.shape[-1] // 2
    held = [true[i, c - u // 2 : c + u // 2 + 1, c - u // 2 : c + u // 2 + 1].sum()
            for i, u in enumerate(model.supports.ravel())]
    # this slide: 0.83 with the centre's 13 px everywhere, 0.957 with one window per region (the corner node's PSF
    # is wider than any stacked bead's), 0.992 with windows grown toward the corners (the 1024² growing replica:
    # benchmarks/README.md)
    assert min(held) >= 0.985
    assert model.supports.min() < model.psf_size  # the file records where each node ends
    assert np.median(psf_error(model, optics, (512, 512))) < 0.1


def test_a_window_grows_in_proportion_to_how_much_wider_the_psf_is_than_the_stack_that_measured_it():
    from napari_coordgate.calibration.windows import MAX_WIDENING, Windows

    def law(y, x):  # FWHM 3 px left of the centre, 6 px at the right edge
        return 3.0 + 3.0 * np.clip(np.asarray(x, float), 0.0, None)

    w = Windows(np.full(9, 21), np.full(9, 9), np.full(9, 3.0), law, cap=81)
    y = np.zeros(4)
    sides = w.at(y, np.array([-0.5, 0.0, 0.5, 1.0]))
    assert list(sides) == [21, 21, 31, 39]  # radius 9 px -> 13.5 (x 1.5) -> 18 (x MAX_WIDENING = 2)
    assert sides[-1] == 2 * round(9 * MAX_WIDENING) + 3
    assert list(w.at(np.array([0.0, np.nan]), np.array([np.nan, 1.0]))) == [21, 21]  # unknown: ungrown
    assert list(w.at(y, np.array([-0.5, 0.0, 0.5, 1.0]), core=True)) == [9] * 4  # a core does not grow
    assert w.largest() == 39
    assert list(Windows(w.regions, w.cores, w.widths, law, cap=35).at(y[:1], np.array([1.0]))) == [35]
    stacked_at_right = Windows(np.full(9, 21), np.full(9, 9), np.full(9, 6.0), law)
    assert list(stacked_at_right.at(y[:1], np.array([1.0]))) == [21]  # no wider than its stack: unchanged
    assert list(stacked_at_right.at(y[:1], np.array([-1.0]))) == [21]  # narrower: never smaller
    # what grows is the side that holds the stack's light; a window that reached further (where the stack sank into
    # its noise) already holds the wider PSF's light there
    lit = Windows(np.full(9, 21), np.full(9, 9), np.full(9, 3.0), law, lights=np.full(9, 11))
    assert list(lit.at(y[:1], np.array([1.0]))) == [21]  # 11 -> 19 px at x 2: within the region's 21
    lit = Windows(np.full(9, 21), np.full(9, 9), np.full(9, 3.0), law, lights=np.full(9, 15))
    assert list(lit.at(y[:1], np.array([1.0]))) == [27]
    given = Windows.one(15)
    assert list(given.at(np.array([-1.0, 1.0]), np.array([1.0, np.nan]))) == [15, 15] and given.largest() == 15


def test_the_beads_fwhm_law_follows_the_field_and_ignores_blends():
    from types import SimpleNamespace

    from napari_coordgate.calibration.windows import _width_law

    rng = np.random.default_rng(0)
    y, x = rng.uniform(-1, 1, 200), rng.uniform(-1, 1, 200)
    fwhm = 2.0 + 3.0 * (x * x + y * y) / 2 + rng.normal(0, 0.1, 200)
    fwhm[:20] *= 2.5  # blends of two beads: much too wide
    table = SimpleNamespace(y_norm=y, x_norm=x, fwhm_x=fwhm, fwhm_y=fwhm - 0.5)
    law = _width_law(table, np.arange(200))
    assert np.allclose(law(np.array([0.0, 1.0, -1.0]), np.array([0.0, 1.0, 0.0])), [2.0, 5.0, 3.5], atol=0.15)
    assert _width_law(table, np.arange(11)) is None  # too few beads for a law


def test_no_bead_gets_a_window_larger_than_the_largest_the_arrays_are_made_for():
    from napari_coordgate.calibration.windows import Windows

    def law(y, x):  # wider to the right; each column of regions measured on beads of its own width
        return 4.0 + 2.0 * np.asarray(x, float)

    w = Windows(np.full(9, 41), np.full(9, 9), np.tile([2.0, 14.0 / 3.0, 6.0], 3), law, cap=81)
    t = np.linspace(-1.0, 1.0, 601)
    yy, xx = np.meshgrid(t, t, indexing="ij")
    sides = w.at(yy.ravel(), xx.ravel())
    largest = w.largest()
    assert sides.max() <= largest and largest > 41  # the left column grows most at its inner edge (x -> -1/3)
    assert sides.max() >= largest - 2
