"""apply --dask: planes as dask.distributed tasks on a 2-worker LocalCluster (processes, 1 thread each) give the
single-process output bit for bit; the model travels once per worker, not with every task; a worker killed
mid-run gets its plane run again (or the run fails) and the output never holds a silently missing plane; an
unreachable scheduler fails fast and writes nothing."""

import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile

distributed = pytest.importorskip("distributed")
zarr = pytest.importorskip("zarr")
pytest.importorskip("ome_zarr")

from napari_coordgate.cli import main  # noqa: E402
from napari_coordgate.config import ModelConfig  # noqa: E402
from napari_coordgate.distributed import (  # noqa: E402
    ImageSource,
    ModelPlugin,
    WorkerDiedError,
    _model_bytes,
    apply_distributed,
)
from napari_coordgate.modelio import SavedModel, save_model  # noqa: E402
from napari_coordgate.zarrio import create_ome_zarr, read_zarr  # noqa: E402

FIELD = (96, 80)
BENCH = Path(__file__).parents[1] / "benchmarks"
PREDICT = {"tile": 48, "device": "cpu"}


@pytest.fixture(scope="module")
def model():
    import torch

    from napari_coordgate.nn import build_model

    torch.manual_seed(0)
    cfg = ModelConfig(depth=2, channels=4, gate="coordgate")
    return SavedModel(build_model(cfg).eval(), cfg, FIELD, {"offset": 100.0, "scale": 900.0})


@pytest.fixture
def model_file(model, tmp_path):
    return save_model(tmp_path / "scope.cgmodel", model)


@pytest.fixture
def stack_tif(tmp_path):
    """An ImageJ ZCYX stack (stored CZYX in OME-Zarr) with pixel sizes: 6 planes."""
    data = (np.random.default_rng(2).random((3, 2) + FIELD) * 1000 + 100).astype(np.uint16)
    path = tmp_path / "stack.tif"
    tifffile.imwrite(path, data, imagej=True, resolution=(1 / 0.2, 1 / 0.2),
                     metadata={"unit": "um", "spacing": 0.5, "axes": "ZCYX"}, compression="zlib")
    return path


@pytest.fixture(scope="module")
def cluster():
    """A 2-worker LocalCluster (processes, one thread each), shared by the tests that reach it by address."""
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address="127.0.0.1:0", silence_logs=50) as c:
        yield c


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def _single_process(capsys, model_file, src, out):
    code, _, err = _run(capsys, "apply", "-m", model_file, src, "-o", out, "--tile", 48, "--device", "cpu",
                        "--threads", 1)
    assert code == 0, err
    return np.asarray(read_zarr(out).data)


def _kill_once(marker: str, name: str = "test-kill-once"):
    """A worker plugin that kills its worker process as the first plane task starts (once per marker file)."""

    class KillOnce(distributed.WorkerPlugin):
        def __init__(self):
            self.name = name

        def transition(self, key, start, finish, **kwargs):
            if finish == "executing" and str(key).startswith("napari-coordgate-plane"):
                try:
                    os.close(os.open(marker, os.O_CREAT | os.O_EXCL))  # the first task anywhere, only
                except FileExistsError:
                    return
                os._exit(1)

    return KillOnce()


def test_dask_local_cluster_output_equals_single_process_apply_bit_for_bit(tmp_path, capsys, model_file, stack_tif):
    reference = _single_process(capsys, model_file, stack_tif, tmp_path / "single.zarr")

    code, out, err = _run(capsys, "apply", "-m", model_file, stack_tif, "-o", tmp_path / "dask.zarr", "--tile", 48,
                          "--device", "cpu", "--threads", 1, "--dask", "local", "--workers", 2)

    assert code == 0, err
    assert "2 dask worker(s)" in out
    image = read_zarr(tmp_path / "dask.zarr")
    assert image.axis_names == ("c", "z", "y", "x") and image.scale == pytest.approx((1.0, 0.5, 0.2, 0.2))
    np.testing.assert_array_equal(np.asarray(image.data), reference)  # exact: same tiles, same thread count


def test_dask_at_a_scheduler_address_writes_one_store_equal_to_single_process(tmp_path, capsys, model_file,
                                                                              stack_tif, cluster):
    reference = _single_process(capsys, model_file, stack_tif, tmp_path / "single.zarr")

    code, out, err = _run(capsys, "apply", "-m", model_file, stack_tif, "-o", tmp_path / "dask.zarr", "--tile", 48,
                          "--device", "cpu", "--threads", 1, "--dask", cluster.scheduler_address)

    assert code == 0, err
    np.testing.assert_array_equal(np.asarray(read_zarr(tmp_path / "dask.zarr").data), reference)
    assert not (tmp_path / "dask.zarr.partial").exists()


def test_the_model_goes_to_each_worker_once_and_not_with_the_tasks(model, tmp_path, stack_tif):
    plugin = ModelPlugin(_model_bytes(model), threads=1)
    source = ImageSource.open(stack_tif)
    writer = create_ome_zarr(tmp_path / "o.zarr", source.shape)

    task_args = pickle.dumps((plugin.name, source, writer.sink(), (0, 0), None, PREDICT, 1))
    plugin_bytes = len(pickle.dumps(plugin))
    plugin.setup()  # what each worker does once

    assert len(task_args) < 2000 < plugin_bytes
    x = np.asarray(source.read_plane((1, 1)), np.float32)
    from napari_coordgate.engine import predict

    np.testing.assert_array_equal(predict(plugin.saved, x, **PREDICT), predict(model, x, **PREDICT))


def test_a_worker_killed_mid_run_gets_its_plane_retried_and_the_output_is_complete(tmp_path, model, stack_tif,
                                                                                  cluster):
    from napari_coordgate.engine import predict

    marker = tmp_path / "killed"
    source = ImageSource.open(stack_tif)
    with distributed.Client(cluster) as client:
        client.register_plugin(_kill_once(str(marker)))
        try:
            writer = create_ome_zarr(tmp_path / "o.zarr", source.shape)
            apply_distributed(client, model, source, writer, predict_kwargs=PREDICT, threads=1)
        finally:
            client.unregister_worker_plugin("test-kill-once")
            client.wait_for_workers(2, timeout=60)

    assert marker.exists()  # a worker died while running a plane
    assert writer.complete and not (tmp_path / "o.zarr.partial").exists()
    expected = predict(model, tifffile.imread(stack_tif), **PREDICT)
    np.testing.assert_array_equal(np.asarray(writer), expected)


def test_a_run_whose_workers_die_too_often_fails_and_leaves_no_complete_store(tmp_path, model, stack_tif):
    import dask

    marker = tmp_path / "killed"
    source = ImageSource.open(stack_tif)
    with dask.config.set({"distributed.scheduler.allowed-failures": 0}):  # no second try for a plane
        with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                      dashboard_address="127.0.0.1:0", silence_logs=50) as c, \
                distributed.Client(c) as client:
            client.register_plugin(_kill_once(str(marker)))
            writer = create_ome_zarr(tmp_path / "o.zarr", source.shape)
            with pytest.raises(WorkerDiedError, match="died"):
                apply_distributed(client, model, source, writer, predict_kwargs=PREDICT, threads=1)

    assert marker.exists() and not writer.complete
    assert not (tmp_path / "o.zarr").exists() and (tmp_path / "o.zarr.partial").is_dir()


def test_an_unreachable_scheduler_fails_within_10_s_naming_it_and_writes_nothing(tmp_path, capsys, model_file,
                                                                                  stack_tif):
    address = "tcp://127.0.0.1:9"  # discard port: nothing listens there
    t0 = time.perf_counter()

    code, out, err = _run(capsys, "apply", "-m", model_file, stack_tif, "-o", tmp_path / "out.zarr", "--dask", address)

    assert code == 1 and time.perf_counter() - t0 < 10
    assert address in err and err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scope.cgmodel", "stack.tif"]


def test_dask_flags_are_checked_before_any_work(tmp_path, capsys, model_file, stack_tif):
    code, _, err = _run(capsys, "apply", "-m", model_file, stack_tif, "-o", tmp_path / "out.tif", "--dask", "local")
    assert code == 1 and "give -o OUT.zarr" in err
    code, _, err = _run(capsys, "apply", "-m", model_file, stack_tif, "-o", tmp_path / "o.zarr", "--workers", 2)
    assert code == 1 and "--dask local" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scope.cgmodel", "stack.tif"]


def test_bench_scale_quick_mode_prints_its_table():
    result = subprocess.run([sys.executable, str(BENCH / "bench_scale.py"), "--quick"], capture_output=True,
                            text=True, timeout=300)

    assert result.returncode == 0, result.stderr[-2000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("|")]
    assert "MP/s" in rows[0] and len(rows) >= 4, result.stdout  # header, rule, 1 process, 2 workers
    assert "identical" in result.stdout
