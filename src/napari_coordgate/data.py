"""Calibration pairs, intensity normalisation and position-carrying training crops.

Everything here is numpy: arrays in, arrays out. The image rules themselves live in
:mod:`napari_coordgate.optics.checks` (re-exported here: :class:`InputError`, :func:`check_image`); the checks of
this module read a stack one plane at a time and never copy it, so a memory-mapped stack stays on disk.
Training crops keep their **true field offset** so that a position-aware network learns which blur belongs
where; augmentations are limited to intensity changes, which do not break the position <-> blur relation (flips
or rotations would).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .optics.checks import InputError, as_float, check_image

__all__ = [
    "InputError",
    "float32",
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


def float32(a) -> np.ndarray:
    """``a`` (a plane, a crop) as float32 for the network: floats cast, integers exactly (wide ones through
    float64, as every check of this package converts them)."""
    return as_float(a).astype(np.float32, copy=False)


def as_planes(arr: np.ndarray) -> np.ndarray:
    """View a (H, W) image as a (1, H, W) stack."""
    return arr[None] if arr.ndim == 2 else arr


def check_pairs(sharp, blurred, *, min_size: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Validate calibration pairs: equal shapes, 2-D or (N, H, W), no constant plane, no identical pair.

    Returns the two (N, H, W) stacks in their own dtypes, not copied (a memory map stays one): every check reads
    one plane at a time, so a stack larger than memory can be validated.
    """
    s = as_planes(check_image(sharp, "sharp", max_ndim=3, min_size=min_size, allow_constant=False))
    b = as_planes(check_image(blurred, "blurred", max_ndim=3, min_size=min_size, allow_constant=False))
    if s.shape != b.shape:
        raise InputError(
            f"sharp and blurred must have the same shape, got {s.shape} and {b.shape} "
            "(the k-th sharp plane pairs with the k-th blurred plane)"
        )
    same = next((i for i in range(s.shape[0]) if np.array_equal(s[i], b[i])), None)
    if same is not None:
        which = "the sharp and blurred images are" if s.shape[0] == 1 else f"sharp and blurred plane {same} are"
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


def fit_normalization(sharp, low: float = 0.1, high: float = 99.9) -> Normalization:
    """Percentile-based offset and scale from the training sharp images (robust to hot pixels).

    ``sharp`` is (H, W) or (N, H, W), in any dtype. A stack of more than 4 million pixels is sampled (every k-th
    pixel in memory order), one plane at a time, so a memory-mapped stack is never read whole into memory.
    """
    stack = as_planes(np.asarray(sharp))
    n, per = stack.shape[0], stack.shape[1] * stack.shape[2]
    step = n * per // 4_000_000 + 1 if n * per > 4_000_000 else 1
    # the pixels k * step of the flattened stack, gathered plane by plane
    sample = np.concatenate([float32(stack[i].reshape(-1)[(-i * per) % step :: step]) for i in range(n)])
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


def check_registration(sharp, blurred, tolerance: float = 0.25,
                       correct: bool = False) -> tuple[dict[int, np.ndarray], list[tuple[float, float]]]:
    """Check every pair of two (N, H, W) stacks for a misregistration above ``tolerance`` pixels, plane by plane.

    Returns (registered, shifts): with ``correct=True``, ``registered`` maps the index of every shifted blurred
    plane to a float32 copy registered onto its sharp plane (the stacks themselves are never written: they may be
    read-only memory maps); otherwise it is empty and a warning names the planes and the shifts.
    """
    shifts = [registration_shift(float32(sharp[i]), float32(blurred[i])) for i in range(len(sharp))]
    bad = [(i, sh) for i, sh in enumerate(shifts) if max(abs(sh[0]), abs(sh[1])) > tolerance]
    if bad and correct:
        return {i: correct_shift(float32(blurred[i]), sh) for i, sh in bad}, shifts
    if bad:
        listed = ", ".join(f"plane {i}: dy={sh[0]:+.2f}, dx={sh[1]:+.2f}" for i, sh in bad[:5])
        warnings.warn(
            f"calibration pairs look misregistered ({listed}); register them or train with "
            "register=True (CLI: --register)",
            stacklevel=2,
        )
    return {}, shifts


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
