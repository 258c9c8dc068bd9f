import shutil
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


def test_manifest_is_valid_and_the_installed_one_equals_the_top_level_source():
    npe2 = pytest.importorskip("npe2")
    manifest = npe2.PluginManifest.from_distribution("napari-coordgate")
    assert manifest.name == "napari-coordgate"
    import napari_coordgate

    # napari.yaml at the top level is the one hand-kept copy (a real file: a symlink breaks Windows checkouts
    # without symlink support); the build (hatch_build.py) puts it into the package, where npe2 reads it
    source = Path(__file__).parents[1] / "napari.yaml"
    installed = Path(napari_coordgate.__file__).parent / "napari.yaml"
    assert source.is_file() and not source.is_symlink()
    assert installed.is_file() and not installed.is_symlink()
    assert installed.read_bytes() == source.read_bytes(), (
        f"{installed} differs from {source}: reinstall (pip install -e .) after editing the top-level napari.yaml"
    )


def test_manifest_copy_in_src_is_git_ignored():
    root = Path(__file__).parents[1]
    if not (root / ".git").exists() or shutil.which("git") is None:
        pytest.skip("not a git checkout, or no git")
    copy = "src/napari_coordgate/napari.yaml"
    result = subprocess.run(["git", "check-ignore", "-q", copy], cwd=root)
    assert result.returncode == 0, f"{copy} (written by an editable install) must be git-ignored"
    tracked = subprocess.run(["git", "ls-files", "--error-unmatch", copy], cwd=root, capture_output=True)
    assert tracked.returncode != 0, f"{copy} is tracked: the top-level napari.yaml is the only hand-kept copy"


def test_every_manifest_command_resolves_to_a_callable():
    npe2 = pytest.importorskip("npe2")
    manifest = npe2.PluginManifest.from_distribution("napari-coordgate")
    import importlib

    for cmd in manifest.contributions.commands or []:
        module, _, attr = cmd.python_name.partition(":")
        assert callable(getattr(importlib.import_module(module), attr)), cmd.python_name
