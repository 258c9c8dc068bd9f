"""Shared fixtures. The device is a parameter: ``--device`` or ``COORDGATE_TEST_DEVICE`` (default cpu).

``fake_psf`` is a PSF model of another kind than the pupil model (a grid of Gaussians with an array in its record),
so the consumers of the PSF-model interface are tested with more than one implementation.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from napari_coordgate.optics.psfmodel import PSFModel, register_psf_model


def pytest_configure(config):
    # This one test process both trains in-process (the engine tests) and hosts napari viewers (the widget
    # tests). With torch's CUDA build, the first optimiser step imports triton, whose LLVM crashes a process in
    # which Mesa's LLVM is already loaded (a viewer under Xvfb); loaded in the other order they coexist. Users
    # never meet this: the viewer trains in a separate process (napari_coordgate.runners.isolate), and
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
                if any("napari_coordgate.runners.isolate" in part for part in p.cmdline())]
        for p in jobs:
            os.kill(p.pid, signal.SIGKILL)
        return len(jobs)

    return kill


@register_psf_model
class GaussianGridPSF(PSFModel):
    """A tiny PSF model that is not the pupil model, for tests: a round Gaussian at each node of a K x K grid, its
    width interpolated bilinearly between nodes. Its record carries an array (the widths), like a measured model's.
    """

    kind = "test_gaussian_grid"

    def __init__(self, sigmas, psf_size: int = 9, name: str = "fake"):
        sig = np.asarray(sigmas, dtype=np.float64)
        if sig.ndim != 2 or sig.shape[0] != sig.shape[1] or not (np.isfinite(sig).all() and (sig > 0).all()):
            raise ValueError(f"sigmas must be a (K, K) array of positive numbers, got shape {sig.shape}")
        if isinstance(psf_size, bool) or not isinstance(psf_size, int) or psf_size < 3 or psf_size % 2 == 0:
            raise ValueError(f"psf_size must be an odd integer >= 3, got {psf_size!r}")
        self.sigmas, self._size, self._name = sig, psf_size, name

    @property
    def name(self) -> str:
        return self._name

    @property
    def psf_size(self) -> int:
        return self._size

    @property
    def grid(self) -> int:
        return self.sigmas.shape[0]

    def psfs_at(self, y, x, field_shape=None):
        y, x = np.broadcast_arrays(np.asarray(y, dtype=np.float64), np.asarray(x, dtype=np.float64))
        sigma = np.einsum("...i,ij,...j->...", _tent(y, self.grid), self.sigmas, _tent(x, self.grid))
        u = np.arange(self._size) - self._size // 2
        g = np.exp(-0.5 * (u[:, None] ** 2 + u[None, :] ** 2) / sigma[..., None, None] ** 2)
        return g / g.sum(axis=(-2, -1), keepdims=True)

    def binned(self, binning: int) -> "GaussianGridPSF":
        if binning == 1:
            return self
        size = -(-self._size // binning)
        return GaussianGridPSF(self.sigmas / binning, max(3, size + 1 - size % 2), self._name)

    def to_record(self):
        return {"kind": self.kind, "name": self._name, "psf_size": self._size}, {"sigmas": self.sigmas}

    @classmethod
    def from_record(cls, meta, arrays):
        if "sigmas" not in arrays:
            raise ValueError(f"a {cls.kind} record needs the array 'sigmas', got {sorted(arrays)}")
        return cls(arrays["sigmas"], meta.get("psf_size", 9), str(meta.get("name", "fake")))


def _tent(t: np.ndarray, k: int) -> np.ndarray:
    if k == 1:
        return np.ones(t.shape + (1,))
    nodes = np.linspace(-1.0, 1.0, k)
    w = np.maximum(0.0, 1.0 - np.abs(np.clip(t, -1, 1)[..., None] - nodes) * (k - 1) / 2.0)
    return w / w.sum(axis=-1, keepdims=True)


@pytest.fixture
def fake_psf() -> GaussianGridPSF:
    """A 3 x 3 grid-of-Gaussians PSF model (9 px PSFs) that widens toward the right and the bottom."""
    return GaussianGridPSF([[0.8, 1.2, 1.8], [1.0, 1.4, 2.0], [1.2, 1.6, 2.4]], psf_size=9, name="fake beads")


@pytest.fixture(scope="session")
def pair64():
    """A 64 x 64 sharp/blurred pair with the gaussian preset."""
    from napari_coordgate.optics.blur import SpatiallyVaryingBlur
    from napari_coordgate.samples.specimens import procedural_specimen

    sharp = procedural_specimen((64, 64), seed=3)
    blurred = SpatiallyVaryingBlur("gaussian", (64, 64)).forward(sharp)
    return sharp, blurred.astype(np.float32)


@pytest.fixture(scope="session")
def tiny_model(pair64):
    """A depth-2 CoordGate model trained for a few steps on the 64 x 64 pair (trained once per session).

    Trained in a separate process, as the dock does: this process holds viewers (see napari_coordgate.runners.isolate).
    """
    from napari_coordgate import engine
    from napari_coordgate.config import ModelConfig, TrainConfig
    from napari_coordgate.runners.isolate import train_isolated

    result = train_isolated(ModelConfig(depth=2, channels=4), TrainConfig(crop=32, batch=2, epochs=1,
                            steps_per_epoch=3, device="cpu"), engine.PairSource(*pair64),
                            report=lambda u: None, should_stop=lambda: False)
    return result.saved


@pytest.fixture(scope="module")
def model():
    """An untrained CoordGate U-Net(2) on a 96 x 80 field (random weights: what the I/O and scale-out tests compare
    is equal outputs)."""
    import torch

    from napari_coordgate.config import ModelConfig
    from napari_coordgate.model_io import SavedModel
    from napari_coordgate.nn import build_model

    torch.manual_seed(0)
    cfg = ModelConfig(depth=2, channels=4, gate="coordgate")
    return SavedModel(build_model(cfg).eval(), cfg, (96, 80), {"offset": 100.0, "scale": 900.0})


@pytest.fixture
def model_file(model, tmp_path):
    """:func:`model` saved as ``scope.cgmodel``."""
    from napari_coordgate.model_io import save_model

    return save_model(tmp_path / "scope.cgmodel", model)


@pytest.fixture(scope="session")
def random_3d_model():
    """A factory of untrained, seeded 3-D CoordGate U-Net(2)s (random weights, none zero: tests compare equal
    outputs): ``random_3d_model(field, norm, z_step_um)`` -> SavedModel."""

    def make(field, norm, z_step_um):
        import torch

        from napari_coordgate.config import ModelConfig
        from napari_coordgate.model_io import SavedModel
        from napari_coordgate.nn import build_model

        torch.manual_seed(0)
        cfg = ModelConfig(ndim=3, depth=2, channels=4, gate="coordgate")
        net = build_model(cfg)
        with torch.no_grad():
            for p in net.parameters():
                p.normal_(0.0, 0.2)
        return SavedModel(net.eval(), cfg, field, norm, z_step_um=z_step_um)

    return make
