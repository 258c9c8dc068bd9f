"""Adaptation in a separate process (napari_coordgate.runners.isolate.adapt_isolated): the adapted model comes back
as a file, Stop keeps the best state, a killed process keeps the best model written, the job's errors cross whole."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from napari_coordgate import engine
from napari_coordgate.config import AdaptConfig, ModelConfig
from napari_coordgate.data import InputError, Normalization
from napari_coordgate.model_io import SavedModel
from napari_coordgate.nn import build_model
from napari_coordgate.optics.blur import synthesize_pairs
from napari_coordgate.runners import isolate

PSF = "gaussian"
TINY = ModelConfig(depth=2, channels=4, gate="coordgate", gate_hidden=8)


def _saved(psf=PSF):
    torch.manual_seed(0)
    return SavedModel(build_model(TINY).eval(), TINY, (64, 64), Normalization(0.0, 1.0, (1.0, 99.8)), psf=psf)


@pytest.fixture(scope="module")
def blurred():
    rng = np.random.default_rng(0)
    sharp = gaussian_filter(rng.random((2, 64, 64)), (0, 1.0, 1.0))
    sharp = (sharp - sharp.min()) / np.ptp(sharp)
    return synthesize_pairs(sharp * 2000 + 100, PSF, photons=500, seed=0)[1]


def _cfg(**kw):
    # the recipe of tests/engine/test_adaptation.py, which beats the original within 3 epochs
    return AdaptConfig(**{**dict(epochs=3, steps_per_epoch=6, crop=32, batch=2, val_tile=8, device="cpu", lr=3e-3,
                                 seed=0, threads=1), **kw})


def _weights(saved):
    return torch.cat([p.detach().flatten() for p in saved.model.state_dict().values()])


def _improved(u) -> bool:
    return u.kind == "epoch" and u.best_val_psnr > u.input_psnr


def test_adaptation_in_a_process_returns_the_adapted_model_and_relays_every_update(blurred):
    updates = []
    original = _saved()
    result = isolate.adapt_isolated(original, blurred, _cfg(), report=updates.append, should_stop=lambda: False)
    assert result.stopped == "budget" and not result.kept_original
    assert result.criterion_best < result.criterion_before and result.noise is not None
    assert [u.kind for u in updates].count("epoch") == 3 and updates[-1].kind == "done"
    assert result.history == updates
    here = engine.adapt(_saved(), blurred, _cfg())  # the same seed in this process: the same weights
    assert torch.equal(_weights(result.saved), _weights(here.saved))
    assert result.saved.provenance["adaptations"][-1]["steps"] == result.steps == 18


def test_when_adaptation_does_not_help_the_callers_own_model_is_kept(blurred):
    original = _saved()
    result = isolate.adapt_isolated(original, blurred, _cfg(lr=1e-7, epochs=1), report=lambda u: None,
                                    should_stop=lambda: False)
    assert result.kept_original and result.saved is original
    assert result.criterion_best == result.criterion_before


def test_a_model_without_a_psf_model_is_refused_with_the_engines_error(blurred):
    with pytest.raises(InputError, match="carries no PSF model"):
        isolate.adapt_isolated(_saved(psf=None), blurred, _cfg(), report=lambda u: None, should_stop=lambda: False)


def test_stop_ends_the_process_and_keeps_the_best_state(blurred):
    epochs = []
    result = isolate.adapt_isolated(_saved(), blurred, _cfg(epochs=100_000),
                                    report=lambda u: epochs.append(u) if u.kind == "epoch" else None,
                                    should_stop=lambda: len(epochs) >= 2)
    assert result.stopped == "stopped" and result.steps < 100
    assert result.criterion_best <= result.criterion_before


def test_a_killed_process_returns_the_best_adapted_model_written_with_the_reason(blurred, kill_jobs):
    seen = []

    def report(u):
        seen.append(u)
        if _improved(u) and sum(map(_improved, seen)) == 1:  # that state is on disk before its update is sent
            assert kill_jobs() == 1

    result = isolate.adapt_isolated(_saved(), blurred, _cfg(epochs=20), report=report, should_stop=lambda: False)
    assert result.stopped.startswith("crashed") and "SIGKILL" in result.stopped
    assert not result.kept_original and result.noise is None
    best = next(u for u in seen if _improved(u))
    assert result.criterion_best == pytest.approx(10 ** (-best.best_val_psnr / 10))
    assert result.criterion_best < result.criterion_before
    assert np.isfinite(engine.predict(result.saved, blurred[0], device="cpu")).all()


def test_a_process_killed_before_any_state_beat_the_original_gives_a_clear_error(blurred, kill_jobs):
    with pytest.raises(isolate.IsolationError, match="died .*SIGKILL.* before any state beat the original"):
        isolate.adapt_isolated(_saved(), blurred, _cfg(epochs=20), report=lambda u: kill_jobs(),
                               should_stop=lambda: False)
