"""Fixtures for the dock tests: a viewer with the dock opened through the plugin menu, tiny models."""

from __future__ import annotations

import numpy as np
import pytest

PLUGIN, WIDGET = "napari-coordgate", "CoordGate deblur"
TIMEOUT = 60_000


@pytest.fixture
def viewer_dock(make_napari_viewer, qtbot):
    viewer = make_napari_viewer(show=True)  # an unshown window renders nothing
    _, dock = viewer.window.add_plugin_dock_widget(PLUGIN, WIDGET)
    yield viewer, dock
    # never leave a worker running into the viewer's teardown
    dock.runner.shutdown()
    qtbot.waitUntil(lambda: not dock.runner.busy, timeout=TIMEOUT)


def wait_idle(qtbot, dock, timeout: int = TIMEOUT) -> None:
    from napari_coordgate._widgets._state import State

    qtbot.waitUntil(lambda: not dock.runner.busy and dock.state is State.IDLE, timeout=timeout)


def make_tiny(dock, epochs: int = 1, steps: int = 4) -> None:
    """Set the Train tab to a network and budget that train in about a second."""
    t = dock.train_tab
    t.depth.value = 1
    t.channels.value = 2
    t.budget_kind.value = "epochs"
    t.budget.value = epochs
    t.steps_per_epoch.value = steps
    t.crop.value = 32
    t.batch.value = 2
    t.device.value = "cpu"


@pytest.fixture(scope="session")
def pair64():
    """A 64 x 64 sharp/blurred pair with the gaussian preset."""
    from napari_coordgate.optics.blur import SpatiallyVaryingBlur
    from napari_coordgate.specimens import procedural_specimen

    sharp = procedural_specimen((64, 64), seed=3)
    blurred = SpatiallyVaryingBlur("gaussian", (64, 64)).forward(sharp)
    return sharp, blurred.astype(np.float32)


@pytest.fixture(scope="session")
def tiny_model(pair64):
    """A depth-2 CoordGate model trained for a few steps on the 64 x 64 pair (trained once per session).

    Trained in a separate process, as the dock does: this process holds viewers (see napari_coordgate.isolate).
    """
    from napari_coordgate import engine
    from napari_coordgate.config import ModelConfig, TrainConfig
    from napari_coordgate.isolate import train_isolated

    result = train_isolated(ModelConfig(depth=2, channels=4), TrainConfig(crop=32, batch=2, epochs=1,
                            steps_per_epoch=3, device="cpu"), engine.PairSource(*pair64),
                            report=lambda u: None, should_stop=lambda: False)
    return result.saved
