"""Fit the pupil model with field-polynomial aberrations (:class:`~napari_coordgate.optics.pupil_poly.PupilPolyPSF`)
to all beads jointly, with torch autograd.

:class:`TorchPupil` is the package's one pupil PSF (:class:`napari_coordgate.optics.psf.Pupil`: torch, differentiable,
a sub-pixel shift of each PSF as a linear phase across the pupil), sampled for the aberrations a fit may reach,
with the PSFs' analytic derivatives.

The fit minimises ``sum_b ||D_b - a_b PSF(c(x_b, y_b), shift_b) - o_b||² / noise_b²`` over the 36 polynomial
coefficients ``C`` (6 Zernike terms x 6 monomials) and each bead's shift. Each bead's amplitude ``a_b`` and
offset ``o_b`` are solved in closed form inside the loss (variable projection), so L-BFGS only sees ``C`` and the
shifts. The even Zernike terms (defocus, astigmatism, spherical) have zero gradient at zero aberration and the
in-focus PSF cannot tell their common sign, so the fit starts from a few small positive defocus values (a
constants-only model on a subset of beads) and keeps the best.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from napari_coordgate.calibration.patches import fit_amplitude_shift
from napari_coordgate.coords import grid_positions
from napari_coordgate.optics.psf import ZERNIKE_TERMS, PSFConfig, Pupil, pupil_samples
from napari_coordgate.optics.pupil_poly import MONOMIALS, PupilPolyPSF, monomials

__all__ = ["TorchPupil", "PupilFit", "fit_pupil_poly"]


class TorchPupil(Pupil):
    """The pupil PSFs of one set of optics (:class:`~napari_coordgate.optics.psf.Pupil`), for fitting: built from
    the optics alone, sampled for the aberrations a fit may reach, with the PSFs' analytic derivatives.

    Parameters
    ----------
    na, wavelength_um, refractive_index, pixel_size_um
        The optics.
    psf_size
        PSF side in camera pixels (odd).
    oversample
        Sub-samples per pixel and axis (odd); raised to Nyquist as :class:`PSFConfig` does.
    pupil_samples
        Pupil samples across the diameter (even); default: what :func:`pupil_samples` gives an unaberrated
        pupil of these optics. Larger aberrations need more (see :meth:`for_aberrations`).
    device, dtype
        Torch device, and ``torch.float32`` or ``torch.float64`` (complex64 / complex128 inside).
    """

    def __init__(self, na: float, wavelength_um: float, refractive_index: float, pixel_size_um: float,
                 psf_size: int, oversample: int = 3, pupil_samples: int | None = None, *,
                 device: "str | torch.device" = "cpu", dtype: torch.dtype = torch.float64):
        super().__init__(_optics(na, wavelength_um, refractive_index, pixel_size_um, psf_size, oversample),
                         pupil_samples, device=device, dtype=dtype)

    @classmethod
    def for_aberrations(cls, na: float, wavelength_um: float, refractive_index: float, pixel_size_um: float,
                        psf_size: int, bound: np.ndarray, oversample: int = 3, **kwargs) -> "TorchPupil":
        """A pupil sampled finely enough (for fitting) for Zernike coefficients up to ``bound`` (6, waves RMS)."""
        b = np.minimum(np.abs(np.asarray(bound, dtype=np.float64)), 3.0)
        worst = b.copy()
        worst[1:3] = b[1] + b[2]
        worst[3:5] = b[3] + b[4]
        # a quarter of the margin against phase wrapping that PSFConfig's PSFs get: for fitting, a pupil this fine
        # changes the PSF by well under 1 % (the soft aperture edge dominates), and the fit is several times faster
        cfg = _optics(na, wavelength_um, refractive_index, pixel_size_um, psf_size, oversample)
        return cls(na, wavelength_um, refractive_index, pixel_size_um, psf_size, oversample,
                   pupil_samples(cfg, worst, margin=1.0), **kwargs)

    def psfs_and_derivatives(self, coeffs: torch.Tensor, shifts: torch.Tensor
                             ) -> tuple[torch.Tensor, torch.Tensor]:
        """PSFs (N, s, s) and their derivatives (N, 8, s, s) with respect to the 6 Zernike coefficients and the
        shift (dy, dx), analytically: d|E|² = 2 Re(conj(E) dE), dE the field of the pupil times the derivative
        of its phase; then the binning and the unit-sum normalisation."""
        coeffs = coeffs.to(device=self.device, dtype=self.dtype)
        shifts = shifts.to(device=self.device, dtype=self.dtype)
        n = coeffs.shape[0]
        pupil = torch.polar(self.amplitude.expand(n, -1), self.phase(coeffs, shifts))  # (N, M²)
        gens = torch.cat([self.basis, -self.fy[None], -self.fx[None]])  # d(phase)/d(param) / 2 pi, (8, M²)
        dpupil = (2j * math.pi) * gens[None] * pupil[:, None]  # (N, 8, M²)
        allp = torch.cat([pupil[:, None], dpupil], dim=1).reshape(n * 9, -1)
        fields = self.fields(allp)
        fields = fields.reshape(n, 9, *fields.shape[1:])
        e, de = fields[:, 0], fields[:, 1:]
        inten = e.real**2 + e.imag**2
        dinten = 2 * (e.real[:, None] * de.real + e.imag[:, None] * de.imag)
        s, o = self.size, self.os
        b = inten.reshape(n, s, o, s, o).sum(dim=(2, 4))
        db = dinten.reshape(n, 8, s, o, s, o).sum(dim=(3, 5))
        tot = b.sum(dim=(1, 2))
        psf = b / tot[:, None, None]
        dpsf = (db - psf[:, None] * db.sum(dim=(2, 3))[:, :, None, None]) / tot[:, None, None, None]
        return psf, dpsf


def _optics(na: float, wavelength_um: float, refractive_index: float, pixel_size_um: float, psf_size: int,
            oversample: int) -> PSFConfig:
    return PSFConfig(na=na, wavelength_um=wavelength_um, refractive_index=refractive_index,
                     pixel_size_um=pixel_size_um, psf_size=psf_size, oversample=oversample)


class _Joint:
    """The joint least-squares problem of the beads: model of bead b ``a_b PSF(phi_b C^T, shift_b) + o_b``."""

    def __init__(self, pupil: TorchPupil, data: np.ndarray, noise: np.ndarray, phi: np.ndarray, chunk: int):
        self.pupil, self.chunk = pupil, chunk
        kw = {"device": pupil.device, "dtype": pupil.dtype}
        self.n = data.shape[0]
        self.d = torch.as_tensor(data.reshape(self.n, -1), **kw)
        self.w = torch.as_tensor(1.0 / np.maximum(noise, 1e-30) ** 2, **kw)
        self.ph = torch.as_tensor(phi, **kw)

    def evaluate(self, theta: torch.Tensor, shifts: torch.Tensor):
        """(amplitudes, offsets, chi2 per bead) at the coefficients ``theta`` and ``shifts``."""
        psf = torch.cat([self.pupil.psfs(self.ph[b] @ theta.to(self.pupil.dtype).T, shifts[b].to(self.pupil.dtype))
                         .reshape(-1, self.d.shape[1]) for b in self._chunks()])
        a, o = _solve_amplitude_offset(psf, self.d)
        r = self.d - a[:, None] * psf - o[:, None]
        return a, o, (r * r).sum(1) * self.w

    def _chunks(self):
        return [slice(c, c + self.chunk) for c in range(0, self.n, self.chunk)]

    def normal_equations(self, theta, shifts, amp, off, weights):
        """Blocks of JᵀWJ and JᵀWr: shared A (P x P) and g_a, per bead B (N, P, 4), D (N, 4, 4) and g_d (N, 4),
        accumulated chunk by chunk (the P Jacobian columns of every pixel of every bead would not fit at once).
        The 4 per-bead unknowns are dy, dx, amplitude, offset."""
        f64 = {"dtype": torch.float64, "device": self.pupil.device}
        npar = theta.numel()
        big_a, g_a = torch.zeros(npar, npar, **f64), torch.zeros(npar, **f64)
        cross, local, g_d = [], [], []
        for b in self._chunks():
            p, dp = self.pupil.psfs_and_derivatives(self.ph[b] @ theta.to(self.pupil.dtype).T,
                                                    shifts[b].to(self.pupil.dtype))
            p, dp = p.reshape(p.shape[0], -1), dp.reshape(dp.shape[0], 8, -1)
            ab = amp[b]
            r = (self.d[b] - ab[:, None] * p - off[b, None]).to(torch.float64)
            jt = ((ab[:, None, None] * dp[:, :6])[:, :, None, :] * self.ph[b, None, :, None]).reshape(
                p.shape[0], npar, -1).to(torch.float64)
            jl = torch.stack([ab[:, None] * dp[:, 6], ab[:, None] * dp[:, 7], p, torch.ones_like(p)], 1)
            jl, wc = jl.to(torch.float64), weights[b]
            big_a += torch.einsum("n,nip,njp->ij", wc, jt, jt)
            g_a += torch.einsum("n,nip,np->i", wc, jt, r)
            cross.append(torch.einsum("n,nip,njp->nij", wc, jt, jl))
            local.append(torch.einsum("n,nip,njp->nij", wc, jl, jl))
            g_d.append(torch.einsum("n,njp,np->nj", wc, jl, r))
        return big_a, g_a, torch.cat(cross), torch.cat(local), torch.cat(g_d)

    @staticmethod
    def damped_step(blocks, lam: float):
        """The Levenberg-Marquardt step through the Schur complement: eliminate each bead's 4 unknowns, solve the
        shared ones, substitute back. Returns (shared step (P,), per-bead steps (N, 4))."""
        big_a, g_a, cross, local, g_d = blocks
        eye4 = torch.eye(4, dtype=torch.float64, device=big_a.device)
        d_damped = local + torch.diag_embed(lam * torch.clamp(torch.diagonal(local, dim1=1, dim2=2), min=1e-12))
        d_damped = d_damped + 1e-12 * eye4
        d_inv_bt = torch.linalg.solve(d_damped, cross.transpose(1, 2))  # (N, 4, P)
        d_inv_g = torch.linalg.solve(d_damped, g_d[:, :, None])[..., 0]  # (N, 4)
        schur = big_a + torch.diag(lam * torch.clamp(torch.diagonal(big_a), min=1e-12))
        schur = schur - torch.einsum("nij,njk->ik", cross, d_inv_bt)
        x = torch.linalg.solve(schur + 1e-12 * torch.eye(schur.shape[0], dtype=torch.float64, device=big_a.device),
                               g_a - torch.einsum("nij,nj->i", cross, d_inv_g))
        return x, d_inv_g - torch.einsum("nji,i->nj", d_inv_bt, x)


def _cauchy(c2: torch.Tensor) -> torch.Tensor:
    return 1.0 / (1.0 + (c2 / (3.0 * torch.median(c2))) ** 2)


def _lm_fit(pupil: TorchPupil, data: np.ndarray, noise: np.ndarray, phi: np.ndarray, coef0: np.ndarray,
            shift0: np.ndarray, iterations: int, *, robust: bool = True, should_stop=None, on_iteration=None,
            report_total: int | None = None, report_offset: int = 0, chunk: int = 64):
    """Levenberg-Marquardt on the shared polynomial coefficients and every bead's shift, amplitude and offset.

    The model of bead b is ``a_b PSF(phi_b C^T, shift_b) + o_b``; the Jacobian is analytic
    (:meth:`TorchPupil.psfs_and_derivatives`) and the normal equations (36 shared + 4 per bead unknowns) are
    solved through their Schur complement, so the cost grows linearly with the number of beads.
    Robust: Cauchy weights of each bead's misfit over the median misfit, updated every iteration.

    Returns (coefficients (6, 6), shifts (N, 2), chi2 per bead, robust weights, iterations, stopped).
    """
    dev = pupil.device
    problem = _Joint(pupil, data, noise, phi, chunk)
    theta = torch.tensor(np.array(coef0, dtype=np.float64), device=dev)
    shifts = torch.as_tensor(shift0, dtype=torch.float64, device=dev).clone()
    amp, off, c2 = problem.evaluate(theta, shifts)
    u = _cauchy(c2) if robust else torch.ones_like(c2)
    cost, lam, done, stopped = float((u * c2).sum()), 1e-3, 0, False
    while done < iterations:
        blocks = problem.normal_equations(theta, shifts, amp, off, (problem.w * u).to(torch.float64))
        improved = False
        for _ in range(8):
            x, loc = _Joint.damped_step(blocks, lam)
            th_new, sh_new = theta + x.reshape(theta.shape), shifts + loc[:, :2].clamp(-1.0, 1.0)
            a_new, o_new, c2_new = problem.evaluate(th_new, sh_new)
            new_cost = float((u * c2_new).sum())
            if math.isfinite(new_cost) and new_cost < cost:
                theta, shifts, amp, off, c2 = th_new, sh_new, a_new, o_new, c2_new
                lam, improved = max(lam / 3.0, 1e-9), True
                break
            lam *= 8.0
        done += 1
        old = cost
        if robust:
            u = _cauchy(c2)
        cost = float((u * c2).sum())
        if on_iteration is not None:
            on_iteration(report_offset + done, report_total or iterations, cost / (float(u.sum()) * data[0].size))
        if not improved or abs(old - cost) <= 1e-6 * abs(old):
            break
        if should_stop is not None and should_stop():
            stopped = True
            break
    return (theta.cpu().numpy(), shifts.cpu().numpy(), c2.cpu().numpy(), u.cpu().numpy(), done, stopped)


@dataclass
class PupilFit:
    """The fitted model and how the fit went."""

    model: PupilPolyPSF
    loss: float  # mean squared residual / noise² per pixel (about 1 for a perfect model, more with shot noise)
    iterations: int
    seconds: float
    stopped: bool
    shifts: np.ndarray  # (N, 2) fitted sub-pixel shifts of the beads
    weights: np.ndarray  # (N,) final robust weight of each bead (1 = trusted)


def _solve_amplitude_offset(psf: torch.Tensor, data: torch.Tensor, pixel_w: torch.Tensor | None = None
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Closed-form least-squares amplitude and offset of ``data ≈ a psf + o`` per row (no gradient needed:
    at the optimum the loss's gradient does not depend on how a and o move, variable projection)."""
    with torch.no_grad():
        npx = psf.shape[1]
        sp, sd = psf.sum(1), data.sum(1)
        spp, spd = (psf * psf).sum(1), (psf * data).sum(1)
        det = spp * npx - sp * sp
        a = (spd * npx - sp * sd) / det
        o = (spp * sd - sp * spd) / det
    return a, o


def _lm_independent(pupil: TorchPupil, data: np.ndarray, coef0: np.ndarray, iterations: int,
                    should_stop=None) -> tuple[np.ndarray, np.ndarray, bool]:
    """Levenberg-Marquardt of independent problems: each (s, s) square its own constant Zernike coefficients,
    shift, amplitude and offset (10 unknowns, a 10 x 10 system per square, its own damping).

    Returns (coefficients (N, 6), chi2 per square (unit noise), stopped).
    """
    dev = pupil.device
    n = data.shape[0]
    d = torch.as_tensor(data.reshape(n, -1), device=dev, dtype=pupil.dtype)
    coef = torch.as_tensor(coef0, device=dev, dtype=pupil.dtype).clone()
    shifts = torch.zeros(n, 2, device=dev, dtype=pupil.dtype)

    def cost_of(c, sh):
        psf = pupil.psfs(c, sh).reshape(n, -1)
        a, o = _solve_amplitude_offset(psf, d)
        r = d - a[:, None] * psf - o[:, None]
        return (r * r).sum(1), psf, a, o

    cost, psf, amp, off = cost_of(coef, shifts)
    lam = torch.full((n,), 1e-3, device=dev, dtype=torch.float64)
    stopped = False
    for _ in range(iterations):
        with torch.no_grad():
            psf, dpsf = pupil.psfs_and_derivatives(coef, shifts)
            psf, dpsf = psf.reshape(n, -1), dpsf.reshape(n, 8, -1)
            r = d - amp[:, None] * psf - off[:, None]
            jac = torch.cat([amp[:, None, None] * dpsf, psf[:, None], torch.ones_like(psf)[:, None]], 1)
            jac = jac.to(torch.float64)
            h = jac @ jac.transpose(1, 2)  # (N, 10, 10)
            g = (jac @ r.to(torch.float64)[:, :, None])[..., 0]
            diag = torch.clamp(torch.diagonal(h, dim1=1, dim2=2), min=1e-12)
            step = torch.linalg.solve(h + lam[:, None, None] * torch.diag_embed(diag)
                                      + 1e-12 * torch.eye(10, dtype=torch.float64, device=dev), g)
            step = step.to(pupil.dtype)
            c_new = coef + step[:, :6]
            s_new = shifts + step[:, 6:8].clamp(-1.0, 1.0)
            new, p_new, a_new, o_new = cost_of(c_new, s_new)
            better = torch.isfinite(new) & (new < cost)
            coef = torch.where(better[:, None], c_new, coef)
            shifts = torch.where(better[:, None], s_new, shifts)
            amp = torch.where(better, a_new, amp)
            off = torch.where(better, o_new, off)
            cost = torch.where(better, new, cost)
            lam = torch.where(better, lam / 3.0, lam * 8.0).clamp(1e-9, 1e9)
        if should_stop is not None and should_stop():
            stopped = True
            break
    return coef.cpu().numpy().astype(np.float64), cost.cpu().numpy().astype(np.float64), stopped


def _align_signs(even: np.ndarray, design: np.ndarray) -> np.ndarray:
    """±1 per node making the nodes' even Zernike terms (N, E) best described by a polynomial of ``design`` (N, P).

    The in-focus PSF cannot tell the sign of the even terms (defocus, astigmatism, spherical) as a group, so each
    node fit may land on either; the right choice is the one a smooth field law agrees with.
    """
    n = even.shape[0]
    resid = np.eye(n) - design @ np.linalg.pinv(design)
    q = resid * (even @ even.T)
    if n <= 16:
        signs = np.array(np.meshgrid(*[[1.0, -1.0]] * (n - 1), indexing="ij")).reshape(n - 1, -1).T
        signs = np.concatenate([np.ones((signs.shape[0], 1)), signs], axis=1)
        cost = np.einsum("ki,ij,kj->k", signs, q, signs)
        return signs[int(np.argmin(cost))]
    s = np.ones(n)  # greedy flips for larger sets
    for _ in range(4 * n):
        gains = [(s @ q @ s) - ((s * np.where(np.arange(n) == i, -1, 1)) @ q @ (s * np.where(np.arange(n) == i, -1, 1)))
                 for i in range(n)]
        i = int(np.argmax(gains))
        if gains[i] <= 0:
            break
        s[i] = -s[i]
    return s


_EVEN = [ZERNIKE_TERMS.index(t) for t in ("defocus", "astig_0", "astig_45", "spherical")]


def init_from_nodes(node_psfs: np.ndarray, *, na: float, wavelength_um: float, refractive_index: float,
                    pixel_size_um: float, device: "str | torch.device" = "cpu", nodes_per_axis: int = 3,
                    iterations: int = 25, should_stop=None) -> tuple[np.ndarray, bool]:
    """Starting polynomial coefficients from PSFs measured on a grid (e.g. the measured-grid model's nodes).

    A pupil with constant aberrations is fitted to the core of each of up to ``nodes_per_axis``² node PSFs from
    several starts (defocus 0.1 / 0.35 waves, without astigmatism and with astigmatism along and across the node
    PSF's long axis; Levenberg-Marquardt, :func:`_lm_independent`), the best start per node is kept, the group
    signs of the even terms are made consistent across the field
    (:func:`_align_signs`) and a quadratic is fitted through the nodes' coefficients.

    Returns (coefficients (6, 6), stopped).
    """
    k, _, s, _ = node_psfs.shape
    idx = np.unique(np.round(np.linspace(0, k - 1, min(k, nodes_per_axis))).astype(int))
    t = grid_positions(k)
    ii, jj = np.meshgrid(idx, idx, indexing="ij")
    ii, jj = ii.ravel(), jj.ravel()
    # the core holds what the start needs; a smaller square makes the many start fits cheap
    w = min(s, 19)
    lo = (s - w) // 2
    psfs = node_psfs[ii, jj][:, lo : lo + w, lo : lo + w]
    yn, xn = t[ii], t[jj]
    # the long axis of each node PSF (second moments) orients the astigmatic starts
    c = np.arange(w) - w // 2
    yy, xx = np.meshgrid(c, c, indexing="ij")
    tot = psfs.sum(axis=(1, 2))
    my = (psfs * yy).sum(axis=(1, 2)) / tot
    mx = (psfs * xx).sum(axis=(1, 2)) / tot
    sxx = (psfs * (xx - mx[:, None, None]) ** 2).sum(axis=(1, 2)) / tot
    syy = (psfs * (yy - my[:, None, None]) ** 2).sum(axis=(1, 2)) / tot
    sxy = (psfs * (xx - mx[:, None, None]) * (yy - my[:, None, None])).sum(axis=(1, 2)) / tot
    two_theta = np.arctan2(2 * sxy, sxx - syy)
    starts = [(d0, a) for d0 in (0.1, 0.35) for a in (0.0, 0.12, -0.12)]
    nn, ns = len(ii), len(starts)
    coef0 = np.zeros((ns * nn, len(ZERNIKE_TERMS)))
    for si, (d0, a) in enumerate(starts):
        coef0[si * nn : (si + 1) * nn, 0] = d0
        coef0[si * nn : (si + 1) * nn, 1] = a * np.cos(two_theta)
        coef0[si * nn : (si + 1) * nn, 2] = a * np.sin(two_theta)
    dev = torch.device(device)
    pupil = TorchPupil.for_aberrations(na, wavelength_um, refractive_index, pixel_size_um, w,
                                       bound=np.array([0.6, 0.35, 0.35, 0.2, 0.2, 0.15]), device=dev,
                                       dtype=torch.float32)
    data = np.tile(psfs / psfs.max(axis=(1, 2), keepdims=True), (ns, 1, 1))
    theta, c2, stopped = _lm_independent(pupil, data, coef0, iterations, should_stop=should_stop)
    best = np.argmin(c2.reshape(ns, nn), axis=0)
    coef = theta.reshape(ns, nn, -1)[best, np.arange(nn)]  # (nodes, 6)
    design = monomials(yn, xn)
    if nn < design.shape[1]:  # too few nodes for a quadratic: constants only
        design = design[:, :1]
    signs = _align_signs(coef[:, _EVEN], design)
    coef[:, _EVEN] *= signs[:, None]
    fit = np.linalg.lstsq(design, coef, rcond=None)[0].T  # (6, P)
    out = np.zeros((len(ZERNIKE_TERMS), len(MONOMIALS)))
    out[:, : fit.shape[1]] = fit
    return out, stopped


def fit_pupil_poly(
    data: np.ndarray,
    y_norm: np.ndarray,
    x_norm: np.ndarray,
    shifts: np.ndarray,
    noise: np.ndarray,
    *,
    na: float,
    wavelength_um: float,
    refractive_index: float,
    pixel_size_um: float,
    grid: int = 7,
    device: "str | torch.device" = "cpu",
    init: np.ndarray | None = None,
    node_psfs: np.ndarray | None = None,
    max_iterations: int = 40,
    subset: int = 120,
    polish_iterations: int = 6,
    extent_energy: float | None = 0.99,
    should_stop: Callable[[], bool] | None = None,
    on_iteration: Callable[[int, int, float], None] | None = None,
    chunk: int = 64,
) -> PupilFit:
    """Fit a :class:`PupilPolyPSF` to raw bead squares, all beads jointly.

    Parameters
    ----------
    data, y_norm, x_norm, shifts, noise
        (N, s, s) raw bead squares (not background-subtracted) centred on the pixel nearest each bead; their
        normalised field positions (N,); sub-pixel centres from the middle pixel (N, 2), where the shifts start;
        the background noise of each bead's image (N,), the residual weights.
    na, wavelength_um, refractive_index, pixel_size_um
        The optics.
    grid, device
        K of the fitted model's blur grid; torch device (float32 computation).
    init, node_psfs
        The start: (6, 6) coefficients (e.g. a previous fit), else a fit through (K, K, s, s) PSFs measured on a
        grid (:func:`init_from_nodes`), else a multi-start of constants.
    max_iterations, subset, polish_iterations
        Levenberg-Marquardt iterations on at most ``subset`` beads spread over the field, then on all beads.
    extent_energy
        The model's PSF side holds this fraction of the light everywhere (:func:`extent`; at least the data's
        side); None keeps the data's side.
    should_stop, on_iteration, chunk
        Checked between iterations (True ends the fit with the coefficients so far, ``stopped``); called as
        ``on_iteration(done, total, loss)``; beads per forward pass (bounds memory).
    """
    t0 = time.perf_counter()
    optics = dict(na=na, wavelength_um=wavelength_um, refractive_index=refractive_index, pixel_size_um=pixel_size_um)
    fit = _JointFit(data, monomials(y_norm, x_norm), np.asarray(shifts, dtype=np.float64), noise, optics,
                    torch.device(device), should_stop, on_iteration, chunk)
    if init is not None:
        coef0, stopped = np.asarray(init, dtype=np.float64), False
    elif node_psfs is not None:
        coef0, stopped = init_from_nodes(node_psfs, **optics, device=fit.device, should_stop=should_stop)
    else:
        coef0, stopped = fit.constant_start()
    if not stopped:
        coef0, stopped = fit.refine(coef0, max_iterations, subset, polish_iterations)
    coef0 = _limit(coef0)
    size = extent(coef0, optics, data.shape[-1], energy=extent_energy) if extent_energy else data.shape[-1]
    model = PupilPolyPSF(coef0, **optics, psf_size=size, grid=grid, name="pupil fit")
    return PupilFit(model, fit.loss, fit.iterations, time.perf_counter() - t0, stopped, fit.shifts, fit.weights)


class _JointFit:
    """The stages of :func:`fit_pupil_poly` on one set of beads."""

    def __init__(self, data, phi, shift0, noise, optics, device, should_stop, on_iteration, chunk):
        self.data, self.phi, self.shift0, self.noise = data, phi, shift0, noise
        self.optics, self.device, self.chunk = optics, device, chunk
        self.should_stop, self.on_iteration = should_stop, on_iteration
        self.n, self.s = data.shape[0], data.shape[-1]
        self.iterations, self.loss = 0, math.nan
        self.shifts, self.weights = shift0.copy(), np.ones(self.n)

    def constant_start(self) -> tuple[np.ndarray, bool]:
        """Constant coefficients from a few small defocus values, on a subset of beads."""
        n = self.n
        sub = np.arange(n) if n <= 48 else np.linspace(0, n - 1, 48).round().astype(int)
        pupil = TorchPupil.for_aberrations(**self.optics, psf_size=self.s,
                                           bound=np.array([0.6, 0.35, 0.35, 0.2, 0.2, 0.15]), device=self.device,
                                           dtype=torch.float32)
        best, stopped = None, False
        for d0 in (0.1, 0.35):
            start = np.zeros((len(ZERNIKE_TERMS), 1))
            start[0, 0] = d0
            th, _, c2, u, it, stopped = _lm_fit(pupil, self.data[sub], self.noise[sub], self.phi[sub, :1], start,
                                                self.shift0[sub], 15, should_stop=self.should_stop, chunk=self.chunk)
            self.iterations += it
            loss = float(np.sum(u * c2))
            if best is None or loss < best[1]:
                best = (th[:, 0], loss)
            if stopped:
                break
        coef0 = np.zeros((len(ZERNIKE_TERMS), len(MONOMIALS)))
        coef0[:, 0] = best[0]
        return coef0, stopped

    def refine(self, coef0: np.ndarray, max_iterations: int, subset: int, polish: int) -> tuple[np.ndarray, bool]:
        """From ``coef0``: the shifts by cross-correlation, LM on a subset, then on all beads."""
        n, data, phi, noise = self.n, self.data, self.phi, self.noise
        total = max_iterations + polish
        # the pupil sampled for what the field may reach: the start's range, with room to grow
        bound = PupilPolyPSF._bound(coef0) * 1.5 + 0.15
        pupil = TorchPupil.for_aberrations(**self.optics, psf_size=self.s, bound=bound, device=self.device,
                                           dtype=torch.float32)
        # start each bead's shift where the starting model's PSF matches it best: a comatic pupil PSF's centre
        # can sit a pixel or more from the detector's Gaussian centre, too far for the gradient to find
        with torch.no_grad():
            start = torch.as_tensor(phi @ coef0.T, device=self.device, dtype=torch.float32)
            model0 = torch.cat([pupil.psfs(start[a : a + self.chunk]) for a in range(0, n, self.chunk)])
        self.shifts = fit_amplitude_shift(model0.cpu().numpy().astype(np.float64), data, self.shift0, noise)["shift"]
        common = {"should_stop": self.should_stop, "on_iteration": self.on_iteration, "report_total": total,
                  "chunk": self.chunk}
        stopped = False
        if n > subset:  # most iterations on a subset spread over the field (the beads come in table order)
            sub = np.unique(np.linspace(0, n - 1, subset).round().astype(int))
            coef0, sh, _, _, it, stopped = _lm_fit(pupil, data[sub], noise[sub], phi[sub], coef0, self.shifts[sub],
                                                   max_iterations, **common)
            self.shifts[sub] = sh
            self.iterations += it
        else:
            polish = total
        if not stopped:
            coef0, self.shifts, c2, self.weights, it, stopped = _lm_fit(
                pupil, data, noise, phi, coef0, self.shifts, polish, report_offset=total - polish, **common)
            self.iterations += it
            self.loss = float(np.sum(self.weights * c2) / (np.sum(self.weights) * self.s * self.s))
        return coef0, stopped


def extent(coef: np.ndarray, optics: dict, min_size: int, energy: float = 0.99, max_size: int = 63) -> int:
    """Odd PSF side (at least ``min_size``) that holds ``energy`` of the light everywhere in the field.

    The fitted pupil describes the PSF beyond the window it was fitted in: the model keeps the halo the window
    cut (otherwise every PSF would be normalised without it, and too bright in its core).
    """
    big = max(min_size, max_size)
    big -= 1 - big % 2
    probe = PupilPolyPSF(coef, **optics, psf_size=big)
    t = np.array([-1.0, 0.0, 1.0])
    yy, xx = np.meshgrid(t, t, indexing="ij")
    psfs = probe.psfs_at(yy.ravel(), xx.ravel())
    half = big // 2
    c = np.arange(big) - half
    cheb = np.maximum(np.abs(c)[:, None], np.abs(c)[None, :])  # square windows
    inside = np.array([[p[cheb <= r].sum() for r in range(half + 1)] for p in psfs])  # (9, half + 1)
    need = int(np.max(np.argmax(inside >= energy, axis=1)))
    return int(np.clip(2 * need + 1, min_size, big))


def _limit(coef: np.ndarray) -> np.ndarray:
    """Scale a runaway fit back inside the model's supported range (3 waves RMS per term over the field)."""
    bound = PupilPolyPSF._bound(coef)
    scale = np.minimum(1.0, 2.99 / np.maximum(bound, 1e-30))
    return coef * scale[:, None]
