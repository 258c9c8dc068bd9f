"""Engine: training from a PSF model validates on held-out sharp images (``SimulatedSource(val_sharp=...)``) that
never train, each with noise drawn once per run; the fingerprint and resume account for them."""

import numpy as np
import pytest
import torch
from engine_helpers import TINY, _quick

from napari_coordgate.data import InputError
from napari_coordgate.engine import SimulatedSource, load_checkpoint, train
from napari_coordgate.engine.trainingdata import TrainingData
from napari_coordgate.samples.specimens import TRAIN_SOURCES, specimen_fields, validation_fields

SHAPE = (64, 64)


def _train_sharp(n=4, seed=0):
    return specimen_fields(n, SHAPE, seed=seed, sources=TRAIN_SOURCES)


def _data(source, **kw):
    return TrainingData.from_source(source, TINY, _quick(**kw))


def test_every_sharp_plane_trains_and_only_the_held_out_planes_validate():
    sharp, val = _train_sharp(), validation_fields(SHAPE, 3)
    data = _data(SimulatedSource(sharp, "gaussian", val_sharp=val))

    assert list(data.train_idx) == [0, 1, 2, 3] and list(data.val_idx) == [4, 5, 6]
    assert data.val_mask is None
    # by content: the validation planes are the held-out images, the training planes the given ones
    assert all(np.array_equal(data.sharp_plane(int(i)), v) for i, v in zip(data.val_idx, val))
    assert all(np.array_equal(data.sharp_plane(int(i)), s) for i, s in zip(data.train_idx, sharp))
    trained = [data.sharp_plane(int(i)) for i in data.train_idx]
    assert not any(np.allclose(data.sharp_plane(int(i)), t, atol=1e-2) for i in data.val_idx for t in trained)


def test_without_held_out_planes_the_last_eighth_of_the_sharp_planes_validates_as_before():
    data = _data(SimulatedSource(_train_sharp(9), "gaussian"))
    assert list(data.train_idx) == list(range(8)) and list(data.val_idx) == [8] and data.held_out == 0


def test_the_held_out_planes_never_reach_the_weights():
    sharp = _train_sharp()
    a = train(TINY, _quick(epochs=1), SimulatedSource(sharp, "gaussian", val_sharp=validation_fields(SHAPE, 2)))
    b = train(TINY, _quick(epochs=1), SimulatedSource(sharp, "gaussian", val_sharp=validation_fields(SHAPE, 3)[1:]))

    wa, wb = a.saved.model.state_dict(), b.saved.model.state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert a.best_val_psnr != b.best_val_psnr  # validation did read the other planes
    assert a.saved.normalization == b.saved.normalization  # fitted on the training planes only


def test_the_held_out_planes_keep_their_noise_every_epoch_and_the_training_planes_get_fresh_noise():
    data = _data(SimulatedSource(_train_sharp(), "gaussian", val_sharp=validation_fields(SHAPE, 2)))
    data.start(data.fit_normalization(), noise_seed=7)
    first = [data.blurred_plane(i).copy() for i in range(data.n)]
    data.new_epoch(1)

    assert all(np.array_equal(data.blurred_plane(int(i)), first[i]) for i in data.val_idx)
    assert not any(np.array_equal(data.blurred_plane(int(i)), first[i]) for i in data.train_idx)
    again = _data(SimulatedSource(_train_sharp(), "gaussian", val_sharp=validation_fields(SHAPE, 2)))
    again.start(again.fit_normalization(), noise_seed=7)  # what a resumed run does: the same seed, the same noise
    assert all(np.array_equal(again.blurred_plane(int(i)), first[i]) for i in again.val_idx)
    other = _data(SimulatedSource(_train_sharp(), "gaussian", val_sharp=validation_fields(SHAPE, 2)))
    other.start(other.fit_normalization(), noise_seed=8)  # another run: other noise
    assert not np.array_equal(other.blurred_plane(int(other.val_idx[0])), first[int(data.val_idx[0])])


def test_the_fingerprint_changes_with_the_held_out_planes():
    sharp, val = _train_sharp(), validation_fields(SHAPE, 3)
    prints = {
        "none": _data(SimulatedSource(sharp, "gaussian")),
        "val": _data(SimulatedSource(sharp, "gaussian", val_sharp=val)),
        "other val": _data(SimulatedSource(sharp, "gaussian", val_sharp=val[::-1])),
        "fewer": _data(SimulatedSource(sharp, "gaussian", val_sharp=val[:2])),
        # the same planes in one stack, split the old way: the same pixels, another split
        "one stack": _data(SimulatedSource(np.concatenate([sharp, val]), "gaussian")),
    }
    fingerprints = {k: d.fingerprint()["fingerprint"] for k, d in prints.items()}
    assert len(set(fingerprints.values())) == len(fingerprints)
    assert prints["val"].fingerprint() == _data(SimulatedSource(sharp, "gaussian", val_sharp=val)).fingerprint()
    assert prints["val"].fingerprint()["description"] == (
        "4 sharp plane(s) of 64x64 (and 3 held-out validation plane(s)) blurred with PSF model 'gaussian'")
    assert prints["none"].fingerprint()["description"] == "4 sharp plane(s) of 64x64 blurred with PSF model 'gaussian'"


def test_resume_refuses_other_held_out_planes(tmp_path):
    sharp, val = _train_sharp(), validation_fields(SHAPE, 2)
    ck = tmp_path / "run.cgckpt"
    train(TINY, _quick(epochs=1), SimulatedSource(sharp, "gaussian", val_sharp=val), checkpoint_path=ck)
    for other in (None, val[::-1]):
        with pytest.raises(InputError, match="trained on other data"):
            train(TINY, _quick(epochs=2), SimulatedSource(sharp, "gaussian", val_sharp=other), resume=ck)
    res = train(TINY, _quick(epochs=2), SimulatedSource(sharp, "gaussian", val_sharp=val), resume=ck)
    assert res.saved.provenance["training"]["epochs"] == 2
    assert load_checkpoint(ck)["meta"]["data"]["description"].startswith("4 sharp plane(s) of 64x64 (and 2 held-out")


@pytest.mark.parametrize("val, match", [
    (np.random.default_rng(0).random((2, 64, 32)), "validation sharp images are 64 x 32 but the training ones 64 x 64"),
    (np.ones((64, 64)), "constant"),
    (np.random.default_rng(0).random((2, 2, 64, 64)), "expected a 2-D image"),
])
def test_bad_held_out_planes_are_a_clear_error(val, match):
    with pytest.raises(InputError, match=match):
        _data(SimulatedSource(_train_sharp(), "gaussian", val_sharp=val))
