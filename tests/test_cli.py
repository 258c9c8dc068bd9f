"""The command line: the documented flags work, outputs keep names and metadata, errors are one line."""

import json

import numpy as np
import pytest
import tifffile

from napari_coordgate.cli import main
from napari_coordgate.samples.specimens import specimen_fields


@pytest.fixture
def sharp_tifs(tmp_path):
    fields = (specimen_fields(3, (64, 64), seed=0) * 3000 + 200).astype(np.uint16)
    paths = []
    for i, f in enumerate(fields):
        p = tmp_path / f"s{i}.tif"
        tifffile.imwrite(p, f, imagej=True, resolution=(10.0, 10.0), metadata={"unit": "um", "axes": "YX"})
        paths.append(str(p))
    return paths


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_simulate_train_apply_evaluate_round_trip(tmp_path, capsys, sharp_tifs):
    sim = tmp_path / "sim"
    code, out, err = _run(capsys, "simulate", *sharp_tifs, "--psf", "gaussian", "-o", sim, "--photons", 500)
    assert code == 0, err
    blurred = [str(sim / f"s{i}_blurred.tif") for i in range(3)]
    for b in blurred:
        with tifffile.TiffFile(b) as tf:
            assert tf.pages[0].tags["XResolution"].value == (10, 1)
            assert tf.pages[0].dtype == np.float32

    model = tmp_path / "scope.cgmodel"
    code, out, err = _run(capsys, "train", "--sharp", *sharp_tifs, "--blurred", *blurred, "-o", model,
                          "--depth", 1, "--channels", 4, "--epochs", 1, "--device", "cpu")
    assert code == 0, err
    assert model.exists() and model.with_suffix(".cgckpt").exists()

    code, out, err = _run(capsys, "train", "--sharp", *sharp_tifs, "--blurred", *blurred, "-o", model,
                          "--depth", 1, "--channels", 4, "--epochs", 2, "--device", "cpu",
                          "--resume", model.with_suffix(".cgckpt"))
    assert code == 0, err

    outdir = tmp_path / "restored"
    code, out, err = _run(capsys, "apply", "-m", model, *blurred, "-o", outdir, "--tile", 32, "--device", "cpu")
    assert code == 0, err
    for i in range(3):
        restored = tifffile.imread(outdir / f"s{i}_blurred.tif")
        assert restored.shape == (64, 64) and restored.dtype == np.float32

    report = tmp_path / "r.json"
    png = tmp_path / "r.png"
    code, out, err = _run(capsys, "evaluate", "-m", model, "--sharp", sharp_tifs[0], "--blurred", blurred[0],
                          "--json", report, "--png", png, "--device", "cpu")
    assert code == 0, err
    rep = json.loads(report.read_text())
    for key in ("psnr", "ssim", "psnr_blurred", "ssim_blurred", "psnr_by_ring"):
        assert key in rep
    assert {"r_min", "r_max", "psnr"} <= set(rep["psnr_by_ring"][0])
    assert png.stat().st_size > 10_000
    assert "restored" in out and "blurred" in out


def test_train_from_psf_preset(tmp_path, capsys, sharp_tifs):
    model = tmp_path / "m"
    code, _, err = _run(capsys, "train", "--sharp", *sharp_tifs, "--psf", "gaussian", "-o", model,
                        "--depth", 1, "--channels", 4, "--epochs", 1, "--device", "cpu")
    assert code == 0, err
    assert (tmp_path / "m.cgmodel").exists()


def test_a_training_that_stalls_at_its_input_warns_in_one_line_and_keeps_the_model(tmp_path, capsys, sharp_tifs):
    model = tmp_path / "m"
    code, _, err = _run(capsys, "train", "--sharp", *sharp_tifs, "--psf", "gaussian", "-o", model,
                        "--depth", 1, "--channels", 4, "--epochs", 1, "--lr", 1e-6, "--device", "cpu")
    assert code == 0, err
    warned = [line for line in err.splitlines() if "training stalled" in line]
    assert len(warned) == 1 and warned[0].startswith("napari-coordgate: warning: the model is no better than its input")
    assert "--seed" in warned[0] and (tmp_path / "m.cgmodel").exists()


def test_train_pairs_with_their_psf_model_and_a_wiener_first_stage(tmp_path, capsys, sharp_tifs):
    sim = tmp_path / "sim"
    _run(capsys, "simulate", *sharp_tifs, "--psf", "gaussian", "-o", sim, "--photons", 500)
    blurred = [str(sim / f"s{i}_blurred.tif") for i in range(3)]
    model = tmp_path / "w"
    code, _, err = _run(capsys, "train", "--sharp", *sharp_tifs, "--blurred", *blurred, "--psf", "gaussian",
                        "--prefilter", "wiener", "-o", model, "--depth", 1, "--channels", 4, "--epochs", 1,
                        "--device", "cpu")
    assert code == 0, err
    from napari_coordgate.model_io import load_model

    saved = load_model(tmp_path / "w.cgmodel")
    assert saved.config.prefilter == "wiener" and saved.psf.name == "gaussian"
    assert saved.provenance["training"]["source"] == "calibration"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["apply", "-m", "{tmp}/missing.cgmodel", "{s0}", "-o", "{tmp}/o.tif"], "does not exist"),
        (["simulate", "{s0}", "--psf", "no_such_preset", "-o", "{tmp}/x"], "no_such_preset"),
        (["simulate", "{tmp}/nope.tif", "--psf", "gaussian", "-o", "{tmp}/x"], "does not exist"),
        (["train", "--sharp", "{s0}", "{s1}", "--blurred", "{s0}", "-o", "{tmp}/m", "--epochs", "1"],
         "2 sharp file"),
        (["train", "--sharp", "{s0}", "--psf", "gaussian", "-o", "{tmp}/no/such/dir/m", "--epochs", "1"],
         "does not exist"),
        (["apply", "-m", "{s0}", "{s0}", "-o", "{tmp}/o.tif"], "not a readable napari-coordgate"),
        (["train", "--sharp", "{s0}", "-o", "{tmp}/m", "--epochs", "1"], "give calibration pairs"),
        (["train", "--sharp", "{s0}", "--blurred", "{s0}", "--prefilter", "wiener", "-o", "{tmp}/m"], "needs the PSF"),
        (["evaluate", "-m", "{tmp}/m.cgmodel", "--sharp", "{s0}", "--blurred", "{s0}", "--roi", "a,b"], "--roi"),
        (["train", "--sharp", "{s0}", "--psf", "{tmp}/beads.cgpsf", "-o", "{tmp}/m"], "beads.cgpsf does not exist"),
        (["simulate", "{s0}", "--psf", "{s0}.cgpsf", "-o", "{tmp}/x"], "does not exist"),
    ],
)
def test_bad_input_is_one_clear_line_and_nonzero_exit(tmp_path, capsys, sharp_tifs, argv, message):
    argv = [a.format(tmp=tmp_path, s0=sharp_tifs[0], s1=sharp_tifs[1]) for a in argv]
    if argv[0] == "evaluate":
        _run(capsys, "train", "--sharp", sharp_tifs[0], "--psf", "gaussian", "-o", tmp_path / "m",
             "--depth", 1, "--channels", 2, "--epochs", 1, "--device", "cpu")
    code, out, err = _run(capsys, *argv)
    assert code != 0
    assert message in err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_wrong_field_without_roi_is_a_clear_error(tmp_path, capsys, sharp_tifs):
    _run(capsys, "train", "--sharp", *sharp_tifs, "--psf", "gaussian", "-o", tmp_path / "m",
         "--depth", 1, "--channels", 2, "--epochs", 1, "--device", "cpu")
    small = tmp_path / "small.tif"
    tifffile.imwrite(small, tifffile.imread(sharp_tifs[0])[:32, :32])
    code, _, err = _run(capsys, "apply", "-m", tmp_path / "m.cgmodel", small, "-o", tmp_path / "o.tif")
    assert code == 1 and "--roi" in err
    code, _, err = _run(capsys, "apply", "-m", tmp_path / "m.cgmodel", small, "-o", tmp_path / "o.tif",
                        "--roi", "16,16", "--device", "cpu")
    assert code == 0, err


def test_demo_runs_end_to_end_on_a_tiny_budget(tmp_path):
    from napari_coordgate.demo import run_demo

    lines = []
    rep = run_demo(tmp_path / "demo", minutes=0.02, field=64, n_train=2, device="cpu", log=lines.append)
    names = [r["method"] for r in rep["rows"]]
    assert names[0] == "blurred" and names[-2:] == ["plain U-Net(2)", "CoordGate U-Net(2)"]
    assert any(n.startswith("RL-central") for n in names) and any(n.startswith("SV-RL") for n in names)
    for f in ("coordgate.cgmodel", "plain.cgmodel", "report.png", "report.json", "test_sharp.tif"):
        assert (tmp_path / "demo" / f).exists()
    assert any("CoordGate U-Net(2)" in line for line in lines)


def test_a_model_named_without_its_suffix_is_found_and_messages_name_the_file_written(tmp_path, capsys, sharp_tifs):
    code, out, err = _run(capsys, "train", "--sharp", sharp_tifs[0], "--psf", "gaussian", "-o", tmp_path / "mymodel",
                          "--depth", 1, "--channels", 2, "--epochs", 1, "--device", "cpu")
    assert code == 0, err
    assert (tmp_path / "mymodel.cgmodel").is_file() and str(tmp_path / "mymodel.cgmodel") in out
    code, out, err = _run(capsys, "apply", "-m", tmp_path / "mymodel", sharp_tifs[0], "-o", tmp_path / "out.tif",
                          "--device", "cpu")
    assert code == 0, err and (tmp_path / "out.tif").is_file()


@pytest.mark.parametrize("name", ["missing", "missing.cgmodel"])
def test_a_model_path_that_does_not_exist_is_one_clear_line(tmp_path, capsys, sharp_tifs, name):
    code, out, err = _run(capsys, "apply", "-m", tmp_path / name, sharp_tifs[0], "-o", tmp_path / "out.tif")
    assert code == 1 and err.count("\n") == 1
    assert f"model file {tmp_path / name} does not exist" in err
    assert not (tmp_path / "out.tif").exists()


def test_identical_sharp_and_blurred_files_are_refused(tmp_path, capsys, sharp_tifs):
    code, out, err = _run(capsys, "train", "--sharp", sharp_tifs[0], "--blurred", sharp_tifs[0], "-o", tmp_path / "m",
                          "--epochs", 1, "--device", "cpu")
    assert code == 1 and "identical" in err
    assert not (tmp_path / "m.cgmodel").exists()


@pytest.mark.parametrize("command", ["simulate", "train"])
def test_help_lists_the_psf_presets_by_name(capsys, command):
    from napari_coordgate.optics.psf import PRESETS

    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert all(name in text for name in PRESETS)
    assert "PSF config JSON file" in text and "PSF model file (.cgpsf" in text


BEADS = {"source_images": ["beads.tif"], "beads": 88, "fit_residual": 0.04}


def test_train_and_simulate_from_a_psf_model_file(tmp_path, capsys, sharp_tifs, fake_psf):
    from napari_coordgate.model_io import load_model, save_psf_model

    save_psf_model(tmp_path / "beads", fake_psf, provenance=BEADS)
    code, _, err = _run(capsys, "train", "--sharp", *sharp_tifs, "--psf", tmp_path / "beads.cgpsf", "-o",
                        tmp_path / "m", "--depth", 1, "--channels", 2, "--epochs", 1, "--device", "cpu")
    assert code == 0, err
    saved = load_model(tmp_path / "m.cgmodel")
    assert saved.psf.kind == "test_gaussian_grid" and saved.psf.name == "fake beads"
    assert {k: saved.provenance["psf"][k] for k in BEADS} == BEADS
    assert saved.provenance["training"]["source"] == "psf"

    code, out, err = _run(capsys, "simulate", sharp_tifs[0], "--psf", tmp_path / "beads", "-o", tmp_path / "sim")
    assert code == 0, err  # the suffix may be left out, as for models
    from napari_coordgate.optics.blur import SpatiallyVaryingBlur

    sharp = tifffile.imread(sharp_tifs[0]).astype(np.float32)
    expected = SpatiallyVaryingBlur(fake_psf, sharp.shape).forward(sharp - sharp.min()) + sharp.min()
    np.testing.assert_allclose(tifffile.imread(tmp_path / "sim" / "s0_blurred.tif"), expected, rtol=1e-6)


def test_a_corrupt_psf_model_file_is_one_clear_line(tmp_path, capsys, sharp_tifs):
    bad = tmp_path / "bad.cgpsf"
    bad.write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{}}}}")
    code, _, err = _run(capsys, "train", "--sharp", *sharp_tifs, "--psf", bad, "-o", tmp_path / "m",
                        "--epochs", 1, "--device", "cpu")
    assert code == 1 and len(err.strip().splitlines()) == 1 and "bad.cgpsf" in err and "Traceback" not in err
    assert not (tmp_path / "m.cgmodel").exists()


def _untrained_model(path, field_shape=(64, 64)):
    from napari_coordgate.config import ModelConfig
    from napari_coordgate.model_io import SavedModel, save_model
    from napari_coordgate.nn import build_model

    cfg = ModelConfig(depth=1, channels=2)
    return save_model(path, SavedModel(build_model(cfg), cfg, field_shape, {"offset": 200.0, "scale": 3000.0}))


def test_evaluate_a_corner_roi_reports_only_the_edge_ring(tmp_path, capsys):
    model = _untrained_model(tmp_path / "m")
    rng = np.random.default_rng(0)
    sharp = (rng.random((64, 64)) * 3000 + 200).astype(np.float32)
    noisy = sharp + rng.normal(0, 30, sharp.shape).astype(np.float32)
    for name, img in (("s.tif", sharp), ("b.tif", noisy), ("s8.tif", sharp[:8, :8]), ("b8.tif", noisy[:8, :8])):
        tifffile.imwrite(tmp_path / name, img)
    code, out, err = _run(capsys, "evaluate", "-m", model, "--sharp", tmp_path / "s8.tif", "--blurred",
                          tmp_path / "b8.tif", "--roi", "0,0", "--json", tmp_path / "roi.json", "--device", "cpu")
    assert code == 0, err
    rep = json.loads((tmp_path / "roi.json").read_text())  # strict JSON: an empty ring is null, not NaN
    for key in ("psnr_by_ring", "psnr_by_ring_blurred"):
        assert [d["pixels"] for d in rep[key]] == [0, 0, 64]
        assert rep[key][0]["psnr"] is None and rep[key][2]["psnr"] is not None

    # the whole field: the same report whether or not its position is given
    reports = []
    for extra in ((), ("--roi", "0,0")):
        code, out, err = _run(capsys, "evaluate", "-m", model, "--sharp", tmp_path / "s.tif", "--blurred",
                              tmp_path / "b.tif", *extra, "--json", tmp_path / "whole.json", "--device", "cpu")
        assert code == 0, err
        rep = json.loads((tmp_path / "whole.json").read_text())
        reports.append({k: rep[k] for k in ("psnr", "psnr_by_ring", "psnr_by_ring_blurred")})
    assert reports[0] == reports[1]
    assert all(d["pixels"] > 0 for d in reports[0]["psnr_by_ring"])


def test_option_flags_come_from_the_configs_with_their_defaults_and_bounds():
    from napari_coordgate.cli import MODEL_FLAGS, PREDICT_FLAGS, TRAIN_FLAGS, build_parser
    from napari_coordgate.config import ModelConfig, PredictConfig, TrainConfig

    sub = build_parser()._subparsers._group_actions[0].choices
    for command, cls, names in (("train", ModelConfig, MODEL_FLAGS), ("train", TrainConfig, TRAIN_FLAGS),
                                ("apply", PredictConfig, PREDICT_FLAGS)):
        actions = {a.dest: a for a in sub[command]._actions}
        for name in names:
            assert actions[name].default == getattr(cls(), name), (command, name)
    assert sub["train"]._option_string_actions["--minutes"].default == TrainConfig().minutes == 10.0
    assert sub["train"]._option_string_actions["--gate"].choices == ("none", "coordgate", "coordconv")
    assert "--no-amp" in sub["train"]._option_string_actions  # float32 training on any device


@pytest.mark.parametrize("argv, message", [
    (["--depth", "9"], "ModelConfig.depth must be in [1, 8]"),
    (["--device", "gpu"], "TrainConfig.device must be one of"),
    (["--crop", "8"], "TrainConfig.crop must be in [16, 4096]"),
])
def test_an_out_of_range_flag_is_the_configs_one_line_error(tmp_path, capsys, sharp_tifs, argv, message):
    code, out, err = _run(capsys, "train", "--sharp", sharp_tifs[0], "--psf", "gaussian", "-o", tmp_path / "m",
                          *argv)
    assert code == 1 and message in err and len(err.strip().splitlines()) == 1


def test_a_device_index_is_accepted_by_the_configs():
    from napari_coordgate.config import ConfigError, PredictConfig, TrainConfig

    assert TrainConfig(device="cuda:1").device == "cuda:1"
    assert PredictConfig(device="cuda:0").device == "cuda:0"
    with pytest.raises(ConfigError):
        TrainConfig(device="cuda:x")


def test_export_then_apply_with_the_package_gives_the_models_output(tmp_path, capsys, sharp_tifs):
    pytest.importorskip("bioimageio.spec")
    code, _, err = _run(capsys, "train", "--sharp", sharp_tifs[0], "--psf", "gaussian", "-o", tmp_path / "m",
                        "--depth", 1, "--channels", 2, "--epochs", 1, "--device", "cpu")
    assert code == 0, err
    code, out, err = _run(capsys, "export", "-m", tmp_path / "m", "-o", tmp_path / "pkg.zip")
    assert code == 0, err
    assert (tmp_path / "pkg.zip").is_file() and "pkg.zip" in out
    for model, dest in ((tmp_path / "m.cgmodel", "a.tif"), (tmp_path / "pkg.zip", "b.tif")):
        code, _, err = _run(capsys, "apply", "-m", model, sharp_tifs[1], "-o", tmp_path / dest, "--device", "cpu")
        assert code == 0, err
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "a.tif"), tifffile.imread(tmp_path / "b.tif"))
