"""The calibration path from the command line: bead image -> PSF model file -> trained model -> applied."""

import re

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
    assert "built-in specimen fields of 256 x 256 (mixed: bundled + procedural)" in out, "mixed is the default"
    assert "validation images: 6 held-out specimen fields" in out
    from napari_coordgate.model_io import load_model

    saved = load_model(tmp_path / "m")
    assert saved.field_shape == (256, 256) and saved.psf.kind == "measured_grid"
    assert saved.provenance["psf"]["field_shape"] == [256, 256]
    code, _, err = _run(capsys, "apply", "-m", tmp_path / "m", beads_tif, "-o", tmp_path / "restored.tif",
                        "--device", "cpu")
    assert code == 0, err and (tmp_path / "restored.tif").is_file()


def test_train_from_beads_can_take_the_fluorescence_specimens_not_with_sharp_images_nor_in_3d(tmp_path, capsys,
                                                                                             beads_tif):
    code, _, err = _run(capsys, "calibrate", beads_tif, "-o", tmp_path / "scope", "--model", "grid", "--device", "cpu")
    assert code == 0, err
    tiny = ("--depth", 1, "--channels", 2, "--epochs", 1, "--steps-per-epoch", 2, "--device", "cpu")
    code, out, err = _run(capsys, "train", "--psf", tmp_path / "scope.cgpsf", "--specimens", "fluorescence",
                          "-o", tmp_path / "m", *tiny)
    assert code == 0, err
    assert "built-in specimen fields of 256 x 256 (fluorescence: procedural nuclei, filaments, puncta)" in out
    assert (tmp_path / "m.cgmodel").is_file()
    tifffile.imwrite(tmp_path / "s.tif", np.random.default_rng(0).random((64, 64)).astype(np.float32))
    code, _, err = _run(capsys, "train", "--psf", tmp_path / "scope.cgpsf", "--sharp", tmp_path / "s.tif",
                        "--specimens", "mixed", "-o", tmp_path / "n", *tiny)
    assert code == 1 and "--specimens" in err and "--sharp" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "n.cgmodel").exists()
    code, _, err = _run(capsys, "train", "--psf", "tilted_curved_3d", "--ndim", 3, "--specimens", "fluorescence",
                        "-o", tmp_path / "v", *tiny)
    assert code == 1 and "a 3-D model trains on procedural volumes" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "v.cgmodel").exists()


def test_a_z_stack_without_its_z_step_is_refused_with_what_to_give_instead(tmp_path, capsys):
    stack = np.random.default_rng(0).integers(0, 1000, (5, 64, 64)).astype(np.uint16)
    tifffile.imwrite(tmp_path / "z.tif", stack, imagej=True, metadata={"axes": "ZYX"})
    code, _, err = _run(capsys, "calibrate", tmp_path / "z.tif", "-o", tmp_path / "x")
    assert code == 1 and "z-stack" in err and "--z-step" in err and "focal plane" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "x.cgpsf").exists()


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


# -- issue 22: the config's flags, failures that still report, the held-out beads check -----------------------------
@pytest.fixture(scope="module")
def sparse_tif(tmp_path_factory):
    """Too few beads (and hot pixels): calibration fails after detecting them."""
    image, _ = bead_slide(OPTICS, (128, 128), n_beads=4, photons=3000, hot_fraction=1e-3, seed=1)
    path = tmp_path_factory.mktemp("sparse") / "sparse.tif"
    tifffile.imwrite(path, image.astype(np.uint16))
    return path


def test_a_failed_calibration_still_writes_its_figure_and_json_then_one_error_line(tmp_path, capsys, sparse_tif):
    import json

    code, out, err = _run(capsys, "calibrate", sparse_tif, "-o", tmp_path / "scope", "--model", "grid",
                          "--png", tmp_path / "r.png", "--json", tmp_path / "r.json", "--device", "cpu")
    assert code == 1 and len(err.strip().splitlines()) == 1 and "needs at least 5 usable beads" in err
    assert not (tmp_path / "scope.cgpsf").exists() and (tmp_path / "r.png").stat().st_size > 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["failed"] is True and report["error"] in err and report["settings"]["model"] == "grid"
    assert sum(report["counts"].values()) == len(report["beads"]["reason"]) and "holdout" in report["beads"]
    assert "what to change: " in out and "hot pixel" in out


def test_the_calibrate_flags_reach_calibrate_in_its_units(tmp_path, capsys, beads_tif, monkeypatch):
    from napari_coordgate.calibration import CalibrationError
    from napari_coordgate.calibration import calibrate as module

    seen = {}

    def fake(images, **kwargs):
        seen.update(kwargs)
        raise CalibrationError("stopped by the test")

    monkeypatch.setattr(module, "calibrate", fake)
    code, _, err = _run(capsys, "calibrate", beads_tif, "-o", tmp_path / "x", "--grid", 4, "--na", 1.4,
                        "--wavelength", 520, "--immersion", 1.518, "--bead-diameter", 200, "--psf-size", 21,
                        "--min-snr", 3, "--holdout", 0.2, "--device", "cpu")
    assert code == 1 and "stopped by the test" in err
    assert seen["wavelength_um"] == pytest.approx(0.52) and seen["pixel_size_um"] == pytest.approx(0.16)
    assert {k: seen[k] for k in ("grid", "na", "immersion", "bead_diameter_nm", "psf_size", "min_snr", "holdout",
                                 "model", "device")} == {"grid": 4, "na": 1.4, "immersion": 1.518,
                                                         "bead_diameter_nm": 200.0, "psf_size": 21, "min_snr": 3.0,
                                                         "holdout": 0.2, "model": "auto", "device": "cpu"}


@pytest.mark.parametrize("flags, message", [
    (["--grid", "26"], r"grid \(--grid\) must be in \[1, 25\]"),
    (["--psf-size", "8"], r"psf_size \(--psf-size\) must be odd"),
    (["--bead-diameter", "6000"], r"bead_diameter_nm \(--bead-diameter\) must be in \[0.0, 5000.0\]"),
    (["--wavelength", "0.52"], r"wavelength_nm \(--wavelength\) must be in \[200.0, 2000.0\]"),
    (["--holdout", "0.9"], r"\(--holdout\) must be in \[0.0, 0.5\]"),
])
def test_a_bad_calibrate_flag_is_one_line_naming_it_before_any_image_is_read(tmp_path, capsys, flags, message):
    code, _, err = _run(capsys, "calibrate", tmp_path / "missing.tif", "-o", tmp_path / "x", *flags)
    assert code == 1 and len(err.strip().splitlines()) == 1
    assert re.search(message, err), err


@pytest.fixture(scope="module")
def bead_model(tmp_path_factory):
    """An untrained CoordGate U-Net(2) of the bead image's 256 x 256 field, as a file."""
    import torch

    from napari_coordgate.config import ModelConfig
    from napari_coordgate.model_io import SavedModel, save_model
    from napari_coordgate.nn import build_model

    torch.manual_seed(0)
    cfg = ModelConfig(depth=2, channels=4)
    saved = SavedModel(build_model(cfg).eval(), cfg, (256, 256), {"offset": 100.0, "scale": 3000.0})
    return save_model(tmp_path_factory.mktemp("model") / "m.cgmodel", saved)


def _holdout_report(path, beads_tif, **extra):
    """A calibration report by hand: every third accepted bead of the image held out."""
    import json

    from napari_coordgate.calibration.detect import find_beads

    table, _, _ = find_beads(tifffile.imread(beads_tif))
    table.holdout[np.flatnonzero(table.accepted)[::3]] = True
    report = {"field_shape": [256, 256], "beads": table.to_dict(), **extra}
    path.write_text(json.dumps(report))
    return int(table.holdout.sum())


def test_evaluate_scores_only_the_holdout_beads_of_a_calibration_report(tmp_path, capsys, beads_tif, bead_model):
    import json

    n = _holdout_report(tmp_path / "report.json", beads_tif)
    code, out, err = _run(capsys, "evaluate", "-m", bead_model, "--beads", beads_tif, "--holdout-from",
                          tmp_path / "report.json", "--json", tmp_path / "holdout.json", "--device", "cpu")
    assert code == 0, err
    assert f"{n} of {n} found" in out and "FWHM (px) before" in out and "energy after" in out
    rep = json.loads((tmp_path / "holdout.json").read_text())
    assert rep["holdout_beads"] == rep["matched"] == n and len(rep["beads"]) == n
    assert [r["name"] for r in rep["before"]["rings"]] == ["centre", "middle", "edge"]
    assert 1.0 < rep["radius_px"] < 5.0 and 0.5 < rep["before"]["energy_median"] <= 1.0


def test_evaluate_holdout_errors_are_one_line_each(tmp_path, capsys, beads_tif, bead_model):
    import json

    (tmp_path / "none.json").write_text(json.dumps({"beads": {"y": [1.0], "x": [1.0], "holdout": [False]}}))
    (tmp_path / "bad.json").write_text("{not json")
    _holdout_report(tmp_path / "small.json", beads_tif)
    small = json.loads((tmp_path / "small.json").read_text())
    (tmp_path / "small.json").write_text(json.dumps(dict(small, field_shape=[128, 128])))
    cases = [(["--holdout-from", tmp_path / "none.json"], "add --beads IMG"),
             (["--beads", beads_tif, "--holdout-from", tmp_path / "none.json"], "calibrate with --holdout F"),
             (["--beads", beads_tif, "--holdout-from", tmp_path / "gone.json"], "gone.json does not exist"),
             (["--beads", beads_tif, "--holdout-from", tmp_path / "bad.json"], "bad.json is not JSON"),
             (["--beads", beads_tif, "--holdout-from", tmp_path / "small.json"], "give the bead image that was "
                                                                                  "calibrated")]
    for flags, message in cases:
        code, _, err = _run(capsys, "evaluate", "-m", bead_model, *flags, "--device", "cpu")
        assert code == 1 and message in err and len(err.strip().splitlines()) == 1, (flags, err)
