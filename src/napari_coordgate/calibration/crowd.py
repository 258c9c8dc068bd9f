"""Crowded slides and point arrays: each bead's window with its neighbours' light modelled and removed.

On a real slide many beads lie within a PSF window of another, and on a point array (pinholes, nanoholes,
focal-spot arrays) every spot does. Rejecting them wastes most of the light; cutting their windows as they are
puts the neighbours' light into the PSF. Instead every source in the image (accepted beads and every other real
spot: rejected ones too, since their light is there) is modelled as amplitude x the current PSF model at its
place, with a sub-pixel position, and the model of all *other* sources is subtracted from each bead's window
before its patch is cut (as crowded-field photometry does):

1. the current model's PSF at each source, as its bead images it (:func:`~napari_coordgate.optics.bead.blur_by_bead`);
2. a few Jacobi sweeps: each source's amplitude, offset and sub-pixel position are fitted to its central square
   with every other source's current model subtracted (:func:`~napari_coordgate.calibration.patches.fit_amplitude_shift`);
3. the beads' windows with the other sources' models subtracted.

The caller refits the PSF model from those windows and repeats. Sources too close to be told apart (a clump) and
sources whose model cannot be trusted (saturated, too large) are not for this module: their neighbours are
rejected before (:func:`~napari_coordgate.calibration.detect.reject_by_window`).
"""

from __future__ import annotations

import numpy as np

from napari_coordgate.calibration.patches import fit_amplitude_shift
from napari_coordgate.optics.shift import fourier_shift

__all__ = ["Sources", "model_sources", "isolate_windows"]


class Sources:
    """The sources of one image: integer centres, sub-pixel shifts, PSFs and fitted amplitudes."""

    def __init__(self, y: np.ndarray, x: np.ndarray, psfs: np.ndarray, amplitude: np.ndarray):
        self.iy, self.ix = np.round(y).astype(int), np.round(x).astype(int)
        self.shift = np.stack([y - self.iy, x - self.ix], axis=1)
        self.psfs = psfs  # (N, s, s) centred on the middle pixel, unit sum
        self.amplitude = np.asarray(amplitude, dtype=np.float64).copy()
        self.offset = np.zeros(len(y))

    def __len__(self) -> int:
        return int(self.iy.size)

    @property
    def y(self) -> np.ndarray:
        return self.iy + self.shift[:, 0]

    @property
    def x(self) -> np.ndarray:
        return self.ix + self.shift[:, 1]

    def shifted(self) -> np.ndarray:
        """(N, s, s) each PSF moved to its source's sub-pixel position (zero-padded Fourier shift)."""
        s = self.psfs.shape[-1]
        p = s // 2
        big = np.pad(self.psfs, ((0, 0), (p, p), (p, p)))
        return fourier_shift(big, self.shift[:, 0], self.shift[:, 1])[:, p : p + s, p : p + s]

    def render(self, shape, pad: int) -> np.ndarray:
        """The model image of all sources (no background), padded by ``pad`` px on every side."""
        s = self.psfs.shape[-1]
        r = s // 2
        h, w = shape
        out = np.zeros((h + 2 * pad, w + 2 * pad))
        moved = self.shifted() * self.amplitude[:, None, None]
        for k in range(len(self)):
            y0, x0 = self.iy[k] - r + pad, self.ix[k] - r + pad
            if -s < y0 < out.shape[0] and -s < x0 < out.shape[1]:
                ya, xa = max(y0, 0), max(x0, 0)
                yb, xb = min(y0 + s, out.shape[0]), min(x0 + s, out.shape[1])
                out[ya:yb, xa:xb] += moved[k, ya - y0 : yb - y0, xa - x0 : xb - x0]
        return out


def _cut(image: np.ndarray, iy: np.ndarray, ix: np.ndarray, size: int, pad: int) -> np.ndarray:
    """(N, size, size) windows of an image already padded by ``pad`` around integer centres."""
    r = size // 2
    off = np.arange(size) - r
    return image[(iy[:, None, None] + pad + off[None, :, None]), (ix[:, None, None] + pad + off[None, None, :])]


def model_sources(image: np.ndarray, noise: float, sources: Sources, sweeps: int = 3) -> Sources:
    """Fit every source's amplitude, offset and sub-pixel position with the others' models subtracted
    (``sweeps`` Jacobi sweeps; the sources are updated in place and returned)."""
    s = sources.psfs.shape[-1]
    pad = s
    padded = np.pad(image, pad, mode="edge")
    for _ in range(sweeps):
        model = sources.render(image.shape, pad)
        own = sources.shifted() * sources.amplitude[:, None, None]
        data = _cut(padded, sources.iy, sources.ix, s, pad) - (_cut(model, sources.iy, sources.ix, s, pad) - own)
        fit = fit_amplitude_shift(sources.psfs, data, sources.shift, np.full(len(sources), noise), iterations=2,
                                  search=False)
        ok = np.isfinite(fit["amplitude"]) & (fit["amplitude"] > 0) & np.all(np.abs(fit["shift"]) < 1.5, axis=1)
        sources.amplitude = np.where(ok, fit["amplitude"], 0.0)
        sources.offset = np.where(ok, fit["offset"], 0.0)
        new = np.where(ok[:, None], fit["shift"], sources.shift)
        # a shift past half a pixel moves the source's integer centre
        step = np.round(new).astype(int)
        sources.iy, sources.ix = sources.iy + step[:, 0], sources.ix + step[:, 1]
        sources.shift = new - step
    return sources


def isolate_windows(image: np.ndarray, sources: Sources, beads: np.ndarray, size: int) -> np.ndarray:
    """(M, size, size) windows of the sources ``beads`` (indices) with every other source's model subtracted,
    centred on each bead's (refined) integer centre."""
    pad = max(size, sources.psfs.shape[-1])
    padded = np.pad(image, pad, mode="edge")
    model = sources.render(image.shape, pad)
    iy, ix = sources.iy[beads], sources.ix[beads]
    one = Sources(sources.y[beads], sources.x[beads], sources.psfs[beads], sources.amplitude[beads])
    # a bead's own model is added back per window: the model of the others is the whole model minus its own
    windows = _cut(padded, iy, ix, size, pad) - _cut(model, iy, ix, size, pad)
    s = one.psfs.shape[-1]
    r, rr = size // 2, s // 2
    moved = one.shifted() * one.amplitude[:, None, None]
    lo, hi = max(r - rr, 0), min(r + rr + 1, size)
    a, b = lo - (r - rr), s - ((r + rr + 1) - hi)
    windows[:, lo:hi, lo:hi] += moved[:, a:b, a:b]
    return windows
