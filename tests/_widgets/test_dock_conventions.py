"""README claims about the dock that need a viewer: drag-and-drop loading, Preferences honoured."""

from __future__ import annotations

from types import SimpleNamespace

from conftest import wait_idle


def test_dropping_a_model_file_on_the_dock_loads_it(viewer_dock, qtbot, tiny_model, tmp_path):
    from qtpy.QtCore import QMimeData, QPoint, Qt, QUrl
    from qtpy.QtGui import QDropEvent

    from napari_coordgate.modelio import save_model

    _, dock = viewer_dock
    path = save_model(tmp_path / "dropped", tiny_model)
    mime = QMimeData()
    mime.setUrls([QUrl.fromLocalFile(str(tmp_path / "notes.txt")), QUrl.fromLocalFile(str(path))])
    event = QDropEvent(QPoint(5, 5).toPointF() if hasattr(QPoint, "toPointF") else QPoint(5, 5),
                       Qt.DropAction.CopyAction, mime, Qt.MouseButton.LeftButton, Qt.KeyboardModifier.NoModifier)
    dock.dropEvent(event)
    wait_idle(qtbot, dock)
    assert dock.model is not None and dock.model_origin == str(path)


def test_the_preferences_device_and_tile_are_the_docks_defaults(make_napari_viewer, monkeypatch):
    from napari_coordgate._widgets import _settings

    monkeypatch.setattr(_settings, "_section", lambda: SimpleNamespace(device="cpu", tile=96, model_folder="/x"))
    viewer = make_napari_viewer()
    _, dock = viewer.window.add_plugin_dock_widget("napari-coordgate", "CoordGate deblur")
    assert dock.train_tab.device.value == "cpu" and dock.apply_tab.device.value == "cpu"
    assert dock.apply_tab.tile.value == 96 and dock.settings["model_folder"] == "/x"
