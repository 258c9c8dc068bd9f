"""Dock inputs generated from the configs through magicgui: one widget per config field, with the field's type,
bounds or choices, default and help from ``config.py`` (the single source of every option), so a default or a
range cannot diverge from the CLI's again."""

from __future__ import annotations

from typing import Any, Sequence

from magicgui.widgets import Container, create_widget

from napari_coordgate.config import DEVICES, field_specs

_INT_MAX = 2**31 - 1
NOT_GIVEN = "not given"  # what an optional number's spin box shows at its minimum


def _default_step(spec) -> float:
    if spec.step is not None:
        return spec.step
    if spec.kind is int:
        return 1
    return 10 ** (len(str(spec.default).split(".")[-1]) * -1) if spec.default else 0.1


def _decimals(*values: float) -> int:
    """Decimals that show each of ``values`` (up to 6)."""
    return max(len(f"{abs(v):.6f}".rstrip("0").split(".")[1]) for v in values)


def _options(spec) -> dict[str, Any]:
    opts: dict[str, Any] = {"tooltip": spec.help}
    if spec.options is not None:
        opts["choices"] = list(spec.options)
    elif spec.kind in (int, float):
        step = _default_step(spec)
        lo = spec.lo if spec.lo is not None else -_INT_MAX
        hi = spec.hi if spec.hi is not None else _INT_MAX
        if spec.optional:  # one step below the lowest value stands for "not given"
            lo -= step
        opts["min"], opts["max"] = lo, min(hi, _INT_MAX)
        if spec.kind is float or spec.optional:
            opts["step"] = step
    return opts


def field_widget(spec, value: Any = None, label: str | None = None):
    """A magicgui widget for one config field (a :class:`~napari_coordgate.config.FieldSpec`).

    An optional number (default None) is a spin box whose minimum, one step below the field's lowest value, reads
    :data:`NOT_GIVEN` and stands for None (:func:`widget_value`).
    """
    value = spec.default if value is None and not spec.optional else value
    annotation = str if spec.options is not None else spec.kind
    opts = _options(spec)
    if spec.device:
        opts["choices"] = list(dict.fromkeys([*DEVICES, *_gpu_indices(), value]))
    label = label or spec.name.replace("_", " ")
    if not (spec.optional and spec.kind in (int, float)):
        return create_widget(value=value, annotation=annotation, name=spec.name, label=label, options=opts)
    # a QDoubleSpinBox (whole numbers for an int): Qt shows its special text at the minimum; the int spin box
    # magicgui uses for int does not
    widget = create_widget(value=opts["min"], annotation=float, name=spec.name, label=label, options=opts,
                           widget_type="FloatSpinBox")
    native = widget.native
    native.setDecimals(0 if spec.kind is int else _decimals(opts["step"], spec.lo or 0.0))
    native.setRange(opts["min"], opts["max"])
    native.setSpecialValueText(NOT_GIVEN)
    widget.value = opts["min"] if value is None else value
    return widget


def widget_value(spec, widget) -> Any:
    """The config value a field's widget holds: None for an optional number at its minimum, an int for an int."""
    value = widget.value
    if spec.optional and spec.kind in (int, float):
        if value <= widget.min:
            return None
        return int(round(value)) if spec.kind is int else float(value)
    return value


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
        self._specs = {s.name: s for s in specs}
        widgets = [field_widget(s, getattr(self._base, s.name), (labels or {}).get(s.name)) for s in specs]
        super().__init__(widgets=widgets, labels=True)
        self.margins = (0, 0, 0, 0)

    def config(self, **changes: Any):
        """The validated config from the inputs (``ConfigError`` names the field and its bounds)."""
        values = {w.name: widget_value(self._specs[w.name], w) for w in self}
        values.update(changes)
        return self._base.replace(**values)

    def set_config(self, cfg) -> None:
        """Show ``cfg``; it is also the base for the fields the form does not show."""
        self._base = cfg
        for w in self:
            value = getattr(cfg, w.name)
            w.value = w.min if value is None else value
