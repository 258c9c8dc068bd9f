"""Input validation, intensity normalisation and position-carrying training crops.

Everything here is numpy: arrays in, arrays out. Training crops keep their **true field offset** so that a
position-aware network learns which blur belongs where; augmentations are limited to intensity changes,
which do not break the position <-> blur relation (flips or rotations would).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Sequence

import numpy as np

__all__ = [
    "InputError",
    "as_planes",
    "check_image",
    "check_pairs",
    "check_registration",
    "Normalization",
    "fit_normalization",
    "registration_shift",
    "correct_shift",
    "checkerboard_mask",
    "sample_offsets",
]


class InputError(ValueError):
    """An input array cannot be used; the message says why and what to do."""


def check_image(arr, name: str = "image", *, allow_stack: bool = True, min_size: int = 1) -> np.ndarray:
    """Validate one grey image (H, W) or a stack of planes (N, H, W); return it as float32 (a copy).

    Rejects bool/complex/object dtypes, empty arrays, RGB-looking or >3-D data, NaN/Inf and constant
    images, and images smaller than ``min_size`` per side.
    """
    a = np.asarray(arr)
    if a.dtype == bool or np.issubdtype(a.dtype, np.complexfloating) or not np.issubdtype(a.dtype, np.number):
        raise InputError(f"{name}: dtype {a.dtype} is not supported; expected integer or float grey values")
    if a.size == 0:
        raise InputError(f"{name} is empty (shape {a.shape})")
    if a.ndim == 3 and a.shape[-1] in (3, 4) and min(a.shape[:2]) > 4:
        raise InputError(
            f"{name} of shape {a.shape} looks like an RGB(A) image; convert it to grey or pick one channel"
        )
    if a.ndim not in ((2, 3) if allow_stack else (2,)):
        expected = "2-D image (H, W) or a stack (N, H, W)" if allow_stack else "2-D image (H, W)"
        raise InputError(f"{name}: expected a {expected}, got shape {a.shape}")
    h, w = a.shape[-2:]
    if h < min_size or w < min_size:
        raise InputError(f"{name} is {h}x{w} pixels, smaller than the minimum {min_size}x{min_size} for this network")
    # float64 for integer inputs avoids uint16 overflow / precision loss before the final float32 cast
    f = a.astype(np.float64 if np.issubdtype(a.dtype, np.integer) else a.dtype, copy=False)
    if not np.isfinite(f).all():
        raise InputError(f"{name} contains NaN or Inf values; remove or replace them first")
    planes = f.reshape(-1, h, w)
    for i, plane in enumerate(planes):
        if float(plane.max()) == float(plane.min()):
            which = f"{name}" if planes.shape[0] == 1 else f"{name} plane {i}"
            raise InputError(f"{which} is constant (all {float(plane.min()):g}); it carries no structure to learn from")
    return f.astype(np.float32, copy=True)


def as_planes(arr: np.ndarray) -> np.ndarray:
    """View a (H, W) image as a (1, H, W) stack."""
    return arr[None] if arr.ndim == 2 else arr


def check_pairs(sharp, blurred, *, min_size: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Validate calibration pairs: equal shapes, 2-D or (N, H, W); returns float32 (N, H, W) stacks."""
    s = as_planes(check_image(sharp, "sharp", min_size=min_size))
    b = as_planes(check_image(blurred, "blurred", min_size=min_size))
    if s.shape != b.shape:
        raise InputError(
            f"sharp and blurred must have the same shape, got {s.shape} and {b.shape} "
            "(the k-th sharp plane pairs with the k-th blurred plane)"
        )
    same = [i for i in range(s.shape[0]) if np.array_equal(s[i], b[i])]
    if same:
        which = "the sharp and blurred images are" if s.shape[0] == 1 else f"sharp and blurred plane {same[0]} are"
        raise InputError(f"{which} identical (the same layer, file or pixels): give the blurred image of the same "
                         "field, or train from sharp images and a PSF model")
    return s, b


@dataclass(frozen=True)
class Normalization:
    """The network sees ``(image - offset) / scale``; outputs are mapped back with the inverse."""

    offset: float = 0.0
    scale: float = 1.0

    def apply(self, x: np.ndarray) -> np.ndarray:
        return ((x - self.offset) / self.scale).astype(np.float32, copy=False)

    def invert(self, x: np.ndarray) -> np.ndarray:
        return (x * self.scale + self.offset).astype(np.float32, copy=False)

    def to_dict(self) -> dict:
        return {"offset": float(self.offset), "scale": float(self.scale)}

    @classmethod
    def from_dict(cls, d: dict) -> "Normalization":
        return cls(float(d["offset"]), float(d["scale"]))


def fit_normalization(sharp: np.ndarray, low: float = 0.1, high: float = 99.9) -> Normalization:
    """Percentile-based offset and scale from the training sharp images (robust to hot pixels)."""
    sample = sharp.ravel()
    if sample.size > 4_000_000:
        sample = sample[:: sample.size // 4_000_000 + 1]
    lo, hi = np.percentile(sample, [low, high])
    if not hi > lo:
        lo, hi = float(sample.min()), float(sample.max())
    return Normalization(float(lo), float(hi - lo))


def registration_shift(sharp: np.ndarray, blurred: np.ndarray) -> tuple[float, float]:
    """Sub-pixel (dy, dx) that registers ``blurred`` onto ``sharp`` (phase correlation, 1/20 pixel)."""
    from skimage.registration import phase_cross_correlation

    shift, _, _ = phase_cross_correlation(sharp, blurred, upsample_factor=20, normalization=None)
    return float(shift[0]), float(shift[1])


def correct_shift(image: np.ndarray, shift: Sequence[float]) -> np.ndarray:
    """Shift an image by (dy, dx) pixels with a Fourier shift (sub-pixel, periodic at borders)."""
    from scipy.ndimage import fourier_shift

    spec = fourier_shift(np.fft.fftn(image), shift)
    return np.real(np.fft.ifftn(spec)).astype(np.float32)


def check_registration(sharp: np.ndarray, blurred: np.ndarray, tolerance: float = 0.25, correct: bool = False):
    """Check every pair for a misregistration above ``tolerance`` pixels.

    Returns (blurred, shifts). With ``correct=True`` shifted planes are registered onto their sharp plane;
    otherwise a warning names the planes and the shifts.
    """
    shifts = [registration_shift(s, b) for s, b in zip(sharp, blurred)]
    bad = [(i, sh) for i, sh in enumerate(shifts) if max(abs(sh[0]), abs(sh[1])) > tolerance]
    if bad and correct:
        blurred = blurred.copy()
        for i, sh in bad:
            blurred[i] = correct_shift(blurred[i], sh)
    elif bad:
        listed = ", ".join(f"plane {i}: dy={sh[0]:+.2f}, dx={sh[1]:+.2f}" for i, sh in bad[:5])
        warnings.warn(
            f"calibration pairs look misregistered ({listed}); register them or train with "
            "register=True (CLI: --register)",
            stacklevel=2,
        )
    return blurred, shifts


def checkerboard_mask(shape: tuple[int, int], tile: int = 32, period: int = 3) -> np.ndarray:
    """Validation mask for a single calibration pair: small tiles spread over the whole field.

    The field is cut into ``tile``-pixel squares; every ``period``-th square along each axis (a sparse
    checkerboard, ``1 / period**2`` of the area) is held out, so validation covers centre, middle and edge
    alike while training still sees every region around them. Returns bool, True = validation pixel.
    """
    h, w = shape
    iy = np.arange(h)[:, None] // tile
    ix = np.arange(w)[None, :] // tile
    return (iy % period == period // 2) & (ix % period == period // 2)


def sample_offsets(
    rng: np.random.Generator, n: int, field_shape: tuple[int, int], crop: tuple[int, int], align: int,
    mode: str = "uniform",
) -> np.ndarray:
    """``n`` random crop offsets (y, x) inside the field, multiples of ``align`` (the pooling grid).

    ``mode="uniform"`` draws the offset uniformly, so the field's outer pixels are inside a crop far less often
    than the centre (a pixel at the border only when the offset is 0 or the largest). ``mode="cover"`` draws
    the crop's centre uniformly over the whole field and clips the crop inside it, which puts the border
    pixels in a crop about ``crop / (2 * field)`` of the time instead of ``1 / (number of offsets)``.
    """
    if mode not in ("uniform", "cover"):
        raise ValueError(f"mode must be 'uniform' or 'cover', got {mode!r}")
    out = np.empty((n, 2), dtype=np.int64)
    for axis in range(2):
        hi = (field_shape[axis] - crop[axis]) // align
        if mode == "uniform":
            out[:, axis] = rng.integers(0, hi + 1, size=n) * align
        else:
            centre = rng.uniform(0, field_shape[axis], size=n)
            start = np.clip(centre - crop[axis] / 2, 0, hi * align)
            out[:, axis] = np.round(start / align).astype(np.int64) * align
    return out
