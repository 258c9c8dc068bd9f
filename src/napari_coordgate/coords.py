"""Field coordinates: the one home of the formula every part of the package shares.

A pixel's position in the full sensor frame, each axis normalised to [-1, 1] with pixel centres at
``x = (2 p - (N - 1)) / (N - 1)`` for pixel ``p`` of an axis of ``N`` pixels (non-square frames allowed; a
one-pixel axis sits at 0). A crop or tile passes its offset inside the field, so the same pixel always gets the
same coordinate. The network's gates (``nn/coordgate.py``), the PSF models and blur (``optics/``) and the
error-by-position maps (``metrics.py``) all use it. numpy only.
"""

from __future__ import annotations

import numpy as np

__all__ = ["field_axis", "grid_positions"]


def field_axis(n_field: int, offset: float = 0.0, length: int | None = None, step: int = 1) -> np.ndarray:
    """Normalised coordinates of ``length`` samples along one field axis of ``n_field`` pixels.

    Sample ``q`` covers the ``step`` pixels starting at ``offset + step * q`` and sits at their centre (a
    pixel of downsampling level ``l`` has ``step = 2**l``). Defaults: the whole axis, one pixel per sample.

    Returns float64, shape ``(length,)``.
    """
    if length is None:
        length = -(-(int(n_field) - int(offset)) // step)
    p = float(offset) + step * np.arange(int(length), dtype=np.float64) + (step - 1) / 2.0
    return (2.0 * p - (n_field - 1)) / max(n_field - 1, 1)


def grid_positions(k: int) -> np.ndarray:
    """Normalised coordinates of the nodes of a K-node grid along one field axis (PSF grids, blur grids, the
    Wiener first stage's filters).

    Returns float64, shape (k,): ``linspace(-1, 1, k)``, the outer nodes on the outer pixel centres; ``[0]`` for
    ``k = 1``. ``ValueError`` for ``k < 1``.
    """
    if isinstance(k, bool) or int(k) != k or k < 1:
        raise ValueError(f"a grid needs at least 1 node, got {k!r}")
    return np.zeros(1) if k == 1 else np.linspace(-1.0, 1.0, int(k))
