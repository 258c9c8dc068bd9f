"""3-D PSF models in ``.cgpsf`` files (issue 24): both 3-D kinds round-trip through save_psf_model /
load_psf_model and resolve_psf with the same PSFs, and 2-D files are read as before."""

import numpy as np
import pytest

from napari_coordgate.model_io import load_psf_model, read_psf_info, resolve_psf, save_psf_model
from napari_coordgate.optics.psf import PSFConfig
from napari_coordgate.optics.psf3d import MeasuredGrid3DPSF, Pupil3DPSF

PUPIL3D = Pupil3DPSF.from_pupil(PSFConfig(name="scope", psf_size=9, grid=3, astig_h2=0.1), z_step_um=0.25,
                                psf_depth=7, tilt_x_um=0.3, curvature_um=0.2)
MEASURED3D = MeasuredGrid3DPSF(np.random.default_rng(0).random((2, 2, 5, 7, 7)), z_step_um=0.3, pixel_size_um=0.1,
                               name="beads", filled=np.array([[False, True], [False, False]]))


@pytest.mark.parametrize("model", [PUPIL3D, MEASURED3D], ids=["pupil3d", "measured_grid3d"])
def test_a_3d_psf_model_round_trips_through_a_cgpsf_file(tmp_path, model):
    path = save_psf_model(tmp_path / "optics", model, provenance={"source": "z-stack.tif"})

    loaded = load_psf_model(path)

    assert path.suffix == ".cgpsf" and type(loaded) is type(model) and loaded.ndim == 3
    assert (loaded.z_step_um, loaded.psf_depth, loaded.describe()) == (model.z_step_um, model.psf_depth,
                                                                       model.describe())
    assert loaded.provenance["source"] == "z-stack.tif"
    assert read_psf_info(path)["psf"]["kind"] == model.kind
    np.testing.assert_array_equal(loaded.psf_at(0.4, -0.6), model.psf_at(0.4, -0.6))
    assert resolve_psf(path).describe() == model.describe()


def test_a_pupil3d_config_json_is_resolved_like_a_2d_one(tmp_path):
    path = tmp_path / "optics.json"
    path.write_text(PUPIL3D.to_json())

    assert resolve_psf(path) == PUPIL3D
