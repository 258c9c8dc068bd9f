"""Field coordinates: the one home of the formula every part of the package shares.

A pixel's position in the full sensor frame, each axis normalised to [-1, 1] with pixel centres at
``x = (2 p - (N - 1)) / (N - 1)`` for pixel ``p`` of an axis of ``N`` pixels (non-square frames allowed; a
one-pixel axis sits at 0). A crop or tile passes its offset inside the field, so the same pixel always gets the
same coordinate. The network's gates (``nn/coordgate.py``), the PSF models and blur (``optics/``), the
calibration's bead positions and the error-by-position maps (``metrics.py``) all use it. The nodes of a K-node
grid (PSF grids, blur grids) and the tent weights that interpolate between them live here too. numpy only.
"""

from __future__ import annotations

import numpy as np

__all__ = ["field_position", "field_axis", "grid_positions", "tent_weights"]


def field_position(p, n_field: int) -> np.ndarray:
    """Normalised coordinate of position ``p`` (pixels, any shape, sub-pixel allowed) on a field axis of ``n_field``
    pixels: ``(2 p - (N - 1)) / (N - 1)``, -1 and 1 at the outer pixel centres, 0 on a one-pixel axis.

    Returns float64, the shape of ``p``.
    """
    return (2.0 * np.asarray(p, dtype=np.float64) - (n_field - 1)) / max(n_field - 1, 1)


def field_axis(n_field: int, offset: float = 0.0, length: int | None = None, step: int = 1) -> np.ndarray:
    """Normalised coordinates of ``length`` samples along one field axis of ``n_field`` pixels.

    Sample ``q`` covers the ``step`` pixels starting at ``offset + step * q`` and sits at their centre (a
    pixel of downsampling level ``l`` has ``step = 2**l``). Defaults: the whole axis, one pixel per sample.

    Returns float64, shape ``(length,)``.
    """
    if length is None:
        length = -(-(int(n_field) - int(offset)) // step)
    return field_position(float(offset) + step * np.arange(int(length), dtype=np.float64) + (step - 1) / 2.0, n_field)


def grid_positions(k: int) -> np.ndarray:
    """Normalised coordinates of the nodes of a K-node grid along one field axis (PSF grids, blur grids, the
    Wiener first stage's filters).

    Returns float64, shape (k,): ``linspace(-1, 1, k)``, the outer nodes on the outer pixel centres; ``[0]`` for
    ``k = 1``. ``ValueError`` for ``k < 1``.
    """
    if isinstance(k, bool) or int(k) != k or k < 1:
        raise ValueError(f"a grid needs at least 1 node, got {k!r}")
    return np.zeros(1) if k == 1 else np.linspace(-1.0, 1.0, int(k))


def tent_weights(t, k: int) -> np.ndarray:
    """Tent (linear-interpolation) weights of the ``k`` nodes of :func:`grid_positions` at normalised coordinates
    ``t``: ``max(0, 1 - |t - node| / spacing)``, ``t`` clamped to [-1, 1] (outside the field, the edge's weights).

    The PSF grid models interpolate their node PSFs with these weights and the fast blur weights the image with
    them, so a grid model blurs each point exactly as it says the point is blurred.

    Returns float64, shape ``t.shape + (k,)``: non-negative, at most two non-zero, summing to one over the last
    axis.
    """
    t = np.clip(np.asarray(t, dtype=np.float64), -1.0, 1.0)
    nodes = grid_positions(k)
    if k == 1:
        return np.ones(t.shape + (1,))
    w = np.maximum(0.0, 1.0 - np.abs(t[..., None] - nodes) / (2.0 / (k - 1)))
    return w / w.sum(axis=-1, keepdims=True)
