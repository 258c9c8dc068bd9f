"""The model shipped for the bundled sample optics loads and restores the sample pair (no training needed)."""

import numpy as np
from skimage.metrics import peak_signal_noise_ratio

from napari_coordgate import engine
from napari_coordgate.config import ModelConfig
from napari_coordgate.model_io import load_model
from napari_coordgate.samples.sample_data import calibration_pair
from napari_coordgate.samples.sample_model import sample_model_path

# measured when the shipped file was made (python -m napari_coordgate.samples.sample_model): 26.81 -> 36.92 dB
MIN_GAIN_DB = 8.0


def test_the_sample_model_is_small_and_says_it_knows_only_the_synthetic_optics():
    path = sample_model_path()
    assert path.stat().st_size < 150_000
    saved = load_model(path)
    assert saved.config == ModelConfig() and saved.field_shape == (256, 256)
    assert "synthetic" in saved.provenance["note"] and saved.psf.name == "gaussian"


def test_the_sample_model_restores_the_sample_pair():
    (sharp, _, _), (blurred, _, _) = calibration_pair()
    restored = engine.predict(load_model(sample_model_path()), blurred, device="cpu")
    rng = float(np.ptp(sharp))
    gain = peak_signal_noise_ratio(sharp, restored, data_range=rng) - peak_signal_noise_ratio(sharp, blurred,
                                                                                             data_range=rng)
    assert gain >= MIN_GAIN_DB, f"the sample model gains only {gain:.2f} dB on the sample pair"
