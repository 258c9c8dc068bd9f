"""Synthetic bead z-stacks for testing and benchmarking the 3-D calibration
(:mod:`~napari_coordgate.calibration.zstack`), rendered by a different model from the one the calibration fits:
every bead gets the exact 3-D PSF of its own field position (no grid, no interpolation between nodes), at its exact
sub-pixel position and the slide's exact sub-plane position, with shot and read noise.

:class:`AstigmaticBeam3D` is a cheap analytic optics for tests: pixel-integrated elliptical Gaussians whose widths
grow through focus like a Gaussian beam's, astigmatic (the two line foci apart) and with a best focus that tilts
and curves across the field. Any object with the same ``volumes`` and ``focus_planes`` methods renders (the
benchmark wraps the pupil model of :class:`~napari_coordgate.optics.psf3d.Pupil3DPSF`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy.special import erf

from napari_coordgate.coords import field_position

__all__ = ["AstigmaticBeam3D", "bead_zstack", "psf3d_error", "focus_error"]


@dataclass(frozen=True)
class AstigmaticBeam3D:
    """An analytic 3-D PSF that changes across the field (units: pixels laterally, planes axially).

    At defocus ``dz`` from its best focus, the PSF is an elliptical Gaussian with widths
    ``sigma * sqrt(1 + ((dz -+ a) / z_r)²)`` along y and x, ``a = astig * h²`` (h the field height: the line foci
    part toward the corners), ``sigma`` growing as ``sigma0 * (1 + grow * h²)``; every plane holds the same light
    (a Gaussian beam). Best focus ``f(y, x) = tilt_y y + tilt_x x + curvature h²`` (planes).
    """

    sigma0: float = 1.0
    z_rayleigh: float = 3.0
    astig: float = 1.0
    grow: float = 0.3
    tilt_y: float = 1.5
    tilt_x: float = -1.0
    curvature: float = 2.0

    def focus_planes(self, y_norm, x_norm) -> np.ndarray:
        y, x = np.asarray(y_norm, np.float64), np.asarray(x_norm, np.float64)
        return self.tilt_y * y + self.tilt_x * x + self.curvature * 0.5 * (y * y + x * x)

    def volumes(self, y_norm, x_norm, dz0: float, dy, dx, depth: int, size: int) -> np.ndarray:
        """(N, depth, size, size) PSFs of emitters at (y_norm, x_norm), plane ``d`` at ``d - depth // 2 - dz0``
        planes from the emitter, moved (dy, dx) px from the middle pixel; unit light per plane."""
        y = np.atleast_1d(np.asarray(y_norm, np.float64))
        x = np.atleast_1d(np.asarray(x_norm, np.float64))
        h2 = 0.5 * (y * y + x * x)
        sigma = self.sigma0 * (1.0 + self.grow * h2)
        a = self.astig * h2
        dz = (np.arange(depth) - depth // 2 - dz0)[None, :] - self.focus_planes(y, x)[:, None]  # (N, D)
        sy = sigma[:, None] * np.sqrt(1.0 + ((dz - a[:, None]) / self.z_rayleigh) ** 2)
        sx = sigma[:, None] * np.sqrt(1.0 + ((dz + a[:, None]) / self.z_rayleigh) ** 2)
        edges = np.arange(size + 1) - size // 2 - 0.5
        py = _pixel_gauss(edges, np.atleast_1d(dy)[:, None], sy)  # (N, D, size)
        px = _pixel_gauss(edges, np.atleast_1d(dx)[:, None], sx)
        return py[..., :, None] * px[..., None, :]


def _pixel_gauss(edges: np.ndarray, centre: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    """Integrals of unit Gaussians (centre, sigma: broadcast (N, D)) over the pixels between ``edges``."""
    t = (edges[None, None, :] - centre[..., None]) / (math.sqrt(2.0) * sigma[..., None])
    c = 0.5 * erf(t)
    return np.diff(c, axis=-1)


def bead_zstack(optics, shape: Sequence[int], n_beads: int, *, photons: float = 3000.0, slide_plane: float | None
                = None, seed: int = 0, background: float = 10.0, read_noise: float = 2.0, psf_size: int = 31,
                margin: int = 0, bead_diameter_px: float = 0.0, z_step_px: float = 1.0) -> tuple[np.ndarray, dict]:
    """A bead slide imaged through focus: (Z, H, W) float64 electrons and the truth.

    Beads are placed uniformly (no two closer than ``psf_size / 2``, at least ``margin`` px from the border) on
    the slide at plane ``slide_plane`` (default the middle plus a quarter plane); their in-focus peak pixel gets
    about ``photons`` (0.5-1 x, random). A finite bead (``bead_diameter_px``, planes ``z_step_px`` px apart) is
    the sum of point PSFs on a grid filling the sphere (0.5 px apart; not the transfer function the calibration
    divides out). Returns the stack and ``{"y", "x", "flux", "slide_plane"}``.
    """
    z, h, w = (int(n) for n in shape)
    rng = np.random.default_rng(seed)
    slide = (z - 1) / 2.0 + 0.25 if slide_plane is None else float(slide_plane)
    ys, xs = _spread(rng, h, w, n_beads, psf_size / 2.0, margin)
    zc = int(math.floor(slide))
    depth = 2 * max(zc, z - 1 - zc) + 1  # reaches every plane of the stack from the slide
    vols = 0.0
    for pz, py, px, wt in zip(*_sphere(bead_diameter_px, z_step_px)):
        vols = vols + wt * optics.volumes(field_position(ys, h), field_position(xs, w), slide - zc + pz,
                                          ys - np.round(ys) + py, xs - np.round(xs) + px, depth, psf_size)
    peak = vols.reshape(len(ys), -1).max(axis=1)
    flux = rng.uniform(0.5, 1.0, len(ys)) * photons / peak
    r = psf_size // 2
    expected = np.zeros((z, h + 2 * r, w + 2 * r))
    first = zc - depth // 2  # stack plane of each volume's plane 0
    lo, hi = -first, -first + z
    for k in range(len(ys)):
        iy, ix = int(round(ys[k])), int(round(xs[k]))
        expected[:, iy : iy + psf_size, ix : ix + psf_size] += flux[k] * vols[k, lo:hi]
    expected = expected[:, r : r + h, r : r + w] + background
    stack = rng.poisson(expected).astype(np.float64) + rng.normal(0.0, read_noise, expected.shape)
    return stack, {"y": ys, "x": xs, "flux": flux, "slide_plane": slide}


def _sphere(diameter_px: float, z_step_px: float) -> tuple[np.ndarray, ...]:
    """(dz planes, dy px, dx px, weight) of points filling a sphere of ``diameter_px`` on a grid 0.5 px apart (finer
    for beads under 2 px: at least 4 points across; one point for 0), equal weights summing to one."""
    if not diameter_px > 0:
        return np.zeros(1), np.zeros(1), np.zeros(1), np.ones(1)
    r = 0.5 * float(diameter_px)
    t = np.arange(-r, r + 1e-9, min(0.5, r / 2))
    t = t - t.mean()
    zz, yy, xx = (a.ravel() for a in np.meshgrid(t, t, t, indexing="ij"))
    keep = zz * zz + yy * yy + xx * xx <= r * r
    n = int(keep.sum())
    return zz[keep] / float(z_step_px), yy[keep], xx[keep], np.full(n, 1.0 / n)


def _spread(rng, h: int, w: int, n: int, min_dist: float, margin: int) -> tuple[np.ndarray, np.ndarray]:
    pts: list[tuple[float, float]] = []
    for _ in range(50 * n):
        if len(pts) == n:
            break
        p = (rng.uniform(margin, h - 1 - margin), rng.uniform(margin, w - 1 - margin))
        if all((p[0] - q[0]) ** 2 + (p[1] - q[1]) ** 2 >= min_dist**2 for q in pts):
            pts.append(p)
    arr = np.array(pts, dtype=np.float64).reshape(-1, 2)
    return arr[:, 0], arr[:, 1]


def psf3d_error(model, optics, field_shape: Sequence[int], n: int = 5) -> np.ndarray:
    """(n, n) relative L2 error of a 3-D PSF model against the optics at ``linspace(-1, 1, n)`` positions, both in
    the model's (D, s, s) volume, unit sum, moved laterally so their centroids sit on the middle pixel."""
    from napari_coordgate.calibration.zstack import _recentre_lateral

    t = np.linspace(-1.0, 1.0, n)
    yy, xx = (a.ravel() for a in np.meshgrid(t, t, indexing="ij"))
    d, s = model.psf_depth, model.psf_size
    true = optics.volumes(yy, xx, 0.0, np.zeros(yy.size), np.zeros(yy.size), d, s)
    est = model.psfs_at(yy, xx, tuple(field_shape)).reshape(-1, d, s, s)
    a, b = (_recentre_lateral(v / v.sum(axis=(1, 2, 3), keepdims=True)) for v in (true, est))
    a /= a.sum(axis=(1, 2, 3), keepdims=True)
    b /= b.sum(axis=(1, 2, 3), keepdims=True)
    err = np.linalg.norm((a - b).reshape(yy.size, -1), axis=1) / np.linalg.norm(a.reshape(yy.size, -1), axis=1)
    return err.reshape(n, n)


def focus_error(result, optics, n: int = 9) -> np.ndarray:
    """(n, n) |measured - true| best-focus shift relative to the field centre, in planes, at ``linspace(-1, 1, n)``."""
    t = np.linspace(-1.0, 1.0, n)
    yy, xx = np.meshgrid(t, t, indexing="ij")
    true = optics.focus_planes(yy, xx) - optics.focus_planes(0.0, 0.0)
    return np.abs(result.focus_map_um(n) / result.z_step_um - true)
