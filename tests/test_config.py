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
