"""Calibrate tab: a bead image layer -> a measured PSF model (beads as points, PSF grid and FWHM map as layers),
which *Use for training* makes the Train tab's PSF source. The calibration runs in a separate process."""

from __future__ import annotations

import numpy as np
from napari.utils.notifications import show_error, show_info, show_warning
from qtpy.QtWidgets import (
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from napari_coordgate.app.jobs import calibrate_job
from napari_coordgate.app.state import State
from napari_coordgate.model_io import PSF_SUFFIX

from ._layers import LayerCombo, layer_array, spatial_kwargs
from ._settings import remember_folder

ACCEPTED, REJECTED = "#39d353", "#ff5c5c"


def _optional(spin, lo, hi, decimals=None, step=None):
    """A spin box whose minimum means 'not given' (shown as '-')."""
    spin.setRange(lo, hi)
    if decimals is not None:
        spin.setDecimals(decimals)
    if step is not None:
        spin.setSingleStep(step)
    spin.setSpecialValueText("-")
    spin.setValue(lo)
    return spin


class CalibrateTab(QWidget):
    def __init__(self, dock):
        super().__init__()
        self.dock = dock
        self.result = None
        self.beads = LayerCombo(dock.viewer, prefer="bead")
        self.model = QComboBox()
        self.model.addItems(["auto", "grid", "pupil"])
        self.grid = _optional(QSpinBox(), 0, 15)
        self.na = _optional(QDoubleSpinBox(), 0.0, 1.7, 2, 0.05)
        self.wavelength = _optional(QSpinBox(), 0, 2000)
        self.immersion = _optional(QDoubleSpinBox(), 0.0, 3.0, 3, 0.01)
        self.pixel_size = _optional(QDoubleSpinBox(), 0.0, 100.0, 4, 0.01)
        self.run_btn = QPushButton("Calibrate")
        self.cancel_btn = QPushButton("Cancel")
        self.use_btn = QPushButton("Use for training")
        self.save_btn = QPushButton("Save PSF model…")
        self.summary = QLabel("Image a slide of sub-resolution beads in focus, open it as a layer, and calibrate.")
        self.summary.setWordWrap(True)
        form = QFormLayout()
        for label, w in (("bead image", self.beads), ("model", self.model), ("grid K (- = auto)", self.grid),
                         ("NA", self.na), ("wavelength (nm)", self.wavelength), ("immersion index", self.immersion),
                         ("pixel size (µm)", self.pixel_size)):
            form.addRow(label, w)
        row, row2 = QHBoxLayout(), QHBoxLayout()
        for b in (self.run_btn, self.cancel_btn):
            row.addWidget(b)
        for b in (self.use_btn, self.save_btn):
            row2.addWidget(b)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addLayout(row)
        layout.addLayout(row2)
        layout.addWidget(self.summary)
        layout.addStretch(1)
        self.run_btn.clicked.connect(self.calibrate)
        self.cancel_btn.clicked.connect(dock.stop_task)
        self.use_btn.clicked.connect(self.use_for_training)
        self.save_btn.clicked.connect(self._choose_and_save)
        self.actions = {"calibrate": self.run_btn, "cancel": self.cancel_btn, "use_psf": self.use_btn,
                        "save_psf": self.save_btn}

    def settings(self) -> dict:
        """calibrate()'s keyword arguments from the form ('-' = not given)."""
        def given(w, scale=1.0):
            return None if w.value() == w.minimum() else float(w.value()) * scale

        grid = self.grid.value() or None
        return {"model": self.model.currentText(), "grid": grid, "na": given(self.na),
                "wavelength_um": given(self.wavelength, 1e-3), "immersion": given(self.immersion),
                "pixel_size_um": given(self.pixel_size), "device": self.dock.training_device(),
                "source": [self.beads.currentText()]}

    def calibrate(self) -> None:
        layer = self.beads.layer()
        if layer is None:
            show_error("CoordGate: open a bead image as a layer first (a 2-D image of the focal plane)")
            return
        try:
            images = np.asarray(layer_array(layer))
        except ValueError as exc:
            show_error(f"CoordGate: {exc}")
            return
        meta = spatial_kwargs(layer, ndim=2)
        self.dock.run_task("calibrate", calibrate_job, images, self.settings(), state=State.APPLYING,
                           on_returned=lambda result: self.show_result(result, layer.name, meta))

    def show_result(self, result, name: str, meta: dict) -> None:
        """Beads (accepted and rejected, reason on hover), the PSF grid and the FWHM map as layers."""
        from napari_coordgate.optics.models import render_psf_grid

        self.result = result
        viewer, t = self.dock.viewer, result.beads
        ok = t.accepted
        reasons = np.where(ok, "accepted", t.reason.astype(str))
        props = {"reason": reasons, "fwhm_x": np.round(t.fwhm_x, 2), "fwhm_y": np.round(t.fwhm_y, 2)}
        points = np.stack([t.y, t.x], axis=1)
        for layer_name in (f"beads ({name})", f"PSF grid ({name})", f"bead FWHM ({name})"):
            if layer_name in viewer.layers:
                viewer.layers.remove(layer_name)
        viewer.add_points(points, name=f"beads ({name})", properties=props, size=8, symbol="ring",
                          border_color=np.where(ok[:, None], _rgba(ACCEPTED), _rgba(REJECTED)),
                          face_color="transparent", **meta)
        viewer.add_image(render_psf_grid(result.model, result.field_shape), name=f"PSF grid ({name})",
                         colormap="magma")
        viewer.add_image(_fwhm_map(t, result.field_shape), name=f"bead FWHM ({name})", colormap="viridis",
                         opacity=0.6, **meta)
        self.summary.setText(result.summary() + "".join(f"\n⚠ {w}" for w in result.warnings))
        (show_warning if result.warnings else show_info)(f"CoordGate: {result.summary()}")
        self.dock.refresh_actions()

    def use_for_training(self) -> None:
        if self.result is None:
            show_error("CoordGate: calibrate first")
            return
        self.dock.train_with_psf_model(self.result.model, f"measured: {self.result.model.name}")

    def _choose_and_save(self) -> None:
        if self.result is None:
            show_error("CoordGate: calibrate first")
            return
        path, _ = QFileDialog.getSaveFileName(self, "Save PSF model", self.dock.settings["model_folder"],
                                              f"PSF model (*{PSF_SUFFIX})")
        if path:
            remember_folder(self.dock.settings, path)
            self.save(path)

    def save(self, path: str) -> None:
        from napari_coordgate.model_io import save_psf_model

        try:
            written = save_psf_model(path, self.result.model)
        except (OSError, ValueError) as exc:
            show_error(f"CoordGate: {exc}")
            return
        show_info(f"CoordGate: saved {written}")


def _rgba(hex_color: str) -> np.ndarray:
    return np.array([int(hex_color[i:i + 2], 16) / 255 for i in (1, 3, 5)] + [1.0])


def _fwhm_map(table, field_shape, block: int = 32) -> np.ndarray:
    """Median bead FWHM (geometric mean of x and y, px) in blocks of the field, NaN where there is no bead."""
    h, w = field_shape
    ny, nx = -(-h // block), -(-w // block)
    out = np.full((ny, nx), np.nan, np.float32)
    ok = table.accepted
    fwhm = np.sqrt(table.fwhm_x[ok] * table.fwhm_y[ok])
    iy, ix = (table.y[ok] // block).astype(int), (table.x[ok] // block).astype(int)
    for by in range(ny):
        for bx in range(nx):
            sel = (iy == by) & (ix == bx)
            if sel.any():
                out[by, bx] = np.median(fwhm[sel])
    return np.kron(out, np.ones((block, block), np.float32))[:h, :w]
