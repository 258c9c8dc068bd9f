"""Dock inputs generated from the configs through magicgui: one widget per config field, with the field's type,
bounds or choices, default and help from ``config.py`` (the single source of every option), so a default or a
range cannot diverge from the CLI's again."""

from __future__ import annotations

from typing import Any, Sequence

from magicgui.widgets import Container, create_widget

from napari_coordgate.config import DEVICES, field_specs

_INT_MAX = 2**31 - 1


def _options(spec) -> dict[str, Any]:
    opts: dict[str, Any] = {"tooltip": spec.help}
    if spec.options is not None:
        opts["choices"] = list(spec.options)
    elif spec.kind in (int, float):
        lo = spec.lo if spec.lo is not None else -_INT_MAX
        hi = spec.hi if spec.hi is not None else _INT_MAX
        opts["min"], opts["max"] = lo, min(hi, _INT_MAX)
        if spec.kind is float:
            opts["step"] = 10 ** (len(str(spec.default).split(".")[-1]) * -1) if spec.default else 0.1
    return opts


def field_widget(spec, value: Any = None, label: str | None = None):
    """A magicgui widget for one config field (a :class:`~napari_coordgate.config.FieldSpec`)."""
    value = spec.default if value is None else value
    annotation = str if spec.options is not None else spec.kind
    opts = _options(spec)
    if spec.device:
        opts["choices"] = list(dict.fromkeys([*DEVICES, *_gpu_indices(), value]))
    return create_widget(value=value, annotation=annotation, name=spec.name,
                         label=label or spec.name.replace("_", " "), options=opts)


def known_device(name: str) -> str:
    """The Preferences' default device if it is a valid one, else auto (a hand-edited settings file)."""
    return name if name in DEVICES or str(name).startswith("cuda:") else "auto"


def _gpu_indices() -> list[str]:
    """``cuda:N`` for each GPU when there are several (torch is imported by the dock's jobs anyway)."""
    try:
        import torch

        n = torch.cuda.device_count()
    except Exception:  # no torch, or a broken driver: the plain names remain
        return []
    return [f"cuda:{i}" for i in range(n)] if n > 1 else []


class ConfigForm(Container):
    """Inputs for some fields of a config class; :meth:`config` validates and returns the config.

    Fields not shown keep the value of the base config (``set_config``).
    """

    def __init__(self, cls, fields: Sequence[str] | None = None, *, labels: dict[str, str] | None = None,
                 base=None):
        self._cls = cls
        self._base = cls() if base is None else base
        specs = field_specs(cls, fields)
        widgets = [field_widget(s, getattr(self._base, s.name), (labels or {}).get(s.name)) for s in specs]
        super().__init__(widgets=widgets, labels=True)
        self.margins = (0, 0, 0, 0)

    def config(self, **changes: Any):
        """The validated config from the inputs (``ConfigError`` names the field and its bounds)."""
        values = {w.name: w.value for w in self}
        values.update(changes)
        return self._base.replace(**values)

    def set_config(self, cfg) -> None:
        """Show ``cfg``; it is also the base for the fields the form does not show."""
        self._base = cfg
        for w in self:
            w.value = getattr(cfg, w.name)
