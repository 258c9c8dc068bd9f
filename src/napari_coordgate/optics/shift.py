"""Sub-pixel shifts of images: the Fourier shift (band-limited interpolation), the one used everywhere.

Registering a blurred image onto its sharp one (``data``), moving a PSF by half a pixel before binning
(``optics.measured``) and centring bead patches (``calibration.patches``) all move images with it. numpy only.
"""

from __future__ import annotations

import numpy as np

__all__ = ["fourier_shift", "shift_phase"]


def fourier_shift(images: np.ndarray, dy, dx) -> np.ndarray:
    """Images (..., H, W) moved by (dy, dx) pixels towards larger row and column indices.

    Band-limited interpolation: each image's spectrum times ``exp(-2 pi i (ky dy + kx dx))``. The image is
    treated as periodic, so what leaves one border comes back at the other: pad first where that matters.
    An integer shift is ``np.roll`` up to rounding.

    Parameters
    ----------
    images
        One image (H, W) or a stack (..., H, W).
    dy, dx
        Shifts in pixels: scalars, or arrays of the stack's leading shape (one shift per image), e.g. (N,) for
        (N, H, W). scipy.ndimage.fourier_shift takes one shift per call; here a stack of beads moves at once.

    Returns
    -------
    ndarray, float64, the shape of ``images``
    """
    return np.fft.ifft2(np.fft.fft2(images) * shift_phase(np.shape(images)[-2:], dy, dx)).real


def shift_phase(shape, dy, dx) -> np.ndarray:
    """The factor that moves the spectra (``np.fft.fft2``) of (H, W) images by (dy, dx) pixels:
    ``exp(-2 pi i (ky dy + kx dx))`` with ``ky, kx`` the ``np.fft.fftfreq`` of H and W.

    ``dy``, ``dx`` as in :func:`fourier_shift`; returns complex128, shape ``dy.shape + (H, W)``.
    """
    h, w = (int(n) for n in shape)
    ky = np.fft.fftfreq(h)[:, None]
    kx = np.fft.fftfreq(w)[None, :]
    dy = np.asarray(dy, dtype=np.float64)[..., None, None]
    dx = np.asarray(dx, dtype=np.float64)[..., None, None]
    return np.exp(-2j * np.pi * (ky * dy + kx * dx))
