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

numpy only: no torch, no Qt.
"""

from __future__ import annotations

import abc
from typing import Any, ClassVar, Sequence

import numpy as np

__all__ = ["PSFModel", "register_psf_model", "psf_model_from_record", "psf_model_kinds"]

# kind name -> class; filled by register_psf_model at import of each implementation (a registry of types,
# not of state: it never changes after the implementations' modules are imported)
_KINDS: dict[str, type["PSFModel"]] = {}


class PSFModel(abc.ABC):
    """A field-dependent PSF: the PSF at every position of the field of view."""

    #: name of the kind in files (``"pupil"``, ``"measured_grid"``, ...)
    kind: ClassVar[str] = ""

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
        ndarray, float64, shape ``S + (psf_size, psf_size)``
            Each PSF sums to one and is centred on its middle pixel.
        """

    def psf_at(self, y: float, x: float, field_shape: Sequence[int] | None = None) -> np.ndarray:
        """The PSF at one normalised field position, shape (psf_size, psf_size)."""
        return self.psfs_at(np.atleast_1d(float(y)), np.atleast_1d(float(x)), field_shape)[0]

    def psf_grid(self, field_shape: Sequence[int] | None = None, k: int | None = None
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """PSFs on the K x K grid of nodes ``linspace(-1, 1, K)`` (``[0]`` for K = 1).

        Returns ``(psfs, ys, xs)`` with ``psfs[i, j]`` the PSF at row node ``ys[i]``, column node ``xs[j]``,
        shape (K, K, psf_size, psf_size).
        """
        from .psf import grid_positions

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
        return f"{self.kind} PSF model {self.name!r} ({self.psf_size} px PSFs, {self.grid} x {self.grid} grid)"


def register_psf_model(cls: type[PSFModel]) -> type[PSFModel]:
    """Class decorator: make ``cls`` readable from files by its ``kind``."""
    if not cls.kind:
        raise TypeError(f"{cls.__name__} needs a non-empty 'kind'")
    _KINDS[cls.kind] = cls
    return cls


def psf_model_kinds() -> tuple[str, ...]:
    _load_implementations()
    return tuple(_KINDS)


def psf_model_from_record(meta: dict[str, Any], arrays: dict[str, np.ndarray] | None = None) -> PSFModel:
    """The PSF model stored as ``(meta, arrays)`` (see :meth:`PSFModel.to_record`).

    A record without ``"kind"`` is a plain :class:`~napari_coordgate.optics.psf.PSFConfig` dict (what model
    files of schema version 1 store).
    """
    _load_implementations()
    kind = meta.get("kind", "pupil") if isinstance(meta, dict) else None
    if kind not in _KINDS:
        raise ValueError(f"unknown PSF model kind {kind!r}; this napari-coordgate reads: {', '.join(_KINDS)} "
                         "(a file from a newer version? upgrade napari-coordgate)")
    return _KINDS[kind].from_record(meta, arrays or {})


def _load_implementations() -> None:
    from . import psf  # noqa: F401 - registers "pupil"
