"""Fit the pupil model with field-polynomial aberrations (:class:`~napari_coordgate.optics.pupil_poly.PupilPolyPSF`)
to all beads jointly: Levenberg-Marquardt with analytic derivatives (torch, any device).

:class:`TorchPupil` is the package's one pupil PSF (:class:`napari_coordgate.optics.psf.Pupil`: torch, a sub-pixel
shift of each PSF as a linear phase across the pupil), sampled for the aberrations a fit may reach, with the PSFs'
analytic derivatives, and optionally the image of a finite bead instead of a point (``bead_diameter_px``: the PSF
convolved with a projected uniform sphere, :func:`napari_coordgate.optics.bead.sphere_otf`).

The fit minimises ``sum_b ||D_b - a_b B(c(x_b, y_b), shift_b) - o_b||² / noise_b²`` over the polynomial
coefficients ``C`` (T Zernike terms x 6 monomials) and each bead's shift, amplitude ``a_b`` and offset ``o_b``;
``B`` is the PSF of a point, or of a bead of the given diameter, while the fitted model stays the PSF of a point.
It starts from PSFs measured on a grid (:func:`init_from_nodes`) or from a few small positive defocus values (the
even Zernike terms have zero gradient at zero aberration, and the in-focus PSF cannot tell their common sign),
fits the six primary terms, and then adds trefoil and secondary astigmatism (``ZERNIKE_TERMS``) only when the
beads call for them and they help (:meth:`_JointFit.extend`: a score test at the six-term optimum, then beads held
out of the trial fit), and in the same way a cubic field law for defocus (:meth:`_JointFit.bend`: a focal surface
that a quadratic does not follow).
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
from napari_coordgate.optics.bead import sphere_otf
from napari_coordgate.optics.psf import (
    PRIMARY_TERMS,
    ZERNIKE_ORDERS,
    ZERNIKE_TERMS,
    PSFConfig,
    Pupil,
    pair_bound,
    pupil_samples,
)
from napari_coordgate.optics.pupil_poly import MONOMIALS, QUADRATIC, PupilPolyPSF, monomials

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
    bead_diameter_px
        0 (default): the PSFs of points. Larger: the images of beads of this diameter (camera pixels), each the PSF
        convolved with a projected uniform sphere. The convolution is a product with the sphere's transfer function
        (:func:`~napari_coordgate.optics.bead.sphere_otf`) on the oversampled grid, before the binning to camera
        pixels, where the intensity is finely sampled whatever the camera's pixel: the field is computed on a crop
        ``2 * pad`` pixels wider than ``psf_size`` (``pad`` = half the bead and 2 px), so the light of the PSF's
        halo outside the crop that the bead spreads into it is there and the FFT's wrap-around stays in the margin,
        which is then cut away. Being linear, the same filter applies to the derivatives.
    """

    def __init__(self, na: float, wavelength_um: float, refractive_index: float, pixel_size_um: float,
                 psf_size: int, oversample: int = 3, pupil_samples: int | None = None, *,
                 device: "str | torch.device" = "cpu", dtype: torch.dtype = torch.float64,
                 bead_diameter_px: float = 0.0):
        pad = _bead_pad(bead_diameter_px)
        super().__init__(_optics(na, wavelength_um, refractive_index, pixel_size_um, psf_size + 2 * pad, oversample),
                         pupil_samples, device=device, dtype=dtype)
        self.size, self.pad, self.bead_diameter_px = int(psf_size), pad, float(bead_diameter_px)
        self.otf = None
        if pad:
            fine = (self.size + 2 * pad) * self.os
            otf = sphere_otf((fine, fine), self.bead_diameter_px * self.os)[:, : fine // 2 + 1]  # the rfft2 half
            self.otf = torch.as_tensor(otf, device=self.device, dtype=self.dtype)

    @classmethod
    def for_aberrations(cls, na: float, wavelength_um: float, refractive_index: float, pixel_size_um: float,
                        psf_size: int, bound: np.ndarray, oversample: int = 3, *, bead_diameter_px: float = 0.0,
                        **kwargs) -> "TorchPupil":
        """A pupil sampled finely enough (for fitting) for Zernike coefficients up to ``bound`` (T waves RMS: the
        largest |coefficient| of each of the first T terms of ``ZERNIKE_TERMS``)."""
        worst = pair_bound(np.minimum(np.abs(np.asarray(bound, dtype=np.float64)), 3.0))
        # a quarter of the margin against phase wrapping that PSFConfig's PSFs get: for fitting, a pupil this fine
        # changes the PSF by well under 1 % (the soft aperture edge dominates), and the fit is several times faster
        cfg = _optics(na, wavelength_um, refractive_index, pixel_size_um, psf_size + 2 * _bead_pad(bead_diameter_px),
                      oversample)
        return cls(na, wavelength_um, refractive_index, pixel_size_um, psf_size, oversample,
                   pupil_samples(cfg, worst, margin=1.0), bead_diameter_px=bead_diameter_px, **kwargs)

    def camera(self, fine):
        """(N, s, s) camera images, unit sum, of (N, S, S) intensities on the oversampled crop: the PSFs of
        points (as :class:`Pupil` gives them) or, with a bead diameter, the images of beads."""
        if self.otf is None:
            return super().camera(fine)
        b = self._camera_raw(fine)
        return b / b.sum(dim=(-2, -1), keepdim=True)

    def _camera_raw(self, fine: torch.Tensor) -> torch.Tensor:
        """(..., s, s) camera pixels of (..., S, S) oversampled intensities (or their derivatives), not normalised:
        with a bead, filtered by its transfer function, then binned and cropped to ``psf_size``."""
        if self.otf is not None:
            fine = torch.fft.irfft2(torch.fft.rfft2(fine) * self.otf, s=fine.shape[-2:])
        c, o, p = self.size + 2 * self.pad, self.os, self.pad
        b = fine.reshape(*fine.shape[:-2], c, o, c, o).sum(dim=(-3, -1))
        return b[..., p : p + self.size, p : p + self.size] if p else b

    def psfs_and_derivatives(self, coeffs: torch.Tensor, shifts: torch.Tensor
                             ) -> tuple[torch.Tensor, torch.Tensor]:
        """PSFs (N, s, s) (bead images with a bead diameter) for (N, T) coefficients of the first T Zernike terms,
        and their derivatives (N, T + 2, s, s) with respect to those coefficients and the shift (dy, dx),
        analytically: d|E|² = 2 Re(conj(E) dE), dE the field of the pupil times the derivative of its phase; then
        the bead's filter, the binning and the unit-sum normalisation."""
        coeffs = coeffs.to(device=self.device, dtype=self.dtype)
        shifts = shifts.to(device=self.device, dtype=self.dtype)
        n, k = coeffs.shape[0], coeffs.shape[1] + 2
        pupil = torch.polar(self.amplitude.expand(n, -1), self.phase(coeffs, shifts))  # (N, M²)
        gens = torch.cat([self.basis[: k - 2], -self.fy[None], -self.fx[None]])  # d(phase)/d(param) / 2 pi, (K, M²)
        dpupil = (2j * math.pi) * gens[None] * pupil[:, None]  # (N, K, M²)
        allp = torch.cat([pupil[:, None], dpupil], dim=1).reshape(n * (k + 1), -1)
        fields = self.fields(allp)
        fields = fields.reshape(n, k + 1, *fields.shape[1:])
        e, de = fields[:, 0], fields[:, 1:]
        inten = e.real**2 + e.imag**2
        dinten = 2 * (e.real[:, None] * de.real + e.imag[:, None] * de.imag)
        b, db = self._camera_raw(inten), self._camera_raw(dinten)
        tot = b.sum(dim=(1, 2))
        psf = b / tot[:, None, None]
        dpsf = (db - psf[:, None] * db.sum(dim=(2, 3))[:, :, None, None]) / tot[:, None, None, None]
        return psf, dpsf


def _bead_pad(diameter_px: float) -> int:
    """Camera pixels added around the crop of a bead image: half the bead, and 2 px for the tails of its filter."""
    d = float(diameter_px)
    if not (math.isfinite(d) and d >= 0):
        raise ValueError(f"bead_diameter_px must be a finite number >= 0, got {diameter_px!r}")
    return int(math.ceil(d / 2)) + 2 if d > 0 else 0


def _optics(na: float, wavelength_um: float, refractive_index: float, pixel_size_um: float, psf_size: int,
            oversample: int) -> PSFConfig:
    return PSFConfig(na=na, wavelength_um=wavelength_um, refractive_index=refractive_index,
                     pixel_size_um=pixel_size_um, psf_size=psf_size, oversample=oversample)


class _Joint:
    """The joint least-squares problem of the beads: model of bead b ``a_b PSF(phi_b C^T, shift_b) + o_b``; the
    shared unknowns are the coefficients ``C`` (T, P) where ``free`` (a bool (T, P) mask; None: all of them)."""

    def __init__(self, pupil: TorchPupil, data: np.ndarray, noise: np.ndarray, phi: np.ndarray, chunk: int,
                 free: np.ndarray | None = None):
        self.pupil, self.chunk = pupil, chunk
        kw = {"device": pupil.device, "dtype": pupil.dtype}
        self.n = data.shape[0]
        flat = data.reshape(self.n, -1)
        seen = np.isfinite(flat)  # NaN: not this bead's pixel (beyond its window); weighed zero
        self.m = None if seen.all() else torch.as_tensor(seen, **kw)
        self.d = torch.as_tensor(np.where(seen, flat, 0.0), **kw)
        self.w = torch.as_tensor(1.0 / np.maximum(noise, 1e-30) ** 2, **kw)
        self.ph = torch.as_tensor(phi, **kw)
        self.free = None if free is None else torch.as_tensor(np.flatnonzero(free), device=pupil.device)

    def moved(self, theta: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
        """``theta`` with the shared ``step`` (one value per free coefficient) added."""
        if self.free is None:
            return theta + step.reshape(theta.shape)
        return theta.flatten().index_add(0, self.free, step.to(theta.dtype)).reshape(theta.shape)

    def evaluate(self, theta: torch.Tensor, shifts: torch.Tensor):
        """(amplitudes, offsets, chi2 per bead) at the coefficients ``theta`` and ``shifts``."""
        psf = torch.cat([self.pupil.psfs(self.ph[b] @ theta.to(self.pupil.dtype).T, shifts[b].to(self.pupil.dtype))
                         .reshape(-1, self.d.shape[1]) for b in self._chunks()])
        a, o = _solve_amplitude_offset(psf, self.d, self.m)
        r = self.d - a[:, None] * psf - o[:, None]
        if self.m is not None:
            r = r * self.m
        return a, o, (r * r).sum(1) * self.w

    def _chunks(self):
        return [slice(c, c + self.chunk) for c in range(0, self.n, self.chunk)]

    def normal_equations(self, theta, shifts, amp, off, weights):
        """Blocks of JᵀWJ and JᵀWr: shared A (P x P) and g_a, per bead B (N, P, 4), D (N, 4, 4) and g_d (N, 4),
        accumulated chunk by chunk (the P Jacobian columns of every pixel of every bead would not fit at once).
        The 4 per-bead unknowns are dy, dx, amplitude, offset."""
        f64 = {"dtype": torch.float64, "device": self.pupil.device}
        npar, t = theta.numel() if self.free is None else len(self.free), theta.shape[0]
        big_a, g_a = torch.zeros(npar, npar, **f64), torch.zeros(npar, **f64)
        cross, local, g_d = [], [], []
        for b in self._chunks():
            p, dp = self.pupil.psfs_and_derivatives(self.ph[b] @ theta.to(self.pupil.dtype).T,
                                                    shifts[b].to(self.pupil.dtype))
            p, dp = p.reshape(p.shape[0], -1), dp.reshape(dp.shape[0], t + 2, -1)
            ab = amp[b]
            r = (self.d[b] - ab[:, None] * p - off[b, None]).to(torch.float64)
            jt = ((ab[:, None, None] * dp[:, :t])[:, :, None, :] * self.ph[b, None, :, None]).reshape(
                p.shape[0], theta.numel(), -1).to(torch.float64)
            if self.free is not None:
                jt = jt[:, self.free]
            jl = torch.stack([ab[:, None] * dp[:, t], ab[:, None] * dp[:, t + 1], p, torch.ones_like(p)], 1)
            jl, wc = jl.to(torch.float64), weights[b]
            if self.m is not None:  # a bead's residuals and derivatives on its own pixels only
                mb = self.m[b].to(torch.float64)
                r, jt, jl = r * mb, jt * mb[:, None, :], jl * mb[:, None, :]
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

    @staticmethod
    def gauss_newton_decrease(blocks, shared: torch.Tensor | None = None) -> tuple[float, torch.Tensor]:
        """The decrease of the weighted misfit that the undamped step predicts, ``g . step``, and the shared step;
        with ``shared`` (indices), freeing only those shared unknowns (the others stay where they are)."""
        big_a, g_a, cross, local, g_d = blocks
        if shared is not None:
            big_a, g_a, cross = big_a[shared][:, shared], g_a[shared], cross[:, shared]
        x, loc = _Joint.damped_step((big_a, g_a, cross, local, g_d), 0.0)
        return float(x @ g_a + (loc * g_d).sum()), x


def _cauchy(c2: torch.Tensor) -> torch.Tensor:
    return 1.0 / (1.0 + (c2 / (3.0 * torch.median(c2))) ** 2)


def _lm_fit(pupil: TorchPupil, data: np.ndarray, noise: np.ndarray, phi: np.ndarray, coef0: np.ndarray,
            shift0: np.ndarray, iterations: int, *, robust: bool = True, should_stop=None, on_iteration=None,
            report_total: int | None = None, report_offset: int = 0, chunk: int = 64):
    """Levenberg-Marquardt on the shared polynomial coefficients and every bead's shift, amplitude and offset.

    The model of bead b is ``a_b PSF(phi_b C^T, shift_b) + o_b``; the Jacobian is analytic
    (:meth:`TorchPupil.psfs_and_derivatives`) and the normal equations (T x P shared + 4 per bead unknowns) are
    solved through their Schur complement, so the cost grows linearly with the number of beads.
    Robust: Cauchy weights of each bead's misfit over the median misfit, updated every iteration. Of a cubic field
    law only defocus's cubic coefficients are fitted (:func:`_free`); ``phi`` holds at least ``coef0``'s monomials.

    Returns (coefficients (T, P), shifts (N, 2), chi2 per bead, robust weights, iterations, stopped).
    """
    dev = pupil.device
    problem = _Joint(pupil, data, noise, phi[:, : np.shape(coef0)[1]], chunk, _free(np.shape(coef0)))
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
            th_new, sh_new = problem.moved(theta, x), shifts + loc[:, :2].clamp(-1.0, 1.0)
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
    # the test of the further Zernike terms (:meth:`_JointFit.extend`): their predicted gain over its BIC price (> 2:
    # the beads call for them) and, where it passed, the median over held-out beads of their misfit with them over
    # without (< 1: they help, and the model has them); NaN where not run
    extension_score: float = math.nan
    extension_held_out: float = math.nan
    # the same test of a cubic field law for defocus (:meth:`_JointFit.bend`)
    bend_score: float = math.nan
    bend_held_out: float = math.nan


def _solve_amplitude_offset(psf: torch.Tensor, data: torch.Tensor, pixel_w: torch.Tensor | None = None
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Closed-form least-squares amplitude and offset of ``data ≈ a psf + o`` per row (no gradient needed:
    at the optimum the loss's gradient does not depend on how a and o move, variable projection)."""
    with torch.no_grad():
        if pixel_w is not None:  # only the weighted pixels count (data already zero elsewhere)
            npx = pixel_w.sum(1)
            psf = psf * pixel_w
        else:
            npx = psf.shape[1]
        sp, sd = psf.sum(1), data.sum(1)
        spp, spd = (psf * psf).sum(1), (psf * data).sum(1)
        det = spp * npx - sp * sp
        a = (spd * npx - sp * sd) / det
        o = (spp * sd - sp * spd) / det
    return a, o


def _lm_independent(pupil: TorchPupil, data: np.ndarray, coef0: np.ndarray, iterations: int,
                    should_stop=None) -> tuple[np.ndarray, np.ndarray, bool]:
    """Levenberg-Marquardt of independent problems: each (s, s) square its own constant coefficients of the first T
    Zernike terms, shift, amplitude and offset (T + 4 unknowns, a system per square, its own damping).

    Returns (coefficients (N, T), chi2 per square (unit noise), stopped).
    """
    dev = pupil.device
    n, t = data.shape[0], coef0.shape[1]
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
            psf, dpsf = psf.reshape(n, -1), dpsf.reshape(n, t + 2, -1)
            r = d - amp[:, None] * psf - off[:, None]
            jac = torch.cat([amp[:, None, None] * dpsf, psf[:, None], torch.ones_like(psf)[:, None]], 1)
            jac = jac.to(torch.float64)
            h = jac @ jac.transpose(1, 2)  # (N, T + 4, T + 4)
            g = (jac @ r.to(torch.float64)[:, :, None])[..., 0]
            diag = torch.clamp(torch.diagonal(h, dim1=1, dim2=2), min=1e-12)
            step = torch.linalg.solve(h + lam[:, None, None] * torch.diag_embed(diag)
                                      + 1e-12 * torch.eye(t + 4, dtype=torch.float64, device=dev), g)
            step = step.to(pupil.dtype)
            c_new = coef + step[:, :t]
            s_new = shifts + step[:, t : t + 2].clamp(-1.0, 1.0)
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


# the even terms (even m, and so even n: defocus, astigmatism, spherical, secondary astigmatism), whose common sign the
# in-focus PSF cannot tell: the PSF of -W(-r) is the PSF of W(r)
_EVEN = [t for t, (_, m) in enumerate(ZERNIKE_ORDERS) if m % 2 == 0]
_START_BOUND = np.array([0.6, 0.35, 0.35, 0.2, 0.2, 0.15])  # the primary terms a start may reach, waves RMS
# room a fit's pupil leaves each term beyond 1.5 x its start: generous for the primary terms; little for the further
# ones, whose steep rims (secondary astigmatism: 31.6 waves per unit radius per wave) need many pupil samples
_ROOM = np.array([0.15] * len(PRIMARY_TERMS) + [0.05] * (len(ZERNIKE_TERMS) - len(PRIMARY_TERMS)))
# iterations and beads of each trial fit of the further terms, and then iterations of the one kept (on the subset)
_TRIAL_ITERATIONS, _TRIAL_BEADS, _EXTEND_ITERATIONS = 6, 48, 12
# the score test's gain must exceed its BIC price this many times over: the price assumes the misfit is noise, and a
# primary fit's misfit is also a bent fit's and the beads' own (windows, neighbours), which the further terms partly
# absorb; optics whose beads show trefoil score several times the price with two dozen beads
_SCORE_MARGIN = 2.0


def init_from_nodes(node_psfs: np.ndarray, *, na: float, wavelength_um: float, refractive_index: float,
                    pixel_size_um: float, device: "str | torch.device" = "cpu", nodes_per_axis: int = 3,
                    iterations: int = 25, terms: int = len(PRIMARY_TERMS), should_stop=None
                    ) -> tuple[np.ndarray, bool]:
    """Starting polynomial coefficients from PSFs measured on a grid (e.g. the measured-grid model's nodes).

    A pupil with constant aberrations is fitted to the core of each of up to ``nodes_per_axis``² node PSFs from
    several starts (defocus 0.1 / 0.35 waves, without astigmatism and with astigmatism along and across the node
    PSF's long axis; Levenberg-Marquardt, :func:`_lm_independent`), the best start per node is kept, the group
    signs of the even terms are made consistent across the field
    (:func:`_align_signs`) and a quadratic is fitted through the nodes' coefficients. With ``terms`` more than the
    six primary ones, each node's best fit is then refitted with the first ``terms`` of ``ZERNIKE_TERMS``, the
    further ones from zero.

    Returns (coefficients (terms, 6), stopped).
    """
    optics = dict(na=na, wavelength_um=wavelength_um, refractive_index=refractive_index, pixel_size_um=pixel_size_um)
    return _Nodes(node_psfs, optics, device, nodes_per_axis, iterations, should_stop).polynomial(terms)


_CORE_FLOOR, _CORE_SHARE = 19, 0.95  # the start fits' square: at least this side, and this share of each node's light


def _core_side(psfs: np.ndarray) -> int:
    """Side of the centred square (odd, at least ``_CORE_FLOOR``, at most the PSFs' own) that holds
    ``_CORE_SHARE`` of the light of every one of the (N, s, s) PSFs. A defocused ring 20 px across cut to a
    smaller square leaves the start fits too little of it to tell its aberrations (measured on a tilted system: the
    refits of its defocused nodes went to 0.8 waves from the truth on a 19 px square, to the truth on 31 px)."""
    s = psfs.shape[-1]
    light = np.clip(psfs, 0.0, None)
    total = light.sum(axis=(1, 2))
    for w in range(min(s, _CORE_FLOOR), s, 2):
        lo = (s - w) // 2
        if np.all(light[:, lo : lo + w, lo : lo + w].sum(axis=(1, 2)) >= _CORE_SHARE * total):
            return w
    return s


class _Nodes:
    """The constant-aberration pupil fits of :func:`init_from_nodes`, kept so that more terms can be added later."""

    def __init__(self, node_psfs: np.ndarray, optics: dict, device, nodes_per_axis: int = 3, iterations: int = 25,
                 should_stop=None):
        k, _, s, _ = node_psfs.shape
        idx = np.unique(np.round(np.linspace(0, k - 1, min(k, nodes_per_axis))).astype(int))
        t = grid_positions(k)
        ii, jj = np.meshgrid(idx, idx, indexing="ij")
        ii, jj = ii.ravel(), jj.ravel()
        # the core holds what the start needs (the light of the widest node); a smaller square makes the many start
        # fits cheap
        self.w = w = _core_side(node_psfs[ii, jj])
        lo = (s - w) // 2
        psfs = node_psfs[ii, jj][:, lo : lo + w, lo : lo + w]
        self.data = psfs / psfs.max(axis=(1, 2), keepdims=True)
        self.yn, self.xn = t[ii], t[jj]
        self.optics, self.device = optics, torch.device(device)
        self.iterations, self.should_stop = iterations, should_stop
        self.coef, self.stopped = self._primary()  # (nodes, T)

    def _primary(self) -> tuple[np.ndarray, bool]:
        """The best of several starts per node, with the primary terms."""
        psfs, w = self.data, self.w
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
        nn, ns = len(psfs), len(starts)
        coef0 = np.zeros((ns * nn, len(PRIMARY_TERMS)))
        for si, (d0, a) in enumerate(starts):
            coef0[si * nn : (si + 1) * nn, 0] = d0
            coef0[si * nn : (si + 1) * nn, 1] = a * np.cos(two_theta)
            coef0[si * nn : (si + 1) * nn, 2] = a * np.sin(two_theta)
        pupil = TorchPupil.for_aberrations(**self.optics, psf_size=w, bound=_START_BOUND, device=self.device,
                                           dtype=torch.float32)
        theta, c2, stopped = _lm_independent(pupil, np.tile(psfs, (ns, 1, 1)), coef0, self.iterations,
                                             should_stop=self.should_stop)
        best = np.argmin(c2.reshape(ns, nn), axis=0)
        return theta.reshape(ns, nn, -1)[best, np.arange(nn)], stopped

    def polynomial(self, terms: int = len(PRIMARY_TERMS)) -> tuple[np.ndarray, bool]:
        """(terms, 6) coefficients through the nodes' fits (refitted first with all ``terms``), and stopped."""
        coef = self.coef[:, :terms]
        if terms > coef.shape[1] and not self.stopped:
            more = np.zeros((len(coef), terms))
            more[:, : coef.shape[1]] = coef
            bound = np.abs(more).max(axis=0) * 1.5 + _ROOM[:terms]
            pupil = TorchPupil.for_aberrations(**self.optics, psf_size=self.w, bound=bound, device=self.device,
                                               dtype=torch.float32)
            self.coef, _, self.stopped = _lm_independent(pupil, self.data, more, self.iterations,
                                                         should_stop=self.should_stop)
            coef = self.coef
        coef = coef.copy()
        design = monomials(self.yn, self.xn)
        if len(coef) < design.shape[1]:  # too few nodes for a quadratic: constants only
            design = design[:, :1]
        even = [t for t in _EVEN if t < coef.shape[1]]
        signs = _align_signs(coef[:, even], design)
        coef[:, even] *= signs[:, None]
        fit = np.linalg.lstsq(design, coef, rcond=None)[0].T  # (terms, P)
        out = np.zeros((coef.shape[1], QUADRATIC))
        out[:, : fit.shape[1]] = fit
        return out, self.stopped


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
    terms: int | None = None,
    degree: int | None = None,
    bead_diameter_px: float = 0.0,
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
        The start: (T, 6) coefficients (e.g. a previous fit; its T terms are the ones fitted unless ``terms`` says
        more), else a fit through (K, K, s, s) PSFs of points measured on a grid (:func:`init_from_nodes`), else a
        multi-start of constants.
    max_iterations, subset, polish_iterations
        Levenberg-Marquardt iterations on at most ``subset`` beads spread over the field, then on all beads.
    extent_energy
        The model's PSF side holds this fraction of the light everywhere (:func:`extent`; at least the data's
        side); None keeps the data's side.
    terms
        How many of ``ZERNIKE_TERMS`` the model uses (6 to ``len(ZERNIKE_TERMS)``). None: with ``init``, its own;
        otherwise the six primary ones, then all of them when the beads call for them and beads held out of their
        fit confirm it (:meth:`_JointFit.extend`; ``PupilFit.extension_score``, ``extension_held_out``). A number
        larger than the start's: the further terms are fitted after the start's, from zero, without the tests.
    degree
        The field law of defocus: 2 (quadratic, like every other term) or 3 (cubic). None: with ``init``, its own;
        otherwise quadratic, then cubic when the beads call for it and beads held out of its fit confirm it
        (:meth:`_JointFit.bend`; ``PupilFit.bend_score``, ``bend_held_out``). 3 from a quadratic start: without
        the tests.
    bead_diameter_px
        Diameter of the beads in camera pixels: the fit compares each bead with the PSF convolved with a projected
        uniform sphere of this size (:class:`TorchPupil`); the fitted model is the PSF of a point. 0: point sources.
    should_stop, on_iteration, chunk
        Checked between iterations (True ends the fit with the coefficients so far, ``stopped``); called as
        ``on_iteration(done, total, loss)``; beads per forward pass (bounds memory).
    """
    t0 = time.perf_counter()
    optics = dict(na=na, wavelength_um=wavelength_um, refractive_index=refractive_index, pixel_size_um=pixel_size_um)
    start_terms = len(PRIMARY_TERMS) if init is None else np.shape(init)[0]
    start_degree = 2 if init is None or np.shape(init)[1] == QUADRATIC else 3
    want = (_terms_wanted(terms, start_terms, init is None), _degree_wanted(degree, start_degree, init is None))
    fit = _JointFit(data, monomials(y_norm, x_norm, len(MONOMIALS)), np.asarray(shifts, dtype=np.float64), noise,
                    optics, torch.device(device), float(bead_diameter_px), should_stop, on_iteration, chunk)
    coef0, stopped = fit.run(init, node_psfs, want, (terms is not None, degree is not None), max_iterations, subset,
                             polish_iterations)
    coef0 = _limit(coef0)
    size = extent(coef0, optics, data.shape[-1], energy=extent_energy) if extent_energy else data.shape[-1]
    model = PupilPolyPSF(coef0, **optics, psf_size=size, grid=grid, name="pupil fit")
    return PupilFit(model, fit.loss, fit.iterations, time.perf_counter() - t0, stopped, fit.shifts, fit.weights,
                    fit.extension_score, fit.extension_held_out, fit.bend_score, fit.bend_held_out)


def _terms_wanted(terms: int | None, start: int, auto: bool) -> int:
    """The number of Zernike terms the fit ends with (see :func:`fit_pupil_poly`'s ``terms``)."""
    if terms is None:
        return len(ZERNIKE_TERMS) if auto else start
    if not (isinstance(terms, (int, np.integer)) and start <= terms <= len(ZERNIKE_TERMS)):
        raise ValueError(f"terms must be a whole number from {start} (the start's) to {len(ZERNIKE_TERMS)}, got "
                         f"{terms!r}")
    return int(terms)


def _degree_wanted(degree: int | None, start: int, auto: bool) -> int:
    """The degree of the field law of defocus the fit ends with (see :func:`fit_pupil_poly`'s ``degree``)."""
    if degree is None:
        return 3 if auto else start
    if degree not in (2, 3) or degree < start:
        raise ValueError(f"degree must be {'2 or 3' if start == 2 else '3 (the start is cubic)'}, got {degree!r}")
    return int(degree)


def _free(shape: tuple[int, int]) -> np.ndarray | None:
    """Which coefficients of a (T, P) field law a fit moves: None (all) for a quadratic one; of a cubic one, the
    quadratic part of every term and defocus's cubic part (the focal surface of a bent specimen, or field
    curvature beyond h²; the other terms' cubic columns stay as they are)."""
    if shape[1] == QUADRATIC:
        return None
    free = np.zeros(shape, dtype=bool)
    free[:, :QUADRATIC] = True
    free[0] = True
    return free


class _JointFit:
    """The stages of :func:`fit_pupil_poly` on one set of beads."""

    def __init__(self, data, phi, shift0, noise, optics, device, bead, should_stop, on_iteration, chunk):
        self.data, self.phi, self.shift0, self.noise = data, phi, shift0, noise
        self.optics, self.device, self.bead, self.chunk = optics, device, bead, chunk
        self.should_stop, self.on_iteration = should_stop, on_iteration
        self.n, self.s = data.shape[0], data.shape[-1]
        self.pixels = float(np.isfinite(data).sum()) / max(self.n, 1)  # per bead (NaN: beyond its window)
        self.iterations, self.loss, self.extension_score, self.extension_held_out = 0, math.nan, math.nan, math.nan
        self.bend_score, self.bend_held_out = math.nan, math.nan
        self.shifts, self.weights = shift0.copy(), np.ones(self.n)
        self.budget, self.reported = 0, 0  # iterations announced to on_iteration, and the stages' slots so far
        self.pupil: TorchPupil | None = None

    def run(self, init: np.ndarray | None, node_psfs: np.ndarray | None, want: tuple[int, int],
            forced: tuple[bool, bool], max_iterations: int, subset: int, polish: int) -> tuple[np.ndarray, bool]:
        """The stages: the start, LM on a subset then all beads, the further terms (up to ``want[0]``), the cubic
        defocus law (``want[1]`` 3 from a quadratic start); ``forced``: without their tests. (coefficients,
        stopped)."""
        terms0 = len(PRIMARY_TERMS) if init is None else np.shape(init)[0]
        cubic0 = init is not None and np.shape(init)[1] > QUADRATIC
        extension = 2 * _TRIAL_ITERATIONS + _EXTEND_ITERATIONS + polish if want[0] > terms0 else 0
        bending = 2 * _TRIAL_ITERATIONS + _EXTEND_ITERATIONS + polish if want[1] == 3 and not cubic0 else 0
        self.budget = max_iterations + polish + extension + bending
        coef, nodes, stopped = self.start(init, node_psfs)
        if not stopped:
            coef, stopped = self.refine(coef, max_iterations, subset, polish)
        if not stopped and want[0] > coef.shape[0]:
            coef, stopped = self.extend(coef, want[0], forced[0], subset, polish, nodes)
        if not stopped and bending:
            coef, stopped = self.bend(coef, forced[1], subset, polish)
        return coef, stopped

    def pupil_for(self, bound: np.ndarray) -> TorchPupil:
        """The fit's pupil (float32, the beads' size) sampled for coefficients up to ``bound`` (T,)."""
        return TorchPupil.for_aberrations(**self.optics, psf_size=self.s, bound=bound, device=self.device,
                                          dtype=torch.float32, bead_diameter_px=self.bead)

    def subset(self, size: int, among: np.ndarray | None = None) -> np.ndarray:
        """At most ``size`` beads (of ``among``, default all) spread over the field (the beads come in table
        order)."""
        among = np.arange(self.n) if among is None else among
        return among[np.unique(np.linspace(0, len(among) - 1, min(size, len(among))).round().astype(int))]

    def start(self, init: np.ndarray | None, node_psfs: np.ndarray | None
              ) -> tuple[np.ndarray, "_Nodes | None", bool]:
        """The starting coefficients (``init``, else through ``node_psfs``' fits, else :meth:`constant_start`),
        the node fits (kept for :meth:`extend`) and stopped."""
        if init is not None:
            return np.asarray(init, dtype=np.float64), None, False
        if node_psfs is None:
            coef, stopped = self.constant_start()
            return coef, None, stopped
        nodes = _Nodes(node_psfs, self.optics, self.device, should_stop=self.should_stop)
        coef, stopped = nodes.polynomial()
        return coef, nodes, stopped

    def constant_start(self) -> tuple[np.ndarray, bool]:
        """Constant coefficients from a few small defocus values, on a subset of beads."""
        sub = self.subset(48)
        pupil = self.pupil_for(_START_BOUND)
        best, stopped = None, False
        for d0 in (0.1, 0.35):
            start = np.zeros((len(PRIMARY_TERMS), 1))
            start[0, 0] = d0
            th, _, c2, u, it, stopped = _lm_fit(pupil, self.data[sub], self.noise[sub], self.phi[sub, :1], start,
                                                self.shift0[sub], 15, should_stop=self.should_stop, chunk=self.chunk)
            self.iterations += it
            loss = float(np.sum(u * c2))
            if best is None or loss < best[1]:
                best = (th[:, 0], loss)
            if stopped:
                break
        coef0 = np.zeros((len(PRIMARY_TERMS), QUADRATIC))
        coef0[:, 0] = best[0]
        return coef0, stopped

    def refine(self, coef0: np.ndarray, max_iterations: int, subset: int, polish: int,
               pupil: TorchPupil | None = None) -> tuple[np.ndarray, bool]:
        """From ``coef0``: LM on a subset, then on all beads. Without ``pupil`` (the first stage) a pupil sampled
        for what the field may reach from the start, and each bead's shift from cross-correlation."""
        n, data, phi, noise = self.n, self.data, self.phi, self.noise
        total = max_iterations + polish
        if pupil is None:
            # the pupil sampled for what the field may reach: the start's range, with room to grow
            pupil = self.pupil_for(PupilPolyPSF._bound(coef0) * 1.5 + _ROOM[: coef0.shape[0]])
            self.shifts = self.start_shifts(pupil, coef0, np.arange(n), self.shift0)
        self.pupil = pupil
        common = {"should_stop": self.should_stop, "on_iteration": self.on_iteration, "report_total": self.budget,
                  "chunk": self.chunk}
        stopped, offset = False, self.reported
        self.reported += total
        if n > subset and max_iterations > 0:  # most iterations on a subset spread over the field
            sub = self.subset(subset)
            coef0, sh, _, _, it, stopped = _lm_fit(pupil, data[sub], noise[sub], phi[sub], coef0, self.shifts[sub],
                                                   max_iterations, report_offset=offset, **common)
            self.shifts[sub] = sh
            self.iterations += it
        else:
            polish = total
        if not stopped:
            coef0, self.shifts, c2, self.weights, it, stopped = _lm_fit(
                pupil, data, noise, phi, coef0, self.shifts, polish, report_offset=offset + total - polish, **common)
            self.iterations += it
            self.loss = float(np.sum(self.weights * c2) / (np.sum(self.weights) * self.pixels))
        return coef0, stopped

    def extend(self, coef: np.ndarray, rows: int, forced: bool, subset: int, polish: int,
               nodes: "_Nodes | None" = None) -> tuple[np.ndarray, bool]:
        """The first ``rows`` Zernike terms fitted from ``coef`` (fewer rows, converged), unless ``forced`` only
        when the beads call for them and they help.

        The beads call for them when a score test at ``coef`` says so (:meth:`score_test`: cheap, and most
        optics stop there). They are then fitted to three beads of four (at most ``_TRIAL_BEADS`` of them), from
        two starts: ``coef`` with the further terms at zero, and (given the fits of the ``nodes`` the start came
        from) those refitted with all the terms, since a primary fit may have bent its terms towards the missing
        ones, into a valley the further terms do not lead out of. The trial that describes the fourth beads best
        is kept if it describes most of them better than ``coef`` does (the median of their misfit ratios below 1,
        each bead with its own shift,
        amplitude and offset, :func:`~napari_coordgate.calibration.patches.fit_amplitude_shift`): what a misfit
        the primary terms leave for another reason (a neighbour's light, a bead unlike the others) fits, the
        held-out beads do not confirm. Kept, it is fitted further on the subset (trials are short), then on all
        beads. ``forced``: no tests, and the trial with the smaller misfit is kept.
        """
        start = np.zeros((rows, coef.shape[1]))
        start[: coef.shape[0]] = coef
        free = _free(start.shape)
        free = np.ones(start.shape, dtype=bool) if free is None else free
        fitted = free & (np.arange(rows) < coef.shape[0])[:, None]
        self.extension_score, guess = self.score_test(start, free, fitted, self.subset(subset))
        held = np.flatnonzero(np.arange(self.n) % 4 == 3) if not forced else np.zeros(0, int)
        if not forced and (self.extension_score <= _SCORE_MARGIN or len(held) < 3):
            return coef, False
        # each start's pupil sampled for it; the zero start's further terms for where the step points, at most 0.1
        # waves (the undamped step from a bent primary fit overshoots, and each wave of secondary astigmatism costs
        # 60 pupil samples)
        starts = [(start, np.maximum(PupilPolyPSF._bound(start), np.minimum(PupilPolyPSF._bound(guess), 0.1)))]
        if nodes is not None:
            from_nodes, stopped = nodes.polynomial(rows)
            if stopped:
                return coef, True
            starts.append((from_nodes, PupilPolyPSF._bound(from_nodes)))
        sub = self.subset(min(subset, _TRIAL_BEADS), np.setdiff1d(np.arange(self.n), held))
        best, primary = None, None
        for c, reach in starts:
            pupil = self.pupil_for(reach * 1.5 + _ROOM[:rows])
            shifts = self.start_shifts(pupil, c, sub, self.shifts[sub]) if c is not start else self.shifts[sub]
            th, sh, c2, _, it, stopped = _lm_fit(
                pupil, self.data[sub], self.noise[sub], self.phi[sub], c, shifts, _TRIAL_ITERATIONS,
                should_stop=self.should_stop, on_iteration=self.on_iteration, report_total=self.budget,
                report_offset=self.reported, chunk=self.chunk)
            self.iterations += it
            self.reported += _TRIAL_ITERATIONS
            if stopped:
                return th, True
            if forced:
                key = float(np.sum(self.weights[sub] * c2))
            else:
                primary = self.held_out_misfit(pupil, start, held) if primary is None else primary
                key = float(np.median(self.held_out_misfit(pupil, th, held) / primary))
            if best is None or key < best[0]:
                best = (key, th, sh, pupil)
        if not forced:
            self.extension_held_out = best[0]
            if not best[0] < 1.0:
                return coef, False
        self.shifts[sub] = best[2]
        return self.refine(best[1], _EXTEND_ITERATIONS, subset, polish, best[3])

    def bend(self, coef: np.ndarray, forced: bool, subset: int, polish: int) -> tuple[np.ndarray, bool]:
        """Defocus with a cubic field law from the quadratic ``coef`` (converged), unless ``forced`` only when the
        beads call for it and beads held out of its trial fit confirm it, as :meth:`extend` adds terms: the score
        test of the four cubic coefficients at ``coef``, then two trial fits from ``coef`` on the same three beads
        of four, one with the cubic part free (from zero) and one without; the cubic is kept if it describes the
        fourth beads better: their summed misfit, each bead weighted as the fit weights outliers (:func:`_cauchy` of
        its misfit with the quadratic trial), lower. Not the median bead's ratio, as for further terms: a bent
        focal surface shows near the edges of the field, and the median bead, nearer the centre, barely changes
        (a tilted system's: 0.9999). And against a quadratic trial fitted like the cubic one, not against ``coef``,
        which was fitted to the held-out beads too. Kept, it is fitted further on the subset, then on all beads."""
        start = np.zeros((coef.shape[0], len(MONOMIALS)))
        start[:, :QUADRATIC] = coef
        free = _free(start.shape)
        fitted = free & (np.arange(len(MONOMIALS)) < QUADRATIC)[None, :]
        self.bend_score, guess = self.score_test(start, free, fitted, self.subset(subset))
        held = np.flatnonzero(np.arange(self.n) % 4 == 3) if not forced else np.zeros(0, int)
        if not forced and (self.bend_score <= _SCORE_MARGIN or len(held) < 3):
            return coef, False
        reach = np.maximum(PupilPolyPSF._bound(start), np.minimum(PupilPolyPSF._bound(guess),
                                                                   PupilPolyPSF._bound(start) + 0.2))
        pupil = self.pupil_for(reach * 1.5 + _ROOM[: start.shape[0]])
        sub = self.subset(min(subset, _TRIAL_BEADS), np.setdiff1d(np.arange(self.n), held))
        trials = []
        for c in (start,) if forced else (start, coef):
            th, sh, _, _, it, stopped = _lm_fit(
                pupil, self.data[sub], self.noise[sub], self.phi[sub], c, self.shifts[sub], _TRIAL_ITERATIONS,
                should_stop=self.should_stop, on_iteration=self.on_iteration, report_total=self.budget,
                report_offset=self.reported, chunk=self.chunk)
            self.iterations += it
            self.reported += _TRIAL_ITERATIONS
            if stopped:
                return (th if c is start else coef), True
            trials.append((th, sh))
        if not forced:
            cubic, quadratic = (self.held_out_misfit(pupil, th, held) for th, _ in trials)
            weight = _cauchy(torch.as_tensor(quadratic)).numpy()
            self.bend_held_out = float(np.sum(weight * cubic) / np.sum(weight * quadratic))
            if not self.bend_held_out < 1.0:
                return coef, False
        th, self.shifts[sub] = trials[0]
        return self.refine(th, _EXTEND_ITERATIONS, subset, polish, pupil)

    def _amplitude_shift(self, pupil: TorchPupil, coef: np.ndarray, beads: np.ndarray, shift0: np.ndarray,
                         search: bool) -> dict:
        """Each of ``beads`` fitted by the model ``coef`` with its own shift, amplitude and offset
        (:func:`~napari_coordgate.calibration.patches.fit_amplitude_shift`; ``search``: from cross-correlation)."""
        with torch.no_grad():
            z = torch.as_tensor(self.phi[beads, : coef.shape[1]] @ coef.T, device=self.device, dtype=torch.float32)
            model = torch.cat([pupil.psfs(z[a : a + self.chunk]) for a in range(0, len(beads), self.chunk)])
        return fit_amplitude_shift(model.cpu().numpy().astype(np.float64), self.data[beads], shift0,
                                   self.noise[beads], search=search)

    def start_shifts(self, pupil: TorchPupil, coef: np.ndarray, beads: np.ndarray, shift0: np.ndarray) -> np.ndarray:
        """Where the model ``coef``'s PSF matches each of ``beads`` best: a comatic (or trefoil) pupil PSF's centre
        can sit a pixel or more from where another model put it, too far for the gradient to find."""
        return self._amplitude_shift(pupil, coef, beads, shift0, True)["shift"]

    def held_out_misfit(self, pupil: TorchPupil, coef: np.ndarray, beads: np.ndarray) -> np.ndarray:
        """The misfit (chi2) of each of ``beads`` to the model ``coef``, each bead with its own shift, amplitude
        and offset (from the shifts so far)."""
        return np.maximum(self._amplitude_shift(pupil, coef, beads, self.shifts[beads], False)["chi2"], 1e-30)

    def score_test(self, start: np.ndarray, free: np.ndarray, fitted: np.ndarray, sub: np.ndarray
                   ) -> tuple[float, np.ndarray]:
        """How strongly the beads ``sub`` call for the coefficients of ``start`` where ``free`` but not ``fitted``
        (bool (T, P) masks; those at zero, the fitted ones converged): (score, where the Gauss-Newton step points).

        The decrease of the weighted misfit that the Gauss-Newton step predicts when the further coefficients are
        freed, beyond what it predicts without them, in units of the misfit per pixel (which estimates the noise),
        over the Bayesian information criterion's price of those coefficients (their number times the log of the
        pixels): above ``_SCORE_MARGIN``, they are worth trying. One evaluation of the derivatives. Even terms
        with no first-order effect on the PSF at zero (secondary astigmatism in an otherwise perfect, in-focus
        system) are not seen.
        """
        problem = _Joint(self.pupil, self.data[sub], self.noise[sub], self.phi[sub, : start.shape[1]], self.chunk, free)
        shifts = torch.as_tensor(self.shifts[sub], dtype=torch.float64, device=self.device)
        theta = torch.as_tensor(start, dtype=torch.float64, device=self.device)
        u = torch.as_tensor(self.weights[sub], dtype=torch.float64, device=self.device)
        with torch.no_grad():
            amp, off, c2 = problem.evaluate(theta, shifts)
            blocks = problem.normal_equations(theta, shifts, amp, off, (problem.w * u).to(torch.float64))
            gain, step = _Joint.gauss_newton_decrease(blocks)
            old = torch.as_tensor(np.flatnonzero(fitted[free]), device=self.device)
            gain -= _Joint.gauss_newton_decrease(blocks, old)[0]
        pixels = float(u.sum()) * self.s * self.s
        # the noise per pixel: the misfit left, but not below the noise the caller gave (the weights' unit), so a
        # model error far below the noise (noiseless data, the pupil's sampling) does not pass for a signal
        per_pixel = max(float((u * c2).sum()) / pixels, 1.0)
        score = gain / per_pixel / (int(free.sum() - fitted.sum()) * math.log(pixels))
        return score, problem.moved(theta, step).cpu().numpy()


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
