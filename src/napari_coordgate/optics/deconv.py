"""Classical deconvolution baselines: what a user would run instead of a learned model.

- :func:`richardson_lucy_central` and :func:`wiener_central` assume one PSF everywhere (the PSF at the
  frame centre) and use scikit-image's implementations.
- :func:`sv_richardson_lucy` inverts the spatially varying model itself, with the PSF-interpolation
  operator of :mod:`napari_coordgate.optics.blur` and its exact adjoint.

All return float32 arrays of the input's shape, in the input's intensity units. Images are extended by
symmetric reflection before the shift-invariant methods, so their zero (RL) or periodic (Wiener) boundary
handling does not create artefacts at the field edge.

Every function takes any :class:`~napari_coordgate.optics.psfmodel.PSFModel` (or what
:func:`~napari_coordgate.optics.models.get_psf_model` resolves: a preset or a dict; files are read by
:func:`napari_coordgate.model_io.resolve_psf`).
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from skimage import restoration

from napari_coordgate.checks import as_float, check_image
from napari_coordgate.coords import field_axis, grid_positions, tent_weights
from napari_coordgate.optics.blur import SpatiallyVaryingBlur
from napari_coordgate.optics.models import get_psf_model
from napari_coordgate.optics.psfmodel import PSFModel, require_ndim

__all__ = ["central_psf", "richardson_lucy_central", "wiener_central", "sv_richardson_lucy", "wiener_kernels",
           "sv_wiener"]

# what the 2-D baselines tell a caller who hands them a 3-D PSF model (psfmodel.require_ndim)
_USE_3D = "use richardson_lucy_3d_central / sv_richardson_lucy_3d (napari_coordgate.optics.deconv3d) for z-stacks"


def central_psf(psf: "PSFModel | str | dict", field_shape=None) -> np.ndarray:
    """The PSF at the frame centre, which the shift-invariant baselines use everywhere.

    Parameters
    ----------
    psf
        The PSF model (any :class:`PSFModel`, or a preset name, JSON or ``.cgpsf`` path, or dict).
    field_shape
        (H, W) of the frame (the PSF model may depend on the frame's aspect, e.g. an off-centre optical axis), or
        ``None`` for a square frame.

    Returns
    -------
    ndarray, float64, shape (psf_size, psf_size)
        Sums to one.
    """
    return require_ndim(get_psf_model(psf), 2, _USE_3D).psf_at(0.0, 0.0, field_shape)


def _check_iterations(iterations: int) -> int:
    if isinstance(iterations, bool) or not isinstance(iterations, (int, np.integer)) or iterations < 0:
        raise ValueError(f"iterations must be a non-negative integer, got {iterations!r}")
    return int(iterations)


def _per_plane(arr: np.ndarray, fn) -> np.ndarray:
    planes = arr.reshape(-1, *arr.shape[-2:])
    out = np.empty(planes.shape, dtype=np.float32)
    for i, plane in enumerate(planes):
        out[i] = fn(plane)
    return out.reshape(arr.shape)


def richardson_lucy_central(image, psf: "PSFModel | str | dict", iterations: int = 30, *,
                            full_field=None) -> np.ndarray:
    """Richardson–Lucy deconvolution with the central PSF only (scikit-image).

    Parameters
    ----------
    image
        Blurred intensities, (H, W) or (..., H, W) (plane by plane). Negative values are clipped to zero
        (subtract any camera offset first).
    psf
        The PSF model; its PSF at the frame centre is used everywhere.
    iterations
        Number of RL iterations (more = sharper and noisier).
    full_field
        (H, W) of the whole field when the image is a region of it (a camera ROI): the PSF at the centre of that
        field is used. Default: the image is the whole field.

    Returns
    -------
    ndarray, float32, same shape and units as ``image``
    """
    arr = as_float(check_image(image))
    iterations = _check_iterations(iterations)
    kernel = central_psf(psf, arr.shape[-2:] if full_field is None else full_field)
    pad = kernel.shape[0]

    def one(plane: np.ndarray) -> np.ndarray:
        scale = float(plane.max())
        if scale <= 0 or iterations == 0:
            return plane
        # scikit-image starts from 0.5 everywhere, so it expects intensities around [0, 1]
        work = np.pad(np.clip(plane / scale, 0.0, None), pad, mode="symmetric").astype(np.float64)
        result = restoration.richardson_lucy(work, kernel, num_iter=iterations, clip=False)
        return result[pad:-pad, pad:-pad] * scale

    return _per_plane(arr, one)


def wiener_central(image, psf: "PSFModel | str | dict", balance: float = 0.02) -> np.ndarray:
    """Wiener deconvolution (Laplacian regulariser) with the central PSF only (scikit-image).

    Parameters
    ----------
    image
        Blurred intensities, (H, W) or (..., H, W) (plane by plane).
    psf
        The PSF model; its PSF at the frame centre is used everywhere.
    balance
        Regularisation weight: larger is smoother and less noisy.

    Returns
    -------
    ndarray, float32, same shape and units as ``image``
    """
    arr = as_float(check_image(image))
    if not (isinstance(balance, (int, float)) and balance > 0 and np.isfinite(balance)):
        raise ValueError(f"balance must be a positive number, got {balance!r}")
    kernel = central_psf(psf, arr.shape[-2:])
    pad = kernel.shape[0]

    def one(plane: np.ndarray) -> np.ndarray:
        work = np.pad(plane.astype(np.float64), pad, mode="symmetric")
        result = restoration.wiener(work, kernel, balance, clip=False)
        return result[pad:-pad, pad:-pad]

    return _per_plane(arr, one)


def sv_richardson_lucy(
    image,
    op_or_psf: "SpatiallyVaryingBlur | PSFModel | str | dict",
    iterations: int = 30,
    *,
    background: float = 0.0,
    should_stop: Callable[[], bool] | None = None,
    on_iteration: Callable[[int, int], None] | None = None,
    offset=(0, 0),
    full_field=None,
    device: "str | torch.device" = "cpu",
) -> np.ndarray:
    """Spatially varying Richardson–Lucy with the PSF-interpolation operator and its exact adjoint.

    Iterates ``x <- x * A^T(y / (A x + background)) / A^T 1`` from a flat start, which is the
    maximum-likelihood (Poisson) deconvolution under the spatially varying model ``A``.

    Parameters
    ----------
    image
        Blurred intensities ``y``, (H, W) or (..., H, W) (plane by plane). Negative values are clipped to
        zero.
    op_or_psf
        A :class:`SpatiallyVaryingBlur` built for the image's frame shape, or a PSF model (any
        :class:`PSFModel`, or what :func:`get_psf_model` resolves) to build one.
    iterations
        Number of iterations (more = sharper and noisier).
    background
        Known constant background in the image's units (e.g. the camera offset), modelled, not subtracted.
    should_stop
        Called before every iteration; when it returns True the current estimate is returned at once
        (planes of a stack not yet started are returned unchanged).
    on_iteration
        Called after every iteration as ``on_iteration(done, iterations)``.
    offset, full_field
        When the image is a region of the field (a camera ROI): its (y, x) in the field and the field's (H, W),
        so every pixel is deblurred with the PSF of its place (see :class:`SpatiallyVaryingBlur`). Used when
        ``op_or_psf`` is a PSF model; default: the image is the whole field.
    device
        Torch device, used when ``op_or_psf`` is a PSF model.

    Returns
    -------
    ndarray, float32, same shape and units as ``image``
    """
    arr = as_float(check_image(image))
    iterations = _check_iterations(iterations)
    if not (isinstance(background, (int, float)) and background >= 0 and np.isfinite(background)):
        raise ValueError(f"background must be a finite number >= 0, got {background!r}")
    if isinstance(op_or_psf, SpatiallyVaryingBlur):
        op = op_or_psf
    else:
        op = SpatiallyVaryingBlur(op_or_psf, arr.shape[-2:], offset=offset, full_field=full_field, device=device)
    if arr.shape[-2:] != op.field_shape:
        raise ValueError(
            f"image frame is {arr.shape[-2:]} but the operator was built for {op.field_shape}; "
            "pass a PSF model instead, or build the operator for this shape"
        )
    eps = torch.finfo(op.dtype).tiny ** 0.5
    with torch.no_grad():
        norm = op.apply_adjoint(torch.ones(op.field_shape, dtype=op.dtype, device=op.device))
        norm = norm.clamp_min(eps)
        planes = arr.reshape(-1, *op.field_shape)
        out = np.empty(planes.shape, dtype=np.float32)
        stopped = False
        for n, plane in enumerate(planes):
            if stopped:  # a stop before this plane started: return it as it came
                out[n] = plane
                continue
            out[n], stopped = _sv_rl_plane(op, plane, norm, eps, iterations, background, should_stop, on_iteration)
    return out.reshape(arr.shape)


def _sv_rl_plane(op, plane: np.ndarray, norm, eps: float, iterations: int, background: float, should_stop,
                 on_iteration, on_estimate=None) -> tuple[np.ndarray, bool]:
    """Richardson-Lucy iterations on one plane (or volume): (the estimate, whether a stop was requested).
    ``on_estimate(done, estimate)`` sees each iteration's estimate (float32 numpy), e.g. to choose the count.

    With no iteration done (zero iterations, or a stop before the first) the plane comes back as it came, not
    the flat start.
    """
    y = torch.as_tensor(np.clip(plane, 0.0, None), dtype=op.dtype, device=op.device)
    x = torch.full_like(y, max(float(y.mean()) - background, eps))
    floor = max(float(y.max()) * 1e-6, eps)
    done = 0
    for it in range(iterations):
        if should_stop is not None and should_stop():
            return (x.to("cpu", torch.float32).numpy() if done else plane), True
        # FFT round-off leaves tiny values, of either sign, where the image is black; a floor
        # relative to the image keeps their ratio bounded instead of blowing up to inf and NaN
        ratio = y / (op.apply(x) + background).clamp_min(floor)
        x = (x * op.apply_adjoint(ratio) / norm).clamp_min(0.0)
        done = it + 1
        if on_iteration is not None:
            on_iteration(done, iterations)
        if on_estimate is not None:
            on_estimate(done, x.to("cpu", torch.float32).numpy())
    return (x.to("cpu", torch.float32).numpy() if done else plane), False


def wiener_kernels(
    psf: "PSFModel | str | dict", field_shape, grid: int = 3, size: int = 49, balance: float = 0.02
) -> np.ndarray:
    """Spatial Wiener deconvolution kernels for the PSFs on a ``grid x grid`` lattice of the field.

    Kernel ``i * grid + j`` inverts the PSF at normalised position ``(ys[i], xs[j])`` with
    ``ys = xs = linspace(-1, 1, grid)``: its transfer function is ``conj(H) / (|H|^2 + balance |L|^2)`` with
    ``L`` the discrete Laplacian, cut to ``size x size`` pixels with a smooth taper and scaled to sum to one
    (a flat image stays flat). Convolving with it (true convolution) deconvolves that part of the field.

    Parameters
    ----------
    psf
        The PSF model (any :class:`PSFModel`, or what :func:`get_psf_model` resolves).
    field_shape
        (H, W) of the frame the PSF model describes.
    grid
        K: PSFs on a K x K lattice (``K = 1``: the central PSF only).
    size
        Kernel side in pixels (odd); a few PSF widths, since a Wiener filter's tails are longer than the PSF.
    balance
        Regularisation weight: larger is smoother and less noisy.

    Returns
    -------
    ndarray, float32, shape (grid * grid, size, size)
    """
    model = require_ndim(get_psf_model(psf), 2, _USE_3D)
    if size % 2 == 0 or size < 3:
        raise ValueError(f"size must be an odd number >= 3, got {size}")
    if not (isinstance(balance, (int, float)) and balance > 0 and np.isfinite(balance)):
        raise ValueError(f"balance must be a positive number, got {balance!r}")
    pos = grid_positions(int(grid))
    yy, xx = np.meshgrid(pos, pos, indexing="ij")
    psfs = model.psfs_at(yy.ravel(), xx.ravel(), field_shape)  # (K*K, P, P)
    p = psfs.shape[-1]
    n = 1 << int(np.ceil(np.log2(max(2 * size, 2 * p, 32))))
    embed = np.zeros((len(psfs), n, n))
    embed[:, :p, :p] = psfs
    embed = np.roll(embed, (-(p // 2), -(p // 2)), axis=(-2, -1))  # PSF centre at (0, 0)
    otf = np.fft.fft2(embed)
    w = 2 * np.pi * np.fft.fftfreq(n)
    lap = (4.0 - 2.0 * np.cos(w)[:, None] - 2.0 * np.cos(w)[None, :]) ** 2
    filt = np.conj(otf) / (np.abs(otf) ** 2 + balance * lap)
    kern = np.real(np.fft.ifft2(filt))
    r = size // 2
    kern = np.roll(kern, (r, r), axis=(-2, -1))[:, :size, :size]
    # taper the cut: a hard edge would ring
    t = np.hanning(size + 2)[1:-1]
    kern = kern * np.sqrt(np.outer(t, t))
    kern /= kern.sum(axis=(-2, -1), keepdims=True)
    return kern.astype(np.float32)


def sv_wiener(image, psf: "PSFModel | str | dict", grid: int | None = None, size: int | None = None,
              balance: float = 0.01) -> np.ndarray:
    """Spatially varying Wiener deconvolution: the image filtered with the Wiener kernels of the PSFs on a
    K x K grid (:func:`wiener_kernels`), blended per pixel with the same tent weights the blur model uses.

    One pass of FFT convolutions, so much faster than SV-RL; with K equal to the PSF model's own grid it inverts
    the blur model region by region.

    Parameters
    ----------
    image
        Blurred intensities, (H, W) or (..., H, W) (plane by plane).
    psf
        The PSF model (any :class:`PSFModel`, or what :func:`get_psf_model` resolves).
    grid
        K; default the PSF model's ``grid``.
    size
        Kernel side (odd); default twice the PSF side plus one.
    balance
        Regularisation weight: larger is smoother and less noisy.

    Returns
    -------
    ndarray, float32, same shape and units as ``image``
    """
    from scipy.signal import fftconvolve

    arr = as_float(check_image(image))
    model = get_psf_model(psf)
    k = model.grid if grid is None else int(grid)
    size = 2 * model.psf_size + 1 if size is None else int(size)
    h, w = arr.shape[-2:]
    kernels = wiener_kernels(model, (h, w), k, size, balance).astype(np.float64)
    wy, wx = tent_weights(field_axis(h), k).T, tent_weights(field_axis(w), k).T
    r = size // 2

    def one(plane: np.ndarray) -> np.ndarray:
        padded = np.pad(plane.astype(np.float64), r, mode="symmetric")
        out = np.zeros((h, w))
        for i in range(k):
            for j in range(k):
                weight = np.outer(wy[i], wx[j])
                if weight.any():
                    out += weight * fftconvolve(padded, kernels[i * k + j], mode="valid")
        return out

    return _per_plane(arr, one)
