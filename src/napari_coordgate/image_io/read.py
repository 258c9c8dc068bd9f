"""The one reader of input paths: what the command line, the dock's jobs and dask workers open.

TIFF files (memory-mapped where the file allows), OME-Zarr images and plain zarr arrays, always as (..., H, W)
with y and x last. A missing path, a folder that is no zarr store, an empty image or a layout that is no image is
one line naming the file. No torch, no Qt.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..checks import InputError, check_layout
from .omezarr import axes_from_tiff, is_zarr, read_zarr
from .tiff import TiffImage, pixel_size_um, read_tiff
from .units import um_per_unit

__all__ = ["OpenedImage", "open_image", "image_shape", "read_plane", "read_planes", "read_volumes",
           "read_bead_images"]


@dataclass
class OpenedImage:
    """An input opened lazily, with what its output keeps.

    ``data`` is (..., H, W): a memory map, a chunk-cached zarr array or an array read whole (compressed TIFF);
    ``axes``/``scale``/``translation`` are its NGFF coordinate system, ``tiff`` the TIFF metadata to carry over
    (None for zarr) and ``pixel_size_um`` the x pixel size its metadata states (None if it states none).
    """

    path: str
    data: Any
    axes: list[dict]
    scale: list[float]
    translation: list[float] | None
    tiff: TiffImage | None
    pixel_size_um: float | None

    @property
    def z_step_um(self) -> float | None:
        """The distance between z planes (µm) that the metadata states (a ``z`` axis with a length unit), or None."""
        for axis, step in zip(self.axes, self.scale):
            if axis.get("name") == "z":
                factor = um_per_unit(axis.get("unit")) if axis.get("unit") else None
                return None if factor is None or not step > 0 else float(step) * factor
        return None


def _existing(path: str | os.PathLike) -> Path:
    p = Path(path)
    if is_zarr(p):
        return p
    if p.is_dir():
        raise InputError(f"{p} is a folder, not an image (a TIFF file, or a zarr store holding zarr metadata)")
    if not p.exists():
        raise FileNotFoundError(f"input file {p} does not exist")
    return p


def _check_not_empty(shape: Sequence[int], path) -> None:
    if len(shape) < 2 or min(shape) < 1:
        raise InputError(f"{path} holds an empty image (shape {tuple(shape)}): nothing to read")


def open_image(path: str | os.PathLike) -> OpenedImage:
    """Open a TIFF, an OME-Zarr image or a plain zarr array lazily (nothing is decoded but the metadata)."""
    p = _existing(path)
    if is_zarr(p):
        z = read_zarr(p)  # read through a chunk cache: overlapping tiles decode each chunk once
        _check_not_empty(z.data.shape, p)
        return OpenedImage(str(p), z.data, list(z.axes), list(z.scale), z.translation, None, z.pixel_size_um())
    img = read_tiff(p, lazy=True)  # memory-mapped where the TIFF allows
    _check_not_empty(np.shape(img.data), p)
    axes, scale = axes_from_tiff(img)
    return OpenedImage(str(p), img.data, axes, scale, None, img, pixel_size_um(img))


def image_shape(path: str | os.PathLike) -> tuple[int, ...]:
    """The (..., H, W) shape of an input from its metadata alone (no pixels read)."""
    p = _existing(path)
    if is_zarr(p):
        shape = tuple(int(s) for s in read_zarr(p).data.shape)
    else:
        import tifffile

        try:
            with tifffile.TiffFile(p) as tf:
                shape = tuple(int(s) for s in tf.series[0].shape)
        except (tifffile.TiffFileError, ValueError, OSError) as exc:
            raise InputError(f"cannot read {p} as TIFF: {exc}") from None
    _check_not_empty(shape, p)
    return shape


def read_plane(path: str | os.PathLike, shape: Sequence[int], index: Sequence[int]) -> np.ndarray:
    """One (H, W) plane of the input at ``path`` of (..., H, W) ``shape``: a zarr plane through the chunk cache, or
    one TIFF page where the file stores a page per plane (the whole series otherwise)."""
    index = tuple(int(i) for i in index)
    p = _existing(path)
    if is_zarr(p):
        return np.asarray(read_zarr(p).data[index])
    import tifffile

    with tifffile.TiffFile(p) as tf:
        series = tf.series[0]
        lead = tuple(shape[:-2])
        if len(series.pages) == int(np.prod(lead, dtype=np.int64)):  # one page per plane
            return series.asarray(key=int(np.ravel_multi_index(index, lead)) if lead else 0)
        return np.asarray(series.asarray()[index])


def read_planes(paths: Sequence[str | os.PathLike], what: str) -> np.ndarray:
    """Every (H, W) plane of several inputs of one field as one (N, H, W) array (a file may be 2-D or a stack).

    ``what`` names the images in messages ("sharp", "blurred", "bead").
    """
    if not paths:
        raise InputError(f"no {what} files given")
    planes = []
    for p in paths:
        data = np.asarray(open_image(p).data)
        if not is_zarr(p):  # a TIFF of more than 3 axes (RGB, a time-lapse of stacks) is refused, as before
            check_layout(data.shape, data.dtype, str(p), max_ndim=3)
        planes.append(data.reshape((-1,) + data.shape[-2:]))
    shapes = {a.shape[-2:] for a in planes}
    if len(shapes) > 1:
        raise InputError(f"{what} files have different frame shapes {sorted(shapes)}; they must share one field")
    return np.concatenate(planes, axis=0)


def read_volumes(paths: Sequence[str | os.PathLike], what: str) -> tuple[np.ndarray, float | None, float | None]:
    """The z-stacks of several inputs of one field as one (N, D, H, W) array (a file holds a (D, H, W) volume or a
    (T, D, H, W) series of them), with the z-step and pixel size (µm) their metadata states (None where none does).

    ``what`` names the volumes in messages ("sharp", "blurred").
    """
    if not paths:
        raise InputError(f"no {what} files given")
    vols, steps, pixels = [], set(), set()
    for p in paths:
        image = open_image(p)
        data = np.asarray(image.data)
        if data.ndim not in (3, 4):
            raise InputError(f"{p}: a 3-D model trains on z-stacks (D, H, W) or series of them (T, D, H, W), got "
                             f"shape {data.shape}")
        check_layout(data.shape, data.dtype, str(p), min_ndim=3, max_ndim=4)
        vols.append(data.reshape((-1,) + data.shape[-3:]))
        steps.add(image.z_step_um)
        pixels.add(image.pixel_size_um)
    shapes = {a.shape[-3:] for a in vols}
    if len(shapes) > 1:
        raise InputError(f"{what} files have different volume shapes {sorted(shapes)}; they must share one field and "
                         "depth")
    step = next(iter(steps)) if len(steps) == 1 else None
    pixel = next(iter(pixels)) if len(pixels) == 1 else None
    return np.concatenate(vols, axis=0), step, pixel


def read_bead_images(paths: Sequence[str | os.PathLike]) -> tuple[dict[int, np.ndarray], float | None]:
    """Bead images of one field as (N, H, W) per channel (a ``C`` axis gives one stack per channel), and the
    pixel size (µm) their metadata states. A z-stack among them is refused (one z-stack alone is calibrated in 3-D,
    :func:`~napari_coordgate.calibration.zstack.calibrate_zstack`, without this function)."""
    per_channel: dict[int, list] = {}
    sizes = []
    for p in paths:
        img = read_tiff(_existing(p))
        axes, data = (img.axes or "").upper(), np.asarray(img.data)
        _check_not_empty(data.shape, p)
        if "Z" in axes and data.shape[axes.index("Z")] > 1:
            raise InputError(f"{p} is a z-stack (axes {axes}): give it alone (a bead z-stack is calibrated in 3-D), "
                             "or 2-D images of the focal plane (several 2-D images of the same field are pooled)")
        channels = [data] if "C" not in axes else list(np.moveaxis(data, axes.index("C"), 0))
        for c, plane in enumerate(channels):
            per_channel.setdefault(c, []).append(plane.reshape(-1, *plane.shape[-2:]))
        sizes.append(pixel_size_um(img))
    shapes = {a.shape[-2:] for v in per_channel.values() for a in v}
    if len(shapes) > 1:
        raise InputError(f"bead images have different frame shapes {sorted(shapes)}; give images of one field")
    known = [s for s in sizes if s is not None]
    return {c: np.concatenate(v) for c, v in per_channel.items()}, (known[0] if known else None)
