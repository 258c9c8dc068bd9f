"""OME-Zarr and plain zarr in and out: lazy, chunk-cached reads and an OME-Zarr writer that never leaves a store
that looks complete when a run fails. No Qt, no torch.

Reading (:func:`read_zarr`) takes an OME-Zarr image (NGFF 0.4 on zarr format 2, NGFF 0.5 on zarr format 3: the
``multiscales`` metadata, its axes with types and units and the scale of level 0) or a plain zarr array (axis names
from zarr v3 ``dimension_names`` or xarray's ``_ARRAY_DIMENSIONS`` when present) and returns level 0 as a
:class:`ChunkCachedArray`: a lazy array whose reads decode each storage chunk once and keep it in a bounded LRU
cache, so the overlapping halo windows of a tiled prediction do not decode a chunk again for every tile.

Writing (:func:`create_ome_zarr`) makes an OME-Zarr image of NGFF 0.4 (zarr format 2, ``/`` chunk keys, one
resolution level ``0``; axes, scale and units given or carried over from the input), chunked one plane
``(1, ..., 1, H, W)`` or in tiles. The store is built as ``OUT.zarr.partial`` and renamed to ``OUT.zarr`` only after
every plane has been written and the store holds a chunk for every plane; each plane is written in one go once all
its pixels are known (zarr's local store replaces each chunk file atomically). A failed or cancelled run leaves the
``.partial`` store (replaced by the next run), never a store that looks complete.

Needs ``zarr>=3`` (and ``ome-zarr`` to write): ``pip install 'napari-coordgate[zarr]'``.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import socket
import threading
import uuid
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .._version import __version__
from ..data import InputError
from .units import ngff_unit, um_per_unit

__all__ = [
    "NGFF_WRITE_VERSION",
    "ZARR_SUFFIX",
    "ChunkCachedArray",
    "ZarrImage",
    "OmeZarrWriter",
    "PlaneSink",
    "IncompleteOutputError",
    "OutputBusyError",
    "written_by_us",
    "check_replaceable",
    "is_zarr",
    "read_zarr",
    "create_ome_zarr",
    "default_axes",
    "axes_from_tiff",
]

NGFF_WRITE_VERSION = "0.4"
ZARR_SUFFIX = ".zarr"
PARTIAL_SUFFIX = ".partial"
LOCK_SUFFIX = ".lock"
_WRITER_KEY = "napari_coordgate"  # group attribute that marks a store this package wrote (it may replace it)
DEFAULT_CACHE_BYTES = 512 * 2**20
INSTALL_HINT = "pip install 'napari-coordgate[zarr]'"

_KNOWN_AXES = {"t": "time", "c": "channel", "z": "space", "y": "space", "x": "space"}
# NGFF orders axes time, then channel (or one custom-typed axis), then space
_TYPE_RANK = {"time": 0, "channel": 1, "space": 2}
_TIFF_AXES = {"T": "t", "C": "c", "Z": "z", "Y": "y", "X": "x"}


class IncompleteOutputError(RuntimeError):
    """An OME-Zarr output cannot be completed: some planes were never written."""


def _zarr():
    try:
        import zarr
    except ImportError:
        raise ImportError(f"reading or writing zarr stores needs the zarr package: {INSTALL_HINT}") from None
    if int(zarr.__version__.split(".")[0]) < 3:
        raise ImportError(f"napari-coordgate needs zarr >= 3 (found {zarr.__version__}): {INSTALL_HINT}")
    return zarr


def is_zarr(path: str | os.PathLike) -> bool:
    """True for a path that names a zarr store: a ``.zarr`` suffix, or a folder holding zarr metadata."""
    p = Path(path)
    if p.name.lower().endswith(ZARR_SUFFIX):
        return True
    return p.is_dir() and any((p / m).is_file() for m in (".zarray", ".zgroup", "zarr.json"))


def _looks_like_store(p: Path) -> bool:
    return p.is_dir() and (not any(p.iterdir()) or any((p / m).is_file() for m in (".zarray", ".zgroup", "zarr.json")))


def written_by_us(path: str | os.PathLike) -> bool:
    """True for an empty folder or a zarr store whose group attributes say napari-coordgate wrote it."""
    p = Path(path)
    if p.is_dir() and not any(p.iterdir()):
        return True
    for name, key in ((".zattrs", None), ("zarr.json", "attributes")):
        try:
            attrs = json.loads((p / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        attrs = attrs.get(key) if key and isinstance(attrs, dict) else attrs
        if isinstance(attrs, dict) and isinstance(attrs.get(_WRITER_KEY), dict):
            return True
    return False


def check_replaceable(path: str | os.PathLike, *, overwrite: bool = False) -> None:
    """Refuse an output store path that holds something napari-coordgate may not replace: a file or a folder that
    is no zarr store, or (unless ``overwrite``) a store another program wrote; :class:`FileExistsError`."""
    final = Path(path)
    if not final.exists():
        return
    if not _looks_like_store(final):
        raise FileExistsError(f"{final} exists and is not a zarr store; refusing to replace it")
    if not overwrite and not written_by_us(final):
        raise FileExistsError(f"{final} is a zarr store that napari-coordgate did not write; refusing to replace it "
                              "(choose another output, or replace it on purpose: apply --overwrite)")


class OutputBusyError(OSError):
    """Another process is writing the same OME-Zarr output."""


class _WriterLock:
    """An exclusive lock on ``OUT.zarr.lock`` for one writer process (released by the kernel if it dies).

    The file says who holds it, so a second writer names the first instead of failing halfway with an unrelated
    error. POSIX only (``fcntl``); elsewhere no lock is taken.
    """

    def __init__(self, path: Path) -> None:
        self.path, self._fd = path, None
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows
            return
        while self._fd is None:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = os.read(fd, 512).decode("utf-8", "replace").strip() or "another process"
                os.close(fd)
                raise OutputBusyError(f"{path.name[: -len(LOCK_SUFFIX)]} is being written by another run "
                                      f"({holder}); wait for it to finish or choose another output") from None
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(path))
            except FileNotFoundError:
                same = False
            if not same:  # the holder released and unlinked it between our open and lock: take the new file
                os.close(fd)
                continue
            try:
                os.ftruncate(fd, 0)
                os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode())
            except BaseException:
                os.close(fd)  # closing releases the lock
                raise
            self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            try:
                os.unlink(self.path)
            except OSError:
                pass
            os.close(self._fd)
            self._fd = None

    def __del__(self) -> None:
        self.release()


# -- selections ----------------------------------------------------------------------------------
def _basic_selection(key, shape: Sequence[int]) -> list[tuple[int, int, bool]] | None:
    """``key`` as one (start, stop, is_integer) per axis, or None when it is not integers and step-1 slices."""
    key = key if isinstance(key, tuple) else (key,)
    if any(k is Ellipsis for k in key):
        i = next(i for i, k in enumerate(key) if k is Ellipsis)
        key = key[:i] + (slice(None),) * (len(shape) - len(key) + 1) + key[i + 1 :]
    if len(key) > len(shape):
        raise IndexError(f"too many indices ({len(key)}) for an array of {len(shape)} dimensions")
    key = key + (slice(None),) * (len(shape) - len(key))
    out = []
    for k, n in zip(key, shape):
        if isinstance(k, (int, np.integer)) and not isinstance(k, bool):
            i = int(k) + (n if k < 0 else 0)
            if not 0 <= i < n:
                raise IndexError(f"index {int(k)} is out of bounds for an axis of size {n}")
            out.append((i, i + 1, True))
        elif isinstance(k, slice) and k.step in (None, 1):
            start, stop, _ = k.indices(n)
            out.append((start, max(start, stop), False))
        else:
            return None
    return out


# -- reading -------------------------------------------------------------------------------------
class ChunkCachedArray:
    """A zarr array read through a cache of decoded chunks: each storage chunk is decoded at most once while it
    stays in the cache (an LRU of ``max_bytes``), however many overlapping windows read it.

    Indexing with integers and step-1 slices goes through the cache and returns numpy arrays; any other index
    goes to zarr directly. ``decoded`` counts the chunks decoded through the cache.
    """

    def __init__(self, array, max_bytes: int = DEFAULT_CACHE_BYTES):
        self._array = array
        self.shape = tuple(int(s) for s in array.shape)
        self.dtype = np.dtype(array.dtype)
        self.ndim = len(self.shape)
        self.chunks = tuple(int(c) for c in array.chunks)
        self.max_bytes = int(max_bytes)
        self.decoded = 0
        self._cache: OrderedDict[tuple[int, ...], np.ndarray] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"ChunkCachedArray(shape={self.shape}, dtype={self.dtype}, chunks={self.chunks})"

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    def _chunk(self, index: tuple[int, ...]) -> np.ndarray:
        # under the lock for the whole decode, so two threads never decode the same chunk twice
        with self._lock:
            hit = self._cache.get(index)
            if hit is not None:
                self._cache.move_to_end(index)
                return hit
            region = tuple(slice(k * c, min((k + 1) * c, n)) for k, c, n in zip(index, self.chunks, self.shape))
            data = np.asarray(self._array[region])
            self.decoded += 1
            self._cache[index] = data
            self._bytes += data.nbytes
            while self._bytes > self.max_bytes and len(self._cache) > 1:
                _, old = self._cache.popitem(last=False)
                self._bytes -= old.nbytes
            return data

    def __getitem__(self, key) -> np.ndarray:
        sel = _basic_selection(key, self.shape)
        if sel is None:
            return np.asarray(self._array[key])
        out = np.empty(tuple(e - s for s, e, _ in sel), self.dtype)
        if out.size:
            ranges = [range(s // c, (e - 1) // c + 1) for (s, e, _), c in zip(sel, self.chunks)]
            for index in itertools.product(*ranges):
                chunk = self._chunk(index)
                src, dst = [], []
                for (s, e, _), c, k in zip(sel, self.chunks, index):
                    lo, hi = max(s, k * c), min(e, (k + 1) * c)
                    src.append(slice(lo - k * c, hi - k * c))
                    dst.append(slice(lo - s, hi - s))
                out[tuple(dst)] = chunk[tuple(src)]
        return out[tuple(0 if is_int else slice(None) for _, _, is_int in sel)]

    def __array__(self, dtype=None, copy=None):
        a = self[...]
        return a if dtype is None else a.astype(dtype, copy=False)

    def clear_cache(self) -> None:
        with self._lock:
            self._cache.clear()
            self._bytes = 0


@dataclass(frozen=True)
class ZarrImage:
    """Level 0 of an OME-Zarr image or a plain zarr array, read lazily, with its axes.

    ``axes`` are NGFF axis dicts (``name``, ``type`` and ``unit`` where known) in the array's order; ``scale``
    (and ``translation``, or None) the coordinate transformation of level 0; ``version`` the NGFF version, or
    None for a plain zarr array.
    """

    data: ChunkCachedArray
    axes: tuple[dict, ...]
    scale: tuple[float, ...]
    translation: tuple[float, ...] | None
    version: str | None
    path: Path

    @property
    def axis_names(self) -> tuple[str, ...]:
        return tuple(a["name"] for a in self.axes)

    @property
    def units(self) -> dict[str, str]:
        return {a["name"]: a["unit"] for a in self.axes if a.get("unit")}

    def pixel_size_um(self) -> float | None:
        """The x pixel size in µm that the metadata states (scale of the x axis in a length unit), or None."""
        names = self.axis_names
        if "x" not in names or self.version is None:  # a plain zarr's scale of 1 is no statement
            return None
        factor = um_per_unit(self.units.get("x"))
        return None if factor is None else float(self.scale[names.index("x")]) * factor


def default_axes(ndim: int) -> list[dict]:
    """NGFF axes for an array without axis names: the last ``ndim`` of (t, c, z, y, x)."""
    if ndim < 2:
        raise InputError(f"expected an image with y and x axes, got {ndim} dimension(s)")
    names = list("tczyx"[-ndim:]) if ndim <= 5 else [f"dim_{i}" for i in range(ndim - 2)] + ["y", "x"]
    return _axis_dicts(names)


def _axis_dicts(axes) -> list[dict]:
    out = []
    for a in axes:
        if isinstance(a, str):
            d = {"name": a}
            if a.lower() in _KNOWN_AXES:
                d["type"] = _KNOWN_AXES[a.lower()]
        elif isinstance(a, dict) and "name" in a:
            d = {k: v for k, v in a.items() if k in ("name", "type", "unit") and v is not None}
            d["name"] = str(d["name"])
        else:
            raise InputError(f"invalid axis description {a!r}: expected a name or a dict with a 'name'")
        out.append(d)
    return out


def _check_yx(axes: Sequence[dict], shape: Sequence[int], where: str, named: bool = True) -> None:
    """The last two axes must be y and x (a clear error naming the axes found otherwise)."""
    names = [a["name"] for a in axes]
    found = ", ".join(names) if names else "none"
    if len(axes) != len(shape):
        raise InputError(f"{where}: {len(axes)} axes ({found}) for an array of {len(shape)} dimensions {tuple(shape)}")
    if not named and len(shape) == 3 and shape[-1] in (3, 4) and min(shape[:2]) > 4:
        raise InputError(f"{where}: a zarr array of shape {tuple(shape)} without axis names looks like channels last "
                         "(y, x, c: RGB(A)); expected (..., y, x) with channels on a leading axis")
    if len(names) >= 2 and [n.lower() for n in names[-2:]] == ["y", "x"]:
        return
    hint = ""
    if names and (names[-1].lower() == "c" or axes[-1].get("type") == "channel"):
        hint = "; channels last (RGB) is not supported: store channels as a leading c axis"
    raise InputError(f"{where} has axes ({found}); expected y and x as the last two axes, e.g. (t, c, z, y, x){hint}")


def _transformations(items, ndim: int, where: str) -> tuple[np.ndarray, np.ndarray | None]:
    scale, translation = np.ones(ndim), None
    for t in items or []:
        if not isinstance(t, dict):
            continue
        if t.get("type") == "scale" and "scale" in t:
            scale = scale * np.asarray(t["scale"], float)
        elif t.get("type") == "translation" and "translation" in t:
            translation = np.asarray(t["translation"], float)
        if scale.shape != (ndim,) or (translation is not None and translation.shape != (ndim,)):
            raise InputError(f"{where}: a coordinate transformation does not have {ndim} values: {t}")
    return scale, translation


def read_zarr(path: str | os.PathLike, *, cache_bytes: int = DEFAULT_CACHE_BYTES) -> ZarrImage:
    """Open an OME-Zarr image (NGFF 0.4 or 0.5; level 0) or a plain zarr array as a lazy, chunk-cached array.

    Raises
    ------
    FileNotFoundError
        Nothing at ``path``.
    InputError
        Not a zarr store, a group without OME-Zarr ``multiscales`` metadata, or axes without y and x last (the
        message names the axes found).
    """
    zarr = _zarr()
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"input {p} does not exist")
    try:
        node = zarr.open(str(p), mode="r")
    except Exception as exc:  # zarr raises several types for a folder that is not a store
        raise InputError(f"cannot read {p} as a zarr store: {exc}") from None
    if isinstance(node, zarr.Group):
        attrs = node.attrs.asdict()
        ome = attrs.get("ome", attrs)
        multiscales = ome.get("multiscales") if isinstance(ome, dict) else None
        if not multiscales:
            arrays = sorted(name for name, _ in node.arrays())
            hint = f"; give one of its arrays ({', '.join(f'{p}/{a}' for a in arrays[:4])})" if arrays else ""
            raise InputError(f"{p} is a zarr group without OME-Zarr multiscales metadata{hint}")
        ms = multiscales[0]
        version = str(ome.get("version") or ms.get("version") or "")
        datasets = ms.get("datasets") or []
        if not datasets or "path" not in datasets[0]:
            raise InputError(f"{p}: OME-Zarr multiscales metadata lists no datasets")
        array = node[datasets[0]["path"]]
        ndim = len(array.shape)
        axes = _axis_dicts(ms["axes"]) if ms.get("axes") else default_axes(ndim)
        _check_yx(axes, array.shape, f"OME-Zarr {p}")
        scale, translation = _transformations(datasets[0].get("coordinateTransformations"), ndim, str(p))
        g_scale, g_translation = _transformations(ms.get("coordinateTransformations"), ndim, str(p))
        scale = scale * g_scale
        if g_translation is not None:
            translation = g_translation + (translation if translation is not None else 0) * g_scale
        return ZarrImage(ChunkCachedArray(array, cache_bytes), tuple(axes), tuple(float(s) for s in scale),
                         None if translation is None else tuple(float(t) for t in translation), version or None, p)
    names = getattr(node.metadata, "dimension_names", None) or node.attrs.get("_ARRAY_DIMENSIONS")
    named = bool(names) and all(n is not None for n in names)
    axes = _axis_dicts(names) if named else default_axes(len(node.shape))
    _check_yx(axes, node.shape, f"zarr array {p}", named=named)
    return ZarrImage(ChunkCachedArray(node, cache_bytes), tuple(axes), (1.0,) * len(node.shape), None, None, p)


def axes_from_tiff(img) -> tuple[list[dict], list[float]]:
    """NGFF axes (with units) and scale for a :class:`~napari_coordgate.image_io.tiff.TiffImage`.

    Axis letters from tifffile (T, C, Z, Y, X; any other letter becomes a custom axis of that name); pixel size
    from ImageJ metadata (resolution, ``unit``, ``spacing``, ``finterval``), OME PhysicalSize{X,Y,Z}, or the TIFF
    resolution in inch/centimetre; 1 without a unit when none is recorded.
    """
    from .tiff import _ome_physical_sizes

    shape = tuple(img.data.shape)
    letters = img.axes if img.axes and len(img.axes) == len(shape) else None
    axes = (_axis_dicts([_TIFF_AXES.get(c, c.lower()) for c in letters]) if letters else default_axes(len(shape)))
    size: dict[str, tuple[float, str | None]] = {}  # axis name -> (pixel size, NGFF unit)
    ij = img.imagej or {}
    if img.ome:
        phys = _ome_physical_sizes(img.ome)
        for ax in "xyz":
            key = f"PhysicalSize{ax.upper()}"
            if key in phys:
                size[ax] = (float(phys[key]), ngff_unit(phys.get(key + "Unit", "µm")))
    elif img.resolution is not None and all(r > 0 for r in img.resolution):
        if ij.get("unit"):
            unit = ngff_unit(ij["unit"])
        else:
            unit = {2: "inch", 3: "centimeter"}.get(img.resolution_unit or 1)
        if unit is not None or ij:
            size["x"], size["y"] = (1.0 / img.resolution[0], unit), (1.0 / img.resolution[1], unit)
            if ij.get("spacing"):
                size["z"] = (float(ij["spacing"]), unit)
    if ij.get("finterval"):
        size["t"] = (float(ij["finterval"]), "second")
    scale = []
    for a in axes:
        s, unit = size.get(a["name"], (1.0, None))
        scale.append(float(s))
        if unit:
            a["unit"] = unit
    return axes, scale


# -- writing -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PlaneSink:
    """Where a process writes whole planes of an unfinished OME-Zarr output (picklable: a path and an axis order).

    Plane indices are in the order of the writer's input axes; the store may order the leading axes differently
    (NGFF wants time, channel, space).
    """

    store: str
    order: tuple[int, ...]

    def write(self, index: tuple[int, ...], plane: np.ndarray) -> None:
        """Write one whole plane (every chunk of it: chunk files are replaced atomically)."""
        zarr = _zarr()
        array = zarr.open_array(self.store, mode="r+").with_config({"write_empty_chunks": True})
        array[_store_index(index, self.order)] = np.asarray(plane, dtype=np.float32)


def _store_index(index: tuple[int, ...], order: Sequence[int]) -> tuple:
    lead = tuple(index[i] for i in order[:-2])
    return lead + (slice(None), slice(None))


class OmeZarrWriter:
    """A float32 OME-Zarr image (NGFF 0.4) being written; array-like in the input's axis order.

    Use as the ``out=`` of :func:`napari_coordgate.engine.predict` (tiles of a plane are gathered in memory and
    the plane is written once complete), or write whole planes with :meth:`write_plane`, or let other processes
    write planes through :meth:`sink` and record them with :meth:`mark_written`. When every plane is written the
    store is renamed from ``OUT.zarr.partial`` to ``OUT.zarr`` (:meth:`finalize`, also called automatically after
    the last plane written through this object). Create it with :func:`create_ome_zarr`.
    """

    def __init__(self, path: Path, partial: Path, shape: tuple[int, ...], order: tuple[int, ...], array,
                 lock: _WriterLock | None = None):
        self.path, self._partial = path, partial
        self._writer_lock = lock
        self.shape, self.dtype, self.ndim = shape, np.dtype(np.float32), len(shape)
        self._order = order
        self._array = array
        self._nplanes = int(np.prod(shape[:-2], dtype=np.int64))
        self._buffers: dict[tuple[int, ...], list] = {}  # plane -> [pixels, covered mask, covered count]
        self._done: set[tuple[int, ...]] = set()
        self._final = False
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        state = "complete" if self._final else f"{len(self._done)} of {self._nplanes} planes"
        return f"OmeZarrWriter({self.path}, shape={self.shape}, {state})"

    @property
    def complete(self) -> bool:
        """True once the store is at its final path."""
        return self._final

    @property
    def store_path(self) -> Path:
        """Where the store is now: ``OUT.zarr.partial`` until complete, then ``OUT.zarr``."""
        return self.path if self._final else self._partial

    def sink(self) -> PlaneSink:
        return PlaneSink(str(self._partial / "0"), self._order)

    def missing(self) -> list[tuple[int, ...]]:
        """Planes (input-order indices) not written yet."""
        return [i for i in np.ndindex(*self.shape[:-2]) if i not in self._done]

    def mark_written(self, index: Sequence[int]) -> None:
        """Record a plane written by another process through :meth:`sink`."""
        with self._lock:
            self._done.add(tuple(int(i) for i in index))

    def write_plane(self, index: Sequence[int], plane) -> None:
        """Write one whole plane now (then finalize if it was the last)."""
        index = tuple(int(i) for i in index)
        plane = np.asarray(plane, dtype=np.float32)
        if plane.shape != self.shape[-2:]:
            raise ValueError(f"a plane of {self.path} is {self.shape[-2:]}, got {plane.shape}")
        self._array[_store_index(index, self._order)] = plane
        with self._lock:
            self._buffers.pop(index, None)
            self._done.add(index)
            last = len(self._done) == self._nplanes
        if last:
            self.finalize()

    def __setitem__(self, key, value) -> None:
        sel = _basic_selection(key, self.shape)
        if sel is None:
            raise TypeError(f"{type(self).__name__} takes integer and step-1 slice indices, got {key!r}")
        (y0, y1, _), (x0, x1, _) = sel[-2:]
        lead = [range(s, e) for s, e, _ in sel[:-2]]
        # value has the shape of the selection without its integer axes (numpy's rule); give it all of them
        squeezed = tuple(e - s for s, e, is_int in sel if not is_int)
        full = np.broadcast_to(np.asarray(value, dtype=np.float32), squeezed).reshape(
            tuple(e - s for s, e, _ in sel))
        for pos, index in zip(np.ndindex(*(len(r) for r in lead)), itertools.product(*lead)):
            tile = full[pos]
            if (y0, y1, x0, x1) == (0, self.shape[-2], 0, self.shape[-1]):
                self.write_plane(index, tile)
                continue
            with self._lock:
                buf = self._buffers.get(index)
                if buf is None:
                    h, w = self.shape[-2:]
                    buf = self._buffers[index] = [np.full((h, w), np.nan, np.float32), np.zeros((h, w), bool), 0]
                buf[0][y0:y1, x0:x1] = tile
                buf[2] += int(np.count_nonzero(~buf[1][y0:y1, x0:x1]))
                buf[1][y0:y1, x0:x1] = True
                ready = buf[2] == buf[1].size
            if ready:
                self.write_plane(index, buf[0])

    def __getitem__(self, key) -> np.ndarray:
        sel = _basic_selection(key, self.shape)
        if sel is None:
            raise TypeError(f"{type(self).__name__} takes integer and step-1 slice indices, got {key!r}")
        skey = tuple(slice(s, e) if not i else s for s, e, i in (sel[j] for j in self._order))
        data = np.asarray(self._array[skey])
        kept = [j for j in self._order if not sel[j][2]]  # input axes in the order they come back
        return np.transpose(data, np.argsort(kept)) if kept != sorted(kept) else data

    def __array__(self, dtype=None, copy=None):
        a = self[...]
        return a if dtype is None else a.astype(dtype, copy=False)

    def finalize(self) -> Path:
        """Check that every plane is in the store and move it to its final path (idempotent); returns the path.

        Raises
        ------
        IncompleteOutputError
            A plane was never written (the store stays at ``OUT.zarr.partial``).
        """
        with self._lock:
            if self._final:
                return self.path
            missing = self._nplanes - len(self._done)
            if missing:
                first = next(iter(self.missing()), None)
                raise IncompleteOutputError(f"{missing} of {self._nplanes} planes of {self.path} were not written "
                                            f"(first: {first}); the partial store stays at {self._partial}")
            stored = int(self._array.nchunks_initialized)
            if stored != int(self._array.nchunks):
                raise IncompleteOutputError(f"{self._partial} holds {stored} of {self._array.nchunks} chunks; "
                                            "a plane is missing from the store")
            _replace_dir(self._partial, self.path)
            self._array = _zarr().open_array(str(self.path / "0"), mode="r")
            self._final = True
            self.release()
            return self.path

    def __enter__(self) -> OmeZarrWriter:
        return self

    def __exit__(self, *exc) -> bool:
        """Leaving a ``with`` block gives the lock up, finished or not (an unfinished store stays ``.partial``)."""
        self.release()
        return False

    def release(self) -> None:
        """Give up the output's lock (done by :meth:`finalize`; call it when abandoning an unfinished store)."""
        if self._writer_lock is not None:
            self._writer_lock.release()
            self._writer_lock = None


def _replace_dir(src: Path, dst: Path) -> None:
    """Move the folder ``src`` to ``dst``, replacing an existing ``dst`` in two renames (never a mix of both)."""
    if not dst.exists():
        src.rename(dst)
        return
    if not _looks_like_store(dst):
        raise FileExistsError(f"{dst} exists and is not a zarr store; refusing to replace it")
    old = dst.with_name(f".{dst.name}.old-{uuid.uuid4().hex[:8]}")
    dst.rename(old)
    try:
        src.rename(dst)
    except BaseException:
        old.rename(dst)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _ngff_layout(ax: list[dict], shape: tuple[int, ...], scale: list[float], translation) -> tuple:
    """(store axis order, NGFF axes, coordinate transformations) of an output in the input's axis order."""
    order = tuple(sorted(range(len(shape) - 2), key=lambda i: _TYPE_RANK.get(ax[i].get("type"), 1))) + (
        len(shape) - 2, len(shape) - 1)
    out_axes = []
    for i in order:
        a = dict(ax[i])
        unit = ngff_unit(a.pop("unit", None))
        out_axes.append({**a, "unit": unit} if unit else a)
    transforms = [{"type": "scale", "scale": [scale[i] for i in order]}]
    if translation is not None:
        transforms.append({"type": "translation", "translation": [float(translation[i]) for i in order]})
    return order, out_axes, transforms


def create_ome_zarr(path: str | os.PathLike, shape: Sequence[int], *, axes: Sequence | None = None,
                    scale: Sequence[float] | None = None, translation: Sequence[float] | None = None,
                    tile: int | None = None, name: str | None = None, overwrite: bool = False) -> OmeZarrWriter:
    """Start a float32 OME-Zarr image (NGFF 0.4, one resolution level) of ``shape`` at ``path``.

    Parameters
    ----------
    path
        The final store (``.zarr``); it is built at ``path.partial`` until every plane is written.
    shape
        (..., H, W) in the input's axis order.
    axes
        NGFF axes (names, or dicts with ``name``, ``type``, ``unit``) in the input's order, y and x last; by
        default the last ``len(shape)`` of (t, c, z, y, x). Leading axes are stored in NGFF order (time, channel,
        space: an ImageJ ZCYX stack is stored CZYX); the writer is indexed in the input's order.
    scale, translation
        Level 0's coordinate transformation in the input's order (default scale 1, no translation).
    tile
        Chunk side for y and x; by default one chunk per plane (1, ..., 1, H, W).
    name
        The image's name in the metadata (default: the store's name).
    overwrite
        Replace an existing store at ``path`` that napari-coordgate did not write (one it wrote, or an empty
        folder, is always replaced once the new one is complete).

    Raises
    ------
    InputError
        Axes that are not NGFF 0.4 axes (more than 5, no y/x last, two custom axes...).
    FileExistsError
        ``path`` exists and is not a zarr store, or is a store another program wrote (without ``overwrite``).
    OutputBusyError
        Another process is writing ``path`` now.
    """
    zarr = _zarr()
    try:
        from ome_zarr.format import FormatV04
        from ome_zarr.writer import write_multiscales_metadata
    except ImportError:
        raise ImportError(f"writing OME-Zarr needs the ome-zarr package: {INSTALL_HINT}") from None
    shape = tuple(int(s) for s in shape)
    final = Path(path)
    check_replaceable(final, overwrite=overwrite)
    ax = _axis_dicts(axes) if axes is not None else default_axes(len(shape))
    _check_yx(ax, shape, f"output {final}")
    names = ", ".join(a["name"] for a in ax)
    if not 2 <= len(shape) <= 5:
        raise InputError(f"OME-Zarr NGFF {NGFF_WRITE_VERSION} holds 2 to 5 axes; the result has {len(shape)} "
                         f"({names}): write a TIFF instead")
    scale = [1.0] * len(shape) if scale is None else [float(s) for s in scale]
    if len(scale) != len(shape) or (translation is not None and len(translation) != len(shape)):
        raise ValueError(f"scale and translation need {len(shape)} values (one per axis)")
    order, out_axes, transforms = _ngff_layout(ax, shape, scale, translation)
    h, w = shape[-2:]
    chunks = (1,) * (len(shape) - 2) + ((h, w) if tile is None else (min(int(tile), h), min(int(tile), w)))

    partial = final.with_name(final.name + PARTIAL_SUFFIX)
    lock = _WriterLock(final.with_name(final.name + LOCK_SUFFIX))  # before touching a partial store another run owns
    try:  # whatever fails from here (a full disk, permissions, a file named like the store) gives the lock up
        if partial.exists():  # left by a failed run
            shutil.rmtree(partial)
        group = zarr.open_group(str(partial), mode="w", zarr_format=2)
        try:
            write_multiscales_metadata(group, [{"path": "0", "coordinateTransformations": transforms}],
                                       fmt=FormatV04(), axes=out_axes, name=name or final.name.split(".")[0])
        except ValueError as exc:
            shutil.rmtree(partial, ignore_errors=True)
            raise InputError(f"cannot write axes ({names}) as OME-Zarr NGFF {NGFF_WRITE_VERSION}: {exc}") from None
        group.attrs[_WRITER_KEY] = {"written_by": f"napari-coordgate {__version__}"}
        array = group.create_array(
            "0", shape=tuple(shape[i] for i in order), chunks=tuple(chunks[i] for i in order), dtype="float32",
            fill_value=float("nan"), chunk_key_encoding={"name": "v2", "separator": "/"},
            config={"write_empty_chunks": True},
        )
    except BaseException:
        lock.release()
        raise
    return OmeZarrWriter(final, partial, shape, order, array, lock)
