"""npe2 reader: a ``.cgmodel`` file dropped on the viewer (or opened with File > Open) loads into the
CoordGate dock, which opens if it is closed. It adds no layer."""

from __future__ import annotations

from napari_coordgate.modelio import MODEL_SUFFIX

PLUGIN, WIDGET = "napari-coordgate", "CoordGate deblur"


def get_reader(path):
    paths = [path] if isinstance(path, str) else list(path)
    if len(paths) != 1 or not str(paths[0]).endswith(MODEL_SUFFIX):
        return None
    return _load_into_dock


def _load_into_dock(path):
    import napari

    path = path if isinstance(path, str) else path[0]
    viewer = napari.current_viewer()
    if viewer is None:
        raise RuntimeError(f"{path}: a CoordGate model loads into the CoordGate dock of an open viewer")
    _, dock = viewer.window.add_plugin_dock_widget(PLUGIN, WIDGET)  # the open dock, or a new one
    dock.load_model_file(str(path))
    return [(None,)]  # napari's "read, no layer" sentinel
