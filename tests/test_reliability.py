"""Never lose a user's data: no output replaces an input, nothing looks complete before it is, every run leaves
what it announces, and a signal leaves no half-written file behind (issue 20)."""

import errno
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import tifffile

from napari_coordgate.cli import main
from napari_coordgate.outputs import OutputError, check_outputs

zarr = pytest.importorskip("zarr")


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture
def model_file(tmp_path):
    """An untrained depth-1 CoordGate model of a 64 x 64 field, saved (outputs are deterministic)."""
    from napari_coordgate.config import ModelConfig
    from napari_coordgate.model_io import SavedModel, save_model
    from napari_coordgate.nn import build_model

    cfg = ModelConfig(depth=1, channels=2)
    return save_model(tmp_path / "m.cgmodel", SavedModel(build_model(cfg), cfg, (64, 64)))


@pytest.fixture
def image_tif(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "img.tif"
    tifffile.imwrite(path, (rng.random((64, 64)) * 1000 + 100).astype(np.float32))
    return path


def _tree(path: Path) -> dict:
    """Every file under ``path`` with its bytes: what 'left untouched' means."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def _plain_zarr(path: Path, data: np.ndarray) -> Path:
    z = zarr.open_array(str(path), mode="w", shape=data.shape, dtype=data.dtype, zarr_format=2)
    z[...] = data
    return path


# -- outputs never overlap inputs -----------------------------------------------------------------------
def test_check_outputs_refuses_the_input_its_parent_its_inside_a_link_and_a_twin(tmp_path):
    inp = tmp_path / "raw.zarr" / "data"
    inp.mkdir(parents=True)
    (tmp_path / "link").symlink_to(inp)
    for out, word in ((inp, "is the input"), (tmp_path / "raw.zarr", "holds the input"),
                      (inp / "0", "lies inside the input"), (tmp_path / "link", "is the input")):
        with pytest.raises(OutputError, match=word):
            check_outputs([out], [inp])
    with pytest.raises(OutputError, match="are the same file"):
        check_outputs({tmp_path / "r.json": "JSON report", f"{tmp_path}/./r.json": "figure"}, [])
    check_outputs([tmp_path / "raw.zarr.out"], [inp, None, tmp_path / "missing.tif"])  # neighbours are fine


def test_apply_into_the_parent_store_of_its_input_is_refused_and_the_input_survives(tmp_path, capsys, model_file):
    data = np.random.default_rng(1).random((2, 64, 64)).astype(np.float32)
    _plain_zarr(tmp_path / "raw.zarr" / "data", data)
    before = _tree(tmp_path / "raw.zarr")

    code, _, err = _run(capsys, "apply", "-m", model_file, tmp_path / "raw.zarr" / "data", "-o",
                        tmp_path / "raw.zarr", "--device", "cpu")

    assert code == 1 and "holds the input" in err and err.count("\n") == 1
    assert _tree(tmp_path / "raw.zarr") == before


def test_apply_into_a_level_of_its_input_image_is_refused(tmp_path, capsys, model_file, image_tif):
    code, _, _ = _run(capsys, "apply", "-m", model_file, image_tif, "-o", tmp_path / "img.ome.zarr", "--device", "cpu")
    assert code == 0
    before = _tree(tmp_path / "img.ome.zarr")

    code, _, err = _run(capsys, "apply", "-m", model_file, tmp_path / "img.ome.zarr", "-o",
                        tmp_path / "img.ome.zarr" / "0", "--device", "cpu")

    assert code == 1 and "lies inside the input" in err
    assert _tree(tmp_path / "img.ome.zarr") == before


def test_apply_over_its_input_through_a_link_or_over_its_model_is_refused(tmp_path, capsys, model_file, image_tif):
    (tmp_path / "alias.tif").symlink_to(image_tif)
    before = image_tif.read_bytes()
    for out in (tmp_path / "alias.tif", model_file):
        code, _, err = _run(capsys, "apply", "-m", model_file, image_tif, "-o", out, "--device", "cpu")
        assert code == 1 and "is the input" in err
    assert image_tif.read_bytes() == before and model_file.stat().st_size > 0


def test_a_zarr_store_another_program_wrote_is_replaced_only_with_overwrite(tmp_path, capsys, model_file, image_tif):
    foreign = _plain_zarr(tmp_path / "theirs.zarr", np.ones((4, 4), np.float32))
    before = _tree(foreign)

    code, _, err = _run(capsys, "apply", "-m", model_file, image_tif, "-o", foreign, "--device", "cpu")
    assert code == 1 and "did not write" in err and "--overwrite" in err
    assert _tree(foreign) == before

    code, _, err = _run(capsys, "apply", "-m", model_file, image_tif, "-o", foreign, "--device", "cpu", "--overwrite")
    assert code == 0, err
    assert zarr.open_group(str(foreign), mode="r")["0"].shape == (64, 64)
    # a store this tool wrote is replaced by the next run without asking
    code, _, err = _run(capsys, "apply", "-m", model_file, image_tif, "-o", foreign, "--device", "cpu")
    assert code == 0, err


@pytest.mark.parametrize("flag", ["--json", "--png"])
def test_calibrate_never_writes_a_report_over_its_bead_image(tmp_path, capsys, image_tif, flag):
    before = image_tif.read_bytes()
    code, _, err = _run(capsys, "calibrate", image_tif, "-o", tmp_path / "s.cgpsf", flag, image_tif)
    assert code == 1 and "is the input" in err
    assert image_tif.read_bytes() == before and not (tmp_path / "s.cgpsf").exists()


@pytest.mark.parametrize("flag", ["--json", "--png"])
def test_evaluate_never_writes_a_report_over_its_images(tmp_path, capsys, model_file, image_tif, flag):
    before = image_tif.read_bytes()
    code, _, err = _run(capsys, "evaluate", "-m", model_file, "--sharp", image_tif, "--blurred", image_tif,
                        flag, image_tif, "--device", "cpu")
    assert code == 1 and "is the input" in err
    assert image_tif.read_bytes() == before


@pytest.mark.parametrize("command", ["calibrate", "export"])
def test_an_output_that_names_a_folder_is_refused_instead_of_written_beside_it(tmp_path, capsys, model_file,
                                                                               image_tif, command):
    (tmp_path / "DIR").mkdir()
    argv = [command, image_tif] if command == "calibrate" else [command, "-m", model_file]
    code, _, err = _run(capsys, *argv, "-o", f"{tmp_path / 'DIR'}/")
    assert code == 1 and "is a folder; give a file name" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["DIR", "img.tif", "m.cgmodel"])


def test_an_empty_dask_address_is_refused(tmp_path, capsys, model_file, image_tif):
    code, _, err = _run(capsys, "apply", "-m", model_file, image_tif, "-o", tmp_path / "o.zarr", "--dask", "")
    assert code == 1 and "--dask is empty" in err


# -- reports are atomic ---------------------------------------------------------------------------------
def test_a_full_disk_while_writing_a_report_keeps_the_old_report_and_no_temporary_file(tmp_path, capsys,
                                                                                       model_file, image_tif,
                                                                                       monkeypatch):
    report = tmp_path / "r.json"
    report.write_text('{"old": true}')
    real = Path.write_bytes

    def half_then_enospc(self, data):
        real(self, data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device", str(self))

    monkeypatch.setattr(Path, "write_bytes", half_then_enospc)
    code, _, err = _run(capsys, "evaluate", "-m", model_file, "--sharp", image_tif, "--blurred", image_tif,
                        "--json", report, "--device", "cpu")

    assert code == 1 and "No space left" in err
    assert json.loads(report.read_text()) == {"old": True}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".r.json")]


# -- a run leaves what it announces ---------------------------------------------------------------------
def _train_argv(tmp_path, image_tif, out, *extra):
    return ["train", "--sharp", image_tif, "--psf", "gaussian", "-o", out, "--depth", 1, "--channels", 2,
            "--crop", 32, "--batch", 2, "--steps-per-epoch", 2, "--epochs", 1, "--device", "cpu", *extra]


def test_resuming_into_a_new_output_writes_the_model_and_checkpoint_it_announces(tmp_path, capsys, image_tif):
    code, _, err = _run(capsys, *_train_argv(tmp_path, image_tif, tmp_path / "run1"))
    assert code == 0, err

    code, out, err = _run(capsys, *_train_argv(tmp_path, image_tif, tmp_path / "run2", "--resume",
                                               tmp_path / "run1.cgckpt"))

    assert code == 0, err
    for name in ("run2.cgmodel", "run2.cgckpt"):
        assert (tmp_path / name).is_file() and str(tmp_path / name) in out
    from napari_coordgate.model_io import load_checkpoint, load_model

    assert load_checkpoint(tmp_path / "run2.cgckpt")["meta"]["epoch"] == 1
    a, b = load_model(tmp_path / "run1.cgmodel").model, load_model(tmp_path / "run2.cgmodel").model
    assert all(np.array_equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())


def test_a_run_stopped_before_its_first_epoch_announces_no_checkpoint_and_exits_130(tmp_path, capsys, image_tif,
                                                                                   monkeypatch):
    from napari_coordgate.runners import console

    monkeypatch.setattr(console.StopFlag, "__call__", lambda self: True)  # Ctrl-C before the first step
    code, out, err = _run(capsys, *_train_argv(tmp_path, image_tif, tmp_path / "run"))

    assert code == 130
    assert (tmp_path / "run.cgmodel").is_file() and not (tmp_path / "run.cgckpt").exists()
    assert "checkpoint: " not in out + err and "no checkpoint was written" in out


def test_an_aborted_run_says_plainly_that_no_model_was_written(tmp_path, capsys, image_tif, monkeypatch):
    from napari_coordgate import cli

    def abort(*args, **kwargs):
        raise KeyboardInterrupt  # a second Ctrl-C inside the first step

    monkeypatch.setattr(cli, "_train_with_bar", abort)
    code, out, err = _run(capsys, *_train_argv(tmp_path, image_tif, tmp_path / "run"))

    assert code == 130
    assert "no model was written" in err and "no checkpoint was written" in err
    assert "model: " not in out and "checkpoint: " not in out + err


# -- signals and concurrent writers ---------------------------------------------------------------------
_SIGTERM_MID_WRITE = """
    import os, signal, sys
    import numpy as np
    from napari_coordgate import cli

    def predict(saved, data, out=None, **kw):  # fills half of the output, then the scheduler sends SIGTERM
        out[: out.shape[0] // 2] = 1.0
        os.kill(os.getpid(), signal.SIGTERM)
        out[out.shape[0] // 2 :] = 2.0
        return out

    cli._predict_with_bar = predict
    sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.mark.parametrize("suffix", [".tif", ".zarr"])
def test_sigterm_during_apply_leaves_no_temporary_file_and_no_output(tmp_path, model_file, suffix):
    stack = tmp_path / "in" / "stack.tif"
    stack.parent.mkdir()
    tifffile.imwrite(stack, np.ones((4, 64, 64), np.float32), photometric="minisblack")
    outdir = tmp_path / "out"
    outdir.mkdir()

    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(_SIGTERM_MID_WRITE), "apply", "-m",
                           str(model_file), str(stack), "-o", str(outdir / f"res{suffix}"), "--device", "cpu"],
                          capture_output=True, text=True, timeout=300)

    assert proc.returncode == 143, proc.stderr
    assert "terminated" in proc.stderr and "Traceback" not in proc.stderr
    left = sorted(p.name for p in outdir.iterdir())
    # a zarr output may leave its .partial store (replaced by the next run), never a store that looks complete
    assert left == ([] if suffix == ".tif" else ["res.zarr.partial"])


def test_a_second_writer_of_one_zarr_output_is_refused_with_the_first_ones_name(tmp_path):
    from napari_coordgate.image_io.omezarr import OutputBusyError, create_ome_zarr

    first = create_ome_zarr(tmp_path / "o.zarr", (2, 8, 8))
    with pytest.raises(OutputBusyError, match=f"being written by another run \\(pid {os.getpid()} on"):
        create_ome_zarr(tmp_path / "o.zarr", (2, 8, 8))
    assert (tmp_path / "o.zarr.partial").is_dir()  # the first writer's partial store was not touched
    for i in range(2):
        first.write_plane((i,), np.zeros((8, 8)))
    assert first.complete and not (tmp_path / "o.zarr.lock").exists()
    create_ome_zarr(tmp_path / "o.zarr", (2, 8, 8)).release()  # free again


def test_a_writer_that_died_does_not_block_the_next_run(tmp_path):
    script = (f"from napari_coordgate.image_io.omezarr import create_ome_zarr; import os; "
              f"w = create_ome_zarr({str(tmp_path / 'o.zarr')!r}, (2, 8, 8)); os._exit(1)")
    subprocess.run([sys.executable, "-c", script], check=False, timeout=120)
    from napari_coordgate.image_io.omezarr import create_ome_zarr

    writer = create_ome_zarr(tmp_path / "o.zarr", (1, 8, 8))
    writer.write_plane((0,), np.ones((8, 8)))
    assert writer.complete


# -- misleading runs --------------------------------------------------------------------------------------
def test_a_psf_model_measured_on_another_field_is_refused_for_training(fake_psf):
    from napari_coordgate.config import ModelConfig, TrainConfig
    from napari_coordgate.data import InputError
    from napari_coordgate.engine import SimulatedSource
    from napari_coordgate.engine.trainingdata import TrainingData

    psf = fake_psf.with_provenance({"field_shape": [128, 128]})
    sharp = np.random.default_rng(0).random((64, 64)).astype(np.float32) + 0.1
    with pytest.raises(InputError, match="measured on a 128 x 128 field but these images are 64 x 64"):
        TrainingData.from_source(SimulatedSource(sharp, psf), ModelConfig(depth=1, channels=2), TrainConfig())
    TrainingData.from_source(SimulatedSource(sharp, fake_psf.with_provenance({"field_shape": [64, 64]})),
                             ModelConfig(depth=1, channels=2), TrainConfig())


def test_apply_warns_of_a_pixel_size_mismatch_for_ome_zarr_input(tmp_path, capsys):
    from napari_coordgate.config import ModelConfig
    from napari_coordgate.image_io.omezarr import create_ome_zarr
    from napari_coordgate.model_io import SavedModel, save_model
    from napari_coordgate.nn import build_model
    from napari_coordgate.optics.psf import PRESETS

    cfg = ModelConfig(depth=1, channels=2)
    psf = next(p for p in PRESETS.values() if p.model == "pupil")
    model = save_model(tmp_path / "m.cgmodel", SavedModel(build_model(cfg), cfg, (64, 64), psf=psf))
    axes = [{"name": "y", "type": "space", "unit": "micrometer"}, {"name": "x", "type": "space", "unit": "micrometer"}]
    writer = create_ome_zarr(tmp_path / "in.zarr", (1, 64, 64), axes=[{"name": "c", "type": "channel"}, *axes],
                             scale=[1.0, 10 * psf.pixel_size_um, 10 * psf.pixel_size_um])
    writer.write_plane((0,), np.ones((64, 64)))

    code, _, err = _run(capsys, "apply", "-m", model, tmp_path / "in.zarr", "-o", tmp_path / "o.tif", "--device",
                        "cpu")

    assert code == 0, err
    assert f"{10 * psf.pixel_size_um:.4g} µm pixels but the model was calibrated at {psf.pixel_size_um:.4g}" in err


def test_calibration_warns_when_the_optics_contradict_the_beads():
    from types import SimpleNamespace

    from napari_coordgate.calibration.calibrate import _optics_warnings

    beads = SimpleNamespace(accepted=np.ones(50, bool), fwhm_x=np.full(50, 2.3), fwhm_y=np.full(50, 2.3))
    right = {"na": 1.4, "wavelength_um": 0.52, "pixel_size_um": 0.1}
    assert _optics_warnings(right, beads, "pupil", {"grid": 2.0, "pupil": 1.9}) == []
    wrong = _optics_warnings({**right, "pixel_size_um": 1.0}, beads, "pupil", {"grid": 2.67, "pupil": 105.0})
    assert len(wrong) == 3
    assert "diffraction limit" in wrong[0] and "under-sample" in wrong[1] and "39x worse" in wrong[2]


def test_calibrate_warns_when_the_pixel_size_flag_contradicts_the_metadata(tmp_path, capsys):
    path = tmp_path / "b.tif"
    noise = np.random.default_rng(0).normal(100, 5, (64, 64)).astype(np.float32)
    tifffile.imwrite(path, noise, imagej=True, resolution=(10.0, 10.0), metadata={"unit": "um", "axes": "YX"})

    code, _, err = _run(capsys, "calibrate", path, "-o", tmp_path / "s.cgpsf", "--pixel-size", 1.0)

    assert "--pixel-size 1 µm differs from the 0.1 µm" in err
    assert code == 1 and "no beads found" in err  # and a noise image has no beads to calibrate


@pytest.mark.parametrize("kind, message", [("constant", "constant"), ("noise", "no beads found")])
def test_evaluate_beads_on_an_image_without_beads_says_so(tmp_path, capsys, model_file, kind, message):
    rng = np.random.default_rng(0)
    image = np.full((64, 64), 100.0, np.float32) if kind == "constant" else rng.normal(100, 5, (64, 64))
    tifffile.imwrite(tmp_path / "b.tif", image.astype(np.float32))

    code, out, err = _run(capsys, "evaluate", "-m", model_file, "--beads", tmp_path / "b.tif", "--device", "cpu")

    errors = [line for line in err.splitlines() if line.startswith("napari-coordgate:")]
    assert code == 1 and len(errors) == 1 and message in errors[0] and "Traceback" not in err
    assert "after" not in out


# -- the dock's apply job ---------------------------------------------------------------------------------
def _apply_request(model_file, **kw):
    from napari_coordgate.app.jobs import ApplyRequest
    from napari_coordgate.model_io import load_model

    image = np.ones((2, 64, 64), np.float32)
    return ApplyRequest(image=image, models=[load_model(model_file)], **kw)


def test_the_dock_never_writes_its_output_over_the_layers_source_file(tmp_path, model_file):
    from napari_coordgate.app.jobs import apply_job

    source = tmp_path / "layer.npy"
    np.save(source, np.zeros((2, 64, 64), np.float32))
    before = source.read_bytes()
    req = _apply_request(model_file, out_path=str(source), inputs=(str(source),))

    with pytest.raises(OutputError, match="is the input"):
        apply_job(req, report=lambda p: None, should_stop=lambda: False)
    assert source.read_bytes() == before


def test_the_docks_memory_mapped_output_on_a_full_disk_is_an_error_not_a_crash(tmp_path, model_file, monkeypatch):
    from napari_coordgate.app.jobs import apply_job

    def no_space(fd, offset, size):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", no_space)
    req = _apply_request(model_file, out_path=str(tmp_path / "out.npy"))

    with pytest.raises(OSError, match="cannot write .*out.npy: No space left on device"):
        apply_job(req, report=lambda p: None, should_stop=lambda: False)
    assert list(tmp_path.iterdir()) == [model_file]


def test_resuming_with_another_learning_rate_or_batch_says_so(tmp_path, capsys, image_tif):
    code, _, err = _run(capsys, *_train_argv(tmp_path, image_tif, tmp_path / "run"))
    assert code == 0, err

    code, _, err = _run(capsys, *_train_argv(tmp_path, image_tif, tmp_path / "run", "--resume", tmp_path / "run",
                                              "--epochs", 2, "--lr", 0.01, "--batch", 4, "--threads", 1))

    assert code == 0, err
    warning = next(line for line in err.splitlines() if "changed settings" in line)
    assert warning.startswith("napari-coordgate: warning: resuming") and "batch 2 -> 4" in warning
    assert "lr 0.003 -> 0.01" in warning and "epochs" not in warning and "threads" not in warning


# -- messages: one line, the file named ---------------------------------------------------------------------
@pytest.mark.parametrize("command", ["calibrate", "apply", "evaluate"])
def test_an_empty_tiff_or_a_folder_as_the_image_is_one_line_naming_it(tmp_path, capsys, model_file, command):
    empty = tmp_path / "empty.tif"
    with pytest.warns(UserWarning):
        tifffile.imwrite(empty, np.zeros((0, 0), np.uint16))
    (tmp_path / "folder").mkdir()
    for bad, says in ((empty, "holds an empty image"), (tmp_path / "folder", "is a folder, not an image")):
        argv = {"calibrate": ["calibrate", bad, "-o", tmp_path / "s.cgpsf"],
                "apply": ["apply", "-m", model_file, bad, "-o", tmp_path / "o.tif"],
                "evaluate": ["evaluate", "-m", model_file, "--sharp", bad, "--blurred", bad]}[command]
        code, _, err = _run(capsys, *argv)
        assert code == 1 and says in err and str(bad) in err and err.count("\n") == 1, err


def test_a_diverging_train_says_so_keeps_its_best_model_and_exits_nonzero(tmp_path, capsys, image_tif, monkeypatch):
    from napari_coordgate.engine import training

    real, calls = training._step, []

    def step(*args, **kwargs):  # the first epoch trains, then the loss is NaN
        calls.append(1)
        return real(*args, **kwargs) if len(calls) <= 2 else float("nan")

    monkeypatch.setattr(training, "_step", step)
    code, out, err = _run(capsys, *_train_argv(tmp_path, image_tif, tmp_path / "run", "--epochs", 3))

    assert code == 1 and (tmp_path / "run.cgmodel").is_file()
    assert "error: training diverged (the loss became nan at step 3): the best model so far is kept at" in err


def test_an_input_named_through_a_link_and_dotdot_is_still_the_input(tmp_path):
    (tmp_path / "data" / "sub").mkdir(parents=True)
    (tmp_path / "data" / "raw.tif").write_bytes(b"x")
    (tmp_path / "link").symlink_to(tmp_path / "data" / "sub")
    tricky = f"{tmp_path / 'link'}/../raw.tif"  # the system opens data/raw.tif; the text says tmp_path/raw.tif
    with pytest.raises(OutputError, match="is the input"):
        check_outputs([tmp_path / "data" / "raw.tif"], [tricky])
    with pytest.raises(OutputError, match="is the input"):
        check_outputs([tricky], [tmp_path / "data" / "raw.tif"])


def test_a_writer_that_fails_while_starting_gives_its_lock_up(tmp_path, monkeypatch):
    from napari_coordgate.image_io import omezarr

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(omezarr._zarr(), "open_group", no_space)
    with pytest.raises(OSError, match="No space left"):
        omezarr.create_ome_zarr(tmp_path / "o.zarr", (2, 8, 8))
    monkeypatch.undo()
    assert not (tmp_path / "o.zarr.lock").exists()
    with omezarr.create_ome_zarr(tmp_path / "o.zarr", (1, 8, 8)) as writer:  # this process can write it again
        writer.write_plane((0,), np.ones((8, 8)))
    assert writer.complete
