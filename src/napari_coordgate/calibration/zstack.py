"""Calibrate from a bead z-stack: the field-dependent 3-D PSF and where across the field the best focus lies.

A slide of sub-resolution beads imaged through focus (Z, H, W) holds, at every bead, the 3-D PSF of that place of
the field. All beads lie on the slide, one plane ``z_s``; the optics' best focus is shifted across the field
(field curvature, tilt of the focal surface or of the slide), so the bead at normalised field position (y, x)
is sharpest at plane ``z_s + f(y, x)``. The steps:

1. **Detect** the beads in the stack's maximum projection (the 2-D detection of
   :func:`~napari_coordgate.calibration.detect.find_beads`: hot pixels, saturation, sub-pixel centres, widths).
2. **Focus of each bead**: its axial profile (the light of a 3 x 3 px square on the bead, plane by plane, minus
   the bead's background) and the vertex of a parabola through the logarithm of the profile's top five planes.
3. **A first best-focus surface** ``f``: a quadratic in (y, x) fitted robustly (Cauchy weights) to the beads' foci;
   its value at the field centre is a first estimate of the slide's plane ``z_s``. Beads far off the surface
   (debris above the slide, a bead in the mounting medium) are rejected as outliers.
4. **3-D patches**: every bead's window of ``D`` planes centred on ``z_s`` (cubic interpolation between planes:
   one sub-plane shift for all beads), its background (the median of the window's outer ring over all planes)
   removed, moved laterally by its sub-pixel centre (Fourier shift), cut to ``D x s x s`` and normalised to unit
   sum. Centring on the slide plane, not on each bead's own focus, keeps the focus shift in the PSFs.
5. **The best-focus map**: each bead's focus measured again in its window as the plane of its smallest spot
   (:func:`psf_focus`: the lateral second moment within four in-focus FWHM), and the quadratic surface through
   them, ``f(0, 0) = 0`` (the convention of :class:`~napari_coordgate.optics.psf3d.Pupil3DPSF`, whose middle plane
   is in focus on the axis). The brightest square of step 2 is biased where astigmatism and coma meet (by up to
   2.4 planes at the corners of the ``tilted_curved_3d`` preset): it only places the first windows. When the surface
   moves the slide's plane by more than 0.05 plane, the windows are cut again there.
6. **The K x K grid**: the node PSFs solved jointly by tent-weighted least squares, as the 2-D grid
   (:mod:`~napari_coordgate.calibration.grid`: K and the smoothness cross-validated over the beads, robust
   weights), each bead moved along z to focus 0 by the surface before the solve and each node moved back to its own
   focus after it (a z-translation is no linear combination of PSFs); the bead divided out of each node when its
   diameter is given; each node kept on its 3-D support (the voxels where a lightly smoothed copy stands above the
   node's noise, grown by two voxels), nodes without beads filled from their neighbours, moved laterally so its
   centroid sits on the middle pixel and normalised to unit sum over its stored volume
   (:class:`~napari_coordgate.optics.psf3d.MeasuredGrid3DPSF`). Then steps 4-6 once more with the neighbours' light
   (every detected spot's PSF from this first grid, scaled to its flux) removed from every window.

The result also reports the best-focus map (µm, relative to the field centre) and warns about beads whose focus
lies near the stack's ends (their PSFs are cut there) and a stack too short for the PSF's axial reach.

numpy and scipy only: no torch, no Qt.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from napari_coordgate.calibration import CalibrationError
from napari_coordgate.calibration.beadsize import remove_bead
from napari_coordgate.calibration.detect import REASONS, BeadTable, find_beads, reject_by_window
from napari_coordgate.calibration.grid import (
    _denoise,
    _harmonic_fill,
    _outer_noise,
    _robust_fit,
    choose_grid,
    tent_matrix,
)
from napari_coordgate.calibration.patches import Patches
from napari_coordgate.calibration.result import _json_default
from napari_coordgate.calibration.windows import window_size
from napari_coordgate.optics.bead import blur_by_bead
from napari_coordgate.optics.psf3d import MeasuredGrid3DPSF
from napari_coordgate.optics.psfmodel import PSF_DEPTH_BOUNDS
from napari_coordgate.optics.shift import fourier_shift

__all__ = ["ZStackCalibration", "calibrate_zstack", "axial_profiles", "best_focus", "fit_focus_surface",
           "focus_surface", "MIN_PLANES"]

MIN_PLANES = 7  # a z-stack needs at least this many planes: a focus is the vertex of 5 planes, with room around
_MARGIN = 3  # background ring around each window, px (as in 2-D)
_MIN_BEADS = 5  # fewer usable beads than this is an error (as the 2-D grid)
_END_PLANES = 3  # a bead's focus closer than this to the stack's first or last plane earns a warning


@dataclass
class ZStackCalibration:
    """What :func:`calibrate_zstack` found: the 3-D PSF model, the beads, the best-focus surface.

    ``focus_z`` is each bead's best-focus plane (stack index, sub-plane; NaN where not measured),
    ``focus_coefficients`` the surface ``f(y, x) = c0 + c1 y + c2 x + c3 y² + c4 x y + c5 x²`` in planes (normalised
    field coordinates; ``c0`` is the slide's plane), ``slide_plane`` = ``c0``.
    """

    model: MeasuredGrid3DPSF
    beads: BeadTable
    focus_z: np.ndarray
    focus_coefficients: np.ndarray
    slide_plane: float
    z_step_um: float
    field_shape: tuple[int, int]
    stack_depth: int
    psf_size: int
    psf_depth: int
    noise: list[float]
    node_weight: np.ndarray
    warnings: list[str] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    chosen: str = "grid"

    @property
    def n_beads(self) -> int:
        return int(self.beads.accepted.sum())

    def focus_map_um(self, n: int = 9) -> np.ndarray:
        """(n, n) best-focus shift (µm) relative to the field centre at ``linspace(-1, 1, n)`` (rows y, columns x)."""
        t = np.linspace(-1.0, 1.0, n)
        yy, xx = np.meshgrid(t, t, indexing="ij")
        c = self.focus_coefficients.copy()
        c[0] = 0.0
        return focus_surface(c, yy, xx) * self.z_step_um

    def summary(self) -> str:
        fm = self.focus_map_um(9)
        return (f"{self.n_beads} beads used of {len(self.beads)} spots; 3-D PSF grid {self.model.nodes} x "
                f"{self.model.nodes} ({self.psf_depth} x {self.psf_size} x {self.psf_size} voxel PSFs, z-step "
                f"{self.z_step_um:g} µm); best focus across the field {fm.min():+.2f} to {fm.max():+.2f} µm from "
                f"the centre's (slide at plane {self.slide_plane:.2f})")

    def to_dict(self) -> dict[str, Any]:
        """Everything but the PSF arrays, JSON-able."""
        meta, _ = self.model.to_record()
        c = self.focus_coefficients
        return {
            "summary": self.summary(), "chosen": self.chosen, "ndim": 3,
            "model": {"kind": self.model.kind, "description": self.model.describe(), "record": meta},
            "counts": self.beads.counts(), "field_shape": list(self.field_shape), "stack_depth": self.stack_depth,
            "psf_size": self.psf_size, "psf_depth": self.psf_depth, "z_step_um": self.z_step_um,
            "noise": self.noise, "warnings": list(self.warnings), "settings": self.settings,
            "seconds": round(self.seconds, 2), "provenance": self.model.provenance,
            "best_focus": {"slide_plane": round(float(self.slide_plane), 4),
                           "surface_planes": [round(float(v), 5) for v in c],
                           "surface_terms": ["1", "y", "x", "y^2", "x*y", "x^2"],
                           "map_um_9x9": np.round(self.focus_map_um(9), 4).tolist()},
            "grid": {"k": self.model.nodes, "node_beads": np.round(self.node_weight, 2).tolist(),
                     "filled": self.model.filled.tolist()},
            "rejection_reasons": dict(REASONS),
            "beads": dict(self.beads.to_dict(), focus_z=[None if not np.isfinite(v) else round(float(v), 4)
                                                         for v in self.focus_z]),
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False, default=_json_default)

    def report_png(self, path: "str | Path") -> Path:
        """The report figure: best-focus map with the beads, xz and yz PSF sections at 3 x 3 field positions."""
        from napari_coordgate.calibration.report import write_zstack_report_png

        return write_zstack_report_png(self, path)


# ----------------------------------------------------------------------------------------------- focus


def axial_profiles(stack: np.ndarray, ys: np.ndarray, xs: np.ndarray, background: np.ndarray) -> np.ndarray:
    """(N, Z) light of a 3 x 3 px square on each bead (nearest pixel), plane by plane, minus 9 x its background."""
    iy, ix = _square_centres(stack.shape, ys, xs)
    off = np.arange(-1, 2)
    sq = stack[:, iy[:, None, None] + off[None, :, None], ix[:, None, None] + off[None, None, :]]  # (Z, N, 3, 3)
    return sq.sum(axis=(2, 3)).T - 9.0 * np.asarray(background, dtype=np.float64)[:, None]


def _square_centres(shape, ys: np.ndarray, xs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The centre pixel of each bead's 3 x 3 square: its nearest pixel, kept a pixel inside the frame."""
    h, w = shape[-2:]
    return np.clip(np.round(ys).astype(int), 1, h - 2), np.clip(np.round(xs).astype(int), 1, w - 2)


def best_focus(profiles: np.ndarray, half: int = 2) -> np.ndarray:
    """(N,) sub-plane best focus of axial profiles (N, Z): the vertex of a least-squares parabola through the
    logarithm of the ``2 half + 1`` planes around each profile's maximum (a Gaussian's peak, exactly). NaN where
    the maximum is within ``half`` planes of an end or the profile is not positive there."""
    n, z = profiles.shape
    top = np.argmax(profiles, axis=1)
    out = np.full(n, np.nan)
    ok = (top >= half) & (top < z - half)
    t = np.arange(-half, half + 1, dtype=np.float64)
    design = np.stack([np.ones_like(t), t, t * t], axis=1)
    pinv = np.linalg.pinv(design)  # (3, 2 half + 1)
    rows = np.flatnonzero(ok)
    if rows.size:
        vals = profiles[rows[:, None], top[rows, None] + t.astype(int)[None, :]]
        good = np.all(vals > 0, axis=1)
        rows, vals = rows[good], vals[good]
        coef = np.log(vals) @ pinv.T  # (M, 3)
        curved = coef[:, 2] < 0
        vertex = -coef[curved, 1] / (2.0 * coef[curved, 2])
        inside = np.abs(vertex) <= half
        out[rows[curved][inside]] = top[rows[curved][inside]] + vertex[inside]
    return out


def _design(y: np.ndarray, x: np.ndarray) -> np.ndarray:
    y, x = np.asarray(y, np.float64), np.asarray(x, np.float64)
    return np.stack([np.ones_like(y), y, x, y * y, x * y, x * x], axis=-1)


def focus_surface(coefficients: np.ndarray, y, x) -> np.ndarray:
    """The quadratic best-focus surface (planes) at normalised field positions."""
    return _design(y, x) @ np.asarray(coefficients, np.float64)


def fit_focus_surface(y: np.ndarray, x: np.ndarray, z: np.ndarray, iterations: int = 6
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Robust least-squares quadratic ``z ~ f(y, x)`` (Cauchy weights on the residuals, scale from their MAD).

    Returns the 6 coefficients (:func:`focus_surface`) and each point's residual over the robust scale. Fewer than
    6 points, or points on a line, give the terms that are determined only (least norm).
    """
    a = _design(y, x)
    u = np.ones(z.size)
    coef = np.zeros(6)
    scale = 1.0
    for _ in range(iterations):
        coef = np.linalg.lstsq(a * u[:, None], z * u, rcond=None)[0]
        r = z - a @ coef
        scale = max(1.4826 * float(np.median(np.abs(r - np.median(r)))), 0.05)
        u = np.sqrt(1.0 / (1.0 + (r / (2.5 * scale)) ** 2))
    return coef, (z - a @ coef) / scale


# ----------------------------------------------------------------------------------------------- patches


def _catmull_rom(stack: np.ndarray, start: float, depth: int) -> np.ndarray:
    """``depth`` planes of ``stack`` at ``start, start + 1, ...`` (sub-plane: cubic Catmull-Rom interpolation)."""
    z0 = int(math.floor(start))
    f = start - z0
    w = np.array([(-f**3 + 2 * f**2 - f) / 2, (3 * f**3 - 5 * f**2 + 2) / 2, (-3 * f**3 + 4 * f**2 + f) / 2,
                  (f**3 - f**2) / 2])
    last = stack.shape[0] - 1
    out = np.zeros((depth,) + stack.shape[1:])
    for t, wt in zip(range(-1, 3), w):
        if wt:
            idx = np.clip(np.arange(depth) + z0 + t, 0, last)
            out += wt * stack[idx]
    return out


def _windows(volume: np.ndarray, ys: np.ndarray, xs: np.ndarray, win: int) -> np.ndarray:
    """(N, D, win, win) windows of a (D, H, W) volume centred on the pixels nearest (ys, xs)."""
    iy, ix = np.round(ys).astype(int), np.round(xs).astype(int)
    off = np.arange(win) - win // 2
    return np.moveaxis(volume[:, iy[:, None, None] + off[None, :, None], ix[:, None, None] + off[None, None, :]], 0, 1)


def _patches3d(slab: np.ndarray, ys: np.ndarray, xs: np.ndarray, size: int, margin: int,
               others: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(N, D, s, s) unit-sum registered patches from a slab (D, H, W) at the beads, their flux and background;
    ``others``: (N, D, s + 2 margin, s + 2 margin) light of the neighbours in each window, removed first."""
    win = size + 2 * margin
    iy, ix = np.round(ys).astype(int), np.round(xs).astype(int)
    windows = _windows(slab, ys, xs, win)
    if others is not None:
        windows = windows - others
    ring = np.ones((win, win), bool)
    ring[margin : margin + size, margin : margin + size] = False
    background = np.median(windows[:, :, ring].reshape(len(ys), -1), axis=1)
    sub = windows - background[:, None, None, None]
    dy, dx = (ys - iy)[:, None], (xs - ix)[:, None]
    moved = fourier_shift(sub, -dy, -dx)[:, :, margin : margin + size, margin : margin + size]
    flux = moved.sum(axis=(1, 2, 3))
    patches = moved / np.where(flux > 0, flux, np.nan)[:, None, None, None]
    return patches, flux, background


# ----------------------------------------------------------------------------------------------- grid


@dataclass(frozen=True)
class _GridOptions:
    """How the grid is fitted: K (None: cross-validated), the beads' diameter and the planes' distance in px."""

    grid: int | None = None
    bead_px: float = 0.0
    z_step_px: float = 1.0
    focus_radius: int = 12  # px of the disc in which each bead's spot size is measured (:func:`psf_focus`)


def psf_focus(psfs: np.ndarray) -> np.ndarray:
    """(N,) best focus of 3-D PSFs (N, D, s, s), in planes from their middle plane: where the PSF's lateral second
    moment (about each plane's own centroid, within the inscribed disc) is smallest, the vertex of a parabola through
    the five planes around the minimum. The smallest spot, not the brightest pixel: with astigmatism and coma together
    the light of a fixed small square peaks away from the medial focus (by planes at this project's 3-D preset's
    corners), the second moment does not (in the geometric limit it is smallest where the wavefront's defocus term is
    zero). NaN where the minimum is within two planes of an end."""
    n, d, s, _ = psfs.shape
    c = s // 2
    yy, xx = np.mgrid[:s, :s] - c
    disc = (yy * yy + xx * xx) <= c * c
    w = np.clip(psfs, 0.0, None) * disc
    tot = np.maximum(w.sum(axis=(2, 3)), 1e-30)
    cy = (w * yy).sum(axis=(2, 3)) / tot
    cx = (w * xx).sum(axis=(2, 3)) / tot
    var = (w * ((yy - cy[..., None, None]) ** 2 + (xx - cx[..., None, None]) ** 2)).sum(axis=(2, 3)) / tot
    return best_focus(1.0 / np.maximum(var, 1e-30)) - d // 2 if d >= 5 else np.full(n, np.nan)


def _recentre_lateral(psfs: np.ndarray) -> np.ndarray:
    """(N, D, s, s) PSFs moved in (y, x) so each volume's centroid sits on the middle pixel (zero-padded)."""
    n, d, s, _ = psfs.shape
    p = s // 2
    out = psfs
    for _ in range(2):
        proj = out.sum(axis=1)
        tot = np.maximum(proj.sum(axis=(1, 2)), 1e-30)
        c = np.arange(s) - p
        dy = (proj.sum(axis=2) @ c) / tot
        dx = (proj.sum(axis=1) @ c) / tot
        big = np.pad(out, ((0, 0), (0, 0), (p, p), (p, p)))
        out = fourier_shift(big, -dy[:, None], -dx[:, None])[:, :, p : p + s, p : p + s]
    return out


def _fit_grid3d(patches: np.ndarray, pad: int, flux: np.ndarray, y_norm: np.ndarray, x_norm: np.ndarray,
                opts: _GridOptions, surface: np.ndarray) -> tuple[np.ndarray, ...]:
    """(K, K, D, s, s) node PSFs from (N, D + 2 pad, s, s) patches, (K, K) filled flags, (K, K) beads' worth of
    weight per node, and (N,) each bead's focus (:func:`psf_focus` within ``opts.focus_radius`` px, in planes from
    the slab's middle plane).

    K and the smoothness are cross-validated over the beads as in 2-D. A z-translation is not a linear combination of
    PSFs, so beads of different focus, solved for jointly as they are, would blur the nodes axially where the focus
    changes fast: each bead is moved along z by the best-focus surface at its place (``surface``, planes; ``pad``
    spare planes each side hold the move), the nodes' focus-free shapes are solved jointly (the 2-D grid's robust
    tent least squares), and each node is moved back to its own focus."""
    n, dp, s, _ = patches.shape
    d = dp - 2 * pad
    core = patches[:, pad : pad + d]
    holder = Patches(np.arange(n), core, np.zeros(n), np.zeros((n, 2)), core, flux, np.ones(n), y_norm, x_norm, s, 0)
    ks = [int(opts.grid)] if opts.grid else list(range(1, int(np.clip(math.floor(math.sqrt(n / 3.0)) + 1, 1, 9)) + 1))
    k, lam, _ = choose_grid(holder, ks)
    med = max(float(np.median(np.maximum(flux, 0.0))), 1e-30)
    w = np.clip(np.maximum(flux, 0.0) / med, 0.1, 5.0)
    t = tent_matrix(y_norm, x_norm, k)
    nodes = np.linspace(-1.0, 1.0, k)
    ny, nx = (a.ravel() for a in np.meshgrid(nodes, nodes, indexing="ij"))
    node_f, bead_f = focus_surface(surface, ny, nx), focus_surface(surface, y_norm, x_norm)
    # every bead moved to focus 0 (its focus-free shape), the nodes' focus-free shapes solved jointly, each node
    # moved back to its own focus
    aligned = np.stack([_catmull_rom(patches[b], bead_f[b], dp) for b in range(n)])
    g, u, _ = _robust_fit(t, aligned.reshape(n, -1), w, k, lam)
    g = g.reshape(k * k, dp, s, s)
    psfs = np.stack([_catmull_rom(g[j], pad - node_f[j], d) for j in range(k * k)])
    node_weight = (t * u[:, None]).sum(axis=0)
    sigma = np.median(_outer_noise(psfs.reshape(k * k * d, s, s)).reshape(k * k, d), axis=1)
    if opts.bead_px > 0:  # the bead divided out of each node, against the node's own noise (as in 2-D)
        psfs, sigma = remove_bead(psfs, opts.bead_px, sigma, z_step_px=opts.z_step_px)
    psfs = np.stack([_denoise(psfs[i], sigma[i]) for i in range(k * k)])
    known = node_weight.reshape(k, k) >= 0.25
    filled = ~known if known.any() else np.zeros((k, k), bool)
    psfs = _harmonic_fill(psfs.reshape(k, k, d, s, s), known if known.any() else ~filled)
    psfs = _recentre_lateral(psfs.reshape(k * k, d, s, s)).reshape(k, k, d, s, s)
    psfs = np.clip(psfs, 0.0, None)
    psfs /= psfs.sum(axis=(2, 3, 4), keepdims=True)
    c, r = s // 2, min(opts.focus_radius, s // 2)
    foci = psf_focus(patches[:, :, c - r : c + r + 1, c - r : c + r + 1])  # each bead's own, unaligned
    return psfs, filled, node_weight.reshape(k, k), foci


# ----------------------------------------------------------------------------------------------- driver


def _check_stack(stack, z_step_um) -> np.ndarray:
    arr = np.asarray(stack)
    if arr.ndim != 3:
        raise CalibrationError(f"a bead z-stack has 3 dimensions (Z, Y, X), got shape {arr.shape}")
    if arr.dtype.kind not in "iuf":
        raise CalibrationError(f"a bead z-stack must hold real numbers, got dtype {arr.dtype}")
    if arr.shape[0] < MIN_PLANES:
        raise CalibrationError(f"a bead z-stack needs at least {MIN_PLANES} planes through focus, got "
                               f"{arr.shape[0]}; is it a series of 2-D images instead (calibrate without --z-step)?")
    if min(arr.shape[1:]) < 32:
        raise CalibrationError(f"the bead z-stack's planes are {arr.shape[1]} x {arr.shape[2]} px: too small "
                               "(at least 32 x 32)")
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise CalibrationError("the bead z-stack contains NaN or Inf values")
    if float(arr.max()) == float(arr.min()):
        raise CalibrationError("the bead z-stack is constant: no beads to measure")
    if not (isinstance(z_step_um, (int, float, np.floating, np.integer)) and z_step_um > 0
            and math.isfinite(z_step_um)):
        raise CalibrationError(f"the z-step must be a positive number of µm, got {z_step_um!r}")
    return arr


def _stage(report, t0: float, stage: str, progress: float, message: str) -> None:
    if report is not None:
        from napari_coordgate.calibration.result import CalibrationUpdate

        report(CalibrationUpdate(stage, progress, message, time.perf_counter() - t0))


def _stop(should_stop, where: str) -> None:
    if should_stop is not None and should_stop():
        from napari_coordgate.calibration import CalibrationCancelled

        raise CalibrationCancelled(f"calibration stopped {where}")


def _foci(stack: np.ndarray, table: BeadTable, field_shape) -> tuple[np.ndarray, np.ndarray, float]:
    """Each accepted bead's best-focus plane (NaN elsewhere), the surface's coefficients, and the surface's
    robust scale; beads without a focus or far off the surface are rejected."""
    ok = table.accepted
    focus = np.full(len(table), np.nan)
    rows = np.flatnonzero(ok)
    prof = _profiles(stack, table, rows)
    focus[rows] = best_focus(prof)
    table.reject(ok & ~np.isfinite(focus), "fit failed", "no axial focus: its brightest plane is at the stack's "
                 "end, or its light does not peak through focus")
    rows = np.flatnonzero(table.accepted)
    if rows.size < _MIN_BEADS:
        raise CalibrationError(f"the 3-D grid needs at least {_MIN_BEADS} beads whose focus lies inside the stack, "
                               f"found {rows.size} ({_counts(table)}); image planes further above and below focus",
                               beads=table, field_shape=field_shape)
    coef, score = fit_focus_surface(table.y_norm[rows], table.x_norm[rows], focus[rows])
    off = np.zeros(len(table), bool)
    off[rows] = np.abs(score) > 6.0
    table.reject(off, "outlier", "its focus lies far from the slide's: debris or a bead off the slide")
    if off.any():
        rows = np.flatnonzero(table.accepted)
        coef, _ = fit_focus_surface(table.y_norm[rows], table.x_norm[rows], focus[rows])
    return focus, coef, rows


def _counts(table: BeadTable) -> str:
    return ", ".join(f"{v} {k}" for k, v in table.counts().items() if v)


def _depth(z: int, slide: float, coef: np.ndarray, psf_depth: int | None, axial_fwhm: float
           ) -> tuple[int, list[str]]:
    """The PSFs' depth: given, or as deep as the stack allows around the slide (one spare plane each side for
    the interpolation), up to the focus shift plus twice the axial FWHM each way."""
    room = int(min(math.floor(slide) - 1, z - 2 - math.ceil(slide)))
    if room < 2:
        raise CalibrationError(f"the slide's plane ({slide:.1f}) is at the stack's end: centre the stack on the "
                               "beads' focus")
    t = np.linspace(-1, 1, 9)
    yy, xx = np.meshgrid(t, t, indexing="ij")
    c = coef.copy()
    c[0] = 0.0
    shift = float(np.abs(focus_surface(c, yy, xx)).max())
    need = int(math.ceil(shift + 2.0 * axial_fwhm))
    warnings = []
    if psf_depth is not None:
        depth = int(psf_depth)
        if depth % 2 == 0 or not PSF_DEPTH_BOUNDS[0] <= depth <= PSF_DEPTH_BOUNDS[1]:
            raise CalibrationError(f"psf_depth must be odd, from {PSF_DEPTH_BOUNDS[0]} to {PSF_DEPTH_BOUNDS[1]}, "
                                   f"got {depth}")
        if depth // 2 > room:
            raise CalibrationError(f"psf_depth {depth} does not fit around the slide's plane {slide:.1f} in a "
                                   f"stack of {z} planes (at most {2 * room + 1})")
        return depth, warnings
    half = min(room, need, PSF_DEPTH_BOUNDS[1] // 2)
    if half < need:
        warnings.append(f"the stack holds {half} planes on each side of the slide's plane, the PSF reaches about "
                        f"{need} (focus shift {shift:.1f} + 2 axial FWHM): image more planes above and below "
                        "focus, or the PSFs are cut")
    return 2 * half + 1, warnings


def _profiles(stack: np.ndarray, table: BeadTable, rows: np.ndarray) -> np.ndarray:
    """The axial profiles of ``rows``, each less the median over z of its own pixel (its background)."""
    iy, ix = _square_centres(stack.shape, table.y[rows], table.x[rows])
    return axial_profiles(stack, table.y[rows], table.x[rows], np.median(stack[:, iy, ix], axis=0))


def _axial_fwhm(stack: np.ndarray, table: BeadTable, focus: np.ndarray) -> float:
    """Median axial FWHM (planes) of the beads' profiles (at least 1)."""
    prof = _profiles(stack, table, np.flatnonzero(table.accepted))
    peak = prof.max(axis=1, keepdims=True)
    widths = np.sum(prof >= 0.5 * peak, axis=1)
    return max(1.0, float(np.median(widths)))


def calibrate_zstack(
    stack,
    *,
    z_step_um: float,
    pixel_size_um: float | None = None,
    grid: int | None = None,
    psf_size: int | None = None,
    psf_depth: int | None = None,
    min_snr: float = 5.0,
    bead_diameter_nm: float | None = None,
    should_stop: Callable[[], bool] | None = None,
    report: Callable[[Any], None] | None = None,
    source: str | Sequence[str] | None = None,
) -> ZStackCalibration:
    """Measure a microscope's field-dependent 3-D PSF and its best-focus surface from a bead z-stack (see the
    module docstring).

    Parameters
    ----------
    stack
        (Z, H, W) beads on a slide imaged through focus, raw camera units (any real dtype), z growing with the
        index; the beads' focus should lie well inside the stack.
    z_step_um, pixel_size_um
        Distance between planes and camera pixel size in the specimen plane (µm; the pixel size is stored).
    grid, psf_size, psf_depth
        K of the K x K grid (default: cross-validated), the PSFs' side in pixels and depth in planes (odd;
        default: from the beads and the stack).
    min_snr, bead_diameter_nm, should_stop, report, source
        As :func:`~napari_coordgate.calibration.calibrate.calibrate` (the bead, a sphere, is divided out of each
        node in 3-D; it needs ``pixel_size_um``).

    Raises :class:`CalibrationError` for what is not a z-stack (fewer than 7 planes, not 3-D), NaN/Inf, a constant
    stack, no beads, fewer than 5 usable beads, a slide at the stack's end, a bead diameter without a pixel size.
    """
    t0 = time.perf_counter()
    raw = _check_stack(stack, z_step_um)
    opts = _GridOptions(grid, _bead_px(bead_diameter_nm, pixel_size_um), z_step_um / (pixel_size_um or z_step_um))
    z, h, w = raw.shape
    field_shape = (h, w)
    _stage(report, t0, "detect", 0.05, "detecting beads in the maximum projection")
    table, _, noise = find_beads(raw.max(axis=0), min_snr=min_snr)
    if table.nothing_found("the bead z-stack's maximum projection"):
        raise CalibrationError(table.nothing_found("the bead z-stack's maximum projection"), beads=table,
                               field_shape=field_shape)
    _stop(should_stop, "during bead detection")
    data = raw.astype(np.float64)
    _stage(report, t0, "focus", 0.3, "measuring each bead's best focus")
    focus, coef, _ = _foci(data, table, field_shape)
    slide = float(coef[0])
    depth, warnings = _depth(z, slide, coef, psf_depth, _axial_fwhm(data, table, focus))
    slab = _catmull_rom(data, slide - depth // 2, depth)
    size = _lateral_size(table, slab, field_shape, psf_size)
    reject_by_window(table, [field_shape], size, _MARGIN)
    rows = np.flatnonzero(table.accepted)
    if rows.size < _MIN_BEADS:
        raise CalibrationError(f"the 3-D grid needs at least {_MIN_BEADS} usable beads, found {rows.size} "
                               f"({_counts(table)})", beads=table, field_shape=field_shape)
    _stop(should_stop, "before the grid fit")
    _stage(report, t0, "grid", 0.5, f"fitting the 3-D PSF grid to {rows.size} beads")
    def refit():
        _stage(report, t0, "grid", 0.7, "refitting the grid at the refined focus")

    opts = dataclasses.replace(opts, focus_radius=_focus_radius(table))
    psfs, filled, node_weight, rows, coef = _grid_and_focus(data, table, coef, depth, size, opts, refit)
    _stop(should_stop, "before the neighbours' light is removed")
    _stage(report, t0, "grid", 0.85, "refitting with the neighbours' light removed from every window")
    crowd = _as_beads(psfs, filled, opts, z_step_um)
    psfs, filled, node_weight, rows, coef = _grid_and_focus(data, table, coef, depth, size, opts, refit, rounds=3,
                                                            crowd=crowd)
    slide = float(coef[0])
    warnings += _zstack_warnings(table, focus, z, filled)
    model = _measured_model(psfs, filled, z_step_um, pixel_size_um, source, rows.size, coef, z, field_shape)
    settings = {"z_step_um": z_step_um, "pixel_size_um": pixel_size_um, "grid": grid, "psf_size": psf_size,
                "psf_depth": psf_depth, "min_snr": min_snr, "bead_diameter_nm": bead_diameter_nm}
    if not opts.bead_px:
        warnings.append("no bead diameter given: the beads were taken for points (give it to remove their size)")
    _stage(report, t0, "done", 1.0, f"3-D PSF grid from {rows.size} beads")
    return ZStackCalibration(model, table, focus, coef, slide, float(z_step_um), field_shape, z, size, depth,
                             [float(noise)], node_weight, warnings, settings, time.perf_counter() - t0)


_MODELLED = ("", "edge", "clump", "outlier", "too close")  # spots whose light is modelled in their neighbours' windows


def _neighbour_light(table: BeadTable, rows: np.ndarray, model: MeasuredGrid3DPSF, shape: tuple[int, int, int],
                     pad: int, win: int, flux: np.ndarray) -> np.ndarray:
    """(N, D + 2 pad, win, win) light of every other spot in the windows of ``rows``, from ``model`` (its middle
    plane on the slab's plane ``pad + D // 2``): each spot's PSF at its place, scaled to its flux. The accepted beads'
    fluxes are ``flux`` (their windows' light); the others' are their peak over the model's peak there, times the
    median of that ratio's relation to flux among the beads."""
    dp, h, w = shape
    spots = np.flatnonzero(np.isin(table.reason, _MODELLED) & np.isfinite(table.y))
    vols = model.psfs_at(table.y_norm[spots], table.x_norm[spots])  # (M, D, s, s)
    d, s = vols.shape[1], vols.shape[-1]
    peak_model = vols.reshape(len(spots), -1).max(axis=1)
    where = {int(r): i for i, r in enumerate(rows)}
    known = np.array([where.get(int(r), -1) for r in spots])
    scale = np.median(flux[known[known >= 0]] * peak_model[known >= 0] / table.peak[spots[known >= 0]])
    spot_flux = np.where(known >= 0, flux[np.maximum(known, 0)], scale * table.peak[spots] / peak_model)
    lo = pad + (dp - 2 * pad - d) // 2
    m = (win - s) // 2
    big = np.zeros((len(spots), dp, win, win))
    big[:, lo : lo + d, m : m + s, m : m + s] = vols * spot_flux[:, None, None, None]
    # each spot's nearest pixel, kept inside the frame (a spot on its last half pixel rounds past it)
    iy = np.clip(np.round(table.y[spots]).astype(int), 0, h - 1)
    ix = np.clip(np.round(table.x[spots]).astype(int), 0, w - 1)
    big = fourier_shift(big, (table.y[spots] - iy)[:, None], (table.x[spots] - ix)[:, None])
    r = win // 2
    light = np.zeros((dp, h + 2 * r, w + 2 * r))
    for i in range(len(spots)):
        light[:, iy[i] : iy[i] + win, ix[i] : ix[i] + win] += big[i]
    out = _windows(light, table.y[rows] + r, table.x[rows] + r, win)
    own = known >= 0
    out[known[own]] -= big[own]  # a bead's own light stays in its window
    return out


def _grid_at(data: np.ndarray, table: BeadTable, slide: float, depth: int, size: int, opts: _GridOptions,
             surface: np.ndarray, crowd: MeasuredGrid3DPSF | None = None):
    """The 3-D grid from the accepted beads' windows centred on plane ``slide`` (with spare planes each side for
    moving them by the best-focus ``surface``, planes, relative to the slide: :func:`_fit_grid3d`), with the
    neighbours' light of a previous pass's model (``crowd``) removed: node PSFs, filled flags, node weights and the
    rows used (beads without light after their background are rejected)."""
    t = np.linspace(-1.0, 1.0, 9)
    pad = int(math.ceil(np.abs(focus_surface(surface, *np.meshgrid(t, t, indexing="ij"))).max())) + 2
    slab = _catmull_rom(data, slide - depth // 2 - pad, depth + 2 * pad)
    rows = np.flatnonzero(table.accepted)
    patches, flux, _ = _patches3d(slab, table.y[rows], table.x[rows], size, _MARGIN)
    if crowd is not None:  # the neighbours' light, from the previous pass's model, out of every window
        others = _neighbour_light(table, rows, crowd, slab.shape, pad, size + 2 * _MARGIN, flux)
        patches, flux, _ = _patches3d(slab, table.y[rows], table.x[rows], size, _MARGIN, others)
    good = np.isfinite(patches).all(axis=(1, 2, 3)) & (flux > 0)
    table.reject(np.isin(np.arange(len(table)), rows[~good]), "fit failed", "no light left after its background")
    rows, patches, flux = rows[good], patches[good], flux[good]
    if rows.size < _MIN_BEADS:
        raise CalibrationError(f"the 3-D grid needs at least {_MIN_BEADS} usable beads, found {rows.size} "
                               f"({_counts(table)})", beads=table, field_shape=data.shape[1:])
    psfs, filled, node_weight, foci = _fit_grid3d(patches, pad, flux, table.y_norm[rows], table.x_norm[rows], opts,
                                               surface)
    return psfs, filled, node_weight, rows, foci


def _grid_and_focus(data: np.ndarray, table: BeadTable, coef: np.ndarray, depth: int, size: int, opts: _GridOptions,
                    on_refit: Callable[[], None], rounds: int = 8, crowd: MeasuredGrid3DPSF | None = None):
    """The 3-D grid and the best-focus surface, refined together: the nodes' foci (:func:`psf_focus`, their smallest
    spots; not the beads' brightest squares) give a surface, which moves the slide's plane (the windows are cut
    again there) and the beads' alignment to their nodes, for ``rounds`` rounds or until the slide moves by less
    than 0.05 plane (``crowd``: the neighbours' light removed, :func:`_grid_at`). Returns psfs, filled, node weights,
    rows used and the surface (planes; its constant the slide's plane)."""
    coef = np.asarray(coef, np.float64).copy()
    for i in range(rounds):
        rel = np.concatenate([[0.0], coef[1:]])
        psfs, filled, node_weight, rows, foci = _grid_at(data, table, float(coef[0]), depth, size, opts, rel, crowd)
        ok = np.isfinite(foci)
        if ok.sum() < 6:
            break
        surface = fit_focus_surface(table.y_norm[rows][ok], table.x_norm[rows][ok], foci[ok])[0]
        moved = float(coef[0] + surface[0])
        done = abs(surface[0]) <= 0.05 and np.allclose(surface[1:], coef[1:], atol=0.02)
        if not _fits(data.shape[0], moved, depth):
            break
        coef = np.concatenate([[moved], surface[1:]])
        if done or i == rounds - 1:
            break
        on_refit()
    return psfs, filled, node_weight, rows, coef


def _fits(z: int, slide: float, depth: int) -> bool:
    """Whether ``depth`` planes around ``slide`` (and the interpolation's spare plane each side) lie in the stack."""
    return math.floor(slide) - depth // 2 - 1 >= 0 and math.ceil(slide) + depth // 2 + 1 <= z - 1


def _focus_radius(table: BeadTable) -> int:
    """The disc (px) in which each bead's spot size is measured: four in-focus FWHM of the accepted beads (the
    aberrated wings count, the noise beyond them does not), 6 to 30 px."""
    ok = table.accepted
    fwhm = float(np.nanmedian(np.sqrt(table.fwhm_x[ok] * table.fwhm_y[ok]))) if ok.any() else 3.0
    return int(np.clip(round(4.0 * fwhm), 6, 30))


def _as_beads(psfs: np.ndarray, filled: np.ndarray, opts: _GridOptions, z_step_um: float) -> MeasuredGrid3DPSF:
    """The grid as its beads image (the bead put back in: the neighbours whose light is modelled are beads)."""
    beads = np.clip(blur_by_bead(psfs, opts.bead_px, opts.z_step_px), 0.0, None)
    return MeasuredGrid3DPSF(beads / beads.sum(axis=(2, 3, 4), keepdims=True), z_step_um=float(z_step_um),
                             filled=filled)


def _bead_px(diameter_nm: float | None, pixel_size_um: float | None) -> float:
    from napari_coordgate.optics.bead import bead_diameter_px

    try:
        return bead_diameter_px(diameter_nm, pixel_size_um)
    except ValueError as exc:
        raise CalibrationError(str(exc)) from None


def _measured_model(psfs, filled, z_step_um, pixel_size_um, source, n_beads: int, coef: np.ndarray, z: int,
                    field_shape) -> MeasuredGrid3DPSF:
    """The calibration's PSF model with its provenance (sources, bead count, the best-focus surface, and the field it
    describes: what training without sharp volumes sizes the built-in ones by)."""
    src = [source] if isinstance(source, str) else list(source or [])
    prov = {"source": src, "beads": int(n_beads), "z_step_um": float(z_step_um), "slide_plane": round(float(coef[0]),
            4), "best_focus_surface_planes": [round(float(v), 5) for v in coef], "stack_depth": z,
            "field_shape": [int(n) for n in field_shape], "calibrated": "z-stack"}
    name = "measured from " + ", ".join(Path(p).name for p in src) if src else "measured"
    return MeasuredGrid3DPSF(psfs, z_step_um=float(z_step_um), filled=filled, pixel_size_um=pixel_size_um, name=name,
                             provenance=prov, blur_grid=psfs.shape[0])


def _lateral_size(table: BeadTable, slab: np.ndarray, field_shape, psf_size: int | None) -> int:
    """The PSFs' side: given, or where the beads' light summed over the PSF's planes fades into the noise."""
    h, w = field_shape
    limit = min(h, w) - 2 * _MARGIN - 3
    if psf_size is not None:
        size = int(psf_size)
        if size % 2 == 0 or size < 3 or size > limit:
            raise CalibrationError(f"psf_size must be odd, from 3 to {limit} for {h} x {w} planes, got {size}")
        return size
    # one window for the whole stack (per-region windows as in 2-D are not done in 3-D yet)
    return window_size(table, [slab.sum(axis=0)], limit, None, _MARGIN, reach=61, grow=False)


def _zstack_warnings(table: BeadTable, focus: np.ndarray, z: int, filled: np.ndarray) -> list[str]:
    out = []
    ok = table.accepted & np.isfinite(focus)
    near = ok & ((focus < _END_PLANES) | (focus > z - 1 - _END_PLANES))
    if near.any():
        out.append(f"{int(near.sum())} beads have their focus within {_END_PLANES} planes of the stack's first or "
                   "last plane: their PSFs are cut there; image more planes above and below focus")
    if filled.any():
        out.append(f"{int(filled.sum())} of {filled.size} grid nodes had too few beads and were filled from their "
                   "neighbours")
    return out
