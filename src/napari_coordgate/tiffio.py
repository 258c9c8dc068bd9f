"""TIFF in, TIFF out, keeping what a microscopist needs: pixel size, axes, OME/ImageJ metadata."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .modelio import atomic_write

__all__ = ["TiffImage", "read_tiff", "write_tiff", "write_tiff_streamed"]


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


def _atomic(path: Path, write) -> Path:
    if not path.parent.exists():
        raise FileNotFoundError(f"output folder {path.parent} does not exist")
    return atomic_write(path, write)


def write_tiff(path: str | os.PathLike, data: np.ndarray, like: TiffImage | None = None) -> Path:
    """Write float32 ``data`` atomically, carrying pixel size, axes and OME/ImageJ metadata from ``like``."""
    import tifffile

    kwargs = _write_kwargs(like)
    return _atomic(Path(path), lambda tmp: tifffile.imwrite(tmp, np.asarray(data, dtype=np.float32), **kwargs))


def write_tiff_streamed(path: str | os.PathLike, shape, fill, like: TiffImage | None = None) -> Path:
    """Write a float32 TIFF of ``shape`` without holding it in memory: ``fill(array)`` writes into a memory map
    of the new file (plane by plane, say); the file appears at ``path`` only when ``fill`` returns."""
    import tifffile

    kwargs = _write_kwargs(like)

    def write(tmp: str) -> None:
        mm = tifffile.memmap(tmp, shape=tuple(shape), dtype=np.float32, **kwargs)
        try:
            fill(mm)
            mm.flush()
        finally:
            del mm

    return _atomic(Path(path), write)


_UM_PER = {"um": 1.0, "\u00b5m": 1.0, "\u03bcm": 1.0, "micron": 1.0, "microns": 1.0, "\\u00B5m": 1.0, "nm": 1e-3,
           "mm": 1e3}


def pixel_size_um(img: TiffImage) -> float | None:
    """The pixel size in the specimen plane (µm, along x) that a TIFF's metadata states, or None.

    OME ``PhysicalSizeX`` (with its unit) first, then ImageJ's unit with the resolution tags, then the TIFF
    resolution in centimetres.
    """
    if img.ome:
        sizes = _ome_physical_sizes(img.ome)
        if "PhysicalSizeX" in sizes:
            factor = _UM_PER.get(str(sizes.get("PhysicalSizeXUnit", "µm")))
            if factor is not None:
                return float(sizes["PhysicalSizeX"]) * factor
    if img.resolution is None or not img.resolution[0] > 0:
        return None
    unit = str((img.imagej or {}).get("unit", ""))
    if unit in _UM_PER:
        return _UM_PER[unit] / img.resolution[0]
    if img.resolution_unit == 3:  # centimetre
        return 1e4 / img.resolution[0]
    return None
