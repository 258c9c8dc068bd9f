"""Claims of docs/napari.md about the dock that need a viewer: drag-and-drop loading, Preferences honoured."""

from __future__ import annotations

from types import SimpleNamespace

from conftest import wait_idle


def test_dropping_a_model_file_on_the_dock_loads_it(viewer_dock, qtbot, tiny_model, tmp_path):
    from qtpy.QtCore import QMimeData, QPoint, Qt, QUrl
    from qtpy.QtGui import QDropEvent

    from napari_coordgate.model_io import save_model

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


def test_opening_a_model_file_in_the_viewer_opens_the_dock_and_loads_it(make_napari_viewer, qtbot, tiny_model,
                                                                         tmp_path):
    from napari_coordgate.model_io import save_model

    viewer = make_napari_viewer(show=True)
    path = save_model(tmp_path / "opened", tiny_model)
    viewer.open(str(path), plugin="napari-coordgate")
    dock = viewer.window.dock_widgets["CoordGate deblur (napari-coordgate)"]
    wait_idle(qtbot, dock)
    assert dock.model is not None and dock.model_origin == str(path)
    assert len(viewer.layers) == 0
    viewer.open(str(path), plugin="napari-coordgate")  # a second file goes to the same dock
    assert viewer.window.dock_widgets["CoordGate deblur (napari-coordgate)"] is dock
    wait_idle(qtbot, dock)


def test_a_long_job_reports_through_napari_progress_as_well(viewer_dock, qtbot, tiny_model, pair64):
    import numpy as np
    from napari.utils import progress

    viewer, dock = viewer_dock
    dock.set_model(tiny_model, "test")
    viewer.add_image(np.broadcast_to(pair64[1], (3, 64, 64)).copy(), name="stack")
    dock.apply_tab.image.setCurrentText("stack")
    seen = []
    dock.progressed.connect(lambda *_: seen.append((dock.activity.desc, dock.activity.n, dock.activity.total)
                                                   if dock.activity is not None else None))
    dock.apply_tab.apply_btn.click()
    wait_idle(qtbot, dock)
    assert seen and seen[-1][0] == "CoordGate apply" and seen[-1][1] == seen[-1][2]
    assert dock.activity is None and not any(p.desc.startswith("CoordGate") for p in progress._all_instances)


def test_the_model_tab_exports_a_package_that_loads_back(viewer_dock, qtbot, tiny_model, tmp_path):
    import pytest

    pytest.importorskip("bioimageio.spec")
    _, dock = viewer_dock
    assert not dock.model_tab.export_btn.isEnabled(), "export needs a model"
    dock.set_model(tiny_model, "test")
    assert dock.model_tab.export_btn.isEnabled()
    dock.model_tab.export_package(str(tmp_path / "pkg.zip"))
    wait_idle(qtbot, dock)
    assert (tmp_path / "pkg.zip").is_file()
    dock.load_model_file(str(tmp_path / "pkg.zip"))
    wait_idle(qtbot, dock)
    assert dock.model is not tiny_model and dock.model.config == tiny_model.config


def test_the_sample_model_button_loads_the_shipped_model(viewer_dock, qtbot):
    _, dock = viewer_dock
    dock.model_tab.sample_btn.click()
    wait_idle(qtbot, dock)
    assert dock.model is not None and dock.model_origin.endswith("sample_gaussian.cgmodel")


def test_opening_an_exported_package_loads_it_and_other_zips_are_not_claimed(make_napari_viewer, qtbot, tiny_model,
                                                                              tmp_path):
    import zipfile

    import pytest

    pytest.importorskip("bioimageio.spec")
    from napari_coordgate._widgets._reader import get_reader
    from napari_coordgate.model_io.bioimageio import export_package

    package = export_package(tiny_model, tmp_path / "pkg.zip")
    with zipfile.ZipFile(tmp_path / "other.zip", "w") as zf:
        zf.writestr("data.txt", "not a model")
    assert get_reader(str(tmp_path / "other.zip")) is None
    viewer = make_napari_viewer(show=True)
    viewer.open(str(package), plugin="napari-coordgate")
    dock = viewer.window.dock_widgets["CoordGate deblur (napari-coordgate)"]
    wait_idle(qtbot, dock)
    assert dock.model is not None and dock.model.config == tiny_model.config
