"""The command line with z-stacks: train --ndim 3 / a 3-D PSF model, apply and evaluate volumes, z-step rules."""

import json

import numpy as np
import pytest
import tifffile
from scipy.ndimage import gaussian_filter

from napari_coordgate.cli import main
from napari_coordgate.samples.volumes import specimen_volumes

SMALL = ("--depth", 2, "--channels", 4, "--epochs", 1, "--steps-per-epoch", 2, "--batch", 2, "--crop", 16,
         "--crop-depth", 4, "--threads", 1, "--device", "cpu")


def _write(path, vol, spacing=0.3, axes="ZYX"):
    metadata = {"unit": "um", "axes": axes}
    if spacing is not None:
        metadata["spacing"] = spacing
    tifffile.imwrite(path, vol.astype(np.float32), imagej=True, resolution=(10.0, 10.0), metadata=metadata)
    return str(path)


@pytest.fixture
def volume_pair(tmp_path):
    sharp = specimen_volumes(1, (12, 40, 40), seed=2, anisotropy=3.0)[0] * 1000 + 100
    blurred = gaussian_filter(sharp, (1.5, 1.0, 1.0))
    return _write(tmp_path / "s.tif", sharp), _write(tmp_path / "b.tif", blurred)


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_train_apply_evaluate_a_3d_model_from_volume_pairs(tmp_path, capsys, volume_pair):
    sharp, blurred = volume_pair
    model = tmp_path / "m3"
    code, out, err = _run(capsys, "train", "--sharp", sharp, "--blurred", blurred, "--ndim", 3, "-o", model, *SMALL)
    assert code == 0, err
    assert "3-D" in err or "3-D" in out
    out_tif = tmp_path / "r.tif"
    code, out, err = _run(capsys, "apply", "-m", model, blurred, "-o", out_tif, "--device", "cpu")
    assert code == 0, err
    with tifffile.TiffFile(out_tif) as tf:
        assert tf.series[0].axes == "ZYX" and tf.series[0].shape == (12, 40, 40)
        assert tf.imagej_metadata["spacing"] == pytest.approx(0.3)
    report = tmp_path / "r.json"
    code, out, err = _run(capsys, "evaluate", "-m", model, "--sharp", sharp, "--blurred", blurred, "--json", report,
                          "--device", "cpu")
    assert code == 0, err
    assert "planes" in out and "restored" in out
    rep = json.loads(report.read_text())
    assert [d["planes"] for d in rep["psnr_by_depth"]][:2] == [[0, 2], [2, 3]]
    assert len(rep["psnr_by_depth_blurred"]) == 8


def test_a_volume_of_another_z_step_is_refused_by_apply(tmp_path, capsys, volume_pair):
    sharp, blurred = volume_pair
    model = tmp_path / "m3"
    assert _run(capsys, "train", "--sharp", sharp, "--blurred", blurred, "--ndim", 3, "-o", model, *SMALL)[0] == 0
    other = _write(tmp_path / "other.tif", tifffile.imread(blurred), spacing=0.6)
    code, out, err = _run(capsys, "apply", "-m", model, other, "-o", tmp_path / "o.tif", "--device", "cpu")
    assert code != 0
    assert "z-step is 0.6 µm but the model was trained at 0.3 µm" in err
    assert not (tmp_path / "o.tif").exists()


def test_train_ndim_3_needs_a_z_step_and_a_3d_psf_model(tmp_path, capsys):
    vol = specimen_volumes(1, (8, 32, 32), seed=1)[0]
    s, b = _write(tmp_path / "s.tif", vol, spacing=None), _write(tmp_path / "b.tif", vol * 0.5 + 0.1, spacing=None)
    code, out, err = _run(capsys, "train", "--sharp", s, "--blurred", b, "--ndim", 3, "-o", tmp_path / "m", *SMALL)
    assert code != 0 and "--z-step" in err
    code, out, err = _run(capsys, "train", "--sharp", s, "--ndim", 3, "--psf", "gaussian", "-o", tmp_path / "m",
                          *SMALL)
    assert code != 0 and "needs a 3-D PSF model" in err
    code, out, err = _run(capsys, "train", "--psf", "tilted_curved_3d", "-o", tmp_path / "m", *SMALL)
    assert code != 0 and "give sharp volumes (--sharp)" in err


def test_a_3d_psf_preset_with_sharp_volumes_makes_a_3d_model(tmp_path, capsys):
    from napari_coordgate.model_io import read_model_info

    vols = specimen_volumes(2, (12, 32, 32), seed=1, anisotropy=1.9)
    paths = [_write(tmp_path / f"s{i}.tif", v, spacing=0.25) for i, v in enumerate(vols)]
    model = tmp_path / "m3"
    code, out, err = _run(capsys, "train", "--sharp", *paths, "--psf", "tilted_curved_3d", "-o", model, *SMALL)
    assert code == 0, err
    info = read_model_info(str(model) + ".cgmodel")
    assert info["model"]["ndim"] == 3 and info["z_step_um"] == pytest.approx(0.25)
    assert info["model"]["z_pool_start"] == 2  # 0.25 µm planes, 0.13 µm pixels: pool z from the second pooling


def test_apply_resample_z_restores_a_volume_of_another_z_step(tmp_path, capsys, volume_pair):
    sharp, blurred = volume_pair
    model = tmp_path / "m3"
    assert _run(capsys, "train", "--sharp", sharp, "--blurred", blurred, "--ndim", 3, "-o", model, *SMALL)[0] == 0
    other = _write(tmp_path / "other.tif", tifffile.imread(blurred)[::2], spacing=0.6)
    code, out, err = _run(capsys, "apply", "-m", model, other, "-o", tmp_path / "o.tif", "--device", "cpu",
                          "--resample-z")
    assert code == 0, err
    assert tifffile.imread(tmp_path / "o.tif").shape == (6, 40, 40)


def test_simulate_blurs_a_z_stack_with_a_3d_psf_model_and_keeps_its_metadata(tmp_path, capsys):
    vol = specimen_volumes(1, (10, 32, 32), seed=1)[0]
    src = _write(tmp_path / "s.tif", vol, spacing=0.25)
    code, out, err = _run(capsys, "simulate", src, "--psf", "tilted_curved_3d", "-o", tmp_path / "sim",
                          "--photons", 500)
    assert code == 0, err
    with tifffile.TiffFile(tmp_path / "sim" / "s_blurred.tif") as tf:
        blurred = tf.asarray()
        assert tf.series[0].axes == "ZYX" and tf.imagej_metadata["spacing"] == pytest.approx(0.25)
    assert blurred.shape == vol.shape and not np.allclose(blurred, vol)
    flat = _write(tmp_path / "flat.tif", vol[0], spacing=None, axes="YX")
    code, out, err = _run(capsys, "simulate", flat, "--psf", "tilted_curved_3d", "-o", tmp_path / "sim2")
    assert code != 0 and len(err.strip().splitlines()) == 1
    assert "is a 2-D image; the 3-D PSF model 'tilted_curved_3d' blurs z-stacks" in err


def test_apply_restores_a_tzyx_time_lapse_volume_by_volume(tmp_path, capsys, volume_pair):
    sharp, blurred = volume_pair
    model = tmp_path / "m3"
    assert _run(capsys, "train", "--sharp", sharp, "--blurred", blurred, "--ndim", 3, "-o", model, *SMALL)[0] == 0
    vol = tifffile.imread(blurred)
    series = _write(tmp_path / "t.tif", np.stack([vol, vol[:, ::-1]]), axes="TZYX")
    code, out, err = _run(capsys, "apply", "-m", model, series, "-o", tmp_path / "o.tif", "--device", "cpu")
    assert code == 0, err
    restored = tifffile.imread(tmp_path / "o.tif")
    single = tmp_path / "one.tif"
    assert _run(capsys, "apply", "-m", model, blurred, "-o", single, "--device", "cpu")[0] == 0
    assert restored.shape == (2, 12, 40, 40)
    np.testing.assert_array_equal(restored[0], tifffile.imread(single))
