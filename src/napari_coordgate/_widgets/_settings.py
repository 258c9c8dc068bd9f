"""Plugin settings (napari Preferences, from the manifest's ``configurations``), with a per-dock fallback."""

from __future__ import annotations

from pathlib import Path
from types import MappingProxyType

PLUGIN = "napari-coordgate"
DEFAULTS = MappingProxyType({"device": "auto", "tile": 0, "model_folder": ""})


def _section():
    from napari.settings import get_plugin_settings

    return get_plugin_settings(PLUGIN).defaults


def read_settings() -> dict:
    """The user's defaults; the built-in ones where this napari has no plugin settings."""
    try:
        section = _section()
        return {key: getattr(section, key) for key in DEFAULTS}
    except Exception:  # napari without plugin configurations, or the plugin not registered
        return dict(DEFAULTS)


def remember_folder(settings: dict, path: str) -> None:
    """Keep the folder of a chosen model file for the next dialog (persisted where napari supports it)."""
    folder = str(Path(path).parent)
    settings["model_folder"] = folder
    try:
        _section().model_folder = folder
    except Exception:
        pass  # the dock still remembers it for this session
