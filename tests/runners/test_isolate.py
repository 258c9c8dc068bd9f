"""Jobs in a separate process (napari_coordgate.runners.isolate): results, progress, stop, errors, a killed process."""

from __future__ import annotations

import errno

import numpy as np
import pytest

from napari_coordgate import engine
from napari_coordgate.config import ModelConfig, TrainConfig
from napari_coordgate.data import InputError
from napari_coordgate.optics.blur import SpatiallyVaryingBlur
from napari_coordgate.runners import isolate
from napari_coordgate.samples.specimens import procedural_specimen


@pytest.fixture(scope="module")
def pair():
    sharp = procedural_specimen((64, 64), seed=5)
    return sharp, SpatiallyVaryingBlur("gaussian", (64, 64)).forward(sharp).astype(np.float32)


def _tiny(epochs=2, steps=3):
    return ModelConfig(depth=1, channels=2), TrainConfig(crop=32, batch=2, epochs=epochs, steps_per_epoch=steps,
                                                         device="cpu", threads=1)


def test_training_in_a_process_returns_the_model_and_relays_every_update(pair):
    updates = []
    result = isolate.train_isolated(*_tiny(), engine.PairSource(*pair), report=updates.append,
                                    should_stop=lambda: False)
    assert result.stopped == "budget" and result.saved is not None
    assert [u.kind for u in updates].count("epoch") == 2 and updates[-1].kind == "done"
    assert result.history == updates
    assert result.best_val_psnr == max(u.val_psnr for u in updates if u.kind == "epoch")
    assert result.input_val_psnr == updates[-1].input_psnr is not None  # what tells a stalled run (stall_message)
    out = engine.predict(result.saved, pair[1], device="cpu")
    assert out.shape == (64, 64) and np.isfinite(out).all()


def test_same_seed_in_a_process_gives_the_same_weights_as_in_this_process(pair):
    model_cfg, train_cfg = _tiny()
    here = engine.train(model_cfg, train_cfg, engine.PairSource(*pair))
    there = isolate.train_isolated(model_cfg, train_cfg, engine.PairSource(*pair), report=lambda u: None,
                                   should_stop=lambda: False)
    a, b = here.saved.model.state_dict(), there.saved.model.state_dict()
    assert all(np.array_equal(a[k].numpy(), b[k].numpy()) for k in a)


def test_stop_ends_the_process_and_keeps_the_best_model(pair):
    epochs = []
    result = isolate.train_isolated(*_tiny(epochs=100_000, steps=2), engine.PairSource(*pair),
                                    report=lambda u: epochs.append(u) if u.kind == "epoch" else None,
                                    should_stop=lambda: len(epochs) >= 2)
    assert result.stopped == "stopped" and result.saved is not None
    assert result.best_val_psnr == max(u.val_psnr for u in epochs)


def test_a_killed_training_process_returns_the_best_model_so_far_with_the_reason(pair, kill_jobs):
    epochs = []

    def report(u):
        if u.kind == "epoch":
            epochs.append(u)
            if len(epochs) == 2:  # the child has written its best model by now: kill it mid-run
                assert kill_jobs() == 1

    result = isolate.train_isolated(*_tiny(epochs=100_000, steps=2), engine.PairSource(*pair), report=report,
                                    should_stop=lambda: False)
    assert result.stopped.startswith("crashed") and "SIGKILL" in result.stopped
    assert result.saved is not None and result.best_val_psnr == max(u.val_psnr for u in epochs)
    assert np.isfinite(engine.predict(result.saved, pair[1], device="cpu")).all()
    assert result.input_val_psnr == epochs[-1].input_psnr is not None


def test_a_process_killed_before_its_first_model_gives_a_clear_error(pair, kill_jobs):

    def report(u):
        kill_jobs()

    with pytest.raises(isolate.IsolationError, match="died .*SIGKILL.* before it saved a model"):
        isolate.train_isolated(*_tiny(epochs=100_000, steps=50), engine.PairSource(*pair), report=report,
                               should_stop=lambda: False)


def test_an_error_inside_the_process_is_raised_here_with_its_type_and_message(pair):
    with pytest.raises(InputError, match="same shape"):
        isolate.train_isolated(*_tiny(), engine.PairSource(pair[0], pair[1][:48]), report=lambda u: None,
                               should_stop=lambda: False)


def test_no_space_for_the_temporary_files_is_a_clear_error_and_leaves_nothing(pair, monkeypatch, tmp_path):
    monkeypatch.setattr(isolate.tempfile, "tempdir", str(tmp_path))

    def full_disk(arr, path):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(isolate, "_write_array", full_disk)
    with pytest.raises(isolate.IsolationError, match="cannot write its temporary files.*No space left"):
        isolate.train_isolated(*_tiny(), engine.PairSource(*pair), report=lambda u: None, should_stop=lambda: False)
    assert list(tmp_path.iterdir()) == []


def test_large_and_lazy_arrays_travel_as_memory_mapped_files(tmp_path):
    da = pytest.importorskip("dask.array")
    big = np.arange(3 * 128 * 128, dtype=np.uint16).reshape(3, 128, 128)
    lazy = da.from_array(big[::-1].copy(), chunks=(1, 128, 128))
    small = np.ones(4)
    isolate._write_job(tmp_path, (engine.PairSource(big, lazy),), {"small": small})
    (source,), kwargs = isolate._read_job(tmp_path)
    assert isinstance(source.sharp, np.memmap) and isinstance(source.blurred, np.memmap)
    np.testing.assert_array_equal(source.sharp, big)
    np.testing.assert_array_equal(source.blurred, big[::-1])
    assert not isinstance(kwargs["small"], np.memmap) and len(list(tmp_path.glob("*.npy"))) == 2


class _NeedsTwo(ValueError):
    def __init__(self, a, b):
        super().__init__(f"{a} and {b}")


def test_an_exception_crosses_whole_where_it_can_else_as_its_type_or_its_text():
    import pickle

    from napari_coordgate.calibration import CalibrationError
    from napari_coordgate.calibration.detect import find_beads

    table, _, _ = find_beads(np.random.default_rng(0).normal(100, 2, (32, 32)))
    whole = isolate.portable_exception(CalibrationError("too few beads", beads=table, field_shape=(32, 32)))
    back = pickle.loads(pickle.dumps(whole))
    assert back.beads is not None and len(back.beads) == len(table) and back.field_shape == (32, 32)
    odd = ValueError("bad")
    odd.callback = lambda: None  # does not pickle: the type and message still do
    plain = isolate.portable_exception(odd)
    assert type(plain) is ValueError and str(plain) == "bad" and not hasattr(plain, "callback")
    odder = _NeedsTwo("a", "b")
    odder.callback = lambda: None  # does not pickle, nor can its type be rebuilt from its message: its text does
    text = isolate.portable_exception(odder)
    assert type(text) is RuntimeError and str(text) == "_NeedsTwo: a and b"
