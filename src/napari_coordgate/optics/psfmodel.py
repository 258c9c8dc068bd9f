"""The PSF-model interface: what every consumer of a microscope's optics may ask of it.

Training (simulated pairs), simulation, the Wiener first stage, the classical baselines (RL, SV-RL, Wiener),
the dock and the model file all read the optics through this interface only, so a new kind of PSF model
(the pupil/Zernike :class:`~napari_coordgate.optics.psf.PSFConfig`, a PSF grid measured from beads, a pupil
model fitted to beads) flows through all of them without special cases.

A PSF model answers three questions:

- the PSF at any normalised field position (:meth:`PSFModel.psfs_at`; coordinates as in the network:
  pixel centre ``p`` of an axis of ``N`` pixels sits at ``(2 p - (N - 1)) / (N - 1)``);
- the PSFs on a K x K grid of the field (:meth:`PSFModel.psf_grid`), which the fast blur interpolates;
- how to store it (:meth:`PSFModel.to_record` / :func:`psf_model_from_record`): a JSON-able dict plus named
  float arrays, written into ``.cgpsf`` and ``.cgmodel`` files (safetensors + JSON, never pickle).

The kinds register themselves here (:func:`register_psf_model`); :mod:`napari_coordgate.optics.models` imports
them all and turns what a user names into a PSF model (files are read one layer up, in
:mod:`napari_coordgate.model_io`).

numpy only: no torch, no Qt.
"""

from __future__ import annotations

import abc
import copy
from typing import Any, ClassVar, Mapping, Sequence

import numpy as np

from napari_coordgate.coords import grid_positions

__all__ = ["PSFModel", "binned_psf_size", "register_psf_model", "registered_kinds", "check_field_shape",
           "check_record_sizes", "require_ndim", "GRID_BOUNDS", "PSF_SIZE_BOUNDS", "PSF_DEPTH_BOUNDS",
           "MAX_FIELD_SIDE"]

#: inclusive bounds of the K of a K x K PSF grid and of a PSF's side, for every kind (PSFConfig's fields use them)
GRID_BOUNDS = (1, 64)
PSF_SIZE_BOUNDS = (3, 255)
#: inclusive bounds of the planes of a 3-D PSF (odd); a 2-D model has one
PSF_DEPTH_BOUNDS = (1, 255)

#: largest side of a field (H or W) a record or a provenance may name: more than any camera, and a bound on the
#: images that are sized from it (training specimens for a measured model)
MAX_FIELD_SIDE = 65536

# kind name -> class; filled by register_psf_model at import of each implementation (a registry of types,
# not of state: it never changes after the implementations' modules are imported)
_KINDS: dict[str, type["PSFModel"]] = {}


class PSFModel(abc.ABC):
    """A field-dependent PSF: the PSF at every position of the field of view."""

    #: name of the kind in files (``"pupil"``, ``"measured_grid"``, ...)
    kind: ClassVar[str] = ""
    #: 2: PSFs (s, s) of one plane; 3: PSFs (psf_depth, s, s) through focus, planes ``z_step_um`` apart
    ndim: ClassVar[int] = 2

    @property
    @abc.abstractmethod
    def name(self) -> str:
        """A label for people (a preset name, ``"custom"``, or the bead file a model was measured from)."""

    @property
    @abc.abstractmethod
    def psf_size(self) -> int:
        """Side of every PSF in camera pixels (odd)."""

    @property
    @abc.abstractmethod
    def grid(self) -> int:
        """K of the K x K grid that the fast blur interpolates by default."""

    @property
    def pixel_size_um(self) -> float | None:
        """Camera pixel size in the specimen plane (µm) the model describes, or None when unknown."""
        return None

    @property
    def is_uniform(self) -> bool:
        """True when the PSF is the same everywhere in the field."""
        return False

    @property
    def z_step_um(self) -> float | None:
        """Distance between the planes of a 3-D PSF (µm); None for a 2-D model."""
        return None

    @property
    def psf_depth(self) -> int:
        """Planes of every PSF (odd): 1 for a 2-D model; a 3-D model's PSFs are (psf_depth, s, s)."""
        return 1

    @abc.abstractmethod
    def psfs_at(self, y, x, field_shape: Sequence[int] | None = None) -> np.ndarray:
        """PSFs at normalised field positions.

        Parameters
        ----------
        y, x
            Normalised field coordinates (arrays broadcastable to one shape ``S``), in [-1, 1].
        field_shape
            (H, W) of the frame, or None for a square frame.

        Returns
        -------
        ndarray, float64, shape ``S + (psf_size, psf_size)``, or ``S + (psf_depth, psf_size, psf_size)`` for a 3-D
        model (:attr:`ndim` 3)
            Each PSF sums to one (over the whole stored volume for a 3-D model) and is centred on its middle pixel
            (voxel: the middle plane is in focus where the local focus is at z = 0).
        """

    def psf_at(self, y: float, x: float, field_shape: Sequence[int] | None = None) -> np.ndarray:
        """The PSF at one normalised field position, shape (psf_size, psf_size) (3-D: (psf_depth, psf_size,
        psf_size))."""
        return self.psfs_at(np.atleast_1d(float(y)), np.atleast_1d(float(x)), field_shape)[0]

    def psf_grid(self, field_shape: Sequence[int] | None = None, k: int | None = None
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """PSFs on the K x K grid of nodes ``linspace(-1, 1, K)`` (``[0]`` for K = 1).

        Returns ``(psfs, ys, xs)`` with ``psfs[i, j]`` the PSF at row node ``ys[i]``, column node ``xs[j]``,
        shape (K, K, psf_size, psf_size) (3-D: (K, K, psf_depth, psf_size, psf_size)).
        """
        nodes = grid_positions(self.grid if k is None else int(k))
        yy, xx = np.meshgrid(nodes, nodes, indexing="ij")
        return self.psfs_at(yy, xx, field_shape), nodes, nodes.copy()

    @abc.abstractmethod
    def binned(self, binning: int) -> "PSFModel":
        """The same optics seen by a camera binned ``binning`` x ``binning``."""

    @abc.abstractmethod
    def to_record(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """(JSON-able metadata, named float arrays); the metadata holds ``"kind"``."""

    @classmethod
    @abc.abstractmethod
    def from_record(cls, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> "PSFModel":
        """Rebuild from :meth:`to_record`'s output; raises ``ValueError`` with a clear message if invalid."""

    def describe(self) -> str:
        """One line for people: kind, name and the essentials."""
        if self.ndim == 3:
            return (f"{self.kind} 3-D PSF model {self.name!r} ({self.psf_depth} planes {self.z_step_um:g} µm apart x "
                    f"{self.psf_size} px, {self.grid} x {self.grid} grid)")
        return f"{self.kind} PSF model {self.name!r} ({self.psf_size} px PSFs, {self.grid} x {self.grid} grid)"

    @property
    def provenance(self) -> dict[str, Any]:
        """Where the model came from (source images, bead count, fit residual, date...); ``{}`` when unknown.

        Not part of :meth:`to_record`: files store it beside the record (``.cgpsf``) or in the provenance of
        the models trained from it (``.cgmodel``), and loading them attaches it with :meth:`with_provenance`.
        """
        return dict(self.__dict__.get("_provenance") or {})

    def with_provenance(self, provenance: Mapping[str, Any] | None) -> "PSFModel":
        """A shallow copy of this model carrying ``provenance`` (the optics are unchanged; ``self`` too)."""
        twin = copy.copy(self)
        # object.__setattr__: implementations may be frozen dataclasses; the provenance is no field of theirs
        object.__setattr__(twin, "_provenance", dict(provenance or {}))
        return twin


def binned_psf_size(psf_size: int, binning) -> int:
    """The odd PSF side (at least 3) that covers ``psf_size`` pixels of a camera binned ``binning`` x ``binning``;
    the one check of a binning argument for every PSF model's :meth:`PSFModel.binned`."""
    if isinstance(binning, bool) or not isinstance(binning, (int, np.integer)) or binning < 1:
        raise ValueError(f"binning must be a positive integer, got {binning!r}")
    size = -(-int(psf_size) // int(binning))
    return max(3, size + 1 - size % 2)


def register_psf_model(cls: type[PSFModel]) -> type[PSFModel]:
    """Class decorator: make ``cls`` readable from files by its ``kind``."""
    if not cls.kind:
        raise TypeError(f"{cls.__name__} needs a non-empty 'kind'")
    _KINDS[cls.kind] = cls
    return cls


def registered_kinds() -> dict[str, type[PSFModel]]:
    """The kinds registered so far (:mod:`napari_coordgate.optics.models` imports every implementation)."""
    return dict(_KINDS)


def check_field_shape(shape: Any, what: str = "field_shape") -> tuple[int, int]:
    """``shape`` as (H, W) if it is two whole numbers from 1 to :data:`MAX_FIELD_SIDE`; ``ValueError`` otherwise.

    For field shapes read from records and provenance, which size what is allocated later.
    """
    ok = isinstance(shape, (list, tuple)) and len(shape) == 2 and all(
        isinstance(n, (int, np.integer)) and not isinstance(n, bool) and 1 <= n <= MAX_FIELD_SIDE for n in shape)
    if not ok:
        raise ValueError(f"{what} must be [height, width] in pixels, each from 1 to {MAX_FIELD_SIDE}, got {shape!r}")
    return int(shape[0]), int(shape[1])


def check_record_sizes(meta: dict[str, Any]) -> None:
    """The sizes a record declares, checked before its kind builds (or a consumer allocates) anything from them:
    a K x K grid of PSFs of side s costs K² s² numbers, so an edited ``"grid": 5000`` must not reach the blur."""
    sizes = {"grid": GRID_BOUNDS, "nodes": GRID_BOUNDS, "psf_size": PSF_SIZE_BOUNDS, "psf_depth": PSF_DEPTH_BOUNDS}
    odd_keys = ("psf_size", "psf_depth")
    for key, (lo, hi) in sizes.items():
        value = meta.get(key)
        if value is None:
            continue
        whole = isinstance(value, (int, np.integer)) or (isinstance(value, float) and value.is_integer())
        if isinstance(value, bool) or not whole or not lo <= value <= hi or (key in odd_keys and value % 2 == 0):
            odd = "an odd" if key in odd_keys else "an"
            raise ValueError(f"PSF record: {key!r} must be {odd} integer from {lo} to {hi}, got {value!r}")
    if meta.get("field_shape") is not None:
        check_field_shape(meta["field_shape"], "PSF record: 'field_shape'")


def require_ndim(model: PSFModel, ndim: int, use: str) -> PSFModel:
    """``model`` if its PSFs are ``ndim``-D; otherwise a ``ValueError`` that says what it is and what to use.

    The one check of the 2-D consumers (blur, baselines) against 3-D models and of the 3-D ones against 2-D models;
    ``use`` completes the message ("use SpatiallyVaryingBlur3D ...").
    """
    if model.ndim == ndim:
        return model
    if model.ndim == 3:
        step = "no z-step" if model.z_step_um is None else f"z-step {model.z_step_um:g} µm"
        raise ValueError(f"{model.describe()} is a 3-D PSF model ({step}); {use}")
    raise ValueError(f"{model.describe()} is a {model.ndim}-D PSF model; {use}")
