"""A small matplotlib canvas styled like the napari theme, for the dock's training and radial plots."""

from __future__ import annotations

from typing import Sequence

import numpy as np
from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
from matplotlib.figure import Figure


def theme_colors(theme_name: str) -> dict[str, str]:
    """Background and text colours of a napari theme (dark fallbacks if it is unknown)."""
    try:
        from napari.utils.theme import get_theme

        t = get_theme(theme_name)
        return {"bg": t.background.as_hex(), "fg": t.text.as_hex(), "grid": t.primary.as_hex()}
    except Exception:  # a custom theme without these colours: keep the plot readable
        return {"bg": "#262930", "fg": "#f0f1f2", "grid": "#5a626c"}


class PlotCanvas(FigureCanvasQTAgg):
    """One axes, optionally with a twin right axis; redraws from whole series (cheap at these sizes)."""

    def __init__(self, theme: str = "dark", height: float = 2.4, twin: bool = False):
        self.colors = theme_colors(theme)
        fig = Figure(figsize=(4, height), facecolor=self.colors["bg"], layout="constrained")
        super().__init__(fig)
        self.ax = fig.add_subplot(111)
        self.ax2 = self.ax.twinx() if twin else None
        self.setMinimumHeight(int(height * 60))
        self._style()

    def _style(self) -> None:
        c = self.colors
        for ax in (self.ax, self.ax2):
            if ax is None:
                continue
            ax.set_facecolor(c["bg"])
            ax.tick_params(colors=c["fg"], labelsize=8)
            for spine in ax.spines.values():
                spine.set_color(c["fg"])
            ax.xaxis.label.set_color(c["fg"])
            ax.yaxis.label.set_color(c["fg"])
            ax.title.set_color(c["fg"])

    def clear(self) -> None:
        self.ax.cla()
        if self.ax2 is not None:
            self.ax2.cla()
            # cla() puts a twin's ticks and label back on the left
            self.ax2.yaxis.tick_right()
            self.ax2.yaxis.set_label_position("right")
        for ax in (self.ax, self.ax2):
            if ax is not None:
                ax.ticklabel_format(axis="y", useOffset=False)
        self._style()
        self.draw_idle()

    def plot_training(self, steps: Sequence[int], loss: Sequence[float],
                      val_steps: Sequence[int], val_psnr: Sequence[float], input_psnr: float | None = None, *,
                      loss_label: str = "training loss", val_label: str = "val PSNR (dB)",
                      input_label: str = "input") -> None:
        """Training loss (left axis) and validation PSNR (right axis) against optimiser steps.

        ``input_psnr``, the validation PSNR of the unrestored input, is drawn as a dashed line: the curve's
        distance above it is what the model has learnt. The labels name other series plotted the same way
        (adaptation: the consistency loss and the held-out criterion, the original model's as the line).
        """
        self.clear()
        self.ax.plot(steps, loss, color="#4fa3ff", lw=1.2, label="loss")
        self.ax.set_xlabel("step", fontsize=8)
        self.ax.set_ylabel(loss_label, fontsize=8, color="#4fa3ff")
        if self.ax2 is not None:
            self.ax2.plot(val_steps, val_psnr, "o-", color="#ffb347", ms=3, lw=1.2)
            if input_psnr is not None:
                self.ax2.axhline(input_psnr, color="#aaaaaa", ls="--", lw=1.0)
                self.ax2.annotate(input_label, (0.01, input_psnr), xycoords=("axes fraction", "data"),
                                  color="#aaaaaa", fontsize=7, va="bottom")
            self.ax2.set_ylabel(val_label, fontsize=8, color="#ffb347")
        self.draw_idle()

    def plot_radial(self, r: np.ndarray, series: dict[str, np.ndarray]) -> None:
        """PSNR against field radius, one line per series."""
        self.clear()
        palette = {"restored": "#4fa3ff", "blurred": "#aaaaaa"}
        for name, values in series.items():
            self.ax.plot(r, values, "o-", ms=3, lw=1.2, color=palette.get(name), label=name)
        self.ax.set_xlabel("field radius r", fontsize=8)
        self.ax.set_ylabel("PSNR (dB)", fontsize=8)
        leg = self.ax.legend(fontsize=7, facecolor=self.colors["bg"], edgecolor=self.colors["fg"])
        for text in leg.get_texts():
            text.set_color(self.colors["fg"])
        self.ax.grid(color=self.colors["grid"], lw=0.5, alpha=0.6)
        self.draw_idle()
