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

:func:`get_psf_model` is the one place where what a user names (a model, a preset, a JSON config, a dict, a
``.cgpsf`` file) becomes a PSF model; every consumer calls it.

numpy only: no torch, no Qt.
"""

from __future__ import annotations

import abc
import copy
import json
import os
from pathlib import Path
from typing import Any, ClassVar, Mapping, Sequence

import numpy as np

from napari_coordgate.config import ConfigError

__all__ = ["PSFModel", "binned_psf_size", "register_psf_model", "psf_model_from_record", "psf_model_kinds",
           "get_psf_model", "check_field_shape", "record_size_limits", "MAX_FIELD_SIDE"]

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


def psf_model_kinds() -> tuple[str, ...]:
    _load_implementations()
    return tuple(_KINDS)


def check_field_shape(shape: Any, what: str = "field_shape") -> tuple[int, int]:
    """``shape`` as (H, W) if it is two whole numbers from 1 to :data:`MAX_FIELD_SIDE`; ``ValueError`` otherwise.

    For field shapes read from records and provenance, which size what is allocated later.
    """
    ok = isinstance(shape, (list, tuple)) and len(shape) == 2 and all(
        isinstance(n, (int, np.integer)) and not isinstance(n, bool) and 1 <= n <= MAX_FIELD_SIDE for n in shape)
    if not ok:
        raise ValueError(f"{what} must be [height, width] in pixels, each from 1 to {MAX_FIELD_SIDE}, got {shape!r}")
    return int(shape[0]), int(shape[1])


def record_size_limits() -> dict[str, tuple[int, int]]:
    """Inclusive bounds of a record's ``grid`` and ``psf_size``: those of ``PSFConfig``, for every kind."""
    from dataclasses import fields

    from .psf import PSFConfig

    spec = {f.name: f.metadata for f in fields(PSFConfig)}
    return {name: (spec[name]["lo"], spec[name]["hi"]) for name in ("grid", "psf_size")}


def _check_record_sizes(meta: dict[str, Any]) -> None:
    """The sizes a record declares, checked before its kind builds (or a consumer allocates) anything from them:
    a K x K grid of PSFs of side s costs K² s² numbers, so an edited ``"grid": 5000`` must not reach the blur."""
    limits = record_size_limits()
    sizes = {"grid": limits["grid"], "nodes": limits["grid"], "psf_size": limits["psf_size"]}
    for key, (lo, hi) in sizes.items():
        value = meta.get(key)
        if value is None:
            continue
        whole = isinstance(value, (int, np.integer)) or (isinstance(value, float) and value.is_integer())
        if isinstance(value, bool) or not whole or not lo <= value <= hi or (key == "psf_size" and value % 2 == 0):
            odd = "an odd" if key == "psf_size" else "an"
            raise ValueError(f"PSF record: {key!r} must be {odd} integer from {lo} to {hi}, got {value!r}")
    if meta.get("field_shape") is not None:
        check_field_shape(meta["field_shape"], "PSF record: 'field_shape'")


def psf_model_from_record(meta: dict[str, Any], arrays: dict[str, np.ndarray] | None = None) -> PSFModel:
    """The PSF model stored as ``(meta, arrays)`` (see :meth:`PSFModel.to_record`).

    A record without ``"kind"`` is a plain :class:`~napari_coordgate.optics.psf.PSFConfig` dict (what model
    files of schema version 1 store). The sizes it declares (``grid``, ``nodes``, ``psf_size``, ``field_shape``)
    are checked against the bounds of :class:`~napari_coordgate.optics.psf.PSFConfig` first, for every kind.
    """
    _load_implementations()
    if isinstance(meta, dict):
        _check_record_sizes(meta)
    kind = meta.get("kind", "pupil") if isinstance(meta, dict) else None
    if kind == "psf":  # PSFConfig.to_dict() names its config kind "psf": schema-1 model files and JSON configs
        kind, meta = "pupil", {**meta, "kind": "pupil"}
    if kind not in _KINDS:
        raise ValueError(f"unknown PSF model kind {kind!r}; this napari-coordgate reads: {', '.join(_KINDS)} "
                         "(a file from a newer version? upgrade napari-coordgate)")
    return _KINDS[kind].from_record(meta, arrays or {})


def get_psf_model(spec: "PSFModel | str | os.PathLike | Mapping[str, Any]") -> PSFModel:
    """The PSF model that ``spec`` names: the one resolver every consumer of the optics goes through.

    Parameters
    ----------
    spec
        - a :class:`PSFModel` (returned unchanged);
        - a preset name (:data:`~napari_coordgate.optics.psf.PRESETS`);
        - the path of a ``.json`` file: a :class:`~napari_coordgate.optics.psf.PSFConfig` (as written by its
          ``to_json`` or by hand) or the metadata of a record of any kind that needs no arrays;
        - the path of a ``.cgpsf`` PSF model file (:func:`napari_coordgate.modelio.load_psf_model`; the suffix
          may be left out, as for model files);
        - a dict: a record's metadata (with ``"kind"``) or a ``PSFConfig`` dict.

    Returns
    -------
    PSFModel

    Raises
    ------
    ConfigError
        For an unknown preset (the message lists the presets), an unreadable or invalid JSON file, invalid
        fields, a type that names no PSF model, or a file of another kind (a model or checkpoint file, a zip, an
        image: the message says which, and what names a PSF model).
    ValueError
        For a record of an unknown kind, or one declaring sizes beyond the bounds (:func:`psf_model_from_record`).
    napari_coordgate.modelio.ModelFileError
        For a ``.cgpsf`` file that is corrupt, foreign, or from a newer napari-coordgate.
    """
    if isinstance(spec, PSFModel):
        return spec
    if isinstance(spec, Mapping):
        return psf_model_from_record(dict(spec))
    if isinstance(spec, (str, os.PathLike)):
        return _from_name_or_path(spec)
    raise ConfigError(
        "a PSF model must be a PSF model object, a preset name, a .json config or .cgpsf file path, or a dict; "
        f"got {type(spec).__name__}"
    )


def _from_name_or_path(spec: "str | os.PathLike") -> PSFModel:
    from .psf import PRESETS

    if isinstance(spec, str) and spec in PRESETS:
        return PRESETS[spec]
    from napari_coordgate.modelio import PSF_SUFFIX, load_psf_model, with_suffix

    path = Path(spec)
    suffix = path.suffix.lower()
    if suffix == PSF_SUFFIX or (suffix != ".json" and not path.exists() and with_suffix(path, PSF_SUFFIX).is_file()):
        return load_psf_model(path)
    what = _binary_kind(path) if path.is_file() else None
    if what == "psf":  # a PSF model file under another name
        return load_psf_model(path)
    if what is not None:
        raise ConfigError(f"{path} is {what}, not a PSF model; a PSF model is a preset name ({', '.join(PRESETS)}), "
                          f"a PSF config .json file or a {PSF_SUFFIX} PSF model file (measured from beads)")
    if suffix == ".json" or path.is_file():
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
            raise ConfigError(f"cannot read PSF config file {str(path)!r}: {reason}") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"invalid JSON for a PSF config in {str(path)!r}: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{str(path)!r} holds a JSON {type(data).__name__}, not a PSF config object")
        return psf_model_from_record(data)
    raise ConfigError(
        f"unknown PSF preset {str(spec)!r}; valid presets: {', '.join(PRESETS)} "
        f"(or give the path of a .json PSF config or a {PSF_SUFFIX} PSF model file)"
    )


# what a napari-coordgate safetensors file is, by the "format" in its metadata (the file formats of modelio,
# named here without importing it: optics sits below the model files)
_FILE_KINDS = {
    "napari-coordgate-psf": "psf",
    "napari-coordgate-model": "a napari-coordgate model file (a trained network)",
    "napari-coordgate-checkpoint": "a napari-coordgate checkpoint file (a training run to resume)",
}


def _binary_kind(path: Path) -> str | None:
    """What the file at ``path`` is when it is no text: ``"psf"`` for a PSF model file, else a phrase for people
    (a model file, a checkpoint, a zip, another binary file); None for text, which may be a JSON PSF config.

    Only the first bytes and a safetensors header are read, never the whole file.
    """
    try:
        with open(path, "rb") as fh:
            head = fh.read(4096)
            n = int.from_bytes(head[:8], "little") if len(head) >= 9 else -1
            if 0 < n <= 100_000_000 and head[8:9] == b"{":  # safetensors: header length, then a JSON header
                text = head[8 : 8 + n]
                text += fh.read(n - len(text))
                fmt = None
                try:
                    fmt = json.loads(json.loads(text)["__metadata__"]["napari_coordgate"]).get("format")
                except (ValueError, KeyError, TypeError, AttributeError):  # no napari-coordgate file
                    pass
                return _FILE_KINDS.get(fmt, "a safetensors file of another program")
    except OSError:
        return None  # reading it again below gives the error message
    if head.startswith(b"PK\x03\x04"):
        return "a zip file (a bioimage.io model package?)"
    if head[:1] == b"\x80":
        return "a pickle / torch.save file"
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as exc:
        if exc.start < len(head) - 4:  # not just a character cut at the end of what was read
            return "not a text file (an image?)"
    return None


def _load_implementations() -> None:
    from . import measured, psf, pupil_poly  # noqa: F401 - register "measured_grid", "pupil" and "pupil_poly"
