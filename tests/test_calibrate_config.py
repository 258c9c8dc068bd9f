"""CalibrateConfig: calibrate()'s keyword arguments with their units and bounds in one place (the CLI's calibrate
flags and the Calibrate tab's form are generated from it)."""

from __future__ import annotations

import inspect

import numpy as np
import pytest

from napari_coordgate import config
from napari_coordgate.config import CalibrateConfig, ConfigError, field_specs

NOT_SETTINGS = {"images", "should_stop", "report", "source"}  # what calibrate() takes beside its settings


def test_the_config_gives_exactly_calibrates_keyword_arguments():
    from napari_coordgate.calibration.calibrate import calibrate

    params = set(inspect.signature(calibrate).parameters) - NOT_SETTINGS
    assert set(CalibrateConfig().calibrate_kwargs()) == params


def test_calibrate_kwargs_convert_nanometres_and_a_zero_bead_to_calibrates_units():
    cfg = CalibrateConfig(na=1.4, wavelength_nm=520.0, immersion=1.518, pixel_size_um=0.1, bead_diameter_nm=0.0)
    kwargs = cfg.calibrate_kwargs()
    assert kwargs["wavelength_um"] == pytest.approx(0.52) and "wavelength_nm" not in kwargs
    assert kwargs["bead_diameter_nm"] is None, "no diameter: point sources"
    assert CalibrateConfig(bead_diameter_nm=200.0).calibrate_kwargs()["bead_diameter_nm"] == 200.0


def test_from_calibrate_kwargs_inverts_calibrate_kwargs_and_takes_numpy_integers():
    cfg = CalibrateConfig(model="grid", grid=7, wavelength_nm=680.0, psf_size=21, bead_diameter_nm=175.0,
                          holdout=0.2, min_snr=3.0, device="cpu")
    assert CalibrateConfig.from_calibrate_kwargs(**cfg.calibrate_kwargs()) == cfg
    assert CalibrateConfig.from_calibrate_kwargs(grid=np.int64(5)).grid == 5


def test_the_bead_diameter_bounds_are_those_of_optics_bead():
    from napari_coordgate.optics.bead import BEAD_LIMITS_NM

    spec = field_specs(CalibrateConfig, ["bead_diameter_nm"])[0]
    assert (spec.lo, spec.hi) == BEAD_LIMITS_NM == config.BEAD_LIMITS_NM


@pytest.mark.parametrize("bad, message", [
    ({"grid": 0}, r"grid must be in \[1, 25\]"), ({"grid": 26}, r"grid must be in \[1, 25\]"),
    ({"psf_size": 8}, "must be odd"), ({"psf_size": 5}, r"psf_size must be in \[7, inf\]"),
    ({"na": 1.5, "immersion": 1.33}, "smaller than the immersion index"),
    ({"bead_diameter_nm": 6000.0}, r"bead_diameter_nm must be in \[0.0, 5000.0\]"),
    ({"holdout": 0.6}, r"holdout must be in \[0.0, 0.5\]"), ({"model": "spline"}, "must be one of"),
    ({"wavelength_nm": 0.52}, "wavelength_nm must be in"),  # µm given where nm are asked
])
def test_a_bad_setting_is_one_error_naming_the_field_and_its_bounds(bad, message):
    with pytest.raises(ConfigError, match=message):
        CalibrateConfig(**bad)


def test_optional_fields_accept_not_given_and_the_json_round_trip_keeps_it():
    cfg = CalibrateConfig()
    assert cfg.grid is None and cfg.pixel_size_um is None and cfg.psf_size is None
    assert CalibrateConfig.from_json(cfg.to_json()) == cfg
    assert all(s.optional == (s.default is None) for s in field_specs(CalibrateConfig))
    with pytest.raises(ConfigError, match="unknown key"):
        CalibrateConfig.from_dict({"wavelength_um": 0.5})
