"""Evaluate tab: PSNR/SSIM against a ground truth, the error-by-position map, a radial PSNR plot, gate maps.

Z-stacks (layers of a known z-step, or any (..., Z, Y, X) layers with a 3-D model;
:func:`~napari_coordgate.app.axes.scored_as_volumes`) are scored as volumes: PSNR by depth besides the rings, and
the error map a (Z, Y, X) volume."""

from __future__ import annotations

import math

from napari.utils.notifications import show_error
from qtpy.QtWidgets import (
    QFormLayout,
    QHBoxLayout,
    QPushButton,
    QSpinBox,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from napari_coordgate.app.axes import layer_axes, scored_as_volumes
from napari_coordgate.app.jobs import evaluate_job, gates_job

from ._layers import LayerCombo, layer_array, layer_source, spatial_kwargs
from ._plot import PlotCanvas

COLUMNS = ("blurred", "restored")


def report_rows(rep: dict) -> list[tuple[str, float | None, float]]:
    """(metric, blurred value or None, restored value) rows of a ``metrics.quality_report``: overall, by ring and,
    for volumes, by depth (planes z0 to z1 - 1)."""
    rows = [("PSNR (dB)", rep.get("psnr_blurred"), rep["psnr"]), ("SSIM", rep.get("ssim_blurred"), rep["ssim"])]
    blurred_rings = {r["name"]: r["psnr"] for r in rep.get("psnr_by_ring_blurred", [])}
    for ring in rep["psnr_by_ring"]:
        rows.append((f"PSNR {ring['name']} (dB)", blurred_rings.get(ring["name"]), ring["psnr"]))
    blurred_depth = {tuple(d["planes"]): d["psnr"] for d in rep.get("psnr_by_depth_blurred", [])}
    for slab in rep.get("psnr_by_depth", []):
        z0, z1 = slab["planes"]
        planes = f"plane {z0}" if z1 == z0 + 1 else f"planes {z0}-{z1 - 1}"
        rows.append((f"PSNR {planes} (dB)", blurred_depth.get((z0, z1)), slab["psnr"]))
    return rows


def _fmt(v: float | None) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"


class EvaluateTab(QWidget):
    def __init__(self, dock):
        super().__init__()
        self.dock = dock
        self.gt = LayerCombo(dock.viewer)
        self.restored = LayerCombo(dock.viewer)
        self.blurred = LayerCombo(dock.viewer, optional=True)
        self.bin = QSpinBox()
        self.bin.setRange(1, 256)
        self.bin.setValue(8)
        self.eval_btn = QPushButton("Evaluate")
        self.gates_btn = QPushButton("Show gates")
        self.gates_btn.setToolTip("Gate maps of the model's first CoordGate, one plane per feature channel")
        self.table = QTableWidget(0, len(COLUMNS))
        self.table.setHorizontalHeaderLabels(list(COLUMNS))
        self.plot = PlotCanvas(dock.viewer.theme)
        form = QFormLayout()
        form.addRow("ground truth", self.gt)
        form.addRow("restored", self.restored)
        form.addRow("blurred", self.blurred)
        form.addRow("error map bin", self.bin)
        row = QHBoxLayout()
        row.addWidget(self.eval_btn)
        row.addWidget(self.gates_btn)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addLayout(row)
        layout.addWidget(self.table)
        layout.addWidget(self.plot)
        self.eval_btn.clicked.connect(self.evaluate)
        self.gates_btn.clicked.connect(self.show_gates)
        self.actions = {"evaluate": self.eval_btn, "gates": self.gates_btn}

    def evaluate(self) -> None:
        gt, restored, blurred = self.gt.layer(), self.restored.layer(), self.blurred.layer()
        if gt is None or restored is None:
            show_error("CoordGate: pick a ground-truth layer and a restored layer")
            return
        try:
            arrays = [layer_array(gt), layer_array(restored), None if blurred is None else layer_array(blurred)]
        except ValueError as exc:
            show_error(f"CoordGate: {exc}")
            return
        layers = [layer_axes(la.name, la.data.shape, la.scale, la.units, layer_source(la))
                  for la in (gt, restored, blurred) if la is not None]
        volumes = scored_as_volumes(layers, None if self.dock.model is None else self.dock.model.config.ndim)
        meta = spatial_kwargs(restored, ndim=3 if volumes else 2)
        name = f"error map ({restored.name})"

        def done(result) -> None:
            self.show_report(result.data)
            self.plot.plot_radial(result.extra["radius"], result.extra["radial"])
            viewer = self.dock.viewer
            if name in viewer.layers:
                viewer.layers.remove(name)
            viewer.add_image(result.extra["error_map"], name=name, colormap="inferno", blending="additive",
                             opacity=0.7, **meta)

        self.dock.run_task("evaluate", evaluate_job, *arrays, self.bin.value(), volumes, on_returned=done)

    def show_report(self, rep: dict) -> None:
        rows = report_rows(rep)
        self.table.setRowCount(len(rows))
        self.table.setVerticalHeaderLabels([r[0] for r in rows])
        for i, (_, b, r) in enumerate(rows):
            self.table.setItem(i, 0, QTableWidgetItem(_fmt(b)))
            self.table.setItem(i, 1, QTableWidgetItem(_fmt(r)))

    def show_gates(self) -> None:
        saved = self.dock.model
        if saved is None:
            show_error("CoordGate: no model to inspect")
            return

        def done(maps) -> None:
            viewer = self.dock.viewer
            name = "CoordGate gates (first gate)"
            if name in viewer.layers:
                viewer.layers.remove(name)
            viewer.add_image(maps, name=name, colormap="twilight_shifted", axis_labels=("channel", "y", "x"))

        self.dock.run_task("gates", gates_job, saved, on_returned=done)
