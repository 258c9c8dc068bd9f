"""A PSF model measured from beads: a K x K grid of PSFs, interpolated as the fast blur interpolates them.

The nodes sit at ``linspace(-1, 1, K)`` of the normalised field coordinates per axis (``[0]`` for K = 1), the
grid of :func:`~napari_coordgate.coords.grid_positions`. Between nodes the PSF is the bilinear (tent)
interpolation of the four surrounding node PSFs, with the weights that
:class:`~napari_coordgate.optics.blur.SpatiallyVaryingBlur` gives the image (the one function
:func:`~napari_coordgate.coords.tent_weights` per axis, clamped at the field edge), renormalised to unit sum. So a
model built from this grid blurs exactly as :meth:`MeasuredGridPSF.psfs_at` says each point is blurred.

Nodes that had too few beads nearby were filled from their neighbours (``filled``); the calibration report says
where. numpy only: no torch, no Qt (reading a ``.cgpsf`` file must not need them).
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np

from napari_coordgate.coords import grid_positions, tent_weights
from napari_coordgate.optics.psfmodel import GRID_BOUNDS, PSFModel, binned_psf_size, register_psf_model
from napari_coordgate.optics.shift import fourier_shift

__all__ = ["MeasuredGridPSF"]

_RECORD_VERSION = 1


@register_psf_model
class MeasuredGridPSF(PSFModel):
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

    def __init__(
        self,
        psfs: np.ndarray,
        *,
        filled: np.ndarray | None = None,
        pixel_size_um: float | None = None,
        name: str = "measured",
        provenance: Mapping[str, Any] | None = None,
        blur_grid: int | None = None,
    ):
        arr = np.array(psfs, dtype=np.float64)  # a copy: the model never shares memory with the caller
        if arr.ndim != 4 or arr.shape[0] != arr.shape[1] or arr.shape[2] != arr.shape[3] or arr.shape[0] < 1:
            raise ValueError(f"measured PSF grid must have shape (K, K, s, s), got {arr.shape}")
        if arr.shape[2] % 2 == 0 or arr.shape[2] < 3:
            raise ValueError(f"measured PSFs must have an odd side of at least 3 pixels, got {arr.shape[2]}")
        if not np.all(np.isfinite(arr)):
            raise ValueError("measured PSF grid contains NaN or Inf values")
        if arr.min() < -1e-12:
            raise ValueError(f"measured PSFs must be non-negative (light), smallest value is {arr.min():.3g}")
        sums = arr.sum(axis=(2, 3))
        if np.any(sums <= 0):
            raise ValueError("a measured PSF of the grid is all zero; every node needs a PSF")
        arr = np.clip(arr, 0.0, None)
        if np.any(np.abs(sums - 1.0) > 1e-9):  # already-normalised grids keep their exact bits (files round-trip)
            arr /= arr.sum(axis=(2, 3))[..., None, None]
        k = arr.shape[0]
        if filled is None:
            flags = np.zeros((k, k), dtype=bool)
        else:
            flags = np.asarray(filled)
            if flags.shape != (k, k):
                raise ValueError(f"filled must have shape ({k}, {k}) like the grid, got {flags.shape}")
            flags = flags.astype(bool)
        if pixel_size_um is not None:
            pixel_size_um = float(pixel_size_um)
            if not (math.isfinite(pixel_size_um) and pixel_size_um > 0):
                raise ValueError(f"pixel_size_um must be positive or None, got {pixel_size_um!r}")
        bg = k if blur_grid is None else int(blur_grid)
        lo, hi = GRID_BOUNDS
        if not lo <= bg <= hi:  # the fast blur holds bg² PSFs: a grid beyond PSFConfig's bound is a mistake
            raise ValueError(f"blur_grid must be from 1 to {hi}, got {blur_grid!r}")
        self._psfs = arr
        self._psfs.setflags(write=False)
        self._filled = flags
        self._filled.setflags(write=False)
        self._pixel_size = pixel_size_um
        self._name = str(name)
        self._provenance = dict(provenance or {})
        self._blur_grid = bg

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
        """(K, K, s, s) node PSFs (read-only view)."""
        return self._psfs

    @property
    def filled(self) -> np.ndarray:
        """(K, K) booleans: nodes filled from their neighbours (read-only view)."""
        return self._filled

    @property
    def provenance(self) -> dict[str, Any]:
        """Facts about the measurement (not part of :meth:`to_record`: files keep them beside the record)."""
        return dict(self._provenance)

    # ------------------------------------------------------------------------------------------- PSFs

    def psfs_at(self, y, x, field_shape: Sequence[int] | None = None) -> np.ndarray:
        # the blur's weights too are tent_weights of normalised coordinates, so the frame shape does not matter
        y, x = np.broadcast_arrays(np.asarray(y, dtype=np.float64), np.asarray(x, dtype=np.float64))
        shape = y.shape
        k, s = self.nodes, self.psf_size
        wy = tent_weights(y.ravel(), k)  # (N, K)
        wx = tent_weights(x.ravel(), k)
        out = np.einsum("ni,nj,ijab->nab", wy, wx, self._psfs, optimize=True)
        out /= out.sum(axis=(1, 2), keepdims=True)
        return out.reshape(*shape, s, s)

    def psf_grid(self, field_shape: Sequence[int] | None = None, k: int | None = None
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        k = self.grid if k is None else int(k)
        if k == self.nodes:
            nodes = grid_positions(k)
            return self._psfs.copy(), nodes, nodes.copy()
        return super().psf_grid(field_shape, k)

    def binned(self, binning: int) -> "MeasuredGridPSF":
        """The grid seen by a camera binned ``binning`` x ``binning``: each PSF sum-pooled, odd output side.

        The centre of the binned PSF's middle pixel stays on the point's position: for an even binning the
        PSFs are moved by half a pixel (band-limited interpolation) before pooling.
        """
        out_size = binned_psf_size(self.psf_size, binning)
        b = int(binning)
        if b == 1:
            return self
        s = self.psf_size
        fine = out_size * b
        k = self.nodes
        psfs = self._psfs.reshape(k * k, s, s)
        # the middle fine pixel (or, for even b, the corner between the two middle ones) of the pooled array
        # must hold the PSF's centre: place the PSF with an integer offset, then a half-pixel move if needed
        off = (fine - s) // 2
        canvas = np.zeros((k * k, fine + 2 * b, fine + 2 * b))
        canvas[:, b + off : b + off + s, b + off : b + off + s] = psfs
        if (fine - s) % 2:
            canvas = fourier_shift(canvas, 0.5, 0.5)
        canvas = np.clip(canvas[:, b : b + fine, b : b + fine], 0.0, None)
        pooled = canvas.reshape(k * k, out_size, b, out_size, b).sum(axis=(2, 4))
        pooled /= pooled.sum(axis=(1, 2), keepdims=True)
        prov = dict(self._provenance)
        prov["binning"] = b * int(prov.get("binning", 1))
        return MeasuredGridPSF(
            pooled.reshape(k, k, out_size, out_size),
            filled=self._filled,
            pixel_size_um=None if self._pixel_size is None else self._pixel_size * b,
            name=self._name,
            provenance=prov,
            blur_grid=self._blur_grid,
        )

    # ---------------------------------------------------------------------------------------- records

    def to_record(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        meta = {
            "kind": self.kind,
            "version": _RECORD_VERSION,
            "name": self._name,
            "nodes": self.nodes,
            "grid": self._blur_grid,
            "psf_size": self.psf_size,
            "pixel_size_um": self._pixel_size,
        }
        arrays = {"psfs": self._psfs.copy(), "filled": self._filled.astype(np.float64)}
        return meta, arrays

    @classmethod
    def from_record(cls, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> "MeasuredGridPSF":
        if not isinstance(meta, dict) or meta.get("kind") != cls.kind:
            kind = meta.get("kind") if isinstance(meta, dict) else None
            raise ValueError(f"not a {cls.kind} PSF record (kind {kind!r})")
        version = meta.get("version", 1)
        if not isinstance(version, int) or version > _RECORD_VERSION:
            raise ValueError(
                f"{cls.kind} PSF record version {version!r} is newer than this napari-coordgate reads "
                f"({_RECORD_VERSION}); upgrade napari-coordgate"
            )
        if "psfs" not in arrays:
            raise ValueError(f"{cls.kind} PSF record has no 'psfs' array")
        psfs = np.asarray(arrays["psfs"])
        if psfs.dtype.kind != "f":
            raise ValueError(f"{cls.kind} PSF record: 'psfs' must be a float array, got {psfs.dtype}")
        k = int(meta.get("nodes", psfs.shape[0] if psfs.ndim else 0))
        if psfs.ndim != 4 or psfs.shape[:2] != (k, k) or psfs.shape[2] != psfs.shape[3]:
            raise ValueError(f"{cls.kind} PSF record: 'psfs' has shape {psfs.shape}, expected ({k}, {k}, s, s)")
        if "psf_size" in meta and meta["psf_size"] != psfs.shape[-1]:
            raise ValueError(
                f"{cls.kind} PSF record: psf_size {meta['psf_size']!r} does not match the PSFs' side {psfs.shape[-1]}"
            )
        if psfs.ndim == 4 and np.all(np.isfinite(psfs)):
            sums = psfs.sum(axis=(2, 3))
            if np.any(np.abs(sums - 1.0) > 1e-3):
                raise ValueError(f"{cls.kind} PSF record: the PSFs do not sum to one (sums {sums.min():.4g} .. "
                                 f"{sums.max():.4g}); the file was edited or damaged")
        filled = arrays.get("filled")
        if filled is not None:
            filled = np.asarray(filled)
            if filled.shape != (k, k) or not np.all(np.isin(filled, (0, 1))):
                raise ValueError(f"{cls.kind} PSF record: 'filled' must be ({k}, {k}) zeros and ones")
        provenance = meta.get("provenance") or {}
        if not isinstance(provenance, dict):
            raise ValueError(f"{cls.kind} PSF record: provenance must be a dict, got {type(provenance).__name__}")
        return cls(psfs, filled=None if filled is None else filled != 0, pixel_size_um=meta.get("pixel_size_um"),
                   name=str(meta.get("name", "measured")), provenance=provenance, blur_grid=meta.get("grid"))

    def describe(self) -> str:
        n = int(self._filled.sum())
        filled = f", {n} node(s) filled from neighbours" if n else ""
        px = "" if self._pixel_size is None else f", {self._pixel_size:g} µm pixels"
        return (f"measured_grid PSF model {self._name!r} ({self.psf_size} px PSFs measured on a {self.nodes} x "
                f"{self.nodes} grid{filled}{px})")
