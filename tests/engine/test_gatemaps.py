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


def test_gate_maps_put_x_along_columns_and_y_along_rows_of_a_non_square_field():
    import torch

    from napari_coordgate.config import ModelConfig
    from napari_coordgate.model_io import SavedModel
    from napari_coordgate.nn.unet import build_model

    cfg = ModelConfig(depth=1, channels=2, gate="coordgate")
    model = build_model(cfg).eval()
    convs = [m for m in model.down_gates[0].mlp if isinstance(m, torch.nn.Conv2d)]
    with torch.no_grad():
        for conv in convs:
            conv.weight.zero_()
            conv.bias.zero_()
        convs[0].weight[0, 0] = 1.0  # hidden unit 0 <- coordinate channel 0 (x, columns)
        convs[0].weight[1, 1] = 1.0  # hidden unit 1 <- coordinate channel 1 (y, rows)
        for conv in convs[1:-1]:
            conv.weight[0, 0] = 1.0
            conv.weight[1, 1] = 1.0
        convs[-1].weight[0, 0] = 1.0  # gate channel 0 follows x, gate channel 1 follows y
        convs[-1].weight[1, 1] = 1.0

    maps = gate_maps(SavedModel(model, cfg, (48, 80)))

    assert maps.shape == (2, 48, 80)
    by_x, by_y = maps
    assert np.ptp(by_x, axis=0).max() < 1e-6 and np.ptp(by_x[0]) > 0.1  # constant down a column, varies across
    assert np.ptp(by_y, axis=1).max() < 1e-6 and np.ptp(by_y[:, 0]) > 0.1  # constant along a row, varies down
