"""Fixtures for the dock tests: a viewer with the dock opened through the plugin menu, tiny models."""

from __future__ import annotations

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
    from napari_coordgate.app.state import State

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
