"""TIFF in, TIFF out, keeping what a microscopist needs: pixel size, axes, OME/ImageJ metadata."""

from __future__ import annotations

import errno
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..outputs import atomic_write
from .units import um_per_unit

__all__ = ["DiskFullError", "TiffImage", "read_tiff", "write_tiff", "write_tiff_streamed", "reserve_file"]


class DiskFullError(OSError):
    """A file did not fit on its disk (or quota, or file system); ``str()`` is one line naming the file, the space
    it needs and the space that was free. The partly written temporary file is already gone."""

    def __str__(self) -> str:
        return str(self.strerror)


@dataclass
class TiffImage:
    data: np.ndarray
    axes: str | None = None
    resolution: tuple[float, float] | None = None  # pixels per unit (x, y), as TIFF stores it
    resolution_unit: int | None = None
    imagej: dict | None = None
    ome: str | None = None
    description: str | None = None
    extra: dict = field(default_factory=dict)


def _memmap(path: Path, series) -> np.ndarray | None:
    """The series as a read-only memory map, or None when its pixels are not stored uncompressed in one piece."""
    import tifffile

    try:
        mm = tifffile.memmap(path, mode="r")
    except (ValueError, OSError):
        return None
    return mm if tuple(mm.shape) == tuple(series.shape) else None


def read_tiff(path: str | os.PathLike, *, lazy: bool = False) -> TiffImage:
    """Read a TIFF and its metadata; a missing or unreadable file raises a clear error.

    With ``lazy=True`` an uncompressed, contiguous file is memory-mapped instead of read, so a stack larger
    than memory can be processed plane by plane; other files are read whole.
    """
    import tifffile

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"input file {path} does not exist")
    try:
        with tifffile.TiffFile(path) as tf:
            series = tf.series[0]
            data = (_memmap(path, series) if lazy else None)
            if data is None:
                data = series.asarray()
            page = tf.pages[0]
            res = page.tags.get("XResolution"), page.tags.get("YResolution")
            resolution = None
            if res[0] is not None and res[1] is not None:
                rx, ry = res[0].value, res[1].value
                resolution = (rx[0] / rx[1], ry[0] / ry[1])
            unit = page.tags.get("ResolutionUnit")
            return TiffImage(
                data=data,
                axes=series.axes,
                resolution=resolution,
                resolution_unit=int(unit.value) if unit is not None else None,
                imagej=dict(tf.imagej_metadata) if tf.imagej_metadata else None,
                ome=tf.ome_metadata,
                description=page.description or None,
            )
    except (tifffile.TiffFileError, ValueError, OSError) as exc:
        raise ValueError(f"cannot read {path} as TIFF: {exc}") from None


def _ome_physical_sizes(ome: str) -> dict:
    """PhysicalSize{X,Y,Z} (and units) of the first OME Pixels element."""
    import re

    pixels = re.search(r"<(?:\w+:)?Pixels\b[^>]*>", ome)
    if not pixels:
        return {}
    out = {}
    for key, value in re.findall(r'(PhysicalSize[XYZ](?:Unit)?)="([^"]+)"', pixels.group(0)):
        out[key] = value if key.endswith("Unit") else float(value)
    return out


def _write_kwargs(like: TiffImage | None) -> dict:
    """tifffile.imwrite options that carry pixel size, axes and OME/ImageJ metadata from ``like``."""
    kwargs: dict = {}
    if like is not None:
        if like.resolution is not None:
            kwargs["resolution"] = like.resolution
            if like.resolution_unit is not None:
                kwargs["resolutionunit"] = like.resolution_unit
        if like.ome:
            # OME-XML describes pixel type; rewrite it through tifffile's OME writer with the axes kept
            kwargs["ome"] = True
            meta = {"axes": like.axes} if like.axes else {}
            meta.update(_ome_physical_sizes(like.ome))
            kwargs["metadata"] = meta
        elif like.imagej:
            kwargs["imagej"] = True
            meta = {k: v for k, v in like.imagej.items() if k in ("spacing", "unit", "axes", "finterval")}
            if like.axes:
                meta["axes"] = like.axes.replace("S", "C")
            kwargs["metadata"] = meta
        elif like.axes:
            kwargs["metadata"] = {"axes": like.axes}
    return kwargs


_NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def _size(n: int) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def _free_bytes(folder: Path) -> int | None:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def _disk_full(path: Path, nbytes: int, free: int | None, code: int) -> DiskFullError:
    if code == errno.EDQUOT:
        msg = f"disk quota exceeded writing {path}: needs {_size(nbytes)}"
    elif code == errno.EFBIG:
        msg = f"{path} needs {_size(nbytes)}, more than one file may hold on that file system"
    else:
        msg = f"not enough disk space for {path}: needs {_size(nbytes)}"
        msg += f", {_size(free)} free" if free is not None else ""
    return DiskFullError(code, msg)


def _atomic(path: Path, write, nbytes: int) -> Path:
    """:func:`atomic_write` with a full disk (during the write, the fsync or the rename) reported as one line
    that names ``path``; ``atomic_write`` has already removed the temporary file when the error arrives."""
    if not path.parent.exists():
        raise FileNotFoundError(f"output folder {path.parent} does not exist")
    # measured before the temporary file takes any of it, so the message says what was free to begin with
    free = _free_bytes(path.parent)
    try:
        return atomic_write(path, write)
    except DiskFullError:
        raise
    except OSError as exc:
        if exc.errno in _NO_SPACE:
            raise _disk_full(path, nbytes, free, exc.errno) from None
        raise


def write_tiff(path: str | os.PathLike, data: np.ndarray, like: TiffImage | None = None) -> Path:
    """Write float32 ``data`` atomically, carrying pixel size, axes and OME/ImageJ metadata from ``like``.

    A full disk raises :class:`DiskFullError` and leaves any earlier file at ``path`` as it was.
    """
    import tifffile

    kwargs = _write_kwargs(like)
    data = np.asarray(data, dtype=np.float32)
    return _atomic(Path(path), lambda tmp: tifffile.imwrite(tmp, data, **kwargs), data.nbytes)


def reserve_file(tmp: str | os.PathLike) -> None:
    """Allocate every block of the file ``tmp`` on disk now, so that writing into its memory map cannot run out of
    space.

    A sparse file's holes get their blocks only when a mapped page is first written; on a full disk the kernel can
    only answer that page fault with SIGBUS, which kills the process with no message and no cleanup (the
    temporary file stays behind). ``posix_fallocate`` instead fails here, with ENOSPC, before any work is done.
    """
    size = os.path.getsize(tmp)
    fallocate = getattr(os, "posix_fallocate", None)  # absent on macOS and Windows
    if fallocate is not None:
        fd = os.open(tmp, os.O_RDWR)
        try:
            fallocate(fd, 0, size)
            return
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                raise
        finally:
            os.close(fd)
    # no way to reserve here: at least refuse what cannot fit now (a SIGBUS stays possible if the disk fills later)
    free = _free_bytes(Path(tmp).parent)
    if free is not None and free < size:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def write_tiff_streamed(path: str | os.PathLike, shape, fill, like: TiffImage | None = None) -> Path:
    """Write a float32 TIFF of ``shape`` without holding it in memory: ``fill(array)`` writes into a memory map
    of the new file (plane by plane, say); the file appears at ``path`` only when ``fill`` returns.

    The file's full size is reserved on disk before ``fill`` is called: a full disk raises
    :class:`DiskFullError` at once (no temporary file left), never a crash halfway through.
    """
    import tifffile

    kwargs = _write_kwargs(like)

    # Why a memory map with its space reserved, not tifffile writing planes from an iterator: ``fill`` (the tiled
    # predictor) writes tiles anywhere in the array, in its own order, so it needs a random-access target; the
    # map keeps a stack larger than RAM streamable (the kernel writes dirty pages back as it goes). Reserving the
    # blocks with fallocate costs milliseconds on ext4/XFS/Btrfs/tmpfs (no bytes written) and leaves the
    # writing speed as it was; only where the file system cannot reserve (NFSv3, some FUSE) does the C library
    # write a zero into each block, once.
    def write(tmp: str) -> None:
        mm = tifffile.memmap(tmp, shape=tuple(shape), dtype=np.float32, **kwargs)
        try:
            reserve_file(tmp)
            fill(mm)
            mm.flush()
        finally:
            del mm

    return _atomic(Path(path), write, int(np.prod(shape, dtype=np.int64)) * 4)


def pixel_size_um(img: TiffImage) -> float | None:
    """The pixel size in the specimen plane (µm, along x) that a TIFF's metadata states, or None.

    OME ``PhysicalSizeX`` (with its unit) first, then ImageJ's unit with the resolution tags, then the TIFF
    resolution in centimetres.
    """
    if img.ome:
        sizes = _ome_physical_sizes(img.ome)
        if "PhysicalSizeX" in sizes:
            factor = um_per_unit(sizes.get("PhysicalSizeXUnit", "µm"))
            if factor is not None:
                return float(sizes["PhysicalSizeX"]) * factor
    if img.resolution is None or not img.resolution[0] > 0:
        return None
    factor = um_per_unit((img.imagej or {}).get("unit"))
    if factor is not None:
        return factor / img.resolution[0]
    if img.resolution_unit == 3:  # centimetre
        return 1e4 / img.resolution[0]
    return None
