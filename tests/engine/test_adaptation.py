"""engine.adapt: self-supervised fine-tuning on the user's blurred images with the model's PSF model."""

import numpy as np
import pytest
import torch
from engine_helpers import TINY, _specimen

from napari_coordgate.config import AdaptConfig, ConfigError
from napari_coordgate.data import InputError, Normalization
from napari_coordgate.engine import adapt
from napari_coordgate.model_io import SavedModel, load_model
from napari_coordgate.nn import build_model
from napari_coordgate.optics.blur import synthesize_pairs

PSF = "gaussian"  # 21 px PSFs, wider toward the edges


def _saved(psf=PSF, seed=0):
    torch.manual_seed(seed)
    return SavedModel(build_model(TINY).eval(), TINY, (64, 64), Normalization(0.0, 1.0, (1.0, 99.8)), psf=psf)


def _blurred(n=2, seed=0):
    _, blurred = synthesize_pairs(_specimen(n, seed=seed) * 2000 + 100, PSF, photons=500, seed=seed)
    return blurred


def _cfg(**kw):
    return AdaptConfig(**{**dict(epochs=3, steps_per_epoch=6, crop=32, batch=2, val_tile=8, device="cpu",
                                 lr=3e-3, seed=0), **kw})


def _weights(saved):
    return torch.cat([p.detach().flatten() for p in saved.model.state_dict().values()])


def test_adapted_model_lowers_the_held_out_criterion_and_records_the_adaptation(tmp_path):
    original = _saved()
    res = adapt(original, _blurred(), _cfg(), out_path=tmp_path / "a.cgmodel")
    assert not res.kept_original and res.criterion_best < res.criterion_before
    assert not torch.equal(_weights(res.saved), _weights(original))
    written = load_model(tmp_path / "a.cgmodel")
    assert torch.equal(_weights(written), _weights(res.saved))
    record = written.provenance["adaptations"][-1]
    assert record["criterion_best"] == pytest.approx(res.criterion_best) and record["planes"] == 2
    assert [u.kind for u in res.history].count("epoch") == 3 and res.history[-1].kind == "done"


def test_adaptation_keeps_the_original_when_no_state_beats_it(tmp_path):
    original = _saved()
    res = adapt(original, _blurred(), _cfg(lr=1e-7, epochs=1), out_path=tmp_path / "a.cgmodel")
    assert res.kept_original and res.saved is original
    assert res.criterion_best == res.criterion_before
    assert torch.equal(_weights(load_model(tmp_path / "a.cgmodel")), _weights(original))


def test_adaptation_is_seeded():
    a = adapt(_saved(), _blurred(), _cfg())
    b = adapt(_saved(), _blurred(), _cfg())
    c = adapt(_saved(), _blurred(), _cfg(seed=1))
    assert not a.kept_original and not c.kept_original
    assert torch.equal(_weights(a.saved), _weights(b.saved))
    assert not torch.equal(_weights(a.saved), _weights(c.saved))


def test_a_stop_keeps_the_best_state_so_far():
    calls = iter(range(1000))
    res = adapt(_saved(), _blurred(), _cfg(epochs=50), should_stop=lambda: next(calls) >= 14)
    assert res.stopped == "stopped" and res.steps == 14
    assert res.criterion_best <= res.criterion_before


def test_adapt_refuses_a_model_without_a_psf_model_unless_one_is_given():
    with pytest.raises(InputError, match="--psf"):
        adapt(_saved(psf=None), _blurred(), _cfg(epochs=1))
    assert adapt(_saved(psf=None), _blurred(), _cfg(epochs=1), psf=PSF).steps == 6


def test_adapt_refuses_images_of_another_field_and_too_small_crops():
    with pytest.raises(InputError, match="--roi"):
        adapt(_saved(), _blurred()[:, :48, :48], _cfg())
    res = adapt(_saved(), _blurred()[:, 8:56, 16:64], _cfg(epochs=1), roi=(8, 16))
    assert res.steps == 6
    with pytest.raises(InputError, match="too small"):  # 32 px crops, 33 px PSFs
        adapt(_saved(), _blurred(), _cfg(crop=32), psf={"model": "gaussian", "psf_size": 33, "sigma_px": 1.0})


def test_adapt_config_needs_gain_and_offset_together():
    with pytest.raises(ConfigError, match="together"):
        AdaptConfig(gain=2.0)
    res = adapt(_saved(), _blurred(), _cfg(epochs=1, gain=4.0, offset=100.0))
    assert not res.noise.estimated and res.noise.slope == 4.0


def test_adapt_refuses_nan_images():
    bad = _blurred()
    bad[0, 3, 3] = np.nan
    with pytest.raises(InputError, match="NaN|finite"):
        adapt(_saved(), bad, _cfg())


def test_crops_reach_every_border_of_the_frame_and_score_it():
    from napari_coordgate.engine.adaptation import AdaptationData
    from napari_coordgate.optics.models import get_psf_model

    data = AdaptationData(_saved(), _blurred()[:, :, :60], _cfg(), get_psf_model(PSF), roi=(0, 0))
    rng = np.random.default_rng(0)
    offsets = np.array([o for _ in range(200) for o in data.crops(rng)[0]])
    assert offsets[:, 0].min() == 0 and offsets[:, 0].max() == 64 - data.crop
    assert offsets[:, 1].min() == 0 and offsets[:, 1].max() == 60 - data.crop  # 60 is off the crop grid
    assert data.scored_window(0, 60 - data.crop) == (0, data.crop - data.pad, data.pad, data.crop)


def test_pseudo_sharp_sources_are_the_crops_where_the_psf_is_sharpest():
    from napari_coordgate.engine.adaptation import AdaptationData, _psf_area
    from napari_coordgate.optics.models import get_psf_model

    psf = get_psf_model(PSF)  # sigma grows toward the edges
    area = _psf_area(psf, (64, 64), (0, 0), (64, 64))
    assert area[32, 32] < area[32, 0] < area[0, 0] and area[0, 0] == pytest.approx(area[63, 63], rel=1e-3)
    data = AdaptationData(_saved(), _blurred(), _cfg(), psf)
    assert (16, 16) in data.sources and (0, 0) not in data.sources and len(data.sources) < 25
    uniform = {"model": "gaussian", "psf_size": 11, "sigma_px": 1.0, "sigma_radial_h2": 0.0,
               "sigma_tangential_h2": 0.0}
    everywhere = AdaptationData(_saved(), _blurred(), _cfg(), get_psf_model(uniform))
    assert len(everywhere.sources) == 25  # a PSF that does not vary: every crop is as sharp as any
    assert AdaptationData(_saved(), _blurred(), _cfg(transfer=0.0), psf).sources == []


def test_a_pseudo_sharp_pair_is_the_restored_sharp_crop_blurred_at_its_place_with_the_camera_noise():
    import torch

    from napari_coordgate.engine.adaptation import AdaptationData
    from napari_coordgate.optics.models import get_psf_model

    saved = _saved()
    data = AdaptationData(saved, _blurred(), _cfg(crop=48), get_psf_model(PSF))
    data.refresh(saved.model, "cpu")
    assert np.array_equal(data.pseudo, data.restore(saved.model, data.y, "cpu"))
    noisy, sharp, var, weight = data._pseudo_item(0, 16, 0, np.random.default_rng(0))
    (sy, sx), = [s for s in data.sources if np.array_equal(data.pseudo[0, s[0]:s[0] + 48, s[1]:s[1] + 48], sharp)]
    clean = data.blur(16, 0, 48, 48).forward(sharp)
    z = (noisy - clean) / np.sqrt(var)
    assert abs(z.mean()) < 0.1 and 0.9 < z.std() < 1.1  # the camera's noise at the blurred level
    assert np.allclose(var, data._plane_noise[0].variance(clean), rtol=1e-5)
    # plane 0 holds the criterion's held-out tiles: they weigh nothing as targets either
    assert np.array_equal(weight, ~data.held_out[sy:sy + 48, sx:sx + 48])
    loss = data.loss(saved.model.train(), np.random.default_rng(1), "cpu")
    assert torch.isfinite(loss) and loss.requires_grad


def test_a_long_stack_is_restored_for_pseudo_sharp_pairs_a_few_planes_per_epoch():
    from napari_coordgate.engine.adaptation import AdaptationData
    from napari_coordgate.optics.models import get_psf_model

    saved = _saved()
    stack = _blurred(n=3)
    data = AdaptationData(saved, stack, _cfg(steps_per_epoch=1, batch=2), get_psf_model(PSF))  # 1024 px a refresh
    data.refresh(saved.model, "cpu")
    assert data._restored == [0] and not data.pseudo[1:].any()
    rng = np.random.default_rng(0)
    for _ in range(10):  # a plane not restored yet lends its draw to a restored one
        _, sharp, _, _ = data._pseudo_item(2, 16, 0, rng)
        assert any(np.array_equal(data.pseudo[0, sy:sy + 32, sx:sx + 32], sharp) for sy, sx in data.sources)
    for expected in ([0, 1], [0, 1, 2], [1, 2, 0]):  # in turn, the oldest restoration first
        data.refresh(saved.model, "cpu")
        assert data._restored == expected
    assert np.array_equal(data.pseudo, data.restore(saved.model, data.y, "cpu"))
