"""Train tab: pick the training source, model size, budget and device; start, stop, watch, save; adapt the current
model to the user's own blurred images.

The PSF model and the layers decide what is trained (:func:`~napari_coordgate.app.axes.train_plan`, shown in the
form): a 3-D PSF model (measured from a bead z-stack, or a 3-D preset) trains a 3-D model on sharp (Z, Y, X) layers
or the built-in 3-D specimens, z-stack calibration pairs a 3-D model too; anything else a 2-D model, on sharp layers,
pairs, or the built-in specimens at a measured PSF model's field (mixed, or fluorescence-like only)."""

from __future__ import annotations

import math
from pathlib import Path
from types import MappingProxyType

from magicgui.widgets import ComboBox, Container
from napari.utils.notifications import show_error, show_info, show_warning
from qtpy.QtCore import Qt
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFileDialog,
    QFormLayout,
    QFrame,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QScrollArea,
    QVBoxLayout,
    QWidget,
)

from napari_coordgate.app.axes import layer_axes, train_plan
from napari_coordgate.app.jobs import BuiltinSpecimens, adapt_job, psf_grid_job, train_job
from napari_coordgate.app.state import State
from napari_coordgate.config import AdaptConfig, ConfigError, ModelConfig, TrainConfig
from napari_coordgate.model_io import PSF_SUFFIX
from napari_coordgate.optics.psf import PSFConfig

from ._form import ConfigForm, known_device
from ._layers import LayerCombo, layer_array, layer_source
from ._plot import PlotCanvas
from ._settings import remember_folder

PAIRS, SIMULATED = "calibration pairs (sharp + blurred layers)", "sharp layers + PSF model"
BUILTIN = "built-in specimens + measured PSF model"
PLAN_SOURCES = MappingProxyType({PAIRS: "pairs", SIMULATED: "simulated", BUILTIN: "builtin"})
PSF_FIELDS = ("model", "na", "wavelength_um", "pixel_size_um", "psf_size", "grid", "defocus", "defocus_h2",
              "astig_h2", "coma_h", "spherical", "sigma_px", "sigma_radial_h2", "sigma_tangential_h2")
# while adapting, the plot's series are the consistency loss and the held-out criterion (-10 log10, in the PSNR
# slots of the Updates), the original model's value as the line to rise above: never call them PSNR
ADAPT_PLOT = MappingProxyType({"loss_label": "consistency loss", "val_label": "held-out (dB)",
                               "input_label": "original"})


class TrainTab(QWidget):
    def __init__(self, dock):
        super().__init__()
        from napari_coordgate.optics.psf import PRESETS
        from napari_coordgate.optics.psf3d import PRESETS_3D

        self.dock = dock
        # the PSF combo's entries: the presets (2-D, then 3-D), then PSF models from files (any kind, e.g. measured
        # from beads)
        self._psf_sources: dict = {**PRESETS, **PRESETS_3D}
        self.history: list = []
        self._adapt_layer_chosen = False  # the user picked the images to adapt to: keep their pick
        self.task = "train"  # what the Updates now arriving are from: "train" or "adapt"
        content = QWidget()
        layout = QVBoxLayout(content)
        layout.addWidget(self._source_box())
        layout.addWidget(self._config_box())
        layout.addWidget(self._run_box())
        layout.addWidget(self.plot, 1)  # shared by training and adaptation
        # last: on a short screen the training controls and the plot keep their place and this scrolls into view
        layout.addWidget(self._adapt_box())
        self._scroll(content)
        self._connect()
        self._preset_changed(self.preset.currentText())
        self._mode_changed(self.mode.currentText())
        self.keep_pair_distinct()
        self.show_plan()

    def _scroll(self, content: QWidget) -> None:
        """The tab scrolls vertically: its height must never force the viewer's window taller than a laptop's
        screen (as a plain layout's minimum height does)."""
        area = QScrollArea()
        area.setWidget(content)
        area.setWidgetResizable(True)
        area.setFrameShape(QFrame.Shape.NoFrame)
        area.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        area.setMinimumWidth(content.minimumSizeHint().width() + area.verticalScrollBar().sizeHint().width())
        outer = QVBoxLayout(self)
        outer.setContentsMargins(0, 0, 0, 0)
        outer.addWidget(area)

    def _source_box(self) -> QGroupBox:
        """Training data: calibration pairs, sharp layers and a PSF model (preset, editable, or a file), or the
        built-in specimens (2-D: of the chosen set) and a measured PSF model; below them what will be trained."""
        from napari_coordgate.samples.specimens import SPECIMEN_HELP, SPECIMEN_SETS

        viewer = self.dock.viewer
        self.mode = QComboBox()
        self.mode.addItems(list(PLAN_SOURCES))
        self.sharp = LayerCombo(viewer, prefer="sharp")
        self.blurred = LayerCombo(viewer, prefer="blurred")
        self.specimens = QComboBox()
        self.specimens.addItems(list(SPECIMEN_SETS))
        self.specimens.setToolTip(f"The {SPECIMEN_HELP}. A 3-D model trains on procedural volumes.")
        self.preset = QComboBox()
        self.preset.addItems(list(self._psf_sources))
        self.plan_label = QLabel("-")
        self.plan_label.setWordWrap(True)
        self.plan_label.setToolTip("What Start trains: a 3-D model when the PSF model is 3-D or the calibration pairs "
                                   "are z-stacks (layers with a z scale in µm, or files that state their z-step)")
        self.psf_file_btn = QPushButton("PSF model file…")
        self.psf_file_btn.setToolTip(f"Use a PSF model file ({PSF_SUFFIX}, e.g. measured from beads, or a .json PSF "
                                     "config) instead of a preset")
        self.psf_form = ConfigForm(PSFConfig, PSF_FIELDS)
        self.psf_box = QGroupBox("Edit PSF parameters")
        self.psf_box.setCheckable(True)
        self.psf_box.setChecked(False)
        QVBoxLayout(self.psf_box).addWidget(self.psf_form.native)
        self.psf_box.toggled.connect(self.psf_form.native.setVisible)
        self.psf_form.native.setVisible(False)
        self.grid_btn = QPushButton("Show PSF grid")
        src = QFormLayout()
        src.addRow("source", self.mode)
        src.addRow("sharp", self.sharp)
        src.addRow("blurred", self.blurred)
        src.addRow("specimens", self.specimens)
        psf_row = QHBoxLayout()
        psf_row.addWidget(self.preset, 1)
        psf_row.addWidget(self.psf_file_btn)
        src.addRow("PSF model", psf_row)
        src.addRow("trains", self.plan_label)
        box = QGroupBox("Training data")
        v = QVBoxLayout(box)
        v.addLayout(src)
        v.addWidget(self.psf_box)
        v.addWidget(self.grid_btn)
        return box

    def _config_box(self) -> QGroupBox:
        """Model and budget: inputs generated from the configs (bounds, choices, defaults and help in config.py)."""
        self.model_form = ConfigForm(ModelConfig, ("depth", "channels", "gate", "prefilter"),
                                     labels={"gate": "position gate", "prefilter": "first stage"})
        self.budget_kind = ComboBox(choices=["minutes", "epochs"], value="minutes", label="budget in")
        self.train_form = ConfigForm(TrainConfig, ("minutes", "epochs", "steps_per_epoch", "crop", "batch", "seed",
                                                   "device", "photons", "brightness"),
                                     labels={"minutes": "budget (minutes)", "epochs": "budget (epochs)",
                                             "photons": "photons (PSF model)", "brightness": "brighter objects, up to"},
                                     base=TrainConfig(device=known_device(self.dock.settings["device"])))
        for name in ("depth", "channels", "gate", "prefilter"):
            setattr(self, name, getattr(self.model_form, name))
        for name in ("steps_per_epoch", "crop", "batch", "seed", "device"):
            setattr(self, name, getattr(self.train_form, name))
        self.device_used = QLabel("-")
        form = QVBoxLayout()
        form.addWidget(self.model_form.native)
        form.addWidget(Container(widgets=[self.budget_kind], labels=True).native)
        form.addWidget(self.train_form.native)
        used = QFormLayout()
        used.addRow("device used", self.device_used)
        form.addLayout(used)
        box = QGroupBox("Model and budget")
        box.setLayout(form)
        return box

    def _run_box(self) -> QWidget:
        """Fine-tune switch and Start / Stop / Save (the live plot, shared with adaptation, goes below)."""
        self.finetune = QCheckBox("continue from the current model (fine-tune on this data)")
        self.finetune.setToolTip("Start from the dock's model (trained here or loaded) instead of fresh weights; the "
                                 "network settings are taken from it")
        self.start_btn = QPushButton("Start training")
        self.stop_btn = QPushButton("Stop")
        self.save_btn = QPushButton("Save model…")
        row = QHBoxLayout()
        for b in (self.start_btn, self.stop_btn, self.save_btn):
            row.addWidget(b)
        self.plot = PlotCanvas(self.dock.viewer.theme, twin=True)
        box = QWidget()
        v = QVBoxLayout(box)
        v.setContentsMargins(0, 0, 0, 0)
        v.addWidget(self.finetune)
        v.addLayout(row)
        return box

    def _adapt_box(self) -> QGroupBox:
        """Adapt the current model to a layer of the user's blurred images: the layer, the budget, the camera."""
        self.adapt_layer = LayerCombo(self.dock.viewer, prefer="blurred")
        self.adapt_layer.setToolTip("The blurred images to restore: one image or a stack of planes (N, H, W) of the "
                                    "model's field; they are never compared with sharp images")
        self.adapt_form = ConfigForm(AdaptConfig, ("minutes",), labels={"minutes": "budget (minutes)"})
        # the camera's gain and offset are rarely known: hidden until asked for (the noise is measured otherwise)
        self.camera = QCheckBox("camera gain and offset known")
        self.camera.setToolTip("Give the camera's gain and offset instead of measuring the noise from the images")
        self.camera_form = ConfigForm(AdaptConfig, ("gain", "offset"),
                                      labels={"gain": "camera gain", "offset": "camera offset"})
        self.camera_form.native.setVisible(False)
        self.camera.toggled.connect(self.camera_form.native.setVisible)
        self.adapt_btn = QPushButton("Adapt to these images")
        self.adapt_btn.setToolTip("Fine-tune the current model on these images with its PSF model (no sharp images; "
                                  "Stop keeps the best state); the original is kept when adapting does not help")
        rows = QFormLayout()
        rows.addRow("images", self.adapt_layer)
        run = QHBoxLayout()
        run.addWidget(self.adapt_form.native, 1)
        run.addWidget(self.adapt_btn)
        box = QGroupBox("Adapt to your images")
        v = QVBoxLayout(box)
        v.addLayout(rows)
        v.addLayout(run)
        v.addWidget(self.camera)
        v.addWidget(self.camera_form.native)
        return box

    def _connect(self) -> None:
        self.budget_kind.changed.connect(self._budget_kind_changed)
        self._budget_kind_changed(self.budget_kind.value)
        self.mode.currentTextChanged.connect(self._mode_changed)
        self.preset.currentTextChanged.connect(self._preset_changed)
        self.sharp.currentTextChanged.connect(self._sharp_changed)
        for combo in (self.mode, self.preset, self.sharp, self.blurred, self.specimens):
            combo.currentTextChanged.connect(self.show_plan)
        for name in ("prefilter", "gate"):
            getattr(self, name).changed.connect(self.show_plan)
        self.finetune.toggled.connect(self.show_plan)
        self.sharp.currentTextChanged.connect(self.keep_pair_distinct)
        self.blurred.currentTextChanged.connect(self.keep_pair_distinct)
        self.grid_btn.clicked.connect(self.show_psf_grid)
        self.psf_file_btn.clicked.connect(self._choose_psf_file)
        self.start_btn.clicked.connect(self.start)
        self.stop_btn.clicked.connect(self.dock.stop_task)
        self.save_btn.clicked.connect(self.dock.choose_and_save_model)
        self.adapt_btn.clicked.connect(self.adapt)
        self.adapt_layer.activated.connect(self._adapt_layer_picked)
        self.actions = {"train": self.start_btn, "stop": self.stop_btn, "save": self.save_btn,
                        "psf_grid": self.grid_btn, "adapt": self.adapt_btn}

    # -- form -----------------------------------------------------------------------------------------
    @property
    def budget(self):
        """The budget input of the chosen kind (minutes or epochs)."""
        return self.train_form.epochs if self.budget_kind.value == "epochs" else self.train_form.minutes

    def _budget_kind_changed(self, kind: str) -> None:
        epochs = kind == "epochs"
        self.train_form.epochs.visible = epochs
        self.train_form.minutes.visible = not epochs
        if epochs and self.train_form.epochs.value == 0:
            self.train_form.epochs.value = 10

    def _mode_changed(self, mode: str) -> None:
        self.blurred.setEnabled(mode == PAIRS)
        self.sharp.setEnabled(mode != BUILTIN)
        self._sync_specimens()

    def _sync_specimens(self) -> None:
        """The set of built-in specimens is a choice only where it applies: built-in specimens for a 2-D model."""
        model = self._psf_sources.get(self.preset.currentText())
        field = (getattr(model, "provenance", None) or {}).get("field_shape")
        self.specimens.setEnabled(self.mode.currentText() == BUILTIN and getattr(model, "ndim", 2) == 2
                                  and bool(field))

    def _layer_axes(self, combo: LayerCombo):
        layer = combo.layer()
        if layer is None:
            return None
        return layer_axes(layer.name, layer.data.shape, layer.scale, layer.units, layer_source(layer))

    def plan(self):
        """What Start trains (a :class:`~napari_coordgate.app.axes.TrainPlan`); ValueError says what it refuses."""
        mode = self.mode.currentText()
        if mode == PAIRS:  # the PSF model does not decide what pairs train
            return train_plan("pairs", None, self._layer_axes(self.sharp), self._layer_axes(self.blurred))
        return train_plan(PLAN_SOURCES[mode], self.psf_model(), self._layer_axes(self.sharp),
                          specimens=self.specimens.currentText())

    def show_plan(self, *_) -> None:
        """Say in the form what Start will train, or why it will not start (the data, or a network setting that
        such a model refuses)."""
        try:
            plan = self.plan()
            self.model_config(plan)
            text = plan.describe()
        except (ConfigError, ValueError) as exc:
            text = f"nothing: {exc}"
        self.plan_label.setText(text)

    def keep_pair_distinct(self, *_) -> None:
        """Never offer the same layer as sharp and blurred: move the blurred pick to another layer. (Called after
        every change of the viewer's layers: the images to adapt to are picked here as well.)"""
        self._pick_adapt_layer()
        if self.blurred.currentText() != self.sharp.currentText() or self.blurred.count() < 2:
            return
        others = [self.blurred.itemText(i) for i in range(self.blurred.count())
                  if self.blurred.itemText(i) != self.sharp.currentText()]
        preferred = [n for n in others if "blurred" in n.lower()]
        self.blurred.setCurrentText((preferred or others)[0])

    def _pick_adapt_layer(self) -> None:
        """Until the user picks the images to adapt to, a layer whose name (or sample metadata) says blurred: the
        combo alone keeps the first layer it saw, often the sharp one, and adapting to sharp images is no use."""
        if self._adapt_layer_chosen:
            return
        layers = self.dock.viewer.layers
        names = [self.adapt_layer.itemText(i) for i in range(self.adapt_layer.count())]
        blurred = [n for n in names if n in layers and (layers[n].metadata.get("role") == "blurred"
                                                         or "blurred" in n.lower())]
        if blurred and self.adapt_layer.currentText() not in blurred:
            self.adapt_layer.setCurrentText(blurred[0])

    def _preset_changed(self, name: str) -> None:
        # the parameter editor edits pupil/Gaussian configs; a measured PSF model has no such parameters
        model = self._psf_sources.get(name)
        self._sync_specimens()
        editable = isinstance(model, PSFConfig)
        if editable:
            self.psf_form.set_config(model)
        else:
            self.psf_box.setChecked(False)
        self.psf_box.setEnabled(editable)

    def _sharp_changed(self, name: str) -> None:
        from napari_coordgate.optics.psf import PRESETS

        layer = self.sharp.layer()
        preset = layer.metadata.get("psf_preset") if layer is not None else None
        if preset in PRESETS:
            self.preset.setCurrentText(preset)

    def psf_model(self):
        """The PSF model: the chosen preset or file, with the edited parameters when editing a config is on."""
        model = self._psf_sources[self.preset.currentText()]
        if self.psf_box.isChecked() and isinstance(model, PSFConfig):  # other optics, the same field
            return self.psf_form.config().with_provenance(model.provenance)
        return model

    def set_psf_model(self, model, label: str | None = None) -> None:
        """Make ``model`` (any PSF model) the PSF source: an entry of the PSF combo, selected."""
        from napari_coordgate.optics.psf import PRESETS

        label = label or f"{model.name} ({model.kind})"
        if label in PRESETS:  # never shadow a preset
            label += " (file)"
        self._psf_sources[label] = model
        if self.preset.findText(label) < 0:
            self.preset.addItem(label)
        if self.preset.currentText() == label:
            self._preset_changed(label)  # the same entry with a new model: no change signal
            self.show_plan()
        self.preset.setCurrentText(label)

    def use_psf_model(self, model, label: str) -> None:
        """Train with ``model`` as the PSF source: on the built-in specimens at its field when it names one (a
        model measured from beads), else on sharp layers; sharp layers are a pick of the mode away."""
        self.set_psf_model(model, label)
        measured = bool((getattr(model, "provenance", None) or {}).get("field_shape"))
        self.mode.setCurrentText(BUILTIN if measured else SIMULATED)

    def load_psf_file(self, path: str) -> bool:
        """Read a PSF model file (``.cgpsf``, or a ``.json`` config) and make it the PSF source; False on error."""
        from napari_coordgate.model_io import resolve_psf

        try:
            model = resolve_psf(Path(path))
        except (ValueError, OSError) as exc:  # ConfigError and ModelFileError are ValueErrors
            show_error(f"CoordGate: {exc}")
            return False
        self.set_psf_model(model, f"file: {Path(path).name}")
        show_info(f"CoordGate: PSF source is {model.describe()}")
        return True

    def _choose_psf_file(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "PSF model file", self.dock.settings["model_folder"],
                                              f"PSF model (*{PSF_SUFFIX});;PSF config (*.json)")
        if path:
            remember_folder(self.dock.settings, path)
            self.load_psf_file(path)

    def model_config(self, plan=None) -> ModelConfig:
        """The network's config: the form's, made 3-D as ``plan`` says (a setting a 3-D model refuses raises
        ConfigError); the dock model's when fine-tuning."""
        if self.finetune.isChecked() and self.dock.model is not None:
            return self.dock.model.config  # fine-tuning keeps the network of the model it starts from
        cfg = self.model_form.config()
        return cfg if plan is None else plan.model_config(cfg)

    def init_model(self, plan=None):
        """The model to fine-tune (of the dimensionality ``plan`` trains), or None to start from fresh weights."""
        if not self.finetune.isChecked():
            return None
        if self.dock.model is None:
            raise ValueError("no model to continue from: load or train one, or untick 'continue from the current "
                             "model'")
        have = self.dock.model.config.ndim
        if plan is not None and have != plan.ndim:
            raise ValueError(f"the current model is {have}-D but this data trains a {plan.ndim}-D model: untick "
                             "'continue from the current model', or pick data of its kind")
        return self.dock.model

    def train_config(self) -> TrainConfig:
        if self.budget_kind.value == "epochs":
            return self.train_form.config()
        return self.train_form.config(epochs=0)

    def source(self, plan=None):
        """The chosen layers' data, as an engine source (GUI thread only); the built-in specimens as a
        :class:`~napari_coordgate.app.jobs.BuiltinSpecimens` that the job draws."""
        from napari_coordgate.engine import PairSource, SimulatedSource

        if self.mode.currentText() == BUILTIN:
            return BuiltinSpecimens(self.psf_model(), seed=self.seed.value, specimens=self.specimens.currentText())
        sharp = self.sharp.layer()
        if sharp is None:
            raise ValueError("pick a sharp image layer to train on (File > Open Sample > Calibration pair)")
        # no copy here: the training job writes the arrays once into its process's files
        if self.mode.currentText() == SIMULATED:
            return SimulatedSource(layer_array(sharp, copy=False), self.psf_model())
        blurred = self.blurred.layer()
        if blurred is None or blurred is sharp:
            raise ValueError(f"sharp and blurred are the same layer ({sharp.name!r}): pick the blurred image of "
                             "the same field, or train from sharp layers and a PSF model")
        # the PSF model travels with the pairs only when the Wiener first stage needs it
        psf = self.psf_model() if self.prefilter.value != "none" else None
        z_step = plan.z_step_um if plan is not None and plan.ndim == 3 else None
        return PairSource(layer_array(sharp, copy=False), layer_array(blurred, copy=False), psf=psf, z_step_um=z_step)

    # -- actions --------------------------------------------------------------------------------------
    def start(self) -> None:
        try:
            plan = self.plan()
            model_cfg, train_cfg, source = self.model_config(plan), self.train_config(), self.source(plan)
            init = self.init_model(plan)
        except (ConfigError, ValueError) as exc:
            show_error(f"CoordGate: {exc}")
            self.dock.status.setText(f"not started: {exc}")
            return
        self._begin("train")
        self.dock.run_task("train", train_job, model_cfg, train_cfg, source, init, state=State.TRAINING,
                           on_returned=self._finished)

    def _begin(self, task: str) -> None:
        self.task = task
        self.history = []
        self.plot.clear()
        self.device_used.setText("-")

    def on_update(self, u) -> None:
        """An engine Update of the running training or adaptation: the plot, the status line, the device."""
        self.history.append(u)
        self.device_used.setText(u.device)
        adapting = self.task == "adapt"
        steps = [h.step for h in self.history if h.kind == "step"]
        loss = [h.loss for h in self.history if h.kind == "step"]
        epochs = [h for h in self.history if h.kind == "epoch" and h.val_psnr is not None]
        if u.kind in ("epoch", "done") or len(steps) % 5 == 1:  # redraw sparingly
            self.plot.plot_training(steps, loss, [h.step for h in epochs], [h.val_psnr for h in epochs],
                                    u.input_psnr, **(ADAPT_PLOT if adapting else {}))
        self.dock.status.setText(_adapt_status(u) if adapting else _train_status(u))

    def _finished(self, result) -> None:
        self.dock.last_result = result
        self.device_used.setText(result.device)
        self.dock.set_model(result.saved, f"trained in this session ({result.stopped})")
        psnr = "-" if result.best_val_psnr is None else f"{result.best_val_psnr:.2f} dB"
        if result.stopped.startswith("crashed") or result.stopped == "diverged":
            hint = "; train again with a lower learning rate" if result.stopped == "diverged" else ""
            show_warning(f"CoordGate: training {result.stopped}; kept the best model so far: validation PSNR "
                         f"{psnr} (epoch {result.best_epoch}){hint}")
            return
        stalled = result.stall_message()
        if stalled:
            show_warning(f"CoordGate: {stalled}")
            return
        show_info(f"CoordGate: training {result.stopped}; best validation PSNR {psnr} (epoch {result.best_epoch})")

    # -- adaptation -----------------------------------------------------------------------------------
    def _adapt_layer_picked(self, *_) -> None:
        self._adapt_layer_chosen = True

    def adapt_config(self) -> AdaptConfig:
        """The budget and camera from the inputs, on the device chosen for training."""
        camera = {}
        if self.camera.isChecked():
            given = self.camera_form.config()  # a gain without an offset is refused here
            camera = {"gain": given.gain, "offset": given.offset}
        return self.adapt_form.config(device=self.device.value, **camera)

    def adapt_images(self, saved):
        """The chosen layer's planes for adapting ``saved`` (GUI thread only); ValueError says what to change."""
        if saved.config.ndim == 3:
            raise ValueError("this is a 3-D model: adapting works on 2-D models only; fine-tune it on z-stack "
                             "calibration pairs or simulated volumes instead (Start training, 'continue from the "
                             "current model')")
        layer = self.adapt_layer.layer()
        if layer is None:
            raise ValueError("pick the image layer to adapt to (the blurred images to restore)")
        if saved.psf is None:
            raise ValueError("this model carries no PSF model (it was trained on calibration pairs only), and "
                             "adapting needs one: train from sharp layers and a PSF model, or adapt from the "
                             "command line with --psf")
        # no copy here: the adaptation job writes the arrays once into its process's files, as training does
        images = layer_array(layer, copy=False)
        shape, field = tuple(images.shape), tuple(saved.field_shape)
        if len(shape) not in (2, 3) or shape[-2:] != field:
            raise ValueError(f"layer {layer.name!r} has shape {shape}: adapting needs an image or a stack of planes "
                             f"(N, H, W) of the model's {field[0]} x {field[1]} field (a camera ROI or binning: "
                             "napari-coordgate adapt --roi/--binning)")
        return images

    def adapt(self) -> None:
        """Adapt the dock's model to the chosen layer in the training process; Stop keeps the best state."""
        saved = self.dock.model
        if saved is None:
            show_warning("CoordGate: no model to adapt: train one here or load one (Model tab) first")
            self.dock.status.setText("not started: no model to adapt")
            return
        try:
            cfg, images = self.adapt_config(), self.adapt_images(saved)
        except (ConfigError, ValueError) as exc:
            show_error(f"CoordGate: {exc}")
            self.dock.status.setText(f"not started: {exc}")
            return
        self._begin("adapt")
        name, origin = self.adapt_layer.currentText(), self.dock.model_origin
        self.dock.run_task("adapt", adapt_job, saved, images, cfg, None, state=State.TRAINING,
                           on_returned=lambda result: self._adapted(result, name, origin))

    def _adapted(self, result, name: str, origin: str) -> None:
        self.dock.last_result = result
        self.device_used.setText(result.device)
        noise = "" if result.noise is None else f" {result.noise.describe()}."
        if result.kept_original:  # the dock's model is unchanged: it keeps its own origin
            show_info(f"CoordGate: adapting to {name!r} did not improve the held-out consistency of the original "
                      f"model ({result.steps} steps, {result.stopped}), so the original model is kept.{noise}")
            return
        self.dock.set_model(result.saved, f"adapted in this session to {name!r} ({result.stopped}, "
                                          f"{result.steps} steps) from {origin or 'the previous model'}")
        change = f"held-out consistency {_gain_db(result)} over the original"
        if result.stopped.startswith("crashed") or result.stopped == "diverged":
            show_warning(f"CoordGate: adaptation {result.stopped}; kept the best adapted model so far: {change}."
                         f"{noise}")
            return
        show_info(f"CoordGate: adapted to {name!r} ({result.stopped}, {result.steps} steps): {change} "
                  f"({result.criterion_before:.4f} -> {result.criterion_best:.4f}).{noise}")

    def show_psf_grid(self) -> None:
        layer = self.sharp.layer()
        field = tuple(layer.data.shape[-2:]) if layer is not None else (256, 256)
        try:
            psf = self.psf_model()
        except ConfigError as exc:
            show_error(f"CoordGate: {exc}")
            return

        def done(grid) -> None:
            name = f"PSF grid ({psf.name})"
            if name in self.dock.viewer.layers:
                self.dock.viewer.layers[name].data = grid
            else:
                self.dock.viewer.add_image(grid, name=name, colormap="magma")

        self.dock.run_task("PSF grid", psf_grid_job, psf, field, on_returned=done)


def _train_status(u) -> str:
    best = "-" if u.best_val_psnr is None else f"{u.best_val_psnr:.2f} dB"
    if u.best_val_psnr is not None and u.input_psnr is not None:
        best += f" (input {u.input_psnr:.2f} dB)"
    return f"train: epoch {u.epoch}, step {u.step}, loss {u.loss:.4f}, best val {best}, {u.elapsed:.0f} s on {u.device}"


def _adapt_status(u) -> str:
    """The best state's held-out consistency over the original model's (its PSNR slots hold -10 log10 of it)."""
    gain = "-" if u.best_val_psnr is None or u.input_psnr is None else f"{u.best_val_psnr - u.input_psnr:+.2f} dB"
    return (f"adapt: epoch {u.epoch}, step {u.step}, held-out consistency {gain} over the original, "
            f"{u.elapsed:.0f} s on {u.device}")


def _gain_db(result) -> str:
    """How far the adapted model's held-out criterion is below the original's, in dB (higher is better)."""
    before, best = result.criterion_before, result.criterion_best
    if not before or not best:  # a process that died before reporting them
        return "-"
    return f"{10.0 * math.log10(before / best):+.2f} dB"
