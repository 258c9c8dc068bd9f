import json

import pytest

from napari_coordgate.config import ConfigError, ModelConfig


def test_json_round_trip_is_exact():
    cfg = ModelConfig(depth=4, channels=8, growth=1.5, gate="coordconv", residual=False)
    again = ModelConfig.from_json(cfg.to_json())
    assert again == cfg
    assert json.loads(cfg.to_json())["schema_version"] == ModelConfig.SCHEMA_VERSION


@pytest.mark.parametrize(
    "changes, field",
    [
        ({"depth": 0}, "depth"),
        ({"depth": 9}, "depth"),
        ({"channels": 2.5}, "channels"),
        ({"depth": True}, "depth"),
        ({"gate": "attention"}, "gate"),
        ({"gate_activation": "tanh"}, "gate_activation"),
        ({"growth": float("nan")}, "growth"),
        ({"residual": "yes"}, "residual"),
    ],
)
def test_out_of_range_values_name_the_field(changes, field):
    with pytest.raises(ConfigError, match=f"ModelConfig.{field}"):
        ModelConfig(**changes)


def test_unknown_keys_are_rejected_and_listed():
    data = ModelConfig().to_dict()
    data["dropout"] = 0.1
    with pytest.raises(ConfigError, match="unknown key.*dropout"):
        ModelConfig.from_dict(data)


def test_newer_schema_and_foreign_kind_are_rejected():
    data = ModelConfig().to_dict()
    with pytest.raises(ConfigError, match="schema version"):
        ModelConfig.from_dict({**data, "schema_version": 99})
    with pytest.raises(ConfigError, match="expected a 'model' config"):
        ModelConfig.from_dict({**data, "kind": "psf"})


def test_integral_float_is_accepted_as_int():
    assert ModelConfig.from_dict({"depth": 3.0}).depth == 3


def test_residual_needs_matching_channels():
    with pytest.raises(ConfigError, match="residual"):
        ModelConfig(in_channels=1, out_channels=2)


def test_level_channels_and_min_size():
    cfg = ModelConfig(depth=3, channels=16, growth=2.0)
    assert cfg.level_channels() == [16, 32, 64]
    assert cfg.min_size == 4


def test_invalid_json_is_a_config_error():
    with pytest.raises(ConfigError, match="invalid JSON"):
        ModelConfig.from_json("{depth: 2")


# -- TrainConfig --------------------------------------------------------------------------------------------------
def test_train_config_defaults_are_the_measured_recipe_and_a_ten_minute_budget():
    from napari_coordgate.config import TrainConfig

    cfg = TrainConfig()
    assert (cfg.minutes, cfg.epochs) == (10.0, 0)
    assert (cfg.crop, cfg.batch, cfg.sampling, cfg.loss, cfg.lr, cfg.schedule) == (
        128, 8, "cover", "l2", 3e-3, "cosine")
    # the coordinate MLPs' rate: 10x in 2-D (the recipe), 1x in 3-D (10x collapsed 3-D runs), unless given
    assert cfg.gate_lr_scale is None
    assert (cfg.gate_lr_scale_for(2), cfg.gate_lr_scale_for(3)) == (10.0, 1.0)
    given = TrainConfig(gate_lr_scale=3.0)
    assert given.gate_lr_scale_for(3) == given.gate_lr_scale_for(2) == 3.0
    assert (cfg.device, cfg.threads, cfg.register, cfg.val_tile) == ("auto", 0, False, 32)


def test_train_config_json_round_trip_is_exact():
    from napari_coordgate.config import TrainConfig

    cfg = TrainConfig(crop=64, batch=4, sampling="uniform", lr=1e-3, loss="l1", schedule="plateau", epochs=7,
                      patience=2, seed=5, device="cuda:1", threads=1, register=True, photons=300.0)
    assert TrainConfig.from_json(cfg.to_json()) == cfg
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("changes, field", [
    ({"crop": 8}, "crop"),
    ({"batch": 0}, "batch"),
    ({"lr": 2.0}, "lr"),
    ({"sampling": "edges"}, "sampling"),
    ({"loss": "l3"}, "loss"),
    ({"schedule": "step"}, "schedule"),
    ({"gate_lr_scale": 0.0}, "gate_lr_scale"),
    ({"steps_per_epoch": 0}, "steps_per_epoch"),
    ({"seed": -1}, "seed"),
    ({"device": "tpu"}, "device"),
    ({"photons": 0.5}, "photons"),
    ({"register": "yes"}, "register"),
])
def test_train_config_out_of_range_values_name_the_field(changes, field):
    from napari_coordgate.config import TrainConfig

    with pytest.raises(ConfigError, match=f"TrainConfig.{field}"):
        TrainConfig(**changes)


def test_train_config_needs_a_budget():
    from napari_coordgate.config import TrainConfig

    with pytest.raises(ConfigError, match="give a budget"):
        TrainConfig(epochs=0, minutes=0.0)
    assert TrainConfig(epochs=3, minutes=0.0).epochs == 3


def test_train_config_rejects_unknown_keys_and_other_kinds():
    from napari_coordgate.config import TrainConfig

    with pytest.raises(ConfigError, match="unknown key.*momentum"):
        TrainConfig.from_dict({**TrainConfig().to_dict(), "momentum": 0.9})
    with pytest.raises(ConfigError, match="expected a 'train' config"):
        TrainConfig.from_dict(ModelConfig().to_dict())


# -- ModelConfig in 3-D -------------------------------------------------------------------------------------------
def test_a_model_config_without_ndim_loads_as_the_2d_model_it_was():
    old = {k: v for k, v in ModelConfig(depth=3).to_dict().items() if k not in ("ndim", "z_pool_start")}
    cfg = ModelConfig.from_dict(old)
    assert (cfg.ndim, cfg.z_pool_start, cfg.min_depth) == (2, 1, 1)
    assert cfg == ModelConfig(depth=3)


def test_3d_config_round_trips_and_counts_its_z_poolings():
    cfg = ModelConfig(ndim=3, depth=4, z_pool_start=3)
    assert ModelConfig.from_json(cfg.to_json()) == cfg
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    assert [cfg.pools_z(p) for p in (1, 2, 3)] == [False, False, True]
    assert (cfg.z_poolings, cfg.min_depth, cfg.min_size) == (1, 2, 8)
    assert ModelConfig(ndim=3, depth=4).min_depth == 8  # isotropic
    assert ModelConfig(ndim=3, depth=4, z_pool_start=4).min_depth == 1
    assert ModelConfig(ndim=3, depth=4, z_pool_start=8).min_depth == 1


@pytest.mark.parametrize("changes, message", [
    ({"prefilter": "wiener"}, "Wiener first stage is 2-D only.*prefilter='none'"),
    ({"gate": "coordconv"}, "CoordConv is 2-D only.*gate='coordgate'"),
])
def test_a_3d_config_refuses_the_2d_only_parts_and_says_why(changes, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig(ndim=3, **changes)
    assert ModelConfig(**changes).ndim == 2


def test_z_pooling_is_refused_for_a_2d_model_and_ndim_is_bounded():
    with pytest.raises(ConfigError, match="z_pool_start applies to 3-D models only"):
        ModelConfig(z_pool_start=2)
    with pytest.raises(ConfigError, match="ModelConfig.ndim"):
        ModelConfig(ndim=4)


@pytest.mark.parametrize("z_step, pixel, start", [
    (0.1, 0.1, 1), (0.2, 0.1, 2), (0.3, 0.1, 3), (0.4, 0.1, 3), (0.05, 0.1, 1), (0.25, 0.065, 3), (1e6, 1.0, 8),
])
def test_z_pool_start_pools_z_once_the_xy_pooling_reaches_the_z_step(z_step, pixel, start):
    from napari_coordgate.config import z_pool_start_for

    assert z_pool_start_for(z_step, pixel) == start
    assert ModelConfig(ndim=3, depth=8, z_pool_start=start).z_pool_start == start  # a valid value


@pytest.mark.parametrize("z_step, pixel", [(0.0, 0.1), (0.1, -1.0), (float("nan"), 0.1), (True, 0.1)])
def test_z_pool_start_for_refuses_what_is_not_a_positive_length(z_step, pixel):
    from napari_coordgate.config import z_pool_start_for

    with pytest.raises(ConfigError, match="must be a positive number"):
        z_pool_start_for(z_step, pixel)


def test_2d_model_config_dict_is_the_one_written_before_3d_models_existed():
    from napari_coordgate.config import ModelConfig

    d2 = ModelConfig(depth=3).to_dict()
    assert "ndim" not in d2 and "z_pool_start" not in d2
    assert ModelConfig.from_dict(d2) == ModelConfig(depth=3)
    d3 = ModelConfig(ndim=3, z_pool_start=2, depth=3).to_dict()
    assert d3["ndim"] == 3 and d3["z_pool_start"] == 2
    assert ModelConfig.from_dict(d3) == ModelConfig(ndim=3, z_pool_start=2, depth=3)
