"""TIFF writing on a full disk: one clear line, no temporary file left, an earlier file kept, never a SIGBUS."""

import errno
import os
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import tifffile

from napari_coordgate.image_io.tiff import DiskFullError, read_tiff, write_tiff, write_tiff_streamed

_SHAPE = (300, 1000, 1000)  # 1.2 GB of float32: only ever a sparse file here, fill is never reached


def _fail_with(code):
    def fail(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    return fail


def _free(monkeypatch, nbytes):
    monkeypatch.setattr(shutil, "disk_usage", lambda folder: SimpleNamespace(total=10**12, used=0, free=nbytes))


def _never_called(out):
    raise AssertionError("fill ran although the file could not be reserved")


def _old_file(tmp_path):
    path = tmp_path / "out.tif"
    tifffile.imwrite(path, np.ones((4, 4), np.float32))
    return path, path.read_bytes()


@pytest.mark.skipif(not hasattr(os, "posix_fallocate"), reason="no posix_fallocate on this platform")
def test_streamed_write_fills_a_fully_allocated_file_not_a_sparse_one(tmp_path):
    # writing into a hole of a memory map on a full disk is a SIGBUS; with every block allocated there is no hole
    seen = []

    def fill(out):
        (tmp,) = [f for f in tmp_path.iterdir() if f.name != "b.tif"]
        st = tmp.stat()
        seen.append((st.st_blocks * 512, st.st_size))
        out[...] = 1.5

    write_tiff_streamed(tmp_path / "b.tif", (5, 256, 256), fill)

    (allocated, size), = seen
    assert size >= 5 * 256 * 256 * 4 and allocated >= size
    assert np.all(read_tiff(tmp_path / "b.tif").data == 1.5)


@pytest.mark.parametrize("code, words", [
    (errno.ENOSPC, "not enough disk space for {path}: needs 1.2 GB, 0.3 GB free"),
    (errno.EDQUOT, "disk quota exceeded writing {path}: needs 1.2 GB"),
    (errno.EFBIG, "{path} needs 1.2 GB, more than one file may hold on that file system"),
])
def test_a_full_disk_stops_a_streamed_write_before_any_work_and_leaves_no_temporary_file(
        tmp_path, monkeypatch, code, words):
    path, before = _old_file(tmp_path)
    monkeypatch.setattr(os, "posix_fallocate", _fail_with(code), raising=False)
    _free(monkeypatch, 300_000_000)

    with pytest.raises(DiskFullError) as err:
        write_tiff_streamed(path, _SHAPE, _never_called)

    assert str(err.value) == words.format(path=path)
    assert err.value.errno == code and isinstance(err.value, OSError)
    assert list(tmp_path.iterdir()) == [path] and path.read_bytes() == before


def test_where_space_cannot_be_reserved_a_disk_too_small_is_refused_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "posix_fallocate", _fail_with(errno.EOPNOTSUPP), raising=False)
    _free(monkeypatch, 300_000_000)
    with pytest.raises(DiskFullError, match="needs 1.2 GB, 0.3 GB free"):
        write_tiff_streamed(tmp_path / "out.tif", _SHAPE, _never_called)
    assert list(tmp_path.iterdir()) == []

    monkeypatch.delattr(os, "posix_fallocate", raising=False)  # macOS, Windows
    with pytest.raises(DiskFullError, match="needs 1.2 GB, 0.3 GB free"):
        write_tiff_streamed(tmp_path / "out.tif", _SHAPE, _never_called)
    assert list(tmp_path.iterdir()) == []

    _free(monkeypatch, 10**10)  # room enough: written as usual
    write_tiff_streamed(tmp_path / "out.tif", (2, 8, 8), lambda out: out.fill(2.0))
    assert np.all(read_tiff(tmp_path / "out.tif").data == 2.0)


def test_other_errors_while_reserving_pass_through_unchanged(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "posix_fallocate", _fail_with(errno.EIO), raising=False)
    with pytest.raises(OSError) as err:
        write_tiff_streamed(tmp_path / "out.tif", (2, 8, 8), _never_called)
    assert err.value.errno == errno.EIO and not isinstance(err.value, DiskFullError)
    assert list(tmp_path.iterdir()) == []


def test_a_disk_filling_up_during_write_tiff_is_one_line_naming_the_file_and_keeps_the_old_one(
        tmp_path, monkeypatch):
    path, before = _old_file(tmp_path)
    _free(monkeypatch, 1_000_000)

    def half_then_full(tmp, data, **kwargs):
        with open(tmp, "wb") as fh:
            fh.write(b"\0" * 1000)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(tifffile, "imwrite", half_then_full)
    with pytest.raises(DiskFullError) as err:
        write_tiff(path, np.zeros((500, 1000), np.float32))

    assert str(err.value) == f"not enough disk space for {path}: needs 2.0 MB, 1.0 MB free"
    assert list(tmp_path.iterdir()) == [path] and path.read_bytes() == before


@pytest.mark.parametrize("streamed", [False, True])
def test_a_full_disk_at_the_final_fsync_is_reported_the_same_way(tmp_path, monkeypatch, streamed):
    # NFS and other network file systems report a full disk only when the data is flushed
    path, before = _old_file(tmp_path)
    monkeypatch.setattr(os, "fsync", _fail_with(errno.ENOSPC))
    with pytest.raises(DiskFullError) as err:
        if streamed:
            write_tiff_streamed(path, (2, 8, 8), lambda out: out.fill(1.0))
        else:
            write_tiff(path, np.zeros((2, 8, 8), np.float32))
    assert str(err.value).startswith(f"not enough disk space for {path}: needs 0.5 kB, ") and "\n" not in str(err.value)
    assert list(tmp_path.iterdir()) == [path] and path.read_bytes() == before
