"""Classical 3-D deconvolution baselines for z-stacks: Richardson–Lucy with the central 3-D PSF, and spatially
varying Richardson–Lucy with the 3-D PSF-interpolation operator.

Both iterate the Richardson–Lucy update of :func:`~napari_coordgate.optics.deconv.sv_richardson_lucy` (the same
code: ``x <- x * A^T(y / (A x + background)) / A^T 1`` from a flat start, the maximum-likelihood deconvolution under
Poisson noise) with a 3-D operator ``A``:

- :func:`sv_richardson_lucy_3d`: ``A`` is :class:`~napari_coordgate.optics.blur3d.SpatiallyVaryingBlur3D` of the
  3-D PSF model, and ``A^T`` its exact adjoint;
- :func:`richardson_lucy_3d_central`: ``A`` is the same operator for one PSF everywhere, the model's 3-D PSF at the
  field centre (a 1 x 1 grid: one FFT convolution of the whole volume).

Volumes are extended by symmetric reflection in z, y and x inside the operator, so the stack's first and last
planes and the frame edge get no zero-boundary artefacts. Both return float32 arrays of the input's shape and
units; they accept one volume (D, H, W) or a series (T, D, H, W), deconvolved volume by volume.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch

from napari_coordgate.checks import as_float
from napari_coordgate.optics.blur3d import SpatiallyVaryingBlur3D, check_volume
from napari_coordgate.optics.deconv import _check_iterations, _sv_rl_plane
from napari_coordgate.optics.models import get_psf_model
from napari_coordgate.optics.psf3d import MeasuredGrid3DPSF
from napari_coordgate.optics.psfmodel import PSFModel, require_ndim

__all__ = ["central_psf3d", "richardson_lucy_3d_central", "sv_richardson_lucy_3d"]

_USE_2D = "use richardson_lucy_central / sv_richardson_lucy (napari_coordgate.optics.deconv) for 2-D images"


def central_psf3d(psf: "PSFModel | str | dict", field_shape: Sequence[int] | None = None) -> np.ndarray:
    """The 3-D PSF at the field centre, (psf_depth, psf_size, psf_size) float64 summing to one.

    ``field_shape`` is the (H, W) of the field (the PSF may depend on its aspect), or None for a square one.
    """
    return require_ndim(get_psf_model(psf), 3, _USE_2D).psf_at(0.0, 0.0, field_shape)


def _volumes(volume) -> np.ndarray:
    return as_float(check_volume(volume, max_ndim=4))


def _check_background(background) -> float:
    ok = isinstance(background, (int, float, np.integer, np.floating)) and not isinstance(background, bool)
    if not (ok and np.isfinite(background) and background >= 0):
        raise ValueError(f"background must be a finite number >= 0, got {background!r}")
    return float(background)


def richardson_lucy_3d_central(volume, psf: "PSFModel | str | dict", iterations: int = 30, *,
                               background: float = 0.0, should_stop: Callable[[], bool] | None = None,
                               full_field: Sequence[int] | None = None,
                               device: "str | torch.device" = "cpu", on_estimate=None) -> np.ndarray:
    """Richardson–Lucy deconvolution of z-stacks with the central 3-D PSF only (FFT, reflected borders).

    Parameters
    ----------
    volume
        Blurred intensities, (D, H, W) or (T, D, H, W); negative values are clipped to zero.
    psf
        A 3-D PSF model (or what :func:`get_psf_model` resolves to one); its PSF at the field centre is used
        everywhere.
    iterations
        Number of RL iterations (more = sharper and noisier).
    background
        Known constant background in the volume's units (e.g. the camera offset), modelled, not subtracted.
    should_stop
        Called before every iteration; when it returns True the current estimate is returned at once (volumes of a
        series not yet started are returned unchanged).
    full_field
        (H, W) of the whole field when the volume is a region of it: the PSF at that field's centre is used.
    device
        Torch device.
    on_estimate
        As for :func:`sv_richardson_lucy_3d`.

    Returns
    -------
    ndarray, float32, same shape and units as ``volume``
    """
    arr = _volumes(volume)
    model = require_ndim(get_psf_model(psf), 3, _USE_2D)
    kernel = central_psf3d(model, arr.shape[-2:] if full_field is None else full_field)
    central = MeasuredGrid3DPSF(kernel[None, None], z_step_um=model.z_step_um, name=f"{model.name} (centre)")
    return sv_richardson_lucy_3d(arr, central, iterations, background=background, should_stop=should_stop,
                                 device=device, on_estimate=on_estimate)


def sv_richardson_lucy_3d(
    volume,
    op_or_psf: "SpatiallyVaryingBlur3D | PSFModel | str | dict",
    iterations: int = 30,
    *,
    background: float = 0.0,
    should_stop: Callable[[], bool] | None = None,
    on_iteration: Callable[[int, int], None] | None = None,
    offset: Sequence[int] = (0, 0),
    full_field: Sequence[int] | None = None,
    device: "str | torch.device" = "cpu",
    on_estimate: Callable[[int, np.ndarray], None] | None = None,
) -> np.ndarray:
    """Spatially varying 3-D Richardson–Lucy with the 3-D PSF-interpolation operator and its exact adjoint.

    Parameters
    ----------
    volume
        Blurred intensities ``y``, (D, H, W) or (T, D, H, W) (volume by volume); negative values are clipped to
        zero.
    op_or_psf
        A :class:`SpatiallyVaryingBlur3D` built for the volume's shape, or a 3-D PSF model (or what
        :func:`get_psf_model` resolves to one) to build one.
    iterations
        Number of iterations (more = sharper and noisier).
    background
        Known constant background in the volume's units, modelled, not subtracted.
    should_stop
        Called before every iteration; when it returns True the current estimate is returned at once (volumes of a
        series not yet started are returned unchanged).
    on_iteration
        Called after every iteration as ``on_iteration(done, iterations)`` (per volume).
    offset, full_field
        When the volume is a region of the field (a camera ROI): its (y, x) in the field and the field's (H, W).
        Used when ``op_or_psf`` is a PSF model.
    device
        Torch device, used when ``op_or_psf`` is a PSF model.
    on_estimate
        Called after every iteration as ``on_estimate(done, estimate)`` with that iteration's estimate of the volume
        (float32, the units of the volume's non-negative part): one run shows the whole course, e.g. to choose the
        number of iterations on a tuning volume.

    Returns
    -------
    ndarray, float32, same shape and units as ``volume``
    """
    arr = _volumes(volume)
    iterations = _check_iterations(iterations)
    background = _check_background(background)
    if isinstance(op_or_psf, SpatiallyVaryingBlur3D):
        op = op_or_psf
    else:
        op = SpatiallyVaryingBlur3D(op_or_psf, arr.shape[-3:], offset=offset, full_field=full_field, device=device)
    if arr.shape[-3:] != op.shape:
        raise ValueError(f"volume is {arr.shape[-3:]} but the operator was built for {op.shape} (D, H, W); pass a PSF "
                         "model instead, or build the operator for this shape")
    eps = torch.finfo(op.dtype).tiny ** 0.5
    with torch.no_grad():
        norm = op.apply_adjoint(torch.ones(op.shape, dtype=op.dtype, device=op.device)).clamp_min(eps)
        vols = arr.reshape(-1, *op.shape)
        out = np.empty(vols.shape, dtype=np.float32)
        stopped = False
        for n, vol in enumerate(vols):
            if stopped:  # a stop before this volume started: return it as it came
                out[n] = vol
                continue
            # the RL iterations of the 2-D baseline: nothing in them depends on the number of axes
            out[n], stopped = _sv_rl_plane(op, vol, norm, eps, iterations, background, should_stop, on_iteration,
                                           on_estimate)
    return out.reshape(arr.shape)
