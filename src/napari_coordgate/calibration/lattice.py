"""Point arrays: the lattice of a pinhole or nanohole array, a patterned slide or a scanned focal-spot array.

On such a target every spot is a PSF sample at a place known from its neighbours, and spots nearly touch.
:func:`fit_lattice` finds the lattice in the detected spots: the two shortest independent neighbour vectors (the
most common directions among each spot's nearest neighbours), every spot's integer index (i, j), then the
positions ``p(i, j) = o + i a1 + j a2`` plus a quadratic term in (i, j) (the optics' distortion bends the
lattice a little across the field) by robust least squares. :meth:`Lattice.sites` lists every site in the frame,
including those the detection missed because their neighbours crowded them; the calibration then models all of
them jointly (:mod:`~napari_coordgate.calibration.crowd`). numpy and scipy only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Lattice", "fit_lattice"]

_MIN_SPOTS = 20  # fewer spots than this are never called a lattice
_TOLERANCE = 0.25  # a spot is on the lattice within this fraction of the shorter pitch


@dataclass
class Lattice:
    """``p(i, j) = coef @ [1, i, j, i², i j, j²]`` (coef (2, 6), rows y and x), and the spots it explains."""

    coef: np.ndarray
    pitch: float  # the shorter basis vector's length, px
    explained: float  # fraction of the spots within the tolerance of a site

    def positions(self, i, j) -> np.ndarray:
        """(N, 2) (y, x) of sites (i, j)."""
        i, j = np.asarray(i, float), np.asarray(j, float)
        return (self.coef @ _terms(i, j)).T

    def sites(self, shape, margin: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
        """(N, 2) positions and (N, 2) indices of every site at least ``margin`` px inside a frame of ``shape``;
        a negative ``margin`` adds the sites up to ``-margin`` px outside it (whose light still reaches it)."""
        h, w = shape
        a = np.linalg.inv(self.coef[:, 1:3])  # linear part: (i, j) from (y, x) - o
        corners = np.array([[0, 0], [0, w - 1], [h - 1, 0], [h - 1, w - 1]], float) - self.coef[:, 0]
        ij = corners @ a.T
        reach = 3 + int(np.ceil(max(0.0, -float(margin)) / self.pitch))  # the quadratic term's bend, then the margin
        lo = np.floor(ij.min(axis=0)) - reach
        hi = np.ceil(ij.max(axis=0)) + reach
        ii, jj = np.meshgrid(np.arange(lo[0], hi[0] + 1), np.arange(lo[1], hi[1] + 1), indexing="ij")
        ii, jj = ii.ravel(), jj.ravel()
        p = self.positions(ii, jj)
        keep = (p[:, 0] >= margin) & (p[:, 0] <= h - 1 - margin) & (p[:, 1] >= margin) & (p[:, 1] <= w - 1 - margin)
        return p[keep], np.stack([ii[keep], jj[keep]], axis=1).astype(int)


def _terms(i: np.ndarray, j: np.ndarray) -> np.ndarray:
    return np.stack([np.ones_like(i), i, j, i * i, i * j, j * j])


def _basis(pts: np.ndarray) -> np.ndarray | None:
    """(2, 2) the two shortest independent lattice vectors (rows, (dy, dx)) from the spots' nearest neighbours."""
    from scipy.spatial import cKDTree

    k = min(5, len(pts))
    d, idx = cKDTree(pts).query(pts, k=k)
    v = (pts[idx[:, 1:]] - pts[:, None, :]).reshape(-1, 2)
    v = np.where((v[:, :1] < 0) | ((v[:, :1] == 0) & (v[:, 1:] < 0)), -v, v)  # fold onto one half-plane
    length = np.hypot(v[:, 0], v[:, 1])
    short = np.percentile(length, 25)
    near = v[length < 1.3 * short]
    if len(near) < 4:
        return None
    angle = np.degrees(np.arctan2(near[:, 0], near[:, 1])) % 180.0
    hist, edges = np.histogram(angle, bins=36, range=(0, 180))
    first = 0.5 * (edges[np.argmax(hist)] + edges[np.argmax(hist) + 1])
    apart = np.abs((angle - first + 90.0) % 180.0 - 90.0)
    a1 = np.median(near[apart < 10.0], axis=0)
    rest = near[apart > 30.0]
    if len(rest) < 2:
        return None
    angle2 = np.degrees(np.arctan2(rest[:, 0], rest[:, 1])) % 180.0
    hist2, edges2 = np.histogram(angle2, bins=36, range=(0, 180))
    second = 0.5 * (edges2[np.argmax(hist2)] + edges2[np.argmax(hist2) + 1])
    a2 = np.median(rest[np.abs((angle2 - second + 90.0) % 180.0 - 90.0) < 10.0], axis=0)
    basis = np.stack([a1, a2])
    if abs(np.linalg.det(basis)) < 0.3 * np.linalg.norm(a1) * np.linalg.norm(a2):
        return None
    return basis


def _invert(coef: np.ndarray, pts: np.ndarray, ij: np.ndarray) -> np.ndarray:
    """(N, 2) real (i, j) of the positions ``pts`` under the lattice ``coef`` (Newton steps from ``ij``)."""
    ij = ij.astype(float)
    for _ in range(3):
        i, j = ij[:, 0], ij[:, 1]
        pred = (coef @ _terms(i, j)).T
        # Jacobian of p(i, j): d/di [1, i, j, i², ij, j²] = [0, 1, 0, 2i, j, 0]; d/dj = [0, 0, 1, 0, i, 2j]
        zeros = np.zeros_like(i)
        di = coef @ np.stack([zeros, zeros + 1, zeros, 2 * i, j, zeros])
        dj = coef @ np.stack([zeros, zeros, zeros + 1, zeros, i, 2 * j])
        jac = np.stack([di.T, dj.T], axis=2)  # (N, 2, 2)
        ij = ij + np.linalg.solve(jac, (pts - pred)[..., None])[..., 0]
    return ij


def fit_lattice(y: np.ndarray, x: np.ndarray) -> Lattice | None:
    """The lattice that the spots at (y, x) sit on, or None when they do not sit on one (fewer than 20 spots,
    no two independent neighbour directions)."""
    pts = np.stack([np.asarray(y, float), np.asarray(x, float)], axis=1)
    pts = pts[np.all(np.isfinite(pts), axis=1)]
    if len(pts) < _MIN_SPOTS:
        return None
    basis = _basis(pts)
    if basis is None:
        return None
    pitch = float(min(np.linalg.norm(basis, axis=1)))
    centre = pts.mean(axis=0)
    o = pts[np.argmin(np.hypot(*(pts - centre).T))]
    coef = np.zeros((2, 6))
    coef[:, 0], coef[:, 1:3] = o, basis.T
    # grown from the centre outwards: a basis a little off (the neighbour vectors are whole pixels) would give
    # wrong indices a few dozen pitches away, so each ring of spots is indexed with the fit of the ones inside it
    dist = np.hypot(*(pts - o).T)
    radius = 4.0 * pitch
    while True:
        near = dist <= radius
        ij = np.rint((pts - coef[:, 0]) @ np.linalg.inv(coef[:, 1:3]).T)
        curved = radius > 12.0 * pitch  # the quadratic terms only once the lattice spans enough sites
        use = near
        for _ in range(3):
            t = _terms(ij[use, 0], ij[use, 1])[: 6 if curved else 3]
            if use.sum() < 3 * t.shape[0]:
                return None
            sol = np.linalg.lstsq(t.T, pts[use], rcond=None)[0].T
            coef = np.zeros((2, 6))
            coef[:, : sol.shape[1]] = sol
            ij = np.rint(_invert(coef, pts, ij))
            use = near & (np.hypot(*(pts - (coef @ _terms(ij[:, 0], ij[:, 1])).T).T) < _TOLERANCE * pitch)
        if near.all():
            break
        radius *= 1.6
    resid = np.hypot(*(pts - (coef @ _terms(ij[:, 0], ij[:, 1])).T).T)
    use = resid < _TOLERANCE * pitch
    if use.sum() < _MIN_SPOTS:
        return None
    pitch = float(min(np.linalg.norm(coef[:, 1]), np.linalg.norm(coef[:, 2])))
    return Lattice(coef, pitch, float(use.mean()))

