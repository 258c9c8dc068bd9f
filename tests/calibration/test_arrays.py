"""Point arrays measured jointly (calibration.arrays): the PSF grid of a dense array, the auto choice, refusals.

The arrays are rendered by ``benchmarks/bench_arrays.py`` (``render_array``), a model other than the one the
measurement fits: each site a 0.5 px disk on a grid 6x finer than the pixels, blurred by an elliptical Moffat whose
FWHM doubles from the centre to the corners, binned, Poisson noise, 10 % of the sites missing, the lattice turned.
"""

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

from napari_coordgate.calibration import CalibrationError
from napari_coordgate.calibration.arrays import looks_like_array, measure_array_psfs, shift_taps
from napari_coordgate.optics.measured import MeasuredGridPSF

_spec = importlib.util.spec_from_file_location(
    "bench_arrays", Path(__file__).parents[2] / "benchmarks" / "bench_arrays.py")
bench = sys.modules.setdefault("bench_arrays", importlib.util.module_from_spec(_spec))  # dataclasses look it up
_spec.loader.exec_module(bench)

FWHM = 3.0


@pytest.fixture(scope="module")
def dense_array():
    # pitch 1.8 central FWHM: the spots nearly touch in the centre and overlap in the corners (pitch 1 FWHM
    # there), where bead calibration refuses the image as a dense array (tests/calibration/test_lattice.py)
    optics = bench.ArrayOptics(FWHM, growth=2.0)
    image, pos = bench.render_array((160, 160), 1.8 * FWHM, optics, oversample=6, seed=0)
    return optics, image, pos


def test_shift_taps_keep_a_constant_and_move_a_sampled_psf_by_the_fraction():
    f = np.array([-0.5, -0.2, 0.0, 0.37])
    w = shift_taps(f)
    assert np.allclose(w.sum(axis=1), 1.0)
    u = np.arange(-10, 11)
    for fi, wi in zip(f, w):
        moved = np.convolve(np.exp(-(u**2) / 4.5), wi)[3:-3]  # out[u] = sum_d w[d] in[u + 3 - d]
        assert np.abs(moved - np.exp(-((u - fi) ** 2) / 4.5)).max() < 0.01


def test_a_dense_array_gives_the_psf_grid_within_15_percent(dense_array):
    optics, image, pos = dense_array
    k, s = 5, 21
    psfs, diag = measure_array_psfs(image, grid=k, psf_size=s, pixel_size_um=0.1)
    err = bench.psf_errors(psfs, bench.true_node_psfs(optics, image.shape, k, s + 20))
    print(f"node PSF error: median {np.median(err):.3f}, worst {err.max():.3f}")  # measured 0.145, 0.406
    assert np.median(err) <= 0.15
    assert psfs.shape == (k, k, s, s) and psfs.min() >= 0 and np.allclose(psfs.sum(axis=(2, 3)), 1.0)
    MeasuredGridPSF(psfs, pixel_size_um=diag["pixel_size_um"])  # takes them as they are
    # the missing sites are found missing: about 10 % of those in the frame
    assert 0.05 < diag["sites_missing"] / diag["sites_in_frame"] < 0.15
    assert diag["residual"].shape == (k, k) and np.all(diag["residual"] < 1.5)


def test_an_array_looks_like_one_and_scattered_beads_do_not(dense_array):
    _, image, _ = dense_array
    assert looks_like_array(image)
    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[0:192, 0:192]
    beads = np.zeros((192, 192))
    for y, x in rng.uniform(4, 188, (150, 2)):
        beads += 2000 * np.exp(-((yy - y) ** 2 + (xx - x) ** 2) / (2 * 1.3**2))
    assert not looks_like_array(rng.poisson(beads + 20).astype(float))


def test_too_few_sites_are_refused_with_a_message_that_says_so():
    optics = bench.ArrayOptics(FWHM, growth=1.0)
    small, _ = bench.render_array((32, 32), 9.0, optics, missing=0.0, oversample=2, seed=1)  # about 16 spots
    with pytest.raises(CalibrationError, match="no point array found"):
        measure_array_psfs(small, grid=1, psf_size=15)
    image, _ = bench.render_array((72, 72), 9.0, optics, missing=0.0, oversample=2, seed=1)  # 64 sites
    with pytest.raises(CalibrationError, match="too few for a 5 x 5 PSF grid"):
        measure_array_psfs(image, grid=5, psf_size=15)
    with pytest.raises(CalibrationError, match="psf_size must be odd"):
        measure_array_psfs(image, grid=1, psf_size=14)
