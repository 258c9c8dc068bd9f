"""Image validation at the boundary: the one home of the rules every entry point applies to an image.

Optics, training data, simulation, prediction and the CLI all check their images here, so a rule (what counts
as RGB, which dtypes are grey values, when an image is too small) and its message exist once. The checks read an
array plane by plane and never copy it: a memory-mapped stack stays one, and a 100-plane stack is validated with
the memory of one plane. numpy only.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

__all__ = ["InputError", "check_layout", "check_values", "check_image", "as_float"]


class InputError(ValueError):
    """An input array cannot be used; the message says why and what to do."""


def _expected(min_ndim: int, max_ndim: int | None) -> str:
    if min_ndim == 2 and max_ndim == 2:
        return "a 2-D image (H, W)"
    if min_ndim == 2 and max_ndim == 3:
        return "a 2-D image (H, W) or a stack (N, H, W)"
    if min_ndim == 2 and max_ndim is None:
        return "a 2-D image (H, W) or a stack (..., H, W)"
    return f"an array of {min_ndim} to {max_ndim or 'any number of'} dimensions (..., H, W)"


def check_layout(shape: Sequence[int], dtype, name: str = "image", *, min_ndim: int = 2,
                 max_ndim: int | None = None, min_size: int = 1) -> None:
    """Check what an array's shape and dtype alone decide (no pixel is read, so lazy arrays qualify).

    Rejects bool, complex and non-numeric dtypes, RGB(A)-looking (H, W, 3|4) arrays, a number of dimensions
    outside ``[min_ndim, max_ndim]``, empty arrays and frames smaller than ``min_size`` per side, each with a
    message that names ``name`` and says what to do. Raises :class:`InputError` (a ``ValueError``).
    """
    shape, dtype = tuple(int(s) for s in shape), np.dtype(dtype)
    if dtype.kind == "b":
        raise InputError(f"{name} is boolean (dtype bool, a mask?); expected integer or float grey values")
    if np.issubdtype(dtype, np.complexfloating):
        raise InputError(f"{name} is complex (dtype {dtype}); pass the real intensity (e.g. np.abs(x)) instead")
    if not np.issubdtype(dtype, np.number):
        raise InputError(f"{name} must be numeric, got dtype {dtype}; expected integer or float grey values")
    if len(shape) == 3 and shape[-1] in (3, 4) and min(shape[:2]) > 4:
        raise InputError(f"{name} of shape {shape} looks like an RGB(A) image; convert it to grey or pick one "
                         "channel")
    if len(shape) < min_ndim or (max_ndim is not None and len(shape) > max_ndim):
        raise InputError(f"{name}: expected {_expected(min_ndim, max_ndim)}, got shape {shape}")
    if 0 in shape:
        raise InputError(f"{name} is empty (shape {shape}); every axis needs at least one pixel")
    h, w = shape[-2:]
    if h < min_size or w < min_size:
        raise InputError(f"{name} is {h}x{w} pixels, smaller than the minimum {min_size}x{min_size} for this "
                         "network")


def check_values(plane: np.ndarray, which: str = "image", allow_constant: bool = True) -> None:
    """Check the values of one plane (or a window of one): no NaN/Inf and, unless allowed, not constant.

    ``which`` names it in the message ("sharp plane 3", "image plane (2, 0)"). For arrays read piece by piece
    (a lazy stack); :func:`check_image` calls it on every plane.
    """
    if plane.dtype.kind == "f":
        bad = int(np.count_nonzero(~np.isfinite(plane)))
        if bad:
            raise InputError(f"{which} contains {bad} NaN or Inf value(s); replace them (e.g. with np.nan_to_num) "
                             "first")
    if not allow_constant:
        lo, hi = float(plane.min()), float(plane.max())
        if lo == hi:
            raise InputError(f"{which} is constant (all {lo:g}); it carries no structure to learn from")


def check_image(image, name: str = "image", *, min_ndim: int = 2, max_ndim: int | None = None, min_size: int = 1,
                allow_constant: bool = True) -> np.ndarray:
    """Validate a grey image (H, W) or a stack (..., H, W) and return it as a numpy array, not copied.

    Parameters
    ----------
    image
        Array-like (a torch tensor is moved to the CPU); a numpy memory map is returned as it is.
    name
        How the messages refer to the array (a file name, "sharp", ...).
    min_ndim, max_ndim, min_size
        See :func:`check_layout`.
    allow_constant
        False rejects planes with a single value (nothing to learn from).

    Returns
    -------
    ndarray
        ``image`` itself as an array, in its own dtype: convert with :func:`as_float` or per crop.

    Raises
    ------
    InputError
        The layout rules of :func:`check_layout`, NaN/Inf values and (unless allowed) constant planes; each
        plane is read once, one at a time.
    """
    if hasattr(image, "detach") and hasattr(image, "cpu"):  # a torch tensor, without importing torch here
        image = image.detach().cpu().numpy()
    arr = np.asarray(image)
    check_layout(arr.shape, arr.dtype, name, min_ndim=min_ndim, max_ndim=max_ndim, min_size=min_size)
    lead = arr.shape[:-2]
    single = int(np.prod(lead, dtype=np.int64)) == 1
    for i, idx in enumerate(np.ndindex(*lead)):
        check_values(arr[idx], name if single else f"{name} plane {i}", allow_constant)
    return arr


def as_float(arr: np.ndarray) -> np.ndarray:
    """``arr`` as floats for computing: float arrays unchanged (no copy), integers of up to 16 bits as float32
    (exact), wider integers as float64."""
    arr = np.asarray(arr)
    if np.issubdtype(arr.dtype, np.floating):
        return arr
    return arr.astype(np.float32 if arr.dtype.itemsize <= 2 else np.float64)
