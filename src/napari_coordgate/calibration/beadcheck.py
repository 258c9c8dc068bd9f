"""A check of a trained model that needs no ground truth: the beads of a bead image before and after deblurring.

A good model makes the bead images small and the same everywhere: their FWHM shrinks and stops growing toward
the edge of the field. :func:`bead_fwhm_report` detects the beads of both images with the calibration's
detector and summarises their FWHM by field ring (:data:`napari_coordgate.metrics.RINGS`: centre r < 0.5, middle
0.5-1, edge r >= 1, per-axis radius as everywhere in this package). Below the engine: images in, numbers out.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ..coords import field_position
from ..metrics import RINGS, ring_masks

__all__ = ["bead_fwhm_report", "RINGS"]


def _beads(image: np.ndarray, field_shape, offset, what: str) -> dict:
    from .detect import find_beads

    table, _, _ = find_beads(np.asarray(image))
    ok = table.accepted
    if not ok.any():  # no statistics of nothing (a table of NaN), nor of what a model made of noise
        raise ValueError(table.nothing_found(what) or f"no usable beads in {what} ({table.counts()})")
    y = field_position(offset[0] + table.y[ok], field_shape[0])
    x = field_position(offset[1] + table.x[ok], field_shape[1])
    fwhm = np.sqrt(table.fwhm_x[ok] * table.fwhm_y[ok])  # geometric mean of the two axes
    return {"r": np.hypot(y, x), "fwhm": fwhm, "ellipticity": table.ellipticity[ok], "y": table.y[ok],
            "x": table.x[ok]}


def bead_fwhm_report(before: np.ndarray, after: np.ndarray, field_shape: Sequence[int] | None = None,
                     offset: Sequence[int] = (0, 0)) -> dict:
    """Bead FWHM (pixels) and ellipticity by field ring, before and after, and how uniform FWHM is.

    ``field_shape``/``offset``: the image's place in the training field (default: it is the whole field).
    Returns a JSON-able dict with, per image, the bead count, median FWHM and ellipticity per ring and the
    field-wide spread of FWHM (interquartile range / median), plus the bead positions and FWHMs.
    """
    from ..checks import check_image

    if np.shape(before) != np.shape(after) or np.ndim(before) != 2:
        raise ValueError(f"expected two 2-D images of one shape, got {np.shape(before)} and {np.shape(after)}")
    check_image(before, "the bead image", max_ndim=2, allow_constant=False)  # NaN, Inf, a constant frame
    field_shape = tuple(np.shape(before)) if field_shape is None else tuple(field_shape)
    out = {}
    for name, image in (("before", before), ("after", after)):
        b = _beads(image, field_shape, offset, "the bead image" if name == "before" else "the deblurred bead image")
        rings = []
        for ring, _, _, sel in ring_masks(b["r"]):
            rings.append({"name": ring, "beads": int(sel.sum()),
                          "fwhm": float(np.median(b["fwhm"][sel])) if sel.any() else None,
                          "ellipticity": float(np.median(b["ellipticity"][sel])) if sel.any() else None})
        q1, med, q3 = np.percentile(b["fwhm"], [25, 50, 75]) if len(b["fwhm"]) else (np.nan,) * 3
        out[name] = {"beads": int(len(b["fwhm"])), "fwhm_median": float(med), "fwhm_spread": float((q3 - q1) / med),
                     "rings": rings, "positions": np.stack([b["y"], b["x"]], 1).tolist(), "fwhm": b["fwhm"].tolist()}
    return out
