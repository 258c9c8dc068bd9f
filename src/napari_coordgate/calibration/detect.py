"""Bead detection in a 2-D focal-plane image: candidates, sub-pixel centres, widths, and why beads are rejected.

Steps, for one image:

1. noise: a robust standard deviation of the image's pixel-to-pixel differences (beads are sparse, so this is
   the background noise);
2. a smooth background map (medians of blocks, interpolated), used for thresholds only (each bead later gets its
   own background from a ring around it);
3. hot pixels: single pixels far above the background whose eight neighbours are not (a real PSF sampled at
   about Nyquist or finer puts a good part of its peak into its neighbours); they become rows with reason
   ``"hot pixel"`` and are replaced by the median of their neighbours in the image the beads are measured on;
4. candidates: local maxima of a scale-normalised Laplacian-of-Gaussian scale space (σ from 1 to about 8 px),
   significance measured against each scale's own robust noise;
5. sub-pixel refinement: a least-squares fit of an elliptical Gaussian plus a constant to a small window
   (batched Levenberg-Marquardt), which also gives FWHM along x and y, ellipticity and orientation;
6. rejections that need only the candidate: saturated, fit failed / narrower than a pixel (a hot pixel the
   first test missed), too faint (peak below ``min_snr`` times the noise). Edge clipping and neighbours depend on
   the PSF window, decided later (:func:`reject_by_window`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

import numpy as np
from scipy import ndimage

from napari_coordgate.coords import field_position

__all__ = ["BeadTable", "REASONS", "robust_noise", "background_map", "find_beads", "reject_by_window",
           "saturation_level"]

FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))

#: rejection reasons (the ``reason`` column) and what they mean
REASONS = {
    "hot pixel": "a single-pixel spike (camera defect or cosmic ray), not a bead",
    "saturated": "pixels at the camera's maximum: the peak is clipped, the PSF shape is wrong",
    "edge": "clipped by the frame edge: the PSF window does not fit in the image",
    "too close": "a saturated or too large spot (whose light cannot be modelled) reaches into the PSF window",
    "clump": "touching beads: a neighbour closer than a PSF width, the two cannot be told apart",
    "too faint": "peak below the SNR threshold: too noisy to help",
    "fit failed": "not bead-like: the Gaussian fit did not converge to a compact spot",
    "too large": "wider than the PSF window: an aggregate or debris, not a single bead",
    "outlier": "its PSF disagrees with the beads around it (a pair of touching beads, debris)",
}


@dataclass
class BeadTable:
    """One row per detected spot (accepted or rejected), as columns.

    Positions are in pixels of the image (``y`` rows, ``x`` columns, sub-pixel) and in normalised field
    coordinates (``y_norm``, ``x_norm`` in [-1, 1], the network's convention). ``peak`` and ``background`` are
    in image units; ``snr`` = peak / noise. FWHM (px) along x and y, ellipticity ``1 - minor / major`` and
    orientation of the major axis (degrees from the +x axis towards +y, i.e. clockwise on screen, in (-90, 90])
    come from the elliptical Gaussian fit (not corrected for the pixel's own width). ``reason`` is ``""`` for
    accepted beads, else a key of :data:`REASONS`; ``detail`` says more. ``held_out`` marks beads kept out of
    the fits to compare the models; ``holdout`` marks the beads kept out of every fit (``calibrate(holdout=F)``)
    to check the final model without ground truth; ``residual`` is the bead's relative L2 misfit to the chosen
    model (noise included; NaN for rejected beads).
    """

    image: np.ndarray = field(default_factory=lambda: np.zeros(0, int))
    y: np.ndarray = field(default_factory=lambda: np.zeros(0))
    x: np.ndarray = field(default_factory=lambda: np.zeros(0))
    y_norm: np.ndarray = field(default_factory=lambda: np.zeros(0))
    x_norm: np.ndarray = field(default_factory=lambda: np.zeros(0))
    peak: np.ndarray = field(default_factory=lambda: np.zeros(0))
    background: np.ndarray = field(default_factory=lambda: np.zeros(0))
    snr: np.ndarray = field(default_factory=lambda: np.zeros(0))
    fwhm_x: np.ndarray = field(default_factory=lambda: np.zeros(0))
    fwhm_y: np.ndarray = field(default_factory=lambda: np.zeros(0))
    ellipticity: np.ndarray = field(default_factory=lambda: np.zeros(0))
    orientation_deg: np.ndarray = field(default_factory=lambda: np.zeros(0))
    reason: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=object))
    detail: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=object))
    held_out: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))
    holdout: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))
    residual: np.ndarray = field(default_factory=lambda: np.zeros(0))

    def __len__(self) -> int:
        return int(self.y.shape[0])

    @property
    def accepted(self) -> np.ndarray:
        """Boolean mask of the beads used by the models."""
        return self.reason == ""

    def counts(self) -> dict[str, int]:
        """Number of accepted beads (``"accepted"``) and of rejections by reason."""
        out = {"accepted": int(self.accepted.sum())}
        for key in REASONS:
            n = int((self.reason == key).sum())
            if n:
                out[key] = n
        return out

    def nothing_found(self, what: str = "the bead image") -> str | None:
        """The message for a table without one spot that could be a bead (None if there is one): what was seen
        instead and what to check."""
        spots = ~np.isin(self.reason, ["hot pixel", "fit failed", "too faint"])
        if spots.any():
            return None
        found = ", ".join(f"{v} {k}" for k, v in self.counts().items() if k != "accepted" and v)
        return (f"no beads found in {what}" + (f" (only: {found})" if found else "")
                + "; check that it is in focus, exposed (beads well above the noise) and the right channel")

    def reject(self, mask: np.ndarray, reason: str, detail: "str | np.ndarray") -> None:
        """Mark still-accepted rows in ``mask`` as rejected for ``reason`` (earlier reasons win)."""
        mask = np.asarray(mask, bool) & self.accepted
        self.reason[mask] = reason
        self.detail[mask] = detail[mask] if isinstance(detail, np.ndarray) else detail

    def to_dict(self) -> dict[str, list]:
        """Columns as JSON-able lists (NaN becomes None)."""
        out: dict[str, list] = {}
        for f in fields(self):
            col = getattr(self, f.name)
            if col.dtype.kind == "f":
                out[f.name] = [None if not np.isfinite(v) else round(float(v), 5) for v in col]
            else:
                out[f.name] = col.tolist()
        return out

    def take(self, rows) -> "BeadTable":
        """The table of ``rows`` only (indices or a boolean mask)."""
        return BeadTable(**{f.name: getattr(self, f.name)[rows] for f in fields(BeadTable)})

    @staticmethod
    def concat(tables: "list[BeadTable]") -> "BeadTable":
        if not tables:
            return BeadTable()
        return BeadTable(**{f.name: np.concatenate([getattr(t, f.name) for t in tables]) for f in fields(BeadTable)})


def robust_noise(image: np.ndarray) -> float:
    """Standard deviation of the background noise from the median absolute pixel-to-pixel difference.

    On integer-valued images (8-bit cameras, low gain) whose noise is about a count, most differences are 0 or
    +-1 and their median absolute value says little (0 when more than half are equal): there the noise is the
    root mean square of the differences without their largest 2 % (beads, edges), and never below the rounding's
    own 1 / sqrt(12) count."""
    image = np.asarray(image, dtype=np.float64)  # an unsigned difference would wrap around
    d = np.diff(image, axis=1).ravel()
    if d.size == 0:
        d = np.diff(image, axis=0).ravel()
    mad = np.median(np.abs(d - np.median(d)))
    sigma = float(1.4826 * mad / math.sqrt(2.0))
    if d.size and sigma < 2.0 and np.all(np.mod(image.ravel()[:4096], 1.0) == 0):
        a = np.abs(d - np.median(d))
        core = a[a <= np.percentile(a, 98)]
        sigma = max(sigma, float(np.sqrt(np.mean(core**2)) / math.sqrt(2.0)), 1.0 / math.sqrt(12.0))
    return sigma


def background_map(image: np.ndarray, block: int | None = None) -> np.ndarray:
    """Smooth background: medians of ``block`` x ``block`` tiles, interpolated bilinearly to every pixel."""
    h, w = image.shape
    b = block or int(np.clip(min(h, w) // 16, 16, 128))
    ny, nx = max(1, h // b), max(1, w // b)
    core = image[: ny * b, : nx * b].reshape(ny, b, nx, b)
    med = np.median(core.transpose(0, 2, 1, 3).reshape(ny, nx, b * b), axis=2)
    # tile centres in pixels; np.interp clamps outside them
    cy = (np.arange(ny) + 0.5) * b - 0.5
    cx = (np.arange(nx) + 0.5) * b - 0.5
    rows = np.stack([np.interp(np.arange(w), cx, med[i]) for i in range(ny)])  # (ny, w)
    return np.stack([np.interp(np.arange(h), cy, rows[:, j]) for j in range(w)], axis=1)


def saturation_level(raw: np.ndarray) -> float | None:
    """The value at which the camera clipped, or None when nothing looks clipped.

    An integer image that reaches its dtype's maximum is clipped there; otherwise two or more pixels sharing the
    image's maximum (a plateau) mark it as the clipping level.
    """
    vmax = raw.max()
    if raw.dtype.kind in "ui" and vmax == np.iinfo(raw.dtype).max:
        return float(vmax)
    if int(np.count_nonzero(raw == vmax)) >= 2 and vmax > np.median(raw):
        return float(vmax)
    return None


_RING = np.ones((3, 3), bool)
_RING[1, 1] = False


def _hot_pixels(image: np.ndarray, bg: np.ndarray, noise: float, k_sigma: float = 6.0) -> np.ndarray:
    sig = image - bg
    # "mirror" (c b | a b c): a border pixel must not count itself among its neighbours
    neighbours = ndimage.maximum_filter(image, footprint=_RING, mode="mirror") - bg
    return (sig > k_sigma * noise) & (neighbours < 0.35 * sig)


def _clean(image: np.ndarray, hot: np.ndarray) -> np.ndarray:
    """Hot pixels replaced by the median of their eight neighbours."""
    out = image.copy()
    ys, xs = np.nonzero(hot)
    if ys.size:
        pad = np.pad(image, 1, mode="edge")
        win = np.stack([pad[ys + dy, xs + dx] for dy in range(3) for dx in range(3) if (dy, dx) != (1, 1)])
        out[ys, xs] = np.median(win, axis=0)
    return out


def _log_candidates(sig: np.ndarray, z_threshold: float, scales: np.ndarray
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ys, xs, scale) of significant local maxima of the scale-normalised LoG scale space."""
    from skimage.feature import peak_local_max

    best = np.full(sig.shape, -np.inf, dtype=np.float32)
    best_scale = np.zeros(sig.shape, dtype=np.int8)
    sig32 = sig.astype(np.float32)
    for i, s in enumerate(scales):
        r = -(s * s) * ndimage.gaussian_laplace(sig32, s, mode="nearest")
        med = np.median(r[:: 4, :: 4])
        spread = 1.4826 * np.median(np.abs(r[:: 4, :: 4] - med))
        z = (r - med) / max(float(spread), 1e-12)
        better = z > best
        best[better] = z[better]
        best_scale[better] = i
    peaks = peak_local_max(best, min_distance=2, threshold_abs=z_threshold, exclude_border=False)
    if peaks.size == 0:
        return np.zeros(0, int), np.zeros(0, int), np.zeros(0)
    ys, xs = peaks[:, 0], peaks[:, 1]
    z = best[ys, xs]
    sc = scales[best_scale[ys, xs]]
    # non-maximum suppression across scales: a wide (defocused) PSF can show secondary maxima on its rings
    order = np.argsort(-z)
    ys, xs, sc = ys[order], xs[order], sc[order]
    keep = np.ones(ys.size, bool)
    for i in range(ys.size):
        if not keep[i]:
            continue
        d = np.hypot(ys[i + 1 :] - ys[i], xs[i + 1 :] - xs[i])
        # a weaker maximum within either one's scale is the same spot, or a blend of it with a neighbour
        keep[i + 1 :] &= ~(d < np.maximum(2.0, 1.5 * np.maximum(sc[i], sc[i + 1 :])))
    return ys[keep], xs[keep], sc[keep]


def _windows(image: np.ndarray, ys: np.ndarray, xs: np.ndarray, w: int) -> tuple[np.ndarray, np.ndarray]:
    """(N, w, w) windows centred on integer pixels and a mask of the pixels inside the image."""
    r = w // 2
    pad = np.pad(image, r, mode="edge")
    valid = np.pad(np.ones(image.shape, bool), r)
    off = np.arange(w)
    iy = ys[:, None, None] + off[None, :, None]
    ix = xs[:, None, None] + off[None, None, :]
    return pad[iy, ix], valid[iy, ix]


def fit_gaussians(windows: np.ndarray, mask: np.ndarray, sigma0: np.ndarray, iterations: int = 30) -> dict:
    """Batched Levenberg-Marquardt fit of ``A exp(-q / 2) + B`` to windows centred on each spot.

    ``q = a dx² + 2 b dx dy + c dy²`` around ``(y0, x0)`` (relative to the window centre). Returns arrays
    ``amplitude``, ``background``, ``y0``, ``x0``, ``cov`` ((N, 2, 2) in (x, y) order) and ``ok``.
    """
    n, w, _ = windows.shape
    r = w // 2
    grid = np.arange(w, dtype=np.float64) - r
    yy, xx = np.meshgrid(grid, grid, indexing="ij")
    yy, xx = yy.ravel(), xx.ravel()
    data = windows.reshape(n, -1).astype(np.float64)
    wts = mask.reshape(n, -1).astype(np.float64)
    border = np.ones((w, w), bool)
    border[1:-1, 1:-1] = False
    b0 = np.array([np.median(d[bm]) if bm.any() else np.median(d)
                   for d, bm in zip(data, border.ravel()[None, :] & (wts > 0))])
    centre = data[:, r * w + r]
    p = np.stack([np.maximum(centre - b0, 1e-12), b0, np.zeros(n), np.zeros(n), 1 / sigma0**2, np.zeros(n),
                  1 / sigma0**2], axis=1)

    def model(p):
        dy = yy[None, :] - p[:, 2:3]
        dx = xx[None, :] - p[:, 3:4]
        q = p[:, 4:5] * dx * dx + 2 * p[:, 5:6] * dx * dy + p[:, 6:7] * dy * dy
        g = np.exp(-0.5 * np.minimum(q, 200.0))
        return p[:, 0:1] * g + p[:, 1:2], g, dx, dy

    def cost(p):
        m, *_ = model(p)
        return np.sum(wts * (data - m) ** 2, axis=1)

    lam = np.full(n, 1e-3)
    cur = cost(p)
    for _ in range(iterations):
        m, g, dx, dy = model(p)
        ag = p[:, 0:1] * g
        jac = np.stack([g, np.ones_like(g), ag * (p[:, 5:6] * dx + p[:, 6:7] * dy),
                        ag * (p[:, 4:5] * dx + p[:, 5:6] * dy), -0.5 * ag * dx * dx, -ag * dx * dy,
                        -0.5 * ag * dy * dy], axis=2)  # (N, P, 7)
        jw = jac * wts[:, :, None]
        hess = np.einsum("npi,npj->nij", jw, jac)
        grad = np.einsum("npi,np->ni", jw, data - m)
        diag = np.maximum(np.diagonal(hess, axis1=1, axis2=2), 1e-12)
        damp = hess + lam[:, None, None] * (np.eye(7) * diag[:, None, :])
        try:
            step = np.linalg.solve(damp, grad[..., None])[..., 0]
        except np.linalg.LinAlgError:
            step = np.zeros_like(p)
            for i in range(n):
                step[i] = np.linalg.lstsq(damp[i], grad[i], rcond=None)[0]
        trial = p + step
        valid = (trial[:, 4] > 0) & (trial[:, 6] > 0) & (trial[:, 4] * trial[:, 6] > trial[:, 5] ** 2) & (
            np.abs(trial[:, 2]) < r) & (np.abs(trial[:, 3]) < r) & np.all(np.isfinite(trial), axis=1)
        new = np.where(valid, cost(np.where(valid[:, None], trial, p)), np.inf)
        better = new < cur
        p = np.where(better[:, None], trial, p)
        cur = np.where(better, new, cur)
        lam = np.where(better, lam * 0.3, lam * 10.0)
        lam = np.clip(lam, 1e-9, 1e9)
    a, b, c = p[:, 4], p[:, 5], p[:, 6]
    det = a * c - b * b
    cov = np.stack([np.stack([c, -b], 1), np.stack([-b, a], 1)], 1) / np.where(det > 0, det, np.nan)[:, None, None]
    ok = (p[:, 0] > 0) & (det > 0) & np.all(np.isfinite(p), axis=1) & (np.abs(p[:, 2]) < 2.0) & (np.abs(p[:, 3]) < 2.0)
    return {"amplitude": p[:, 0], "background": p[:, 1], "y0": p[:, 2], "x0": p[:, 3], "cov": cov, "ok": ok}


def shape_from_cov(cov: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """FWHM x, FWHM y (px), ellipticity, orientation (degrees) and the minor-axis sigma from (N, 2, 2) covariances."""
    sxx, syy, sxy = cov[:, 0, 0], cov[:, 1, 1], cov[:, 0, 1]
    tr, dif = sxx + syy, np.hypot(sxx - syy, 2 * sxy)
    major, minor = 0.5 * (tr + dif), np.maximum(0.5 * (tr - dif), 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        ell = 1.0 - np.sqrt(minor / major)
    theta = 0.5 * np.degrees(np.arctan2(2 * sxy, sxx - syy))
    return (FWHM_PER_SIGMA * np.sqrt(np.maximum(sxx, 0)), FWHM_PER_SIGMA * np.sqrt(np.maximum(syy, 0)), ell, theta,
            np.sqrt(minor))


def find_beads(
    raw: np.ndarray,
    *,
    image_index: int = 0,
    min_snr: float = 5.0,
    z_threshold: float = 5.0,
    max_sigma: float = 8.0,
) -> tuple[BeadTable, np.ndarray, float]:
    """Detect bead candidates in one 2-D image and refine them.

    Parameters
    ----------
    raw
        The image (H, W) as acquired (any real dtype; its dtype decides the saturation level).
    image_index
        Written into the table's ``image`` column.
    min_snr
        Candidates whose fitted peak is below ``min_snr`` times the noise are rejected as too faint.
    z_threshold
        Significance of a scale-space maximum (in robust standard deviations of that scale) to be a candidate.
    max_sigma
        Largest Gaussian scale searched, pixels.

    Returns
    -------
    table : BeadTable
        Candidates (accepted so far or rejected with a reason), then the hot pixels.
    cleaned : ndarray, float64
        The image with hot pixels replaced by their neighbours' median (what the PSF patches are cut from).
    noise : float
        Robust background noise (image units).
    """
    image = raw.astype(np.float64)
    h, w = image.shape
    noise = robust_noise(image)
    span = float(image.max() - np.median(image))
    noise = max(noise, 1e-6 * span, 1e-12)  # a noiseless synthetic image still needs a scale
    bg = background_map(image)
    hot = _hot_pixels(image, bg, noise)
    nscale = max(2, int(math.ceil(math.log(max_sigma) / math.log(1.5))) + 1)
    scales = 1.5 ** np.arange(nscale)
    cleaned = _clean(image, hot)
    ys, xs, sc = _log_candidates(cleaned - bg, z_threshold, scales)
    table = _refine(raw, cleaned, ys, xs, sc, noise, min_snr, image_index)
    # a spike as sharp as the spots around it is one of them (a bead of a sharp, undersampled or dim 8-bit
    # image), not a camera defect: judged against the local PSF width, then everything is detected again
    bead_like = _like_local_beads(image, bg, hot, table, noise)
    if bead_like.any():
        hot &= ~bead_like
        cleaned = _clean(image, hot)
        ys, xs, sc = _log_candidates(cleaned - bg, z_threshold, scales)
        table = _refine(raw, cleaned, ys, xs, sc, noise, min_snr, image_index,
                        narrow=np.minimum(0.45, 0.4 * _local_sigma(table, ys, xs)))
    hy, hx = np.nonzero(hot)
    hot_rows = empty_table(hy.size, image_index)
    hot_rows.y, hot_rows.x = hy.astype(float), hx.astype(float)
    hot_rows.peak = image[hy, hx] - bg[hy, hx]
    hot_rows.background = bg[hy, hx]
    hot_rows.snr = hot_rows.peak / noise
    hot_rows.reason[:] = "hot pixel"
    hot_rows.detail[:] = "a single bright pixel"
    out = BeadTable.concat([table, hot_rows])
    out.y_norm, out.x_norm = field_position(out.y, h), field_position(out.x, w)
    return out, cleaned, noise


def _local_sigma(table: BeadTable, ys, xs, k: int = 8) -> np.ndarray:
    """(N,) the median Gaussian width (px, geometric mean of x and y) of the ``k`` fitted spots nearest each
    (ys, xs) (accepted ones, and those rejected only as narrower than a pixel); NaN without any."""
    from scipy.spatial import cKDTree

    width = np.sqrt(table.fwhm_x * table.fwhm_y) / FWHM_PER_SIGMA
    ref = np.flatnonzero(np.isfinite(width) & ((table.reason == "") | (table.detail == _NARROW)))
    if ref.size == 0:
        return np.full(np.size(ys), np.nan)
    kk = min(k, ref.size)
    _, nn = cKDTree(np.stack([table.y[ref], table.x[ref]], 1)).query(
        np.stack([np.asarray(ys, float), np.asarray(xs, float)], 1), k=kk)
    return np.median(width[ref][np.asarray(nn).reshape(np.size(ys), kk)], axis=1)


def _like_local_beads(image, bg, hot, table: BeadTable, noise: float) -> np.ndarray:
    """Mask of the ``hot`` pixels whose eight neighbours hold, two noise deviations clear of the noise, at least
    half the light a PSF as wide as the spots around it puts there (a Gaussian of width sigma centred on a pixel
    puts exp(-1 / (2 sigma²)) of its peak into the nearest neighbours)."""
    out = np.zeros_like(hot)
    ys, xs = np.nonzero(hot)
    if ys.size == 0:
        return out
    sigma = _local_sigma(table, ys, xs)
    sig = image[ys, xs] - bg[ys, xs]
    neighbours = ndimage.maximum_filter(image, footprint=_RING, mode="mirror")[ys, xs] - bg[ys, xs]
    expected = np.exp(-1.0 / (2.0 * np.maximum(sigma, 1e-3) ** 2))
    like = np.isfinite(sigma) & (neighbours - 2.0 * noise >= 0.5 * expected * sig)
    out[ys[like], xs[like]] = True
    return out


_NARROW = "narrower than a pixel"


def _refine(raw, cleaned, ys, xs, sc, noise: float, min_snr: float, image_index: int,
            narrow: "float | np.ndarray" = 0.45) -> BeadTable:
    """Candidates -> table rows: Gaussian fit (centre, peak, widths), then the saturated / narrower than a pixel /
    fit failed / too faint rejections. ``narrow``: the minor-axis sigma (px) below which a spot is a hot pixel
    (per candidate, from the spots around it, or one value)."""
    table = empty_table(ys.size, image_index)
    if not ys.size:
        return table
    wsize = int(np.clip(2 * math.ceil(2.5 * np.percentile(sc, 90)) + 1, 9, 25))
    win, mask = _windows(cleaned, ys, xs, wsize)
    fit = fit_gaussians(win, mask, np.clip(sc, 0.8, wsize / 4))
    table.y = ys + np.where(fit["ok"], fit["y0"], 0.0)
    table.x = xs + np.where(fit["ok"], fit["x0"], 0.0)
    table.peak = fit["amplitude"]
    table.background = fit["background"]
    table.snr = fit["amplitude"] / noise
    fx, fy, ell, theta, minor = shape_from_cov(fit["cov"])
    table.fwhm_x, table.fwhm_y, table.ellipticity, table.orientation_deg = fx, fy, ell, theta
    level = saturation_level(raw)
    if level is not None:
        rr = 2
        pad = np.pad(raw, rr, mode="edge")
        core = np.stack([pad[ys + rr + dy, xs + rr + dx] for dy in range(-rr, rr + 1) for dx in range(-rr, rr + 1)])
        table.reject((core >= level).any(axis=0), "saturated", f"pixels at the clipping level {level:g}")
    table.reject(fit["ok"] & (minor < np.nan_to_num(narrow, nan=0.45)), "hot pixel", _NARROW)
    table.reject(~fit["ok"], "fit failed", "the Gaussian fit did not converge to a compact spot")
    table.reject(table.snr < min_snr, "too faint",
                 np.array([f"SNR {s:.1f} < {min_snr:g}" for s in np.nan_to_num(table.snr)], dtype=object))
    return table


def empty_table(n: int, image_index: int) -> BeadTable:
    """A table of ``n`` accepted rows of image ``image_index``, every measurement NaN."""
    nan = np.full(n, np.nan)
    return BeadTable(
        image=np.full(n, image_index, dtype=int), y=nan.copy(), x=nan.copy(), y_norm=nan.copy(), x_norm=nan.copy(),
        peak=nan.copy(), background=nan.copy(), snr=nan.copy(), fwhm_x=nan.copy(), fwhm_y=nan.copy(),
        ellipticity=nan.copy(), orientation_deg=nan.copy(), reason=np.full(n, "", dtype=object),
        detail=np.full(n, "", dtype=object), held_out=np.zeros(n, bool), holdout=np.zeros(n, bool),
        residual=nan.copy(),
    )


def reject_by_window(table: BeadTable, shapes: list[tuple[int, int]], psf_size, margin: int,
                     fwhm: np.ndarray | None = None) -> None:
    """Reject beads whose PSF window (plus its background ring) leaves the frame, spots too wide for the window,
    beads in a clump (a neighbour closer than a PSF width: the two cannot be told apart), and beads with a
    neighbour whose light cannot be modelled (saturated or too large) close enough to reach into the window.

    Other neighbours are not a reason: their light is modelled and removed (:mod:`~napari_coordgate.calibration.crowd`).
    ``psf_size``: the window side, one for all rows or (N,) one per row (windows chosen per region).
    ``fwhm``: the PSF's FWHM (px) expected at each row (from a PSF model); default :func:`local_fwhm`.
    """
    size = np.broadcast_to(np.asarray(psf_size, dtype=int), (len(table),))
    half = size // 2 + margin
    for i, (h, w) in enumerate(shapes):
        sel = table.image == i
        y, x = table.y, table.x
        out = sel & ((np.round(y) < half) | (np.round(x) < half) | (np.round(y) > h - 1 - half)
                     | (np.round(x) > w - 1 - half))
        table.reject(out, "edge", np.array([f"within {hh} px of the frame edge (PSF window {s} px + ring {margin} px)"
                                            for hh, s in zip(half, size)], dtype=object))
    major = np.maximum(table.fwhm_x, table.fwhm_y)
    table.reject(np.nan_to_num(major) > size / 2.0, "too large",
                 np.array([f"FWHM {m:.1f} px > half the {s} px window" for m, s in zip(np.nan_to_num(major), size)],
                          dtype=object))
    _reject_neighbours(table, size, local_fwhm(table, major) if fwhm is None else fwhm)


def local_fwhm(table: BeadTable, major: np.ndarray, k: int = 8) -> np.ndarray:
    """(N,) the median FWHM (px) of the ``k`` nearest accepted spots of each row's image: the PSF width expected
    at that place (a crowded spot's own Gaussian fit is widened by its neighbours)."""
    from scipy.spatial import cKDTree

    out = np.full(len(table), np.nan)
    ok = table.accepted & np.isfinite(major)
    fallback = float(np.nanmedian(major[ok])) if ok.any() else 2.0
    for i in np.unique(table.image):
        sel = np.flatnonzero(table.image == i)
        ref = np.flatnonzero(ok & (table.image == i))
        if ref.size == 0:
            out[sel] = fallback
            continue
        kk = min(k, ref.size)
        _, nn = cKDTree(np.stack([table.y[ref], table.x[ref]], 1)).query(np.stack([table.y[sel], table.x[sel]], 1),
                                                                         k=kk)
        nn = np.asarray(nn).reshape(sel.size, kk)
        out[sel] = np.median(major[ref][nn], axis=1)
    return out


def _reject_neighbours(table: BeadTable, psf_size: np.ndarray, fwhm: np.ndarray) -> None:
    from scipy.spatial import cKDTree

    real = (table.reason != "hot pixel") & np.isfinite(table.y)
    unmodelled = np.isin(table.reason, ["saturated", "too large"])
    # a neighbour reaches into the window when its core (about 1.5 FWHM in radius) does
    reach = psf_size / 2.0 + np.maximum(2.0, 1.5 * fwhm)
    clump = np.maximum(2.0, 1.0 * fwhm)
    is_clump = np.zeros(len(table), bool)
    blocked = np.zeros(len(table), bool)
    nearest = np.full(len(table), np.inf)
    for i in np.unique(table.image):
        idx = np.flatnonzero((table.image == i) & real)
        if idx.size < 2:
            continue
        pts = np.stack([table.y[idx], table.x[idx]], axis=1)
        tree = cKDTree(pts)
        d, _ = tree.query(pts, k=2)
        nearest[idx] = d[:, 1]
        is_clump[idx] = d[:, 1] < clump[idx]
        bad = idx[unmodelled[idx]]
        if bad.size:
            db, _ = cKDTree(pts[unmodelled[idx]]).query(pts, k=min(2, bad.size))
            db = np.asarray(db).reshape(idx.size, -1)
            own = unmodelled[idx]  # an unmodelled spot is its own nearest: look at its second
            dist = np.where(own, db[:, -1] if db.shape[1] > 1 else np.inf, db[:, 0])
            blocked[idx] = dist < reach[idx]
    table.reject(is_clump, "clump",
                 np.array([f"neighbour at {d:.1f} px, closer than a PSF width ({c:.1f} px)"
                           for d, c in zip(nearest, clump)], dtype=object))
    table.reject(blocked, "too close", "a saturated or too large spot's light reaches into the window")
