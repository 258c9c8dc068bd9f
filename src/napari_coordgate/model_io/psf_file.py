"""PSF model files (``.cgpsf``) and the one resolver of what a user names as a PSF model: a preset, a dict, a
PSF config ``.json`` or a ``.cgpsf`` file (:func:`resolve_psf`); the records of PSF models inside model files."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

from ..config import ConfigError
from ..optics.models import ALL_PRESETS, get_psf_model, psf_model_from_record
from ..optics.psfmodel import PSFModel, check_field_shape
from ..outputs import atomic_write_bytes
from .container import (
    _CHECKPOINT_FORMAT,
    _META_KEY,
    _MODEL_FORMAT,
    _PSF_FORMAT,
    _PSF_PREFIX,
    PSF_SCHEMA_VERSION,
    PSF_SUFFIX,
    ModelFileError,
    decode,
    encode,
    stamped_provenance,
    with_suffix,
)

__all__ = ["save_psf_model", "load_psf_model", "read_psf_info", "resolve_psf"]


def _psf_to_file(psf) -> tuple[dict, dict]:
    """(record metadata, tensors ``"psf/<name>"``) of a PSF model, checked to fit a file."""
    import numpy as np
    import torch

    meta, arrays = psf.to_record()
    if not isinstance(meta, dict) or meta.get("kind") != psf.kind:
        raise ValueError(f"{type(psf).__name__}.to_record() must return metadata with 'kind': {psf.kind!r}")
    try:
        json.dumps(meta)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{type(psf).__name__}.to_record() metadata is not JSON: {exc}") from None
    tensors = {}
    for name, a in arrays.items():
        a = np.asarray(a)
        if not isinstance(name, str) or not name:
            raise ValueError(f"PSF model array names must be non-empty strings, got {name!r}")
        if a.dtype == bool or not (np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer)):
            raise ValueError(f"PSF model array {name!r} must be real numbers, got dtype {a.dtype}")
        tensors[_PSF_PREFIX + name] = torch.from_numpy(np.array(a, order="C"))  # a copy: torch wants it writable
    return meta, tensors


def _psf_from_file(path, meta, tensors: dict):
    """The PSF model of a record read from ``path``; :class:`ModelFileError` for anything that does not make one."""
    import numpy as np

    if not isinstance(meta, dict):
        raise ModelFileError(f"{path}: the PSF model's metadata is not a JSON object (edited by hand?)")
    arrays = {k[len(_PSF_PREFIX):]: v.numpy() for k, v in tensors.items() if k.startswith(_PSF_PREFIX)}
    bad = [name for name, a in arrays.items() if a.dtype.kind == "f" and not np.isfinite(a).all()]
    if bad:
        raise ModelFileError(f"{path}: PSF model array(s) {', '.join(sorted(bad))} hold NaN or Inf (corrupt file?)")
    try:
        psf = psf_model_from_record(meta, arrays)
        size, grid = psf.psf_size, psf.grid
    except (ValueError, TypeError, KeyError, IndexError, AttributeError) as exc:  # ConfigError is a ValueError
        raise ModelFileError(f"{path}: the PSF model stored in it is invalid: {exc}") from None
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1 or size % 2 == 0:
        raise ModelFileError(f"{path}: the PSF model's psf_size must be a positive odd integer, got {size!r}")
    if isinstance(grid, bool) or not isinstance(grid, (int, np.integer)) or grid < 1:
        raise ModelFileError(f"{path}: the PSF model's grid must be a positive integer, got {grid!r}")
    return psf


def _checked_psf_provenance(path, provenance) -> dict:
    """A PSF model's provenance from a file, its ``field_shape`` (what the CLI sizes training images by) checked."""
    if not isinstance(provenance, dict):
        raise ModelFileError(f"{path}: provenance must be a JSON object, got {type(provenance).__name__}")
    if provenance.get("field_shape") is not None:
        try:
            check_field_shape(provenance["field_shape"], "the PSF model's field_shape")
        except ValueError as exc:
            raise ModelFileError(f"{path}: {exc} (edited by hand?)") from None
    return provenance


def save_psf_model(path: str | os.PathLike, model, provenance: dict[str, Any] | None = None) -> Path:
    """Write a PSF model file (``.cgpsf``) atomically; returns the path written (the suffix added if missing).

    Parameters
    ----------
    path
        Destination; ``.cgpsf`` is added when missing (the suffix rule of :func:`with_suffix`).
    model
        The :class:`~napari_coordgate.optics.psfmodel.PSFModel` (or anything
        :func:`~napari_coordgate.optics.models.get_psf_model` resolves).
    provenance
        JSON-able facts about where the model came from (source images, bead count, fit residual, date...);
        default: the model's own :attr:`~napari_coordgate.optics.psfmodel.PSFModel.provenance`. The package
        version and the creation date (UTC) are added.

    Returns
    -------
    Path
    """
    path = with_suffix(path, PSF_SUFFIX)
    model = get_psf_model(model)
    record, tensors = _psf_to_file(model)
    prov = stamped_provenance(dict(model.provenance if provenance is None else provenance))
    meta = {"format": _PSF_FORMAT, "schema_version": PSF_SCHEMA_VERSION, "psf": record, "provenance": prov}
    try:
        data = encode(tensors, meta)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"PSF model provenance must be JSON (strings, numbers, lists, dicts): {exc}") from None
    return atomic_write_bytes(path, data)


def read_psf_info(path: str | os.PathLike) -> dict:
    """The JSON metadata of a PSF model file: ``format``, ``schema_version``, ``psf`` (record) and ``provenance``."""
    return decode(path, _PSF_FORMAT)[1]


def load_psf_model(path: str | os.PathLike):
    """Read a PSF model file (``.cgpsf``; the suffix may be left out).

    Returns
    -------
    PSFModel
        With the file's provenance as its :attr:`~napari_coordgate.optics.psfmodel.PSFModel.provenance`.

    Raises
    ------
    ModelFileError
        For a missing, corrupt, foreign or pickle file, a file from a newer napari-coordgate, or one edited into
        something that is no PSF model (the message says which).
    """
    tensors, meta = decode(path, _PSF_FORMAT)
    provenance = _checked_psf_provenance(path, meta.get("provenance") or {})
    return _psf_from_file(path, meta.get("psf"), tensors).with_provenance(provenance)


def resolve_psf(spec: "PSFModel | str | os.PathLike | Mapping[str, Any]") -> "PSFModel":
    """The PSF model that ``spec`` names: what :func:`~napari_coordgate.optics.models.get_psf_model` resolves
    (a PSF model, a preset name, a dict), or a file: a ``.cgpsf`` PSF model file (the suffix may be left out, as for
    model files; under another name it is recognised by its contents) or a ``.json`` PSF config (as written by
    ``PSFConfig.to_json`` or by hand, or a record's metadata that needs no arrays).

    Raises
    ------
    ConfigError
        For an unknown preset (the message lists the presets), an unreadable or invalid JSON file, invalid
        fields, or a file of another kind (a model or checkpoint file, a zip, an image: the message says which,
        and what names a PSF model).
    ModelFileError
        For a ``.cgpsf`` file that is corrupt, foreign, or from a newer napari-coordgate.
    """
    if not isinstance(spec, (str, os.PathLike)) or (isinstance(spec, str) and spec in ALL_PRESETS):
        return get_psf_model(spec)
    path = Path(spec)
    suffix = path.suffix.lower()
    if suffix == PSF_SUFFIX or (suffix != ".json" and not path.exists() and with_suffix(path, PSF_SUFFIX).is_file()):
        return load_psf_model(path)
    what = _binary_kind(path) if path.is_file() else None
    if what == "psf":  # a PSF model file under another name
        return load_psf_model(path)
    if what is not None:
        raise ConfigError(f"{path} is {what}, not a PSF model; a PSF model is a preset name "
                          f"({', '.join(ALL_PRESETS)}), a PSF config .json file or a {PSF_SUFFIX} PSF model file "
                          "(measured from beads)")
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
        f"unknown PSF preset {str(spec)!r}; valid presets: {', '.join(ALL_PRESETS)} "
        f"(or give the path of a .json PSF config or a {PSF_SUFFIX} PSF model file)"
    )


# what a napari-coordgate safetensors file is, by the "format" in its metadata
_FILE_KINDS = {
    _PSF_FORMAT: "psf",
    _MODEL_FORMAT: "a napari-coordgate model file (a trained network)",
    _CHECKPOINT_FORMAT: "a napari-coordgate checkpoint file (a training run to resume)",
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
                    fmt = json.loads(json.loads(text)["__metadata__"][_META_KEY]).get("format")
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
