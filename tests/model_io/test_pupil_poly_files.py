"""A fitted pupil model's file (.cgpsf, kind ``pupil_poly``) written before the Zernike terms beyond the primary six
existed still loads, unchanged, with the same PSFs."""

from pathlib import Path

import numpy as np

from napari_coordgate import model_io as modelio
from napari_coordgate.model_io import load_psf_model, save_psf_model
from napari_coordgate.optics.psf import PRIMARY_TERMS

DATA = Path(__file__).parents[1] / "data"


def test_a_six_term_pupil_poly_file_from_before_the_further_terms_loads_unchanged(tmp_path):
    # tests/data/pupil_poly_6terms.cgpsf was written by the code of commit b91323f (six Zernike terms), with its
    # PSFs at five field positions beside it
    path = DATA / "pupil_poly_6terms.cgpsf"
    y, x = np.array([-1.0, -0.3, 0.0, 0.6, 1.0]), np.array([1.0, 0.4, 0.0, -0.8, -1.0])

    model = load_psf_model(path)

    assert model.kind == "pupil_poly" and model.terms == PRIMARY_TERMS and model.coefficients.shape == (6, 6)
    assert model.name == "six-term fit" and model.provenance["beads"] == 42 and model.grid == 5
    # to rounding: FFTs and BLAS round differently on other CPUs (5e-16 relative on an AMD EPYC), a change is far larger
    np.testing.assert_allclose(model.psfs_at(y, x), np.load(DATA / "pupil_poly_6terms_psfs.npy"), rtol=1e-12, atol=0)
    # written back, it is the same record (a release before the further terms reads it)
    stored = modelio.decode(path, "napari-coordgate-psf")[1]["psf"]
    again = modelio.decode(save_psf_model(tmp_path / "again", model), "napari-coordgate-psf")[1]["psf"]
    assert again == stored and again["version"] == 1
