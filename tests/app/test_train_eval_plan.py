"""What the Train and Evaluate tabs do with z-stacks, without Qt: the training plan (a 3-D model for a 3-D PSF model
or z-stack pairs, one-line refusals otherwise), built-in volumes drawn by the job, 3-D PSF grids, and evaluation of
volumes by depth with a (Z, Y, X) error map."""

from __future__ import annotations

import numpy as np
import pytest

from napari_coordgate.app.axes import LayerAxes, TrainPlan, layer_axes, scored_as_volumes, train_plan
from napari_coordgate.app.jobs import BuiltinSpecimens, evaluate_job, psf_grid_job
from napari_coordgate.config import ConfigError, ModelConfig, z_pool_start_for
from napari_coordgate.optics.psf import PRESETS, PSFConfig
from napari_coordgate.optics.psf3d import PRESETS_3D, Pupil3DPSF

PSF3D = PRESETS_3D["tilted_curved_3d"]  # z-step 0.25 µm, pixel 0.13 µm
PSF2D = PRESETS["gaussian"]


def _stack(name="s", shape=(8, 32, 32), z=0.25, pixel=0.13):
    return LayerAxes(name, shape, z, pixel)


def _never(*_, **__):
    return False


def test_a_layer_reads_its_z_step_and_pixel_from_a_length_unit_and_nothing_from_pixels():
    assert layer_axes("a", (8, 32, 32), (0.3, 0.1, 0.1), ("µm",) * 3) == LayerAxes("a", (8, 32, 32), 0.3, 0.1)
    plain = layer_axes("b", (8, 32, 32), (1, 1, 1), ("pixel",) * 3)
    assert plain.z_step_um is None and not plain.is_zstack
    assert not layer_axes("c", (32, 32), (0.1, 0.1), ("µm", "µm")).is_zstack


def test_a_2d_psf_model_and_planes_train_a_2d_model_with_the_forms_config():
    cfg = ModelConfig(depth=2, prefilter="wiener")
    plan = train_plan("simulated", PSF2D, LayerAxes("s", (3, 64, 64)))
    assert plan == TrainPlan(2) and plan.model_config(cfg) is cfg
    assert train_plan("pairs", None, LayerAxes("s", (64, 64)), LayerAxes("b", (64, 64))).ndim == 2


def test_a_3d_psf_model_trains_a_3d_model_at_its_z_step_pooling_z_late():
    plan = train_plan("simulated", PSF3D, _stack())
    assert plan.ndim == 3 and plan.z_step_um == pytest.approx(0.25)
    assert plan.z_pool_start == z_pool_start_for(0.25, 0.13)
    cfg = plan.model_config(ModelConfig(depth=2))
    assert cfg.ndim == 3 and cfg.z_pool_start == plan.z_pool_start
    assert plan.describe().startswith("3-D model, z-step 0.25 µm")


def test_z_stack_pairs_train_a_3d_model_and_unrelated_planes_a_2d_one():
    plan = train_plan("pairs", None, _stack("s", z=0.3, pixel=0.1), _stack("b", z=0.3, pixel=0.1))
    assert (plan.ndim, plan.z_step_um, plan.z_pool_start) == (3, 0.3, z_pool_start_for(0.3, 0.1))
    planes = LayerAxes("s", (8, 32, 32))
    assert train_plan("pairs", None, planes, planes._replace(name="b")).ndim == 2


@pytest.mark.parametrize("source, psf, sharp, blurred, words", [
    ("pairs", None, _stack("s", z=0.3), _stack("b", z=0.6), "share one z-step"),
    ("simulated", PSF2D, _stack(), None, "PSF model is 2-D"),
    ("simulated", PSF3D, LayerAxes("p", (32, 32)), None, "pick a sharp (Z, Y, X) layer"),
    ("simulated", PSF3D, _stack(z=0.5), None, "z-step of 0.5 µm but the 3-D PSF model 0.25 µm"),
    ("builtin", PSF2D, None, None, "give sharp images (sharp layers and a PSF model), or a PSF model measured"),
    ("builtin", PSF3D, None, None, "does not say how large the field is"),
])
def test_what_training_refuses_is_one_line_that_says_what_to_change(source, psf, sharp, blurred, words):
    with pytest.raises(ValueError) as err:
        train_plan(source, psf, sharp, blurred)
    assert words in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("setting", [{"prefilter": "wiener"}, {"gate": "coordconv"}])
def test_a_3d_plan_refuses_the_settings_a_3d_model_cannot_take_in_one_line(setting):
    with pytest.raises(ConfigError) as err:
        train_plan("simulated", PSF3D, _stack()).model_config(ModelConfig(**setting))
    assert "2-D only" in str(err.value) and "\n" not in str(err.value)


def _measured_like(field=(32, 32)):
    """A small 3-D pupil model that says which field it describes, as a measured one does."""
    pupil = PSFConfig(name="tiny", na=0.8, wavelength_um=0.52, pixel_size_um=0.13, refractive_index=1.0, psf_size=9,
                      grid=3)
    return Pupil3DPSF.from_pupil(pupil, z_step_um=0.25, psf_depth=5).with_provenance({"field_shape": list(field)})


def test_built_in_volumes_are_planned_at_the_psf_models_field_and_drawn_by_the_job():
    psf = _measured_like()
    plan = train_plan("builtin", psf, None)
    assert plan.ndim == 3 and "8 built-in volumes of 32 x 32 x 32" in plan.describe()
    source = BuiltinSpecimens(psf, seed=3).source()
    assert source.sharp.shape == (8, 32, 32, 32) and source.val_sharp.shape == (3, 32, 32, 32)
    assert source.psf is psf


def test_built_in_fields_of_a_2d_model_are_planned_at_its_field_and_drawn_by_the_job_of_the_chosen_set():
    from napari_coordgate.samples.specimens import builtin_fields

    psf = PSF2D.with_provenance({"field_shape": [96, 128]})
    plan = train_plan("builtin", psf, None)
    assert plan == TrainPlan(2, data="32 built-in fields of 96 x 128 (mixed)")
    assert train_plan("builtin", psf, None, specimens="fluorescence").data.endswith("(fluorescence)")
    for specimens in ("mixed", "fluorescence"):
        source = BuiltinSpecimens(psf, seed=3, specimens=specimens).source()
        assert np.array_equal(source.sharp, builtin_fields(psf, 3, specimens)[0]), "what train --psf takes"
        assert np.array_equal(source.val_sharp, builtin_fields(psf, validation=True)[0]) and source.psf is psf


def test_a_3d_psf_models_grid_is_one_tiled_image_per_plane():
    grid = psf_grid_job(_measured_like(), (32, 32), report=_never, should_stop=_never)
    assert grid.shape == (5, 3 * 9 + 4 * 2, 3 * 9 + 4 * 2)


def test_layers_are_scored_as_volumes_when_they_are_z_stacks_or_the_model_is_3d():
    planes = LayerAxes("p", (4, 32, 32))
    assert not scored_as_volumes([planes, planes]) and scored_as_volumes([planes], model_ndim=3)
    assert scored_as_volumes([_stack(), planes]) and not scored_as_volumes([LayerAxes("q", (32, 32))], 3)


def test_evaluating_volumes_reports_psnr_by_depth_and_a_volume_error_map():
    rng = np.random.default_rng(0)
    gt = rng.random((6, 24, 24)).astype(np.float32)
    restored = gt + 0.01 * np.arange(6, dtype=np.float32)[:, None, None]  # worse with depth
    blurred = gt + 0.2

    out = evaluate_job(gt, restored, blurred, 4, True, report=_never, should_stop=_never)

    depth = out.data["psnr_by_depth"]
    assert [d["planes"] for d in depth] == [[z, z + 1] for z in range(6)]
    assert [d["psnr"] for d in depth] == sorted((d["psnr"] for d in depth), reverse=True)
    assert len(out.data["psnr_by_depth_blurred"]) == 6 and out.data["psnr_by_ring"]
    emap = out.extra["error_map"]
    assert emap.shape == (6, 24, 24)
    np.testing.assert_allclose(emap[1:, 0, 0], (0.01 * np.arange(1, 6)) ** 2, rtol=1e-4)


def test_evaluating_planes_keeps_one_map_and_no_depth():
    gt = np.random.default_rng(1).random((3, 24, 24)).astype(np.float32)
    out = evaluate_job(gt, gt + 0.1, None, 4, report=_never, should_stop=_never)
    assert out.extra["error_map"].shape == (24, 24) and "psnr_by_depth" not in out.data
