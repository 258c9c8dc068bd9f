"""An editable form generated from a validated config dataclass (bounds and choices from its metadata)."""

from __future__ import annotations

import dataclasses
from typing import Sequence

from qtpy.QtWidgets import QCheckBox, QComboBox, QDoubleSpinBox, QFormLayout, QLineEdit, QSpinBox, QWidget


class ConfigForm(QWidget):
    """One input per field of a :class:`~napari_coordgate.config.Config`; :meth:`value` validates."""

    def __init__(self, cls, fields: Sequence[str] | None = None, parent: QWidget | None = None):
        super().__init__(parent)
        self._cls = cls
        self._base = cls()
        self._inputs: dict[str, QWidget] = {}
        layout = QFormLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        for f in dataclasses.fields(cls):
            if fields is not None and f.name not in fields:
                continue
            w = self._make_input(f)
            w.setToolTip(f.metadata.get("doc", ""))
            self._inputs[f.name] = w
            layout.addRow(f.name, w)
        self.set_value(self._base)

    @staticmethod
    def _make_input(f: dataclasses.Field) -> QWidget:
        meta = f.metadata
        kind = meta.get("kind")
        if meta.get("options"):
            w = QComboBox()
            w.addItems([str(o) for o in meta["options"]])
            return w
        if kind is bool:
            return QCheckBox()
        if kind is int:
            w = QSpinBox()
            w.setRange(int(meta["lo"] if meta.get("lo") is not None else -2**31),
                       int(min(meta["hi"], 2**31 - 1) if meta.get("hi") is not None else 2**31 - 1))
            return w
        if kind is float:
            w = QDoubleSpinBox()
            w.setDecimals(3)
            w.setSingleStep(0.05)
            w.setRange(meta["lo"] if meta.get("lo") is not None else -1e9,
                       meta["hi"] if meta.get("hi") is not None else 1e9)
            return w
        return QLineEdit()

    def set_value(self, cfg) -> None:
        """Show ``cfg``; fields not in the form are kept from it when :meth:`value` is called."""
        self._base = cfg
        for name, w in self._inputs.items():
            v = getattr(cfg, name)
            if isinstance(w, QComboBox):
                w.setCurrentText(str(v))
            elif isinstance(w, QCheckBox):
                w.setChecked(bool(v))
            elif isinstance(w, (QSpinBox, QDoubleSpinBox)):
                w.setValue(v)
            else:
                w.setText(str(v))

    def value(self):
        """The validated config (raises ``ConfigError`` with the field's name and bounds)."""
        changes = {}
        for name, w in self._inputs.items():
            if isinstance(w, QComboBox):
                changes[name] = w.currentText()
            elif isinstance(w, QCheckBox):
                changes[name] = w.isChecked()
            elif isinstance(w, (QSpinBox, QDoubleSpinBox)):
                changes[name] = w.value()
            else:
                changes[name] = w.text()
        return self._base.replace(**changes)
