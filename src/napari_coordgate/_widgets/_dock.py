"""The "CoordGate deblur" dock: Model, Calibrate, Train, Apply and Evaluate tabs around one task runner.

The dock owns the state (a :class:`~napari_coordgate.app.state.State`), the current model and the runner; tabs are forms
that build configs, copy layer data on the GUI thread and call :meth:`CoordGateDock.run_task`. A tab never reaches
into another: what one needs of another goes through the dock's public methods ("between tabs" below).
"""

from __future__ import annotations

from typing import Any, Callable

from napari.utils import progress
from napari.utils.notifications import show_error, show_info
from qtpy.QtCore import Signal
from qtpy.QtWidgets import QLabel, QProgressBar, QTabWidget, QVBoxLayout, QWidget

from napari_coordgate.app.jobs import load_job
from napari_coordgate.app.state import Progress, State, enabled_actions
from napari_coordgate.model_io import MODEL_SUFFIX

from ._apply_tab import ApplyTab
from ._calibrate_tab import CalibrateTab
from ._eval_tab import EvaluateTab
from ._layers import LayerCombo
from ._model_tab import ModelTab
from ._runner import TaskRunner
from ._settings import read_settings
from ._train_tab import TrainTab

DROPPABLE = (MODEL_SUFFIX, ".zip")  # model files, and bioimage.io packages exported by this plugin


class CoordGateDock(QWidget):
    """Train, load, apply and evaluate CoordGate deblurring models in the viewer."""

    progressed = Signal(str, int, int)  # task, done, total
    state_changed = Signal(object)
    model_changed = Signal()
    task_failed = Signal(str)

    def __init__(self, napari_viewer, parent: QWidget | None = None):
        super().__init__(parent)
        self.viewer = napari_viewer
        self.settings = read_settings()
        self.state = State.IDLE
        self.model = None  # SavedModel of this dock only
        self.model_origin = ""
        self.last_result = None
        self.runner = TaskRunner()
        self.activity = None  # napari.utils.progress of the running task
        self._pending: Callable[[Any], None] | None = None
        # a plain-Python receiver: it still runs when the viewer closing deletes this widget
        self.destroyed.connect(self.runner.shutdown)

        self.model_tab = ModelTab(self)
        self.train_tab = TrainTab(self)
        self.calibrate_tab = CalibrateTab(self)
        self.apply_tab = ApplyTab(self)
        self.eval_tab = EvaluateTab(self)
        self.tabs = QTabWidget()
        for tab, title in ((self.model_tab, "Model"), (self.calibrate_tab, "Calibrate"), (self.train_tab, "Train"),
                           (self.apply_tab, "Apply"), (self.eval_tab, "Evaluate")):
            self.tabs.addTab(tab, title)
        self.progress = QProgressBar()
        self.progress.setRange(0, 1)
        self.status = QLabel("Ready")
        self.status.setWordWrap(True)
        layout = QVBoxLayout(self)
        layout.addWidget(self.tabs)
        layout.addWidget(self.progress)
        layout.addWidget(self.status)
        self.setAcceptDrops(True)

        events = self.viewer.layers.events
        for ev in (events.inserted, events.removed, events.moved):
            ev.connect(self._layers_changed)
        self._layers_changed()
        self.apply_tab.models.textChanged.connect(self.refresh_actions)
        self.refresh_actions()

    # -- layers ---------------------------------------------------------------------------------------
    def _layers_changed(self, event=None) -> None:
        if event is not None and getattr(event, "type", "") == "inserted":
            event.value.events.name.connect(self._layers_changed)
        for combo in self.findChildren(LayerCombo):
            combo.refresh()
        self.train_tab.keep_pair_distinct()

    # -- state ----------------------------------------------------------------------------------------
    def set_state(self, state: State) -> None:
        self.state = state
        self.refresh_actions()
        self.state_changed.emit(state)

    def refresh_actions(self) -> None:
        """Enable each tab's buttons for the state, the model and the calibration result (call after a change)."""
        allowed = enabled_actions(self.state, self.model is not None)
        if self.apply_tab.models.text().strip():  # model files per channel are enough to apply
            allowed |= enabled_actions(self.state, True) & {"apply"}
        if self.calibrate_tab.result is None:  # nothing to use or save before a calibration
            allowed -= {"use_psf", "save_psf"}
        for tab in (self.model_tab, self.calibrate_tab, self.train_tab, self.apply_tab, self.eval_tab):
            for action, button in tab.actions.items():
                button.setEnabled(action in allowed)

    def set_model(self, saved, origin: str) -> None:
        self.model = saved
        self.model_origin = origin
        self.model_tab.show_model(saved, origin)
        self.refresh_actions()
        self.model_changed.emit()

    # -- between tabs ---------------------------------------------------------------------------------
    def choose_and_save_model(self) -> None:
        """Ask for a file name and save the current model (the Model tab's Save, also on the Train tab)."""
        self.model_tab.choose_and_save()

    def training_device(self) -> str:
        """The device chosen on the Train tab (the calibration's pupil fit runs there too)."""
        return self.train_tab.device.value

    def training_psf_model(self):
        """The Train tab's PSF model (a preset, a file or one measured from beads; ConfigError if edited badly)."""
        return self.train_tab.psf_model()

    def train_with_psf_model(self, model, label: str) -> None:
        """Make ``model`` the Train tab's PSF source (training on the built-in specimens at its field when it names
        one, else on sharp layers), and show the Train tab."""
        self.train_tab.use_psf_model(model, label)
        self.tabs.setCurrentWidget(self.train_tab)

    # -- tasks ----------------------------------------------------------------------------------------
    def run_task(self, name: str, fn: Callable, *args: Any, state: State = State.BUSY,
                 on_returned: Callable[[Any], None] | None = None):
        """Start ``fn(*args, report=, should_stop=)`` in a worker; ``on_returned`` gets its result here."""
        if self.runner.busy:
            show_info(f"CoordGate: wait for '{self.runner.task.name}' to finish, or stop it")
            return None
        self._pending = on_returned
        self.progress.setRange(0, 0)  # busy until the first progress message
        self.status.setText(f"{name}…")
        # napari's own progress (the activity dock) mirrors the dock's bar
        self.activity = progress(total=0, desc=f"CoordGate {name}")
        self.set_state(state)
        return self.runner.start(self, name, fn, *args, on_message=self._on_message,
                                 on_returned=self._on_returned, on_errored=self._on_errored,
                                 on_finished=self._on_finished)

    def stop_task(self) -> None:
        """Stop training (the best model so far is kept) or cancel a prediction."""
        if self.runner.busy:
            self.runner.cancel()
            self.status.setText(f"stopping {self.runner.task.name}…")
            self.set_state(State.STOPPING)

    def _on_message(self, msg: Any) -> None:
        done, total = (msg.done, max(msg.total, 1)) if isinstance(msg, Progress) else (int(1000 * msg.progress), 1000)
        if self.activity is not None:
            self.activity.total = total
            self.activity.n = done
            self.activity.refresh()
        if isinstance(msg, Progress):
            self.progress.setRange(0, max(msg.total, 1))
            self.progress.setValue(msg.done)
            self.status.setText(f"{msg.task}: {msg.text}" if msg.text else msg.task)
            self.progressed.emit(msg.task, msg.done, msg.total)
        else:  # an engine Update from training
            self.progress.setRange(0, 1000)
            self.progress.setValue(int(1000 * msg.progress))
            self.progressed.emit("train", int(1000 * msg.progress), 1000)
            self.train_tab.on_update(msg)

    def _on_returned(self, result: Any) -> None:
        callback, self._pending = self._pending, None
        if callback is None:
            return
        try:
            callback(result)
        except Exception as exc:  # showing a result must not leave the dock stuck
            show_error(f"CoordGate: {exc}")
            self.task_failed.emit(str(exc))

    def _on_errored(self, exc: Exception) -> None:
        self._pending = None
        name = self.runner.task.name if self.runner.task is not None else "task"
        show_error(f"CoordGate {name} failed: {exc}")
        self.status.setText(f"failed: {exc}")
        self.task_failed.emit(str(exc))

    def _on_finished(self) -> None:
        if self.activity is not None:
            self.activity.close()
            self.activity = None
        self.progress.setRange(0, 1)
        self.progress.setValue(1 if not self.status.text().startswith("failed") else 0)
        if not self.status.text().startswith("failed"):
            self.status.setText("Ready")
        self.set_state(State.IDLE)

    # -- models ---------------------------------------------------------------------------------------
    def load_model_file(self, path: str) -> None:
        def done(models: list) -> None:
            self.set_model(models[0], path)
            show_info(f"CoordGate: loaded {path}")

        self.run_task("load model", load_job, [str(path)], on_returned=done)

    def dragEnterEvent(self, event) -> None:
        urls = event.mimeData().urls() if event.mimeData().hasUrls() else []
        if any(u.toLocalFile().endswith(DROPPABLE) for u in urls):
            event.acceptProposedAction()

    def dropEvent(self, event) -> None:
        for url in event.mimeData().urls():
            if url.toLocalFile().endswith(DROPPABLE):
                self.load_model_file(url.toLocalFile())
                event.acceptProposedAction()
                return

    def closeEvent(self, event) -> None:
        self.runner.shutdown()
        super().closeEvent(event)
