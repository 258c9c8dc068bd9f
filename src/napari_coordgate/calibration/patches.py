"""Per-bead PSF patches, and the fit of a model PSF to each bead.

A bead's *window* is ``support + 2 margin`` pixels square, centred on the pixel nearest the bead's sub-pixel centre,
where ``support`` (odd) is the side its PSF needs at its place in the field
(:func:`~napari_coordgate.calibration.windows.window_sizes`: a PSF five times wider in the corners than in the
centre needs larger windows there, and a small one in the centre keeps its neighbours and the frame edge out). The
``margin``-wide ring around the central ``support`` square gives the bead's local background (its median). The
*registered patch* is the window minus that background, moved by the sub-pixel remainder of the centre with a
Fourier shift (band-limited interpolation) so the bead sits exactly on the middle pixel, cropped to ``support`` and
divided by its light in the smallest window of the set (its sum, the bead's flux, where all windows are one size).
Every bead's arrays are held at the largest side (``psf_size``), zero beyond its own support; :meth:`Patches.mask`
says which pixels are its own, and every fit weighs only those.

:func:`fit_beads` fits a model PSF to each raw window (amplitude, offset and a sub-pixel shift refined by
Gauss-Newton), the same way for every model, so held-out residuals compare models fairly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from napari_coordgate.optics.shift import fourier_shift, shift_phase

__all__ = ["Patches", "support_masks", "extract_patches", "fit_beads", "fit_amplitude_shift", "xcorr_shift",
           "centroid", "recentre"]


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
    psf_size: int  # the largest support: the side of every array
    margin: int
    support: np.ndarray | None = None  # (N,) odd side of each bead's own square (None: psf_size for all)

    def __post_init__(self) -> None:
        if self.support is None:
            self.support = np.full(self.index.size, self.psf_size, dtype=int)
        self.support = np.asarray(self.support, dtype=int)

    @property
    def uniform(self) -> bool:
        """Whether every bead's support is the whole ``psf_size`` square."""
        return bool(np.all(self.support == self.psf_size))

    def mask(self) -> np.ndarray:
        """(N, s, s) booleans: the pixels of each bead's own support square (centred in the ``psf_size`` one)."""
        return support_masks(self.support, self.psf_size)

    def core(self) -> np.ndarray:
        """(N, s, s) raw central squares of the windows, zero beyond each bead's support (the fits weigh only
        :meth:`mask`'s pixels)."""
        m, s = self.margin, self.psf_size
        core = self.windows[:, m : m + s, m : m + s]
        return core if self.uniform else np.where(self.mask(), core, 0.0)

    def core_within(self, sides: np.ndarray, missing: float = np.nan) -> np.ndarray:
        """(N, S, S) raw central squares of side S = the largest of ``sides`` (N,), ``missing`` beyond each bead's
        own ``sides[i]`` (or its support, where smaller): the data of a fit whose model carries its own halo and
        needs only the pixels where a bead's light stands out."""
        sides = np.minimum(np.asarray(sides, dtype=int), self.support)
        side = int(sides.max())
        lo = self.margin + (self.psf_size - side) // 2
        core = self.windows[:, lo : lo + side, lo : lo + side]
        return np.where(support_masks(sides, side), core, missing)

    def subset(self, sel) -> "Patches":
        return Patches(self.index[sel], self.windows[sel], self.background[sel], self.shift[sel], self.patches[sel],
                       self.flux[sel], self.noise[sel], self.y_norm[sel], self.x_norm[sel], self.psf_size,
                       self.margin, self.support[sel])

    def __len__(self) -> int:
        return int(self.index.size)


def support_masks(support: np.ndarray, size: int) -> np.ndarray:
    """(N, size, size) booleans: each row's centred square of side ``support[i]`` (odd, at most ``size``)."""
    c = np.abs(np.arange(size) - size // 2)
    cheb = np.maximum(c[:, None], c[None, :])
    return cheb[None] <= (np.asarray(support, dtype=int) // 2)[:, None, None]


def extract_patches(images: list[np.ndarray], noises: list[float], image_of: np.ndarray, ys: np.ndarray,
                    xs: np.ndarray, y_norm: np.ndarray, x_norm: np.ndarray, index: np.ndarray, psf_size: int,
                    margin: int, windows: np.ndarray | None = None, support: np.ndarray | None = None) -> Patches:
    """Cut, background-subtract, register and normalise the patches of beads whose windows fit in the frame.

    ``support``: (N,) odd side of each bead's own square (at most ``psf_size``, the side of the arrays; default
    ``psf_size`` for all): its background ring lies just outside it, and its patch is zero beyond it.
    ``windows``: the beads' (N, psf_size + 2m, psf_size + 2m) windows centred on their nearest pixels, already cut
    (e.g. with their neighbours' light removed, :func:`~napari_coordgate.calibration.crowd.isolate_windows`)."""
    s, m = psf_size, margin
    size = s + 2 * m
    r = size // 2
    sup = np.full(ys.size, s, dtype=int) if support is None else np.asarray(support, dtype=int)
    iy, ix = np.round(ys).astype(int), np.round(xs).astype(int)
    off = np.arange(size) - r
    if windows is None:
        windows = np.zeros((ys.size, size, size))
        for k, img in enumerate(images):
            sel = np.flatnonzero(image_of == k)
            if sel.size:  # a bead's own window is inside the frame; the rest of a larger square may not be
                padded = np.pad(img, r)
                windows[sel] = padded[(iy[sel, None, None] + r + off[None, :, None]),
                                      (ix[sel, None, None] + r + off[None, None, :])]
    windows = np.where(support_masks(sup + 2 * m, size), windows, 0.0)
    c = np.abs(off)
    cheb = np.maximum(c[:, None], c[None, :])
    background = np.empty(ys.size)
    for u in np.unique(sup):
        rows = np.flatnonzero(sup == u)
        ring = (cheb > u // 2) & (cheb <= u // 2 + m)
        background[rows] = np.median(windows[rows][:, ring], axis=1)
    shift = np.stack([ys - iy, xs - ix], axis=1)
    # the ring moves with the bead (as it always has): a zero edge right at the support would ring in the shift
    sub = np.where(support_masks(sup + 2 * m, size), windows - background[:, None, None], 0.0)
    moved = fourier_shift(sub, -shift[:, 0], -shift[:, 1])[:, m : m + s, m : m + s]
    moved = np.where(support_masks(sup, s), moved, 0.0)
    flux = moved.sum(axis=(1, 2))
    # each patch divided by its light in the smallest window of the set: the same measure for every bead (a bead's
    # own window would count the wings of some and not of others, and scale them apart); with one window, its flux
    norm = flux
    if np.any(sup != sup.min()):
        lo = (s - int(sup.min())) // 2
        norm = moved[:, lo : s - lo, lo : s - lo].sum(axis=(1, 2))
    patches = moved / np.where((flux > 0) & (norm > 0), norm, np.nan)[:, None, None]
    noise = np.asarray(noises, dtype=np.float64)[image_of]
    return Patches(np.asarray(index), windows, background, shift, patches, flux, noise, np.asarray(y_norm),
                   np.asarray(x_norm), s, m, sup)


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
        ``chi2`` (sum of squared residuals over noise², per bead, over its own support), ``relative`` (residual
        norm / model signal norm), ``amplitude``, ``offset``, ``shift`` ((N, 2) px), ``pixels`` (each bead's).
    """
    mask = None if patches.uniform else patches.mask()
    return fit_amplitude_shift(psfs, patches.core(), patches.shift, patches.noise, iterations, search, mask)


def fit_amplitude_shift(psfs: np.ndarray, data: np.ndarray, shift0: np.ndarray, noise: np.ndarray,
                        iterations: int = 3, search: bool = True, mask: np.ndarray | None = None
                        ) -> dict[str, np.ndarray]:
    """:func:`fit_beads` on plain arrays: (N, s, s) PSFs and data squares, (N, 2) starting shifts, (N,) noise;
    ``mask`` (N, s, s), where given, the pixels each bead's fit weighs (the rest are not its data)."""
    n, s, _ = psfs.shape
    p = s // 2
    data = data.reshape(n, -1)
    if mask is None and not np.all(np.isfinite(data)):  # NaN: beyond the bead's window, not its data
        mask = np.isfinite(data)
        data = np.where(mask, data, 0.0)
    wpx = np.ones((n, s * s)) if mask is None else np.asarray(mask, dtype=np.float64).reshape(n, -1)
    shift = np.asarray(shift0, dtype=np.float64).copy()
    if search:
        seen = data
        if mask is not None:  # a bead's pixels only, about their own mean
            seen = (data - (data * wpx).sum(axis=1, keepdims=True) / wpx.sum(axis=1, keepdims=True)) * wpx
        found = xcorr_shift(psfs, seen.reshape(n, s, s))
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
        wb = basis if mask is None else basis * wpx[:, :, None]
        ata = np.einsum("npi,npj->nij", wb, basis)
        atb = np.einsum("npi,np->ni", wb, data)
        sol = np.linalg.solve(ata + 1e-12 * np.eye(basis.shape[2]), atb[..., None])[..., 0]
        if it < iterations:
            amp = sol[:, 0]
            # gy, gx are d(model)/d(shift) (minus the image gradient): their coefficients are amplitude x step
            step = sol[:, 2:4] / np.where(np.abs(amp) > 0, amp, np.inf)[:, None]
            shift = shift + np.clip(step, -0.5, 0.5)
    amp, off = sol[:, 0], sol[:, 1]
    fitted = model * amp[:, None] + off[:, None]
    resid = data - fitted
    sq = np.sum(wpx * resid**2, axis=1)
    signal = np.linalg.norm(wpx * model * amp[:, None], axis=1)
    return {"chi2": sq / np.asarray(noise) ** 2, "relative": np.sqrt(sq) / np.maximum(signal, 1e-30),
            "amplitude": amp, "offset": off, "shift": shift, "pixels": wpx.sum(axis=1)}
