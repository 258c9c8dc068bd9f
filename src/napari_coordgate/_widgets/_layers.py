"""Layer pickers and the GUI-thread side of data handling: copy arrays, keep spatial metadata."""

from __future__ import annotations

from typing import Any

import numpy as np
from napari.layers import Image
from qtpy.QtWidgets import QComboBox, QWidget

NONE = "(none)"


class LayerCombo(QComboBox):
    """Names of the viewer's image layers, kept up to date as layers are added, removed or renamed."""

    def __init__(self, viewer, optional: bool = False, parent: QWidget | None = None, prefer: str = ""):
        super().__init__(parent)
        self._viewer = viewer
        self._optional = optional
        self._prefer = prefer  # a word in layer names (or a layer's metadata "role") to pick by default
        self.refresh()

    def _preferred(self, names: list[str]) -> str | None:
        if not self._prefer:
            return None
        layers = [layer for layer in self._viewer.layers if layer.name in names]
        by_role = [la.name for la in layers if la.metadata.get("role") == self._prefer]
        by_name = [la.name for la in layers if self._prefer in la.name.lower()]
        return (by_role or by_name or [None])[0]

    def refresh(self, *_: Any) -> None:
        current = self.currentText()
        names = [layer.name for layer in self._viewer.layers if isinstance(layer, Image)]
        if self._optional:
            names = [NONE, *names]
        self.blockSignals(True)
        self.clear()
        self.addItems(names)
        if current in names:
            self.setCurrentText(current)
        elif self._preferred(names):
            self.setCurrentText(self._preferred(names))
        self.blockSignals(False)
        if self.currentText() != current:
            self.currentTextChanged.emit(self.currentText())

    def layer(self) -> Image | None:
        name = self.currentText()
        if not name or name == NONE or name not in self._viewer.layers:
            return None
        return self._viewer.layers[name]


def layer_array(layer: Image, copy: bool = True):
    """The layer's data for a worker: a numpy copy, or the lazy array itself (dask/zarr), never computed.

    Must be called on the GUI thread. A multiscale layer gives its full-resolution level.
    """
    if layer.rgb:
        raise ValueError(f"layer {layer.name!r} is RGB; convert it to grey or split its channels first")
    data = layer.data[0] if layer.multiscale else layer.data
    if isinstance(data, np.ndarray):
        return np.array(data, copy=True) if copy else data
    if hasattr(data, "compute") or hasattr(data, "chunks"):
        return data  # lazy: the engine reads one window at a time
    return np.array(data, copy=True)


def spatial_kwargs(layer: Image, ndim: int | None = None) -> dict:
    """scale, translate, units and axis labels of ``layer`` (the last ``ndim`` axes, if given)."""
    n = layer.ndim if ndim is None else ndim
    kw = {
        "scale": tuple(layer.scale[-n:]),
        "translate": tuple(layer.translate[-n:]),
        "axis_labels": tuple(layer.axis_labels[-n:]),
        "units": tuple(str(u) for u in layer.units[-n:]),
    }
    return kw


def layer_source(layer: Image) -> str | None:
    """The file the layer was opened from (napari's ``layer.source.path``), or None."""
    return getattr(getattr(layer, "source", None), "path", None)
