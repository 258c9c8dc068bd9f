"""Point-array calibration (issue 22): how close the jointly measured PSF grid gets on dense arrays, and how fast.

A point array is rendered by a model other than the one the measurement fits (``render_array``): each site a
small disk (a nanohole, 0.5 px across) on a pixel grid oversampled ``oversample`` times, blurred by an elliptical
Moffat (beta 4) whose FWHM grows from ``fwhm`` in the centre to ``growth`` x that in the corners along the field
radius (``1 + 0.4 (growth - 1)`` across it), long axis radial; binned to pixels; site brightness ``photons`` +-5 %
(fabrication), 10 % of the sites missing, a lattice turned by 2°, a background of 2 % of the central peak plus a
gradient, Poisson noise. The PSF error is the relative L2 error ``||measured - true|| / ||true||`` of each node PSF
against the true PSF of a point at the node (pixel-integrated, centred on a pixel), over the K x K nodes: median
and worst.

Printed per case: sites across x sites down, pitch over the central FWHM, K, S, the PSF error median and worst,
sites modelled / lit / missing (in the frame, as measured), iterations and seconds of ``measure_array_psfs``.

The table is for a 1024² frame with 15 x 15 and 30 x 30 sites across it (pitch 68 and 34 px) at pitches of 1.5, 2
and 3 central FWHM; the FWHM then follows from the pitch, and ``photons`` per site is scaled with the PSF's area
(3000 for a 3 px FWHM) so that the central peak's signal-to-noise ratio is the same in every case.

Usage::

    python benchmarks/bench_arrays.py            # 15 x 15 and 30 x 30 sites, pitch 1.5 / 2 / 3 FWHM, 1024^2
    python benchmarks/bench_arrays.py --quick    # one 160^2 array, pitch 1.8 FWHM, K = 5 (the test suite runs it)
"""

from __future__ import annotations

import argparse
import math
import platform
import time
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from napari_coordgate.calibration.arrays import measure_array_psfs
from napari_coordgate.coords import field_position, grid_positions
from napari_coordgate.samples.beads import array_positions


@dataclass
class ArrayOptics:
    """An elliptical Moffat whose FWHM grows from ``fwhm`` (centre) to ``growth`` x ``fwhm`` (corners, along the
    field radius; across it ``1 + 0.4 (growth - 1)`` x), long axis radial."""

    fwhm: float
    growth: float = 2.0
    beta: float = 4.0

    def params(self, yn: np.ndarray, xn: np.ndarray):
        r2 = (yn**2 + xn**2) / 2.0  # 1 in the corners
        alpha = self.fwhm / (2.0 * math.sqrt(2.0 ** (1.0 / self.beta) - 1.0))
        a1 = alpha * (1.0 + (self.growth - 1.0) * r2)
        a2 = alpha * (1.0 + 0.4 * (self.growth - 1.0) * r2)
        return a1, a2, np.arctan2(yn, xn)

    def density(self, dy: np.ndarray, dx: np.ndarray, yn, xn) -> np.ndarray:
        """The PSF (unit integral) at offsets (dy, dx) px (..., F, F) from points at normalised (yn, xn) (...)."""
        a1, a2, th = (np.asarray(v, float)[..., None, None] for v in self.params(np.asarray(yn), np.asarray(xn)))
        p = dx * np.cos(th) + dy * np.sin(th)
        q = -dx * np.sin(th) + dy * np.cos(th)
        return (self.beta - 1.0) / (math.pi * a1 * a2) * (1.0 + (p / a1) ** 2 + (q / a2) ** 2) ** (-self.beta)

    def reach(self) -> int:
        """Half the window (px) that holds all but ~0.3 % of the corner PSF's light."""
        return int(math.ceil(2.2 * self.fwhm * self.growth))


def _disk_kernel(diameter_fine: float) -> np.ndarray:
    """A unit-sum disk of ``diameter_fine`` fine pixels, its edge pixels weighted by their covered area."""
    r = diameter_fine / 2.0
    n = int(math.ceil(r)) * 2 + 1
    sub = (np.arange(n * 8) + 0.5) / 8 - n / 2.0
    inside = (sub[:, None] ** 2 + sub[None, :] ** 2 <= r * r).reshape(n, 8, n, 8).mean(axis=(1, 3))
    return inside / inside.sum()


def _site_images(optics: ArrayOptics, pos: np.ndarray, shape, oversample: int, hole_px: float, reach: int):
    """(N, 2R+1, 2R+1) each site's pixel image (unit light) and the integer anchors (N, 2) of those windows."""
    o = oversample
    anchor = np.round(pos).astype(int)
    n_px = 2 * reach + 1
    # fine sample centres of the window's pixels, relative to each site
    fine = (np.arange(n_px * o) + 0.5) / o - 0.5 - reach
    yn, xn = field_position(pos[:, 0], shape[0]), field_position(pos[:, 1], shape[1])
    kernel = _disk_kernel(hole_px * o)[None]
    out = np.empty((len(pos), n_px, n_px))
    for lo in range(0, len(pos), 64):
        sl = slice(lo, lo + 64)
        off = anchor[sl] - pos[sl]
        dy = fine[None, :, None] + off[:, 0, None, None]
        dx = fine[None, None, :] + off[:, 1, None, None]
        dens = optics.density(dy, dx, yn[sl], xn[sl]) / o**2
        dens = ndimage.convolve(dens, kernel, mode="constant")
        out[sl] = dens.reshape(-1, n_px, o, n_px, o).sum(axis=(2, 4))
    return out, anchor


def render_array(shape, pitch: float, optics: ArrayOptics, *, photons: float = 3000.0, missing: float = 0.1,
                 angle_deg: float = 2.0, oversample: int = 8, hole_px: float = 0.5, seed: int = 0):
    """A noisy image of a point array (Poisson counts plus a camera offset of 100) and the true site positions."""
    rng = np.random.default_rng(seed)
    h, w = shape
    reach = optics.reach()
    y, x = array_positions(shape, pitch, margin=-reach, angle_deg=angle_deg, offset=(0.31, -0.17))
    pos = np.stack([y, x], axis=1)
    pos = pos[rng.random(len(pos)) >= missing]
    amp = photons * (1.0 + 0.05 * rng.standard_normal(len(pos)))
    img, anchor = _site_images(optics, pos, shape, oversample, hole_px, reach)
    pad = 2 * reach + 1
    canvas = np.zeros((h + 2 * pad, w + 2 * pad))
    for (ay, ax), a, im in zip(anchor + pad - reach, amp, img):
        canvas[ay : ay + 2 * reach + 1, ax : ax + 2 * reach + 1] += a * im
    expected = canvas[pad : pad + h, pad : pad + w]
    peak = photons * float(optics.density(np.zeros((1, 1)), np.zeros((1, 1)), 0.0, 0.0)[0, 0])
    yy, xx = np.mgrid[0:h, 0:w]
    expected = expected + 0.02 * peak * (1.0 + 0.5 * xx / w + 0.3 * yy / h)
    return rng.poisson(expected).astype(np.float64) + 100.0, pos


def true_node_psfs(optics: ArrayOptics, shape, k: int, size: int, oversample: int = 8) -> np.ndarray:
    """(K, K, size, size) the true PSF of a point at each node, pixel-integrated, on the middle pixel."""
    t = grid_positions(k)
    yn, xn = (a.ravel() for a in np.meshgrid(t, t, indexing="ij"))
    o = oversample
    fine = (np.arange(size * o) + 0.5) / o - 0.5 - size // 2
    dens = optics.density(fine[None, :, None], fine[None, None, :], yn, xn)
    psfs = dens.reshape(k * k, size, o, size, o).sum(axis=(2, 4))
    return (psfs / psfs.sum(axis=(1, 2), keepdims=True)).reshape(k, k, size, size)


def psf_errors(measured: np.ndarray, true: np.ndarray) -> np.ndarray:
    """(K, K) relative L2 error of measured (K, K, S, S) against true (K, K, T, T), T >= S, both centred."""
    s, t = measured.shape[-1], true.shape[-1]
    pad = (t - s) // 2
    big = np.pad(measured, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    return np.linalg.norm(big - true, axis=(2, 3)) / np.linalg.norm(true, axis=(2, 3))


def run_case(size: int, sites: int, ratio: float, k: int, seed: int = 0, oversample: int = 4) -> tuple:
    pitch = size / sites
    fwhm = pitch / ratio
    optics = ArrayOptics(fwhm)
    psf_size = 2 * int(math.ceil(1.6 * fwhm * optics.growth)) + 1
    image, pos = render_array((size, size), pitch, optics, photons=3000.0 * (fwhm / 3.0) ** 2,
                              oversample=oversample, seed=seed)
    t0 = time.perf_counter()
    psfs, diag = measure_array_psfs(image, grid=k, psf_size=psf_size)
    seconds = time.perf_counter() - t0
    err = psf_errors(psfs, true_node_psfs(optics, (size, size), k, psf_size + 20))
    return (f"{sites} x {sites}", ratio, k, psf_size, float(np.median(err)), float(err.max()), diag["sites"],
            diag["sites_lit"], diag["sites_missing"], diag["iterations"], seconds)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one small array (seconds)")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--grid", type=int, default=5)
    parser.add_argument("--sites", type=int, nargs="+", default=[15, 30])
    parser.add_argument("--ratios", type=float, nargs="+", default=[1.5, 2.0, 3.0])
    args = parser.parse_args(argv)
    if args.quick:
        cases = [(160, int(round(160 / 5.4)), 1.8, 5)]
    else:
        cases = [(args.size, n, r, args.grid) for n in args.sites for r in args.ratios]
    print(f"# point-array PSF grid measured jointly ({platform.processor() or platform.machine()})")
    print(f"{'sites':>8} {'pitch/FWHM':>10} {'K':>3} {'S':>4} {'PSF err median':>14} {'worst':>6} "
          f"{'modelled':>8} {'lit':>5} {'missing':>7} {'iter':>4} {'seconds':>8}")
    for case in cases:
        row = run_case(*case)
        print(f"{row[0]:>8} {row[1]:>10.1f} {row[2]:>3} {row[3]:>4} {row[4]:>14.3f} {row[5]:>6.3f} {row[6]:>8} "
              f"{row[7]:>5} {row[8]:>7} {row[9]:>4} {row[10]:>8.1f}")


if __name__ == "__main__":
    main()
