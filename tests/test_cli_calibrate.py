"""The calibration path from the command line: bead image -> PSF model file -> trained model -> applied."""

import numpy as np
import pytest
import tifffile

from napari_coordgate.cli import main
from napari_coordgate.samples.beads import EllipticalOptics, bead_slide

OPTICS = EllipticalOptics(width=1.3, radial=0.8, tangential=0.2, beta=None, twist=0.3, psf_size=19)


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def beads_tif(tmp_path_factory):
    image, _ = bead_slide(OPTICS, (256, 256), n_beads=60, photons=3000, seed=11)
    path = tmp_path_factory.mktemp("beads") / "beads.tif"
    tifffile.imwrite(path, image.astype(np.uint16), imagej=True, resolution=(1 / 0.16, 1 / 0.16),
                     metadata={"unit": "um", "axes": "YX"})
    return path


def test_bead_image_to_psf_model_to_trained_model_to_applied(tmp_path, capsys, beads_tif):
    code, out, err = _run(capsys, "calibrate", beads_tif, "-o", tmp_path / "scope", "--model", "grid",
                          "--png", tmp_path / "report.png", "--json", tmp_path / "report.json", "--device", "cpu")
    assert code == 0, err
    assert "beads" in out and (tmp_path / "scope.cgpsf").is_file() and (tmp_path / "report.png").is_file()
    from napari_coordgate.model_io import load_psf_model

    psf = load_psf_model(tmp_path / "scope")
    assert psf.kind == "measured_grid" and abs(psf.pixel_size_um - 0.16) < 1e-6, "pixel size from the metadata"
    code, out, err = _run(capsys, "train", "--psf", tmp_path / "scope.cgpsf", "-o", tmp_path / "m",
                          "--depth", 1, "--channels", 2, "--epochs", 1, "--steps-per-epoch", 2, "--device", "cpu")
    assert code == 0, err
    assert "built-in specimen fields of 256 x 256" in out
    from napari_coordgate.model_io import load_model

    saved = load_model(tmp_path / "m")
    assert saved.field_shape == (256, 256) and saved.psf.kind == "measured_grid"
    assert saved.provenance["psf"]["field_shape"] == [256, 256]
    code, _, err = _run(capsys, "apply", "-m", tmp_path / "m", beads_tif, "-o", tmp_path / "restored.tif",
                        "--device", "cpu")
    assert code == 0, err and (tmp_path / "restored.tif").is_file()


def test_a_z_stack_is_refused_with_what_to_give_instead(tmp_path, capsys):
    stack = np.random.default_rng(0).integers(0, 1000, (5, 64, 64)).astype(np.uint16)
    tifffile.imwrite(tmp_path / "z.tif", stack, imagej=True, metadata={"axes": "ZYX"})
    code, _, err = _run(capsys, "calibrate", tmp_path / "z.tif", "-o", tmp_path / "x")
    assert code == 1 and "z-stack" in err and "focal plane" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x.cgpsf").exists()


def test_training_without_sharp_images_needs_a_measured_psf_model(tmp_path, capsys):
    code, _, err = _run(capsys, "train", "--psf", "gaussian", "-o", tmp_path / "m", "--epochs", 1)
    assert code == 1 and "--sharp" in err and "measured from beads" in err


def test_evaluate_on_beads_maps_bead_fwhm_before_and_after(tmp_path, capsys, beads_tif):
    import json

    code, _, err = _run(capsys, "calibrate", beads_tif, "-o", tmp_path / "scope", "--model", "grid", "--device", "cpu")
    assert code == 0, err
    code, _, err = _run(capsys, "train", "--psf", tmp_path / "scope.cgpsf", "-o", tmp_path / "m", "--depth", 1,
                        "--channels", 2, "--epochs", 1, "--steps-per-epoch", 2, "--device", "cpu")
    assert code == 0, err
    code, out, err = _run(capsys, "evaluate", "-m", tmp_path / "m", "--beads", beads_tif, "--json",
                          tmp_path / "beads.json", "--device", "cpu")
    assert code == 0, err
    assert "before" in out and "after" in out
    rep = json.loads((tmp_path / "beads.json").read_text())
    assert rep["before"]["beads"] >= 30 and [r["name"] for r in rep["before"]["rings"]] == ["centre", "middle", "edge"]
    assert rep["before"]["fwhm_median"] > 1.0


def test_apply_warns_when_the_pixel_size_differs_from_the_calibration(tmp_path, capsys, beads_tif):
    code, _, err = _run(capsys, "calibrate", beads_tif, "-o", tmp_path / "scope", "--model", "grid", "--device", "cpu")
    assert code == 0, err
    code, _, err = _run(capsys, "train", "--psf", tmp_path / "scope.cgpsf", "-o", tmp_path / "m", "--depth", 1,
                        "--channels", 2, "--epochs", 1, "--steps-per-epoch", 2, "--device", "cpu")
    assert code == 0, err
    other = tmp_path / "other.tif"
    tifffile.imwrite(other, tifffile.imread(beads_tif), imagej=True, resolution=(1 / 0.1, 1 / 0.1),
                     metadata={"unit": "um", "axes": "YX"})
    code, _, err = _run(capsys, "apply", "-m", tmp_path / "m", other, "-o", tmp_path / "o.tif", "--device", "cpu")
    assert code == 0 and "0.1 µm pixels but the model was calibrated at 0.16 µm" in err
    code, _, err = _run(capsys, "apply", "-m", tmp_path / "m", beads_tif, "-o", tmp_path / "p.tif", "--device", "cpu")
    assert code == 0 and "calibrated at" not in err
