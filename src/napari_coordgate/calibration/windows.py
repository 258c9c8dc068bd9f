"""How large a window each bead's PSF needs, where in the field it is.

A PSF may grow several-fold from the centre of the field to its corners (a fibre bundle, a wide-field objective's
edge). A window too small cuts its wings (the fit reads them as darkness), one too large everywhere takes in the
neighbours and the frame edge of the small PSFs in the centre. :func:`window_sizes` cuts the field into
:data:`REGIONS` x :data:`REGIONS` regions and reads each region's window off a median stack of its widest beads
(:func:`_needed_radius`: where the light sinks into the noise, grown where a power law says more than
:data:`TRUNCATED_LIGHT` of it lies beyond), and grows it toward the places of the region where the beads' FWHM says
the PSF is wider than at the stacked beads; :class:`Windows` answers a bead's window at its place.
:func:`window_size` is the one window of the whole field (bead z-stacks). Below the calibration's pipeline: a bead
table and images in, sides out.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from napari_coordgate.calibration.detect import BeadTable

__all__ = ["Windows", "window_size", "window_sizes", "MAX_WIDENING", "MAX_WINDOW", "TRUNCATED_LIGHT",
           "REGIONS", "REGION_BEADS"]


def _odd(n: float) -> int:
    n = int(math.ceil(n))
    return n + 1 - n % 2


#: the largest PSF side a calibration measures (a PSF of 10 px FWHM in the corners needs about 81 px)
MAX_WINDOW = 81
#: at most this fraction of a PSF's light may lie beyond its window
TRUNCATED_LIGHT = 0.01
#: a region measures its own window from at least this many beads (the widest 40 % of them stacked): the stack of
#: fewer is too noisy to place a 1 % tail (5 beads of an 8-bit slide gave 57-81 px windows for 7 px PSFs)
REGION_BEADS = 15
#: the field is cut into REGIONS x REGIONS cells, each with the window its own widest beads need
REGIONS = 3
#: a window grows toward where the PSF is wider than the stack that measured it, at most this many times
MAX_WIDENING = 2.0


def _floor_and_big(cleaned: list[np.ndarray], limit: int, optics: dict | None, margin: int,
                   reach: int = MAX_WINDOW + 20) -> tuple[int, int]:
    """(smallest window, side of the stacks that measure it: at most ``reach``)."""
    floor = 11
    if optics is not None:
        airy = 1.2 * optics["wavelength_um"] / optics["na"] / optics["pixel_size_um"]
        floor = max(floor, _odd(2 * math.ceil(2.0 * airy) + 1))
    big = int(min(reach, limit + 2 * margin, 2 * (min(cleaned[0].shape) // 4) + 1))
    return floor, big - (1 - big % 2)


class _Sides(NamedTuple):
    """What a stack of beads needs: the sides of :func:`_needed_radius`'s radii, and ``width``, the median of the
    beads' FWHM law (:func:`_width_law`) at the stacked beads (NaN without one)."""

    core: int
    noise: int
    window: int
    light: int
    width: float


def _stack_size(table: "BeadTable", cleaned: list[np.ndarray], rows: np.ndarray, big: int, floor: int,
                limit: int, least: int = 5, law: Callable | None = None) -> _Sides | None:
    """The :class:`_Sides` the beads ``rows`` need (the radii of :func:`_needed_radius` on the median stack of their
    widest beads' windows, as sides; the noise's at most 51 px), or None when fewer than ``least`` beads are
    measurable."""
    major = np.fmax(table.fwhm_x, table.fwhm_y)
    half = big // 2
    # beads whose whole stack window is inside the frame (a partial window's background and light are not
    # comparable); a region with fewer takes the whole field's sizes
    inside = np.array([i for i in rows if half <= round(table.y[i]) < cleaned[table.image[i]].shape[0] - half
                       and half <= round(table.x[i]) < cleaned[table.image[i]].shape[1] - half], dtype=int)
    if inside.size < least:
        return None
    wide = inside[np.argsort(-major[inside])][: max(5, min(40, int(0.4 * inside.size)))]
    off = np.arange(big) - half
    rr = np.hypot(off[:, None], off[None, :])
    ring = rr >= half - 2
    stack, stacked, padded = [], [], {}
    for i in wide:
        if table.image[i] not in padded:
            padded[table.image[i]] = np.pad(cleaned[table.image[i]].astype(np.float64), half, constant_values=np.nan)
        img = padded[table.image[i]]
        cy, cx = int(round(table.y[i])) + half, int(round(table.x[i])) + half
        win = img[cy - half : cy + half + 1, cx - half : cx + half + 1]
        if not np.isfinite(win[ring]).any():
            continue
        win = win - np.nanmedian(win[ring])
        core = np.nansum(win[rr <= max(3.0, major[i])])
        if core > 0:
            stack.append(win / core)
            stacked.append(i)
    if len(stack) < 5:
        return None
    with warnings.catch_warnings():  # a pixel beyond every bead's frame stays NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        med = np.nanmedian(np.stack(stack), axis=0)
    radii = _needed_radius(med, rr, half, len(stack))
    core, noise, window = (int(np.clip(_odd(2 * r + 3), floor, max(floor, min(cap, limit))))
                           for r, cap in zip(radii, (MAX_WINDOW, 51, MAX_WINDOW)))
    light = int(np.clip(_odd(2 * radii[3] + 3), 3, max(floor, min(MAX_WINDOW, limit))))  # measured: no floor
    stacked = np.array(stacked, dtype=int)
    width = float(np.nanmedian(law(table.y_norm[stacked], table.x_norm[stacked]))) if law is not None else math.nan
    return _Sides(core, noise, window, light, width)


def _needed_radius(med: np.ndarray, rr: np.ndarray, half: int, beads: int = 1) -> tuple[int, int, int, int]:
    """(core, noise, window, light) radii of a median stack of ``beads`` beads. The core: where the stack's
    azimuthal mean sinks into one bead's noise (the light a neighbour's window must keep clear of). The noise: where
    it sinks into the stack's own noise. The window: that, or further where a power law through the outer half of
    the measured radii (no shallower than an Airy pattern's r^-3) says more than :data:`TRUNCATED_LIGHT` of the
    light lies beyond, at most twice as far (a power law read off a few radii says little further out). The light:
    where that power law says :data:`TRUNCATED_LIGHT` of the light lies beyond (the window where it grew the
    window; where the noise comes later, nearer, but not nearer than the power law's first radius): a wider PSF
    elsewhere needs this radius scaled, not the noise's. NaN: pixels no bead of the stack had."""
    rr = np.where(np.isfinite(med), rr, np.inf)
    med = np.nan_to_num(med)
    band = (rr >= half - 8) & (rr < half - 2)
    med = med - np.mean(med[band])  # the stack's residual floor (background bias)
    outer = med[band]
    sigma = 1.4826 * float(np.median(np.abs(outer - np.median(outer))))
    if sigma <= 0:  # quantised (8-bit) images: most of the band is one value, its median deviation 0
        sigma = float(np.std(outer))
    profile = {}
    for r in range(1, half - 8):
        shell = (rr >= r - 0.5) & (rr < r + 0.5)
        if shell.any():
            profile[r] = (float(med[shell].mean()), 2.0 * sigma / math.sqrt(shell.sum()))

    def sinks(scale: float) -> int:  # the last radius above the noise before two radii in a row below it
        radius, below = 3, 0
        for r, (mean, noise) in profile.items():
            if mean > scale * noise:
                radius, below = r, 0
            else:
                below += 1
                if below >= 2:
                    break
        return radius

    radius = sinks(1.0)
    core = min(sinks(math.sqrt(max(beads, 1))), radius)
    rs = np.array([r for r in range(max(2, radius // 2), radius + 1) if profile.get(r, (0.0,))[0] > 0], float)
    if rs.size < 3:
        return core, radius, radius, radius
    slope, icpt = np.polyfit(np.log(rs), np.log([profile[int(r)][0] for r in rs]), 1)
    a = max(-slope, 3.0)
    tail = 2.0 * math.pi * math.exp(icpt) * (radius + 0.5) ** (2.0 - a) / (a - 2.0)
    inside = float(med[rr <= radius + 0.5].sum())
    if inside <= 0:
        return core, radius, radius, radius
    light = (radius + 0.5) * (tail / (TRUNCATED_LIGHT * (inside + tail))) ** (1.0 / (a - 2.0))
    if light <= radius:
        return core, radius, radius, int(max(math.ceil(light), rs[0]))
    window = int(min(math.ceil(light), 2 * radius, half))
    return core, radius, window, window


def window_size(table: "BeadTable", cleaned: list[np.ndarray], limit: int, optics: dict | None, margin: int, *,
                reach: int = MAX_WINDOW + 20, grow: bool = True) -> int:
    """PSF side (odd) that holds the light of the widest beads.

    The widest beads' windows (as large as the frame allows, up to ``reach`` px) are background-subtracted, scaled
    by their core's light and median-stacked (the median ignores the neighbours that wander into large windows);
    the radius where the stack's azimuthal mean sinks into its noise, grown where its tail still holds more than
    :data:`TRUNCATED_LIGHT` of the light (:func:`_needed_radius`; not with ``grow`` False, then at most 51 px), sets
    the size (plus a pixel of margin). At least the Airy pattern's first rings when the optics are known, at least
    11 px, at most :data:`MAX_WINDOW`.
    """
    sides = _whole(table, cleaned, limit, optics, margin, reach)
    return sides.window if grow else sides.noise


def _whole(table: "BeadTable", cleaned: list[np.ndarray], limit: int, optics: dict | None, margin: int,
           reach: int = MAX_WINDOW + 20, law: Callable | None = None) -> _Sides:
    """The :class:`_Sides` of :func:`_stack_size` for the whole field's beads (the sides all the same, the width
    NaN, where too few beads can be stacked)."""
    ok = table.accepted
    major = np.fmax(table.fwhm_x, table.fwhm_y)
    floor, big = _floor_and_big(cleaned, limit, optics, margin, reach)
    sizes = _stack_size(table, cleaned, np.flatnonzero(ok & np.isfinite(major) & (table.snr >= 20)), big, floor,
                        limit, law=law)
    if sizes is None:
        sigma = float(np.nanpercentile(major[ok], 90)) / 2.3548 if ok.any() else 1.5
        size = int(np.clip(_odd(2 * math.ceil(5.0 * sigma) + 1), floor, max(floor, min(51, limit))))
        return _Sides(size, size, size, size, math.nan)
    return sizes


@dataclass(eq=False)
class Windows:
    """The window side (odd) a bead needs at its place in the field, and its core's (where its light stands above
    the noise: what a neighbour must keep clear of for the bead to count as alone).

    ``regions``/``cores``: (REGIONS²,) the sides each region's stack of beads needs (row-major cells of a
    :data:`REGIONS` x :data:`REGIONS` partition). The stack is of a region's widest beads, but the region's PSF
    keeps growing toward its outer edge, where the grid's outer nodes sit and beads are few (on the 1024² growing
    replica the field corner's node kept 97.6 % of its light within its region's window): where ``law`` (the beads'
    FWHM over the field, :func:`_width_law`) says a place is wider than the stacked beads (``widths``, the law's
    median over them), the radius that holds the stack's light (``lights``: all but :data:`TRUNCATED_LIGHT`) grows
    in proportion there, at most :data:`MAX_WIDENING` times and to ``cap`` px; the window is the larger of that and
    the region's own (which reaches where the stack sinks into its noise, often further than its light). The core
    does not grow.
    """

    regions: np.ndarray
    cores: np.ndarray
    widths: np.ndarray | None = None
    law: Callable | None = None
    cap: int = MAX_WINDOW
    lights: np.ndarray | None = None  # (REGIONS²,) the side holding all but TRUNCATED_LIGHT (None: ``regions``)

    @classmethod
    def one(cls, side: int) -> "Windows":
        """The same window (and core) everywhere: a ``psf_size`` the user gave."""
        sides = np.full(REGIONS * REGIONS, int(side))
        return cls(sides, sides.copy(), cap=int(side))

    def _grown(self, cell: np.ndarray, y: np.ndarray, x: np.ndarray) -> np.ndarray:
        """(N,) the window of region ``cell`` (all known) grown to the law's width at (y, x)."""
        base = np.asarray(self.regions, int)[cell]
        if self.law is None or self.widths is None:
            return base
        light = np.asarray(self.regions if self.lights is None else self.lights, int)[cell]
        with np.errstate(invalid="ignore", divide="ignore"):
            grow = self.law(y, x) / np.asarray(self.widths, float)[cell]
        grow = np.where(np.isfinite(grow), np.clip(grow, 1.0, MAX_WIDENING), 1.0)
        grown = np.array([_odd((b - 3) * g + 3) for b, g in zip(light, grow)], dtype=int)
        return np.maximum(base, np.minimum(grown, self.cap))

    def largest(self) -> int:
        """The largest window anywhere in the field (the side of every bead's arrays): each region's grown window
        over its closed cell (edges included, 9 x 9 points: the law is a quadratic), and never less than a region's
        own."""
        t = np.linspace(0.0, 1.0, 9)
        out = int(np.max(self.regions))
        for c in range(REGIONS * REGIONS):
            ys, xs = -1.0 + 2.0 * (c // REGIONS + t) / REGIONS, -1.0 + 2.0 * (c % REGIONS + t) / REGIONS
            yy, xx = (v.ravel() for v in np.meshgrid(ys, xs, indexing="ij"))
            out = max(out, int(self._grown(np.full(yy.size, c), yy, xx).max()))
        return out

    def at(self, y_norm, x_norm, core: bool = False) -> np.ndarray:
        """(N,) the window (``core``: the core) side at normalised positions (the largest region's, ungrown, where
        unknown), at most :meth:`largest`."""
        y, x = np.asarray(y_norm, float).ravel(), np.asarray(x_norm, float).ravel()
        base = _sizes_at(self.cores if core else self.regions, y, x)
        cell = _region_of(y, x)
        if core or self.law is None or self.widths is None or not (cell >= 0).any():
            return base
        known = cell >= 0
        out = base.copy()
        out[known] = np.minimum(self._grown(cell[known], y[known], x[known]), self.largest())
        return out

    def provenance(self) -> dict:
        """The sides by region (and the grown window at the field's four corners) for a calibration's report."""
        c = np.array([-1.0, -1.0, 1.0, 1.0]), np.array([-1.0, 1.0, -1.0, 1.0])
        return {"windows_by_region": np.asarray(self.regions).reshape(REGIONS, REGIONS).tolist(),
                "cores_by_region": np.asarray(self.cores).reshape(REGIONS, REGIONS).tolist(),
                "windows_at_corners": [int(v) for v in self.at(*c)]}


def _width_law(table: "BeadTable", rows: np.ndarray) -> Callable | None:
    """The beads' major FWHM (px) as a quadratic of the field position, fitted with a 3-MAD outlier cut (a blend of
    two beads is not the PSF): a callable ``law(y_norm, x_norm)`` (at least 0.5 px), or None with fewer than 12
    beads."""
    def design(y, x):
        y, x = np.asarray(y, float), np.asarray(x, float)
        return np.stack([np.ones_like(y), y, x, y * y, y * x, x * x], -1)

    w = np.fmax(table.fwhm_x, table.fwhm_y)[rows]
    a = design(table.y_norm[rows], table.x_norm[rows])
    usable = keep = np.isfinite(w) & np.isfinite(a).all(-1)
    if keep.sum() < 12:
        return None
    for _ in range(5):
        coef = np.linalg.lstsq(a[keep], w[keep], rcond=None)[0]
        res = np.where(usable, w - np.nan_to_num(a) @ coef, np.inf)
        cut = usable & (np.abs(res) <= 3.0 * 1.4826 * float(np.median(np.abs(res[keep]))) + 1e-9)
        if cut.sum() < 12 or (cut == keep).all():
            break
        keep = cut
    return lambda y, x: np.maximum(design(y, x) @ coef, 0.5)


def window_sizes(table: "BeadTable", cleaned: list[np.ndarray], limit: int, optics: dict | None, margin: int
                 ) -> Windows:
    """The :class:`Windows` of the field: each region's by :func:`window_size`'s rule on its own beads (the window
    holds all but :data:`TRUNCATED_LIGHT` of the light of its stack), grown toward where the PSF is wider than its
    stack. A region with fewer than :data:`REGION_BEADS` measurable beads takes the whole field's sides (and its
    stack's width). A region's window may exceed the whole field's (whose stack mixes the PSFs of every corner, each
    smeared its own way, and its median keeps the light they share); its core may not. Where the PSF grows across
    the field, the beads in the centre keep small windows (their neighbours and the frame edge stay out) and those
    in the corners get windows that hold their light."""
    ok = table.accepted & np.isfinite(np.fmax(table.fwhm_x, table.fwhm_y)) & (table.snr >= 20)
    law = _width_law(table, np.flatnonzero(ok))
    whole = _whole(table, cleaned, limit, optics, margin, law=law)
    floor, big = _floor_and_big(cleaned, limit, optics, margin)
    cell = _region_of(table.y_norm, table.x_norm)
    cores = np.full(REGIONS * REGIONS, whole.core, dtype=int)
    windows = np.full(REGIONS * REGIONS, whole.window, dtype=int)
    lights = np.full(REGIONS * REGIONS, whole.light, dtype=int)
    widths = np.full(REGIONS * REGIONS, whole.width)
    for c in range(REGIONS * REGIONS):
        sizes = _stack_size(table, cleaned, np.flatnonzero(ok & (cell == c)), big, floor, limit, REGION_BEADS, law)
        if sizes is not None:
            cores[c], windows[c], lights[c], widths[c] = min(sizes.core, whole.core), *sizes[2:]
    return Windows(windows, cores, widths, law, cap=int(min(MAX_WINDOW, max(limit, floor))), lights=lights)


def _sizes_at(sizes: np.ndarray, y_norm: np.ndarray, x_norm: np.ndarray) -> np.ndarray:
    """(N,) the side of the region (``sizes``: one per region, as :attr:`Windows.regions`) at normalised positions
    (the largest where unknown), not grown: a bead's window is :meth:`Windows.at`."""
    cell = _region_of(np.asarray(y_norm, float), np.asarray(x_norm, float))
    return np.where(cell >= 0, np.asarray(sizes)[np.maximum(cell, 0)], int(np.max(sizes))).astype(int)


def _region_of(y_norm: np.ndarray, x_norm: np.ndarray) -> np.ndarray:
    """(N,) the cell (row-major) of :func:`window_sizes`' partition at normalised positions (-1 where unknown)."""
    def axis(v):
        return np.clip(np.floor((np.nan_to_num(v, nan=0.0) + 1.0) / 2.0 * REGIONS), 0, REGIONS - 1).astype(int)

    out = axis(y_norm) * REGIONS + axis(x_norm)
    return np.where(np.isfinite(y_norm) & np.isfinite(x_norm), out, -1)
