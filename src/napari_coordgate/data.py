"""Calibration pairs, intensity normalisation and position-carrying training crops.

Everything here is numpy: arrays in, arrays out. The image rules themselves live in
:mod:`napari_coordgate.checks` (re-exported here: :class:`InputError`, :func:`check_image`); the checks of
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

from .checks import InputError, as_float, check_image
from .optics.shift import fourier_shift

__all__ = [
    "InputError",
    "float32",
    "as_planes",
    "check_image",
    "check_pairs",
    "check_registration",
    "Normalization",
    "NORM_PERCENTILES",
    "plane_sample",
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


#: the percentiles mapped to 0 and 1 by the normalisation (the background and the bright end, above hot pixels):
#: of the training sharp images (fixed) or of each input plane (per image)
NORM_PERCENTILES = (0.1, 99.9)
#: pixels of a plane that per-image normalisation reads (a regular subsample of larger planes)
PLANE_SAMPLE_PIXELS = 1 << 20


def plane_sample(plane) -> np.ndarray:
    """A regular subsample of a 2-D plane or a 3-D volume (numpy, memory map, dask...) of at most about
    :data:`PLANE_SAMPLE_PIXELS` pixels (every k-th row and column of every plane), as a flat float64 array: what
    per-image normalisation reads."""
    n = int(np.prod(plane.shape[-3:] if plane.ndim >= 3 else plane.shape[-2:], dtype=np.int64))
    k = max(1, int(np.ceil(np.sqrt(n / PLANE_SAMPLE_PIXELS))))
    sub = plane[..., ::k, ::k]
    sub = sub.compute() if hasattr(sub, "compute") else sub
    return np.asarray(sub, dtype=np.float64).reshape(-1)


@dataclass(frozen=True)
class Normalization:
    """The network sees ``(image - offset) / scale``; outputs are mapped back with the inverse.

    With ``percentiles`` (per-image normalisation) the offset and scale of each input plane come from that plane
    (:meth:`for_plane`): its low percentile goes to 0 and its high one to 1, and the output returns to the plane's
    own units. A camera offset ``c`` and gain ``a`` then leave the result unchanged up to the same map
    (``a * x + c -> a * f(x) + c``): deconvolution commutes with them and so does the network. ``offset`` and
    ``scale`` are then the training images' units, used only for a constant plane (no range to measure).
    Without ``percentiles`` (models written before schema 3) every plane uses ``offset`` and ``scale``.
    """

    offset: float = 0.0
    scale: float = 1.0
    percentiles: tuple[float, float] | None = None

    @property
    def per_image(self) -> bool:
        return self.percentiles is not None

    def apply(self, x: np.ndarray) -> np.ndarray:
        return ((x - self.offset) / self.scale).astype(np.float32, copy=False)

    def invert(self, x: np.ndarray) -> np.ndarray:
        return (x * self.scale + self.offset).astype(np.float32, copy=False)

    def for_plane(self, plane) -> "Normalization":
        """The fixed map for one input plane (2-D, any array that slices): itself unless per-image; then the
        plane's percentiles (read from :func:`plane_sample`), or its constant value as the offset."""
        return self if self.percentiles is None else self.for_sample(plane_sample(plane))

    def for_sample(self, sample: np.ndarray) -> "Normalization":
        """:meth:`for_plane` from a plane's :func:`plane_sample` already read."""
        if self.percentiles is None:
            return self
        lo, hi = np.percentile(sample, self.percentiles)
        return Normalization(float(lo), float(hi - lo) if hi > lo else self.scale)

    def describe(self) -> str:
        """One line for a model summary: how the model reads intensities."""
        if self.percentiles is not None:
            lo, hi = self.percentiles
            return f"per image ({lo:g}-{hi:g} percentiles): camera offset and gain do not matter"
        return f"fixed (offset {self.offset:.4g}, scale {self.scale:.4g}): give images in the training units"

    def to_dict(self) -> dict:
        d: dict = {"offset": float(self.offset), "scale": float(self.scale)}
        if self.percentiles is not None:
            d["percentiles"] = [float(p) for p in self.percentiles]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Normalization":
        """From :meth:`to_dict`'s form; raises ValueError for a scale <= 0 or percentiles not 0 <= low < high <= 100."""
        pct = d.get("percentiles")
        if pct is not None:
            lo, hi = (float(v) for v in pct)
            if not 0.0 <= lo < hi <= 100.0:
                raise ValueError(f"normalization percentiles must satisfy 0 <= low < high <= 100, got {list(pct)}")
            pct = (lo, hi)
        norm = cls(float(d["offset"]), float(d["scale"]), pct)
        if not norm.scale > 0:
            raise ValueError(f"normalization scale must be > 0, got {norm.scale}")
        return norm


def fit_normalization(sharp, per_image: bool = False) -> Normalization:
    """Percentile-based offset and scale (:data:`NORM_PERCENTILES`) from the training sharp images (robust to hot
    pixels); with ``per_image`` they are kept as the units of constant planes and each plane is normalised by its
    own percentiles (:meth:`Normalization.for_plane`).

    ``sharp`` is (H, W) or (N, H, W), in any dtype. A stack of more than 4 million pixels is sampled (every k-th
    pixel in memory order), one plane at a time, so a memory-mapped stack is never read whole into memory.
    """
    stack = as_planes(np.asarray(sharp))
    n, per = stack.shape[0], stack.shape[1] * stack.shape[2]
    step = n * per // 4_000_000 + 1 if n * per > 4_000_000 else 1
    # the pixels k * step of the flattened stack, gathered plane by plane
    sample = np.concatenate([float32(stack[i].reshape(-1)[(-i * per) % step :: step]) for i in range(n)])
    lo, hi = np.percentile(sample, NORM_PERCENTILES)
    if not hi > lo:
        lo, hi = float(sample.min()), float(sample.max())
    return Normalization(float(lo), float(hi - lo), NORM_PERCENTILES if per_image else None)


def registration_shift(sharp: np.ndarray, blurred: np.ndarray) -> tuple[float, float]:
    """Sub-pixel (dy, dx) that registers ``blurred`` onto ``sharp`` (phase correlation, 1/20 pixel)."""
    from skimage.registration import phase_cross_correlation

    shift, _, _ = phase_cross_correlation(sharp, blurred, upsample_factor=20, normalization=None)
    return float(shift[0]), float(shift[1])


def correct_shift(image: np.ndarray, shift: Sequence[float]) -> np.ndarray:
    """Shift an image by (dy, dx) pixels with a Fourier shift (sub-pixel, periodic at borders)."""
    return fourier_shift(image, shift[0], shift[1]).astype(np.float32)


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
