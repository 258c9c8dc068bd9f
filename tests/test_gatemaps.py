"""Gate maps of a model's first CoordGate: computed without Qt."""

import numpy as np
import pytest

from napari_coordgate.engine.gatemaps import gate_maps


def test_gate_maps_cover_the_training_field_one_plane_per_channel(tiny_model):
    maps = gate_maps(tiny_model)
    assert maps.shape == (tiny_model.config.channels, *tiny_model.field_shape)
    assert maps.dtype == np.float32 and np.isfinite(maps).all()


def test_gate_maps_of_a_model_without_coordgate_is_a_clear_error():
    from napari_coordgate.config import ModelConfig
    from napari_coordgate.model_io import SavedModel
    from napari_coordgate.nn.unet import build_model

    cfg = ModelConfig(depth=1, channels=2, gate="none")
    with pytest.raises(ValueError, match="no CoordGate"):
        gate_maps(SavedModel(build_model(cfg), cfg, (32, 32)))
