"""`napari-coordgate adapt`: a model adapted on blurred TIFFs, refusals in one line, inputs never replaced."""

import numpy as np
import pytest
import tifffile
import torch

from napari_coordgate.cli import main
from napari_coordgate.config import ModelConfig
from napari_coordgate.data import Normalization
from napari_coordgate.model_io import SavedModel, load_model, save_model
from napari_coordgate.nn import build_model
from napari_coordgate.optics.blur import synthesize_pairs
from napari_coordgate.samples.specimens import specimen_fields

CFG = ModelConfig(depth=2, channels=4, gate_hidden=8)
FAST = ["--epochs", 2, "--steps-per-epoch", 4, "--crop", 32, "--batch", 2, "--val-tile", 8, "--device", "cpu"]


def _model(path, psf="gaussian"):
    torch.manual_seed(0)
    saved = SavedModel(build_model(CFG).eval(), CFG, (64, 64), Normalization(0.0, 1.0, (1.0, 99.8)), psf=psf)
    return save_model(path, saved)


@pytest.fixture
def blurred_tif(tmp_path):
    _, blurred = synthesize_pairs(specimen_fields(2, (64, 64), seed=0) * 3000 + 200, "gaussian", photons=500)
    path = tmp_path / "blurred.tif"
    tifffile.imwrite(path, blurred.astype(np.float32))
    return path


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_adapt_writes_a_model_and_reports_the_noise_and_the_criterion(tmp_path, capsys, blurred_tif):
    model = _model(tmp_path / "scope.cgmodel")
    code, out, err = _run(capsys, "adapt", "-m", model, blurred_tif, "-o", tmp_path / "adapted", *FAST)
    assert code == 0, err
    adapted = load_model(tmp_path / "adapted.cgmodel")
    assert adapted.field_shape == (64, 64) and adapted.psf is not None
    assert "noise: variance" in out and "held-out consistency" in out


def test_adapt_refuses_a_model_without_a_psf_model_in_one_line(tmp_path, capsys, blurred_tif):
    model = _model(tmp_path / "pairs.cgmodel", psf=None)
    code, out, err = _run(capsys, "adapt", "-m", model, blurred_tif, "-o", tmp_path / "a", *FAST)
    assert code != 0 and "--psf" in err and "Traceback" not in err
    assert not (tmp_path / "a.cgmodel").exists()
    code, out, err = _run(capsys, "adapt", "-m", model, blurred_tif, "-o", tmp_path / "a", "--psf", "gaussian", *FAST)
    assert code == 0, err


def test_adapt_never_replaces_its_input_model(tmp_path, capsys, blurred_tif):
    model = _model(tmp_path / "scope.cgmodel")
    before = model.read_bytes()
    code, out, err = _run(capsys, "adapt", "-m", model, blurred_tif, "-o", model, *FAST)
    assert code != 0 and "Traceback" not in err
    assert model.read_bytes() == before


def test_adapt_refuses_half_a_camera_and_a_wrong_field(tmp_path, capsys, blurred_tif):
    model = _model(tmp_path / "scope.cgmodel")
    code, out, err = _run(capsys, "adapt", "-m", model, blurred_tif, "-o", tmp_path / "a", "--gain", 2, *FAST)
    assert code != 0 and "together" in err
    small = tmp_path / "small.tif"
    tifffile.imwrite(small, tifffile.imread(blurred_tif)[:, :48, :48])
    code, out, err = _run(capsys, "adapt", "-m", model, small, "-o", tmp_path / "a", *FAST)
    assert code != 0 and "--roi" in err
