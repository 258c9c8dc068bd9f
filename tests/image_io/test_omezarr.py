"""OME-Zarr and zarr in and out: NGFF 0.4/0.5 and plain zarr inputs with their axes, a chunk cache that decodes each
storage chunk once under overlapping tiles, an NGFF 0.4 output that ome-zarr-py (and napari-ome-zarr) read with
axes, scale and units, that never looks complete after a failed run; the CLI's round trips and its axes errors."""

import json
from collections import Counter

import numpy as np
import pytest
import tifffile

zarr = pytest.importorskip("zarr")
pytest.importorskip("ome_zarr")

from napari_coordgate.cli import main  # noqa: E402
from napari_coordgate.data import InputError  # noqa: E402
from napari_coordgate.engine import Cancelled, predict  # noqa: E402
from napari_coordgate.image_io.omezarr import (  # noqa: E402
    ChunkCachedArray,
    IncompleteOutputError,
    axes_from_tiff,
    create_ome_zarr,
    read_zarr,
)

FIELD = (96, 80)
UM = "micrometer"


@pytest.fixture(scope="module")
def stack():
    return (np.random.default_rng(1).random((3,) + FIELD) * 1000 + 100).astype(np.uint16)


def _ome_zarr(path, data, fmt, axes, scale):
    """An OME-Zarr image written by ome-zarr-py (one level, one chunk per plane)."""
    from ome_zarr.writer import write_image

    group = zarr.open_group(str(path), mode="w", zarr_format=fmt.zarr_format)
    names = [a["name"] for a in axes]
    write_image(data, group, axes=names, fmt=fmt, scale_factors=[], scale=dict(zip(names, scale)),
                axes_units={a["name"]: a["unit"] for a in axes if a.get("unit")},
                storage_options={"chunks": (1,) + data.shape[1:]})
    return path


def _axes(*names_units):
    types = {"t": "time", "c": "channel", "z": "space", "y": "space", "x": "space"}
    return [dict(name=n, type=types[n], **({"unit": u} if u else {})) for n, u in names_units]


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


# -- reading --------------------------------------------------------------------------------------
@pytest.mark.parametrize("version", ["0.4", "0.5"])
def test_ome_zarr_inputs_of_ngff_04_and_05_are_read_with_axes_scale_and_units(tmp_path, stack, version):
    from ome_zarr.format import FormatV04, FormatV05

    fmt = FormatV04() if version == "0.4" else FormatV05()
    axes = _axes(("z", UM), ("y", UM), ("x", UM))
    path = _ome_zarr(tmp_path / "in.zarr", stack, fmt, axes, [2.0, 0.25, 0.25])

    image = read_zarr(path)

    assert image.version == version
    assert image.axis_names == ("z", "y", "x")
    assert image.units == {"z": UM, "y": UM, "x": UM}
    assert image.scale == (2.0, 0.25, 0.25)
    assert image.data.shape == stack.shape and image.data.dtype == stack.dtype
    np.testing.assert_array_equal(np.asarray(image.data), stack)
    np.testing.assert_array_equal(image.data[1, 10:20, -5:], stack[1, 10:20, -5:])


def test_plain_zarr_arrays_are_read_with_their_dimension_names_or_default_axes(tmp_path, stack):
    v2 = zarr.create_array(str(tmp_path / "v2.zarr"), shape=stack.shape, dtype=stack.dtype, chunks=(1, 32, 32),
                           zarr_format=2)
    v2[...] = stack
    v3 = zarr.create_array(str(tmp_path / "v3.zarr"), shape=stack.shape, dtype=stack.dtype, chunks=(1, 32, 32),
                           dimension_names=("t", "y", "x"))
    v3[...] = stack

    plain2, plain3 = read_zarr(tmp_path / "v2.zarr"), read_zarr(tmp_path / "v3.zarr")

    assert plain2.version is None and plain2.axis_names == ("z", "y", "x") and plain2.scale == (1.0, 1.0, 1.0)
    assert plain3.axis_names == ("t", "y", "x") and plain3.axes[0]["type"] == "time"
    np.testing.assert_array_equal(np.asarray(plain2.data), stack)
    np.testing.assert_array_equal(np.asarray(plain3.data), stack)


def _bad_ome(path, names):
    """An OME-Zarr 0.4 image whose axes break the (..., y, x) rule (written by hand: ome-zarr refuses to)."""
    group = zarr.open_group(str(path), mode="w", zarr_format=2)
    group.create_array("0", shape=(64, 64, 3), dtype="uint8", chunks=(64, 64, 3))
    group.attrs["multiscales"] = [{"version": "0.4", "axes": [{"name": n} for n in names],
                                   "datasets": [{"path": "0", "coordinateTransformations": [
                                       {"type": "scale", "scale": [1.0, 1.0, 1.0]}]}]}]
    return path


@pytest.mark.parametrize("names, expect", [
    (("y", "x", "c"), "(y, x, c)"),
    (("z", "c", "t"), "(z, c, t)"),
])
def test_ome_zarr_without_y_x_last_is_refused_naming_the_axes_found(tmp_path, names, expect):
    path = _bad_ome(tmp_path / "bad.zarr", names)

    with pytest.raises(InputError) as err:
        read_zarr(path)

    assert expect in str(err.value) and "\n" not in str(err.value)


def test_plain_zarr_with_channels_last_or_other_names_is_refused(tmp_path):
    rgb = zarr.create_array(str(tmp_path / "rgb.zarr"), shape=(64, 64, 3), dtype="uint8", zarr_format=2)
    named = zarr.create_array(str(tmp_path / "named.zarr"), shape=(4, 64, 64), dtype="uint8",
                              dimension_names=("t", "row", "col"))

    with pytest.raises(InputError, match=r"channels last \(y, x, c"):
        read_zarr(tmp_path / "rgb.zarr")
    with pytest.raises(InputError, match=r"axes \(t, row, col\)"):
        read_zarr(tmp_path / "named.zarr")
    assert rgb.shape and named.shape


class _CountingStore(zarr.storage.WrapperStore):
    """Counts reads of chunk keys (metadata keys aside): one read is one decode of that chunk."""

    def __init__(self, store):
        super().__init__(store)
        self.reads = Counter()

    def _with_store(self, store):
        new = type(self)(store)
        new.reads = self.reads
        return new

    async def get(self, key, prototype, byte_range=None):
        if not key.rsplit("/", 1)[-1].startswith(".") and not key.endswith("zarr.json"):
            self.reads[key] += 1
        return await super().get(key, prototype, byte_range)


def test_tiled_prediction_through_the_chunk_cache_decodes_each_storage_chunk_once(tmp_path, model, stack):
    path = tmp_path / "chunks.zarr"
    written = zarr.create_array(str(path), shape=stack.shape, dtype=stack.dtype, chunks=(1, 32, 32))
    written[...] = stack
    n_chunks = written.nchunks

    def counting_array():
        store = _CountingStore(zarr.storage.LocalStore(str(path), read_only=True))
        return store, zarr.open_array(store, mode="r")

    store, array = counting_array()
    cached = ChunkCachedArray(array)
    restored = predict(model, cached, tile=32, device="cpu")  # 32-pixel tiles + halos overlap their neighbours

    assert max(store.reads.values()) == 1 and len(store.reads) == n_chunks
    assert cached.decoded == n_chunks
    np.testing.assert_array_equal(restored, predict(model, stack, tile=32, device="cpu"))
    # the same prediction straight from zarr decodes chunks again for every window that overlaps them
    plain_store, plain = counting_array()
    predict(model, plain, tile=32, device="cpu")
    assert max(plain_store.reads.values()) > 1


def test_a_small_cache_evicts_but_returns_the_same_pixels(tmp_path, stack):
    arr = zarr.create_array(str(tmp_path / "a.zarr"), shape=stack.shape, dtype=stack.dtype, chunks=(1, 32, 32))
    arr[...] = stack

    cached = ChunkCachedArray(arr, max_bytes=32 * 32 * 2)  # one chunk

    np.testing.assert_array_equal(cached[2, 5:90, 7:71], stack[2, 5:90, 7:71])
    np.testing.assert_array_equal(cached[..., -1], stack[..., -1])
    np.testing.assert_array_equal(cached[[0, 2]], stack[[0, 2]])  # fancy index: straight to zarr


# -- writing --------------------------------------------------------------------------------------
def test_output_is_ngff_04_readable_by_ome_zarr_with_axes_scale_and_units_in_ngff_order(tmp_path):
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    data = np.arange(2 * 3 * 16 * 12, dtype=np.float32).reshape(2, 3, 16, 12)  # an ImageJ-style ZCYX stack
    axes = _axes(("z", UM), ("c", None), ("y", UM), ("x", UM))
    writer = create_ome_zarr(tmp_path / "out.zarr", data.shape, axes=axes, scale=[0.5, 1.0, 0.1, 0.1])

    for z in range(2):
        for c in range(3):
            writer[z, c, :8] = data[z, c, :8]  # tiles of a plane, in the input's axis order
            writer[z, c, 8:] = data[z, c, 8:]

    assert writer.complete and (tmp_path / "out.zarr").is_dir() and not (tmp_path / "out.zarr.partial").exists()
    np.testing.assert_array_equal(np.asarray(writer), data)
    node = next(iter(Reader(parse_url(str(tmp_path / "out.zarr")))()))
    meta = node.metadata
    assert [a["name"] for a in meta["axes"]] == ["c", "z", "y", "x"]  # NGFF: channel before space
    assert [a.get("unit") for a in meta["axes"]] == [None, UM, UM, UM]
    assert meta["coordinateTransformations"][0][0]["scale"] == [1.0, 0.5, 0.1, 0.1]
    np.testing.assert_array_equal(np.asarray(node.data[0]), data.transpose(1, 0, 2, 3))
    attrs = json.loads((tmp_path / "out.zarr" / ".zattrs").read_text())
    assert attrs["multiscales"][0]["version"] == "0.4"
    assert zarr.open_array(str(tmp_path / "out.zarr" / "0")).chunks == (1, 1, 16, 12)  # one plane per chunk


def test_output_is_read_by_napari_ome_zarr_with_scale_and_units(tmp_path):
    reader = pytest.importorskip("napari_ome_zarr._reader")
    writer = create_ome_zarr(tmp_path / "out.zarr", (2, 16, 12), axes=_axes(("z", UM), ("y", UM), ("x", UM)),
                             scale=[2.0, 0.5, 0.5])
    writer[0], writer[1] = np.zeros((16, 12)), np.ones((16, 12))

    (data, kwargs, kind), = reader.napari_get_reader(str(tmp_path / "out.zarr"))(str(tmp_path / "out.zarr"))

    assert kind == "image" and data[0].shape == (2, 16, 12)
    assert list(kwargs["scale"]) == [2.0, 0.5, 0.5] and list(kwargs["units"]) == [UM, UM, UM]


def test_a_failed_run_never_leaves_a_store_that_looks_complete(tmp_path, model, stack):
    out = tmp_path / "out.zarr"
    writer = create_ome_zarr(out, stack.shape)
    calls = iter(range(100))

    with pytest.raises(Cancelled):  # stopped after the first plane's 4 tiles
        predict(model, stack, tile=48, device="cpu", out=writer, should_stop=lambda: next(calls) >= 4)

    assert not out.exists() and (tmp_path / "out.zarr.partial").is_dir()
    with pytest.raises(IncompleteOutputError, match="2 of 3 planes"):
        writer.finalize()
    assert not out.exists()
    writer.release()  # an abandoned writer gives up its lock (a process that ends releases it by itself)
    # the next run replaces the partial store and completes
    rerun = create_ome_zarr(out, stack.shape)
    predict(model, stack, tile=48, device="cpu", out=rerun)
    assert rerun.complete and not (tmp_path / "out.zarr.partial").exists()
    np.testing.assert_array_equal(np.asarray(read_zarr(out).data), predict(model, stack, tile=48, device="cpu"))


def test_a_store_with_a_missing_chunk_is_not_completed(tmp_path):
    writer = create_ome_zarr(tmp_path / "out.zarr", (2, 8, 8))
    writer.sink().write((0,), np.ones((8, 8)))
    writer.mark_written((0,))
    writer.mark_written((1,))  # recorded, but no worker wrote it

    with pytest.raises(IncompleteOutputError, match="1 of 2 chunks"):
        writer.finalize()
    assert not (tmp_path / "out.zarr").exists()


def test_a_finished_store_replaces_an_old_one_but_never_a_foreign_folder(tmp_path):
    old = create_ome_zarr(tmp_path / "out.zarr", (1, 8, 8))
    old[0] = np.zeros((8, 8))
    new = create_ome_zarr(tmp_path / "out.zarr", (1, 8, 8))
    new[0] = np.ones((8, 8))
    (tmp_path / "notes.zarr").mkdir()
    (tmp_path / "notes.zarr" / "todo.txt").write_text("mine")

    assert np.asarray(read_zarr(tmp_path / "out.zarr").data).min() == 1
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    with pytest.raises(FileExistsError, match="not a zarr store"):
        create_ome_zarr(tmp_path / "notes.zarr", (1, 8, 8))


def test_axes_that_ngff_04_cannot_hold_are_refused(tmp_path):
    with pytest.raises(InputError, match="2 to 5 axes"):
        create_ome_zarr(tmp_path / "o.zarr", (1, 1, 1, 1, 2, 8, 8))
    with pytest.raises(InputError, match=r"axes \(q, i, y, x\)"):
        create_ome_zarr(tmp_path / "o.zarr", (2, 2, 8, 8), axes=["q", "i", "y", "x"])  # two custom axes
    assert not (tmp_path / "o.zarr").exists() and not (tmp_path / "o.zarr.partial").exists()


def test_tiff_metadata_becomes_ngff_axes_scale_and_units(tmp_path):
    from napari_coordgate.image_io.tiff import read_tiff

    data = np.zeros((2, 3, 16, 12), np.uint16)
    tifffile.imwrite(tmp_path / "ij.tif", data, imagej=True, resolution=(1 / 0.2, 1 / 0.2),
                     metadata={"unit": "um", "spacing": 0.5, "axes": "ZCYX"})
    tifffile.imwrite(tmp_path / "ome.ome.tif", data[0], ome=True,
                     metadata={"axes": "CYX", "PhysicalSizeX": 0.3, "PhysicalSizeY": 0.3,
                               "PhysicalSizeXUnit": "nm", "PhysicalSizeYUnit": "nm"})

    ij_axes, ij_scale = axes_from_tiff(read_tiff(tmp_path / "ij.tif"))
    ome_axes, ome_scale = axes_from_tiff(read_tiff(tmp_path / "ome.ome.tif"))

    assert [a["name"] for a in ij_axes] == ["z", "c", "y", "x"]
    assert [a.get("unit") for a in ij_axes] == [UM, None, UM, UM]
    assert ij_scale == pytest.approx([0.5, 1.0, 0.2, 0.2])
    assert [a["name"] for a in ome_axes] == ["c", "y", "x"] and ome_axes[-1]["unit"] == "nanometer"
    assert ome_scale == pytest.approx([1.0, 0.3, 0.3])


def test_the_docks_zarr_output_is_ome_zarr_that_appears_when_the_last_plane_is_written(tmp_path):
    from napari_coordgate.app.jobs import make_output

    out = make_output((2, 16, 12), str(tmp_path / "dock.zarr"))
    out[0, :, :6] = np.ones((16, 6))
    out[0, :, 6:] = np.ones((16, 6))
    assert not (tmp_path / "dock.zarr").exists()
    out[1] = np.full((16, 12), 2.0)

    image = read_zarr(tmp_path / "dock.zarr")
    assert image.version == "0.4" and image.axis_names == ("z", "y", "x")
    np.testing.assert_array_equal(np.asarray(image.data)[:, 0, 0], [1.0, 2.0])


# -- the command line -----------------------------------------------------------------------------
def test_cli_apply_tiff_to_ome_zarr_keeps_axes_scale_units_and_equals_the_tiff_output(tmp_path, capsys, model_file,
                                                                                      stack):
    tif = tmp_path / "in.tif"
    tifffile.imwrite(tif, stack, imagej=True, resolution=(1 / 0.2, 1 / 0.2),
                     metadata={"unit": "um", "spacing": 0.5, "axes": "ZYX"})

    code, out, err = _run(capsys, "apply", "-m", model_file, tif, "-o", tmp_path / "out.zarr", "--tile", 32,
                          "--device", "cpu", "--threads", 1)
    assert code == 0, err
    code, out, err = _run(capsys, "apply", "-m", model_file, tif, "-o", tmp_path / "out.tif", "--tile", 32,
                          "--device", "cpu", "--threads", 1)
    assert code == 0, err

    image = read_zarr(tmp_path / "out.zarr")
    assert image.version == "0.4" and image.axis_names == ("z", "y", "x")
    assert image.units == {"z": UM, "y": UM, "x": UM} and image.scale == pytest.approx((0.5, 0.2, 0.2))
    assert image.data.dtype == np.float32
    np.testing.assert_array_equal(np.asarray(image.data), tifffile.imread(tmp_path / "out.tif"))


@pytest.mark.parametrize("kind", ["ome-0.4", "ome-0.5", "plain"])
def test_cli_apply_reads_ome_zarr_04_05_and_plain_zarr(tmp_path, capsys, model, model_file, stack, kind):
    from ome_zarr.format import FormatV04, FormatV05

    src = tmp_path / "in.zarr"
    if kind == "plain":
        zarr.create_array(str(src), shape=stack.shape, dtype=stack.dtype, chunks=(1, 32, 32))[...] = stack
    else:
        _ome_zarr(src, stack, FormatV04() if kind == "ome-0.4" else FormatV05(),
                  _axes(("t", "second"), ("y", UM), ("x", UM)), [3.0, 0.5, 0.5])

    code, out, err = _run(capsys, "apply", "-m", model_file, src, "-o", tmp_path / "out.zarr", "--tile", 48,
                          "--device", "cpu", "--threads", 1)

    assert code == 0, err
    image = read_zarr(tmp_path / "out.zarr")
    np.testing.assert_array_equal(np.asarray(image.data), predict(model, stack, tile=48, device="cpu"))
    if kind != "plain":
        assert image.axis_names == ("t", "y", "x") and image.scale == (3.0, 0.5, 0.5)
        assert image.units == {"t": "second", "y": UM, "x": UM}


def test_cli_evaluate_reads_zarr_inputs_like_tiffs(tmp_path, capsys, model_file, stack):
    blurred = stack.astype(np.float32)
    sharp = blurred * 1.1 + 5
    reports = {}
    for kind in ("tif", "zarr"):
        for name, data in (("s", sharp), ("b", blurred)):
            p = tmp_path / f"{name}.{kind}"
            if kind == "tif":
                tifffile.imwrite(p, data, photometric="minisblack")
            else:
                zarr.create_array(str(p), shape=data.shape, dtype=data.dtype, chunks=(1, 48, 40))[...] = data
        code, out, err = _run(capsys, "evaluate", "-m", model_file, "--sharp", tmp_path / f"s.{kind}", "--blurred",
                              tmp_path / f"b.{kind}", "--json", tmp_path / f"{kind}.json", "--device", "cpu")
        assert code == 0, err
        reports[kind] = json.loads((tmp_path / f"{kind}.json").read_text())

    assert reports["zarr"]["psnr"] == reports["tif"]["psnr"] and reports["zarr"]["planes"] == 3


def test_cli_zarr_without_y_x_axes_fails_with_one_line_naming_the_axes(tmp_path, capsys, model_file):
    path = _bad_ome(tmp_path / "rgb.zarr", ("y", "x", "c"))

    code, out, err = _run(capsys, "apply", "-m", model_file, path, "-o", tmp_path / "out.zarr", "--device", "cpu")

    assert code == 1
    assert err.count("\n") == 1 and "(y, x, c)" in err and "Traceback" not in err
    assert not (tmp_path / "out.zarr").exists() and not (tmp_path / "out.zarr.partial").exists()
