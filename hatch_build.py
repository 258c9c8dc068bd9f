"""Hatch build hook: the plugin manifest is kept by hand at the top level (``napari.yaml``); the installed package
must carry it as ``napari_coordgate/napari.yaml``, which is where the entry point ``napari_coordgate:napari.yaml``
tells npe2 to look.

- A wheel gets the top-level file mapped into the package (``force_include``).
- An editable install imports the package from ``src/``, so the hook writes a copy to
  ``src/napari_coordgate/napari.yaml`` (git-ignored; rewritten only when it differs). Edit the top-level file and
  reinstall (``pip install -e .``); ``tests/test_package.py`` fails while the two differ.
"""

from __future__ import annotations

from pathlib import Path

from hatchling.builders.hooks.plugin.interface import BuildHookInterface

MANIFEST = "napari.yaml"
PACKAGED = "napari_coordgate/napari.yaml"


class ManifestHook(BuildHookInterface):
    PLUGIN_NAME = "custom"

    def initialize(self, version: str, build_data: dict) -> None:
        source = Path(self.root) / MANIFEST
        if not source.is_file():
            raise FileNotFoundError(f"{source} is missing: the plugin manifest is kept at the repository's top level")
        if version == "editable":
            copy = Path(self.root) / "src" / PACKAGED
            text = source.read_bytes()
            if not copy.is_file() or copy.is_symlink() or copy.read_bytes() != text:
                copy.unlink(missing_ok=True)
                copy.write_bytes(text)
        else:
            build_data["force_include"][str(source)] = PACKAGED
