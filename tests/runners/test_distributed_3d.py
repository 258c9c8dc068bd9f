"""apply --dask with a 3-D model: every z-slab of every volume is a dask.distributed task that reads its slab and the
network's z halo and writes only its own planes; the store equals single-process apply bit for bit (a depth that is
not a multiple of the slab depth, a TZYX time-lapse, a volume resampled to the model's z-step), keeps one chunk per
plane along z and the z-step in its scale; a volume of another z-step is refused in one line before anything is
written."""

import numpy as np
import pytest
import test_distributed  # its import skips this module too, without distributed, zarr or ome-zarr
from test_cli_3d import _write
from test_distributed import _run, _single_process, zarr

from napari_coordgate.engine.prediction import SLAB_DEPTH, predict, predict_slab, volume_normalization, volume_slabs
from napari_coordgate.image_io.omezarr import read_zarr

FIELD = (64, 64)  # --tile 48 (as _single_process applies): four columns per slab
DEPTH = SLAB_DEPTH + 13  # two slabs, the second shorter: not a multiple of the slab depth
Z_STEP = 0.3
cluster = test_distributed.cluster  # the fixture: a 2-worker LocalCluster reached by its address, one per module


@pytest.fixture(scope="module")
def saved3d(random_3d_model):
    return random_3d_model(FIELD, {"offset": 100.0, "scale": 900.0, "percentiles": [1.0, 99.8]}, Z_STEP)


@pytest.fixture(scope="module")
def model3d_file(saved3d, tmp_path_factory):
    from napari_coordgate.model_io import save_model

    return save_model(tmp_path_factory.mktemp("model") / "vol.cgmodel", saved3d)


def _volumes(n: int, depth: int = DEPTH) -> np.ndarray:
    return (np.random.default_rng(5).random((n, depth, *FIELD)) * 1000 + 100).astype(np.float32)


def test_slabs_predicted_alone_give_the_whole_volume_prediction_bit_for_bit(saved3d):
    vol = _volumes(1)[0]
    slabs = volume_slabs(saved3d, vol.shape, z_step_um=Z_STEP)
    kwargs = {"tile": 48, "device": "cpu", "batch_tiles": 3, "z_step_um": Z_STEP}

    whole = predict(saved3d, vol, **kwargs)
    norm = volume_normalization(saved3d, vol)
    parts = [predict_slab(saved3d, vol, (z0, z1), normalization=norm, **kwargs) for z0, z1, _, _ in slabs]

    assert [s[:2] for s in slabs] == [(0, SLAB_DEPTH), (SLAB_DEPTH, DEPTH)]
    assert slabs[1][2] > 0 and slabs[0][3] < DEPTH  # each window reaches only a halo into the other slab
    np.testing.assert_array_equal(np.concatenate(parts), whole)
    with pytest.raises(ValueError, match="not the cores of whole z-slabs"):
        predict_slab(saved3d, vol, (0, 8), normalization=norm, **kwargs)


def _apply_dask(capsys, model_file, src, dest, *cluster_flags):
    """``apply --dask`` with _single_process's options; the output's text and image."""
    code, out, err = _run(capsys, "apply", "-m", model_file, src, "-o", dest, "--tile", 48, "--device", "cpu",
                          "--threads", 1, "--dask", *cluster_flags)
    assert code == 0, err
    return out, read_zarr(dest)


def test_dask_zyx_volume_equals_single_process_apply_bit_for_bit_in_z_chunks(tmp_path, capsys, model3d_file):
    src = _write(tmp_path / "vol.tif", _volumes(1)[0], spacing=Z_STEP)
    reference = _single_process(capsys, model3d_file, src, tmp_path / "single.zarr")

    out, image = _apply_dask(capsys, model3d_file, src, tmp_path / "dask.zarr", "local", "--workers", 1)

    assert "1 dask worker(s)" in out
    assert image.axis_names == ("z", "y", "x") and image.scale == pytest.approx((Z_STEP, 0.1, 0.1))
    assert 1 <= zarr.open_array(str(tmp_path / "dask.zarr" / "0"), mode="r").chunks[0] <= SLAB_DEPTH
    np.testing.assert_array_equal(np.asarray(image.data), reference)  # exact: the same tiles, batches and threads


def test_dask_tzyx_stack_equals_single_process_apply_volume_by_volume(tmp_path, capsys, model3d_file, cluster):
    src = _write(tmp_path / "series.tif", _volumes(2), spacing=Z_STEP, axes="TZYX")
    reference = _single_process(capsys, model3d_file, src, tmp_path / "single.zarr")

    out, image = _apply_dask(capsys, model3d_file, src, tmp_path / "dask.zarr", cluster.scheduler_address)

    assert image.axis_names == ("t", "z", "y", "x") and reference.shape == (2, DEPTH, *FIELD)
    np.testing.assert_array_equal(np.asarray(image.data), reference)
    assert not (tmp_path / "dask.zarr.partial").exists()


def test_dask_refuses_a_volume_of_another_z_step_in_one_line_and_writes_nothing(tmp_path, capsys, model3d_file,
                                                                                cluster):
    src = _write(tmp_path / "vol.tif", _volumes(1, depth=12)[0], spacing=0.6)

    code, out, err = _run(capsys, "apply", "-m", model3d_file, src, "-o", tmp_path / "dask.zarr", "--device", "cpu",
                          "--threads", 1, "--dask", cluster.scheduler_address)

    assert code != 0 and len(err.strip().splitlines()) == 1
    assert "z-step is 0.6 µm but the model was trained at 0.3 µm" in err and "--resample-z" in err
    assert not list(tmp_path.glob("dask.zarr*"))


def test_dask_resample_z_equals_single_process_resample_z(tmp_path, capsys, model3d_file, cluster):
    src = _write(tmp_path / "vol.tif", _volumes(1, depth=12)[0], spacing=0.6)
    flags = ("--tile", 48, "--device", "cpu", "--threads", 1, "--resample-z")
    assert _run(capsys, "apply", "-m", model3d_file, src, "-o", tmp_path / "single.zarr", *flags)[0] == 0

    out, image = _apply_dask(capsys, model3d_file, src, tmp_path / "dask.zarr", cluster.scheduler_address,
                             "--resample-z")

    assert image.data.shape == (12, *FIELD)
    np.testing.assert_array_equal(np.asarray(image.data), np.asarray(read_zarr(tmp_path / "single.zarr").data))
