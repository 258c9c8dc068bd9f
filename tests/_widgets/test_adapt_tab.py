"""The Train tab's *Adapt to these images*: the current model fine-tuned on a blurred layer in the training process,
the numbers named for what they are, the original kept when adapting does not help."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import wait_idle
from test_dock import _notifications

from napari_coordgate.app.state import State
from napari_coordgate.config import AdaptConfig

PSF = "gaussian"


def _model(psf=PSF):
    import torch

    from napari_coordgate.config import ModelConfig
    from napari_coordgate.data import Normalization
    from napari_coordgate.model_io import SavedModel
    from napari_coordgate.nn import build_model

    torch.manual_seed(0)
    cfg = ModelConfig(depth=2, channels=4, gate="coordgate", gate_hidden=8)
    return SavedModel(build_model(cfg).eval(), cfg, (64, 64), Normalization(0.0, 1.0, (1.0, 99.8)), psf=psf)


@pytest.fixture(scope="module")
def blurred():
    from scipy.ndimage import gaussian_filter

    from napari_coordgate.optics.blur import synthesize_pairs

    rng = np.random.default_rng(0)
    sharp = gaussian_filter(rng.random((2, 64, 64)), (0, 1.0, 1.0))
    sharp = (sharp - sharp.min()) / np.ptp(sharp)
    return synthesize_pairs(sharp * 2000 + 100, PSF, photons=500, seed=0)[1].astype(np.float32)


def _quick(monkeypatch, tab, **kw):
    """A budget of seconds: the recipe of tests/engine/test_adaptation.py (it beats the original in 3 epochs)."""
    cfg = AdaptConfig(**{**dict(epochs=3, steps_per_epoch=6, crop=32, batch=2, val_tile=8, device="cpu", lr=3e-3,
                                seed=0, threads=1), **kw})
    monkeypatch.setattr(tab, "adapt_config", lambda: cfg)


def _watch(monkeypatch, dock):
    """(status line, adapt enabled, stop enabled) after each Update the tab shows."""
    t, seen = dock.train_tab, []
    shown = t.on_update

    def on_update(u):
        shown(u)
        seen.append((dock.status.text(), t.adapt_btn.isEnabled(), t.stop_btn.isEnabled()))

    monkeypatch.setattr(t, "on_update", on_update)
    return seen


def test_the_adapt_form_builds_the_adapt_config_on_the_training_device(viewer_dock, blurred):
    viewer, dock = viewer_dock
    t = dock.train_tab
    t.device.value = "cpu"
    assert t.adapt_config() == AdaptConfig(device="cpu"), "the defaults of config.py: gain and offset not given"
    t.adapt_form.minutes.value, t.camera_form.gain.value, t.camera_form.offset.value = 0.5, 2.0, 100.0
    assert t.adapt_config() == AdaptConfig(minutes=0.5, device="cpu"), "the camera is known only when ticked"
    t.camera.setChecked(True)
    assert t.adapt_config() == AdaptConfig(minutes=0.5, gain=2.0, offset=100.0, device="cpu")
    seen = _notifications()
    t.camera_form.offset.value = t.camera_form.offset.min  # "not given": a gain without an offset is refused
    viewer.add_image(blurred, name="blurred")
    dock.set_model(_model(), "test")
    t.adapt_btn.click()
    assert dock.runner.task is None and any("gain and offset together" in m for m in seen)


def test_the_images_to_adapt_to_default_to_the_blurred_layer_until_the_user_picks(viewer_dock):
    viewer, dock = viewer_dock
    viewer.open_sample("napari-coordgate", "calibration_pair")  # the sharp layer comes first
    t = dock.train_tab
    assert t.adapt_layer.currentText() == "calibration (blurred)"
    t.adapt_layer.setCurrentText("calibration (sharp)")
    t.adapt_layer.activated.emit(t.adapt_layer.currentIndex())  # as a pick in the combo does
    viewer.add_image(np.zeros((8, 8)), name="more blurred")
    assert t.adapt_layer.currentText() == "calibration (sharp)"


def test_adapt_without_a_model_says_to_train_or_load_one_and_starts_nothing(viewer_dock, blurred):
    viewer, dock = viewer_dock
    seen = _notifications()
    viewer.add_image(blurred, name="blurred")
    t = dock.train_tab
    assert t.adapt_btn.isEnabled()
    t.adapt_btn.click()
    assert dock.runner.task is None and dock.state is State.IDLE
    assert any("no model to adapt" in m and "load" in m for m in seen)


def test_a_model_without_a_psf_model_is_refused_before_anything_starts(viewer_dock, blurred):
    viewer, dock = viewer_dock
    seen = _notifications()
    viewer.add_image(blurred, name="blurred")
    dock.set_model(_model(psf=None), "pairs")
    dock.train_tab.adapt_btn.click()
    assert dock.runner.task is None and dock.state is State.IDLE
    assert any("carries no PSF model" in m for m in seen)


def test_adapting_sets_the_docks_model_and_names_the_held_out_criterion(viewer_dock, qtbot, blurred, monkeypatch):
    viewer, dock = viewer_dock
    seen = _notifications()
    viewer.add_image(blurred, name="my cells")
    original = _model()
    dock.set_model(original, "scope.cgmodel")
    t = dock.train_tab
    t.adapt_layer.setCurrentText("my cells")
    _quick(monkeypatch, t)
    shown = _watch(monkeypatch, dock)
    t.adapt_btn.click()
    wait_idle(qtbot, dock)
    result = dock.last_result
    assert result.stopped == "budget" and not result.kept_original, dock.status.text()
    assert dock.model is result.saved and dock.model is not original
    origin = dock.model_origin
    assert origin.startswith("adapted in this session to 'my cells'") and origin.endswith("from scope.cgmodel")
    statuses = [s for s, _, _ in shown]
    assert statuses and all(s.startswith("adapt:") and "over the original" in s for s in statuses)
    assert not any("PSNR" in s for s in statuses)
    assert all(not adapt and stop for _, adapt, stop in shown), "adapting: only Stop is enabled"
    assert t.plot.ax2.get_ylabel() == "held-out (dB)" and "PSNR" not in t.plot.ax.get_ylabel()
    qtbot.waitUntil(lambda: any("adapted to 'my cells'" in m for m in seen), timeout=5000)
    message = next(m for m in seen if "adapted to 'my cells'" in m)
    assert "held-out consistency +" in message and "noise: variance" in message
    assert t.adapt_btn.isEnabled() and t.start_btn.isEnabled()


def test_when_adapting_does_not_help_the_original_model_is_kept_and_the_user_told(viewer_dock, qtbot, blurred,
                                                                                    monkeypatch):
    viewer, dock = viewer_dock
    seen = _notifications()
    viewer.add_image(blurred[0], name="one plane")
    original = _model()
    dock.set_model(original, "scope.cgmodel")
    t = dock.train_tab
    t.adapt_layer.setCurrentText("one plane")
    _quick(monkeypatch, t, epochs=1, lr=1e-7)
    t.adapt_btn.click()
    wait_idle(qtbot, dock)
    assert dock.last_result.kept_original
    assert dock.model is original and dock.model_origin == "scope.cgmodel"
    qtbot.waitUntil(lambda: any("original model is kept" in m for m in seen), timeout=5000)
