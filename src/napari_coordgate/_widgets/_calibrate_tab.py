"""Calibrate tab: a bead image layer -> a measured PSF model (beads as points, PSF grid and FWHM map as layers),
which *Use for training* makes the Train tab's PSF source. A bead z-stack (a (Z, Y, X) layer whose z-step is known:
its z scale in a length unit, or its file's metadata) gives a measured 3-D PSF grid instead, shown as the node PSFs
tiled plane by plane and the best-focus map. The calibration runs in a separate process, which also draws the PSF
grid and the FWHM map; the form is generated from :class:`~napari_coordgate.config.CalibrateConfig`.

When too few beads are usable the calibration is still an error, but every candidate is shown, coloured by why it
was rejected, with a count per reason and what to change."""

from __future__ import annotations

import html
from types import MappingProxyType

import numpy as np
from napari.utils.notifications import show_error, show_info, show_warning
from qtpy.QtCore import Qt
from qtpy.QtWidgets import QFileDialog, QFormLayout, QHBoxLayout, QLabel, QPushButton, QVBoxLayout, QWidget

from napari_coordgate.app.axes import layer_z_step_um, source_steps_um, zstack_settings
from napari_coordgate.app.jobs import calibrate_job
from napari_coordgate.app.state import State
from napari_coordgate.calibration.advice import advice_line
from napari_coordgate.calibration.report import reason_colour
from napari_coordgate.config import CalibrateConfig, ConfigError
from napari_coordgate.model_io import PSF_SUFFIX

from ._form import ConfigForm
from ._layers import LayerCombo, layer_array, layer_source, spatial_kwargs
from ._settings import remember_folder

FIELDS = ("target", "model", "grid", "psf_size", "na", "wavelength_nm", "immersion", "pixel_size_um",
          "bead_diameter_nm", "min_snr", "holdout")
LABELS = MappingProxyType({
    "target": "the image shows",
    "grid": "grid K", "psf_size": "PSF size (px)", "na": "NA", "wavelength_nm": "wavelength (nm)",
    "immersion": "immersion index", "pixel_size_um": "pixel size (µm)", "bead_diameter_nm": "bead diameter (nm)",
    "min_snr": "min SNR", "holdout": "holdout fraction"})
_MICRONS = ("micrometer", "micron", "µm", "um")


class CalibrateTab(QWidget):
    def __init__(self, dock):
        super().__init__()
        self.dock = dock
        self.result = None
        self.beads = LayerCombo(dock.viewer, prefer="bead")
        self.form = ConfigForm(CalibrateConfig, FIELDS, labels=LABELS)
        for name in FIELDS:
            setattr(self, name, getattr(self.form, name))
        self.run_btn = QPushButton("Calibrate")
        self.cancel_btn = QPushButton("Cancel")
        self.use_btn = QPushButton("Use for training")
        self.save_btn = QPushButton("Save PSF model…")
        self.summary = QLabel("Image a slide of sub-resolution beads in focus (or through focus: a z-stack gives "
                              "3-D PSFs), or a point array; open it as a layer, and calibrate.")
        self.summary.setWordWrap(True)
        self.summary.setTextFormat(Qt.RichText)
        source = QFormLayout()
        source.addRow("bead image", self.beads)
        row, row2 = QHBoxLayout(), QHBoxLayout()
        for b in (self.run_btn, self.cancel_btn):
            row.addWidget(b)
        for b in (self.use_btn, self.save_btn):
            row2.addWidget(b)
        layout = QVBoxLayout(self)
        layout.addLayout(source)
        layout.addWidget(self.form.native)
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

    def config(self, meta: dict | None = None) -> CalibrateConfig:
        """The calibration's settings from the form, on the Train tab's device; without a pixel size, the layer's
        (``meta``: its :func:`spatial_kwargs`) when its axes are in µm. ConfigError for a bad value."""
        cfg = self.form.config(device=self.dock.training_device())
        if cfg.pixel_size_um is None and meta is not None:
            cfg = cfg.replace(pixel_size_um=_layer_pixel_size(meta))
        return cfg

    def calibrate(self) -> None:
        """Calibrate the selected layer: a (Z, Y, X) layer whose z-step is known (its z axis's scale in a length unit,
        or the metadata of the file it was opened from) as a bead z-stack, anything else as 2-D bead image(s) of the
        focal plane."""
        layer = self.beads.layer()
        if layer is None:
            show_error("CoordGate: open a bead image as a layer first (a 2-D image of the focal plane, or a z-stack "
                       "with its z scale in µm)")
            return
        meta = spatial_kwargs(layer, ndim=2)
        try:
            cfg = self.config(meta)
            images = np.asarray(layer_array(layer))
        except (ConfigError, ValueError) as exc:
            show_error(f"CoordGate: {exc}")
            return
        source = layer_source(layer)
        z_step = layer_z_step_um(layer.scale, layer.units, images.shape, source) if images.ndim == 3 else None
        if z_step is not None:
            if cfg.pixel_size_um is None:  # nor in the form, nor the layer's scale: the layer's file may state it
                cfg = cfg.replace(pixel_size_um=source_steps_um(source, images.shape)[1])
            ignored = zstack_settings(cfg, z_step)[1]
            if ignored:
                show_warning("CoordGate: a bead z-stack is calibrated as a measured 3-D PSF grid; "
                             f"{', '.join(ignored)} not used in 3-D")
        elif images.ndim == 3:
            show_warning(f"CoordGate: '{layer.name}' has no z-step (its z scale has no length unit and its file states "
                         f"none): calibrating its {images.shape[0]} planes as separate images of the focal plane; for "
                         "a bead z-stack through focus give the layer's scale in µm (layer.units) or use "
                         "`napari-coordgate calibrate --z-step`")
        volume = spatial_kwargs(layer) if z_step is not None else None
        self.dock.run_task("calibrate", calibrate_job, images, cfg, [layer.name], z_step, state=State.APPLYING,
                           on_returned=lambda outcome: self.show_outcome(outcome, layer.name, meta, volume))

    def show_outcome(self, outcome, name: str, meta: dict, volume: dict | None = None) -> None:
        """A calibration's layers and summary (:meth:`show_result`), or those of one that failed with its beads
        (:meth:`show_failure`). ``meta``: the layer's :func:`spatial_kwargs` of Y, X; ``volume``: of Z, Y, X (a
        z-stack's)."""
        if outcome.error is not None:
            self.show_failure(outcome.error, name, meta)
        else:
            self.show_result(outcome, name, meta, volume)

    def show_result(self, outcome, name: str, meta: dict, volume: dict | None = None) -> None:
        """Beads (coloured by reason, reason on hover), the PSF grid and the FWHM map (drawn in the worker); of a
        z-stack, the 3-D PSF grid (in the stack's voxel size) and the best-focus map instead of the FWHM map."""
        result = self.result = outcome.result
        viewer = self.dock.viewer
        _remove(viewer, name)
        _add_beads(viewer, result.beads, name, meta)
        if outcome.focus_map is None:
            viewer.add_image(outcome.psf_grid, name=f"PSF grid ({name})", colormap="magma")
            viewer.add_image(outcome.fwhm_map, name=f"bead FWHM ({name})", colormap="viridis", opacity=0.6, **meta)
        else:  # a z-stack: the node PSFs tiled plane by plane, in the stack's voxel size; the focus over the field
            scale = volume["scale"] if volume else (1.0, 1.0, 1.0)
            units = volume["units"] if volume else ("pixel",) * 3
            viewer.add_image(outcome.psf_grid, name=_psf_grid_3d_name(name), colormap="magma", scale=scale,
                             units=units)
            viewer.add_image(outcome.focus_map, name=_focus_name(name), colormap="viridis", opacity=0.6, **meta)
        self.summary.setText(html.escape(result.summary()) + "".join(f"<br>⚠ {html.escape(w)}"
                                                                     for w in result.warnings)
                             + _legend(result.beads.counts()))
        (show_warning if result.warnings else show_info)(f"CoordGate: {result.summary()}")
        self.dock.refresh_actions()

    def show_failure(self, error, name: str, meta: dict) -> None:
        """Every candidate of a calibration that found too few usable beads, coloured by why it was rejected, the
        counts with what to change, and the error as a notification and on the status line."""
        self.result = None
        viewer = self.dock.viewer
        _remove(viewer, name)
        if len(error.beads):
            _add_beads(viewer, error.beads, name, meta)
        self.summary.setText(f"<b>Calibration failed</b>: {html.escape(str(error))}" + _legend(error.beads.counts()))
        show_error(f"CoordGate calibrate failed: {error} (the beads layer shows every candidate and why it was "
                   "rejected; the Calibrate tab says what to change)")
        self.dock.status.setText(f"failed: {error}")  # the dock keeps a 'failed' status after the task
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


def _layer_pixel_size(meta: dict) -> float | None:
    """The layer's pixel size in µm when both axes are in µm with (nearly) the same scale, else None."""
    units, scale = meta.get("units", ()), meta.get("scale", ())
    if len(units) != 2 or not all(str(u) in _MICRONS for u in units):
        return None
    sy, sx = (float(s) for s in scale)
    return sx if sx > 0 and abs(sy - sx) <= 0.02 * sx else None


def _psf_grid_3d_name(name: str) -> str:
    return f"3-D PSF grid, node PSFs over z ({name})"


def _focus_name(name: str) -> str:
    return f"best focus, µm from the centre's ({name})"


def _remove(viewer, name: str) -> None:
    for layer_name in (f"beads ({name})", f"PSF grid ({name})", f"bead FWHM ({name})", _psf_grid_3d_name(name),
                       _focus_name(name)):
        if layer_name in viewer.layers:
            viewer.layers.remove(layer_name)


def _add_beads(viewer, table, name: str, meta: dict) -> None:
    """Every detected spot as a ring in its class's colour (accepted or the rejection reason); reason, detail and
    FWHM on hover."""
    reasons = np.where(table.accepted, "accepted", table.reason.astype(str))
    props = {"reason": reasons, "detail": table.detail.astype(str), "fwhm_x": np.round(table.fwhm_x, 2),
             "fwhm_y": np.round(table.fwhm_y, 2)}
    colours = np.array([_rgba(reason_colour(r)) for r in reasons]).reshape(-1, 4)
    viewer.add_points(np.stack([table.y, table.x], axis=1), name=f"beads ({name})", properties=props, size=8,
                      symbol="ring", border_color=colours, face_color="transparent", **meta)


def _legend(counts: dict) -> str:
    """Rich text: a coloured dot, the count and what to change for each class of spot."""
    lines = []
    for key, n in counts.items():
        dot = f'<span style="color:{reason_colour(key)}">●</span>'
        text = f"{n} accepted" if key == "accepted" else advice_line(key, n)
        lines.append(f"{dot} {html.escape(text)}")
    return "<br><br>" + "<br>".join(lines) if lines else ""


def _rgba(hex_color: str) -> np.ndarray:
    return np.array([int(hex_color[i:i + 2], 16) / 255 for i in (1, 3, 5)] + [1.0])
