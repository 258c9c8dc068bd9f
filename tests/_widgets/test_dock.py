"""The CoordGate dock in a real viewer: train, stop, apply, evaluate, errors, cancellation, isolation."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import TIMEOUT, make_tiny, wait_idle

from napari_coordgate._widgets._train_tab import SIMULATED
from napari_coordgate.app.state import State


def _notifications():
    from napari.utils.notifications import notification_manager

    seen = []
    notification_manager.notification_ready.connect(lambda ev: seen.append(ev.value.message)
                                                    if hasattr(ev, "value") else seen.append(str(ev)))
    return seen


def test_dock_opens_from_the_plugin_and_lists_the_sample_layers(viewer_dock):
    viewer, dock = viewer_dock
    viewer.open_sample("napari-coordgate", "calibration_pair")
    names = [dock.train_tab.sharp.itemText(i) for i in range(dock.train_tab.sharp.count())]
    assert names == ["calibration (sharp)", "calibration (blurred)"]
    assert dock.train_tab.start_btn.isEnabled()
    assert not dock.apply_tab.apply_btn.isEnabled(), "apply needs a model"
    assert not dock.train_tab.stop_btn.isEnabled()


def test_training_a_tiny_model_on_the_sample_pair_finishes_with_a_model(viewer_dock, qtbot):
    viewer, dock = viewer_dock
    viewer.open_sample("napari-coordgate", "calibration_pair")
    t = dock.train_tab
    t.sharp.setCurrentText("calibration (sharp)")
    t.blurred.setCurrentText("calibration (blurred)")
    make_tiny(dock, epochs=2)
    t.start_btn.click()
    assert dock.state is State.TRAINING and t.stop_btn.isEnabled() and not t.start_btn.isEnabled()
    wait_idle(qtbot, dock)
    assert dock.model is not None and dock.last_result.stopped == "budget"
    assert [u.kind for u in t.history].count("epoch") == 2
    assert t.device_used.text() == "cpu"
    assert len(t.plot.ax2.lines) == 2, "validation PSNR and the input's PSNR line are plotted"
    assert dock.apply_tab.apply_btn.isEnabled()


def test_training_from_sharp_layer_and_psf_preset(viewer_dock, qtbot, pair64):
    viewer, dock = viewer_dock
    viewer.add_image(pair64[0], name="sharp")
    t = dock.train_tab
    t.mode.setCurrentText(SIMULATED)
    t.preset.setCurrentText("gaussian")
    make_tiny(dock)
    t.start_btn.click()
    wait_idle(qtbot, dock)
    assert dock.model.psf.name == "gaussian"


def test_pairs_with_a_wiener_first_stage_train_with_the_chosen_psf_model(viewer_dock, qtbot, pair64):
    viewer, dock = viewer_dock
    viewer.add_image(pair64[0], name="sharp")
    viewer.add_image(pair64[1], name="blurred")
    t = dock.train_tab
    t.sharp.setCurrentText("sharp")
    t.blurred.setCurrentText("blurred")
    t.preset.setCurrentText("gaussian")
    t.prefilter.value = "wiener"
    make_tiny(dock)
    t.start_btn.click()
    wait_idle(qtbot, dock)
    assert dock.model.config.prefilter == "wiener"
    assert dock.model.psf.name == "gaussian"
    assert dock.model.model.prefilter.kernels.abs().sum() > 0


def test_show_psf_grid_adds_the_grid_layer(viewer_dock, qtbot):
    viewer, dock = viewer_dock
    dock.train_tab.preset.setCurrentText("gaussian")
    dock.train_tab.grid_btn.click()
    wait_idle(qtbot, dock)
    assert "PSF grid (gaussian)" in viewer.layers


def test_stop_mid_training_keeps_the_best_model(viewer_dock, qtbot, pair64):
    viewer, dock = viewer_dock
    viewer.add_image(pair64[0], name="sharp")
    viewer.add_image(pair64[1], name="blurred")
    t = dock.train_tab
    t.blurred.setCurrentText("blurred")
    make_tiny(dock, epochs=10_000, steps=2)
    t.start_btn.click()
    qtbot.waitUntil(lambda: sum(u.kind == "epoch" for u in t.history) >= 2, timeout=TIMEOUT)
    t.stop_btn.click()
    assert dock.state is State.STOPPING
    wait_idle(qtbot, dock)
    result = dock.last_result
    assert result is not None, dock.status.text()
    assert result.stopped == "stopped"
    assert result.best_val_psnr == max(u.val_psnr for u in result.history if u.kind == "epoch")
    assert dock.model is result.saved


def _progress_log(dock):
    log = []
    dock.progressed.connect(lambda task, done, total: log.append((task, done, total)))
    return log


@pytest.mark.parametrize("shape", [(64, 64), (3, 64, 64)], ids=["2d", "stack"])
def test_apply_keeps_shape_and_spatial_metadata_and_reports_progress(viewer_dock, qtbot, tiny_model, pair64, shape):
    viewer, dock = viewer_dock
    dock.set_model(tiny_model, "test")
    data = np.broadcast_to(pair64[1], shape).copy()
    n = len(shape)
    scale, translate = (2.0, 0.5, 0.5)[-n:], (10.0, 4.0, -3.0)[-n:]
    labels, units = ("t", "y", "x")[-n:], ("s", "µm", "µm")[-n:]
    viewer.add_image(data, name="raw", scale=scale, translate=translate, axis_labels=labels, units=units)
    dock.apply_tab.image.setCurrentText("raw")
    log = _progress_log(dock)
    dock.apply_tab.apply_btn.click()
    assert dock.state is State.APPLYING
    wait_idle(qtbot, dock)
    out = viewer.layers["raw (CoordGate)"]
    assert out.data.shape == shape and out.data.dtype == np.float32
    assert tuple(out.scale) == scale and tuple(out.translate) == translate
    assert tuple(out.axis_labels) == labels
    assert [str(u) for u in out.units] == [str(u) for u in viewer.layers["raw"].units]
    assert log and log[-1][0] == "apply" and log[-1][1] == log[-1][2]
    from napari_coordgate import engine

    np.testing.assert_allclose(out.data, engine.predict(tiny_model, data, device="cpu"), atol=1e-5)


def test_apply_to_a_camera_roi_uses_its_place_in_the_field(viewer_dock, qtbot, tiny_model, pair64):
    viewer, dock = viewer_dock
    dock.set_model(tiny_model, "test")
    roi = np.ascontiguousarray(pair64[1][16:48, 8:40])
    viewer.add_image(roi, name="roi")
    tab = dock.apply_tab
    tab.image.setCurrentText("roi")
    seen = _notifications()
    tab.apply_btn.click()  # a 32x32 image of a 64x64 field needs its position
    wait_idle(qtbot, dock)
    assert "roi (CoordGate)" not in viewer.layers
    assert any("position in the field" in m for m in seen)
    tab.roi.setText("16, 8")
    tab.apply_btn.click()
    wait_idle(qtbot, dock)
    from napari_coordgate import engine

    expected = engine.predict(tiny_model, roi, roi=(16, 8), device="cpu")
    np.testing.assert_allclose(viewer.layers["roi (CoordGate)"].data, expected, atol=1e-5)
    tab.roi.setText("a,b")
    tab.apply_btn.click()
    assert dock.state is State.IDLE  # a bad ROI is an error message, no job


def test_cancel_stops_a_prediction_and_adds_no_layer(viewer_dock, qtbot, tiny_model, pair64):
    viewer, dock = viewer_dock
    dock.set_model(tiny_model, "test")
    viewer.add_image(np.broadcast_to(pair64[1], (40, 64, 64)).copy(), name="long")
    dock.apply_tab.image.setCurrentText("long")
    dock.apply_tab.tile.value = 8  # many small tiles: time to cancel
    dock.progressed.connect(lambda *_: dock.apply_tab.cancel_btn.click() if dock.state is State.APPLYING else None)
    dock.apply_tab.apply_btn.click()
    wait_idle(qtbot, dock)
    assert "long (CoordGate)" not in viewer.layers
    assert dock.apply_tab.apply_btn.isEnabled()


def test_a_dask_backed_layer_is_processed_without_materialising_it(viewer_dock, qtbot, tiny_model, pair64,
                                                                  monkeypatch):
    da = pytest.importorskip("dask.array")
    viewer, dock = viewer_dock
    dock.set_model(tiny_model, "test")
    stack = da.from_array(np.broadcast_to(pair64[1], (4, 64, 64)).copy(), chunks=(1, 64, 64))
    viewer.add_image(stack, name="lazy")
    computed = []

    def recording(method):
        def wrapper(self, *args, **kwargs):
            computed.append(self.size)
            return method(self, *args, **kwargs)

        return wrapper

    monkeypatch.setattr(da.Array, "__array__", recording(da.Array.__array__))
    monkeypatch.setattr(da.Array, "compute", recording(da.Array.compute))
    dock.apply_tab.image.setCurrentText("lazy")
    dock.apply_tab.apply_btn.click()
    wait_idle(qtbot, dock)
    assert viewer.layers["lazy (CoordGate)"].data.shape == (4, 64, 64)
    assert computed and max(computed) <= 64 * 64, "the whole stack was read at once"


def test_multichannel_applies_one_model_per_channel(viewer_dock, qtbot, tiny_model, pair64, tmp_path):
    from napari_coordgate import engine
    from napari_coordgate.model_io import SavedModel, load_model, save_model

    viewer, dock = viewer_dock
    brighter = SavedModel(tiny_model.model, tiny_model.config, tiny_model.field_shape,
                          {"offset": 0.0, "scale": 2.0})
    paths = [str(save_model(tmp_path / "a", tiny_model)), str(save_model(tmp_path / "b", brighter))]
    data = np.stack([pair64[1], pair64[1]])[None]  # (T=1, C=2, H, W)
    viewer.add_image(data, name="two channels")
    tab = dock.apply_tab
    tab.image.setCurrentText("two channels")
    tab.channel_axis.setCurrentIndex(2)  # "none", axis 0, axis 1
    tab.models.setText(";".join(paths))
    tab.apply_btn.click()  # no model in the dock: the per-channel files are enough
    wait_idle(qtbot, dock)
    out = viewer.layers["two channels (CoordGate)"].data
    for c, p in enumerate(paths):
        np.testing.assert_allclose(out[0, c], engine.predict(load_model(p), data[0, c], device="cpu"), atol=1e-5)


def test_a_result_can_be_written_to_a_memory_mapped_file(viewer_dock, qtbot, tiny_model, pair64, tmp_path):
    viewer, dock = viewer_dock
    dock.set_model(tiny_model, "test")
    viewer.add_image(pair64[1], name="raw")
    dock.apply_tab.out_path.setText(str(tmp_path / "result.npy"))
    dock.apply_tab.apply_btn.click()
    wait_idle(qtbot, dock)
    assert isinstance(viewer.layers["raw (CoordGate)"].data, np.memmap)
    assert np.load(tmp_path / "result.npy").shape == (64, 64)


def test_classical_comparison_adds_rl_and_sv_rl_layers(viewer_dock, qtbot, pair64):
    viewer, dock = viewer_dock
    viewer.add_image(pair64[1], name="raw", scale=(0.5, 0.5))
    dock.train_tab.preset.setCurrentText("gaussian")
    dock.apply_tab.image.setCurrentText("raw")
    dock.apply_tab.iterations.setValue(3)
    dock.apply_tab.compare_btn.click()
    wait_idle(qtbot, dock)
    for method in ("RL-central", "SV-RL"):
        layer = viewer.layers[f"raw ({method})"]
        assert layer.data.shape == (64, 64) and tuple(layer.scale) == (0.5, 0.5)


def test_evaluate_fills_the_table_and_adds_a_scaled_error_map(viewer_dock, qtbot, pair64):
    viewer, dock = viewer_dock
    sharp, blurred = pair64
    viewer.add_image(sharp, name="gt")
    viewer.add_image(blurred, name="blurred")
    viewer.add_image((sharp + blurred) / 2, name="restored", scale=(0.5, 0.5), translate=(1, 2))
    tab = dock.eval_tab
    tab.gt.setCurrentText("gt")
    tab.restored.setCurrentText("restored")
    tab.blurred.setCurrentText("blurred")
    tab.eval_btn.click()
    wait_idle(qtbot, dock)
    emap = viewer.layers["error map (restored)"]
    assert emap.data.shape == (64, 64) and tuple(emap.scale) == (0.5, 0.5) and tuple(emap.translate) == (1, 2)
    assert tab.table.rowCount() == 5 and tab.table.verticalHeaderItem(0).text() == "PSNR (dB)"
    restored_psnr, blurred_psnr = float(tab.table.item(0, 1).text()), float(tab.table.item(0, 0).text())
    assert restored_psnr > blurred_psnr
    assert len(tab.plot.ax.lines) == 2, "radial PSNR of restored and blurred"


def test_show_gates_adds_one_plane_per_channel(viewer_dock, qtbot, tiny_model):
    viewer, dock = viewer_dock
    dock.set_model(tiny_model, "test")
    dock.eval_tab.gates_btn.click()
    wait_idle(qtbot, dock)
    layer = viewer.layers["CoordGate gates (first gate)"]
    assert layer.data.shape == (tiny_model.config.channels, *tiny_model.field_shape)


def test_save_and_load_model_round_trip_through_the_dock(viewer_dock, qtbot, tiny_model, tmp_path, monkeypatch):
    from napari_coordgate._widgets import _model_tab

    _, dock = viewer_dock
    dock.set_model(tiny_model, "test")
    # the Train tab's Save asks the dock, which opens the Model tab's dialog
    monkeypatch.setattr(_model_tab.QFileDialog, "getSaveFileName", lambda *a: (str(tmp_path / "m"), ""))
    dock.train_tab.save_btn.click()
    wait_idle(qtbot, dock)
    assert (tmp_path / "m.cgmodel").exists() and dock.model_origin.endswith("m.cgmodel")
    dock.load_model_file(str(tmp_path / "m.cgmodel"))
    wait_idle(qtbot, dock)
    assert dock.model is not tiny_model and dock.model_origin.endswith("m.cgmodel")
    assert "64 x 64" in dock.model_tab.info.text()


def test_a_failing_worker_shows_a_notification_and_leaves_the_dock_usable(viewer_dock, qtbot, pair64, tiny_model):
    viewer, dock = viewer_dock
    seen = _notifications()
    viewer.add_image(pair64[0], name="sharp")
    viewer.add_image(pair64[1][:48], name="wrong shape")
    t = dock.train_tab
    t.blurred.setCurrentText("wrong shape")
    make_tiny(dock)
    failures = []
    dock.task_failed.connect(failures.append)
    t.start_btn.click()
    wait_idle(qtbot, dock)
    qtbot.waitUntil(lambda: bool(seen), timeout=5000)
    assert failures and dock.model is None
    assert t.start_btn.isEnabled()
    # still usable: a valid job runs to the end
    dock.set_model(tiny_model, "test")
    dock.apply_tab.image.setCurrentText("sharp")
    dock.apply_tab.apply_btn.click()
    wait_idle(qtbot, dock)
    assert "sharp (CoordGate)" in viewer.layers


def test_closing_the_viewer_during_training_stops_the_worker(make_napari_viewer, qtbot, pair64):
    viewer = make_napari_viewer(show=True)
    _, dock = viewer.window.add_plugin_dock_widget("napari-coordgate", "CoordGate deblur")
    viewer.add_image(pair64[0], name="sharp")
    viewer.add_image(pair64[1], name="blurred")
    dock.train_tab.blurred.setCurrentText("blurred")
    make_tiny(dock, epochs=100_000, steps=2)
    dock.train_tab.start_btn.click()
    task = dock.runner.task
    qtbot.waitUntil(lambda: len(dock.train_tab.history) > 0, timeout=TIMEOUT)
    viewer.close()
    qtbot.waitUntil(task.finished.is_set, timeout=TIMEOUT)
    assert task.stop.is_set()


def test_dock_instances_share_no_state(make_napari_viewer, tiny_model):
    import importlib
    import pkgutil
    import types

    import napari_coordgate._widgets as pkg

    v1, v2 = make_napari_viewer(), make_napari_viewer()
    _, d1 = v1.window.add_plugin_dock_widget("napari-coordgate", "CoordGate deblur")
    _, d2 = v2.window.add_plugin_dock_widget("napari-coordgate", "CoordGate deblur")
    d1.set_model(tiny_model, "test")
    d1.settings["model_folder"] = "/somewhere"
    assert d2.model is None and d2.settings["model_folder"] != "/somewhere"
    assert d1.runner is not d2.runner
    for info in pkgutil.iter_modules(pkg.__path__):
        module = importlib.import_module(f"{pkg.__name__}.{info.name}")
        for name, value in vars(module).items():
            if not name.startswith("__") and not isinstance(value, types.ModuleType):
                assert not isinstance(value, (list, dict, set)), f"{info.name}.{name} is mutable module state"


def test_a_stack_result_can_be_written_to_a_zarr_store(viewer_dock, qtbot, tiny_model, pair64, tmp_path):
    zarr = pytest.importorskip("zarr")
    from napari_coordgate import engine
    viewer, dock = viewer_dock
    dock.set_model(tiny_model, "test")
    stack = np.stack([pair64[1], pair64[1] * 0.5])
    viewer.add_image(stack, name="raw")
    dock.apply_tab.out_path.setText(str(tmp_path / "result.zarr"))
    dock.apply_tab.apply_btn.click()
    wait_idle(qtbot, dock)
    stored = zarr.open_array(str(tmp_path / "result.zarr" / "0"), mode="r")  # an OME-Zarr image's level 0
    assert stored.shape == (2, 64, 64) and not (tmp_path / "result.zarr.partial").exists()
    np.testing.assert_allclose(np.asarray(stored[1]), engine.predict(tiny_model, stack[1], device="cpu"), atol=1e-5)
