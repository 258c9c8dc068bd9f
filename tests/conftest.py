"""Shared fixtures. The device is a parameter: ``--device`` or ``COORDGATE_TEST_DEVICE`` (default cpu)."""

from __future__ import annotations

import os

import pytest


def pytest_configure(config):
    # This one test process both trains in-process (the engine tests) and hosts napari viewers (the widget
    # tests). With torch's CUDA build, the first optimiser step imports triton, whose LLVM crashes a process in
    # which Mesa's LLVM is already loaded (a viewer under Xvfb); loaded in the other order they coexist. Users
    # never meet this: the viewer trains in a separate process (napari_coordgate.isolate), and
    # tests/_widgets/test_training_process.py checks that in a fresh viewer process where nothing is preloaded.
    try:
        import triton  # noqa: F401
    except ImportError:  # the CPU build of torch has no triton
        pass


def pytest_addoption(parser):
    parser.addoption(
        "--device",
        default=os.environ.get("COORDGATE_TEST_DEVICE", "cpu"),
        help="torch device for device-parametrised tests (cpu, cuda, mps)",
    )


@pytest.fixture
def device(request):
    import torch

    name = request.config.getoption("--device")
    if name.startswith("cuda") and not torch.cuda.is_available():
        pytest.skip("CUDA requested but not available")
    if name == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        pytest.skip("MPS requested but not available")
    return torch.device(name)


@pytest.fixture(autouse=True)
def _seed_torch():
    """Every test starts from the same torch RNG state and a single thread (deterministic, no stalls)."""
    try:
        import torch
    except ImportError:  # pragma: no cover
        yield
        return
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _widget_unavailable_reason() -> str | None:
    """Why napari/Qt widget tests cannot run here, or None when they can."""
    import importlib.util
    import sys

    if not any(importlib.util.find_spec(b) for b in ("PyQt6", "PySide6", "PyQt5", "PySide2")):
        return "no Qt binding installed (pip install 'napari-coordgate[testing]')"
    if sys.platform.startswith("linux") and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        return (
            "no display: install Xvfb so pytest-xvfb can start one (Debian: xvfb xauth libgl1-mesa-dri libegl1 "
            "libxkbcommon-x11-0 libxcb-icccm4 libxcb-keysyms1 libxcb-xinerama0 libxcb-cursor0 libdbus-1-3)"
        )
    return None


def pytest_collection_modifyitems(config, items):
    # Runs after pytest-xvfb has started Xvfb (it sets DISPLAY in pytest_configure). Skipping here, at
    # collection, keeps Qt from ever creating an application without a display (which aborts the process).
    widget_items = [it for it in items if "_widgets" in it.nodeid.split("::")[0]]
    for it in widget_items:
        it.add_marker(pytest.mark.widgets)
    reason = _widget_unavailable_reason() if widget_items else None
    if reason is None:
        return
    if os.environ.get("COORDGATE_REQUIRE_WIDGETS") == "1":
        raise pytest.UsageError(f"widget tests are required here (COORDGATE_REQUIRE_WIDGETS=1) but {reason}")
    for it in widget_items:
        it.add_marker(pytest.mark.skip(reason=f"widget test skipped: {reason}"))


@pytest.fixture
def kill_jobs():
    """A function that SIGKILLs this test process's napari_coordgate job processes (not Xvfb or others);
    returns how many it killed."""
    psutil = pytest.importorskip("psutil")
    import signal

    def kill() -> int:
        jobs = [p for p in psutil.Process().children(recursive=True)
                if any("napari_coordgate.isolate" in part for part in p.cmdline())]
        for p in jobs:
            os.kill(p.pid, signal.SIGKILL)
        return len(jobs)

    return kill
