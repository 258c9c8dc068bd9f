import subprocess
import sys
from pathlib import Path

import pytest


def test_import_does_not_pull_torch_or_qt():
    code = (
        "import sys, napari_coordgate; "
        "bad = [m for m in ('torch', 'PyQt6', 'PyQt5', 'PySide6', 'qtpy', 'napari') if m in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_config_and_modelio_import_without_torch():
    code = (
        "import sys, napari_coordgate.config, napari_coordgate.model_io; "
        "sys.exit(1 if 'torch' in sys.modules else 0)"
    )
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_manifest_is_valid_and_found_through_the_package():
    npe2 = pytest.importorskip("npe2")
    manifest = npe2.PluginManifest.from_distribution("napari-coordgate")
    assert manifest.name == "napari-coordgate"
    packaged = Path(__file__).parents[1] / "src" / "napari_coordgate" / "napari.yaml"
    # one source of truth, a real file (a symlink breaks Windows checkouts without symlink support)
    assert packaged.is_file() and not packaged.is_symlink()
    assert not (Path(__file__).parents[1] / "napari.yaml").exists(), "a second copy of the manifest"


def test_every_manifest_command_resolves_to_a_callable():
    npe2 = pytest.importorskip("npe2")
    manifest = npe2.PluginManifest.from_distribution("napari-coordgate")
    import importlib

    for cmd in manifest.contributions.commands or []:
        module, _, attr = cmd.python_name.partition(":")
        assert callable(getattr(importlib.import_module(module), attr)), cmd.python_name
