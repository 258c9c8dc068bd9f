"""What a calibration shows: the report figure (matplotlib's Agg canvas directly: no pyplot, no global backend
change), of a result or of a failure that still has its bead table, the map of bead FWHM across the field, and the
colour of each rejection reason (the same in the figure and the Calibrate tab's points layer)."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from napari_coordgate.coords import grid_positions

if TYPE_CHECKING:  # pragma: no cover
    from napari_coordgate.calibration import CalibrationError
    from napari_coordgate.calibration.detect import BeadTable
    from napari_coordgate.calibration.result import CalibrationResult

__all__ = ["write_report_png", "write_zstack_report_png", "write_failure_png",
           "montage", "bead_fwhm_map", "reason_colour", "REASON_COLOURS"]

#: a colour per spot class: ``"accepted"`` and each key of :data:`~napari_coordgate.calibration.detect.REASONS`
REASON_COLOURS = {
    "accepted": "#39d353", "hot pixel": "#ff40ff", "saturated": "#ff3030", "edge": "#a0a0a0",
    "too close": "#ff9900", "clump": "#00c8a0", "too faint": "#40c4ff", "fit failed": "#ffe135",
    "too large": "#a0522d", "outlier": "#9966ff",
}
_OTHER = "#ffffff"  # a reason without a colour of its own


def reason_colour(reason: str) -> str:
    """The hex colour of a spot class (``"accepted"`` or a rejection reason; ``""`` counts as accepted)."""
    return REASON_COLOURS.get(reason or "accepted", _OTHER)


def bead_fwhm_map(table: "BeadTable", field_shape, block: int = 32) -> np.ndarray:
    """Median FWHM (px, geometric mean of x and y) of the accepted beads in each ``block`` x ``block`` block of the
    field, expanded to an (H, W) float32 map that overlays the bead image; NaN where a block has no bead."""
    h, w = (int(n) for n in field_shape)
    ny, nx = -(-h // block), -(-w // block)
    out = np.full((ny, nx), np.nan, np.float32)
    ok = table.accepted
    fwhm = np.sqrt(table.fwhm_x[ok] * table.fwhm_y[ok])
    iy = np.clip((table.y[ok] // block).astype(int), 0, ny - 1)
    ix = np.clip((table.x[ok] // block).astype(int), 0, nx - 1)
    for by, bx in set(zip(iy.tolist(), ix.tolist())):
        out[by, bx] = np.median(fwhm[(iy == by) & (ix == bx)])
    return np.kron(out, np.ones((block, block), np.float32))[:h, :w]


def montage(psfs: np.ndarray, gap: int = 2, gamma: float = 0.5) -> np.ndarray:
    """(K, K, s, s) PSFs tiled as in the field, each scaled to peak 1 and shown with ``gamma`` (tails visible)."""
    k, _, s, _ = psfs.shape
    side = k * s + (k + 1) * gap
    out = np.full((side, side), np.nan)
    for i in range(k):
        for j in range(k):
            p = psfs[i, j]
            if not np.all(np.isfinite(p)):
                continue
            p = np.clip(p / max(float(np.max(p)), 1e-30), 0.0, 1.0) ** gamma
            r, c = gap + i * (s + gap), gap + j * (s + gap)
            out[r : r + s, c : c + s] = p
    return out


def _scatter_map(ax, fig, x, y, values, title, cmap="viridis", vmin=None, vmax=None, label=""):
    sc = ax.scatter(x, y, c=values, s=14, cmap=cmap, vmin=vmin, vmax=vmax, edgecolors="none")
    ax.set_title(title, fontsize=10)
    cb = fig.colorbar(sc, ax=ax, fraction=0.046, pad=0.02)
    cb.set_label(label, fontsize=8)


def write_report_png(result: "CalibrationResult", path: "str | Path") -> Path:
    """Draw the calibration report and write it as a PNG (parent folders must exist)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    fig = Figure(figsize=(17, 13), dpi=90)
    FigureCanvasAgg(fig)
    gs = fig.add_gridspec(3, 4, height_ratios=[1, 1, 0.55], hspace=0.35, wspace=0.3)
    _shape_maps(fig, gs, result)
    _psf_montages(fig, gs, result)
    _residual_and_regions(fig, gs, result)
    _text(fig, gs, result)
    fig.suptitle("Bead calibration report", fontsize=13)
    fig.savefig(path, format="png")
    return path


def write_zstack_report_png(result, path: "str | Path") -> Path:
    """The report of a bead z-stack calibration (:class:`~napari_coordgate.calibration.zstack.ZStackCalibration`):
    the best-focus map with each used bead's own focus, the xz and yz sections of the model's 3-D PSFs at 3 x 3 field
    positions (focus shift visible as the peak moving up and down), the summary and warnings."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    fig = Figure(figsize=(17, 11), dpi=90)
    FigureCanvasAgg(fig)
    gs = fig.add_gridspec(2, 3, height_ratios=[1, 0.4], hspace=0.3, wspace=0.25)
    t, (h, w) = result.beads, result.field_shape
    ax = fig.add_subplot(gs[0, 0])
    fm = result.focus_map_um(64)
    im = ax.imshow(fm, extent=(0, w - 1, h - 1, 0), cmap="coolwarm", vmin=-np.abs(fm).max(), vmax=np.abs(fm).max())
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02).set_label("µm", fontsize=8)
    ok = t.accepted & np.isfinite(result.focus_z)
    ax.scatter(t.x[ok], t.y[ok], c=(result.focus_z[ok] - result.slide_plane) * result.z_step_um, cmap="coolwarm",
               vmin=-np.abs(fm).max(), vmax=np.abs(fm).max(), s=16, edgecolors="k", linewidths=0.4)
    ax.set_title("best focus relative to the field centre (surface; dots: each bead)", fontsize=10)
    _field_axes(ax, result.field_shape)
    for col, (name, axis) in enumerate((("xz", 1), ("yz", 2)), start=1):
        ax = fig.add_subplot(gs[0, col])
        ax.imshow(_sections(result.model, axis), cmap="inferno", vmin=0, vmax=1, aspect=result.z_step_um
                  / max(float(result.model.pixel_size_um or result.z_step_um), 1e-9))
        ax.set_title(f"model PSFs: {name} sections at 3 x 3 field positions\n(through the centre; z down; "
                     "each peak 1, gamma 0.5)", fontsize=10)
        ax.axis("off")
    ax = fig.add_subplot(gs[1, :])
    ax.axis("off")
    counts_line = ", ".join(f"{v} {key}" for key, v in t.counts().items())
    lines = [result.summary(), f"spots: {counts_line}", result.model.describe()]
    lines += [f"warning: {wline}" for wline in result.warnings] or ["no warnings"]
    ax.text(0.0, 1.0, "\n".join(textwrap.fill(line, 180) for line in lines), va="top", ha="left", fontsize=9,
            family="monospace", transform=ax.transAxes)
    fig.suptitle("Bead z-stack calibration report", fontsize=13)
    fig.savefig(path, format="png")
    return path


def _sections(model, axis: int, n: int = 3, gap: int = 2) -> np.ndarray:
    """(rows, cols) montage of the model's central sections (axis 1: xz, the row through the centre; axis 2: yz)
    at n x n field positions, each scaled to peak 1 with gamma 0.5."""
    t = np.linspace(-1.0, 1.0, n)
    yy, xx = np.meshgrid(t, t, indexing="ij")
    vols = model.psfs_at(yy.ravel(), xx.ravel())
    d, s = vols.shape[1], vols.shape[-1]
    cut = vols[:, :, s // 2, :] if axis == 1 else vols[:, :, :, s // 2]
    out = np.full((n * d + (n + 1) * gap, n * s + (n + 1) * gap), np.nan)
    for k, sec in enumerate(cut):
        i, j = divmod(k, n)
        r, c = gap + i * (d + gap), gap + j * (s + gap)
        out[r : r + d, c : c + s] = np.clip(sec / max(float(sec.max()), 1e-30), 0.0, 1.0) ** 0.5
    return out


def _field_axes(ax, shape):
    h, w = shape
    ax.set_xlim(0, w - 1)
    ax.set_ylim(h - 1, 0)
    ax.set_aspect("equal")
    ax.tick_params(labelsize=7)


def _shape_maps(fig, gs, result) -> None:
    """FWHM x, FWHM y, ellipticity and orientation of every used bead, where it sits in the field."""
    t = result.beads
    ok = t.accepted
    x, y = t.x[ok], t.y[ok]
    fwhm = np.concatenate([t.fwhm_x[ok], t.fwhm_y[ok]])
    lo, hi = (np.nanpercentile(fwhm, [2, 98]) if fwhm.size else (0, 1))
    unit, scale = ("µm", float(result.model.pixel_size_um)) if result.model.pixel_size_um else ("px", 1.0)
    for col, (name, vals) in enumerate((("FWHM x", t.fwhm_x[ok]), ("FWHM y", t.fwhm_y[ok]))):
        ax = fig.add_subplot(gs[0, col])
        _scatter_map(ax, fig, x, y, vals * scale, f"{name} ({unit}) per bead", vmin=lo * scale, vmax=hi * scale,
                     label=unit)
        _field_axes(ax, result.field_shape)
    ax = fig.add_subplot(gs[0, 2])
    _scatter_map(ax, fig, x, y, t.ellipticity[ok], "ellipticity 1 - minor/major", cmap="magma", vmin=0,
                 vmax=max(0.05, float(np.nanpercentile(t.ellipticity[ok], 98)) if ok.any() else 1), label="")
    _field_axes(ax, result.field_shape)
    ax = fig.add_subplot(gs[0, 3])
    theta = np.radians(t.orientation_deg[ok])
    length = 0.03 * max(result.field_shape) * (0.3 + 3 * np.nan_to_num(t.ellipticity[ok]))
    ax.quiver(x, y, np.cos(theta) * length, np.sin(theta) * length, t.orientation_deg[ok], angles="xy",
              scale_units="xy", scale=1, headwidth=0, headlength=0, headaxislength=0, pivot="middle", cmap="twilight",
              clim=(-90, 90), width=0.004)
    ax.set_title("orientation of the major axis (length ~ ellipticity)", fontsize=10)
    _field_axes(ax, result.field_shape)


def _psf_montages(fig, gs, result) -> None:
    """What the beads show at the grid nodes next to what the model says there."""
    fit = result.grid_fit
    k = fit.k if fit is not None else result.model.grid
    nodes = grid_positions(k)
    yy, xx = np.meshgrid(nodes, nodes, indexing="ij")
    ax = fig.add_subplot(gs[1, 0])
    if fit is not None:
        ax.imshow(montage(fit.measured), cmap="inferno", vmin=0, vmax=1)
        s = fit.psfs.shape[-1]
        for i, j in zip(*np.nonzero(fit.filled)):
            ax.add_patch(_rect(fig, 2 + j * (s + 2) - 1, 2 + i * (s + 2) - 1, s + 1))
    ax.set_title(f"measured: beads averaged at the {k} x {k} nodes\n(peak 1, gamma 0.5; cyan: node filled)",
                 fontsize=10)
    ax.axis("off")
    ax = fig.add_subplot(gs[1, 1])
    ax.imshow(montage(result.model.psfs_at(yy, xx, result.field_shape)), cmap="inferno", vmin=0, vmax=1)
    ax.set_title(f"model ({result.chosen}) at the same nodes", fontsize=10)
    ax.axis("off")


def _residual_and_regions(fig, gs, result) -> None:
    """Residual of each bead (held-out ones circled), and the beads per ninth of the field."""
    t = result.beads
    ok = t.accepted
    x, y = t.x[ok], t.y[ok]
    h, w = result.field_shape
    ax = fig.add_subplot(gs[1, 2])
    res = t.residual[ok]
    _scatter_map(ax, fig, x, y, res, "residual per bead (relative L2, noise included)", cmap="plasma",
                 vmin=0, vmax=float(np.nanpercentile(res, 98)) if np.isfinite(res).any() else 1, label="")
    held = t.held_out[ok]
    ax.scatter(x[held], y[held], s=40, facecolors="none", edgecolors="k", linewidths=0.6)
    _field_axes(ax, result.field_shape)
    ax = fig.add_subplot(gs[1, 3])
    counts = np.zeros((3, 3), int)
    if ok.any():
        ry = np.clip(((t.y_norm[ok] + 1) / 2 * 3).astype(int), 0, 2)
        rx = np.clip(((t.x_norm[ok] + 1) / 2 * 3).astype(int), 0, 2)
        np.add.at(counts, (ry, rx), 1)
    ax.imshow(counts, cmap="Greens", extent=(0, w - 1, h - 1, 0), vmin=0, alpha=0.7)
    for i in range(3):
        for j in range(3):
            ax.text((j + 0.5) * (w - 1) / 3, (i + 0.5) * (h - 1) / 3, str(counts[i, j]), ha="center", va="center",
                    fontsize=14, color="k" if counts[i, j] else "red")
    rej = ~ok & (t.reason != "hot pixel")
    ax.scatter(t.x[rej], t.y[rej], s=10, marker="x", c="tab:red", linewidths=0.7, label="rejected")
    ax.scatter(x, y, s=5, c="k", label="used")
    ax.legend(fontsize=7, loc="upper right")
    ax.set_title("beads per region (used), rejected spots", fontsize=10)
    _field_axes(ax, result.field_shape)


def _text(fig, gs, result) -> None:
    ax = fig.add_subplot(gs[2, :])
    ax.axis("off")
    counts_line = ", ".join(f"{v} {key}" for key, v in result.beads.counts().items())
    res_line = ", ".join(f"{key} {v:.3g}" for key, v in result.residuals.items() if v is not None)
    lines = [result.summary(), f"spots: {counts_line}", f"held-out residual (lower is better): {res_line}",
             result.model.describe()]
    lines += [f"warning: {wline}" for wline in result.warnings] or ["no warnings"]
    text = "\n".join(textwrap.fill(line, 180) for line in lines)
    ax.text(0.0, 1.0, text, va="top", ha="left", fontsize=9, family="monospace", transform=ax.transAxes)


def _rect(fig, x, y, size):
    from matplotlib.patches import Rectangle

    return Rectangle((x, y), size, size, fill=False, edgecolor="cyan", linewidth=1.2)


def write_failure_png(error: "CalibrationError", images, path: "str | Path") -> Path:
    """The report of a calibration that failed but saw its beads (``error.beads`` is a table): the bead image with
    every candidate circled in its reason's colour (:data:`REASON_COLOURS`), and below it the error, the counts and
    what to change (:mod:`~napari_coordgate.calibration.advice`). ``images``: the bead image (H, W) or the series
    (N, H, W) calibrated; the first image is drawn with its candidates. Writes a PNG; returns the path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from napari_coordgate.calibration.advice import advice_lines

    table = error.beads
    if table is None:
        raise ValueError("this calibration failed before it found any spots: there is nothing to draw")
    planes = np.asarray(images)
    plane = np.asarray(planes if planes.ndim == 2 else planes[0], dtype=np.float64)
    path = Path(path)
    fig = Figure(figsize=(12, 13.5), dpi=90)
    FigureCanvasAgg(fig)
    gs = fig.add_gridspec(2, 1, height_ratios=[1, 0.32], hspace=0.12)
    ax = fig.add_subplot(gs[0])
    lo, hi = np.percentile(plane, [1.0, 99.9])
    ax.imshow(plane, cmap="gray", vmin=lo, vmax=max(hi, lo + 1e-12), interpolation="nearest")
    classes = np.where(table.accepted, "accepted", table.reason.astype(str))
    mine = table.image == 0
    for key, n in table.counts().items():
        sel = mine & (classes == key)
        ax.scatter(table.x[sel], table.y[sel], s=70, facecolors="none", edgecolors=reason_colour(key),
                   linewidths=1.3, label=f"{key} ({n})")
    ax.legend(fontsize=8, loc="upper right", framealpha=0.8)
    series = "" if planes.ndim == 2 or len(planes) == 1 else f" (image 1 of {len(planes)}; counts of all)"
    ax.set_title(f"every candidate spot, by why it was rejected{series}", fontsize=11)
    _field_axes(ax, plane.shape)
    ax = fig.add_subplot(gs[1])
    ax.axis("off")
    counts = ", ".join(f"{v} {k}" for k, v in table.counts().items())
    lines = [f"calibration failed: {error}", f"spots: {counts}", "what to change:"]
    lines += [f"- {line}" for line in advice_lines(table.counts())] or ["- nothing was rejected"]
    text = "\n".join(textwrap.fill(line, 130, subsequent_indent="  ") for line in lines)
    ax.text(0.0, 1.0, text, va="top", ha="left", fontsize=9, family="monospace", transform=ax.transAxes)
    fig.suptitle("Bead calibration report: failed", fontsize=13)
    fig.savefig(path, format="png")
    return path
