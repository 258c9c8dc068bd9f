"""A PSF model measured from beads: a K x K grid of PSFs, interpolated as the fast blur interpolates them.

The nodes sit at ``linspace(-1, 1, K)`` of the normalised field coordinates per axis (``[0]`` for K = 1), the
grid of :func:`~napari_coordgate.coords.grid_positions`. Between nodes the PSF is the bilinear (tent)
interpolation of the four surrounding node PSFs, with the weights that
:class:`~napari_coordgate.optics.blur.SpatiallyVaryingBlur` gives the image (the one function
:func:`~napari_coordgate.coords.tent_weights` per axis, clamped at the field edge), renormalised to unit sum. So a
model built from this grid blurs exactly as :meth:`MeasuredGridPSF.psfs_at` says each point is blurred.

Nodes that had too few beads nearby were filled from their neighbours (``filled``); the calibration report says
where. Where the PSF grows across the field, each node's PSF may end at its own ``supports`` side (odd, centred; zero
beyond): the grid holds every node on the largest side and records each node's own (record version 2; a grid whose
nodes all fill the square is written as version 1, as before, and version-1 files load unchanged). What a grid of
node PSFs is whatever their dimensions (properties, checks, binning with :func:`bin_xy`, records) lives in
:class:`NodeGridPSF`, which the 3-D :class:`~napari_coordgate.optics.psf3d.MeasuredGrid3DPSF` shares. numpy only:
no torch, no Qt (reading a ``.cgpsf`` file must not need them).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Mapping, Sequence

import numpy as np

from napari_coordgate.coords import grid_positions, tent_weights
from napari_coordgate.optics.psfmodel import GRID_BOUNDS, PSFModel, binned_psf_size, register_psf_model
from napari_coordgate.optics.shift import fourier_shift

__all__ = ["MeasuredGridPSF", "NodeGridPSF", "tent_interpolate", "bin_xy"]

_RECORD_VERSION = 2  # 2: the nodes' own supports ("supports"); written only where they differ from the side


def tent_interpolate(node_psfs: np.ndarray, y, x) -> np.ndarray:
    """The tent (bilinear) interpolation of a K x K grid of node PSFs at normalised field positions.

    Parameters
    ----------
    node_psfs
        (K, K, ...) PSFs at the nodes ``linspace(-1, 1, K)`` (any trailing shape: (s, s) or (D, s, s)).
    y, x
        Normalised field coordinates, broadcastable to one shape ``S``.

    Returns
    -------
    ndarray, float64, shape ``S + node_psfs.shape[2:]``
        With the weights of :func:`~napari_coordgate.coords.tent_weights` per axis (the blur's weights).
    """
    y, x = np.broadcast_arrays(np.asarray(y, dtype=np.float64), np.asarray(x, dtype=np.float64))
    k = node_psfs.shape[0]
    out = np.einsum("ni,nj,ij...->n...", tent_weights(y.ravel(), k), tent_weights(x.ravel(), k), node_psfs,
                    optimize=True)
    return out.reshape(*y.shape, *node_psfs.shape[2:])


def bin_xy(psfs: np.ndarray, binning: int) -> np.ndarray:
    """(N, s, s) PSFs sum-pooled ``binning`` x ``binning`` onto an odd side (:func:`binned_psf_size`).

    The centre of the binned middle pixel stays on the point's position: for an even binning the PSFs are moved by
    half a pixel (band-limited interpolation) before pooling. Not normalised (pooling keeps the sums up to the
    clipped ringing of that move).
    """
    out_size = binned_psf_size(psfs.shape[-1], binning)
    b, s, n = int(binning), psfs.shape[-1], psfs.shape[0]
    fine = out_size * b
    # the middle fine pixel (or, for even b, the corner between the two middle ones) of the pooled array must hold
    # the PSF's centre: place the PSF with an integer offset, then a half-pixel move if needed
    off = (fine - s) // 2
    canvas = np.zeros((n, fine + 2 * b, fine + 2 * b))
    canvas[:, b + off : b + off + s, b + off : b + off + s] = psfs
    if (fine - s) % 2:
        canvas = fourier_shift(canvas, 0.5, 0.5)
    canvas = np.clip(canvas[:, b : b + fine, b : b + fine], 0.0, None)
    return canvas.reshape(n, out_size, b, out_size, b).sum(axis=(2, 4))


def _positive_or_none(value, what: str) -> float | None:
    """``value`` as a float if it is a positive finite number, None if None; ``ValueError`` naming ``what``."""
    if value is None:
        return None
    ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
    if not (ok and math.isfinite(float(value)) and float(value) > 0):
        raise ValueError(f"{what} must be a positive number, got {value!r}")
    return float(value)


class NodeGridPSF(PSFModel):
    """What every grid of measured PSFs is: K x K node PSFs at ``linspace(-1, 1, K)``, the nodes filled from their
    neighbours, a pixel size, a name, provenance and the K of the fast blur's grid.

    :class:`MeasuredGridPSF` (node PSFs (s, s)) and
    :class:`~napari_coordgate.optics.psf3d.MeasuredGrid3DPSF` (node PSFs (D, s, s)) differ only in the trailing
    shape of their node PSFs (:attr:`psf_dims`), the arguments and record fields that come with it
    (``z_step_um``, ``psf_depth``) and how they interpolate and describe themselves. Not registered: no file holds
    this kind.
    """

    #: dimensions of one node PSF: 2 for (s, s), 3 for (D, s, s)
    psf_dims: ClassVar[int] = 2
    #: the label of the node PSFs in messages, and the shape their grid must have
    _label: ClassVar[str] = "measured"
    _grid_shape: ClassVar[str] = "(K, K, s, s)"
    #: record fields that must match an axis of the ``psfs`` array (written in this order after ``grid``)
    _record_axes: ClassVar[tuple[tuple[str, int], ...]] = (("psf_size", -1),)
    #: constructor arguments beyond this class's, each also a property and a record field (after the axes)
    _extra_args: ClassVar[tuple[str, ...]] = ()
    #: whether :meth:`binned` renormalises each pooled PSF itself (the 2-D grid always has, so its binned files
    #: keep their bits) or leaves it to the constructor (which renormalises sums off by more than 1e-9)
    _binned_renormalises: ClassVar[bool] = False

    def __init__(self, psfs: np.ndarray, *, filled: np.ndarray | None = None, pixel_size_um: float | None = None,
                 name: str = "measured", provenance: Mapping[str, Any] | None = None, blur_grid: int | None = None,
                 supports: np.ndarray | None = None):
        arr = self._checked_psfs(psfs)
        k = arr.shape[0]
        self._supports = self._checked_supports(supports, arr)
        flags = np.zeros((k, k), dtype=bool) if filled is None else np.asarray(filled)
        if flags.shape != (k, k):
            raise ValueError(f"filled must have shape ({k}, {k}) like the grid, got {flags.shape}")
        bg = k if blur_grid is None else blur_grid
        whole = isinstance(bg, (int, np.integer)) or (isinstance(bg, (float, np.floating)) and float(bg).is_integer())
        if isinstance(bg, bool) or not whole:
            raise ValueError(f"blur_grid must be an integer, got {blur_grid!r}")
        lo, hi = GRID_BOUNDS
        if not lo <= bg <= hi:  # the fast blur holds bg² PSFs: a grid beyond PSFConfig's bound is a mistake
            raise ValueError(f"blur_grid must be from {lo} to {hi}, got {blur_grid!r}")
        self._psfs = arr
        self._psfs.setflags(write=False)
        self._filled = flags.astype(bool)
        self._filled.setflags(write=False)
        self._pixel_size = _positive_or_none(pixel_size_um, "pixel_size_um")
        self._name = str(name)
        self._provenance = dict(provenance or {})
        self._blur_grid = int(bg)

    @classmethod
    def _checked_psfs(cls, psfs) -> np.ndarray:
        """(K, K, ..., s, s) non-negative node PSFs as a new float64 array, each normalised to unit sum."""
        arr = np.array(psfs, dtype=np.float64)  # a copy: the model never shares memory with the caller
        label, axes = cls._label, tuple(range(2, 2 + cls.psf_dims))
        if arr.ndim != 2 + cls.psf_dims or arr.shape[0] != arr.shape[1] or arr.shape[-2] != arr.shape[-1] \
                or arr.shape[0] < 1:
            raise ValueError(f"a {label} PSF grid must have shape {cls._grid_shape}, got {arr.shape}")
        if arr.shape[-1] % 2 == 0 or arr.shape[-1] < 3:
            raise ValueError(f"{label} PSFs must have an odd side of at least 3 pixels, got {arr.shape[-1]}")
        cls._check_depth(arr)
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"the {label} PSF grid contains NaN or Inf values")
        if arr.min() < -1e-12:
            raise ValueError(f"{label} PSFs must be non-negative (light), smallest value is {arr.min():.3g}")
        sums = arr.sum(axis=axes)
        if np.any(sums <= 0):
            raise ValueError(f"a {label} PSF of the grid is all zero; every node needs a PSF")
        arr = np.clip(arr, 0.0, None)
        if np.any(np.abs(sums - 1.0) > 1e-9):  # already-normalised grids keep their exact bits (files round-trip)
            arr /= arr.sum(axis=axes)[(...,) + (None,) * cls.psf_dims]
        return arr

    @classmethod
    def _checked_supports(cls, supports, arr: np.ndarray) -> np.ndarray:
        """(K, K) odd node sides (default the whole square), checked against the PSFs: no light beyond them."""
        k, s = arr.shape[0], arr.shape[-1]
        if supports is None:
            out = np.full((k, k), s, dtype=int)
        else:
            sup = np.asarray(supports)
            whole = sup.dtype.kind in "iu" or (sup.dtype.kind == "f" and np.all(np.isfinite(sup))
                                                 and np.all(sup == np.round(sup)))
            if sup.shape != (k, k) or not whole:
                raise ValueError(f"supports must be ({k}, {k}) whole numbers like the grid, got shape {sup.shape}")
            out = sup.astype(int)
            if np.any(out % 2 == 0) or out.min() < 3 or out.max() > s:
                raise ValueError(f"supports must be odd sides from 3 to the PSFs' {s} px, got {out.min()} .. "
                                 f"{out.max()}")
            c = np.abs(np.arange(s) - s // 2)
            cheb = np.maximum(c[:, None], c[None, :])
            beyond = cheb[None, None] > (out // 2)[:, :, None, None]
            light = np.where(beyond[(slice(None), slice(None)) + (None,) * (arr.ndim - 4)], arr, 0.0)
            if np.any(light.sum(axis=tuple(range(2, arr.ndim))) > 1e-9):
                raise ValueError("a node's PSF has light beyond its recorded support")
        out.setflags(write=False)
        return out

    @classmethod
    def _check_depth(cls, arr: np.ndarray) -> None:
        """Refuse node PSFs whose planes cannot be (3-D grids); a 2-D grid has none."""

    def _described_extras(self) -> str:
        """The end of :meth:`describe`: ", n node(s) filled from neighbours, p µm pixels" as far as they apply."""
        n = int(self._filled.sum())
        filled = f", {n} node(s) filled from neighbours" if n else ""
        px = "" if self._pixel_size is None else f", {self._pixel_size:g} µm pixels"
        lo = int(self._supports.min())
        own = f", node supports {lo} to {self.psf_size} px" if lo < self.psf_size else ""
        return own + filled + px

    # --------------------------------------------------------------------------------------- properties

    @property
    def name(self) -> str:
        return self._name

    @property
    def psf_size(self) -> int:
        return int(self._psfs.shape[-1])

    @property
    def grid(self) -> int:
        return self._blur_grid

    @property
    def nodes(self) -> int:
        """K of the measured grid."""
        return int(self._psfs.shape[0])

    @property
    def pixel_size_um(self) -> float | None:
        return self._pixel_size

    @property
    def is_uniform(self) -> bool:
        return bool(np.all(self._psfs == self._psfs[:1, :1]))

    @property
    def node_psfs(self) -> np.ndarray:
        """(K, K, s, s) node PSFs ((K, K, D, s, s) for a 3-D grid; read-only view)."""
        return self._psfs

    @property
    def supports(self) -> np.ndarray:
        """(K, K) odd side of each node's PSF, centred in the ``psf_size`` square (zero beyond; read-only)."""
        return self._supports

    @property
    def filled(self) -> np.ndarray:
        """(K, K) booleans: nodes filled from their neighbours (read-only view)."""
        return self._filled

    @property
    def provenance(self) -> dict[str, Any]:
        """Facts about the measurement (not part of :meth:`to_record`: files keep them beside the record)."""
        return dict(self._provenance)

    # ------------------------------------------------------------------------------------------- PSFs

    def psf_grid(self, field_shape: Sequence[int] | None = None, k: int | None = None
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        k = self.grid if k is None else int(k)
        if k == self.nodes:
            nodes = grid_positions(k)
            return self._psfs.copy(), nodes, nodes.copy()
        return super().psf_grid(field_shape, k)

    def binned(self, binning: int) -> "NodeGridPSF":
        """The grid seen by a camera binned ``binning`` x ``binning`` in x and y: each PSF (every plane of a 3-D
        one) sum-pooled onto an odd side (:func:`bin_xy`), then normalised again; z keeps its planes and step.

        The centre of the binned PSF's middle pixel stays on the point's position: for an even binning the
        PSFs are moved by half a pixel (band-limited interpolation) before pooling.
        """
        binned_psf_size(self.psf_size, binning)  # checks the argument
        b = int(binning)
        if b == 1:
            return self
        s = self.psf_size
        pooled = bin_xy(self._psfs.reshape(-1, s, s), b)
        if self._binned_renormalises:
            pooled /= pooled.sum(axis=(1, 2), keepdims=True)
        prov = dict(self._provenance)
        prov["binning"] = b * int(prov.get("binning", 1))
        out = pooled.reshape(*self._psfs.shape[:-2], *pooled.shape[-2:])
        supports = None
        if np.any(self._supports != s):  # each node's side binned as the whole one is, and nothing beyond it
            supports = np.vectorize(lambda u: binned_psf_size(int(u), b))(self._supports)
            c = np.abs(np.arange(out.shape[-1]) - out.shape[-1] // 2)
            inside = np.maximum(c[:, None], c[None, :])[None, None] <= (supports // 2)[:, :, None, None]
            out = out * inside[(slice(None), slice(None)) + (None,) * (out.ndim - 4)]
            if not self._binned_renormalises:
                out = out / out.sum(axis=tuple(range(2, out.ndim)), keepdims=True)
        return type(self)(out, filled=self._filled,
                          pixel_size_um=None if self._pixel_size is None else self._pixel_size * b, name=self._name,
                          provenance=prov, blur_grid=self._blur_grid, supports=supports,
                          **{key: getattr(self, key) for key in self._extra_args})

    # ---------------------------------------------------------------------------------------- records

    def to_record(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        own = bool(np.any(self._supports != self.psf_size))  # only then version 2: older releases read the rest
        meta = {"kind": self.kind, "version": 2 if own else 1, "name": self._name, "nodes": self.nodes,
                "grid": self._blur_grid, **{key: getattr(self, key) for key, _ in self._record_axes},
                **{key: getattr(self, key) for key in self._extra_args}, "pixel_size_um": self._pixel_size}
        arrays = {"psfs": self._psfs.copy(), "filled": self._filled.astype(np.float64)}
        if own:
            arrays["supports"] = self._supports.astype(np.float64)
        return meta, arrays

    @classmethod
    def from_record(cls, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> "NodeGridPSF":
        psfs, filled = cls._checked_record(meta, arrays)
        extra = {key: meta.get(key) for key in cls._extra_args}
        try:
            return cls(psfs, filled=filled, pixel_size_um=meta.get("pixel_size_um"),
                       name=str(meta.get("name", "measured")), provenance=meta.get("provenance") or {},
                       blur_grid=meta.get("grid"), supports=arrays.get("supports"), **extra)
        except ValueError as exc:
            raise ValueError(f"{cls.kind} PSF record: {exc}") from None

    @classmethod
    def _checked_record(cls, meta: dict[str, Any], arrays: dict[str, np.ndarray]):
        """(psfs, filled or None) of a record of this kind, its declared sizes checked against its arrays."""
        kind = cls.kind
        if not isinstance(meta, dict) or meta.get("kind") != kind:
            raise ValueError(f"not a {kind} PSF record (kind {meta.get('kind') if isinstance(meta, dict) else None!r})")
        version = meta.get("version", 1)
        if not isinstance(version, int) or version > _RECORD_VERSION:
            raise ValueError(f"{kind} PSF record version {version!r} is newer than this napari-coordgate reads "
                             f"({_RECORD_VERSION}); upgrade napari-coordgate")
        if "psfs" not in arrays:
            raise ValueError(f"{kind} PSF record has no 'psfs' array")
        psfs = np.asarray(arrays["psfs"])
        if psfs.dtype.kind != "f":
            raise ValueError(f"{kind} PSF record: 'psfs' must be a float array, got {psfs.dtype}")
        k = meta.get("nodes", psfs.shape[0] if psfs.ndim else 0)
        if psfs.ndim != 2 + cls.psf_dims or psfs.shape[:2] != (k, k) or psfs.shape[-2] != psfs.shape[-1]:
            expected = cls._grid_shape.replace("K", str(k))
            raise ValueError(f"{kind} PSF record: 'psfs' has shape {psfs.shape}, expected {expected}")
        for key, axis in cls._record_axes:
            if key in meta and meta[key] != psfs.shape[axis]:
                raise ValueError(f"{kind} PSF record: {key} {meta[key]!r} does not match the PSFs' {psfs.shape[axis]}")
        if np.all(np.isfinite(psfs)):
            sums = psfs.sum(axis=tuple(range(2, psfs.ndim)))
            if np.any(np.abs(sums - 1.0) > 1e-3):
                raise ValueError(f"{kind} PSF record: the PSFs do not sum to one (sums {sums.min():.4g} .. "
                                 f"{sums.max():.4g}); the file was edited or damaged")
        filled = arrays.get("filled")
        if filled is not None:
            filled = np.asarray(filled)
            if filled.shape != (k, k) or not np.all(np.isin(filled, (0, 1))):
                raise ValueError(f"{kind} PSF record: 'filled' must be ({k}, {k}) zeros and ones")
            filled = filled != 0
        provenance = meta.get("provenance") or {}
        if not isinstance(provenance, dict):
            raise ValueError(f"{kind} PSF record: provenance must be a dict, got {type(provenance).__name__}")
        return psfs, filled


@register_psf_model
class MeasuredGridPSF(NodeGridPSF):
    """PSFs measured on a K x K grid of the field, interpolated bilinearly between nodes.

    Parameters
    ----------
    psfs
        (K, K, s, s) PSFs, ``psfs[i, j]`` at row node ``i`` and column node ``j`` of ``linspace(-1, 1, K)``;
        ``s`` odd. Each is normalised to unit sum (negative values are refused: a measured PSF is light).
    filled
        (K, K) booleans: True where a node had too few beads and was filled from its neighbours.
        Default: none filled.
    pixel_size_um
        Camera pixel size in the specimen plane (µm) the beads were imaged at, or None when unknown.
    name
        A label for people (e.g. the bead file's name).
    provenance
        JSON-able facts about the measurement (source images, bead count, fit residual, date, ...).
    blur_grid
        K of the grid the fast blur uses by default; default the measured grid's K (its nodes exactly).
    """

    kind = "measured_grid"
    _binned_renormalises = True

    def psfs_at(self, y, x, field_shape: Sequence[int] | None = None) -> np.ndarray:
        # the blur's weights too are tent_weights of normalised coordinates, so the frame shape does not matter;
        # spelled out rather than tent_interpolate's "ij...": numpy contracts the two differently, and 2-D PSFs
        # have always been these bits
        y, x = np.broadcast_arrays(np.asarray(y, dtype=np.float64), np.asarray(x, dtype=np.float64))
        shape = y.shape
        k, s = self.nodes, self.psf_size
        wy = tent_weights(y.ravel(), k)  # (N, K)
        wx = tent_weights(x.ravel(), k)
        out = np.einsum("ni,nj,ijab->nab", wy, wx, self._psfs, optimize=True)
        out /= out.sum(axis=(1, 2), keepdims=True)
        return out.reshape(*shape, s, s)

    def describe(self) -> str:
        return (f"measured_grid PSF model {self._name!r} ({self.psf_size} px PSFs measured on a {self.nodes} x "
                f"{self.nodes} grid{self._described_extras()})")
