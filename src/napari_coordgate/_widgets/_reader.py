"""npe2 reader: a ``.cgmodel`` file, or a bioimage.io package exported by this plugin, dropped on the viewer (or
opened with File > Open) loads into the CoordGate dock, which opens if it is closed. It adds no layer."""

from __future__ import annotations

from napari_coordgate.model_io import MODEL_SUFFIX

PLUGIN, WIDGET = "napari-coordgate", "CoordGate deblur"


def _is_our_package(path: str) -> bool:
    """A bioimage.io package exported by this plugin: a zip with rdf.yaml and the .cgmodel it carries."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except (OSError, zipfile.BadZipFile):
        return False
    return "rdf.yaml" in names and any(n.endswith(MODEL_SUFFIX) for n in names)


def get_reader(path):
    paths = [path] if isinstance(path, str) else list(path)
    if len(paths) != 1:
        return None
    p = str(paths[0])
    if p.endswith(MODEL_SUFFIX) or (p.endswith(".zip") and _is_our_package(p)):
        return _load_into_dock
    return None  # other zips are for other readers


def _load_into_dock(path):
    import napari

    path = path if isinstance(path, str) else path[0]
    viewer = napari.current_viewer()
    if viewer is None:
        raise RuntimeError(f"{path}: a CoordGate model loads into the CoordGate dock of an open viewer")
    _, dock = viewer.window.add_plugin_dock_widget(PLUGIN, WIDGET)  # the open dock, or a new one
    dock.load_model_file(str(path))
    return [(None,)]  # napari's "read, no layer" sentinel
