"""The measured K x K PSF grid: node PSFs from registered bead patches.

Each node PSF is a weighted combination of the beads around it, with weights that fall linearly with the
distance to the node (the tent weights of the blur's interpolation, zero beyond one node spacing). Rather than
averaging each node's beads independently (which, where the PSF changes across the field, blurs each node with
the PSFs of beads up to a spacing away), the nodes are solved *jointly* by weighted least squares under that
same bilinear interpolation:

    min_G  sum_b w_b || P_b - sum_k t_k(b) G_k ||²  +  λ sum_{k~l} || G_k - G_l ||²

(``P_b`` a bead's registered unit-sum patch, ``t_k(b)`` its tent weights, ``w_b`` its weight: flux times a
robust factor; the small ``λ`` term ties neighbouring nodes together where the beads do not). Where a node has
the beads of its own cells only, this *is* the tent-weighted average of those beads; elsewhere it undoes the
interpolation's mixing, so a PSF that varies linearly across a cell is recovered exactly. Robustness: beads
whose misfit is far above the others' (touching pairs, debris) are down-weighted (iteratively reweighted least
squares, Cauchy weights) and finally rejected as outliers. K and λ are chosen by 5-fold cross-validation over the
beads unless K is given.

Then each node PSF is denoised (kept on its support: the pixels where a lightly smoothed copy stands above the
node's noise, grown by two pixels, with a soft edge; the rest is noise), nodes with less than
``min_node_weight`` beads' worth of weight are filled from their neighbours (a harmonic fill) and flagged, and each
PSF is moved so its centroid sits on the middle pixel and normalised to unit sum.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from napari_coordgate.calibration.patches import Patches, recentre, support_masks
from napari_coordgate.coords import tent_weights

__all__ = ["GridFit", "fit_grid", "choose_grid", "tent_matrix", "node_supports"]


def tent_matrix(y_norm: np.ndarray, x_norm: np.ndarray, k: int) -> np.ndarray:
    """(N, K²) bilinear weights of the nodes (row-major: node (i, j) at column i K + j)."""
    wy = tent_weights(y_norm, k)
    wx = tent_weights(x_norm, k)
    return (wy[:, :, None] * wx[:, None, :]).reshape(y_norm.size, k * k)


def _laplacian(k: int) -> np.ndarray:
    lap = np.zeros((k * k, k * k))
    for i in range(k):
        for j in range(k):
            a = i * k + j
            for di, dj in ((1, 0), (0, 1)):
                if i + di < k and j + dj < k:
                    b = (i + di) * k + j + dj
                    lap[a, a] += 1
                    lap[b, b] += 1
                    lap[a, b] -= 1
                    lap[b, a] -= 1
    return lap


def _solve(t: np.ndarray, p: np.ndarray, w: np.ndarray, k: int, lam: float, levels: list | None = None
           ) -> np.ndarray:
    """(K², s²) node PSFs; with ``levels`` (:func:`_levels`), each ring of pixels from the beads whose windows hold
    it, for the nodes whose support does (the others are zero there)."""
    if levels is None:
        a = t.T @ (w[:, None] * t)
        scale = max(float(np.trace(a)) / (k * k), 1e-30)
        a = a + lam * scale * _laplacian(k) + 1e-9 * scale * np.eye(k * k)
        return np.linalg.solve(a, t.T @ (w[:, None] * p))
    g = np.zeros((k * k, p.shape[1]))
    lap = _laplacian(k)
    for pix, beads, nodes in levels:
        tb = t[np.ix_(beads, nodes)]
        a = tb.T @ (w[beads, None] * tb)
        scale = max(float(np.trace(a)) / nodes.sum(), 1e-30)
        sub = lap[np.ix_(nodes, nodes)]
        sub = sub - np.diag(sub.sum(axis=1))  # the Laplacian of the nodes among themselves
        a = a + lam * scale * sub + 1e-9 * scale * np.eye(int(nodes.sum()))
        g[np.ix_(nodes, pix)] = np.linalg.solve(a, tb.T @ (w[beads, None] * p[np.ix_(beads, pix)]))
    return g


def node_supports(t: np.ndarray, support: np.ndarray, k: int, size: int) -> np.ndarray:
    """(K²,) each node's support: the largest window of the beads its tent reaches (``size`` where none)."""
    out = np.where(t > 0, np.asarray(support)[:, None], 0).max(axis=0, initial=0)
    return np.where(out > 0, out, size).astype(int)


def _levels(support: np.ndarray, nodes: np.ndarray, size: int) -> list | None:
    """The rings of pixels of the ``size`` square between consecutive window sides, each with the beads whose own
    window (``support``) and the nodes whose support hold it; None when every window is the whole square."""
    support = np.asarray(support)
    if np.all(support == size) and np.all(nodes == size):
        return None
    c = np.abs(np.arange(size) - size // 2)
    cheb = np.maximum(c[:, None], c[None, :]).ravel()
    out, inner = [], -1
    for u in np.unique(np.concatenate([support, nodes])):
        pix = np.flatnonzero((cheb > inner) & (cheb <= u // 2))
        beads, held = support >= u, nodes >= u
        if pix.size and beads.any() and held.any():
            out.append((pix, beads, held))
        inner = u // 2
    return out


def _misfit(p: np.ndarray, fitted: np.ndarray, w: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """(N,) each bead's weighted squared misfit over its own window, scaled to the whole square's pixel count (so
    beads with small windows compare with the others)."""
    if mask is None:
        return np.sum((p - fitted) ** 2, axis=1) * w
    return np.sum(mask * (p - fitted) ** 2, axis=1) * w * (mask.shape[1] / mask.sum(axis=1))


@dataclass
class GridFit:
    """A fitted grid before it becomes a PSF model."""

    psfs: np.ndarray  # (K, K, s, s) denoised, filled, centred, unit sum
    filled: np.ndarray  # (K, K) bool
    node_weight: np.ndarray  # (K, K) beads' worth of tent weight at each node
    measured: np.ndarray  # (K, K, s, s) plain tent-weighted averages of the beads (NaN where none), for the report
    robust_weight: np.ndarray  # (N,) final robust factor of each bead (1 = trusted)
    outlier_ratio: np.ndarray  # (N,) bead misfit over the median misfit (the outlier test)
    k: int
    lam: float
    cv_scores: dict  # (k, lam) -> cross-validation score
    supports: np.ndarray | None = None  # (K, K) odd side of each node's PSF (zero beyond); None: the whole square


def _bead_weights(patches: Patches) -> np.ndarray:
    flux = np.maximum(patches.flux, 0.0)
    med = np.median(flux) if flux.size else 1.0
    # flux-proportional (photon noise), capped so one bright bead cannot own a node
    return np.clip(flux / max(med, 1e-30), 0.1, 5.0)


def _robust_fit(t, p, w, k, lam, iterations: int = 3, levels: list | None = None, mask: np.ndarray | None = None):
    u = np.ones(len(w))
    for _ in range(iterations):
        g = _solve(t, p, w * u, k, lam, levels)
        e = _misfit(p, t @ g, w, mask)
        med = np.median(e) if e.size else 1.0
        ratio = e / max(med, 1e-30)
        u = 1.0 / (1.0 + (ratio / 4.0) ** 2)
    return g, u, ratio


def choose_grid(patches: Patches, ks: list[int], lams=(0.003, 0.03, 0.3), folds: int = 5) -> tuple[int, float, dict]:
    """(K, λ) with the smallest cross-validated misfit of held-out beads (each fold's beads left out in turn)."""
    n = len(patches)
    p = patches.patches.reshape(n, -1)
    w = _bead_weights(patches)
    fold = np.arange(n) % folds
    scores: dict = {}
    sup, size = patches.support, patches.psf_size
    mask = None if patches.uniform else patches.mask().reshape(n, -1)
    for k in ks:
        t = tent_matrix(patches.y_norm, patches.x_norm, k)
        nodes = node_supports(t, sup, k, size)
        for lam in lams:
            errs = np.zeros(n)
            for f in range(folds):
                tr, te = fold != f, fold == f
                if not te.any() or tr.sum() < 2:
                    continue
                m_tr, m_te = (None, None) if mask is None else (mask[tr], mask[te])
                g, _, _ = _robust_fit(t[tr], p[tr], w[tr], k, lam, iterations=2, levels=_levels(sup[tr], nodes, size),
                                      mask=m_tr)
                errs[te] = _misfit(p[te], t[te] @ g, w[te], m_te)
            # robust sum: an outlier bead must not decide K
            cap = 10.0 * np.median(errs)
            scores[(k, lam)] = float(np.sum(np.minimum(errs, cap)))
    best = min(scores, key=scores.get)
    return best[0], best[1], scores


def _denoise(g: np.ndarray, sigma: float) -> np.ndarray:
    """Keep a PSF, (s, s) or (D, s, s), on its support (where a lightly smoothed copy stands above the noise: the
    components that reach the central 3 x 3 pixels, or column), with a soft edge."""
    s = g.shape[-1]
    smooth = ndimage.gaussian_filter(g, 1.0, mode="constant")
    # white noise of std sigma has std sigma / (2 sqrt(pi))^(ndim / 2) after a unit Gaussian filter
    scale = 2.0 * math.sqrt(math.pi) if g.ndim == 2 else (2.0 * math.sqrt(math.pi)) ** (g.ndim / 2)
    thresh = np.maximum(3.0 * np.asarray(sigma) / scale, 1e-4 * float(smooth.max()))  # sigma: a number or per pixel
    support = smooth > thresh
    labels, n = ndimage.label(support)
    if n > 1:
        c = s // 2
        centre_labels = set(labels[..., c - 1 : c + 2, c - 1 : c + 2].ravel()) - {0}
        if centre_labels:
            support = np.isin(labels, list(centre_labels))
        else:
            sums = ndimage.sum(g, labels, range(1, n + 1))
            support = labels == (1 + int(np.argmax(sums)))
    support = ndimage.binary_dilation(support, iterations=2)
    taper = np.clip(ndimage.gaussian_filter(support.astype(float), 0.7, mode="constant") * 1.5, 0.0, 1.0)
    out = np.clip(g * taper, 0.0, None)
    return out if out.sum() > 0 else np.clip(g, 0.0, None)


def _harmonic_fill(psfs: np.ndarray, known: np.ndarray) -> np.ndarray:
    """Nodes not ``known`` become the average of their 4 neighbours, iterated to convergence."""
    out = psfs.copy()
    k = known.shape[0]
    if known.all() or not known.any():
        return out
    out[~known] = psfs[known].mean(axis=0)
    for _ in range(200 * k):
        prev = out.copy()
        for i, j in zip(*np.nonzero(~known)):
            nb = [prev[a, b] for a, b in ((i - 1, j), (i + 1, j), (i, j - 1), (i, j + 1)) if 0 <= a < k and 0 <= b < k]
            out[i, j] = np.mean(nb, axis=0)
        if np.max(np.abs(out - prev)) < 1e-9 * np.max(np.abs(out)):
            break
    return out


def _outer_noise(psfs: np.ndarray, width: int = 3) -> np.ndarray:
    """(N,) per-pixel noise of (N, s, s) PSFs from the differences of neighbouring pixels in their outer ring
    (robust: the median absolute difference, which a smooth remainder of the PSF hardly moves)."""
    s = psfs.shape[-1]
    ring = np.ones((s, s - 1), bool)
    ring[width:-width, width:-width] = False
    d = np.diff(psfs, axis=2)[:, ring]
    mad = np.median(np.abs(d - np.median(d, axis=1, keepdims=True)), axis=1)
    return 1.4826 * mad / math.sqrt(2.0)


def fit_grid(patches: Patches, k: int, lam: float = 0.03, *, min_node_weight: float = 0.25,
             bead_diameter_px: float = 0.0) -> GridFit:
    """Fit the K x K node PSFs to the beads' registered patches (see the module docstring); with a bead
    diameter, the bead is divided out of each node before it is denoised
    (:func:`~napari_coordgate.calibration.beadsize.remove_bead`). Beads with windows of different sides (chosen per
    region) each count on their own window; each node's PSF is zero beyond the largest window of the beads its tent
    reaches (:func:`node_supports`), its side kept in :attr:`GridFit.supports`."""
    n, s = len(patches), patches.psf_size
    p = patches.patches.reshape(n, -1)
    w = _bead_weights(patches)
    t = tent_matrix(patches.y_norm, patches.x_norm, k)
    nodes = node_supports(t, patches.support, k, s)
    levels = _levels(patches.support, nodes, s)
    mask = None if levels is None else patches.mask().reshape(n, -1)
    g, u, ratio = _robust_fit(t, p, w, k, lam, levels=levels, mask=mask)
    # the node estimates' noise: pooled residual variance (per unit bead weight) through the normal equations
    wu = w * u
    resid = p - t @ g
    if mask is not None:
        resid = resid * mask
    dof = max(n - k * k, 1)
    npx = s * s if mask is None else float(mask.sum()) / n
    c = float(np.sum(wu[:, None] * resid**2)) / (dof * npx)
    a = t.T @ (wu[:, None] * t)
    scale = max(float(np.trace(a)) / (k * k), 1e-30)
    a_inv = np.linalg.inv(a + lam * scale * _laplacian(k) + 1e-9 * scale * np.eye(k * k))
    node_var = c * np.einsum("ij,jk,ki->i", a_inv, a, a_inv)
    node_weight = (t * u[:, None]).sum(axis=0).reshape(k, k)
    psfs = g.reshape(k * k, s, s)
    node_sigma = np.sqrt(np.maximum(node_var, 0.0))
    own = None if levels is None else support_masks(nodes, s)
    if bead_diameter_px > 0:
        from napari_coordgate.calibration.beadsize import remove_bead

        # the pooled residual above counts the PSF's change across a cell as noise, which would keep the bead
        # in: the bead is divided out against each node's own noise, measured where its PSF has faded
        psfs, node_sigma = remove_bead(psfs, bead_diameter_px, np.minimum(node_sigma, _node_outer_noise(psfs, nodes)))
    if own is not None:
        psfs = psfs * own
    noise = node_sigma if levels is None else node_sigma[:, None, None] * _level_noise(t, wu, patches.support, s)
    psfs = np.stack([_denoise(psfs[i], noise[i]) for i in range(k * k)]).reshape(k, k, s, s)
    known = node_weight >= min_node_weight
    if not known.any():  # too few beads for any node on its own: keep the joint solution everywhere
        known[...] = True
        filled = np.zeros((k, k), bool)
    else:
        filled = ~known
    psfs = _harmonic_fill(psfs, known)
    psfs = recentre(psfs.reshape(k * k, s, s)).reshape(k, k, s, s)
    psfs = np.clip(psfs, 0.0, None)
    supports = None
    if own is not None:  # a filled node reaches as far as the neighbours it was filled from
        supports = _filled_supports(nodes.reshape(k, k), known)
        psfs = psfs * support_masks(supports.ravel(), s).reshape(k, k, s, s)
    psfs /= psfs.sum(axis=(2, 3), keepdims=True)
    # plain tent-weighted averages: what the beads show at each node, for the report
    den = (t * w[:, None]).sum(axis=0)
    measured = ((t * w[:, None]).T @ p) / np.where(den > 0, den, np.nan)[:, None]
    return GridFit(psfs, filled, node_weight, measured.reshape(k, k, s, s), u, ratio, k, lam, {}, supports)


def _level_noise(t: np.ndarray, w: np.ndarray, support: np.ndarray, size: int) -> np.ndarray:
    """(K², s, s) how much noisier each node's pixel is than its pooled noise says: a ring of pixels is measured
    by the beads whose windows reach it only (the square root of the node's bead weight over theirs; 1e6 where none
    of its beads reach)."""
    c = np.abs(np.arange(size) - size // 2)
    cheb = np.maximum(c[:, None], c[None, :])
    total = (t * w[:, None]).sum(axis=0)  # (K²,)
    out = np.ones((t.shape[1], size, size))
    inner = -1
    for u in np.unique(support):
        ring = (cheb > inner) & (cheb <= u // 2)
        part = (t[support >= u] * w[support >= u, None]).sum(axis=0)
        ratio = np.where(part > 0, total / np.where(part > 0, part, 1.0), 1e12)
        out[:, ring] = np.sqrt(ratio)[:, None]
        inner = u // 2
    return out


def _node_outer_noise(psfs: np.ndarray, nodes: np.ndarray) -> np.ndarray:
    """:func:`_outer_noise` of each node PSF on its own support (its outer ring; the zeros beyond are not noise)."""
    s = psfs.shape[-1]
    out = np.empty(len(psfs))
    for u in np.unique(nodes):
        sel = np.flatnonzero(nodes == u)
        lo = (s - u) // 2
        out[sel] = _outer_noise(psfs[sel, lo : lo + u, lo : lo + u])
    return out


def _filled_supports(nodes: np.ndarray, known: np.ndarray) -> np.ndarray:
    """(K, K) node supports, where a node was filled from its neighbours the largest among the measured ones."""
    out = nodes.copy()
    if known.any() and not known.all():
        out[~known] = nodes[known].max()
    return out
