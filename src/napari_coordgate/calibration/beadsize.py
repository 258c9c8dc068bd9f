"""Remove the beads' own size from measured PSFs.

A bead of diameter ``d`` images as the PSF convolved with the bead (:mod:`napari_coordgate.optics.bead`), so
PSFs averaged from bead patches are too broad by the bead: a 2.5 px bead under a 2.5 px FWHM PSF lowers its peak
by about a quarter. Averaging commutes with the convolution (every bead has the same size), so the grid's node
PSFs are measured with the bead in them and the bead is divided out of each node afterwards, once, where the
averaging has already beaten the noise down.

The division is a Wiener filter whose signal power comes from the node itself: at each spatial frequency
``G = M conj(B) S / (|B|² S + N)``, with ``M`` the measured node spectrum, ``B`` the bead's transfer function,
``N`` the node's noise power (its per-pixel noise variance times the window's pixel count) and
``S = max(|M|² - N, 0) / |B|²`` the PSF's power estimated from a lightly smoothed ``|M|²``. Where the measurement
stands far above its noise this is ``M / B``; where it is noise (beyond the optics' cutoff) it is zero, so the
bead's near-zeros never amplify noise into the PSF. The result's noise level is returned too, for the denoising
that follows.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from napari_coordgate.optics.bead import sphere_otf

__all__ = ["remove_bead"]

_OVER = 3.0  # how far above its mean noise power a frequency must stand to be trusted
_FLOOR = 0.1  # the bead's transfer function is never divided by less than this (a gain of at most 10)


def remove_bead(psfs: np.ndarray, diameter_px: float, noise: np.ndarray, z_step_px: float | None = None
                ) -> tuple[np.ndarray, np.ndarray]:
    """Divide a bead of ``diameter_px`` out of measured PSFs.

    Parameters
    ----------
    psfs
        (N, s, s) measured PSFs (unit sum or any scale; bead-broadened), or (N, D, s, s) 3-D PSFs with
        ``z_step_px``.
    diameter_px
        Bead diameter in pixels; 0 returns the PSFs unchanged.
    noise
        (N,) per-pixel noise standard deviation of each measured PSF (in its units).
    z_step_px
        3-D PSFs: the distance between their planes in pixels (the sphere's transfer function in 3-D,
        :func:`~napari_coordgate.optics.bead.sphere_otf`).

    Returns
    -------
    psfs : the PSFs of a point, the shape and scale (sum) given
    noise : (N,) their per-pixel noise standard deviation after the filter
    """
    psfs = np.asarray(psfs, dtype=np.float64)
    noise = np.broadcast_to(np.asarray(noise, dtype=np.float64), psfs.shape[:1]).copy()
    if not diameter_px > 0:
        return psfs, noise
    dims = psfs.shape[1:]
    axes = tuple(range(1, psfs.ndim))
    pads = [n // 2 for n in dims]
    big = np.pad(psfs, [(0, 0)] + [(p, p) for p in pads])
    m = np.fft.fftn(big, axes=axes)
    b = sphere_otf(big.shape[1:], diameter_px, z_step_px)[None]
    npow = noise**2
    for n in dims:  # as noise² s s in 2-D, to the last bit
        npow = npow * n
    npow = npow.reshape((-1,) + (1,) * len(dims))
    # the measured power, smoothed a little across frequencies (its noise is chi-square with 2 degrees of freedom)
    mpow = np.fft.ifftshift(ndimage.uniform_filter(np.fft.fftshift(np.abs(m) ** 2, axes=axes),
                                                   size=(1,) + (3,) * len(dims), mode="wrap"), axes=axes)
    # the PSF's power through the bead, E = |B|² S: what stands clearly above the noise (a chance excess of
    # the noise over its mean must not count, hence the factor), so gain = E / (E + N) / B
    excess = np.maximum(mpow - _OVER * npow, 0.0)
    gain = b * excess / np.maximum(b * b, _FLOOR**2) / (excess + npow + 1e-30)
    gain[(slice(None),) + (0,) * len(dims)] = 1.0 / b[(0,) * (len(dims) + 1)]  # keep the flux
    crop = (slice(None),) + tuple(slice(p, p + n) for p, n in zip(pads, dims))
    out = np.fft.ifftn(m * gain, axes=axes).real[crop]
    # white noise of variance sigma² per pixel goes through the filter with variance sigma² mean(gain²)
    new_noise = noise * np.sqrt(np.mean(gain**2, axis=axes))
    return out, new_noise
