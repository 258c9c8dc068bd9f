"""Point arrays: a K x K grid of PSFs measured from one image of a point array, every site modelled jointly.

On a pinhole or nanohole array, a patterned slide or a scanned focal-spot array the spots sit on a lattice
(:mod:`~napari_coordgate.calibration.lattice`) and nearly touch (down to 1.5-2 PSF widths apart), so no spot can
be cut out on its own and modelling the neighbours one at a time does not converge. Here the whole image is one
linear model in the node PSFs:

    y(x) = sum_i a_i sum_k t_k(p_i) H_k(x - p_i) + b(x) + noise

(``p_i`` the sites' sub-pixel positions, from the lattice fitted to the detected spots, so the sites the
detection missed and those just outside the frame are modelled too; ``a_i`` their amplitudes; ``t_k`` the tent
weights of the K x K nodes, the weights :class:`~napari_coordgate.optics.measured.MeasuredGridPSF` and the blur
interpolate with, so neighbouring nodes share the sites between them as :mod:`~napari_coordgate.calibration.grid`
shares beads; ``H_k`` the node PSFs, S x S pixels, zero outside; the sub-pixel move is a separable Lanczos-3
interpolation; ``b`` a smooth background, tent-interpolated on the node grid). Alternately:

1. the amplitudes and the background given the PSFs: one sparse linear least-squares solve (a site overlaps only
   its neighbours), amplitudes clipped at zero (a missing site is a site of amplitude 0);
2. the node PSFs given the amplitudes: weighted least squares over every pixel, by preconditioned conjugate
   gradients on the normal equations, non-negative by an active set (clip, free the clipped pixels whose gradient
   asks for light, solve again), lightly regularised: a penalty growing with the square of the distance from the
   PSF's centre (a lattice shows the PSF folded onto one lattice cell; the missing sites, the amplitudes' spread
   and this prior tell the folds apart) and a small one on the difference between neighbouring nodes;
3. the pixel weights: one over a variance ``c0 + c1 * model`` fitted to the squared residuals (read noise and
   shot noise, in whatever units the camera counts).

The node PSFs are then clipped, moved so their centroids sit on the middle pixel and normalised to unit sum, as
:class:`~napari_coordgate.optics.measured.MeasuredGridPSF` takes them. numpy and scipy only.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
from scipy import ndimage, sparse
from scipy.sparse.linalg import spsolve

from napari_coordgate.calibration import CalibrationCancelled, CalibrationError
from napari_coordgate.calibration.detect import robust_noise
from napari_coordgate.calibration.lattice import Lattice, fit_lattice
from napari_coordgate.calibration.patches import recentre
from napari_coordgate.coords import field_axis, field_position, tent_weights

__all__ = ["find_spots", "find_array", "looks_like_array", "measure_array_psfs"]

_TAPS = 3  # Lanczos-3: a sub-pixel move reads 2 * 3 + 1 pixels along each axis
_MIN_EXPLAINED = 0.6  # a lattice must explain this fraction of the detected spots to call the image an array
_MIN_SITES_PER_NODE = 4  # fewer lattice sites in the frame than this many per node: refused
_SCALES = (1.0, 2.0, 4.0, 8.0)  # smoothing (px) tried by the spot detection: the spots' size is not known yet
_BANDED_MAX = 47  # PSFs up to this side move by batched matrix products, larger ones tap by tap
_ENVELOPE = 3.5  # the radial penalty reaches radial_penalty at this many of the node PSF's own FWHM


def find_spots(image: np.ndarray, sigma: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """(y, x) sub-pixel local maxima of the image smoothed by a Gaussian of ``sigma`` px that stand above a fifth
    of its range (the parabola through each maximum and its neighbours gives the sub-pixel place)."""
    from skimage.feature import peak_local_max

    sm = ndimage.gaussian_filter(np.asarray(image, dtype=np.float64), sigma)
    lo, hi = np.percentile(sm, [1, 99.9])
    pk = peak_local_max(sm, min_distance=max(2, int(round(sigma))), threshold_abs=lo + 0.2 * (hi - lo),
                        exclude_border=1)
    if len(pk) == 0:
        return np.zeros(0), np.zeros(0)
    iy, ix = pk[:, 0], pk[:, 1]
    out = []
    for axis_step in ((1, 0), (0, 1)):
        c, m, p = sm[iy, ix], sm[iy - axis_step[0], ix - axis_step[1]], sm[iy + axis_step[0], ix + axis_step[1]]
        den = m - 2 * c + p
        out.append(np.where(den < 0, 0.5 * (m - p) / np.where(den < 0, den, -1.0), 0.0).clip(-0.5, 0.5))
    return iy + out[0], ix + out[1]


def find_array(image: np.ndarray) -> tuple[Lattice | None, int]:
    """The lattice that best explains the image's spots (detected at several smoothings), or None, and how many
    spots the chosen detection found."""
    best, count = None, 0
    for sigma in _SCALES:
        y, x = find_spots(image, sigma)
        lattice = fit_lattice(y, x)
        if lattice is not None and (best is None or lattice.explained > best.explained):
            best, count = lattice, len(y)
        elif best is None:
            count = max(count, len(y))
    return best, count


def looks_like_array(image: np.ndarray, *, min_explained: float = _MIN_EXPLAINED) -> bool:
    """Whether an image shows a point array: a lattice explains at least ``min_explained`` of its spots (for the
    ``auto`` choice between bead and array calibration)."""
    image = _checked_image(image)
    lattice, _ = find_array(image)
    return lattice is not None and lattice.explained >= min_explained


def _checked_image(image) -> np.ndarray:
    arr = np.asarray(image)
    if arr.ndim != 2 or min(arr.shape) < 16:
        raise CalibrationError(f"expected one 2-D image of a point array of at least 16 x 16 pixels, got shape "
                               f"{arr.shape}")
    arr = arr.astype(np.float64)
    if not np.all(np.isfinite(arr)):
        raise CalibrationError("the point-array image contains NaN or Inf values")
    return arr


# ------------------------------------------------------------------------------------- the sites' operator


def _lanczos(t: np.ndarray) -> np.ndarray:
    return np.where(np.abs(t) < _TAPS, np.sinc(t) * np.sinc(t / _TAPS), 0.0)


def shift_taps(f: np.ndarray) -> np.ndarray:
    """(N, 2 * 3 + 1) Lanczos-3 weights that move samples by ``f`` (N,) px (|f| <= 0.5): ``out[u] = sum_d w[d]
    in[u - d]`` lands ``in[j]`` at ``u = j + 3 + f``; normalised so a constant stays constant."""
    d = np.arange(2 * _TAPS + 1) - _TAPS
    w = _lanczos(d[None, :] - np.asarray(f, dtype=np.float64)[:, None])
    return w / w.sum(axis=1, keepdims=True)


def _move(h: np.ndarray, w: np.ndarray, axis: int) -> np.ndarray:
    """(N, A, B) moved along ``axis`` (1 or 2) by each row of taps ``w`` (N, 7): that axis grows by 6."""
    shape = list(h.shape)
    shape[axis] += 2 * _TAPS
    out = np.zeros(shape)
    n = h.shape[axis]
    for d in range(2 * _TAPS + 1):
        sl = (slice(None), slice(d, d + n)) if axis == 1 else (slice(None), slice(None), slice(d, d + n))
        out[sl] += w[:, d, None, None] * h
    return out


def _move_back(r: np.ndarray, w: np.ndarray, axis: int) -> np.ndarray:
    """The adjoint of :func:`_move`: (N, A + 6, B) or (N, A, B + 6) back onto (N, A, B)."""
    n = r.shape[axis] - 2 * _TAPS
    shape = list(r.shape)
    shape[axis] = n
    out = np.zeros(shape)
    for d in range(2 * _TAPS + 1):
        sl = (slice(None), slice(d, d + n)) if axis == 1 else (slice(None), slice(None), slice(d, d + n))
        out += w[:, d, None, None] * r[sl]
    return out


@dataclass
class _Sites:
    """The sites of one image and how their PSFs land on a padded canvas of the image."""

    pos: np.ndarray  # (N, 2) sub-pixel (y, x)
    tent: np.ndarray  # (N, K²) node weights
    wy: np.ndarray  # (N, 7) sub-pixel taps along y
    wx: np.ndarray  # (N, 7)
    index: np.ndarray  # (N, M, M) flat canvas index of each window pixel
    inside: np.ndarray  # (N, M, M) whether that pixel is in the frame
    pixel: np.ndarray  # (N, M, M) flat image index (0 where outside)
    rows: np.ndarray  # (N, M) frame row of each window row, clipped to the frame
    cols: np.ndarray  # (N, M)
    canvas: tuple[int, int]
    pad: int
    size: int  # S

    @classmethod
    def build(cls, pos: np.ndarray, shape: tuple[int, int], k: int, size: int) -> "_Sites":
        h, w = shape
        c = size // 2
        anchor = np.round(pos).astype(int)
        f = pos - anchor
        pad = 2 * (c + _TAPS) + 1  # sites lie up to c + 3 px outside the frame, their windows c + 3 further
        m = size + 2 * _TAPS
        off = np.arange(m) - c - _TAPS
        rows = anchor[:, 0, None] + off  # (N, M) frame rows of each window
        cols = anchor[:, 1, None] + off
        canvas = (h + 2 * pad, w + 2 * pad)
        index = (rows[:, :, None] + pad) * canvas[1] + (cols[:, None, :] + pad)
        inside = ((rows >= 0) & (rows < h))[:, :, None] & ((cols >= 0) & (cols < w))[:, None, :]
        pixel = np.where(inside, np.clip(rows, 0, h - 1)[:, :, None] * w + np.clip(cols, 0, w - 1)[:, None, :], 0)
        ty = tent_weights(field_position(pos[:, 0], h), k)
        tx = tent_weights(field_position(pos[:, 1], w), k)
        tent = (ty[:, :, None] * tx[:, None, :]).reshape(len(pos), k * k)
        return cls(pos, tent, shift_taps(f[:, 0]), shift_taps(f[:, 1]), index, inside, pixel,
                   np.clip(rows, 0, h - 1), np.clip(cols, 0, w - 1), canvas, pad, size)

    def __len__(self) -> int:
        return len(self.pos)

    def take(self, sel: np.ndarray) -> "_Sites":
        """The sites ``sel``, all with one node (a shift-invariant PSF)."""
        return _Sites(self.pos[sel], np.ones((int(np.sum(sel)), 1)), self.wy[sel], self.wx[sel], self.index[sel],
                      self.inside[sel], self.pixel[sel], self.rows[sel], self.cols[sel], self.canvas, self.pad,
                      self.size)

    def _banded(self) -> tuple[np.ndarray, np.ndarray] | None:
        """The moves as (N, M, S) matrices where that is cheaper (small PSFs: a batched matrix product beats
        seven passes over the windows), else None."""
        s = self.size
        if s > _BANDED_MAX:
            return None
        if getattr(self, "_matrices", None) is None:
            j = np.arange(s)
            mats = []
            for taps in (self.wy, self.wx):
                m = np.zeros((len(self), s + 2 * _TAPS, s))
                for d in range(2 * _TAPS + 1):
                    m[:, j + d, j] = taps[:, d, None]
                mats.append(m)
            self._matrices = tuple(mats)
        return self._matrices

    def windows(self, psfs: np.ndarray) -> np.ndarray:
        """(N, M, M) each site's PSF (tent-interpolated from the (K², S, S) nodes) at its sub-pixel place."""
        s = self.size
        h = (self.tent @ psfs.reshape(len(psfs), s * s)).reshape(len(self), s, s)
        banded = self._banded()
        if banded is not None:
            return banded[0] @ h @ banded[1].transpose(0, 2, 1)
        return _move(_move(h, self.wy, 1), self.wx, 2)

    def windows_back(self, win: np.ndarray) -> np.ndarray:
        """The adjoint of :meth:`windows`: (N, M, M) back onto (K², S, S) node PSFs."""
        s = self.size
        banded = self._banded()
        if banded is not None:
            h = banded[0].transpose(0, 2, 1) @ win @ banded[1]
        else:
            h = _move_back(_move_back(win, self.wx, 2), self.wy, 1)
        return (self.tent.T @ h.reshape(len(self), s * s)).reshape(-1, s, s)

    def paint(self, win: np.ndarray) -> np.ndarray:
        """The canvas (flat) with every window added at its place."""
        return np.bincount(self.index.ravel(), weights=win.ravel(), minlength=self.canvas[0] * self.canvas[1])

    def crop(self, canvas_flat: np.ndarray, shape) -> np.ndarray:
        p = self.pad
        return canvas_flat.reshape(self.canvas)[p : p + shape[0], p : p + shape[1]]

    def embed(self, image: np.ndarray) -> np.ndarray:
        p = self.pad
        out = np.zeros(self.canvas)
        out[p : p + image.shape[0], p : p + image.shape[1]] = image
        return out.ravel()


# ------------------------------------------------------------------------------------------ the two solves


def _solve_amplitudes(sites: _Sites, win: np.ndarray, image: np.ndarray, weight: np.ndarray, by: np.ndarray,
                      bx: np.ndarray, prior: float | None) -> tuple[np.ndarray, np.ndarray]:
    """Amplitudes (N,) >= 0 and background node values (Kb, Kb) given each site's unit-amplitude window
    ``win`` (N, M, M): the sparse weighted least-squares problem of the whole frame, each amplitude pulled a
    little towards ``prior`` (the typical amplitude; a site outside the frame shows too little to say more;
    None: the median of a first solve's amplitudes in the frame)."""
    n, m = len(sites), win.shape[-1]
    kb = by.shape[1]
    g = np.where(sites.inside, win, 0.0)
    wflat = weight.ravel()
    gw = g * wflat[sites.pixel]
    keep = sites.inside.ravel()
    rows, cols = sites.pixel.ravel()[keep], np.repeat(np.arange(n), m * m)[keep]
    a = sparse.csc_matrix((g.ravel()[keep], (rows, cols)), shape=(image.size, n))
    aw = sparse.csc_matrix((gw.ravel()[keep], (rows, cols)), shape=(image.size, n))
    ata = (a.T @ aw).tocsc()
    # background columns: the tent basis is separable, so its products with the windows are too
    atb = np.einsum("nuv,num,nvk->nmk", gw, by[sites.rows], bx[sites.cols], optimize=True).reshape(n, kb * kb)
    q = np.einsum("ym,yn,yx->mnx", by, by, weight, optimize=True)
    btb = np.einsum("mnx,xk,xl->mknl", q, bx, bx, optimize=True).reshape(kb * kb, kb * kb)
    rhs = np.concatenate([aw.T @ image.ravel(), (by.T @ (weight * image) @ bx).ravel()])
    lam = 1e-3 * max(float(np.median(ata.diagonal())), 1e-30)
    ridge = sparse.diags(np.concatenate([np.full(n, lam), np.full(kb * kb, 1e-9 * lam)]), format="csc")
    system = sparse.bmat([[ata, sparse.csc_matrix(atb)], [sparse.csc_matrix(atb.T), sparse.csc_matrix(btb)]],
                         format="csc") + ridge
    if prior is None:
        first = spsolve(system, rhs)[:n]
        centre = sites.inside[:, win.shape[1] // 2, win.shape[2] // 2]
        prior = float(np.median(first[centre])) if centre.any() else 0.0
    rhs[:n] += lam * prior
    sol = spsolve(system, rhs)
    amp = np.clip(sol[:n], 0.0, None)
    # the background again for the clipped amplitudes (a missing site's small negative amplitude moved it)
    beta = np.linalg.solve(btb + 1e-9 * np.trace(btb) * np.eye(kb * kb), rhs[n:] - atb.T @ amp)
    return amp, beta.reshape(kb, kb)


def _node_laplacian(h: np.ndarray, k: int) -> np.ndarray:
    """The graph Laplacian of the K x K node grid applied to (K², S, S) node PSFs."""
    g = h.reshape(k, k, *h.shape[1:])
    out = np.zeros_like(g)
    d = g[1:] - g[:-1]
    out[1:] += d
    out[:-1] -= d
    d = g[:, 1:] - g[:, :-1]
    out[:, 1:] += d
    out[:, :-1] -= d
    return out.reshape(h.shape)


def _pcg(apply: Callable, rhs: np.ndarray, x: np.ndarray, precond: np.ndarray, free: np.ndarray,
         iterations: int, tol: float = 1e-4) -> tuple[np.ndarray, int]:
    """Preconditioned conjugate gradients on the free entries (the others keep their value)."""
    r = (rhs - apply(x)) * free
    z = r / precond
    p = z.copy()
    rz = float(np.vdot(r, z))
    stop = tol * float(np.linalg.norm(rhs * free))
    done = 0
    for done in range(1, iterations + 1):
        ap = apply(p) * free
        pap = float(np.vdot(p, ap))
        if pap <= 0:
            break
        alpha = rz / pap
        x = x + alpha * p
        r = r - alpha * ap
        if float(np.linalg.norm(r)) < stop:
            break
        z = r / precond
        rz, rz_old = float(np.vdot(r, z)), rz
        p = z + (rz / rz_old) * p
    return x, done


@dataclass
class _PSFProblem:
    """The node PSFs' (and the background's) weighted least squares given the amplitudes: the normal equations
    on one flat vector, the (K², S, S) node PSFs then the (Kb, Kb) background nodes. The background is solved
    with the PSFs because a lattice of PSFs with a pedestal looks like a background: the radial penalty then
    gives that light to the background."""

    sites: _Sites
    amp: np.ndarray
    weight: np.ndarray  # (H, W)
    image: np.ndarray  # (H, W)
    by: np.ndarray  # (H, Kb) background basis along y
    bx: np.ndarray  # (W, Kb)
    k: int
    radial: np.ndarray  # (K², S, S) penalty per pixel
    smooth: float
    prior: np.ndarray  # (K², S, S) what the radial penalty pulls towards

    @classmethod
    def build(cls, sites: _Sites, amp: np.ndarray, weight: np.ndarray, image: np.ndarray, by: np.ndarray,
              bx: np.ndarray, prior: np.ndarray, env: np.ndarray, radial: float, smooth: float) -> "_PSFProblem":
        """The problem with its penalties relative to the data term's size (its mean diagonal per node);
        ``env`` (K², 1, 1) the distance where the radial penalty reaches ``radial`` times that."""
        k = int(round(math.sqrt(len(prior))))
        m = sites.index.shape[1] // 2
        centre = sites.embed(weight)[sites.index[:, m, m]]
        scale = float(np.mean((sites.tent**2).T @ (amp**2 * centre)))
        u = np.arange(sites.size) - sites.size // 2
        r2 = (u[:, None] ** 2 + u[None, :] ** 2).astype(float)
        return cls(sites, amp, weight, image, by, bx, k, radial * scale * r2 / env**2, smooth * scale, prior)

    def _split(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        s, kb = self.sites.size, self.by.shape[1]
        n = self.k * self.k * s * s
        return x[:n].reshape(-1, s, s), x[n:].reshape(kb, kb)

    def _back(self, r: np.ndarray, h: np.ndarray | None) -> np.ndarray:
        """The adjoint of the model applied to a weighted frame ``r``, plus the penalties' gradient at ``h``."""
        out = self.sites.windows_back(self.sites.embed(r)[self.sites.index] * self.amp[:, None, None])
        if h is not None:
            out = out + self.radial * h + self.smooth * _node_laplacian(h, self.k)
        return np.concatenate([out.ravel(), (self.by.T @ r @ self.bx).ravel()])

    def model(self, x: np.ndarray) -> np.ndarray:
        h, b = self._split(x)
        frame = self.sites.crop(self.sites.paint(self.sites.windows(h) * self.amp[:, None, None]), self.image.shape)
        return frame + self.by @ b @ self.bx.T

    def apply(self, x: np.ndarray) -> np.ndarray:
        return self._back(self.weight * self.model(x), self._split(x)[0])

    def rhs(self) -> np.ndarray:
        out = self._back(self.weight * self.image, None)
        out[: self.prior.size] += (self.radial * self.prior).ravel()
        return out

    def precond(self) -> np.ndarray:
        # the data term's diagonal, per node: each site's squared tent weight, amplitude and weight at its centre
        m = self.sites.index.shape[1] // 2
        centre = self.sites.embed(self.weight)[self.sites.index[:, m, m]]
        d = (self.sites.tent**2).T @ (self.amp**2 * centre)
        ph = d[:, None, None] + self.radial + 4.0 * self.smooth
        pb = (self.by**2).T @ self.weight @ self.bx**2
        return np.maximum(np.concatenate([ph.ravel(), pb.ravel()]), 1e-30)

    def solve(self, h: np.ndarray, b: np.ndarray, iterations: int, rounds: int = 3
              ) -> tuple[np.ndarray, np.ndarray, int]:
        """Non-negative node PSFs and the background: conjugate gradients, clip, free the clipped pixels the
        gradient wants lit, again."""
        rhs, pre = self.rhs(), self.precond()
        x = np.concatenate([h.ravel(), b.ravel()])
        nh = h.size
        free = np.ones(x.shape, bool)
        total = 0
        for _ in range(rounds):
            x, n = _pcg(self.apply, rhs, x * free, pre, free, iterations)
            total += n
            x[:nh] = np.clip(x[:nh], 0.0, None)
            free[:nh] = (x[:nh] > 0) | (self.apply(x)[:nh] - rhs[:nh] < 0)
        h, b = self._split(x)
        return h, b, total


# ------------------------------------------------------------------------------- the Gaussian first guess


def _gaussian(params: np.ndarray, size: int) -> np.ndarray:
    """(S, S) unit-sum elliptical Gaussian; ``params`` the log-Cholesky factor of its covariance (px²):
    (log l11, l21, log l22)."""
    chol = np.array([[math.exp(params[0]), 0.0], [params[1], math.exp(params[2])]])
    inv = np.linalg.inv(chol @ chol.T)
    u = np.arange(size) - size // 2
    q = inv[0, 0] * u[:, None] ** 2 + 2 * inv[0, 1] * u[:, None] * u[None, :] + inv[1, 1] * u[None, :] ** 2
    g = np.exp(-0.5 * q)
    return g / g.sum()


def _fit_gaussian_nodes(sites: _Sites, amp: np.ndarray, image: np.ndarray, weight: np.ndarray, k: int,
                        params: np.ndarray, steps: int = 5) -> np.ndarray:
    """(K², 3) the elliptical Gaussian that best explains each node's region (the pixels weighted by the node's
    tent) with the given amplitudes, up to a scale (``image`` without its background): Gauss-Newton from
    ``params``. A few
    parameters per node are well determined even where the spots overlap; they start the PSFs and are what
    their penalty pulls towards."""
    h, w = image.shape
    ty, tx = tent_weights(field_axis(h), k), tent_weights(field_axis(w), k)
    s, reach = sites.size, sites.size // 2 + _TAPS
    data = image.ravel()
    out = params.copy()
    for node in range(k * k):
        ry, rx = ty[:, node // k], tx[:, node % k]
        pw = weight * np.outer(ry, rx)
        ys, xs = np.nonzero(ry)[0], np.nonzero(rx)[0]
        sel = ((sites.pos[:, 0] > ys[0] - reach) & (sites.pos[:, 0] < ys[-1] + reach)
               & (sites.pos[:, 1] > xs[0] - reach) & (sites.pos[:, 1] < xs[-1] + reach))
        sub, a = sites.take(sel), amp[sel, None, None]

        def render(p, sub=sub, a=a):
            return sub.crop(sub.paint(sub.windows(_gaussian(p, s)[None]) * a), image.shape)

        p = out[node]
        for _ in range(steps):
            m0 = render(p)
            cols = [m0] + [(render(p + 1e-3 * e) - m0) / 1e-3 for e in np.eye(3)]
            jac = np.stack([c.ravel() for c in cols], axis=1)
            jw = jac * pw.ravel()[:, None]
            lhs = jac.T @ jw
            lhs += 1e-6 * np.diag(np.diag(lhs)) + 1e-12 * np.trace(lhs) * np.eye(4)
            sol = np.linalg.solve(lhs, jw.T @ data)
            # the scale is linear: a Gauss-Newton step for the shape after it
            step = sol[1:] / max(sol[0], 1e-12)
            p = p + np.clip(step, -0.5, 0.5)
        out[node] = p
    return out


# ----------------------------------------------------------------------------------------- the measurement


def _variance(resid: np.ndarray, model: np.ndarray, floor: float) -> tuple[np.ndarray, tuple[float, float]]:
    """Per-pixel variance ``c0 + c1 * model`` fitted to the squared residuals, at least ``floor``: a line
    through the medians of the squared residuals (over the median of chi-squared with one degree of freedom,
    0.455) in 16 bins of the model's value, robust to the pixels the model misses."""
    r2, m = resid.ravel() ** 2, model.ravel()
    edges = np.unique(np.percentile(m, np.linspace(0, 100, 17)))
    which = np.clip(np.searchsorted(edges, m, side="right") - 1, 0, max(len(edges) - 2, 0))
    xs, ys = [], []
    for b in range(max(len(edges) - 1, 1)):
        sel = which == b
        if sel.sum() >= 10:
            xs.append(float(np.median(m[sel])))
            ys.append(float(np.median(r2[sel])) / 0.4549)
    if len(xs) < 2 or np.ptp(xs) <= 0:
        c0, c1 = float(np.median(r2) / 0.4549), 0.0
    else:
        c1, c0 = np.polyfit(xs, ys, 1)
        if c1 < 0:
            c0, c1 = float(np.median(ys)), 0.0
    return np.maximum(c0 + c1 * model, floor), (float(c0), float(c1))


def _lattice_sites(image: np.ndarray, size: int, k: int, lattice: Lattice | None) -> tuple[np.ndarray, dict]:
    """Every site whose PSF window reaches the frame, and what the detection found; CalibrationError when there
    is no lattice or too few sites for a K x K grid."""
    spots = None
    if lattice is None:
        lattice, spots = find_array(image)
        if lattice is None or lattice.explained < _MIN_EXPLAINED:
            found = "no lattice" if lattice is None else f"a lattice explaining only {lattice.explained:.0%} of them"
            raise CalibrationError(f"no point array found: {spots} spots detected, {found} (a point array needs at "
                                   f"least 20 spots on a regular lattice)")
    reach = size // 2 + _TAPS
    pos, _ = lattice.sites(image.shape, margin=-reach)
    h, w = image.shape
    in_frame = int(np.sum((pos[:, 0] >= 0) & (pos[:, 0] <= h - 1) & (pos[:, 1] >= 0) & (pos[:, 1] <= w - 1)))
    need = max(20, _MIN_SITES_PER_NODE * k * k)
    if in_frame < need:
        raise CalibrationError(f"only {in_frame} lattice sites in the frame, too few for a {k} x {k} PSF grid "
                               f"(at least {need}): image more of the array or choose a smaller grid")
    info = {"spots_detected": spots, "pitch_px": float(lattice.pitch), "lattice_explained": float(lattice.explained),
            "sites_in_frame": in_frame}
    return pos, info


def _first_guess(sites: _Sites, image: np.ndarray, weight: np.ndarray, by: np.ndarray, bx: np.ndarray, k: int,
                 pitch: float, inside: np.ndarray, rounds: int = 3) -> tuple[np.ndarray, float]:
    """(K², S, S) elliptical Gaussians fitted per node (amplitudes solved in between), from round ones a
    quarter of the pitch wide; and the typical amplitude."""
    s = sites.size
    params = np.tile([math.log(min(0.25 * pitch, s / 6.0)), 0.0, math.log(min(0.25 * pitch, s / 6.0))], (k * k, 1))
    psfs = np.stack([_gaussian(p, s) for p in params])
    prior = None
    for _ in range(rounds):
        amp, beta = _solve_amplitudes(sites, sites.windows(psfs), image, weight, by, bx, prior)
        prior = float(np.median(amp[inside]))
        params = _fit_gaussian_nodes(sites, amp, image - by @ beta @ bx.T, weight, k, params)
        psfs = np.stack([_gaussian(p, s) for p in params])
    return psfs, prior


def _widths(h: np.ndarray) -> np.ndarray:
    """(K²,) the FWHM (px) of the Gaussian with the second moments of each (S, S) PSF (its covariance's
    determinant to the 1/4: the geometric mean of the two axes), at least 1."""
    u = np.arange(h.shape[-1]) - h.shape[-1] // 2
    tot = h.sum(axis=(1, 2))
    my, mx = (h.sum(axis=2) @ u) / tot, (h.sum(axis=1) @ u) / tot
    vyy = (h.sum(axis=2) @ u**2) / tot - my**2
    vxx = (h.sum(axis=1) @ u**2) / tot - mx**2
    vxy = np.einsum("nij,i,j->n", h, u, u) / tot - my * mx
    det = np.maximum(vyy * vxx - vxy**2, 1e-12)
    return np.maximum(2.0 * math.sqrt(2.0 * math.log(2.0)) * det**0.25, 1.0)


def _node_residuals(chi2: np.ndarray, k: int) -> np.ndarray:
    """(K, K) tent-weighted mean of a per-pixel map around each node."""
    h, w = chi2.shape
    ty, tx = tent_weights(field_axis(h), k), tent_weights(field_axis(w), k)
    return (ty.T @ chi2 @ tx) / np.outer(ty.sum(axis=0), tx.sum(axis=0))


def _finish(h: np.ndarray, k: int) -> np.ndarray:
    """(K, K, S, S) clipped, centred on their centroids, unit sum."""
    s = h.shape[-1]
    out = np.clip(recentre(np.clip(h, 0.0, None)), 0.0, None)
    sums = out.sum(axis=(1, 2), keepdims=True)
    if np.any(sums <= 0):
        raise CalibrationError("a node PSF came out empty: the array's spots are too faint there; choose a smaller "
                               "grid")
    return (out / sums).reshape(k, k, s, s)


def _alternate(sites: _Sites, image: np.ndarray, weight: np.ndarray, basis: tuple, gauss: np.ndarray,
               env: np.ndarray, prior: float, inside: np.ndarray, floor: float, iterations: int, cg_iterations: int,
               penalties: tuple[float, float], should_stop):
    """Amplitudes, then node PSFs and background, then pixel weights, until the PSFs settle: (psfs, amplitudes,
    model, weights, noise model, iterations, conjugate-gradient steps)."""
    by, bx = basis
    psfs, steps, done, coef = gauss, 0, 0, (float("nan"), float("nan"))
    for done in range(1, iterations + 1):
        if should_stop is not None and should_stop():
            raise CalibrationCancelled("the point-array measurement was stopped")
        amp, beta = _solve_amplitudes(sites, sites.windows(psfs), image, weight, by, bx, prior)
        problem = _PSFProblem.build(sites, amp, weight, image, by, bx, gauss, env, *penalties)
        new, beta, n = problem.solve(psfs, beta, cg_iterations)
        steps += n
        model = problem.model(np.concatenate([new.ravel(), beta.ravel()]))
        total = float(new.sum(axis=(1, 2)).mean())  # amplitudes in light per site, PSFs of unit sum on average
        new, amp = new / total, amp * total
        prior = float(np.median(amp[inside]))
        var, coef = _variance(image - model, model, floor)
        weight = 1.0 / var
        change = float(np.linalg.norm(new - psfs) / max(np.linalg.norm(new), 1e-30))
        psfs = new
        if change < 1e-3:
            break
    return psfs, amp, model, weight, coef, done, steps


def _checked_sizes(grid, psf_size, iterations) -> tuple[int, int]:
    for value, what in ((grid, "grid"), (psf_size, "psf_size"), (iterations, "iterations")):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise CalibrationError(f"{what} must be a whole number, got {value!r}")
        if value < 1:
            raise CalibrationError(f"{what} must be at least 1, got {value}")
    if psf_size < 3 or psf_size % 2 == 0:
        raise CalibrationError(f"psf_size must be odd and at least 3, got {psf_size}")
    return int(grid), int(psf_size)


def measure_array_psfs(image: np.ndarray, *, grid: int, psf_size: int, pixel_size_um: float | None = None,
                       noise: float | None = None, lattice: Lattice | None = None, iterations: int = 8,
                       cg_iterations: int = 25, radial_penalty: float = 1.0, node_smoothing: float = 0.1,
                       should_stop: Callable[[], bool] | None = None) -> tuple[np.ndarray, dict]:
    """A K x K grid of PSFs measured from one image of a point array (see the module docstring).

    Parameters
    ----------
    image
        (H, W) one focal-plane image of the array (camera units; a constant offset is fine).
    grid
        K: the node PSFs sit at ``linspace(-1, 1, K)`` of the normalised field, as
        :class:`~napari_coordgate.optics.measured.MeasuredGridPSF` has them.
    psf_size
        S, odd: each node PSF is S x S pixels and zero outside.
    pixel_size_um
        Camera pixel size in the specimen plane, only recorded in the diagnostics.
    noise
        The background noise's standard deviation (image units) to start the pixel weights from (default
        measured from the image); the weights then follow the fitted read + shot noise model.
    lattice
        The sites' lattice when known (e.g. from the array's design); default found in the image's spots.
    iterations, cg_iterations
        Outer alternations (amplitudes, then PSFs) at most, and conjugate-gradient steps per active-set round.
    radial_penalty, node_smoothing
        The PSFs' regularisation relative to the data: at the S x S square's inscribed circle, and between
        neighbouring nodes.
    should_stop
        Called before each alternation; True raises :class:`~napari_coordgate.calibration.CalibrationCancelled`.

    Returns
    -------
    psfs : ndarray (K, K, S, S)
        Non-negative, unit sum, centroids on the middle pixel.
    diagnostics : dict
        ``sites`` (modelled, in and around the frame), ``sites_in_frame``, ``sites_lit`` / ``sites_missing``
        (in the frame, amplitude above / below a quarter of the median), ``pitch_px``, ``lattice_explained``,
        ``spots_detected``, ``residual`` ((K, K) mean squared residual over the fitted noise variance around
        each node: 1 at the noise), ``iterations``, ``cg_steps``, ``noise_model`` ((c0, c1) of the variance
        ``c0 + c1 * model``), ``positions`` (N, 2), ``amplitudes`` (N,), ``pixel_size_um``, ``seconds``.

    Raises
    ------
    CalibrationError
        No lattice in the image, too few sites for the grid, or bad arguments.
    """
    t0 = time.perf_counter()
    image = _checked_image(image)
    k, s = _checked_sizes(grid, psf_size, iterations)
    pos, info = _lattice_sites(image, s, k, lattice)
    sites = _Sites.build(pos, image.shape, k, s)
    h, w = image.shape
    kb = 2  # a bilinear background: where spots overlap, a freer one would trade places with their wings
    by, bx = tent_weights(field_axis(h), kb), tent_weights(field_axis(w), kb)
    sigma = robust_noise(image) if noise is None else float(noise)
    floor = max((0.1 * sigma) ** 2, 1e-12)  # no pixel weighs more than 100 background pixels
    weight = np.full(image.shape, 1.0 / max(sigma**2, floor))
    inside = (pos[:, 0] >= 0) & (pos[:, 0] <= h - 1) & (pos[:, 1] >= 0) & (pos[:, 1] <= w - 1)
    gauss, prior = _first_guess(sites, image, weight, by, bx, k, info["pitch_px"], inside)
    # the penalty grows with the distance from the centre relative to each node's own width (corner PSFs may be
    # several times the centre's) and pulls towards the Gaussian guess, not towards nothing
    env = _ENVELOPE * _widths(gauss)[:, None, None]
    psfs, amp, model, weight, coef, done, steps = _alternate(
        sites, image, weight, (by, bx), gauss, env, prior, inside, floor, iterations, cg_iterations,
        (radial_penalty, node_smoothing), should_stop)
    lit = amp > 0.25 * np.median(amp[inside])
    info.update(sites=len(sites), sites_lit=int((lit & inside).sum()), sites_missing=int((~lit & inside).sum()),
                residual=_node_residuals((image - model) ** 2 * weight, k), iterations=done, cg_steps=steps,
                noise_model=coef, positions=pos, amplitudes=amp, pixel_size_um=pixel_size_um)
    return _finish(psfs, k), {**info, "seconds": time.perf_counter() - t0}


def default_psf_size(lattice: Lattice) -> int:
    """The node PSFs' side for an array of this lattice: four pitches (a dense array's spots reach about that far),
    odd, 11 to 51 px."""
    n = int(np.clip(round(4.0 * lattice.pitch), 11, 51))
    return n + 1 - n % 2


def array_calibration(image: np.ndarray, settings: dict, *, should_stop=None, source=None, t0: float | None = None):
    """:func:`~napari_coordgate.calibration.calibrate.calibrate`'s result for one image of a point array: the node
    PSFs of :func:`measure_array_psfs` as a measured grid (K from ``settings["grid"]``, default 5; the side from
    ``settings["psf_size"]``, default :func:`default_psf_size`), the lattice sites as the bead table (lit sites
    accepted, unlit ones rejected as too faint), the mean normalised residual as the grid's residual."""
    from napari_coordgate.calibration.detect import empty_table
    from napari_coordgate.calibration.result import CalibrationResult
    from napari_coordgate.optics.measured import MeasuredGridPSF

    t0 = time.perf_counter() if t0 is None else t0
    image = _checked_image(image).astype(np.float64)
    lattice, count = find_array(image)
    if lattice is None or lattice.explained < _MIN_EXPLAINED:
        raise CalibrationError(f"no point array found: {count} spots detected and no lattice explains "
                               f"{_MIN_EXPLAINED:.0%} of them; calibrate scattered beads with target 'beads'")
    k = int(settings.get("grid") or 5)
    size = int(settings.get("psf_size") or default_psf_size(lattice))
    psfs, diag = measure_array_psfs(image, grid=k, psf_size=size, pixel_size_um=settings.get("pixel_size_um"),
                                    lattice=lattice, should_stop=should_stop)
    h, w = image.shape
    pos, amp = np.asarray(diag["positions"]), np.asarray(diag["amplitudes"])
    inside = (pos[:, 0] >= 0) & (pos[:, 0] <= h - 1) & (pos[:, 1] >= 0) & (pos[:, 1] <= w - 1)
    pos, amp = pos[inside], amp[inside]
    table = empty_table(len(pos), 0)
    table.y, table.x = pos[:, 0], pos[:, 1]
    table.y_norm, table.x_norm = field_position(pos[:, 0], h), field_position(pos[:, 1], w)
    table.peak = amp
    dark = amp < 0.25 * np.median(amp[amp > 0]) if (amp > 0).any() else np.ones(len(amp), bool)
    table.reject(dark, "too faint", "a lattice site without light (a missing or blocked hole)")
    src = [source] if isinstance(source, str) else list(source or [])
    prov = {"source": src, "target": "array", "sites": int(diag["sites_lit"]), "pitch_px": round(lattice.pitch, 3),
            "lattice_explained": round(float(lattice.explained), 3)}
    model = MeasuredGridPSF(psfs, pixel_size_um=settings.get("pixel_size_um"), name="point array" if not src else
                            "measured from " + ", ".join(src), provenance=prov, blur_grid=k)
    warnings = [f"measured as a point array: {diag['sites_lit']} lit sites of {diag['sites_in_frame']} in the frame, "
                f"pitch {lattice.pitch:.1f} px; every site modelled jointly"]
    return CalibrationResult(model, "grid", {"grid": float(np.mean(diag["residual"])), "pupil": None}, table, warnings,
                             {"grid": model}, (h, w), size, [float(robust_noise(image))], settings=dict(settings),
                             seconds=time.perf_counter() - t0, device="cpu")
