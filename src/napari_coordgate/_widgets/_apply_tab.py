"""Apply tab: deblur the selected image layer (2-D, stack, multichannel, dask) and compare with RL/SV-RL.

A 2-D model restores every plane of a layer; a 3-D model restores a (..., Z, Y, X) layer volume by volume, its
z-step the layer's z scale when the z axis has a length unit, else what the layer's file states (one other than the
model's is refused, or resampled with *resample z*)."""

from __future__ import annotations

from napari.utils.notifications import show_error, show_info
from qtpy.QtWidgets import (
    QComboBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLineEdit,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from napari_coordgate.app.axes import check_model_fits, layer_z_step_um
from napari_coordgate.app.jobs import ApplyRequest, apply_job, compare_job
from napari_coordgate.app.state import State
from napari_coordgate.config import PredictConfig, parse_roi

from ._form import ConfigForm, known_device
from ._layers import LayerCombo, layer_array, layer_source, spatial_kwargs

NO_CHANNELS = "none"
PREDICT_FIELDS = ("tile", "device", "precision", "batch_tiles", "binning", "resample_z")


class ApplyTab(QWidget):
    def __init__(self, dock):
        super().__init__()
        self.dock = dock
        self.image = LayerCombo(dock.viewer)
        self.channel_axis = QComboBox()
        self.models = QLineEdit()
        self.models.setPlaceholderText("current model for every channel")
        self.models.setToolTip("One .cgmodel path per channel, separated by ';' (PSFs depend on wavelength)")
        self.models_btn = QPushButton("…")
        # tiling, device, precision, binning, z resampling: inputs generated from PredictConfig (the CLI's apply
        # flags too)
        self.predict_form = ConfigForm(PredictConfig, PREDICT_FIELDS,
                                       base=PredictConfig(tile=int(dock.settings["tile"]),
                                                          device=known_device(dock.settings["device"])))
        for name in PREDICT_FIELDS:
            setattr(self, name, getattr(self.predict_form, name))
        self.roi = QLineEdit()
        self.roi.setPlaceholderText("whole field")
        self.roi.setToolTip("Y,X of the image's top-left pixel in the training field (camera ROI), in unbinned pixels")
        self.out_path = QLineEdit()
        self.out_path.setPlaceholderText("in memory (or a .npy / .zarr path for big data)")
        self.apply_btn = QPushButton("Apply")
        self.cancel_btn = QPushButton("Cancel")
        self.iterations = QSpinBox()
        self.iterations.setRange(1, 1000)
        self.iterations.setValue(30)
        self.compare_btn = QPushButton("Restore with RL-central and SV-RL")

        models_row = QHBoxLayout()
        models_row.addWidget(self.models)
        models_row.addWidget(self.models_btn)
        form = QFormLayout()
        form.addRow("image", self.image)
        form.addRow("channel axis", self.channel_axis)
        form.addRow("models per channel", models_row)
        form.addRow(self.predict_form.native)
        form.addRow("ROI in field (Y,X)", self.roi)
        form.addRow("output", self.out_path)
        row = QHBoxLayout()
        row.addWidget(self.apply_btn)
        row.addWidget(self.cancel_btn)
        cmp_box = QGroupBox("Classical comparison (needs a PSF model)")
        cmp = QFormLayout(cmp_box)
        cmp.addRow("iterations", self.iterations)
        cmp.addRow(self.compare_btn)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addLayout(row)
        layout.addWidget(cmp_box)
        layout.addStretch(1)

        self.image.currentTextChanged.connect(self._image_changed)
        self.models_btn.clicked.connect(self._choose_models)
        self.apply_btn.clicked.connect(self.apply)
        self.cancel_btn.clicked.connect(dock.stop_task)
        self.compare_btn.clicked.connect(self.compare)
        self.actions = {"apply": self.apply_btn, "cancel": self.cancel_btn, "compare": self.compare_btn}
        self._image_changed()

    def _image_changed(self, *_) -> None:
        layer = self.image.layer()
        current = self.channel_axis.currentText()
        self.channel_axis.clear()
        self.channel_axis.addItem(NO_CHANNELS)
        if layer is not None:
            labels = layer.axis_labels
            for ax in range(layer.ndim - 2):
                self.channel_axis.addItem(f"{ax} ({labels[ax]}, {layer.data.shape[ax]})")
        self.channel_axis.setCurrentText(current if self.channel_axis.findText(current) >= 0 else NO_CHANNELS)

    def _choose_models(self) -> None:
        paths, _ = QFileDialog.getOpenFileNames(self, "Models, one per channel", self.dock.settings["model_folder"],
                                                "CoordGate model (*.cgmodel)")
        if paths:
            self.models.setText(";".join(paths))

    def request(self) -> tuple[ApplyRequest, object]:
        """The job for the selected layer (data copied here, or passed lazily) and the layer itself."""
        layer = self.image.layer()
        if layer is None:
            raise ValueError("pick an image layer to deblur")
        text = self.channel_axis.currentText()
        axis = None if text in ("", NO_CHANNELS) else int(text.split()[0])
        paths = [p.strip() for p in self.models.text().split(";") if p.strip()]
        if not paths and self.dock.model is None:
            raise ValueError("no model: train one, or load a .cgmodel file in the Model tab")
        out = self.out_path.text().strip() or None
        source = layer_source(layer)  # the file the layer was opened from
        predict = self.predict_form.config()
        image = layer_array(layer)
        # None: neither the z axis's unit nor the layer's file says
        z_step = layer_z_step_um(layer.scale, layer.units, image.shape, source)
        if not paths:  # a model file is checked where it is loaded, by the engine
            model = self.dock.model
            check_model_fits(model.config.ndim, model.z_step_um, image.shape, axis, z_step, predict.resample_z)
        req = ApplyRequest(image=image, models=paths or [self.dock.model], channel_axis=axis,
                           predict=predict, out_path=out, roi=self.roi_value(),
                           inputs=tuple(str(p) for p in (source, *paths) if p), z_step_um=z_step)
        return req, layer

    def roi_value(self) -> tuple[int, int] | None:
        return parse_roi(self.roi.text())

    def apply(self) -> None:
        try:
            req, layer = self.request()
        except ValueError as exc:
            show_error(f"CoordGate: {exc}")
            return
        model = None if isinstance(req.models[0], str) else req.models[0]  # a file: loaded in the worker
        if model is not None and model.config.ndim == 3 and req.z_step_um is None:
            show_info(f"CoordGate: the layer's z-step is not known (its z axis has no length unit): its planes are "
                      f"taken to be the model's {model.z_step_um:g} µm apart")
        meta = spatial_kwargs(layer)
        name = f"{layer.name} (CoordGate)"

        def done(result) -> None:
            if result.cancelled:
                show_info("CoordGate: prediction cancelled")
                return
            self.dock.viewer.add_image(result.data, name=name, colormap=layer.colormap.name, **meta)

        self.dock.run_task("apply", apply_job, req, state=State.APPLYING, on_returned=done)

    def compare(self) -> None:
        layer = self.image.layer()
        if layer is None:
            show_error("CoordGate: pick an image layer to restore")
            return
        model = self.dock.model
        if model is not None and model.psf is None:
            # the Train tab's PSF model may describe other optics than this model's: never guess
            show_error("CoordGate: no PSF model is known for this model (trained on calibration pairs alone); to "
                       "compare, train from a PSF model, or give the pairs' PSF model (Wiener first stage)")
            return
        try:
            if model is not None:
                psf = model.psf  # any PSF model: a preset's, a JSON config's, one measured from beads
                which = f"the model's PSF model '{psf.name}'"
            else:
                psf = self.dock.training_psf_model()
                which = f"the Train tab's PSF model '{psf.name}' (no model loaded)"
            roi = self.roi_value()
            image = layer_array(layer)
        except ValueError as exc:
            show_error(f"CoordGate: {exc}")
            return
        show_info(f"CoordGate: RL-central and SV-RL with {which}")
        meta = spatial_kwargs(layer)

        def done(result) -> None:
            if result.cancelled:
                show_info("CoordGate: comparison cancelled")
                return
            for method, data in result.data.items():
                self.dock.viewer.add_image(data, name=f"{layer.name} ({method})", colormap=layer.colormap.name,
                                           **meta)

        field_shape = None if model is None else model.field_shape
        self.dock.run_task("compare", compare_job, image, psf, self.iterations.value(), field_shape, roi,
                           self.binning.value, state=State.APPLYING, on_returned=done)
