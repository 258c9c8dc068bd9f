"""Model files and training checkpoints: safetensors + JSON, never pickle, written atomically.

A model file (extension ``.cgmodel``) is a plain safetensors file. Its tensors are the network weights;
its string metadata holds one JSON document under the key ``"napari_coordgate"`` with:

- ``format``: ``"napari-coordgate-model"`` and ``schema_version``;
- ``model``: the :class:`~napari_coordgate.config.ModelConfig` (the network is rebuilt from it alone);
- ``field_shape``: (H, W) of the sensor frame the model was trained on (its coordinates refer to it);
- ``normalization``: ``{"offset": o, "scale": s}``; the network sees ``(image - o) / s``;
- ``psf``: the PSF config the training pairs were synthesised from, or ``null`` for calibration pairs;
- ``provenance``: package version, creation date (UTC) and a training summary.

A checkpoint (``.cgckpt``) uses the same container for weights plus optimiser state tensors, with the
optimiser's non-tensor state, the epoch counter and scheduler state in the JSON. Loading goes through
``safetensors`` only, so a truncated, corrupt, foreign or pickle file raises :class:`ModelFileError` and no
code from the file is ever run.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import __version__
from .config import ConfigError, ModelConfig

__all__ = [
    "MODEL_SUFFIX",
    "CHECKPOINT_SUFFIX",
    "ModelFileError",
    "SavedModel",
    "save_model",
    "load_model",
    "read_model_info",
    "atomic_write_bytes",
    "with_suffix",
    "existing_file",
]

MODEL_SUFFIX = ".cgmodel"
CHECKPOINT_SUFFIX = ".cgckpt"
_META_KEY = "napari_coordgate"
_MODEL_FORMAT = "napari-coordgate-model"
_CHECKPOINT_FORMAT = "napari-coordgate-checkpoint"
_SUFFIXES = {_MODEL_FORMAT: MODEL_SUFFIX, _CHECKPOINT_FORMAT: CHECKPOINT_SUFFIX}
SCHEMA_VERSION = 1


class ModelFileError(ValueError):
    """A model or checkpoint file cannot be read: missing, truncated, corrupt, foreign or too new."""


@dataclass
class SavedModel:
    """A network with everything needed to apply it correctly."""

    model: Any  # torch.nn.Module (typed loosely so this module imports without torch)
    config: ModelConfig
    field_shape: tuple[int, int]
    normalization: dict[str, float] = field(default_factory=lambda: {"offset": 0.0, "scale": 1.0})
    psf: dict | None = None
    provenance: dict[str, Any] = field(default_factory=dict)


def with_suffix(path: str | os.PathLike, suffix: str = MODEL_SUFFIX) -> Path:
    """The file a model (or checkpoint) named ``path`` is written to: ``path`` with ``suffix`` added if missing.

    The one suffix rule of the package: the CLI, the dock and the Python API write and find files through
    this and :func:`existing_file`, so ``-o mymodel`` then ``-m mymodel`` name the same file.
    """
    path = Path(path)
    return path if path.suffix == suffix else path.with_name(path.name + suffix)


def existing_file(path: str | os.PathLike, suffix: str = MODEL_SUFFIX) -> Path:
    """The existing file ``path`` names: as given, else with ``suffix`` added; :class:`ModelFileError` if neither."""
    path = Path(path)
    if path.exists():
        return path
    full = with_suffix(path, suffix)
    if full != path and full.exists():
        return full
    tried = f" (nor {full})" if full != path else ""
    raise ModelFileError(f"model file {path} does not exist{tried}")


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` via a temporary file in the same folder and an atomic rename.

    A crash or a full disk leaves either the old file or the new one, never half of one.
    """
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise ModelFileError(f"cannot write {path}: folder {folder} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def _state_to_cpu(state: dict) -> dict:
    # safetensors needs contiguous CPU tensors; saving from CUDA must still load on a CPU-only machine
    return {k: v.detach().to("cpu").contiguous() for k, v in state.items()}


def encode(tensors: dict, meta: dict) -> bytes:
    """Serialise tensors and a JSON-able metadata dict into safetensors bytes."""
    from safetensors.torch import save

    return save(_state_to_cpu(tensors), metadata={_META_KEY: json.dumps(meta, sort_keys=True)})


def decode(path: str | os.PathLike, expected_format: str) -> tuple[dict, dict]:
    """Read a safetensors file written by :func:`encode`; return (tensors on CPU, metadata)."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    path = existing_file(path, _SUFFIXES.get(expected_format, MODEL_SUFFIX))
    if path.is_dir():
        raise ModelFileError(f"{path} is a folder, not a model file")
    raw = path.read_bytes()
    # a safetensors file is an 8-byte little-endian header length and a JSON header; only what is not one is
    # checked for pickle / zip signatures (a header length whose low byte is 0x80 must not look like pickle)
    n = int.from_bytes(raw[:8], "little") if len(raw) >= 9 else -1
    safetensors_like = 0 < n <= len(raw) - 8 and raw[8:9] == b"{"
    if not safetensors_like and (raw[:1] == b"\x80" or raw[:4] == b"PK\x03\x04"):
        raise ModelFileError(
            f"{path} looks like a pickle / torch.save file; napari-coordgate never unpickles files "
            "(they can run arbitrary code). Save models with napari-coordgate instead."
        )
    try:
        tensors = load(raw)
        header_len = int.from_bytes(raw[:8], "little")
        header = json.loads(raw[8 : 8 + header_len])
    except (SafetensorError, ValueError, UnicodeDecodeError, OverflowError) as exc:
        raise ModelFileError(f"{path} is not a readable napari-coordgate file (corrupt or truncated?): {exc}") from None
    except Exception as exc:  # safetensors raises a bare Exception subclass for some malformed headers
        raise ModelFileError(f"{path} is not a readable napari-coordgate file: {exc}") from None
    meta_raw = (header.get("__metadata__") or {}).get(_META_KEY)
    if meta_raw is None:
        raise ModelFileError(f"{path} is a safetensors file but not a napari-coordgate {expected_format} file")
    try:
        meta = json.loads(meta_raw)
    except json.JSONDecodeError as exc:
        raise ModelFileError(f"{path}: metadata is corrupt: {exc}") from None
    if meta.get("format") != expected_format:
        raise ModelFileError(f"{path} holds a {meta.get('format')!r}, expected a {expected_format!r}")
    version = meta.get("schema_version")
    if not isinstance(version, int) or version > SCHEMA_VERSION:
        raise ModelFileError(
            f"{path} has schema version {version!r}; this napari-coordgate ({__version__}) reads up to "
            f"{SCHEMA_VERSION}: upgrade napari-coordgate"
        )
    return tensors, meta


def save_model(path: str | os.PathLike, saved: SavedModel) -> Path:
    """Write a model file atomically; returns the path written (``.cgmodel`` added if missing)."""
    path = with_suffix(path)
    norm = {"offset": float(saved.normalization["offset"]), "scale": float(saved.normalization["scale"])}
    if not norm["scale"] > 0:
        raise ValueError(f"normalization scale must be > 0, got {norm['scale']}")
    provenance = {
        "package_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        **saved.provenance,
    }
    meta = {
        "format": _MODEL_FORMAT,
        "schema_version": SCHEMA_VERSION,
        "model": saved.config.to_dict(),
        "field_shape": [int(s) for s in saved.field_shape],
        "normalization": norm,
        "psf": saved.psf,
        "provenance": provenance,
    }
    return atomic_write_bytes(path, encode(saved.model.state_dict(), meta))


def read_model_info(path: str | os.PathLike) -> dict:
    """The JSON metadata of a model file (config, field shape, provenance...) without building the network."""
    return decode(path, _MODEL_FORMAT)[1]


def load_model(path: str | os.PathLike, device: str | Any = "cpu") -> SavedModel:
    """Load a model file onto ``device``; raises :class:`ModelFileError` for anything unreadable."""
    from .nn.unet import build_model

    tensors, meta = decode(path, _MODEL_FORMAT)
    try:
        cfg = ModelConfig.from_dict(meta["model"])
        field_shape = tuple(int(s) for s in meta["field_shape"])
        norm = {k: float(meta["normalization"][k]) for k in ("offset", "scale")}
    except (KeyError, TypeError, ValueError, ConfigError) as exc:
        raise ModelFileError(f"{path}: model metadata is invalid: {exc}") from None
    if len(field_shape) != 2 or min(field_shape) < 1:
        raise ModelFileError(f"{path}: invalid field_shape {field_shape}")
    model = build_model(cfg)
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        raise ModelFileError(f"{path}: weights do not match the stored configuration: {exc}") from None
    model.to(device).eval()
    return SavedModel(
        model=model,
        config=cfg,
        field_shape=field_shape,  # type: ignore[arg-type]
        normalization=norm,
        psf=meta.get("psf"),
        provenance=meta.get("provenance", {}),
    )
