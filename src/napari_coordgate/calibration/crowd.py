"""Crowded slides and point arrays: each bead's window with its neighbours' light modelled and removed.

On a real slide many beads lie within a PSF window of another, and on a point array (pinholes, nanoholes,
focal-spot arrays) every spot does. Rejecting them wastes most of the light; cutting their windows as they are
puts the neighbours' light into the PSF. Instead every source in the image (accepted beads and every other real
spot: rejected ones too, since their light is there) is modelled as amplitude x the current PSF model at its
place, with a sub-pixel position, and the model of all *other* sources is subtracted from each bead's window
before its patch is cut (as crowded-field photometry does):

1. the current model's PSF at each source, as its bead images it (:func:`~napari_coordgate.optics.bead.blur_by_bead`);
2. a few sweeps: all amplitudes by one sparse least-squares fit, then each source's sub-pixel position fitted to
   its central square with every other source's model subtracted; spots the detection merged with a neighbour
   are found in the residual (:func:`find_missed`) and kept when the joint fit confirms them;
3. the beads' windows with the other sources' models subtracted.

The caller refits the PSF model from those windows and repeats. Sources too close to be told apart (a clump) and
sources whose model cannot be trusted (saturated, too large) are not for this module: their neighbours are
rejected before (:func:`~napari_coordgate.calibration.detect.reject_by_window`).
"""

from __future__ import annotations

import numpy as np

from napari_coordgate.calibration.patches import fit_amplitude_shift
from napari_coordgate.optics.shift import fourier_shift

__all__ = ["Sources", "model_sources", "isolate_windows", "find_missed", "psf_fwhm", "recentre_on_rest",
           "likeness"]


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
    """Fit every source's amplitude and sub-pixel position, the others' light included.

    Each sweep solves all amplitudes at once, by linear least squares of the image minus its smooth background
    over every pixel a source reaches (sparse: each source covers its PSF's square), then moves each source's
    centre by a Gauss-Newton step fitted with the others' models subtracted. Jointly solved amplitudes do not
    oscillate between touching neighbours as one-at-a-time fits do. Sources are updated in place and returned;
    a source the image gives no light ends with amplitude 0.
    """
    from napari_coordgate.calibration.detect import background_map

    s = sources.psfs.shape[-1]
    pad = s
    flat = image - background_map(image)
    padded = np.pad(flat, pad, mode="edge")
    for _ in range(sweeps):
        _solve_amplitudes(padded, sources, pad)
        model = sources.render(image.shape, pad)
        own = sources.shifted() * sources.amplitude[:, None, None]
        data = _cut(padded, sources.iy, sources.ix, s, pad) - (_cut(model, sources.iy, sources.ix, s, pad) - own)
        fit = fit_amplitude_shift(sources.psfs, data, sources.shift, np.full(len(sources), noise), iterations=2,
                                  search=False)
        ok = np.isfinite(fit["amplitude"]) & (fit["amplitude"] > 0) & np.all(np.abs(fit["shift"]) < 1.5, axis=1)
        step = np.clip(np.where(ok[:, None], fit["shift"], sources.shift) - sources.shift, -0.5, 0.5)
        new = sources.shift + step
        # a shift past half a pixel moves the source's integer centre
        whole = np.round(new).astype(int)
        sources.iy, sources.ix = sources.iy + whole[:, 0], sources.ix + whole[:, 1]
        sources.shift = new - whole
    _solve_amplitudes(padded, sources, pad)
    return sources


def _solve_amplitudes(padded: np.ndarray, sources: Sources, pad: int) -> None:
    """All amplitudes (and one constant) by sparse least squares; negative ones are set to 0 and re-solved
    without those sources."""
    from scipy import sparse
    from scipy.sparse.linalg import spsolve

    n = len(sources)
    if n == 0:
        return
    s = sources.psfs.shape[-1]
    r = s // 2
    hh, ww = padded.shape
    moved = sources.shifted()
    off = np.arange(s) - r
    py = (sources.iy[:, None, None] + pad + off[None, :, None]) + np.zeros((1, 1, s), int)
    px = (sources.ix[:, None, None] + pad + off[None, None, :]) + np.zeros((1, s, 1), int)
    inside = (py >= 0) & (py < hh) & (px >= 0) & (px < ww)
    pix = np.where(inside, py * ww + px, 0)
    cols = np.broadcast_to(np.arange(n)[:, None, None], pix.shape)
    used, inv = np.unique(pix[inside], return_inverse=True)
    a = sparse.csr_matrix((moved[inside], (inv, cols[inside])), shape=(used.size, n))
    b = padded.ravel()[used]
    active = np.ones(n, bool)
    amp = np.zeros(n)
    for _ in range(3):
        # normal equations: sparse (sources overlap only their neighbours), plus one dense row for the constant
        sub = sparse.hstack([a[:, active], np.ones((used.size, 1))]).tocsc()
        ata = (sub.T @ sub).tocsc()
        ata = ata + sparse.identity(ata.shape[0], format="csc") * (1e-9 * ata.diagonal().max())
        sol = np.atleast_1d(spsolve(ata, sub.T @ b))
        amp[:] = 0.0
        amp[active] = sol[:-1]
        neg = active & (amp <= 0)
        if not neg.any():
            break
        active &= ~neg
        amp[neg] = 0.0
    sources.amplitude = np.maximum(amp, 0.0)
    sources.offset = np.zeros(n)


def isolate_windows(image: np.ndarray, sources: Sources, beads: np.ndarray, size: int, noise: float | None = None
                    ) -> np.ndarray:
    """(M, size, size) windows of the sources ``beads`` (indices) with every other source's model subtracted,
    centred on each bead's (refined) integer centre.

    With ``noise`` (the image's per-pixel noise), pixels where the others' modelled light is above twice the noise
    and above the bead's own are masked: they hold the bead's own model on the window's background instead (what
    is left there after the subtraction is mostly the error of the neighbours' model, which would count as the
    bead's misfit and bend its PSF)."""
    pad = max(size, sources.psfs.shape[-1])
    padded = np.pad(image, pad, mode="edge")
    model = sources.render(image.shape, pad)
    iy, ix = sources.iy[beads], sources.ix[beads]
    one = Sources(sources.y[beads], sources.x[beads], sources.psfs[beads], sources.amplitude[beads])
    # a bead's own model is added back per window: the model of the others is the whole model minus its own
    modelled = _cut(model, iy, ix, size, pad)
    windows = _cut(padded, iy, ix, size, pad) - modelled
    s = one.psfs.shape[-1]
    r, rr = size // 2, s // 2
    own = np.zeros_like(windows)
    lo, hi = max(r - rr, 0), min(r + rr + 1, size)
    a, b = lo - (r - rr), s - ((r + rr + 1) - hi)
    own[:, lo:hi, lo:hi] = (one.shifted() * one.amplitude[:, None, None])[:, a:b, a:b]
    windows += own
    if noise is not None:
        others = modelled - own
        masked = (others > 2.0 * noise) & (others > own)
        if masked.any():
            ring = np.ones((size, size), bool)
            ring[2:-2, 2:-2] = False
            background = np.median(np.where(masked, np.nan, windows)[:, ring], axis=1)
            background = np.where(np.isfinite(background), background, np.nanmedian(windows, axis=(1, 2)))
            windows = np.where(masked, own + background[:, None, None], windows)
    return windows


def find_missed(image: np.ndarray, model: np.ndarray, noise: float, sigma: float, known: np.ndarray, *,
                z: float = 6.0, contrast: float = 0.3) -> np.ndarray:
    """(M, 2) integer (y, x) of sources the model lacks: significant peaks of the residual ``image - model``.

    Two beads closer than about two PSF widths are often found as one spot; once that spot is modelled (and has
    moved onto the brighter of the two), the second bead stands out in the residual, as crowded-field photometry
    finds faint companions. A peak of the residual smoothed at ``sigma`` (px, the PSF's) counts when it is ``z``
    times the smoothed noise above the residual's own smooth background, at least ``contrast`` times the
    smoothed model there (a model that is a little off around a bright bead is not a new source), and further
    than ``2 sigma`` (0.85 FWHM) from every ``known`` (N, 2) source: a slightly misplaced model leaves a lobe of
    residual about a pixel from its centre, which is not a bead, while a companion closer than that would be a
    clump anyway.
    """
    from scipy import ndimage
    from scipy.spatial import cKDTree
    from skimage.feature import peak_local_max

    from napari_coordgate.calibration.detect import background_map

    resid = image - model
    resid = resid - background_map(resid)
    sm = ndimage.gaussian_filter(resid, sigma, mode="nearest")
    msm = ndimage.gaussian_filter(model, sigma, mode="nearest")
    level = noise / (2.0 * np.sqrt(np.pi) * sigma)  # white noise after a unit-sum Gaussian of width sigma
    peaks = peak_local_max(sm, min_distance=max(1, int(round(sigma))), threshold_abs=z * level,
                           exclude_border=False)
    if peaks.size == 0:
        return np.zeros((0, 2), int)
    keep = sm[peaks[:, 0], peaks[:, 1]] > contrast * msm[peaks[:, 0], peaks[:, 1]]
    if known.size:
        d, _ = cKDTree(known).query(peaks.astype(float))
        keep &= d > max(1.5, 2.0 * sigma)
    return peaks[keep]


def psf_fwhm(psfs: np.ndarray, upsample: int = 4) -> np.ndarray:
    """(N,) FWHM (px) of (N, s, s) PSFs: the diameter of the disc whose area is that above half the peak, measured
    on a ``upsample`` x finer bilinear grid (a 2 px PSF covers only a few pixels)."""
    from scipy import ndimage

    out = np.empty(len(psfs))
    for k, p in enumerate(psfs):
        fine = ndimage.zoom(p, upsample, order=1)
        area = float((fine >= 0.5 * fine.max()).sum()) / upsample**2
        out[k] = 2.0 * np.sqrt(area / np.pi)
    return out


def recentre_on_rest(image: np.ndarray, sources: Sources, which: np.ndarray, sigma: float, radius: float) -> None:
    """Move the sources ``which`` (indices) to the brightest point, within ``radius`` px, of the image with every
    other source's model removed (smoothed at ``sigma`` px): a spot first detected between two beads sits on
    the one left once its neighbour, found later, is modelled. In place; sub-pixel positions are fitted after."""
    from scipy import ndimage

    if len(which) == 0:
        return
    s = sources.psfs.shape[-1]
    pad = s
    h = s // 2
    r = max(h, int(np.ceil(radius)) + int(np.ceil(3 * sigma)) + 1)
    size = 2 * r + 1
    padded = np.pad(image, pad + size, mode="edge")
    model = np.pad(sources.render(image.shape, pad), size)
    own = sources.shifted() * sources.amplitude[:, None, None]
    off = np.arange(size) - r
    yy, xx = np.meshgrid(off, off, indexing="ij")
    disc = np.hypot(yy, xx) <= radius
    for k in which:
        cy, cx = sources.iy[k] + pad + size, sources.ix[k] + pad + size
        rest = padded[cy - r : cy + r + 1, cx - r : cx + r + 1] - model[cy - r : cy + r + 1, cx - r : cx + r + 1]
        rest[r - h : r + h + 1, r - h : r + h + 1] += own[k]
        sm = ndimage.gaussian_filter(rest, sigma, mode="nearest")
        j = np.argmax(np.where(disc, sm, -np.inf))
        sources.iy[k] += int(yy.ravel()[j])
        sources.ix[k] += int(xx.ravel()[j])
        sources.shift[k] = 0.0


def likeness(image: np.ndarray, sources: Sources, which: np.ndarray, radius: float) -> np.ndarray:
    """(M,) correlation, within ``radius`` px of each source ``which``, between the image with every other
    source's model removed and the source's own PSF: near 1 for a bead, low for the structured remainder a
    slightly wrong model leaves in a bright neighbour's halo."""
    s = sources.psfs.shape[-1]
    pad = s
    padded = np.pad(image, pad, mode="edge")
    model = sources.render(image.shape, pad)
    own = sources.shifted() * sources.amplitude[:, None, None]
    iy, ix = sources.iy[which], sources.ix[which]
    data = _cut(padded, iy, ix, s, pad) - (_cut(model, iy, ix, s, pad) - own[which])
    psf = sources.shifted()[which]
    off = np.arange(s) - s // 2
    disc = np.hypot(off[:, None], off[None, :]) <= radius
    d = data[:, disc] - data[:, disc].mean(axis=1, keepdims=True)
    m = psf[:, disc] - psf[:, disc].mean(axis=1, keepdims=True)
    return np.sum(d * m, axis=1) / np.maximum(np.linalg.norm(d, axis=1) * np.linalg.norm(m, axis=1), 1e-30)


def evidence(image: np.ndarray, noise: float, sources: Sources, which: np.ndarray, sweeps: int = 3) -> np.ndarray:
    """(M,) how much worse each source ``which`` leaves its PSF's square explained when it is taken out: the
    increase of the chi-square over that square (in units of the noise variance), the sources around it fitted
    again (amplitudes and positions, :func:`model_sources`, on a crop of twice the square) with and without it,
    the light of those further away removed as modelled. A bead stands far above the noise (a 5-sigma peak:
    hundreds); a spot the detection put between two beads, whose light the two explain once they move, does
    not."""
    from napari_coordgate.calibration.detect import background_map

    s = sources.psfs.shape[-1]
    r, c = s // 2, 2 * s + 1
    flat = np.pad(image - background_map(image), 2 * s, mode="edge")
    model = sources.render(image.shape, 2 * s)
    out = np.zeros(len(which))
    for n, k in enumerate(np.asarray(which, int)):
        y0, x0 = sources.iy[k] - s, sources.ix[k] - s  # the crop's corner, image pixels
        near = np.flatnonzero((np.abs(sources.iy - sources.iy[k]) <= s) & (np.abs(sources.ix - sources.ix[k]) <= s))

        def subset(rows: np.ndarray) -> Sources:
            return Sources(sources.y[rows] - y0, sources.x[rows] - x0, sources.psfs[rows], sources.amplitude[rows])

        ys, xs = slice(y0 + 2 * s, y0 + 2 * s + c), slice(x0 + 2 * s, x0 + 2 * s + c)
        data = flat[ys, xs] - model[ys, xs] + subset(near).render((c, c), 0)
        chi = []
        for rows in (near, near[near != k]):
            fitted = model_sources(data, noise, subset(rows), sweeps=sweeps)
            res = data - background_map(data) - fitted.render((c, c), 0)
            res = res - res.mean()
            chi.append(float(np.sum(res[s - r : s + r + 1, s - r : s + r + 1] ** 2)))
        out[n] = (chi[1] - chi[0]) / max(noise, 1e-30) ** 2
    return out
