"""The image of a finite fluorescent bead: a uniformly stained sphere, seen in projection.

A bead of diameter ``d`` is not a point: what a camera records of it is the PSF convolved with the bead's
projected brightness, the thickness of the sphere along the line of sight, ``t(r) = 2 sqrt(R² - r²)``. Its 2-D
Fourier transform is the sphere's 3-D transform on the plane ``kz = 0`` (projection-slice theorem):

    B(f) = 3 (sin u - u cos u) / u³,    u = 2 pi f R        (B(0) = 1)

with ``f`` the spatial frequency in cycles per pixel and ``R = d / 2`` in pixels. Its first zero lies at
``f = 1.43 / d``: past the Nyquist frequency (0.5) along the axes for beads up to 2.86 px across. Calibration
divides it out of the measured PSFs (``calibration.beadsize``) and the pupil fit multiplies its PSFs by it; the
synthetic bead slides (``samples.beads``) render beads differently, as many point sources spread over the sphere,
so a test of the removal is not the removal checking itself. numpy only.
"""

from __future__ import annotations

import math

import numpy as np

from napari_coordgate.config import BEAD_LIMITS_NM

__all__ = ["sphere_otf", "sphere_kernel", "blur_by_bead", "bead_diameter_px", "BEAD_LIMITS_NM"]



def sphere_otf(shape, diameter_px: float, z_step_px: float | None = None) -> np.ndarray:
    """The transfer function of a uniform sphere: projected on the ``np.fft.fft2`` frequencies of an (H, W)
    ``shape``, or in 3-D on the ``np.fft.fftn`` frequencies of a (D, H, W) ``shape`` whose planes are ``z_step_px``
    pixels apart (the same formula: the sphere's 3-D transform, ``u = 2 pi |f| R`` with ``f`` in cycles per pixel
    along every axis).

    Parameters
    ----------
    shape
        (H, W) of the images it multiplies (spectra from ``np.fft.fft2``), or (H, W // 2 + 1) with ``rfft2``:
        pass ``(H, W)`` and slice; both axes use ``np.fft.fftfreq``. (D, H, W) with ``z_step_px`` for volumes.
    diameter_px
        Bead diameter in pixels; 0 gives ones (a point source).
    z_step_px
        3-D only: the distance between planes in pixels (z-step over pixel size).

    Returns
    -------
    ndarray, float64, ``shape``: real and even (the sphere is symmetric), 1 at zero frequency.
    """
    dims = [int(n) for n in shape]
    if not diameter_px > 0:
        return np.ones(dims)
    if len(dims) == 3:
        if not (z_step_px and z_step_px > 0):
            raise ValueError("a 3-D sphere transfer function needs z_step_px, the planes' distance in pixels")
        fz = np.fft.fftfreq(dims[0])[:, None, None] / float(z_step_px)
        fy = np.fft.fftfreq(dims[1])[None, :, None]
        fx = np.fft.fftfreq(dims[2])[None, None, :]
        f = np.sqrt(fz * fz + fy * fy + fx * fx)
    else:
        f = np.hypot(np.fft.fftfreq(dims[0])[:, None], np.fft.fftfreq(dims[1])[None, :])
    u = 2.0 * math.pi * f * (0.5 * float(diameter_px))
    out = np.ones(dims)
    big = u > 1e-3
    ub = u[big]
    out[big] = 3.0 * (np.sin(ub) - ub * np.cos(ub)) / ub**3
    small = ~big  # Taylor series: 1 - u²/10
    out[small] = 1.0 - u[small] ** 2 / 10.0
    return out


def sphere_kernel(diameter_px: float, size: int | None = None) -> np.ndarray:
    """The bead's image on the pixel grid as calibration models it (unit sum, odd ``size`` x ``size``): the
    inverse transform of :func:`sphere_otf` (band-limited to the pixel grid), cropped."""
    if size is None:
        size = 2 * int(math.ceil(diameter_px)) + 5
    size += 1 - size % 2
    big = max(4 * size, 64)
    k = np.fft.fftshift(np.fft.ifft2(sphere_otf((big, big), diameter_px)).real)
    c = big // 2
    r = size // 2
    out = k[c - r : c + r + 1, c - r : c + r + 1]
    return out / out.sum()


def bead_diameter_px(diameter_nm: float | None, pixel_size_um: float | None) -> float:
    """A bead diameter in nm as pixels of ``pixel_size_um`` µm; 0 when no diameter is given (point sources).

    Raises ValueError when a diameter is given without a pixel size, or either is out of range.
    """
    if diameter_nm is None or diameter_nm == 0:
        return 0.0
    lo, hi = BEAD_LIMITS_NM
    if not (isinstance(diameter_nm, (int, float)) and math.isfinite(diameter_nm) and lo <= diameter_nm <= hi):
        raise ValueError(f"bead diameter must be a number of nm from {lo:g} to {hi:g}, got {diameter_nm!r}")
    if pixel_size_um is None:
        raise ValueError("a bead diameter needs the pixel size (from the image's metadata or --pixel-size) to "
                         "know how many pixels the bead spans")
    return float(diameter_nm) / 1000.0 / float(pixel_size_um)


def blur_by_bead(psfs: np.ndarray, diameter_px: float, z_step_px: float | None = None) -> np.ndarray:
    """(..., s, s) PSFs as a bead of ``diameter_px`` images them: each convolved with the bead (its spectrum
    times :func:`sphere_otf`, zero-padded so nothing wraps around), cropped back to s x s. Unchanged for 0.
    With ``z_step_px``: (..., D, s, s) 3-D PSFs convolved with the sphere in 3-D (planes ``z_step_px`` px apart)."""
    if not diameter_px > 0:
        return np.asarray(psfs, dtype=np.float64)
    psfs = np.asarray(psfs, dtype=np.float64)
    nd = 2 if z_step_px is None else 3
    dims = psfs.shape[-nd:]
    pads = [int(math.ceil(diameter_px / (z_step_px if (nd == 3 and i == 0) else 1.0))) + 2 for i in range(nd)]
    widths = [(0, 0)] * (psfs.ndim - nd) + [(p, p) for p in pads]
    big = np.pad(psfs, widths)
    axes = tuple(range(-nd, 0))
    otf = sphere_otf(big.shape[-nd:], diameter_px, z_step_px)
    out = np.fft.ifftn(np.fft.fftn(big, axes=axes) * otf, axes=axes).real
    return out[(Ellipsis,) + tuple(slice(p, p + n) for p, n in zip(pads, dims))]
