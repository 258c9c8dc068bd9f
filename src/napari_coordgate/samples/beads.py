"""Synthetic bead slides with known optics, and the PSF error of a model against them.

Used by the calibration tests and ``benchmarks/bench_calibrate.py``; also handy to try the calibration without a
microscope. A *true optics* object is a callable ``psfs(y_norm, x_norm, dy, dx) -> (N, s, s)`` giving the PSF of
a point at each normalised field position, moved by a sub-pixel (dy, dx) from the middle pixel (so beads land
at exact sub-pixel positions), plus ``psf_size``.

- :class:`PupilOptics`: a pupil :class:`~napari_coordgate.optics.psf.PSFConfig` (e.g. a preset), rendered with
  the sub-pixel shift as a pupil phase ramp (inside the family the pupil fit can express);
- :class:`EllipticalOptics`: an elliptical Moffat (or Gaussian) whose widths and orientation change across the
  field, integrated over the pixels (outside the pupil family);
- :class:`TiltedOptics`: a tilted, decentred pupil system with trefoil, whose defocus is not quadratic in the
  field (a cubic bend: outside the pupil fit's quadratic law, inside its cubic one).

Beads may have a size (``bead_slide(bead_diameter_px=)``) and planted positions (:func:`crowded_positions`,
:func:`array_positions`).

Both give themselves as a PSF model (``as_psf_model``): the reference that training from a measured model is
compared with.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from napari_coordgate.coords import field_axis, field_position, grid_positions

__all__ = ["PupilOptics", "EllipticalOptics", "TiltedOptics", "bead_slide", "psf_error", "local_fwhm",
           "crowded_positions", "array_positions"]


class PupilOptics:
    """The PSFs of a pupil ``PSFConfig`` on a frame of ``field_shape``, at sub-pixel positions."""

    def __init__(self, cfg, field_shape: Sequence[int], psf_size: int | None = None):
        from napari_coordgate.optics.models import get_psf_config
        from napari_coordgate.optics.psf import Pupil

        self.cfg = get_psf_config(cfg)
        if psf_size is not None:
            self.cfg = self.cfg.replace(psf_size=int(psf_size))
        self.field_shape = tuple(int(n) for n in field_shape)
        self.psf_size = self.cfg.psf_size
        self._pupil = Pupil(self.cfg)
        self.name = f"pupil {self.cfg.name}"

    def coefficients(self, y, x) -> np.ndarray:
        from napari_coordgate.optics.psf import field_polar, zernike_coefficients

        h, phi = field_polar(self.cfg, np.asarray(y, float), np.asarray(x, float), self.field_shape)
        return zernike_coefficients(self.cfg, h, phi)

    def psfs(self, y, x, dy=None, dx=None) -> np.ndarray:
        y = np.atleast_1d(np.asarray(y, float))
        x = np.atleast_1d(np.asarray(x, float))
        shifts = None
        if dy is not None:
            shifts = np.stack([np.broadcast_to(dy, y.shape), np.broadcast_to(dx, y.shape)], 1).astype(np.float64)
        return self._pupil.psfs_numpy(self.coefficients(y, x).reshape(y.size, -1), shifts)

    def as_psf_model(self, grid: int | None = None):
        """The true optics as a PSF model: the pupil config itself (its blur grid ``grid``, default its own)."""
        return self.cfg if grid is None else self.cfg.replace(grid=int(grid))


class TiltedOptics(PupilOptics):
    """A pupil system outside the pupil fit's quadratic field law (inside its cubic one for defocus): a tilted
    specimen (defocus from 0 on the left to ``defocus`` waves on the right, with a cubic bend), astigmatism and
    coma about an axis off the frame centre (``axis``, normalised), trefoil growing across the field, a little
    spherical aberration. All ten Zernike terms of :data:`~napari_coordgate.optics.psf.ZERNIKE_TERMS`.

    Its defocused, comatic PSFs spread far: ``psf_size`` 61 holds 95 % of the light on the right of the field, 41
    only 82-86 % (and moves the centroid that :func:`psf_error` centres on by 2.6 px)."""

    def __init__(self, field_shape: Sequence[int], *, defocus: float = 0.6, astig: float = 0.15, coma: float = 0.12,
                 trefoil: float = 0.12, axis: tuple[float, float] = (0.25, -0.3), psf_size: int = 61,
                 na: float = 0.8, wavelength_um: float = 0.52, pixel_size_um: float = 0.16):
        from napari_coordgate.optics.psf import PSFConfig, Pupil, pupil_samples

        self.cfg = PSFConfig(name="tilted", na=na, wavelength_um=wavelength_um, pixel_size_um=pixel_size_um,
                             psf_size=psf_size)
        self.field_shape = tuple(int(n) for n in field_shape)
        self.psf_size = psf_size
        self.params = (defocus, astig, coma, trefoil, axis)
        worst = np.array([defocus * 1.1, astig * 3, astig * 3, coma * 2, coma * 2, 0.03, trefoil * 2, trefoil * 2,
                          0.0, 0.0])
        self._pupil = Pupil(self.cfg, pupil_samples(self.cfg, worst))
        self.name = "tilted, decentred, trefoil"

    def coefficients(self, y, x) -> np.ndarray:
        """(N, 10) Zernike coefficients (waves RMS) at normalised positions."""
        defocus, astig, coma, trefoil, (ay, ax) = self.params
        y, x = np.asarray(y, float).ravel(), np.asarray(x, float).ravel()
        dy, dx = y - ay, x - ax
        h2 = dy * dy + dx * dx
        h = np.sqrt(h2)
        phi = np.arctan2(dy, dx)
        out = np.zeros((y.size, 10))
        out[:, 0] = defocus * (0.5 * (x + 1.0) + 0.15 * x * (x * x - 1.0))  # the tilt, a little bent
        out[:, 1], out[:, 2] = astig * h2 * np.cos(2 * phi), astig * h2 * np.sin(2 * phi)
        out[:, 3], out[:, 4] = coma * h * np.cos(phi), coma * h * np.sin(phi)
        out[:, 5] = 0.03
        out[:, 6], out[:, 7] = trefoil * (0.5 + 0.5 * x), trefoil * 0.5 * y * y
        return out

    def as_psf_model(self, grid: int = 9):
        """The exact PSFs on a ``grid`` x ``grid`` grid of the field (a reference model for training)."""
        from napari_coordgate.optics.measured import MeasuredGridPSF

        t = grid_positions(grid)
        yy, xx = np.meshgrid(t, t, indexing="ij")
        psfs = self.psfs(yy.ravel(), xx.ravel()).reshape(grid, grid, self.psf_size, self.psf_size)
        return MeasuredGridPSF(psfs, pixel_size_um=self.cfg.pixel_size_um, name=f"true {self.name} ({grid}x{grid})")


@dataclass
class EllipticalOptics:
    """An elliptical Moffat (``beta`` finite) or Gaussian (``beta=None``) PSF varying across the field.

    At normalised position (y, x) with per-axis radius ``r² = (x² + y²) / 2`` (1 at the corners) the widths
    (Moffat ``alpha`` or Gaussian ``sigma``, px) are ``width * (1 + radial * r²)`` along the major axis and
    ``width * (1 + tangential * r²)`` across it; the major axis points along the field radius turned by
    ``twist * y`` radians (so the orientation is not simply radial), and in the centre along ``angle0``.
    """

    width: float = 2.0
    radial: float = 0.9
    tangential: float = 0.25
    beta: float | None = 3.0
    twist: float = 0.35
    angle0: float = 0.3
    psf_size: int = 31
    oversample: int = 5
    name: str = "elliptical Moffat"

    def _params(self, y, x):
        r2 = (x * x + y * y) / 2.0
        a1 = self.width * (1 + self.radial * r2)
        a2 = self.width * (1 + self.tangential * r2)
        # near the centre the radius direction is undefined: blend into angle0 there
        radial_angle = np.arctan2(y, x)
        blend = np.clip(r2 / 0.05, 0.0, 1.0)
        theta = np.where(blend > 0, radial_angle, 0.0) * blend + self.angle0 * (1 - blend) + self.twist * y
        # the centre is round when radial == tangential there: only the field makes it elliptical
        return a1, a2, theta

    def psfs(self, y, x, dy=None, dx=None) -> np.ndarray:
        y = np.atleast_1d(np.asarray(y, float))
        x = np.atleast_1d(np.asarray(x, float))
        n = y.size
        dy = np.zeros(n) if dy is None else np.broadcast_to(np.asarray(dy, float), (n,))
        dx = np.zeros(n) if dx is None else np.broadcast_to(np.asarray(dx, float), (n,))
        s, o = self.psf_size, self.oversample
        fine = s * o
        u = (np.arange(fine) - (fine - 1) / 2.0) / o
        uy, ux = np.meshgrid(u, u, indexing="ij")
        a1, a2, th = self._params(y.ravel(), x.ravel())
        out = np.empty((n, s, s))
        for i in range(n):
            yy, xx = uy - dy[i], ux - dx[i]
            c, sn = math.cos(th[i]), math.sin(th[i])
            p = xx * c + yy * sn
            q = -xx * sn + yy * c
            r2 = (p / a1[i]) ** 2 + (q / a2[i]) ** 2
            f = np.exp(-0.5 * r2) if self.beta is None else (1.0 + r2) ** (-self.beta)
            b = f.reshape(s, o, s, o).sum(axis=(1, 3))
            out[i] = b / b.sum()
        return out

    def as_psf_model(self, grid: int = 9, pixel_size_um: float | None = None):
        """The true optics as a PSF model: the exact PSFs on a ``grid`` x ``grid`` grid of the field, interpolated
        between nodes as the blur interpolates them (a
        :class:`~napari_coordgate.optics.measured.MeasuredGridPSF` whose nodes are exact rather than measured).

        The only error is the interpolation between nodes, which shrinks as ``grid`` grows.
        """
        from napari_coordgate.optics.measured import MeasuredGridPSF

        k = int(grid)
        if k < 1:
            raise ValueError(f"grid must be at least 1, got {grid!r}")
        t = grid_positions(k)
        yy, xx = np.meshgrid(t, t, indexing="ij")
        psfs = self.psfs(yy.ravel(), xx.ravel()).reshape(k, k, self.psf_size, self.psf_size)
        return MeasuredGridPSF(psfs, pixel_size_um=pixel_size_um, name=f"true {self.name} ({k}x{k})",
                               provenance={"source": "synthetic optics (exact PSFs at the nodes)"})


def bead_slide(
    optics,
    shape: Sequence[int],
    *,
    n_beads: int,
    photons: float,
    background: float = 0.02,
    gradient: float = 0.3,
    read_noise: float = 2.0,
    hot_fraction: float = 1e-4,
    n_saturated: int = 0,
    n_touching: int = 0,
    brightness: tuple[float, float] = (0.6, 1.0),
    offset: float = 100.0,
    full_well: float | None = None,
    noise: bool = True,
    seed: int = 0,
    bead_diameter_px: float = 0.0,
    positions: "tuple[np.ndarray, np.ndarray] | None" = None,
) -> tuple[np.ndarray, dict]:
    """A 2-D image of sub-resolution beads through ``optics``, with camera noise.

    Parameters
    ----------
    optics
        True optics (``psfs(y, x, dy, dx)`` and ``psf_size``).
    shape
        (H, W) of the image.
    n_beads
        Beads placed uniformly at random (some land near edges or each other: real slides do too).
    photons
        Expected photons at the peak pixel of the brightest ordinary bead.
    background
        Background level as a fraction of ``photons``, tilted by ``gradient`` (relative, across the frame).
    read_noise
        Gaussian read noise, electrons RMS.
    hot_fraction
        Fraction of pixels made hot (+0.3 .. 3 x ``photons``, single pixels).
    n_saturated
        Extra beads 8-15 times brighter than the brightest, clipped at ``full_well``.
    n_touching
        Extra pairs of beads 2.5-4 px apart.
    brightness
        Range of the beads' relative brightness (uniform).
    offset
        Camera offset added to every pixel (electrons).
    full_well
        Clipping level (electrons above the offset); default 1.6 x ``photons`` when ``n_saturated`` else none.
    noise
        False renders the expected image (no shot, read or hot-pixel noise; clipping still applies).
    seed
        Seed of everything random.
    bead_diameter_px
        Diameter of the beads in pixels (0: points), rendered as point sources over the sphere
        (:func:`_sphere_points`): summed from shifted PSFs, not with the ``sphere_otf`` calibration divides out.
    positions
        (y, x) of the ordinary beads (px) instead of uniform random ones; ``n_beads`` is then ignored.

    Returns
    -------
    image : ndarray, float32 (H, W), electrons
    truth : dict
        ``y``, ``x`` (px), ``kind`` ("bead", "saturated", "touching"), ``flux``, ``hot`` ((M, 2) pixel indices).
    """
    rng = np.random.default_rng(seed)
    h, w = (int(n) for n in shape)
    ys, xs, kinds, rel = _place(rng, h, w, n_beads, n_touching, n_saturated, brightness, positions)
    expected, flux = _render(optics, ys, xs, rel, kinds != "saturated", photons, h, w, bead_diameter_px)
    gy, gx = field_axis(h), field_axis(w)
    expected = expected + background * photons * (1.0 + 0.5 * gradient * (0.8 * gx[None, :] + 0.6 * gy[:, None]))
    image, hot = (expected, np.zeros((0, 2), int)) if not noise else _camera(rng, expected, read_noise,
                                                                              hot_fraction, photons)
    if full_well is None and n_saturated:
        full_well = 1.6 * photons
    if full_well is not None:
        image = np.minimum(image, full_well)
    truth = {"y": ys, "x": xs, "kind": kinds, "flux": flux, "hot": hot, "full_well": full_well,
             "bead_diameter_px": float(bead_diameter_px)}
    return (image + offset).astype(np.float32), truth


def _camera(rng, expected: np.ndarray, read_noise: float, hot_fraction: float, photons: float):
    """(image, hot pixel indices): shot and read noise, and hot pixels of +0.3 to 3 x ``photons``."""
    h, w = expected.shape
    image = rng.poisson(expected).astype(np.float64) + rng.normal(0.0, read_noise, expected.shape)
    hot = np.zeros((0, 2), int)
    n_hot = rng.binomial(h * w, hot_fraction) if hot_fraction > 0 else 0
    if n_hot:
        flat = rng.choice(h * w, n_hot, replace=False)
        hot = np.stack(np.unravel_index(flat, (h, w)), axis=1)
        image[hot[:, 0], hot[:, 1]] += rng.uniform(0.3, 3.0, n_hot) * photons
    return image, hot


def _place(rng, h: int, w: int, n_beads: int, n_touching: int, n_saturated: int, brightness, positions=None):
    """Bead positions (px), kinds and relative brightness: uniform beads (or the given ``positions``), touching
    pairs, saturating beads."""
    if positions is not None:
        ys, xs = (list(np.asarray(a, dtype=np.float64)) for a in positions)
        n_beads = len(ys)
    else:
        ys = list(rng.uniform(0, h - 1, n_beads))
        xs = list(rng.uniform(0, w - 1, n_beads))
    kinds = ["bead"] * n_beads
    rel = list(rng.uniform(*brightness, n_beads))
    for _ in range(n_touching):
        y0, x0 = rng.uniform(0.15 * h, 0.85 * h), rng.uniform(0.15 * w, 0.85 * w)
        d, ang = rng.uniform(2.5, 4.0), rng.uniform(0, np.pi)
        for sgn in (-0.5, 0.5):
            ys.append(y0 + sgn * d * math.sin(ang))
            xs.append(x0 + sgn * d * math.cos(ang))
            kinds.append("touching")
            rel.append(rng.uniform(*brightness))
    for _ in range(n_saturated):
        ys.append(rng.uniform(0.15 * h, 0.85 * h))
        xs.append(rng.uniform(0.15 * w, 0.85 * w))
        kinds.append("saturated")
        rel.append(rng.uniform(8.0, 15.0))
    return np.array(ys), np.array(xs), np.array(kinds, dtype=object), np.array(rel)


def _sphere_points(diameter_px: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(dy, dx, weight) of point sources filling a projected uniform sphere: a square grid at most 0.3 px apart
    over its disc, weights the sphere's thickness at each point (unit sum)."""
    if not diameter_px > 0:
        return np.zeros(1), np.zeros(1), np.ones(1)
    r = 0.5 * float(diameter_px)
    n = max(3, int(math.ceil(diameter_px / 0.3)))
    n += 1 - n % 2
    t = (np.arange(n) - (n - 1) / 2.0) * (diameter_px / n)
    dy, dx = (a.ravel() for a in np.meshgrid(t, t, indexing="ij"))
    thick = np.sqrt(np.clip(r * r - dy * dy - dx * dx, 0.0, None))
    keep = thick > 0
    return dy[keep], dx[keep], thick[keep] / thick[keep].sum()


def _bead_psfs(optics, yn, xn, dy, dx, diameter_px: float, chunk: int = 4096) -> np.ndarray:
    """(N, s, s) images of beads at normalised positions (yn, xn), moved by (dy, dx) px: one PSF each for
    points, a thickness-weighted sum of PSFs at the sphere's points for finite beads."""
    py, px, wt = _sphere_points(diameter_px)
    m, n = wt.size, yn.size
    if m == 1:
        return optics.psfs(yn, xn, dy, dx)
    out = None
    per = max(1, chunk // m)
    for a in range(0, n, per):
        b = min(n, a + per)
        k = b - a
        ps = optics.psfs(np.repeat(yn[a:b], m), np.repeat(xn[a:b], m), (dy[a:b, None] + py[None, :]).ravel(),
                         (dx[a:b, None] + px[None, :]).ravel())
        block = np.tensordot(ps.reshape(k, m, *ps.shape[1:]), wt, axes=([1], [0]))
        if out is None:
            out = np.empty((n, *ps.shape[1:]))
        out[a:b] = block
    return out


def _render(optics, ys, xs, rel, ordinary, photons: float, h: int, w: int, diameter_px: float = 0.0
            ) -> tuple[np.ndarray, np.ndarray]:
    """The expected image of the beads (each at its exact sub-pixel position) and their fluxes, scaled so the
    brightest ordinary bead's peak pixel gets ``photons``."""
    iy, ix = np.round(ys).astype(int), np.round(xs).astype(int)
    psfs = _bead_psfs(optics, field_position(ys, h), field_position(xs, w), ys - iy, xs - ix, diameter_px)
    peak_per_flux = psfs.reshape(len(ys), -1).max(axis=1)
    flux = rel * photons / np.max(rel[ordinary] * peak_per_flux[ordinary])
    s = psfs.shape[-1]
    r = s // 2
    expected = np.zeros((h + 2 * r, w + 2 * r))
    for k in range(len(ys)):
        expected[iy[k] : iy[k] + s, ix[k] : ix[k] + s] += flux[k] * psfs[k]
    return expected[r : r + h, r : r + w], flux


def _centred(psfs: np.ndarray, size: int) -> np.ndarray:
    """PSFs padded to ``size`` and moved so each centroid sits on the middle pixel."""
    from napari_coordgate.calibration.patches import recentre

    s = psfs.shape[-1]
    if size > s:
        p = (size - s) // 2
        psfs = np.pad(psfs, ((0, 0), (p, p), (p, p)))
    out = recentre(psfs, iterations=3)
    return out / out.sum(axis=(1, 2), keepdims=True)


def psf_error(model, optics, field_shape: Sequence[int], n: int = 5) -> np.ndarray:
    """Relative L2 error ``||model - true|| / ||true||`` at an n x n grid of field positions.

    Both PSFs are padded to a common odd size (with room to move) and centred by their centroids first, so a
    sub-pixel offset convention does not count as error.

    Returns
    -------
    ndarray, (n, n)
    """
    t = grid_positions(n)
    yy, xx = np.meshgrid(t, t, indexing="ij")
    true = optics.psfs(yy.ravel(), xx.ravel())
    est = model.psfs_at(yy.ravel(), xx.ravel(), tuple(field_shape)).reshape(-1, model.psf_size, model.psf_size)
    size = max(true.shape[-1], est.shape[-1]) + 4
    size += 1 - size % 2
    a, b = _centred(true, size), _centred(est, size)
    err = np.linalg.norm((a - b).reshape(n * n, -1), axis=1) / np.linalg.norm(a.reshape(n * n, -1), axis=1)
    return err.reshape(n, n)


def local_fwhm(optics, y_norm, x_norm) -> np.ndarray:
    """(N,) FWHM (px) of the optics' PSF at normalised positions: the diameter of a disc with the area of the
    pixels above half the peak (on a 4x finer grid, so a sharp PSF is measured too)."""
    y = np.atleast_1d(np.asarray(y_norm, float))
    x = np.atleast_1d(np.asarray(x_norm, float))
    o = 4
    offs = (np.arange(o) + 0.5) / o - 0.5
    oy, ox = (a.ravel() for a in np.meshgrid(offs, offs, indexing="ij"))
    psfs = optics.psfs(np.repeat(y, o * o), np.repeat(x, o * o), np.tile(oy, y.size), np.tile(ox, x.size))
    psfs = psfs.reshape(y.size, o * o, *psfs.shape[1:])
    area = np.array([np.mean([(p >= 0.5 * p.max()).sum() for p in group]) for group in psfs])
    return 2.0 * np.sqrt(area / math.pi)


def crowded_positions(optics, shape: Sequence[int], n_beads: int, *, close: float = 0.5,
                      distance: tuple[float, float] = (1.2, 3.0), seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(y, x) of a crowded slide: ``1 - close`` of the beads uniform at random, each of the others placed beside
    one of those at ``distance`` (in units of the local FWHM, uniform) in a random direction, so a fraction
    ``close`` of the beads lies within ``distance[1]`` local FWHM of another."""
    rng = np.random.default_rng(seed)
    h, w = (int(n) for n in shape)
    n_far = n_beads - int(round(close * n_beads))
    ys, xs = rng.uniform(0, h - 1, n_far), rng.uniform(0, w - 1, n_far)
    n_near = n_beads - n_far
    host = rng.integers(0, max(n_far, 1), n_near)
    fwhm = local_fwhm(optics, field_position(ys[host], h), field_position(xs[host], w))
    d = rng.uniform(*distance, n_near) * fwhm
    ang = rng.uniform(0, 2 * math.pi, n_near)
    ny, nx = np.clip(ys[host] + d * np.sin(ang), 0, h - 1), np.clip(xs[host] + d * np.cos(ang), 0, w - 1)
    return np.concatenate([ys, ny]), np.concatenate([xs, nx])


def array_positions(shape: Sequence[int], pitch: float, *, margin: float = 0.0, angle_deg: float = 0.0,
                    offset: tuple[float, float] = (0.0, 0.0)) -> tuple[np.ndarray, np.ndarray]:
    """(y, x) of a square point array (pinhole / nanohole array, focal-spot array) of ``pitch`` px, turned by
    ``angle_deg`` about the frame centre, moved by ``offset`` px, kept ``margin`` px inside the frame."""
    h, w = (int(n) for n in shape)
    n = int(math.ceil(math.hypot(h, w) / pitch)) + 2
    k = (np.arange(n) - n // 2) * pitch
    gy, gx = (a.ravel() for a in np.meshgrid(k, k, indexing="ij"))
    t = math.radians(angle_deg)
    y = (h - 1) / 2 + offset[0] + gy * math.cos(t) + gx * math.sin(t)
    x = (w - 1) / 2 + offset[1] - gy * math.sin(t) + gx * math.cos(t)
    keep = (y >= margin) & (y <= h - 1 - margin) & (x >= margin) & (x <= w - 1 - margin)
    return y[keep], x[keep]
