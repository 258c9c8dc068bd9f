import numpy as np
import pytest

from napari_coordgate.optics.blur import synthesize_pairs
from napari_coordgate.optics.noise import NoiseModel, estimate_noise
from napari_coordgate.samples.specimens import specimen_fields


def _camera(gain=2.0, offset=100.0, read=3.0, seed=0):
    """Blurred specimens recorded by a camera: gain units per electron, an offset, read noise in electrons."""
    sharp = specimen_fields(2, (256, 256), seed=seed)
    _, blurred = synthesize_pairs(sharp * 1000.0, "strong_astigmatism", photons=None)
    rng = np.random.default_rng(seed)
    electrons = rng.poisson(np.clip(blurred, 0, None)).astype(float) + rng.normal(0.0, read, blurred.shape)
    return electrons * gain + offset


def test_estimate_noise_measures_the_gain_and_the_read_noise_of_a_camera():
    images = _camera(gain=2.0, offset=100.0, read=3.0)
    model = estimate_noise(images)
    assert model.slope == pytest.approx(2.0, rel=0.2)
    assert model.variance(100.0) == pytest.approx(36.0, rel=0.25)  # read noise 3 e- x gain 2 = 6 units


def test_estimate_noise_with_gain_and_offset_given_measures_only_the_read_noise():
    model = estimate_noise(_camera(gain=2.0, offset=100.0, read=3.0), gain=2.0, offset=100.0)
    assert not model.estimated and model.slope == 2.0
    assert np.sqrt(model.read_variance) == pytest.approx(6.0, rel=0.1)


def test_noise_model_seen_through_a_normalisation_scales_the_variance():
    model = NoiseModel.from_camera(2.0, 100.0, 36.0)
    seen = model.scaled(offset=100.0, scale=50.0)
    x = np.array([100.0, 600.0, 2100.0])
    assert np.allclose(seen.variance((x - 100.0) / 50.0), model.variance(x) / 50.0**2)


def test_estimate_noise_refuses_half_a_camera_and_constant_images():
    with pytest.raises(ValueError, match="together"):
        estimate_noise(_camera(), gain=2.0)
    with pytest.raises(ValueError, match="constant"):
        estimate_noise(np.full((64, 64), 7.0))
