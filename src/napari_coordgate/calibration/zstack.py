"""Calibrate from a bead z-stack: the field-dependent 3-D PSF and where across the field the best focus lies.

A slide of sub-resolution beads imaged through focus (Z, H, W) holds, at every bead, the 3-D PSF of that place of
the field. All beads lie on the slide, one plane ``z_s``; the optics' best focus is shifted across the field
(field curvature, tilt of the focal surface or of the slide), so the bead at normalised field position (y, x)
is sharpest at plane ``z_s + f(y, x)``. The steps:

1. **Detect** the beads in the stack's maximum projection (the 2-D detection of
   :func:`~napari_coordgate.calibration.detect.find_beads`: hot pixels, saturation, sub-pixel centres, widths).
2. **Focus of each bead**: its axial profile (the light of a 3 x 3 px square on the bead, plane by plane, minus
   the bead's background) and the vertex of a parabola through the logarithm of the profile's top five planes.
3. **The best-focus surface** ``f``: a quadratic in (y, x) fitted robustly (Cauchy weights) to the beads' foci;
   its value at the field centre is the slide's plane ``z_s`` (so ``f(0, 0) = 0``, the convention of
   :class:`~napari_coordgate.optics.psf3d.Pupil3DPSF`, whose middle plane is in focus on the axis). Beads far off
   the surface (debris above the slide, a bead in the mounting medium) are rejected as outliers.
4. **3-D patches**: every bead's window of ``D`` planes centred on ``z_s`` (cubic interpolation between planes:
   one sub-plane shift for all beads), its background (the median of the window's outer ring over all planes)
   removed, moved laterally by its sub-pixel centre (Fourier shift), cut to ``D x s x s`` and normalised to unit
   sum. Centring on the slide plane, not on each bead's own focus, keeps the focus shift in the PSFs.
5. **The K x K grid**: the node PSFs solved jointly by tent-weighted least squares, exactly as the 2-D grid
   (:mod:`~napari_coordgate.calibration.grid`: K and the smoothness chosen by cross-validation over the beads,
   robust weights), then kept on their 3-D support (the voxels where a lightly smoothed copy stands above the
   node's noise, grown by two voxels), nodes without beads filled from their neighbours, each node moved
   laterally so its centroid sits on the middle pixel (not axially: the focus shift is the measurement), and
   normalised to unit sum over its stored volume (:class:`~napari_coordgate.optics.psf3d.MeasuredGrid3DPSF`).

The result also reports the best-focus map (µm, relative to the field centre) and warns about beads whose focus
lies near the stack's ends (their PSFs are cut there) and a stack too short for the PSF's axial reach.

numpy and scipy only: no torch, no Qt.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from scipy import ndimage

from napari_coordgate.calibration import CalibrationError
from napari_coordgate.calibration.detect import REASONS, BeadTable, find_beads, reject_by_window
from napari_coordgate.calibration.grid import _harmonic_fill, _robust_fit, choose_grid, tent_matrix
from napari_coordgate.calibration.patches import Patches, window_size
from napari_coordgate.calibration.result import _json_default
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

    @property
    def psf_model(self) -> MeasuredGrid3DPSF:
        return self.model

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
    z, h, w = stack.shape
    iy = np.clip(np.round(ys).astype(int), 1, h - 2)
    ix = np.clip(np.round(xs).astype(int), 1, w - 2)
    off = np.arange(-1, 2)
    sq = stack[:, iy[:, None, None] + off[None, :, None], ix[:, None, None] + off[None, None, :]]  # (Z, N, 3, 3)
    return sq.sum(axis=(2, 3)).T - 9.0 * np.asarray(background, dtype=np.float64)[:, None]


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


def _patches3d(slab: np.ndarray, ys: np.ndarray, xs: np.ndarray, size: int, margin: int
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(N, D, s, s) unit-sum registered patches from a slab (D, H, W) at the beads, their flux and background."""
    win = size + 2 * margin
    r = win // 2
    iy, ix = np.round(ys).astype(int), np.round(xs).astype(int)
    off = np.arange(win) - r
    windows = slab[:, iy[:, None, None] + off[None, :, None], ix[:, None, None] + off[None, None, :]]
    windows = np.moveaxis(windows, 0, 1)  # (N, D, win, win)
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


def _denoise3d(g: np.ndarray, sigma: float) -> np.ndarray:
    """Keep a 3-D PSF on its support: where a lightly smoothed copy stands above the noise (the components that
    reach the central 3 x 3 column), grown by two voxels, with a soft edge."""
    d, s, _ = g.shape
    smooth = ndimage.gaussian_filter(g, 1.0, mode="constant")
    # white noise of std sigma has std sigma / (2 sqrt(pi))^(3/2) after a unit 3-D Gaussian filter
    thresh = max(3.0 * sigma / (2.0 * math.sqrt(math.pi)) ** 1.5, 1e-4 * float(smooth.max()))
    support = smooth > thresh
    labels, n = ndimage.label(support)
    if n > 1:
        c = s // 2
        core = set(labels[:, c - 1 : c + 2, c - 1 : c + 2].ravel()) - {0}
        if core:
            support = np.isin(labels, list(core))
        else:
            sums = ndimage.sum(g, labels, range(1, n + 1))
            support = labels == (1 + int(np.argmax(sums)))
    support = ndimage.binary_dilation(support, iterations=2)
    taper = np.clip(ndimage.gaussian_filter(support.astype(float), 0.7, mode="constant") * 1.5, 0.0, 1.0)
    out = np.clip(g * taper, 0.0, None)
    return out if out.sum() > 0 else np.clip(g, 0.0, None)


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


def _fit_grid3d(patches: np.ndarray, flux: np.ndarray, y_norm: np.ndarray, x_norm: np.ndarray,
                grid: int | None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(K, K, D, s, s) node PSFs, (K, K) filled flags, (K, K) beads' worth of weight per node, (N,) robust weights."""
    n, d, s, _ = patches.shape
    holder = Patches(np.arange(n), patches, np.zeros(n), np.zeros((n, 2)), patches, flux, np.ones(n), y_norm,
                     x_norm, s, 0)
    ks = [int(grid)] if grid else list(range(1, int(np.clip(math.floor(math.sqrt(n / 3.0)) + 1, 1, 9)) + 1))
    k, lam, _ = choose_grid(holder, ks)
    p = patches.reshape(n, -1)
    med = max(float(np.median(np.maximum(flux, 0.0))), 1e-30)
    w = np.clip(np.maximum(flux, 0.0) / med, 0.1, 5.0)
    t = tent_matrix(y_norm, x_norm, k)
    g, u, _ = _robust_fit(t, p, w, k, lam)
    resid = p - t @ g
    wu = w * u
    # per-voxel noise of the node estimates: the pooled residual through the tent weights' effective count
    c = float(np.sum(wu[:, None] * resid**2)) / (max(n - k * k, 1) * p.shape[1])
    node_weight = (t * u[:, None]).sum(axis=0)
    eff = np.maximum((t * wu[:, None]).sum(axis=0) ** 2 / np.maximum((t**2 * wu[:, None]).sum(axis=0), 1e-30), 1e-3)
    sigma = np.sqrt(c / eff)
    psfs = np.stack([_denoise3d(g[i].reshape(d, s, s), sigma[i]) for i in range(k * k)])
    known = node_weight.reshape(k, k) >= 0.25
    filled = ~known if known.any() else np.zeros((k, k), bool)
    psfs = _harmonic_fill(psfs.reshape(k, k, d, s, s), known if known.any() else ~filled)
    psfs = _recentre_lateral(psfs.reshape(k * k, d, s, s)).reshape(k, k, d, s, s)
    psfs = np.clip(psfs, 0.0, None)
    psfs /= psfs.sum(axis=(2, 3, 4), keepdims=True)
    return psfs, filled, node_weight.reshape(k, k), u


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
    bg = np.median(stack, axis=0)
    rows = np.flatnonzero(ok)
    prof = axial_profiles(stack, table.y[rows], table.x[rows],
                          bg[np.round(table.y[rows]).astype(int), np.round(table.x[rows]).astype(int)])
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


def _axial_fwhm(stack: np.ndarray, table: BeadTable, focus: np.ndarray) -> float:
    """Median axial FWHM (planes) of the beads' profiles (at least 1)."""
    rows = np.flatnonzero(table.accepted)
    bg = np.median(stack, axis=0)
    prof = axial_profiles(stack, table.y[rows], table.x[rows],
                          bg[np.round(table.y[rows]).astype(int), np.round(table.x[rows]).astype(int)])
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
    min_snr, should_stop, report, source
        As :func:`~napari_coordgate.calibration.calibrate.calibrate`.

    Raises
    ------
    CalibrationError
        Not a z-stack (fewer than 7 planes, not 3-D), NaN/Inf, a constant stack, no beads, fewer than 5 usable
        beads, a slide at the stack's end.
    """
    t0 = time.perf_counter()
    raw = _check_stack(stack, z_step_um)
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
    patches, flux, _ = _patches3d(slab, table.y[rows], table.x[rows], size, _MARGIN)
    good = np.isfinite(patches).all(axis=(1, 2, 3)) & (flux > 0)
    table.reject(np.isin(np.arange(len(table)), rows[~good]), "fit failed", "no light left after its background")
    rows, patches, flux = rows[good], patches[good], flux[good]
    psfs, filled, node_weight, u = _fit_grid3d(patches, flux, table.y_norm[rows], table.x_norm[rows], grid)
    warnings += _zstack_warnings(table, focus, z, filled)
    src = [source] if isinstance(source, str) else list(source or [])
    prov = {"source": src, "beads": int(rows.size), "z_step_um": float(z_step_um), "slide_plane": round(slide, 4),
            "best_focus_surface_planes": [round(float(v), 5) for v in coef], "stack_depth": z, "calibrated": "z-stack"}
    name = "measured from " + ", ".join(Path(s).name for s in src) if src else "measured"
    model = MeasuredGrid3DPSF(psfs, z_step_um=float(z_step_um), filled=filled, pixel_size_um=pixel_size_um,
                              name=name, provenance=prov, blur_grid=psfs.shape[0])
    settings = {"z_step_um": z_step_um, "pixel_size_um": pixel_size_um, "grid": grid, "psf_size": psf_size,
                "psf_depth": psf_depth, "min_snr": min_snr}
    _stage(report, t0, "done", 1.0, f"3-D PSF grid from {rows.size} beads")
    return ZStackCalibration(model, table, focus, coef, slide, float(z_step_um), field_shape, z, size, depth,
                             [float(noise)], node_weight, warnings, settings, time.perf_counter() - t0)


def _lateral_size(table: BeadTable, slab: np.ndarray, field_shape, psf_size: int | None) -> int:
    """The PSFs' side: given, or where the beads' light summed over the PSF's planes fades into the noise."""
    h, w = field_shape
    limit = min(h, w) - 2 * _MARGIN - 3
    if psf_size is not None:
        size = int(psf_size)
        if size % 2 == 0 or size < 3 or size > limit:
            raise CalibrationError(f"psf_size must be odd, from 3 to {limit} for {h} x {w} planes, got {size}")
        return size
    return window_size(table, [slab.sum(axis=0)], limit, None, _MARGIN)


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
