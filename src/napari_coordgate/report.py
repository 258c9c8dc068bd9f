"""PNG quality report: sharp / blurred / restored / error-by-position map / radial PSNR profile."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .metrics import error_map, radial_profile

__all__ = ["write_report_png"]


def write_report_png(path, sharp, blurred, restored, *, title: str = "", others: dict | None = None) -> Path:
    """Write a one-page PNG report for the first plane of (stacks of) images.

    ``others`` maps extra method names to restored images whose radial profiles are drawn alongside.
    Uses matplotlib's object API (no pyplot), so it runs in threads and without a display.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    first = lambda a: np.asarray(a).reshape(-1, *np.asarray(a).shape[-2:])[0]  # noqa: E731
    s, b, r = first(sharp), first(blurred), first(restored)
    lo, hi = np.percentile(s, [0.5, 99.5])
    fig = Figure(figsize=(16, 3.8), dpi=90)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 5)
    for ax, img, name in zip(axes[:3], (s, b, r), ("sharp (ground truth)", "blurred", "restored")):
        ax.imshow(img, cmap="gray", vmin=lo, vmax=hi)
        ax.set_title(name)
        ax.axis("off")
    em = error_map(sharp, restored, bin=max(4, min(s.shape) // 32))
    im = axes[3].imshow(em, cmap="magma")
    axes[3].set_title("squared error by position")
    axes[3].axis("off")
    fig.colorbar(im, ax=axes[3], fraction=0.046)
    curves = {"blurred": blurred, "restored": restored, **(others or {})}
    for name, img in curves.items():
        c, p = radial_profile(sharp, img)
        axes[4].plot(c, p, marker="o", ms=3, label=name)
    for edge in (0.5, 1.0):
        axes[4].axvline(edge, color="0.7", lw=0.8, ls="--")
    axes[4].set_xlabel("field radius r (centre < 0.5 < middle < 1 < edge)")
    axes[4].set_ylabel("PSNR (dB)")
    axes[4].legend(fontsize=7)
    axes[4].grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, format="png")  # the format is not taken from the name: a temporary file's may be .tmp
    return path
