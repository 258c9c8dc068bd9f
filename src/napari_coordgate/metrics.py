"""Quality by position: PSNR/SSIM (scikit-image), error-by-position maps and field-ring profiles.

Rings use the per-axis field radius ``r = sqrt(x**2 + y**2)`` of the normalised field coordinates
(x, y in [-1, 1] at pixel centres), so ``r`` reaches sqrt(2) in the corners: centre ``r < 0.5``, middle
``0.5 <= r < 1``, edge ``r >= 1``. The data range of every PSNR/SSIM is the ground truth's (max - min),
given explicitly, so a restored image cannot change the scale it is judged on.

The position-dependent functions take the image's field geometry: ``field_shape`` (the training field, in
the image's pixels: divided by the binning) and ``offset`` (the image's top-left pixel in it), as returned
by :func:`napari_coordgate.engine.field_geometry`. By default the image is the whole field. A ring with no
pixels in the image (the centre ring of a corner ROI) has ``"pixels": 0`` and ``"psnr": None``.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from .coords import field_axis

__all__ = [
    "RINGS",
    "psnr",
    "PSNRAccumulator",
    "ssim",
    "field_radius",
    "ring_masks",
    "depth_psnr",
    "error_map",
    "ring_psnr",
    "radial_profile",
    "quality_report",
]

RINGS: tuple[tuple[str, float, float], ...] = (("centre", 0.0, 0.5), ("middle", 0.5, 1.0), ("edge", 1.0, math.inf))


def _pair(gt, img) -> tuple[np.ndarray, np.ndarray]:
    gt = np.asarray(gt, dtype=np.float64)
    img = np.asarray(img, dtype=np.float64)
    if gt.shape != img.shape:
        raise ValueError(f"ground truth and image must have the same shape, got {gt.shape} and {img.shape}")
    if gt.ndim < 2 or gt.size == 0:
        raise ValueError(f"expected a 2-D image or a stack (..., H, W), got shape {gt.shape}")
    if not (np.isfinite(gt).all() and np.isfinite(img).all()):
        raise ValueError("images contain NaN or Inf values")
    return gt, img


def _range(gt: np.ndarray) -> float:
    r = float(gt.max() - gt.min())
    if r <= 0:
        raise ValueError("ground truth is constant; PSNR/SSIM need a data range > 0")
    return r


def _psnr_from_mse(mse: float, data_range: float) -> float:
    return math.inf if mse == 0 else 10.0 * math.log10(data_range**2 / mse)


def psnr(gt, img, data_range: float | None = None, *, mask=None) -> float:
    """PSNR in dB over all planes (one MSE), with the ground truth's range unless given.

    ``mask`` (bool, broadcast to the images' shape) restricts the MSE to its True pixels; the data range is still
    the whole ground truth's unless given.
    """
    from skimage.metrics import peak_signal_noise_ratio

    gt, img = _pair(gt, img)
    if mask is None:
        return float(peak_signal_noise_ratio(gt, img, data_range=data_range or _range(gt)))
    acc = PSNRAccumulator(data_range or _range(gt))
    acc.add(gt, img, np.broadcast_to(mask, gt.shape))
    return acc.value


class PSNRAccumulator:
    """PSNR of one MSE over pieces seen one at a time (planes, tiles of a plane), optionally masked.

    For stacks too large to hold a prediction of: add each piece as it is computed; :attr:`value` is the PSNR of
    all the pixels added so far, as if they had been scored together. The difference is taken in the pieces' own
    dtype and squared in float64.
    """

    def __init__(self, data_range: float):
        self.data_range = float(data_range)
        self.total = 0.0  # sum of squared errors
        self.pixels = 0

    def add(self, gt: np.ndarray, img: np.ndarray, mask: np.ndarray | None = None) -> None:
        """Add the squared errors of ``img`` against ``gt`` (where ``mask`` is True, if given; a (h, w) mask of a
        volume's window holds for each of its planes)."""
        diff = gt - img
        if mask is not None:
            diff = diff[np.broadcast_to(mask, diff.shape)]
        self.total += float(np.sum(np.square(diff, dtype=np.float64)))
        self.pixels += int(diff.size)

    @property
    def value(self) -> float:
        """PSNR in dB of everything added (inf for no error; NaN before anything was added)."""
        return math.nan if self.pixels == 0 else _psnr_from_mse(self.total / self.pixels, self.data_range)


def ssim(gt, img, data_range: float | None = None) -> float:
    """Mean SSIM over the 2-D planes (scikit-image), with the ground truth's range unless given."""
    from skimage.metrics import structural_similarity

    gt, img = _pair(gt, img)
    dr = data_range or _range(gt)
    planes_gt = gt.reshape(-1, *gt.shape[-2:])
    planes_im = img.reshape(-1, *img.shape[-2:])
    vals = []
    for a, b in zip(planes_gt, planes_im):
        win = min(7, *(s - (1 - s % 2) for s in a.shape))
        vals.append(structural_similarity(a, b, data_range=dr, win_size=max(3, win)))
    return float(np.mean(vals))


def field_radius(shape: Sequence[int], field_shape: Sequence[int] | None = None,
                 offset: Sequence[int] = (0, 0)) -> np.ndarray:
    """Per-axis field radius of every pixel of an (H, W) image placed at ``offset`` in the field."""
    h, w = int(shape[0]), int(shape[1])
    fh, fw = (h, w) if field_shape is None else (int(field_shape[0]), int(field_shape[1]))
    y = field_axis(fh, offset[0], h)
    x = field_axis(fw, offset[1], w)
    return np.sqrt(y[:, None] ** 2 + x[None, :] ** 2)


def ring_masks(r, rings=RINGS) -> list[tuple[str, float, float, np.ndarray]]:
    """Which of the field radii ``r`` (pixels, beads: any shape) fall in each ring: ``(name, r_min, r_max, mask)``
    per ring of ``rings``, ``mask`` True where ``r_min <= r < r_max``."""
    r = np.asarray(r)
    return [(name, lo, hi, (r >= lo) & (r < hi)) for name, lo, hi in rings]


def error_map(gt, img, bin: int = 8) -> np.ndarray:
    """Squared error per position, averaged over planes and over ``bin`` x ``bin`` blocks.

    Returns an (H, W) float32 map (blocks expanded back to full size so it overlays the image).
    """
    gt, img = _pair(gt, img)
    se = np.square(gt - img).reshape(-1, *gt.shape[-2:]).mean(axis=0)
    if bin <= 1:
        return se.astype(np.float32)
    h, w = se.shape
    hb, wb = -(-h // bin), -(-w // bin)
    padded = np.full((hb * bin, wb * bin), np.nan)
    padded[:h, :w] = se
    blocks = np.nanmean(padded.reshape(hb, bin, wb, bin), axis=(1, 3))
    return np.repeat(np.repeat(blocks, bin, 0), bin, 1)[:h, :w].astype(np.float32)


def ring_psnr(gt, img, rings=RINGS, data_range: float | None = None, *, field_shape: Sequence[int] | None = None,
              offset: Sequence[int] = (0, 0)) -> list[dict]:
    """PSNR per field ring: list of {name, r_min, r_max, psnr, pixels}; ``psnr`` is None for an empty ring.

    ``field_shape`` and ``offset`` place the image in the field (default: the image is the whole field).
    """
    gt, img = _pair(gt, img)
    dr = data_range or _range(gt)
    r = field_radius(gt.shape[-2:], field_shape, offset)
    se = np.square(gt - img).reshape(-1, *gt.shape[-2:])
    out = []
    for name, lo, hi, sel in ring_masks(r, rings):
        n = int(sel.sum())
        val = _psnr_from_mse(float(se[:, sel].mean()), dr) if n else None
        out.append({"name": name, "r_min": lo, "r_max": None if math.isinf(hi) else hi, "psnr": val, "pixels": n})
    return out


def radial_profile(gt, img, n_bins: int = 12, data_range: float | None = None, *,
                   field_shape: Sequence[int] | None = None,
                   offset: Sequence[int] = (0, 0)) -> tuple[np.ndarray, np.ndarray]:
    """PSNR as a function of field radius: (bin centres in r, PSNR per bin; NaN where a bin has no pixel).

    ``field_shape`` and ``offset`` place the image in the field (default: the image is the whole field).
    """
    gt, img = _pair(gt, img)
    dr = data_range or _range(gt)
    r = field_radius(gt.shape[-2:], field_shape, offset)
    se = np.square(gt - img).reshape(-1, *gt.shape[-2:]).mean(axis=0)
    edges = np.linspace(0.0, float(r.max()) + 1e-9, n_bins + 1)
    idx = np.clip(np.digitize(r, edges) - 1, 0, n_bins - 1)
    sums = np.bincount(idx.ravel(), se.ravel(), n_bins)
    counts = np.bincount(idx.ravel(), None, n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mse = sums / counts
        prof = np.where(mse > 0, 10 * np.log10(dr**2 / mse), np.inf)
        prof = np.where(counts > 0, prof, np.nan)
    return 0.5 * (edges[1:] + edges[:-1]), prof


def depth_psnr(gt, img, data_range: float | None = None, bins: int = 8) -> list[dict]:
    """PSNR of volumes (..., D, H, W) by depth: the D planes cut into at most ``bins`` consecutive slabs (one per
    plane when D <= bins), each ``{"planes": [z0, z1], "psnr": dB}`` over every volume's planes z0 to z1 - 1."""
    gt, img = _pair(gt, img)
    if gt.ndim < 3:
        raise ValueError(f"PSNR by depth needs volumes (..., D, H, W), got shape {gt.shape}")
    dr = data_range or _range(gt)
    d = gt.shape[-3]
    edges = np.unique(np.linspace(0, d, min(d, int(bins)) + 1).round().astype(int))
    out = []
    for z0, z1 in zip(edges[:-1], edges[1:]):
        acc = PSNRAccumulator(dr)
        acc.add(gt[..., z0:z1, :, :], img[..., z0:z1, :, :])
        out.append({"planes": [int(z0), int(z1)], "psnr": acc.value})
    return out


def quality_report(gt, restored, blurred=None, *, field_shape: Sequence[int] | None = None,
                   offset: Sequence[int] = (0, 0), volumes: bool = False) -> dict:
    """JSON-able quality report: psnr, ssim, psnr_by_ring (and the same for the blurred input); for ``volumes``
    (..., D, H, W) also psnr_by_depth (:func:`depth_psnr`).

    ``field_shape`` and ``offset`` place the image in the field for the rings (default: the whole field).
    """
    gt = np.asarray(gt)
    dr = _range(np.asarray(gt, dtype=np.float64))
    pieces = {"": restored} if blurred is None else {"": restored, "_blurred": blurred}
    rep: dict = {"data_range": dr}
    for suffix, img in pieces.items():
        rep["psnr" + suffix] = psnr(gt, img, dr)
        rep["ssim" + suffix] = ssim(gt, img, dr)
        rep["psnr_by_ring" + suffix] = ring_psnr(gt, img, data_range=dr, field_shape=field_shape, offset=offset)
        if volumes:
            rep["psnr_by_depth" + suffix] = depth_psnr(gt, img, dr)
    return rep
