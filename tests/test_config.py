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
    assert (cfg.crop, cfg.batch, cfg.sampling, cfg.loss, cfg.lr, cfg.gate_lr_scale, cfg.schedule) == (
        128, 8, "cover", "l2", 3e-3, 10.0, "cosine")
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
