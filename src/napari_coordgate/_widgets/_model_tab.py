"""Model tab: load a model file (dialog or drag-and-drop), save the current one, and see what it knows."""

from __future__ import annotations

from pathlib import Path

from napari.utils.notifications import show_error, show_info
from qtpy.QtWidgets import QFileDialog, QHBoxLayout, QLabel, QPushButton, QVBoxLayout, QWidget

from napari_coordgate.app.jobs import export_job, save_job
from napari_coordgate.model_io import MODEL_SUFFIX

from ._settings import remember_folder

FILTER = f"CoordGate model (*{MODEL_SUFFIX});;bioimage.io package exported by napari-coordgate (*.zip)"


def model_summary(saved, origin: str) -> list[tuple[str, str]]:
    """(label, value) rows describing a model: network, training field, PSF or calibration, date, score."""
    cfg = saved.config
    prov = saved.provenance or {}
    training = prov.get("training", {})
    psnr = training.get("best_val_psnr")
    # a model trained on calibration pairs may still store the pairs' PSF model (its Wiener first stage's filters
    # come from it); only the training source says where the training data came from
    psf = saved.psf  # any PSF model, or None
    source = training.get("source", "psf" if psf is not None else "calibration")
    psf_name = None if psf is None else f"PSF model '{psf.name}'"
    if source == "calibration":
        trained_on = "calibration pairs"
        if psf_name is not None:
            use = "Wiener first stage from" if cfg.prefilter == "wiener" else "optics:"
            trained_on += f" ({use} {psf_name})"
    else:
        trained_on = psf_name or "?"
    return [
        ("source", origin),
        ("network", f"U-Net depth {cfg.depth}, {cfg.channels} channels, gate {cfg.gate}"),
        ("field shape", f"{saved.field_shape[0]} x {saved.field_shape[1]} px"),
        ("intensity", saved.normalization.describe()),
        ("trained on", trained_on),
        ("PSF model", "none" if psf is None else psf.describe() + _psf_origin(prov.get("psf"))),
        ("date", str(prov.get("created", "not saved yet"))),
        ("validation PSNR", "-" if psnr is None else f"{psnr:.2f} dB"),
        ("training", f"{training.get('steps', '?')} steps, {training.get('seconds', '?')} s on "
                     f"{training.get('device', '?')}"),
    ]


def _psf_origin(provenance) -> str:
    """'; from beads.tif, 120 beads, fit residual 0.031': where a PSF model came from, when its provenance says."""
    if not isinstance(provenance, dict):
        return ""
    images = provenance.get("source") or provenance.get("source_images")
    if isinstance(images, (list, tuple)):
        images = ", ".join(Path(str(i)).name for i in images)
    beads = provenance.get("bead_count", provenance.get("beads"))
    residual = provenance.get("fit_residual")
    parts = [f"from {images}" if images else "", f"{beads} beads" if beads is not None else "",
             f"fit residual {residual:.3g}" if isinstance(residual, (int, float)) else ""]
    text = ", ".join(p for p in parts if p)
    return f"; {text}" if text else ""


class ModelTab(QWidget):
    def __init__(self, dock):
        super().__init__()
        self.dock = dock
        self.info = QLabel("No model yet: train one, load a .cgmodel file, or drop one on this dock.")
        self.info.setWordWrap(True)
        self.load_btn = QPushButton("Load model…")
        self.save_btn = QPushButton("Save model…")
        self.sample_btn = QPushButton("Sample model")
        self.sample_btn.setToolTip("A model shipped with the plugin for the sample data's synthetic optics (File > "
                                   "Open Sample > CoordGate deblur), trained on built-in specimens: Apply and "
                                   "Evaluate at once, no training")
        self.load_btn.clicked.connect(self._choose_and_load)
        self.save_btn.clicked.connect(self.choose_and_save)
        self.sample_btn.clicked.connect(self.load_sample_model)
        self.export_btn = QPushButton("Export bioimage.io…")
        self.export_btn.setToolTip("Write a BioImage Model Zoo package (.zip) of the current model, for other tools "
                                   "(needs pip install 'napari-coordgate[bioimageio]')")
        self.export_btn.clicked.connect(self._choose_and_export)
        row = QHBoxLayout()
        row.addWidget(self.load_btn)
        row.addWidget(self.save_btn)
        row.addWidget(self.sample_btn)
        row.addWidget(self.export_btn)
        layout = QVBoxLayout(self)
        layout.addLayout(row)
        layout.addWidget(self.info)
        layout.addStretch(1)
        self.actions = {"load": self.load_btn, "save": self.save_btn, "sample": self.sample_btn,
                        "export": self.export_btn}

    def show_model(self, saved, origin: str) -> None:
        rows = "".join(f"<tr><td><b>{k}</b></td><td>{v}</td></tr>" for k, v in model_summary(saved, origin))
        self.info.setText(f"<table>{rows}</table>")

    def _choose_and_export(self) -> None:
        path, _ = QFileDialog.getSaveFileName(self, "Export bioimage.io package", self.dock.settings["model_folder"],
                                              "bioimage.io package (*.zip)")
        if path:
            remember_folder(self.dock.settings, path)
            self.export_package(path)

    def export_package(self, path: str) -> None:
        """Write a bioimage.io package of the dock's model (in a worker: it runs the network for test tensors)."""
        self.dock.run_task("export package", export_job, str(path), self.dock.model,
                           on_returned=lambda written: show_info(f"CoordGate: exported {written}"))

    def load_sample_model(self) -> None:
        """Load the model shipped for the bundled sample optics (synthetic; not a real microscope's)."""
        from napari_coordgate.samples.sample_model import sample_model_path

        try:
            path = sample_model_path()
        except FileNotFoundError as exc:
            show_error(f"CoordGate: {exc}")
            return
        self.dock.load_model_file(str(path))

    def _choose_and_load(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Load CoordGate model", self.dock.settings["model_folder"],
                                              FILTER)
        if path:
            remember_folder(self.dock.settings, path)
            self.dock.load_model_file(path)

    def choose_and_save(self) -> None:
        """Ask for a file name, then :meth:`save_model` there."""
        path, _ = QFileDialog.getSaveFileName(self, "Save CoordGate model", self.dock.settings["model_folder"],
                                              FILTER)
        if path:
            remember_folder(self.dock.settings, path)
            self.save_model(path)

    def save_model(self, path: str) -> None:
        """Write the dock's current model (in a worker: serialising a big network takes a moment)."""
        def done(written: str) -> None:
            self.dock.model_origin = written
            self.show_model(self.dock.model, written)
            show_info(f"CoordGate: saved {written}")

        self.dock.run_task("save model", save_job, str(Path(path)), self.dock.model, on_returned=done)
