"""The camera's noise in its own units: Poisson shot noise and Gaussian read noise, as a mean-variance line.

A camera that counts photo-electrons with gain ``g`` (image units per electron) on an offset ``o`` records a pixel
of expected value ``m`` with variance

    var(m) = g * (m - o) + r**2

(shot noise, read noise ``r`` in image units). :class:`NoiseModel` holds that line as slope and intercept;
:func:`estimate_noise` measures it from the images themselves (no flat fields, no dark frames): a high-pass
residual that keeps white noise's variance and little of a blurred image's signal, its robust variance in bins of
the local mean, and a robust straight-line fit through the bins. With the gain and offset given, only the read
noise is measured.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["NoiseModel", "estimate_noise"]

#: the high-pass residual: the product of second differences along y and x, scaled so white noise keeps its
#: variance; it is blind to any signal that is linear or quadratic along either axis (less signal left in it than
#: in a Laplacian's on blurred images: slope within 10 % of the truth where the Laplacian's was 30 % high)
_HIGHPASS = np.outer([1.0, -2.0, 1.0], [1.0, -2.0, 1.0]) / 6.0
_BINS = 24  # bins of the local mean per plane (fewer on small planes)
_MIN_BIN = 128  # pixels a bin needs for a robust variance


@dataclass(frozen=True)
class NoiseModel:
    """``var(m) = slope * m + intercept`` in image units; ``gain`` and ``offset`` when given or measured."""

    slope: float
    intercept: float
    estimated: bool = True  # measured from the images (False: gain and offset given, read noise measured)
    offset: float | None = None
    dark: float = 0.0  # the darkest local mean measured: the read noise is read there when the offset is unknown

    @classmethod
    def from_camera(cls, gain: float, offset: float, read_variance: float = 0.0) -> "NoiseModel":
        """The line of a camera with ``gain`` (image units per electron), ``offset`` and read variance."""
        return cls(float(gain), float(read_variance) - float(gain) * float(offset), False, float(offset))

    @property
    def floor(self) -> float:
        """The smallest variance the model gives (a pixel at or below the offset: its read noise; never 0)."""
        return max(self.read_variance, 1e-12)

    @property
    def read_variance(self) -> float:
        """Variance at the offset (at the darkest level measured when the offset is unknown: an upper bound)."""
        at = self.dark if self.offset is None else self.offset
        return max(self.slope * at + self.intercept, 0.0)

    def variance(self, mean: np.ndarray) -> np.ndarray:
        """The variance of pixels of expected value ``mean`` (never below :attr:`floor`)."""
        return np.maximum(self.slope * np.asarray(mean, np.float64) + self.intercept, self.floor)

    def scaled(self, offset: float, scale: float) -> "NoiseModel":
        """The same noise seen through the map ``(x - offset) / scale`` (a model's intensity normalisation)."""
        return NoiseModel(self.slope / scale, (self.intercept + self.slope * offset) / scale**2, self.estimated,
                          None if self.offset is None else (self.offset - offset) / scale, (self.dark - offset) / scale)

    def describe(self) -> str:
        """One line for a report: the gain and read noise, and whether they were given or measured."""
        how = "measured from the images" if self.estimated else "gain and offset given, read noise measured"
        where = "at the darkest level" if self.offset is None else "at the offset"
        return (f"noise: variance = {self.slope:.4g} x mean {self.intercept:+.4g} (gain {self.slope:.4g} units per "
                f"electron, noise {np.sqrt(self.read_variance):.4g} units {where}; {how})")


def _bins(planes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(local mean, robust variance of the high-pass residual, pixel count) in bins of the local mean."""
    from scipy.ndimage import convolve, uniform_filter

    means, variances, counts = [], [], []
    for plane in planes:
        p = np.asarray(plane, np.float64)
        resid = convolve(p, _HIGHPASS, mode="reflect")[2:-2, 2:-2]
        local = uniform_filter(p, 5, mode="reflect")[2:-2, 2:-2]
        bins = int(np.clip(local.size // (2 * _MIN_BIN), 2, _BINS))
        edges = np.unique(np.quantile(local, np.linspace(0.0, 1.0, bins + 1)))
        which = np.clip(np.searchsorted(edges, local, side="right") - 1, 0, len(edges) - 2)
        for k in range(len(edges) - 1):
            r = resid[which == k]
            if r.size < _MIN_BIN:
                continue
            # median absolute deviation: a bin's edges (signal left in the residual) are a minority
            mad = 1.4826 * np.median(np.abs(r - np.median(r)))
            means.append(float(local[which == k].mean()))
            variances.append(float(mad) ** 2)
            counts.append(r.size)
    return np.array(means), np.array(variances), np.array(counts, np.float64)


def _robust_line(x: np.ndarray, y: np.ndarray, w: np.ndarray) -> tuple[float, float]:
    """Weighted straight-line fit, refitted twice without the bins farthest above it (signal left in the residual
    only ever adds variance)."""
    keep = np.ones(x.size, bool)
    slope, intercept = 0.0, float(np.median(y))
    for _ in range(3):
        if keep.sum() < 2 or np.ptp(x[keep]) == 0:
            break
        A = np.stack([x[keep], np.ones(keep.sum())], 1) * np.sqrt(w[keep])[:, None]
        slope, intercept = np.linalg.lstsq(A, y[keep] * np.sqrt(w[keep]), rcond=None)[0]
        resid = y - (slope * x + intercept)
        scale = 1.4826 * np.median(np.abs(resid[keep])) + 1e-30
        keep = resid < 2.5 * scale
    return float(slope), float(intercept)


def estimate_noise(planes, gain: float | None = None, offset: float | None = None) -> NoiseModel:
    """The noise's mean-variance line of ``planes`` ((H, W) or (N, H, W), image units).

    Parameters
    ----------
    planes
        Images of one camera (blurred images: their smoothness keeps signal out of the high-pass residual).
    gain, offset
        The camera's gain (image units per electron) and offset, when known: then only the read noise is measured
        (the median of what the bins' variance leaves above the shot noise). Give both or neither.

    Returns
    -------
    NoiseModel
        A negative slope (no shot noise measurable) is taken as 0; the intercept is at least a small fraction of
        the images' variance, so the model never says "noise-free".
    """
    if (gain is None) != (offset is None):
        raise ValueError("give the camera's gain and offset together, or neither (both are then measured)")
    arr = np.asarray(planes, np.float64)
    arr = arr.reshape(-1, *arr.shape[-2:])
    if min(arr.shape[-2:]) < 8:
        raise ValueError(f"images of {arr.shape[-2]} x {arr.shape[-1]} are too small to measure their noise")
    means, variances, counts = _bins(arr)
    if means.size < 2:
        raise ValueError("too few distinct intensities to measure the noise (a constant image?)")
    tiny = 1e-6 * float(np.var(arr)) + 1e-30
    if gain is not None:
        if not gain > 0:
            raise ValueError(f"gain must be > 0 (image units per electron), got {gain}")
        read = float(np.median(variances - gain * np.maximum(means - offset, 0.0)))
        return NoiseModel.from_camera(gain, offset, max(read, tiny))
    slope, intercept = _robust_line(means, variances, counts)
    slope = max(slope, 0.0)
    if slope == 0.0:
        intercept = float(np.median(variances))
    lowest = float(means.min())
    intercept = max(intercept, tiny - slope * lowest)  # positive variance across the images' range
    return NoiseModel(slope, intercept, dark=lowest)
