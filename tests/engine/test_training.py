"""Engine: training from pairs or a PSF model, validation, cancellation, resume, fine-tuning, bf16 autocast."""

import numpy as np
import pytest
import torch
from engine_helpers import TINY, WIENER, _pairs, _quick, _specimen

from napari_coordgate.config import ModelConfig, TrainConfig
from napari_coordgate.data import InputError
from napari_coordgate.engine import (
    PairSource,
    SimulatedSource,
    load_checkpoint,
    predict,
    train,
)
from napari_coordgate.model_io import load_model, save_psf_model
from napari_coordgate.optics.psf import PRESETS, PSFConfig


def test_training_on_pairs_rises_above_the_input_and_writes_the_best_model(tmp_path):
    sharp, blurred = _pairs()
    updates = []
    res = train(TINY, _quick(epochs=4), PairSource(sharp, blurred), on_update=updates.append,
                out_path=tmp_path / "m.cgmodel")
    epochs = [u for u in updates if u.kind == "epoch"]
    assert len(epochs) == 4 and updates[-1].kind == "done"
    # measured: +0.36 dB over the blurred input after 4 x 8 steps (seed 0); the curve rises every epoch
    input_psnr = updates[0].input_psnr
    assert all(u.input_psnr == input_psnr for u in updates)
    assert res.best_val_psnr > input_psnr + 0.2
    assert [u.val_psnr for u in epochs] == sorted(u.val_psnr for u in epochs)
    assert res.best_val_psnr == epochs[-1].val_psnr and res.best_epoch == 4
    assert res.device == "cpu" and all(u.device == "cpu" for u in updates)
    loaded = load_model(tmp_path / "m.cgmodel")
    assert loaded.field_shape == (64, 64)
    assert loaded.provenance["training"]["source"] == "calibration"
    # outputs come back in the units of the training sharp images
    out = predict(loaded, blurred[-1], device="cpu")
    assert out.dtype == np.float32 and out.shape == (64, 64)
    assert 0 < out.mean() < 5000


def test_the_first_step_is_reported_at_once():
    sharp, blurred = _pairs()
    updates = []
    train(TINY, _quick(epochs=1), PairSource(sharp, blurred), on_update=updates.append)
    assert (updates[0].kind, updates[0].step, updates[0].epoch) == ("step", 1, 0)
    assert updates[0].val_psnr is None and updates[0].input_psnr is not None


def test_single_pair_validates_on_the_checkerboard_tiles_and_rises_above_the_input():
    from napari_coordgate.data import checkerboard_mask
    from napari_coordgate.metrics import psnr

    sharp, blurred = _pairs(n=1)
    updates = []
    res = train(TINY, _quick(epochs=4, val_tile=16), PairSource(sharp[0], blurred[0]), on_update=updates.append)
    # the input's validation PSNR is the one of the checkerboard tiles (not of the whole plane)
    norm = res.saved.normalization.for_plane(blurred[0])  # the plane's own units
    s, b = norm.apply(sharp[0].astype(np.float32)), norm.apply(blurred[0].astype(np.float32))
    mask = checkerboard_mask((64, 64), 16)
    rng = float(np.float32(s.max()) - np.float32(s.min()))
    assert updates[0].input_psnr == pytest.approx(psnr(s, b, rng, mask=mask), abs=1e-9)
    assert abs(psnr(s, b, rng) - updates[0].input_psnr) > 0.05
    # measured: +0.93 dB over the input on the tiles after 4 x 8 steps (seed 0)
    assert res.best_val_psnr > updates[0].input_psnr + 0.5


def test_sharp_pixels_under_the_validation_tiles_never_reach_the_weights():
    from napari_coordgate.data import checkerboard_mask

    sharp, blurred = _pairs(n=1)
    mask = checkerboard_mask((64, 64), 16)
    other = sharp[0].copy()
    other[mask] = np.random.default_rng(5).permutation(other[mask])  # same values (same normalisation), moved
    assert not np.array_equal(other, sharp[0])
    a = train(TINY, _quick(epochs=1, val_tile=16), PairSource(sharp[0], blurred[0]))
    b = train(TINY, _quick(epochs=1, val_tile=16), PairSource(other, blurred[0]))
    wa, wb = a.saved.model.state_dict(), b.saved.model.state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert a.best_val_psnr != b.best_val_psnr  # validation does read them


def test_the_loss_has_zero_gradient_on_the_validation_tiles():
    from napari_coordgate.engine.training import _loss
    from napari_coordgate.engine.trainingdata import TrainingData

    sharp, blurred = _pairs(n=1)
    data = TrainingData.from_source(PairSource(sharp[0], blurred[0]), TINY, _quick(val_tile=16, batch=8))
    data.start(data.fit_normalization(), None)
    batch = data.batch(np.random.default_rng(0))
    for k, (oy, ox) in enumerate(batch.offsets):  # the weights are the complement of the validation mask
        np.testing.assert_array_equal(batch.weight[k, 0], ~data.val_mask[oy : oy + 32, ox : ox + 32])
    out = torch.from_numpy(batch.blurred).requires_grad_()
    _loss(out, torch.from_numpy(batch.sharp), torch.from_numpy(batch.weight), "l2").backward()
    held_out = batch.weight == 0
    assert held_out.any() and (~held_out).any()
    assert (out.grad.numpy()[held_out] == 0).all()
    assert (out.grad.numpy()[~held_out] != 0).mean() > 0.9


def test_training_is_seeded():
    sharp, blurred = _pairs()
    a = train(TINY, _quick(epochs=1), PairSource(sharp, blurred))
    b = train(TINY, _quick(epochs=1), PairSource(sharp, blurred))
    c = train(TINY, _quick(epochs=1, seed=1), PairSource(sharp, blurred))

    wa, wb, wc = (r.saved.model.state_dict() for r in (a, b, c))
    assert all(torch.equal(wa[k], wb[k]) for k in wa) and a.best_val_psnr == b.best_val_psnr
    assert not all(torch.equal(wa[k], wc[k]) for k in wa)  # the seed, not luck, makes them equal


def test_stop_keeps_the_best_model_so_far_and_a_checkpoint_to_resume(tmp_path):
    sharp, blurred = _pairs()
    calls = {"n": 0}

    def should_stop():  # what Stop in the dock and Ctrl-C in the CLI do
        calls["n"] += 1
        return calls["n"] > 20  # mid-way through the third epoch

    ck = tmp_path / "run.cgckpt"
    res = train(TINY, _quick(epochs=50), PairSource(sharp, blurred), should_stop=should_stop,
                out_path=tmp_path / "best.cgmodel", checkpoint_path=ck)
    assert res.stopped == "stopped"
    assert res.best_epoch == 2 and res.history[-1].kind == "done" and res.history[-1].message == "stopped"
    on_disk = load_model(tmp_path / "best.cgmodel")
    weights = res.saved.model.state_dict()
    assert all(torch.equal(on_disk.model.state_dict()[k], weights[k]) for k in weights)
    # the checkpoint of the last whole epoch holds the best weights and resumes from there
    saved = load_checkpoint(ck)
    assert saved["meta"]["epoch"] == 2 and saved["meta"]["best_val_psnr"] == res.best_val_psnr
    best = res.saved.model.state_dict()
    assert all(torch.equal(saved["best"][k], best[k]) for k in best)
    again = train(TINY, _quick(epochs=3), PairSource(sharp, blurred), resume=ck)
    assert [u.epoch for u in again.history if u.kind == "epoch"] == [3]


def test_resume_refuses_a_different_model(tmp_path):
    sharp, blurred = _pairs()
    ck = tmp_path / "run.cgckpt"
    train(TINY, _quick(epochs=1), PairSource(sharp, blurred), checkpoint_path=ck)
    with pytest.raises(ValueError, match="different model"):
        train(TINY.replace(channels=8), _quick(epochs=2), PairSource(sharp, blurred), resume=ck)


@pytest.mark.parametrize("other", ["sharp", "blurred", "psf"])
def test_resume_refuses_other_data(tmp_path, other):
    sharp, blurred = _pairs()
    ck = tmp_path / "run.cgckpt"
    first = PairSource(sharp, blurred, psf="gaussian")
    train(TINY, _quick(epochs=1), first, checkpoint_path=ck)
    changed = {"sharp": PairSource(sharp + 1, blurred, psf="gaussian"),
               "blurred": PairSource(sharp, blurred + 1, psf="gaussian"),
               "psf": PairSource(sharp, blurred, psf="edge_defocus_astigmatism")}[other]
    with pytest.raises(InputError, match=r"run\.cgckpt was trained on other data: .*; start a new run or give "
                                         r"the same calibration data"):
        train(TINY, _quick(epochs=2), changed, resume=ck)
    res = train(TINY, _quick(epochs=2), first, resume=ck)  # the same data, a larger budget: accepted
    assert res.saved.provenance["training"]["epochs"] == 2


def test_resume_from_a_psf_model_refuses_another_psf_model(tmp_path):
    sharp = (_specimen(2) * 1000).astype(np.float32)
    ck = tmp_path / "run.cgckpt"
    train(TINY, _quick(epochs=1), SimulatedSource(sharp, "gaussian"), checkpoint_path=ck)
    with pytest.raises(InputError, match="trained on other data"):
        train(TINY, _quick(epochs=2), SimulatedSource(sharp, "edge_defocus_astigmatism"), resume=ck)


def _source(kind):
    if kind == "pairs":
        return PairSource(*_pairs())
    held_out = (_specimen(2, seed=1) * 1000).astype(np.float32) if kind == "psf, held-out validation" else None
    return SimulatedSource((_specimen(2) * 1000).astype(np.float32), "gaussian", val_sharp=held_out)


@pytest.mark.parametrize("kind", ["pairs", "psf", "psf, held-out validation"])
def test_interrupted_and_resumed_training_equals_uninterrupted(tmp_path, kind):
    cfg = ModelConfig(depth=1, channels=2)
    recipe = TrainConfig(epochs=4, crop=32, batch=2, steps_per_epoch=3, seed=0, threads=1, device="cpu")
    whole = train(cfg, recipe, _source(kind), checkpoint_path=tmp_path / "whole.cgckpt")

    epochs = []
    ck = tmp_path / "parts.cgckpt"

    def on_update(u):
        if u.kind == "epoch":
            epochs.append(u.epoch)

    first = train(cfg, recipe, _source(kind), checkpoint_path=ck, on_update=on_update,
                  should_stop=lambda: len(epochs) >= 2)
    assert first.stopped == "stopped" and epochs == [1, 2]
    parts = train(cfg, recipe, _source(kind), checkpoint_path=ck, resume=ck, on_update=on_update)
    assert epochs == [1, 2, 3, 4]

    assert parts.best_val_psnr == whole.best_val_psnr and parts.best_epoch == whole.best_epoch
    a, b = whole.saved.model.state_dict(), parts.saved.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the last weights, the best ones and the optimiser state too
    ta, tb = load_checkpoint(tmp_path / "whole.cgckpt")["tensors"], load_checkpoint(ck)["tensors"]
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def test_training_from_psf_preset_records_the_psf():
    sharp = (_specimen(2) * 1000).astype(np.float32)
    res = train(TINY, _quick(epochs=1), SimulatedSource(sharp, "gaussian"))
    assert isinstance(res.saved.psf, PSFConfig) and res.saved.psf == PRESETS["gaussian"]
    assert res.saved.provenance["training"]["source"] == "psf"


@pytest.mark.parametrize(
    "sharp, blurred, match",
    [
        (np.ones((3, 32, 32)), np.ones((3, 32, 32)), "constant"),
        (np.random.rand(2, 32, 32), np.random.rand(3, 32, 32), "same shape"),
        (np.full((32, 32), np.nan), np.random.rand(32, 32), "NaN"),
        (np.random.rand(40, 40, 3), np.random.rand(40, 40, 3), "RGB"),
        (np.random.rand(2, 2, 32, 32), np.random.rand(2, 2, 32, 32), "expected a 2-D image"),
        (np.zeros((32, 32), bool), np.zeros((32, 32), bool), "dtype bool"),
        (np.random.rand(1, 1), np.random.rand(1, 1), "smaller than the minimum"),
        (np.zeros((0, 32)), np.zeros((0, 32)), "empty"),
    ],
)
def test_bad_pairs_give_clear_errors(sharp, blurred, match):
    with pytest.raises(InputError, match=match):
        train(TINY, _quick(epochs=1), PairSource(sharp, blurred))


def test_misregistered_pairs_warn():
    sharp, blurred = _pairs(n=2)
    shifted = np.roll(blurred, 3, axis=-1)
    with pytest.warns(UserWarning, match="misregistered"):
        train(TINY, _quick(epochs=1, steps_per_epoch=1), PairSource(sharp, shifted))


def test_register_corrects_a_shifted_pair():
    import warnings

    from napari_coordgate.data import registration_shift
    from napari_coordgate.engine.trainingdata import TrainingData

    sharp, blurred = _pairs(n=2)
    shifted = np.roll(blurred, 3, axis=-1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # registered: no misregistration warning
        data = TrainingData.from_source(PairSource(sharp, shifted), TINY, _quick(register=True))
        updates = []
        train(TINY, _quick(epochs=1, steps_per_epoch=1, register=True), PairSource(sharp, shifted),
              on_update=updates.append)
    for i in range(2):
        dy, dx = registration_shift(sharp[i].astype(np.float32), data.blurred_plane(i))
        assert abs(dy) < 0.1 and abs(dx) < 0.1
    dx = registration_shift(sharp[0].astype(np.float32), shifted[0].astype(np.float32))[1]
    assert dx == pytest.approx(-3, abs=0.1)
    # measured: the input's validation PSNR is 15.8 dB shifted, 22.5 dB registered
    unregistered = []
    with pytest.warns(UserWarning, match="misregistered"):
        train(TINY, _quick(epochs=1, steps_per_epoch=1), PairSource(sharp, shifted), on_update=unregistered.append)
    assert updates[0].input_psnr > unregistered[0].input_psnr + 5


def test_a_memory_mapped_calibration_stack_trains_like_the_same_arrays_in_memory(tmp_path):
    sharp, blurred = _pairs()
    np.save(tmp_path / "s.npy", sharp)
    np.save(tmp_path / "b.npy", blurred)
    mapped = PairSource(np.load(tmp_path / "s.npy", mmap_mode="r"), np.load(tmp_path / "b.npy", mmap_mode="r"))
    a = train(TINY, _quick(epochs=1), mapped)
    b = train(TINY, _quick(epochs=1), PairSource(sharp, blurred))
    wa, wb = a.saved.model.state_dict(), b.saved.model.state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa) and a.best_val_psnr == b.best_val_psnr


# -- fine-tuning a loaded model ---------------------------------------------------------------------------------
def test_fine_tuning_starts_from_the_models_weights_and_keeps_its_normalisation(tmp_path):
    sharp, blurred = _pairs()
    first = train(TINY, _quick(epochs=2), PairSource(sharp, blurred), out_path=tmp_path / "m")
    loaded = load_model(tmp_path / "m.cgmodel")
    new_sharp, new_blurred = sharp[::-1] * 2, blurred[::-1] * 2  # new calibration data, other intensities

    untouched = train(TINY, _quick(epochs=1), PairSource(new_sharp, new_blurred), init=loaded,
                      should_stop=lambda: True)
    tuned, fresh = [], []
    train(TINY, _quick(epochs=1), PairSource(sharp, blurred), init=loaded, on_update=tuned.append)
    train(TINY, _quick(epochs=1), PairSource(sharp, blurred), on_update=fresh.append)

    start, weights = untouched.saved.model.state_dict(), loaded.model.state_dict()
    assert all(torch.equal(start[k], weights[k]) for k in weights)  # no step taken: the loaded weights
    # the model's units, not refitted on the new data (that would halve the scale)
    assert untouched.saved.normalization == loaded.normalization == first.saved.normalization
    assert tuned[0].loss < fresh[0].loss  # the first step starts from a trained model


def test_fine_tuning_needs_the_same_network_and_field():
    sharp, blurred = _pairs()
    saved = train(TINY, _quick(epochs=1), PairSource(sharp, blurred)).saved
    with pytest.raises(InputError, match=r"another network configuration: channels=4 \(not 8\)"):
        train(TINY.replace(channels=8), _quick(epochs=1), PairSource(sharp, blurred), init=saved)
    small_s, small_b = _pairs(h=32, w=48)
    with pytest.raises(InputError, match="trained on a 64x64 field, these pairs are 32x48"):
        train(TINY, _quick(epochs=1), PairSource(small_s, small_b), init=saved)
    with pytest.raises(InputError, match="not both"):
        train(TINY, _quick(epochs=1), PairSource(sharp, blurred), init=saved, resume="run.cgckpt")


# -- any PSF model (the interface), here a grid of Gaussians with arrays (tests/conftest.py) -----------------
BEADS = {"source_images": ["beads.tif"], "beads": 88, "fit_residual": 0.04, "date": "2026-11-20"}


def test_training_from_a_measured_psf_model_file_carries_the_model_and_its_provenance(tmp_path, fake_psf):
    sharp = (_specimen(2) * 1000).astype(np.float32)
    psf_file = save_psf_model(tmp_path / "beads", fake_psf, provenance=BEADS)

    res = train(TINY, _quick(epochs=1), SimulatedSource(sharp, str(psf_file)), out_path=tmp_path / "m")
    loaded = load_model(tmp_path / "m.cgmodel")

    for saved in (res.saved, loaded):
        assert type(saved.psf) is type(fake_psf)
        np.testing.assert_array_equal(saved.psf.sigmas, fake_psf.sigmas)
        assert {k: saved.provenance["psf"][k] for k in BEADS} == BEADS
        assert saved.provenance["training"]["source"] == "psf"
    assert {k: loaded.psf.provenance[k] for k in BEADS} == BEADS


def test_training_from_a_psf_model_object_simulates_with_its_blur(fake_psf):
    sharp = (_specimen(2) * 1000).astype(np.float32)

    res = train(TINY, _quick(epochs=1), SimulatedSource(sharp, fake_psf))

    assert res.saved.psf is fake_psf and "psf" not in res.saved.provenance  # no provenance: none recorded
    assert np.isfinite(res.best_val_psnr)


def test_wiener_first_stage_is_built_from_any_psf_model(tmp_path, fake_psf):
    from napari_coordgate.optics.deconv import wiener_kernels

    sharp, blurred = _pairs()
    res = train(WIENER, _quick(epochs=1), PairSource(sharp, blurred, psf=fake_psf), out_path=tmp_path / "w")

    expected = wiener_kernels(fake_psf, (64, 64), WIENER.prefilter_grid, WIENER.prefilter_size,
                              WIENER.prefilter_balance)
    np.testing.assert_array_equal(res.saved.model.prefilter.kernels.numpy(), expected)
    assert type(load_model(tmp_path / "w.cgmodel").psf) is type(fake_psf)


def test_resume_refuses_a_psf_model_with_other_arrays(tmp_path, fake_psf):
    sharp = (_specimen(2) * 1000).astype(np.float32)
    ck = tmp_path / "run.cgckpt"
    train(TINY, _quick(epochs=1), SimulatedSource(sharp, fake_psf), checkpoint_path=ck)
    wider = type(fake_psf)(fake_psf.sigmas * 1.1, fake_psf.psf_size, fake_psf.name)  # same metadata, other arrays

    with pytest.raises(InputError, match="trained on other data"):
        train(TINY, _quick(epochs=2), SimulatedSource(sharp, wider), resume=ck)
    assert train(TINY, _quick(epochs=2), SimulatedSource(sharp, fake_psf), resume=ck).saved.provenance[
        "training"]["epochs"] == 2


@pytest.mark.parametrize("gain, offset", [(0.3, 0.0), (0.3, 100.0), (0.3, 500.0), (3000.0, 0.0), (3000.0, 100.0),
                                          (3000.0, 500.0)])
def test_a_camera_offset_and_gain_give_the_same_restoration_in_the_cameras_units(gain, offset):
    # trained on data in [0, 1]; applied to the same held-out field as gain * x + offset (uint16 where it fits,
    # as a camera stores it): the result is gain * f(x) + offset, so the PSNR after undoing the units is the same
    from napari_coordgate.metrics import psnr

    sharp, blurred = _pairs()
    res = train(TINY, _quick(epochs=2), PairSource(sharp / 4000.0, blurred / 4000.0))
    assert res.saved.normalization.percentiles == (0.1, 99.9)
    truth, field = sharp[-1] / 4000.0, blurred[-1] / 4000.0
    base = predict(res.saved, field.astype(np.float32), device="cpu")
    camera = gain * field + offset
    camera = np.round(camera).astype(np.uint16) if gain > 100 else camera.astype(np.float32)
    if gain > 100:
        field = (camera.astype(np.float64) - offset) / gain  # what the camera kept of x (quantised)
        base = predict(res.saved, field.astype(np.float32), device="cpu")

    out = predict(res.saved, camera, device="cpu")

    np.testing.assert_allclose((out - offset) / gain, base, atol=2e-4)
    assert abs(psnr(truth, (out - offset) / gain) - psnr(truth, base)) < 0.2
    assert out.min() > offset - 0.1 * gain  # no negative intensities from an unseen offset


def test_a_fixed_normalisation_model_still_trains_and_applies_in_the_training_units():
    sharp, blurred = _pairs()
    res = train(TINY, _quick(epochs=1, intensity="fixed"), PairSource(sharp, blurred))
    norm = res.saved.normalization
    assert not norm.per_image and norm.scale > 1000  # the uint16 training units
    out = predict(res.saved, blurred[-1], device="cpu")
    assert np.isfinite(out).all() and abs(float(out.mean()) - float(blurred[-1].mean())) < 0.2 * norm.scale


# -- bf16 autocast in CPU training (issue 15) ------------------------------------------------------------------------
def _weights(result):
    return {k: v.clone() for k, v in result.saved.model.state_dict().items()}


@pytest.mark.parametrize("fast", [False, True], ids=["cpu-without-bf16", "cpu-with-bf16"])
def test_amp_trains_under_bf16_autocast_only_where_bf16_is_fast(monkeypatch, fast):
    import torch

    from napari_coordgate.engine import training

    monkeypatch.setattr(training, "bf16_is_fast", lambda dev: fast)
    sharp, blurred = _pairs()
    seen = []
    real_step = training._step

    def spy(*args, **kw):
        seen.append(args[-1])  # use_amp
        return real_step(*args, **kw)

    monkeypatch.setattr(training, "_step", spy)
    amp = train(TINY, _quick(), PairSource(sharp, blurred))
    fp32 = train(TINY, _quick(amp=False), PairSource(sharp, blurred))
    assert set(seen) == {fast, False}
    same = all(torch.equal(a, b) for a, b in zip(_weights(amp).values(), _weights(fp32).values()))
    assert same != fast  # bf16 autocast changes the weights; without it amp=True is plain float32 training
    assert amp.best_val_psnr > amp.history[-1].input_psnr  # and it learns


def test_devices_say_where_bf16_is_fast(monkeypatch):
    import torch

    from napari_coordgate.devices import bf16_is_fast

    assert isinstance(bf16_is_fast(torch.device("cpu")), bool)
    assert bf16_is_fast(torch.device("meta")) is False
    assert bf16_is_fast(torch.device("cuda")) is True  # autocast on CUDA, as before (no GPU needed to ask)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    assert bf16_is_fast(torch.device("cpu")) is False
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    assert bf16_is_fast(torch.device("cpu")) is True


def test_a_diverging_run_stops_at_once_keeps_the_best_model_and_writes_no_broken_checkpoint(tmp_path, monkeypatch):
    from napari_coordgate.engine import training
    from napari_coordgate.model_io import load_checkpoint

    real, calls = training._step, []

    def step(*args, **kwargs):  # finite for two epochs of 4 steps, then the loss is NaN
        calls.append(1)
        return real(*args, **kwargs) if len(calls) <= 8 else float("nan")

    monkeypatch.setattr(training, "_step", step)
    sharp, blurred = _pairs()
    res = train(TINY, _quick(epochs=4, steps_per_epoch=4), PairSource(sharp, blurred), out_path=tmp_path / "m",
                checkpoint_path=tmp_path / "m.cgckpt")

    assert res.stopped == "diverged" and len(calls) == 9  # no step after the first NaN
    assert any(u.message == "the loss became nan at step 9" for u in res.history)
    assert all(torch.isfinite(v).all() for v in load_model(tmp_path / "m.cgmodel").model.state_dict().values())
    assert load_checkpoint(tmp_path / "m.cgckpt")["meta"]["epoch"] == 2  # the last finite epoch's, still resumable


def test_a_run_diverging_before_its_first_validation_keeps_the_starting_weights(monkeypatch):
    from napari_coordgate.engine import training

    monkeypatch.setattr(training, "_step", lambda *args, **kwargs: float("inf"))
    sharp, blurred = _pairs()
    res = train(TINY, _quick(epochs=2, steps_per_epoch=4), PairSource(sharp, blurred))

    assert res.stopped == "diverged" and res.best_val_psnr is not None and np.isfinite(res.best_val_psnr)
    assert all(torch.isfinite(v).all() for v in res.saved.model.state_dict().values())


# -- brightness: crop pairs scaled up, the loss in each crop's own units ------------------------------------------
def _batch(n=4, size=16, seed=0):
    from napari_coordgate.engine.trainingdata import Batch

    rng = np.random.default_rng(seed)
    sharp = rng.random((n, 1, size, size)).astype(np.float32)
    return Batch(sharp + 0.1 * rng.random(sharp.shape).astype(np.float32), sharp, np.zeros((n, 2)), None)


def test_brightness_one_leaves_the_batch_and_the_random_stream_alone():
    from napari_coordgate.engine.trainingdata import brighten

    batch, rng = _batch(), np.random.default_rng(5)
    assert brighten(batch, rng, 1.0) is batch and rng.random() == np.random.default_rng(5).random()


def test_brightness_scales_half_the_crop_pairs_each_by_one_factor_up_to_the_bound():
    from napari_coordgate.engine.trainingdata import brighten

    batch = _batch(n=64)
    out = brighten(batch, np.random.default_rng(1), 32.0)
    s = out.scale.reshape(-1)
    assert out.scale.shape == (64, 1, 1, 1) and s.min() >= 1.0 and s.max() <= 32.0
    assert 0.3 < np.mean(s == 1.0) < 0.7, "about half keep their own brightness"
    assert s.max() > 8.0 and np.min(s[s > 1.0]) < 2.0, "the others log-uniform over the range"
    np.testing.assert_allclose(out.sharp, batch.sharp * out.scale, rtol=1e-6)
    np.testing.assert_allclose(out.blurred, batch.blurred * out.scale, rtol=1e-6)


def test_a_brightened_batch_costs_a_scale_equivariant_network_what_the_batch_does():
    from napari_coordgate.engine.training import _step
    from napari_coordgate.engine.trainingdata import brighten

    class Linear(torch.nn.Module):  # no bias: f(s x) = s f(x)
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.conv = torch.nn.Conv2d(1, 1, 3, padding=1, bias=False)

        def forward(self, x, offset=None, field_shape=None):
            return self.conv(x)

    batch, net = _batch(), Linear()
    opt = torch.optim.SGD(net.parameters(), lr=0.0)
    plain = _step(net, opt, batch, torch.device("cpu"), TrainConfig(), (16, 16), False)
    bright = _step(net, opt, brighten(batch, np.random.default_rng(2), 100.0), torch.device("cpu"), TrainConfig(),
                   (16, 16), False)
    assert bright == pytest.approx(plain, rel=1e-5)
