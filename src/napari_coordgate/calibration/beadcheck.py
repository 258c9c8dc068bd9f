"""A check of a trained model that needs no ground truth: the beads of a bead image before and after deblurring.

A good model makes the bead images small and the same everywhere: their FWHM shrinks and stops growing toward
the edge of the field. :func:`bead_fwhm_report` detects the beads of the bead image with the calibration's
detector, measures each at the same place in the deblurred image (what a model made of noise or of a hot pixel is
not a bead) and summarises their FWHM by field ring (:data:`napari_coordgate.metrics.RINGS`: centre r < 0.5, middle
0.5-1, edge r >= 1, per-axis radius as everywhere in this package). :func:`holdout_report` scores only the beads
a calibration kept out of every fit (``calibrate --holdout F``, listed in its JSON report), so the model is judged
on beads it never saw: their FWHM and how much of each bead's light lies within one in-focus FWHM of its centre.
Below the engine: images in, numbers out.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ..coords import field_position
from ..metrics import RINGS, ring_masks

__all__ = ["bead_fwhm_report", "holdout_beads", "holdout_report", "RINGS", "MATCH_PX"]

#: how far (px) a bead of the report may lie from a spot of the image to be the same bead
MATCH_PX = 2.0
_MIN_WINDOW = 6  # the smallest radius (px) of a bead's window, whose light is its total
_RING_WIDTH = 3  # width (px) of the ring around the window where a bead's background is measured
_UPSAMPLE = 8  # sub-pixel factor of the half-maximum area


def bead_fwhm_report(before: np.ndarray, after: np.ndarray, field_shape: Sequence[int] | None = None,
                     offset: Sequence[int] = (0, 0)) -> dict:
    """Bead FWHM (pixels) and ellipticity by field ring, before and after, and how uniform FWHM is.

    The beads are those the calibration's detector accepts in ``before`` (hot pixels, saturated and failed spots
    left out); each is measured at the same place in both images, as :func:`holdout_report` measures (no
    detection in ``after``: a sharply restored bead is measured like any other, and a deblurred hot pixel or a spot
    the model made of noise is not a bead). ``field_shape``/``offset``: the image's place in the training field
    (default: it is the whole field). Returns a JSON-able dict with, per image, the bead count, median FWHM and
    ellipticity per ring and the field-wide spread of FWHM (interquartile range / median), plus the bead positions
    and FWHMs (beads whose window leaves the frame are not measured).
    """
    from ..checks import check_image
    from .detect import find_beads

    before, after = np.asarray(before), np.asarray(after)
    if before.shape != after.shape or before.ndim != 2:
        raise ValueError(f"expected two 2-D images of one shape, got {before.shape} and {after.shape}")
    check_image(before, "the bead image", max_ndim=2, allow_constant=False)  # NaN, Inf, a constant frame
    check_image(after, "the deblurred bead image", max_ndim=2)
    field_shape = tuple(before.shape) if field_shape is None else tuple(field_shape)
    table, _, _ = find_beads(before)
    ok = table.accepted
    if not ok.any():  # no statistics of nothing (a table of NaN)
        raise ValueError(table.nothing_found("the bead image") or f"no usable beads in the bead image "
                                                                   f"({table.counts()})")
    y, x = table.y[ok], table.x[ok]
    rings, _, _, fwhm, ellipticity = _measure(before, after, y, x, np.sqrt(table.fwhm_x[ok] * table.fwhm_y[ok]),
                                              field_shape, offset)
    out = {}
    for name in ("before", "after"):
        f, e = fwhm[name], ellipticity[name]
        measured = np.isfinite(f)
        if not measured.any():
            why = "their windows leave the frame" if name == "before" else "no light above the background there"
            raise ValueError(f"none of the {len(f)} beads of the bead image could be measured {name} ({why})")
        q1, med, q3 = np.percentile(f[measured], [25, 50, 75])
        out[name] = {"beads": int(measured.sum()), "fwhm_median": float(med), "fwhm_spread": float((q3 - q1) / med),
                     "rings": [{"name": ring, "beads": int((sel & measured).sum()), "fwhm": _median(f[sel]),
                                "ellipticity": _median(e[sel])} for ring, _, _, sel in rings],
                     "positions": np.stack([y[measured], x[measured]], 1).tolist(), "fwhm": f[measured].tolist()}
    return out


def _median(values: np.ndarray) -> float | None:
    values = values[np.isfinite(values)]
    return float(np.median(values)) if values.size else None


def _measure(before: np.ndarray, after: np.ndarray, y: np.ndarray, x: np.ndarray, det_fwhm: np.ndarray,
             field_shape, offset) -> tuple:
    """Each bead at (y, x) (px; ``det_fwhm``: its detected FWHM) measured at the same place in both images:
    ``(rings, windows, cuts, fwhm, ellipticity)``, the last three dicts by image name ("before", "after"), NaN
    for a bead whose window leaves the frame or that has no light above its background."""
    r = np.hypot(field_position(offset[0] + y, field_shape[0]), field_position(offset[1] + x, field_shape[1]))
    window = _windows(before.shape, y, x, det_fwhm)
    reach = np.maximum(1.5, det_fwhm)  # the centroid's and the peak's reach: the bead's detected FWHM
    cuts = {name: [_cut(img, a, b, win, rc) for a, b, win, rc in zip(y, x, window, reach)]
            for name, img in (("before", before), ("after", after))}
    shapes = {name: np.array([(np.nan, np.nan) if c is None else _half_max(*c, rc) for c, rc in zip(cut, reach)],
                             dtype=np.float64).reshape(-1, 2) for name, cut in cuts.items()}
    return (ring_masks(r), window, cuts, {k: v[:, 0] for k, v in shapes.items()},
            {k: v[:, 1] for k, v in shapes.items()})


# -- held-out beads ------------------------------------------------------------------------------------------------
def holdout_beads(report: dict, image_shape: Sequence[int], what: str = "the report") -> tuple[np.ndarray, np.ndarray]:
    """(y, x) in pixels of the beads a calibration's JSON report (:meth:`CalibrationResult.to_dict
    <napari_coordgate.calibration.result.CalibrationResult.to_dict>`) lists as held out of every fit: the rows of its
    bead table whose ``holdout`` is true, of its first bead image (``image`` 0). ValueError, saying what to do, for a
    report without a bead table or without holdout beads, or of a field of another shape than ``image_shape``."""
    beads = report.get("beads") if isinstance(report, dict) else None
    if not isinstance(beads, dict) or not {"y", "x"} <= set(beads):
        raise ValueError(f"{what} has no bead table: give the JSON report of a calibration (calibrate --json)")
    if "holdout" not in beads or not any(v is True for v in beads["holdout"]):
        raise ValueError(f"{what} lists no holdout beads: calibrate with --holdout F (e.g. 0.2) to keep a fraction "
                         "of the beads out of the fit, then check the model on them")
    shape = report.get("field_shape")
    if shape is not None and tuple(int(n) for n in shape) != tuple(int(n) for n in image_shape):
        raise ValueError(f"{what} is of a {shape[0]} x {shape[1]} bead image but the image given is "
                         f"{image_shape[0]} x {image_shape[1]}: give the bead image that was calibrated")
    image = beads.get("image", [0] * len(beads["y"]))
    rows = [i for i, (held, im) in enumerate(zip(beads["holdout"], image)) if held is True and im == 0]
    y = np.array([beads["y"][i] for i in rows], dtype=np.float64)
    x = np.array([beads["x"][i] for i in rows], dtype=np.float64)
    if not rows or not (np.isfinite(y).all() and np.isfinite(x).all()):
        raise ValueError(f"{what} lists no holdout beads with a position in its first bead image")
    return y, x


def _match(image: np.ndarray, y: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each listed bead's spot in ``image``: (y, x, FWHM) of the nearest detected spot with a measured width within
    :data:`MATCH_PX`, NaN where there is none."""
    from scipy.spatial import cKDTree

    from .detect import find_beads

    table, _, _ = find_beads(image)
    fwhm = np.sqrt(table.fwhm_x * table.fwhm_y)
    found = np.isfinite(fwhm) & np.isfinite(table.y) & np.isfinite(table.x)
    out = np.full((3, len(y)), np.nan)
    if found.any():
        d, i = cKDTree(np.stack([table.y[found], table.x[found]], 1)).query(np.stack([y, x], 1))
        near = d <= MATCH_PX
        out[:, near] = np.stack([table.y[found], table.x[found], fwhm[found]])[:, i[near]]
    return out[0], out[1], out[2]


def _disc_weights(dy: np.ndarray, dx: np.ndarray, radius: float, n: int = 4) -> np.ndarray:
    """The fraction of each pixel (centres at ``dy, dx`` from a point) inside a disc of ``radius`` around the
    point, from n x n samples per pixel."""
    s = (np.arange(n) + 0.5) / n - 0.5
    inside = np.hypot(dy[..., None, None] + s[:, None], dx[..., None, None] + s[None, :]) <= radius
    return inside.mean(axis=(-2, -1))


def _cut(image: np.ndarray, y: float, x: float, window: int, reach: float):
    """The bead near (y, x), background-subtracted, and its centre: ``(sig, gy, gx, cy, cx)`` (pixel offsets from
    the patch centre), or None when its window and background ring leave the image.

    The background is the median of the ring ``window < d <= window + 3`` px; the centre is the light's centroid
    within ``reach`` px, refined twice and kept within :data:`MATCH_PX` of (y, x).
    """
    h, w = image.shape
    half = window + _RING_WIDTH
    iy, ix = int(round(y)), int(round(x))
    if iy - half < 0 or ix - half < 0 or iy + half >= h or ix + half >= w:
        return None
    patch = np.asarray(image[iy - half : iy + half + 1, ix - half : ix + half + 1], dtype=np.float64)
    gy, gx = np.mgrid[-half : half + 1, -half : half + 1].astype(np.float64)
    y0, x0 = y - iy, x - ix
    d = np.hypot(gy - y0, gx - x0)
    sig = patch - np.median(patch[(d > window) & (d <= half)])
    cy, cx = y0, x0
    for _ in range(2):
        near = (np.hypot(gy - cy, gx - cx) <= reach) & (sig > 0)
        if not near.any():
            break
        wts = sig[near]
        ny, nx = float(np.sum(wts * gy[near]) / wts.sum()), float(np.sum(wts * gx[near]) / wts.sum())
        if np.hypot(ny - y0, nx - x0) > MATCH_PX:
            break
        cy, cx = ny, nx
    return sig, gy, gx, cy, cx


def _half_max(sig, gy, gx, cy, cx, reach: float) -> tuple[float, float]:
    """(FWHM, ellipticity) of the region above half the peak (``sig`` cubic-spline interpolated 8x; the region
    connected to the highest point within ``reach`` of the centre): the diameter of the disc of its area, and
    ``1 - minor / major`` of its second moments. NaN, NaN without light above the background."""
    from scipy import ndimage

    # grid_mode: fine pixel i sits at (i + 0.5) / 8 - 0.5 of the patch's pixels, each 1/64 of a pixel
    fine = ndimage.zoom(sig, _UPSAMPLE, order=3, grid_mode=True, mode="nearest")
    half = sig.shape[0] // 2
    f = (np.arange(fine.shape[0]) + 0.5) / _UPSAMPLE - 0.5 - half
    core = np.hypot(f[:, None] - cy, f[None, :] - cx) <= reach
    peak = float(fine[core].max())
    if not peak > 0:
        return np.nan, np.nan
    labels, _ = ndimage.label(fine >= peak / 2)
    region = labels == labels[core][np.argmax(fine[core])]
    iy, ix = np.nonzero(region)
    cov = np.cov(np.stack([f[iy], f[ix]])) if iy.size > 1 else np.zeros((2, 2))
    lo, hi = np.linalg.eigvalsh(cov)
    ellipticity = 1.0 - float(np.sqrt(max(lo, 0.0) / hi)) if hi > 0 else 0.0
    return 2.0 * float(np.sqrt(region.sum() / _UPSAMPLE**2 / np.pi)), ellipticity


def _energy(sig, gy, gx, cy, cx, window: int, radius: float) -> float:
    """The light within ``radius`` of the centre over the light within ``window`` (pixels counted by the fraction
    of their area inside each disc)."""
    total = float(np.sum(sig * _disc_weights(gy - cy, gx - cx, window)))
    return float(np.sum(sig * _disc_weights(gy - cy, gx - cx, radius))) / total if total > 0 else np.nan


def _summary(fwhm: np.ndarray, energy: np.ndarray, rings: list) -> dict:
    return {"beads": int(np.isfinite(fwhm).sum()), "fwhm_median": _median(fwhm), "energy_median": _median(energy),
            "rings": [{"name": name, "beads": int((sel & np.isfinite(fwhm)).sum()), "fwhm": _median(fwhm[sel]),
                       "energy": _median(energy[sel])} for name, _, _, sel in rings]}


def holdout_report(before: np.ndarray, after: np.ndarray, y, x, field_shape: Sequence[int] | None = None,
                   offset: Sequence[int] = (0, 0)) -> dict:
    """Held-out beads before and after deblurring: per field ring their FWHM and how concentrated their light is.

    Parameters
    ----------
    before, after
        The bead image (2-D) and the model's output for it.
    y, x
        Pixel positions of the held-out beads in ``before`` (:func:`holdout_beads`). Each is matched to the nearest
        spot the calibration's detector finds in ``before`` within :data:`MATCH_PX` px; unmatched beads are counted
        and left out. The same place is measured in ``after`` (no detection there: a sharp restored bead is measured
        like any other).
    field_shape, offset
        The image's place in the training field (default: it is the whole field), for the rings.

    Returns
    -------
    dict (JSON-able)
        ``radius_px``: the in-focus centre FWHM ``w0``, the median FWHM before deblurring of the matched held-out
        beads in the centre ring (r < 0.5; if it has none, of the ring nearest the centre that has some:
        ``radius_ring``). Each bead is measured in both images around the centroid of its light (within its
        detected FWHM of the matched spot, at most :data:`MATCH_PX` from it), in a window of radius
        ``max(6, 3 x its detected FWHM)`` px, the same before and after (near the frame's edge as large as fits,
        but at least 1.5 x that FWHM; beads with less room are not measured: ``outside``), less the median of the
        3 px ring around the window. ``fwhm``: the diameter (px) of the disc whose area equals that of the region
        above half the bead's peak (interpolated 8x; for an elliptical Gaussian the geometric mean of its two
        FWHMs). ``energy``: the fraction of the window's light within a disc of radius ``w0`` around the centre
        (0.94 for a Gaussian bead of FWHM ``w0``; closer to 1 as deblurring concentrates the light). ``before``
        and ``after``: the bead count, medians, and per ring (``rings``, :data:`RINGS`) the count and medians
        (None where a ring has no bead); ``beads``: each matched bead's numbers.
    """
    from ..checks import check_image

    before, after = np.asarray(before), np.asarray(after)
    if before.shape != after.shape or before.ndim != 2:
        raise ValueError(f"expected two 2-D images of one shape, got {before.shape} and {after.shape}")
    check_image(before, "the bead image", max_ndim=2, allow_constant=False)
    field_shape = tuple(before.shape) if field_shape is None else tuple(field_shape)
    y, x = np.asarray(y, np.float64), np.asarray(x, np.float64)
    my, mx, det_fwhm = _match(before, y, x)
    found = np.isfinite(my)
    if not found.any():
        raise ValueError(f"none of the {len(y)} holdout beads is within {MATCH_PX:g} px of a spot in the bead image: "
                         "give the bead image that was calibrated")
    my, mx, det_fwhm = my[found], mx[found], det_fwhm[found]
    rings, window, cuts, fwhm, _ = _measure(before, after, my, mx, det_fwhm, field_shape, offset)
    radius, ring_name = None, None
    for name, _, _, sel in rings:  # the centre ring, or the nearest one with a measured bead
        ok = sel & np.isfinite(fwhm["before"])
        if ok.any():
            radius, ring_name = float(np.median(fwhm["before"][ok])), name
            break
    if radius is None:
        raise ValueError("the holdout beads' windows all leave the bead image: nothing to measure")
    energy = {name: np.array([np.nan if c is None else _energy(*c, win, radius) for c, win in zip(cut, window)])
              for name, cut in cuts.items()}
    ring_of = np.full(len(my), "", dtype=object)
    for name, _, _, sel in rings:
        ring_of[sel] = name
    return {
        "holdout_beads": int(len(y)), "matched": int(found.sum()), "match_px": MATCH_PX,
        "outside": int(sum(c is None for c in cuts["before"])), "radius_px": radius, "radius_ring": ring_name,
        "before": _summary(fwhm["before"], energy["before"], rings),
        "after": _summary(fwhm["after"], energy["after"], rings),
        "beads": [{"y": float(a), "x": float(b), "ring": str(rg), "fwhm_before": _num(fb), "fwhm_after": _num(fa),
                   "energy_before": _num(eb), "energy_after": _num(ea)}
                  for a, b, rg, fb, fa, eb, ea in zip(my, mx, ring_of, fwhm["before"], fwhm["after"],
                                                      energy["before"], energy["after"])],
    }


def _windows(shape, y: np.ndarray, x: np.ndarray, fwhm: np.ndarray) -> np.ndarray:
    """Each bead's window radius (px): 3 FWHM (at least 6 px) holds its light; near the frame's edge as much as fits
    with the background ring, down to 1.5 FWHM; with less room, one that cannot fit (the bead is not measured)."""
    h, w = shape
    room = np.minimum.reduce([np.round(y), np.round(x), h - 1 - np.round(y), w - 1 - np.round(x)]) - _RING_WIDTH
    window = np.minimum(np.maximum(_MIN_WINDOW, np.ceil(3.0 * fwhm)), room)
    return np.where(window >= np.ceil(1.5 * fwhm), window, 10**6).astype(int)


def _num(v: float) -> float | None:
    return float(v) if np.isfinite(v) else None
