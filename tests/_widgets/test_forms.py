"""The dock's inputs come from the configs: same defaults, ranges and choices as config.py (and the CLI)."""

from __future__ import annotations

import pytest

from napari_coordgate.config import ConfigError, ModelConfig, PredictConfig, TrainConfig, field_specs


@pytest.mark.parametrize("tab, form, cls", [("train_tab", "model_form", ModelConfig),
                                            ("train_tab", "train_form", TrainConfig),
                                            ("apply_tab", "predict_form", PredictConfig)])
def test_every_input_has_its_config_fields_default_range_and_choices(viewer_dock, tab, form, cls):
    _, dock = viewer_dock
    widgets = {w.name: w for w in getattr(getattr(dock, tab), form)}
    for spec in field_specs(cls, list(widgets)):
        w = widgets[spec.name]
        if spec.name != "device" and not (cls is PredictConfig and spec.name == "tile"):  # from Preferences
            assert w.value == spec.default, spec.name
        if spec.options is not None:
            assert set(spec.options) <= set(w.choices), spec.name
        elif spec.kind in (int, float):
            assert (w.min, w.max) == (spec.lo, min(spec.hi, 2**31 - 1)), spec.name
        assert spec.doc in (w.tooltip or ""), spec.name


def test_the_train_tab_builds_its_configs_from_the_forms(viewer_dock):
    _, dock = viewer_dock
    t = dock.train_tab
    t.depth.value, t.gate.value, t.crop.value = 3, "coordconv", 64
    assert t.model_config() == ModelConfig(depth=3, gate="coordconv")
    assert t.train_config().crop == 64 and t.train_config().epochs == 0 and t.train_config().minutes == 10.0
    t.budget_kind.value = "epochs"
    t.budget.value = 7
    assert t.train_config().epochs == 7
    t.budget_kind.value = "minutes"
    assert t.train_config().epochs == 0
    t.train_form.brightness.value, t.train_form.photons.value = 32.0, 5000.0  # bright beads, a brighter camera
    assert (t.train_config().brightness, t.train_config().photons) == (32.0, 5000.0)


def test_the_apply_tab_passes_precision_and_batching_to_the_job(viewer_dock, tiny_model, pair64):
    viewer, dock = viewer_dock
    dock.set_model(tiny_model, "test")
    viewer.add_image(pair64[1], name="raw")
    tab = dock.apply_tab
    tab.image.setCurrentText("raw")
    tab.precision.value, tab.batch_tiles.value, tab.tile.value = "bf16", 4, 32
    req, _ = tab.request()
    assert req.predict == PredictConfig(tile=32, device=tab.device.value, precision="bf16", batch_tiles=4)
    tab.roi.setText("1,x")
    with pytest.raises(ConfigError, match="'Y,X'"):
        tab.request()


def test_the_calibrate_form_has_calibrate_configs_ranges_and_shows_unset_fields_as_not_given(viewer_dock):
    from napari_coordgate._widgets._form import NOT_GIVEN
    from napari_coordgate.config import CalibrateConfig

    _, dock = viewer_dock
    form = dock.calibrate_tab.form
    widgets = {w.name: w for w in form}
    for spec in field_specs(CalibrateConfig, list(widgets)):
        w = widgets[spec.name]
        assert spec.doc in (w.tooltip or ""), spec.name
        if spec.options is not None:
            assert list(w.choices) == list(spec.options) and w.value == spec.default, spec.name
        elif spec.optional:
            step = spec.step or 1
            assert w.min == pytest.approx(spec.lo - step) and w.value == w.min, spec.name
            assert w.native.text() == NOT_GIVEN, spec.name
            assert w.max == min(spec.hi or 2**31 - 1, 2**31 - 1), spec.name
        else:
            assert (w.min, w.max, w.value) == (spec.lo, spec.hi, spec.default), spec.name
    assert form.config() == CalibrateConfig()
    form.psf_size.value = 8
    with pytest.raises(ConfigError, match="psf_size must be odd"):
        form.config()
    form.set_config(CalibrateConfig(psf_size=15, na=0.8))
    assert form.config() == CalibrateConfig(psf_size=15, na=0.8) and form.grid.native.text() == NOT_GIVEN
