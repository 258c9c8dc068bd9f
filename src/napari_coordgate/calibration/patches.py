"""Per-bead PSF patches, and the fit of a model PSF to each bead.

A bead's *window* is ``psf_size + 2 margin`` pixels square, centred on the pixel nearest the bead's sub-pixel
centre. The ``margin``-wide ring around the central ``psf_size`` square gives the bead's local background (its
median). The *registered patch* is the window minus that background, moved by the sub-pixel remainder of the
centre with a Fourier shift (band-limited interpolation) so the bead sits exactly on the middle pixel, cropped
to ``psf_size`` and divided by its sum (the bead's flux).

:func:`fit_beads` fits a model PSF to each raw window (amplitude, offset and a sub-pixel shift refined by
Gauss-Newton), the same way for every model, so held-out residuals compare models fairly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from napari_coordgate.optics.shift import fourier_shift, shift_phase

if TYPE_CHECKING:  # pragma: no cover
    from napari_coordgate.calibration.detect import BeadTable

__all__ = ["Patches", "window_size", "extract_patches", "fit_beads", "fit_amplitude_shift",
           "xcorr_shift", "centroid", "recentre"]


def centroid(psfs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(dy, dx) of each (N, s, s) PSF's centroid from its middle pixel."""
    n, s, _ = psfs.shape
    c = np.arange(s) - s // 2
    tot = psfs.sum(axis=(1, 2))
    return (psfs.sum(axis=2) @ c) / tot, (psfs.sum(axis=1) @ c) / tot


def recentre(psfs: np.ndarray, iterations: int = 2) -> np.ndarray:
    """(N, s, s) PSFs moved so each centroid sits on the middle pixel (zero-padded Fourier shift)."""
    n, s, _ = psfs.shape
    p = s // 2
    out = psfs
    for _ in range(iterations):
        dy, dx = centroid(out)
        big = np.pad(out, ((0, 0), (p, p), (p, p)))
        out = fourier_shift(big, -dy, -dx)[:, p : p + s, p : p + s]
    return out


@dataclass
class Patches:
    """The beads' windows and registered patches (row ``i`` belongs to bead ``index[i]`` of the table)."""

    index: np.ndarray  # rows of the bead table
    windows: np.ndarray  # (N, s + 2m, s + 2m) raw (hot pixels cleaned), image units
    background: np.ndarray  # (N,) median of the ring
    shift: np.ndarray  # (N, 2) sub-pixel centre minus window centre (dy, dx)
    patches: np.ndarray  # (N, s, s) registered, background-subtracted, unit sum
    flux: np.ndarray  # (N,) sum of the background-subtracted central square
    noise: np.ndarray  # (N,) background noise of the bead's image
    y_norm: np.ndarray
    x_norm: np.ndarray
    psf_size: int
    margin: int

    def core(self) -> np.ndarray:
        """(N, s, s) raw central squares of the windows."""
        m, s = self.margin, self.psf_size
        return self.windows[:, m : m + s, m : m + s]

    def subset(self, sel) -> "Patches":
        return Patches(self.index[sel], self.windows[sel], self.background[sel], self.shift[sel], self.patches[sel],
                       self.flux[sel], self.noise[sel], self.y_norm[sel], self.x_norm[sel], self.psf_size,
                       self.margin)

    def __len__(self) -> int:
        return int(self.index.size)


def extract_patches(images: list[np.ndarray], noises: list[float], image_of: np.ndarray, ys: np.ndarray,
                    xs: np.ndarray, y_norm: np.ndarray, x_norm: np.ndarray, index: np.ndarray, psf_size: int,
                    margin: int, windows: np.ndarray | None = None) -> Patches:
    """Cut, background-subtract, register and normalise the patches of beads whose windows fit in the frame.

    ``windows``: the beads' (N, s + 2m, s + 2m) windows centred on their nearest pixels, already cut (e.g. with
    their neighbours' light removed, :func:`~napari_coordgate.calibration.crowd.isolate_windows`)."""
    s, m = psf_size, margin
    size = s + 2 * m
    r = size // 2
    iy, ix = np.round(ys).astype(int), np.round(xs).astype(int)
    off = np.arange(size) - r
    if windows is None:
        windows = np.empty((ys.size, size, size))
        for k, img in enumerate(images):
            sel = np.flatnonzero(image_of == k)
            if sel.size:
                windows[sel] = img[(iy[sel, None, None] + off[None, :, None]),
                                   (ix[sel, None, None] + off[None, None, :])]
    ring = np.ones((size, size), bool)
    ring[m : m + s, m : m + s] = False
    background = np.median(windows[:, ring], axis=1)
    shift = np.stack([ys - iy, xs - ix], axis=1)
    sub = windows - background[:, None, None]
    moved = fourier_shift(sub, -shift[:, 0], -shift[:, 1])[:, m : m + s, m : m + s]
    flux = moved.sum(axis=(1, 2))
    patches = moved / np.where(flux > 0, flux, np.nan)[:, None, None]
    noise = np.asarray(noises, dtype=np.float64)[image_of]
    return Patches(np.asarray(index), windows, background, shift, patches, flux, noise, np.asarray(y_norm),
                   np.asarray(x_norm), s, m)


def xcorr_shift(psfs: np.ndarray, data: np.ndarray, radius: int = 3) -> np.ndarray:
    """(N, 2) shift (dy, dx) that best moves each model PSF onto its data square: the peak of their
    cross-correlation within ``radius`` pixels (background removed by the mean), refined by a parabola."""
    n, s, _ = psfs.shape
    d = data - data.mean(axis=(1, 2), keepdims=True)
    m = psfs - psfs.mean(axis=(1, 2), keepdims=True)
    size = 2 * s
    corr = np.fft.irfft2(np.fft.rfft2(d, (size, size)) * np.conj(np.fft.rfft2(m, (size, size))), (size, size))
    lags = np.arange(-radius, radius + 1)
    win = corr[:, lags[:, None] % size, lags[None, :] % size]  # (N, 2r+1, 2r+1), lag (dy, dx)
    flat = win.reshape(n, -1).argmax(axis=1)
    iy, ix = np.unravel_index(flat, win.shape[1:])
    iy = np.clip(iy, 1, 2 * radius - 1)
    ix = np.clip(ix, 1, 2 * radius - 1)
    rows = np.arange(n)

    def vertex(a, b, c):
        den = a - 2 * b + c
        return np.where(den < 0, 0.5 * (a - c) / np.where(den < 0, den, -1), 0.0)

    dy = lags[iy] + np.clip(vertex(win[rows, iy - 1, ix], win[rows, iy, ix], win[rows, iy + 1, ix]), -0.5, 0.5)
    dx = lags[ix] + np.clip(vertex(win[rows, iy, ix - 1], win[rows, iy, ix], win[rows, iy, ix + 1]), -0.5, 0.5)
    return np.stack([dy, dx], axis=1)


def fit_beads(psfs: np.ndarray, patches: Patches, iterations: int = 3, search: bool = True) -> dict[str, np.ndarray]:
    """Fit ``amplitude * PSF(shifted) + offset`` to each bead's raw central square.

    Parameters
    ----------
    psfs
        (N, s, s) model PSFs at the beads' positions, centred on their middle pixel.
    patches
        The beads (their raw windows, sub-pixel centres and noise).
    iterations
        Gauss-Newton refinements of the sub-pixel shift.
    search
        Start the shift from the cross-correlation peak (:func:`xcorr_shift`; a model whose centre convention
        differs from the detector's, e.g. a comatic pupil PSF, can sit a pixel or more away) instead of the
        detected centre.

    Returns
    -------
    dict
        ``chi2`` (sum of squared residuals over noise², per bead), ``relative`` (residual norm / model signal
        norm), ``amplitude``, ``offset``, ``shift`` ((N, 2) px).
    """
    return fit_amplitude_shift(psfs, patches.core(), patches.shift, patches.noise, iterations, search)


def fit_amplitude_shift(psfs: np.ndarray, data: np.ndarray, shift0: np.ndarray, noise: np.ndarray,
                        iterations: int = 3, search: bool = True) -> dict[str, np.ndarray]:
    """:func:`fit_beads` on plain arrays: (N, s, s) PSFs and data squares, (N, 2) starting shifts, (N,) noise."""
    n, s, _ = psfs.shape
    p = s // 2
    data = data.reshape(n, -1)
    shift = np.asarray(shift0, dtype=np.float64).copy()
    if search:
        found = xcorr_shift(psfs, data.reshape(n, s, s))
        shift = np.where(np.isfinite(found), found, shift)
    big = np.pad(psfs, ((0, 0), (p, p), (p, p)))
    ky = np.fft.fftfreq(big.shape[1])[None, :, None]  # for the derivatives of the shift's phase
    kx = np.fft.fftfreq(big.shape[2])[None, None, :]
    spec = np.fft.fft2(big)
    ones = np.ones((n, s * s))
    for it in range(iterations + 1):
        f = spec * shift_phase(big.shape[1:], shift[:, 0], shift[:, 1])
        model = np.fft.ifft2(f).real[:, p : p + s, p : p + s].reshape(n, -1)
        if it == iterations:
            basis = np.stack([model, ones], axis=2)
        else:
            gy = np.fft.ifft2(f * (-2j * np.pi * ky)).real[:, p : p + s, p : p + s].reshape(n, -1)
            gx = np.fft.ifft2(f * (-2j * np.pi * kx)).real[:, p : p + s, p : p + s].reshape(n, -1)
            basis = np.stack([model, ones, gy, gx], axis=2)
        ata = np.einsum("npi,npj->nij", basis, basis)
        atb = np.einsum("npi,np->ni", basis, data)
        sol = np.linalg.solve(ata + 1e-12 * np.eye(basis.shape[2]), atb[..., None])[..., 0]
        if it < iterations:
            amp = sol[:, 0]
            # gy, gx are d(model)/d(shift) (minus the image gradient): their coefficients are amplitude x step
            step = sol[:, 2:4] / np.where(np.abs(amp) > 0, amp, np.inf)[:, None]
            shift = shift + np.clip(step, -0.5, 0.5)
    amp, off = sol[:, 0], sol[:, 1]
    fitted = model * amp[:, None] + off[:, None]
    resid = data - fitted
    sq = np.sum(resid**2, axis=1)
    signal = np.linalg.norm(model * amp[:, None], axis=1)
    return {"chi2": sq / np.asarray(noise) ** 2, "relative": np.sqrt(sq) / np.maximum(signal, 1e-30),
            "amplitude": amp, "offset": off, "shift": shift}


def _odd(n: float) -> int:
    n = int(math.ceil(n))
    return n + 1 - n % 2


def window_size(table: "BeadTable", cleaned: list[np.ndarray], limit: int, optics: dict | None, margin: int) -> int:
    """PSF side (odd) that holds the measurable light of the widest beads.

    The widest beads' windows (as large as the frame allows, up to 61 px) are background-subtracted, scaled by
    their core's light and median-stacked (the median ignores the neighbours that wander into large windows);
    the radius where the stack's azimuthal mean sinks into its noise sets the size (plus a pixel of margin). At
    least the Airy pattern's first rings when the optics are known, at least 11 px, at most 51 px.
    """
    ok = table.accepted
    major = np.fmax(table.fwhm_x, table.fwhm_y)
    floor = 11
    if optics is not None:
        airy = 1.2 * optics["wavelength_um"] / optics["na"] / optics["pixel_size_um"]
        floor = max(floor, _odd(2 * math.ceil(2.0 * airy) + 1))
    big = int(min(61, limit + 2 * margin, 2 * (min(cleaned[0].shape) // 4) + 1))
    big -= 1 - big % 2
    half = big // 2
    cand = np.flatnonzero(ok & np.isfinite(major) & (table.snr >= 20))
    inside = [i for i in cand if half <= round(table.y[i]) < cleaned[table.image[i]].shape[0] - half
              and half <= round(table.x[i]) < cleaned[table.image[i]].shape[1] - half]
    if len(inside) < 5:
        sigma = float(np.nanpercentile(major[ok], 90)) / 2.3548 if ok.any() else 1.5
        return int(np.clip(_odd(2 * math.ceil(5.0 * sigma) + 1), floor, max(floor, min(51, limit))))
    inside = np.array(inside)
    wide = inside[np.argsort(-major[inside])][: max(5, min(40, int(0.4 * inside.size)))]
    off = np.arange(big) - half
    yy, xx = np.meshgrid(off, off, indexing="ij")
    rr = np.hypot(yy, xx)
    ring = rr >= half - 2
    stack = []
    for i in wide:
        img = cleaned[table.image[i]]
        cy, cx = int(round(table.y[i])), int(round(table.x[i]))
        win = img[cy - half : cy + half + 1, cx - half : cx + half + 1]
        win = win - np.median(win[ring])
        core = win[rr <= max(3.0, major[i])].sum()
        if core > 0:
            stack.append(win / core)
    if len(stack) < 5:
        return int(np.clip(floor, floor, max(floor, min(51, limit))))
    med = np.median(np.stack(stack), axis=0)
    med = med - np.mean(med[(rr >= half - 8) & ~ring])  # the stack's residual floor (background estimate bias)
    # the radius where the stack's azimuthal mean sinks into its own noise (two radii in a row below 2 sigma)
    outer = med[(rr >= half - 8) & ~ring]
    sigma = 1.4826 * float(np.median(np.abs(outer - np.median(outer))))
    radius = 3
    below = 0
    for r in range(1, half - 8):
        shell = (rr >= r - 0.5) & (rr < r + 0.5)
        if med[shell].mean() > 2.0 * sigma / math.sqrt(shell.sum()):
            radius, below = r, 0
        else:
            below += 1
            if below >= 2:
                break
    return int(np.clip(_odd(2 * radius + 3), floor, max(floor, min(51, limit))))
