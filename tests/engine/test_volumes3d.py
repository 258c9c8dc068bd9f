"""3-D training data and 3-D prediction: crops, split, noise, tile plans, tiled == whole, z-step rules."""

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from napari_coordgate.config import ModelConfig, TrainConfig
from napari_coordgate.data import InputError
from napari_coordgate.engine import train
from napari_coordgate.engine.prediction import plan_tiles_3d, predict, predict_batch, tile_batches
from napari_coordgate.engine.trainingdata import PairSource
from napari_coordgate.engine.volumes import TrainingVolumes
from napari_coordgate.model_io import SavedModel, load_model, read_model_info, save_model
from napari_coordgate.nn.unet import build_model
from napari_coordgate.samples.volumes import specimen_volumes


def _pairs(n=3, shape=(12, 40, 48), seed=1):
    sharp = specimen_volumes(n, shape, seed=seed)
    blurred = np.stack([gaussian_filter(v, (1.5, 1.0, 1.0)) for v in sharp]).astype(np.float32)
    return sharp, blurred


def _random_model(cfg: ModelConfig, seed: int = 0):
    torch.manual_seed(seed)
    net = build_model(cfg)
    with torch.no_grad():
        for p in net.parameters():  # no zero-initialised head or gate: every weight shapes the output
            p.normal_(0.0, 0.2)
    return net.eval()


def test_volume_batches_keep_their_field_place_on_the_pooling_grid():
    sharp, blurred = _pairs()
    cfg = ModelConfig(ndim=3, depth=3, channels=4, z_pool_start=2)
    data = TrainingVolumes.from_source(PairSource(sharp, blurred, z_step_um=0.3), cfg,
                                       TrainConfig(batch=5, crop=16, crop_depth=6, epochs=1))
    data.start(data.fit_normalization(), None)
    batch = data.batch(np.random.default_rng(0))
    assert batch.blurred.shape == batch.sharp.shape == (5, 1, 6, 16, 16)  # depth 6 on the z grid of 2
    assert batch.weight is None  # several volumes: whole volumes held out, no mask
    assert (batch.offsets % cfg.min_size == 0).all()
    assert list(data.val_idx) == [2] and list(data.train_idx) == [0, 1]


def test_single_volume_pair_holds_out_checkerboard_columns_through_the_depth():
    sharp, blurred = _pairs(n=1)
    cfg = ModelConfig(ndim=3, depth=2, channels=4)
    data = TrainingVolumes.from_source(PairSource(sharp[0], blurred[0], z_step_um=0.3), cfg,
                                       TrainConfig(batch=2, crop=16, crop_depth=4, val_tile=8, epochs=1))
    data.start(data.fit_normalization(), None)
    batch = data.batch(np.random.default_rng(1))
    w = batch.weight[:, 0]
    assert w.shape == (2, 4, 16, 16)
    assert (w == w[:, :1]).all()  # the same columns in every plane
    assert 0 < w.mean() < 1


def test_simulated_volume_noise_is_scaled_to_each_volume_not_each_plane():
    # an out-of-focus plane 100x dimmer than the volume's peak gets the noise of its own few photons
    sharp, _ = _pairs(n=1, shape=(4, 32, 32))
    cfg = ModelConfig(ndim=3, depth=2, channels=4)
    data = TrainingVolumes.from_source(PairSource(sharp, sharp * 0.5, z_step_um=0.3), cfg,
                                       TrainConfig(epochs=1, photons=1000.0, read_noise=0.0))
    clean = np.ones((1, 4, 32, 32), np.float32)
    clean[0, 0] = 0.01
    noisy = data._noise(clean, seed=0)
    rel = noisy[0].std(axis=(1, 2)) / noisy[0].mean(axis=(1, 2))
    assert rel[0] > 5 * rel[1]  # ~10 photons vs ~1000: 1/sqrt(10) vs 1/sqrt(1000)


def test_3d_tiled_prediction_equals_whole_volume_prediction():
    cfg = ModelConfig(ndim=3, depth=3, channels=4, z_pool_start=2)
    net = _random_model(cfg)
    vol = np.random.default_rng(0).random((20, 44, 52)).astype(np.float32)
    whole = plan_tiles_3d(vol.shape, cfg, tile=10_000, tile_z=10_000)
    tiled = plan_tiles_3d(vol.shape, cfg, tile=16, tile_z=4)
    assert len(whole) == 1 and len(tiled) > 10

    def run(tiles):
        out = np.full(vol.shape, np.nan, np.float32)
        read = lambda w: vol[w[0]:w[1], w[2]:w[3], w[4]:w[5]]  # noqa: E731
        for group in tile_batches(tiles, 1):
            for core, pred in predict_batch(net, read, tiles, group, (0, 0), vol.shape[1:], torch.device("cpu")):
                out[core[0]:core[1], core[2]:core[3], core[4]:core[5]] = pred
        return out

    a, b = run(whole), run(tiled)
    assert not np.isnan(b).any()
    np.testing.assert_array_equal(a, b)


def test_3d_training_writes_a_model_with_its_z_step_that_predict_enforces(tmp_path):
    sharp, blurred = _pairs()
    cfg = ModelConfig(ndim=3, depth=2, channels=4)
    res = train(cfg, TrainConfig(epochs=2, steps_per_epoch=3, batch=2, crop=16, crop_depth=4, threads=1),
                PairSource(sharp, blurred, z_step_um=0.3))
    path = save_model(tmp_path / "m3", res.saved)
    saved = load_model(path)
    assert saved.z_step_um == pytest.approx(0.3) and saved.config.ndim == 3
    out = predict(saved, blurred[:2], z_step_um=0.3)  # a (T, D, H, W) series: volume by volume
    assert out.shape == blurred[:2].shape and np.isfinite(out).all()
    with pytest.raises(InputError, match="z-step is 0.5 µm but the model was trained at 0.3 µm"):
        predict(saved, blurred[0], z_step_um=0.5)
    with pytest.raises(InputError, match="3-D model: it restores z-stacks"):
        predict(saved, blurred[0, 0])


def test_2d_model_files_hold_no_z_step_and_3d_models_need_one(tmp_path):
    cfg2 = ModelConfig(depth=2, channels=4)
    path = save_model(tmp_path / "m2", SavedModel(build_model(cfg2), cfg2, (32, 32)))
    assert "z_step_um" not in read_model_info(path)
    cfg3 = ModelConfig(ndim=3, depth=2, channels=4)
    with pytest.raises(ValueError, match="needs its z-step"):
        SavedModel(build_model(cfg3), cfg3, (32, 32))
    with pytest.raises(ValueError, match="2-D model has no z-step"):
        SavedModel(build_model(cfg2), cfg2, (32, 32), z_step_um=0.2)


def test_volume_sources_are_checked_with_one_line_messages():
    cfg = ModelConfig(ndim=3, depth=2, channels=4)
    tc = TrainConfig(epochs=1)
    sharp, blurred = _pairs(n=1)
    with pytest.raises(InputError, match="z-step"):
        TrainingVolumes.from_source(PairSource(sharp, blurred), cfg, tc)
    with pytest.raises(InputError, match="same shape"):
        TrainingVolumes.from_source(PairSource(sharp, blurred[:, :8], z_step_um=0.3), cfg, tc)
    with pytest.raises(InputError, match=r"\(D, H, W\) volumes"):
        TrainingVolumes.from_source(PairSource(sharp[0, 0], blurred[0, 0], z_step_um=0.3), cfg, tc)
    flat = np.zeros_like(sharp)
    with pytest.raises(InputError, match="constant"):
        TrainingVolumes.from_source(PairSource(flat, blurred, z_step_um=0.3), cfg, tc)
    bad = blurred.copy()
    bad[0, 3, 5, 5] = np.nan
    with pytest.raises(InputError, match="NaN"):
        TrainingVolumes.from_source(PairSource(sharp, bad, z_step_um=0.3), cfg, tc)


def test_3d_training_from_a_3d_psf_model_simulates_volumes_and_validates_on_held_out_ones():
    from napari_coordgate.engine import SimulatedSource
    from napari_coordgate.optics.psf3d import PRESETS_3D

    psf = PRESETS_3D["tilted_curved_3d"]
    sharp = specimen_volumes(2, (16, 32, 32), seed=3)
    val = specimen_volumes(1, (16, 32, 32), seed=4)
    cfg = ModelConfig(ndim=3, depth=2, channels=4)
    res = train(cfg, TrainConfig(epochs=1, steps_per_epoch=2, batch=2, crop=16, crop_depth=8, threads=1),
                SimulatedSource(sharp, psf, val_sharp=val))
    assert res.saved.z_step_um == psf.z_step_um and res.saved.psf is not None
    assert np.isfinite(res.best_val_psnr)


def test_a_2d_psf_model_is_refused_for_a_3d_model():
    from napari_coordgate.engine import SimulatedSource

    with pytest.raises(InputError, match="2-D PSF model"):
        TrainingVolumes.from_source(SimulatedSource(specimen_volumes(1, (8, 32, 32)), "gaussian"),
                                    ModelConfig(ndim=3, depth=2, channels=4), TrainConfig(epochs=1))


def test_resampling_in_depth_is_linear_and_round_trips_on_a_common_grid():
    from napari_coordgate.engine.prediction import resample_depth

    vol = np.arange(5, dtype=np.float32)[:, None, None] * np.ones((5, 2, 3), np.float32)  # plane k holds k
    finer = resample_depth(vol, 0.4, 0.2)  # planes 0.2 apart over the same 1.6 µm
    assert finer.shape == (9, 2, 3)
    np.testing.assert_allclose(finer[:, 0, 0], np.arange(9) / 2)
    np.testing.assert_allclose(resample_depth(finer, 0.2, 0.4, planes=5), vol)


def test_resample_z_restores_a_volume_of_another_z_step_on_the_model_grid():
    cfg = ModelConfig(ndim=3, depth=2, channels=4)
    saved = SavedModel(_random_model(cfg), cfg, (32, 32), z_step_um=0.2)
    vol = np.random.default_rng(0).random((6, 32, 32)).astype(np.float32)
    with pytest.raises(InputError, match="resample"):
        predict(saved, vol, z_step_um=0.4)
    out = predict(saved, vol, z_step_um=0.4, resample_z=True)
    assert out.shape == vol.shape and np.isfinite(out).all()
    # at the model's own z-step nothing is resampled
    np.testing.assert_array_equal(predict(saved, vol, z_step_um=0.2, resample_z=True), predict(saved, vol))


@pytest.mark.parametrize("simulated", [False, True], ids=["pairs", "3-D PSF model"])
def test_an_interrupted_3d_run_resumed_equals_the_uninterrupted_one(tmp_path, simulated):
    from napari_coordgate.engine import SimulatedSource
    from napari_coordgate.optics.psf3d import PRESETS_3D

    sharp, blurred = _pairs(n=3, shape=(8, 32, 32))
    cfg = ModelConfig(ndim=3, depth=2, channels=4)
    src = (SimulatedSource(sharp, PRESETS_3D["tilted_curved_3d"]) if simulated
           else PairSource(sharp, blurred, z_step_um=0.3))
    # amp off: oneDNN's bf16 3-D convolutions on a CPU are reproducible to rounding only, not bit for bit
    recipe = TrainConfig(epochs=3, steps_per_epoch=2, batch=2, crop=16, crop_depth=4, threads=1, seed=3, amp=False)
    whole = train(cfg, recipe, src)
    epochs = []
    ckpt = tmp_path / "run.cgckpt"
    train(cfg, recipe, src, checkpoint_path=ckpt, should_stop=lambda: len(epochs) >= 1,
          on_update=lambda u: epochs.append(u.epoch) if u.kind == "epoch" else None)
    resumed = train(cfg, recipe, src, checkpoint_path=ckpt, resume=ckpt)
    a, b = whole.saved.model.state_dict(), resumed.saved.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.best_val_psnr == whole.best_val_psnr and resumed.saved.z_step_um == whole.saved.z_step_um


def test_3d_coordinate_mlps_learn_at_the_base_rate_unless_a_scale_is_given():
    from napari_coordgate.engine.optimizer import build_optimizer

    def gate_lr(ndim, **given):
        cfg = ModelConfig(ndim=ndim, depth=2, channels=4, gate="coordgate")
        tc = TrainConfig(epochs=1, lr=1e-3, **given)
        opt, _ = build_optimizer(build_model(cfg), tc, ndim)
        assert len(opt.param_groups) == 2  # the network's weights, then the coordinate MLPs
        return opt.param_groups[1]["lr"]

    # 10x (the 2-D recipe) drove a 3-D CoordGate U-Net's gates to zero within its first 100 steps
    assert gate_lr(2) == pytest.approx(1e-2)
    assert gate_lr(3) == pytest.approx(1e-3)
    assert gate_lr(3, gate_lr_scale=4.0) == gate_lr(2, gate_lr_scale=4.0) == pytest.approx(4e-3)


def test_a_checkpoint_of_the_old_explicit_gate_rate_resumes_without_a_change_unless_the_rate_differs():
    from napari_coordgate.engine.resume import changed_settings

    old = TrainConfig(epochs=1, gate_lr_scale=10.0).to_dict()  # what runs before the ndim-dependent default wrote
    assert changed_settings({"train": old, "model": ModelConfig().to_dict()}, TrainConfig(epochs=1)) == []
    assert changed_settings({"train": old, "model": ModelConfig(ndim=3).to_dict()}, TrainConfig(epochs=1)) == [
        "gate_lr_scale 10.0 -> 1.0"]
    fresh = TrainConfig(epochs=1).to_dict()  # not given on either side
    assert changed_settings({"train": fresh, "model": ModelConfig(ndim=3).to_dict()}, TrainConfig(epochs=1)) == []
    # a 3-D run written before gradient clipping existed did not clip: resuming it now says so
    before = {k: v for k, v in old.items() if k != "grad_clip"}
    assert changed_settings({"train": before, "model": ModelConfig(ndim=3).to_dict()}, TrainConfig(epochs=1)) == [
        "gate_lr_scale 10.0 -> 1.0", "grad_clip 0.0 -> 1.0"]
    assert changed_settings({"train": before, "model": ModelConfig().to_dict()}, TrainConfig(epochs=1)) == []


def test_3d_runs_clip_the_gradient_norm_by_default_and_2d_runs_do_not():
    assert (TrainConfig().grad_clip_for(3), TrainConfig().grad_clip_for(2)) == (1.0, 0.0)
    assert TrainConfig(grad_clip=0.0).grad_clip_for(3) == 0.0
    assert TrainConfig(grad_clip=5.0).grad_clip_for(2) == 5.0


def test_a_clipped_step_moves_the_weights_by_a_bounded_gradient(monkeypatch):
    seen = []
    real = torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda params, bound: seen.append(
        (float(real(params, bound)), bound, float(torch.linalg.vector_norm(
            torch.stack([torch.linalg.vector_norm(p.grad) for p in params if p.grad is not None]))))))
    sharp, blurred = _pairs(n=2, shape=(8, 32, 32))
    cfg = ModelConfig(ndim=3, depth=2, channels=4, gate="coordgate", z_pool_start=1)
    train(cfg, TrainConfig(epochs=1, steps_per_epoch=2, batch=2, crop=16, crop_depth=4, seed=0, threads=1,
                           grad_clip=1e-3), PairSource(sharp, blurred, z_step_um=0.3))
    # every step clipped: the norm before it is above the bound, after it the gradient's norm is the bound (torch
    # divides by the norm + 1e-6)
    assert len(seen) == 2 and all(before > bound and after == pytest.approx(bound, rel=1e-3)
                                  for before, bound, after in seen)
