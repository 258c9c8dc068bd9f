"""Engine: training from pairs or a PSF model, cancellation, resume, tiled and lazy prediction."""

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from napari_coordgate.config import ModelConfig, TrainConfig
from napari_coordgate.data import InputError
from napari_coordgate.engine import (
    Cancelled,
    PairSource,
    SimulatedSource,
    field_geometry,
    load_checkpoint,
    plan_tiles,
    predict,
    receptive_halo,
    train,
)
from napari_coordgate.model_io import SavedModel, load_model, save_psf_model
from napari_coordgate.nn import build_model
from napari_coordgate.optics.psf import PRESETS, PSFConfig

TINY = ModelConfig(depth=2, channels=4, gate="coordgate", gate_hidden=8)


def _specimen(n, h=64, w=64, seed=0):
    rng = np.random.default_rng(seed)
    imgs = gaussian_filter(rng.random((n, h, w)), (0, 1.0, 1.0))
    return (imgs - imgs.min()) / np.ptp(imgs)


def _pairs(n=3, h=64, w=64):
    sharp = _specimen(n, h, w)
    # blur that grows toward the right edge: a position-dependent problem in miniature
    blurred = np.stack([np.where(np.arange(w)[None] < w // 2, gaussian_filter(s, 0.7), gaussian_filter(s, 1.8))
                        for s in sharp])
    return (sharp * 4000 + 100).astype(np.uint16), (blurred * 4000 + 100).astype(np.uint16)


def _quick(**kw):
    base = dict(crop=32, batch=4, epochs=3, steps_per_epoch=8, seed=0, device="cpu", lr=3e-3)
    return TrainConfig(**{**base, **kw})


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
    from napari_coordgate.data import Normalization, checkerboard_mask
    from napari_coordgate.metrics import psnr

    sharp, blurred = _pairs(n=1)
    updates = []
    res = train(TINY, _quick(epochs=4, val_tile=16), PairSource(sharp[0], blurred[0]), on_update=updates.append)
    # the input's validation PSNR is the one of the checkerboard tiles (not of the whole plane)
    norm = Normalization.from_dict(res.saved.normalization).for_plane(blurred[0])  # the plane's own units
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
    assert a.best_val_psnr == b.best_val_psnr


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
    return SimulatedSource((_specimen(2) * 1000).astype(np.float32), "gaussian")


@pytest.mark.parametrize("kind", ["pairs", "psf"])
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


def _random_saved(cfg, field_shape=(96, 112)):
    torch.manual_seed(3)
    model = build_model(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.normal_(0, 0.2)
    return SavedModel(model.eval(), cfg, field_shape, {"offset": 10.0, "scale": 500.0})


@pytest.mark.parametrize("gate", ["coordgate", "coordconv", "none"])
def test_tiled_prediction_equals_whole_image(gate):
    cfg = ModelConfig(depth=3, channels=4, gate=gate, gate_hidden=8)
    saved = _random_saved(cfg)
    img = (np.random.default_rng(0).random((96, 112)) * 500 + 10).astype(np.float32)
    whole = predict(saved, img, tile=1024, device="cpu")
    assert len(plan_tiles((96, 112), cfg, tile=24)) > 4
    tiled = predict(saved, img, tile=24, device="cpu")
    np.testing.assert_allclose(tiled, whole, atol=1e-4)


def test_stack_is_deblurred_plane_by_plane_with_progress():
    saved = _random_saved(TINY, (40, 48))
    stack = np.random.default_rng(1).random((2, 3, 40, 48)).astype(np.float32) * 100
    seen = []
    out = predict(saved, stack, device="cpu", tile=16, on_progress=lambda d, t: seen.append((d, t)))
    assert out.shape == stack.shape
    np.testing.assert_allclose(out[1, 2], predict(saved, stack[1, 2], device="cpu"), atol=1e-4)
    assert seen[-1][0] == seen[-1][1] == len(seen)


def test_cancel_between_tiles():
    saved = _random_saved(TINY, (40, 48))
    stack = np.random.rand(4, 40, 48).astype(np.float32)
    calls = {"n": 0}

    def stop():
        calls["n"] += 1
        return calls["n"] > 3

    with pytest.raises(Cancelled):
        predict(saved, stack, device="cpu", tile=16, should_stop=stop)


class _CountingArray:
    """A lazily sliced array that records how many elements each read pulls into memory."""

    def __init__(self, arr):
        self.arr, self.shape, self.dtype, self.ndim = arr, arr.shape, arr.dtype, arr.ndim
        self.reads = []

    def __getitem__(self, key):
        out = self.arr[key]
        self.reads.append(out.size)
        return out


def test_dask_stack_is_processed_block_by_block_never_whole():
    da = pytest.importorskip("dask.array")
    saved = _random_saved(TINY, (64, 64))
    base = np.random.default_rng(2).random((5, 64, 64)).astype(np.float32)
    source = _CountingArray(base)
    lazy = da.from_array(source, chunks=(1, 32, 32))
    out = predict(saved, lazy, device="cpu", tile=16)
    np.testing.assert_allclose(out, predict(saved, base, device="cpu", tile=16), atol=1e-5)
    # every read is at most one (1, 32, 32) chunk, never a plane or the whole stack
    assert max(source.reads) <= 32 * 32


def test_full_range_uint16_does_not_overflow():
    cfg = ModelConfig(depth=1, channels=2, gate="none")
    saved = SavedModel(build_model(cfg).eval(), cfg, (16, 16), {"offset": 0.0, "scale": 65535.0})
    img = np.full((16, 16), 65535, np.uint16)
    img[0, 0] = 0
    out = predict(saved, img, device="cpu")  # a fresh residual model is the identity
    np.testing.assert_allclose(out, img.astype(np.float32), rtol=1e-6)


def test_image_of_another_field_needs_roi_or_binning():
    saved = _random_saved(TINY, (64, 64))
    with pytest.raises(InputError, match="--roi"):
        predict(saved, np.random.rand(32, 32), device="cpu")
    assert field_geometry((32, 32), (64, 64), roi=(16, 32)) == ((64, 64), (16, 32))
    assert field_geometry((32, 32), (64, 64), binning=2) == ((32, 32), (0, 0))
    with pytest.raises(InputError, match="does not fit"):
        field_geometry((32, 32), (64, 64), roi=(40, 0))


def test_roi_prediction_matches_the_region_of_the_whole_field():
    saved = _random_saved(TINY, (64, 64))
    img = np.random.default_rng(4).random((64, 64)).astype(np.float32)
    whole = predict(saved, img, device="cpu")
    part = predict(saved, img[16:48, 16:48], roi=(16, 16), device="cpu")
    m = receptive_halo(TINY)
    np.testing.assert_allclose(part[m:-m, m:-m], whole[16 + m : 48 - m, 16 + m : 48 - m], atol=1e-4)


WIENER = ModelConfig(depth=2, channels=4, gate="coordgate", gate_hidden=8, prefilter="wiener", prefilter_grid=2,
                     prefilter_size=9)


def test_wiener_first_stage_is_built_from_the_pairs_psf_model_and_saved_with_the_weights(tmp_path):
    sharp, blurred = _pairs()
    res = train(WIENER, _quick(epochs=1), PairSource(sharp, blurred, psf="gaussian"), out_path=tmp_path / "w")
    kernels = res.saved.model.prefilter.kernels
    assert kernels.shape == (4, 9, 9) and kernels.abs().sum() > 0
    assert res.saved.psf is not None and res.saved.psf.name == "gaussian"
    loaded = load_model(tmp_path / "w.cgmodel")
    assert torch.equal(loaded.model.prefilter.kernels, kernels)
    np.testing.assert_array_equal(predict(loaded, blurred[0], device="cpu"),
                                  predict(res.saved, blurred[0], device="cpu"))


def test_wiener_first_stage_without_a_psf_model_is_a_clear_error():
    sharp, blurred = _pairs()
    with pytest.raises(InputError, match="needs the PSF model"):
        train(WIENER, _quick(epochs=1), PairSource(sharp, blurred))


def test_tiled_prediction_with_a_wiener_first_stage_equals_whole_image():
    saved = _random_saved(WIENER)
    g = torch.Generator().manual_seed(4)
    saved.model.prefilter.set_kernels(torch.randn(4, 9, 9, generator=g))
    img = (np.random.default_rng(1).random((96, 112)) * 500 + 10).astype(np.float32)
    whole = predict(saved, img, tile=1024, device="cpu")
    assert receptive_halo(WIENER) >= receptive_halo(WIENER.replace(prefilter="none")) + 4
    tiled = predict(saved, img, tile=16, device="cpu")
    np.testing.assert_allclose(tiled, whole, atol=1e-4)
    with pytest.raises(InputError, match="unbinned"):
        predict(saved, img[:48, :56], binning=2, device="cpu")


def test_gate_learning_rate_scale_moves_the_coordinate_mlps_proportionally():
    sharp, blurred = _pairs()

    def gate_shift(scale):
        res = train(TINY, _quick(epochs=1, gate_lr_scale=scale), PairSource(sharp, blurred))
        fresh = build_model(TINY).state_dict()
        # the gates' last layers start at zero, so their size after training is how far they moved
        return sum(float(p.abs().sum()) for n, p in res.saved.model.state_dict().items()
                   if n.startswith("down_gates") and n.endswith("weight") and not fresh[n].any())

    slow, normal = gate_shift(0.01), gate_shift(1.0)
    # the zero-initialised last layers of the gate MLPs move about in proportion to their learning rate
    assert 0 < slow < 0.1 * normal


# -- reduced precision and batched tiles (issue 15) ----------------------------------------------------------
def _unit_saved(cfg, field_shape):
    """A random-weight model on images that already span [0, 1] (identity normalisation): differences read
    directly against float32 rounding."""
    saved = _random_saved(cfg, field_shape)
    saved.normalization = {"offset": 0.0, "scale": 1.0}
    return saved


@pytest.mark.parametrize("gate", ["coordgate", "coordconv", "none"])
@pytest.mark.parametrize("shape, tile, roi, field", [
    ((200, 300), 64, None, (200, 300)),  # not a multiple of the tile: edge windows of several shapes
    ((64, 80), 16, None, (64, 80)),  # batches larger than the field: the model gathers from the field's gate
    ((200, 300), 64, (3, 5), (208, 310)),  # windows off the pooling grid: per-pixel gates
])
@pytest.mark.parametrize("batch_tiles", [4, 64])
def test_batched_tiles_equal_one_tile_at_a_time(gate, shape, tile, roi, field, batch_tiles):
    cfg = ModelConfig(depth=2, channels=4, gate=gate, gate_hidden=8)
    saved = _unit_saved(cfg, field)
    img = np.random.default_rng(5).random(shape).astype(np.float32)
    tiles = plan_tiles(shape, cfg, tile=tile)
    assert len({(w[1] - w[0], w[3] - w[2]) for _, w in tiles}) > 1
    one = predict(saved, img, roi=roi, tile=tile, device="cpu")
    seen = []
    batched = predict(saved, img, roi=roi, tile=tile, device="cpu", batch_tiles=batch_tiles,
                      on_progress=lambda d, t: seen.append((d, t)))
    np.testing.assert_allclose(batched, one, rtol=0, atol=1e-5)
    assert seen == [(k + 1, len(tiles)) for k in range(len(tiles))]  # progress still counts tiles


def test_batched_prediction_reads_one_window_at_a_time_and_checks_stop_per_batch():
    saved = _unit_saved(TINY, (200, 300))
    source = _CountingArray(np.random.default_rng(6).random((200, 300)).astype(np.float32))
    tiles = plan_tiles((200, 300), TINY, tile=64)
    predict(saved, source, tile=64, device="cpu", batch_tiles=8)
    largest = max((w[1] - w[0]) * (w[3] - w[2]) for _, w in tiles)
    assert len(source.reads) == len(tiles) and max(source.reads) == largest
    # per row of tiles: the left edge window, the three interior windows (one shape, one batch), the right edge
    checks = []
    predict(saved, source, tile=64, device="cpu", batch_tiles=3, should_stop=lambda: checks.append(1) or False)
    assert len(checks) == 4 * 3
    seen = []

    def stop():
        checks.append(1)
        return len(checks) > 12 + 2  # stop before the third batch

    with pytest.raises(Cancelled, match="after 4 of 20 tiles"):
        predict(saved, source, tile=64, device="cpu", batch_tiles=3, should_stop=stop,
                on_progress=lambda d, t: seen.append(d))
    assert seen == [1, 2, 3, 4]


def test_bf16_prediction_is_within_a_small_psnr_of_fp32():
    """Measured (seed 0, TINY trained 4 x 8 steps, CPU): fp32 23.1309 dB, bf16 23.1304 dB against the sharp
    image (blurred input 22.77 dB), a 0.0005 dB difference; bf16 against fp32 79.7 dB. The residual connection
    adds the network's correction to the float32 input, so bf16 rounds only the correction. The tolerance,
    0.05 dB, is 100x the measured difference and still far below what the model gains over its input."""
    from napari_coordgate.metrics import psnr

    sharp, blurred = _pairs()
    res = train(TINY, _quick(epochs=4), PairSource(sharp, blurred))
    gt, x = sharp[-1].astype(np.float32), blurred[-1]
    fp32 = predict(res.saved, x, device="cpu")
    bf16 = predict(res.saved, x, device="cpu", precision="bf16")
    assert bf16.dtype == np.float32 and bf16.shape == x.shape
    assert not np.array_equal(bf16, fp32)  # the forward pass did run in bfloat16
    rng = float(gt.max() - gt.min())
    assert psnr(gt, fp32, data_range=rng) > psnr(gt, x.astype(np.float32), data_range=rng) + 0.1
    assert abs(psnr(gt, bf16, data_range=rng) - psnr(gt, fp32, data_range=rng)) <= 0.05
    assert psnr(fp32, bf16, data_range=rng) > 60


def test_reduced_precision_leaves_later_fp32_output_bit_for_bit_unchanged():
    import copy

    saved = _unit_saved(TINY, (200, 300))
    untouched = copy.deepcopy(saved)
    img = np.random.default_rng(7).random((200, 300)).astype(np.float32)
    predict(saved, img, tile=64, device="cpu", precision="bf16", batch_tiles=4)
    # bf16 gates are cached apart from float32 ones: the float32 call must not reuse them
    after = predict(saved, img, tile=64, device="cpu")
    np.testing.assert_array_equal(after, predict(untouched, img, tile=64, device="cpu", precision="fp32"))


@pytest.mark.parametrize("kw, match", [
    (dict(precision="fp16"), "'fp16' needs a CUDA GPU"),
    (dict(precision="half"), "precision must be one of 'fp32', 'bf16', 'fp16', got 'half'"),
    (dict(batch_tiles=0), "batch_tiles must be a positive integer"),
    (dict(batch_tiles=2.0), "batch_tiles must be a positive integer"),
])
def test_bad_precision_or_batch_is_a_clear_error(kw, match):
    saved = _unit_saved(TINY, (64, 64))
    with pytest.raises(InputError, match=match):
        predict(saved, np.random.rand(64, 64), device="cpu", **kw)


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
    assert res.saved.normalization["percentiles"] == [0.1, 99.9]
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
    assert "percentiles" not in norm and norm["scale"] > 1000  # the uint16 training units
    out = predict(res.saved, blurred[-1], device="cpu")
    assert np.isfinite(out).all() and abs(float(out.mean()) - float(blurred[-1].mean())) < 0.2 * norm["scale"]


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
