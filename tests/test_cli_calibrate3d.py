"""calibrate of a bead z-stack from the command line: the 3-D PSF grid, the best-focus report, the z-step rules."""

import json

import numpy as np
import pytest
import tifffile

from napari_coordgate.cli import main
from napari_coordgate.samples.beadstack import AstigmaticBeam3D, bead_zstack


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def stack():
    vol, _ = bead_zstack(AstigmaticBeam3D(), (25, 192, 192), 30, photons=3000, seed=5, psf_size=25)
    return np.clip(vol + 100, 0, 65535).astype(np.uint16)


def _write(path, vol, spacing=0.25):
    metadata = {"unit": "um", "axes": "ZYX"}
    if spacing is not None:
        metadata["spacing"] = spacing
    tifffile.imwrite(path, vol, imagej=True, resolution=(10.0, 10.0), metadata=metadata)
    return path


def test_calibrate_a_bead_zstack_writes_a_3d_psf_model_with_the_metadatas_z_step(tmp_path, capsys, stack):
    from napari_coordgate.model_io import load_psf_model

    beads = _write(tmp_path / "beads.tif", stack)
    code, out, err = _run(capsys, "calibrate", beads, "-o", tmp_path / "scope3d", "--png", tmp_path / "r.png",
                          "--json", tmp_path / "r.json")
    assert code == 0, err
    assert "best focus across the field" in out
    psf = load_psf_model(tmp_path / "scope3d.cgpsf")
    assert psf.kind == "measured_grid3d" and psf.z_step_um == pytest.approx(0.25)
    assert psf.pixel_size_um == pytest.approx(0.1)
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["ndim"] == 3 and len(report["best_focus"]["map_um_9x9"]) == 9
    assert (tmp_path / "r.png").stat().st_size > 10_000


def test_calibrate_zstack_flag_overrides_a_stack_without_metadata(tmp_path, capsys, stack):
    from napari_coordgate.model_io import load_psf_model

    beads = tmp_path / "beads.tif"
    tifffile.imwrite(beads, stack)  # no axes, no spacing: (Z, Y, X) read as a series without --z-step
    code, out, err = _run(capsys, "calibrate", beads, "-o", tmp_path / "s", "--z-step", 0.3, "--pixel-size", 0.1,
                          "--bead-diameter", 200)
    assert code == 0, err
    assert load_psf_model(tmp_path / "s.cgpsf").z_step_um == pytest.approx(0.3)
    assert "taken for points" not in out


@pytest.mark.parametrize("flags, message", [
    (("--model", "pupil"), "--model pupil"),
    (("--holdout", 0.2), "--holdout"),
    (("--psf-depth", 8), "psf_depth must be odd"),
])
def test_calibrate_zstack_refuses_what_3d_does_not_take_in_one_line(tmp_path, capsys, stack, flags, message):
    beads = _write(tmp_path / "beads.tif", stack)
    code, out, err = _run(capsys, "calibrate", beads, "-o", tmp_path / "s", *flags)
    assert code != 0 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "s.cgpsf").exists()


def test_calibrate_zstack_never_overwrites_its_input(tmp_path, capsys, stack):
    beads = _write(tmp_path / "beads.tif", stack)
    before = beads.read_bytes()
    code, _, err = _run(capsys, "calibrate", beads, "-o", tmp_path / "r.png", "--png", beads)
    assert code != 0 and beads.read_bytes() == before


def test_calibrate_zstack_with_too_few_beads_still_writes_its_json_report(tmp_path, capsys):
    vol, _ = bead_zstack(AstigmaticBeam3D(), (25, 128, 128), 3, photons=3000, seed=6, psf_size=25)
    beads = _write(tmp_path / "beads.tif", np.clip(vol + 100, 0, 65535).astype(np.uint16))
    code, out, err = _run(capsys, "calibrate", beads, "-o", tmp_path / "s", "--json", tmp_path / "r.json")
    assert code != 0 and "at least 5" in err and len(err.strip().splitlines()) == 1
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["failed"] and report["settings"]["z_step_um"] == pytest.approx(0.25) and report["beads"]["y"]
