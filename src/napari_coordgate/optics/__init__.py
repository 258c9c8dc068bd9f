"""Optics: the PSF-model interface and its pupil/Zernike model, spatially varying blur and noise, classical
deconvolution baselines; their 3-D counterparts for z-stacks (``psf3d``, ``blur3d``, ``deconv3d``).

Plain numpy/torch: nothing here imports napari or Qt. Names are re-exported lazily so that importing
:mod:`napari_coordgate.optics.psf` (numpy only) does not import torch.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "PSFModel": "psfmodel",
    "get_psf_model": "models",
    "psf_model_from_record": "models",
    "PSFConfig": "psf",
    "PRESETS": "psf",
    "UndersamplingWarning": "psf",
    "get_psf_config": "models",
    "psf_at": "models",
    "psfs_at": "models",
    "psf_grid": "models",
    "render_psf_grid": "models",
    "SpatiallyVaryingBlur": "blur",
    "brute_force_blur": "blur",
    "add_noise": "blur",
    "synthesize_pairs": "blur",
    "richardson_lucy_central": "deconv",
    "wiener_central": "deconv",
    "sv_richardson_lucy": "deconv",
    "sv_wiener": "deconv",
    "Pupil3DPSF": "psf3d",
    "MeasuredGrid3DPSF": "psf3d",
    "PRESETS_3D": "psf3d",
    "SpatiallyVaryingBlur3D": "blur3d",
    "brute_force_blur3d": "blur3d",
    "synthesize_pairs3d": "blur3d",
    "richardson_lucy_3d_central": "deconv3d",
    "sv_richardson_lucy_3d": "deconv3d",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
