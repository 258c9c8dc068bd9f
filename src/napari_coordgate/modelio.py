"""Model files, training checkpoints and PSF model files: safetensors + JSON, never pickle, written atomically.

A model file (extension ``.cgmodel``) is a plain safetensors file. Its tensors are the network weights and,
under the reserved prefix ``"psf/"``, the arrays of its PSF model's record; its string metadata holds one JSON
document under the key ``"napari_coordgate"`` with:

- ``format``: ``"napari-coordgate-model"`` and ``schema_version`` (:data:`SCHEMA_VERSION`);
- ``model``: the :class:`~napari_coordgate.config.ModelConfig` (the network is rebuilt from it alone);
- ``field_shape``: (H, W) of the sensor frame the model was trained on (its coordinates refer to it);
- ``normalization``: ``{"offset": o, "scale": s}``, the network sees ``(image - o) / s``; from schema 3 with
  ``"percentiles": [low, high]`` for per-image normalisation (each plane's own percentiles give its o and s:
  :class:`~napari_coordgate.data.Normalization`);
- ``psf``: the metadata of the PSF model's record (:meth:`~napari_coordgate.optics.psfmodel.PSFModel.to_record`,
  with its ``"kind"``) that the training pairs were synthesised from or that the Wiener first stage was built
  from, or ``null`` for calibration pairs alone;
- ``provenance``: package version, creation date (UTC), a training summary, and under ``"psf"`` the PSF model's
  own provenance (bead images, bead count, fit residual...) when it has one.

Schema 1 (before the PSF-model interface) stored ``psf`` as a ``PSFConfig`` dict and no PSF arrays; it is read
by migrating its metadata (:func:`_migrate_model_meta`); schema 2 files (fixed normalisation) read as they are.
A file from a newer napari-coordgate is refused with a message to upgrade.

A PSF model file (``.cgpsf``; format ``"napari-coordgate-psf"``) holds one PSF model the same way: its record's
arrays as tensors ``"psf/<name>"``, and ``psf`` (the record's metadata) and ``provenance`` in the JSON.

A checkpoint (``.cgckpt``) uses the same container for weights plus optimiser state tensors, with the
optimiser's non-tensor state, the epoch counter and scheduler state in the JSON. Loading goes through
``safetensors`` only, so a truncated, corrupt, foreign or pickle file raises :class:`ModelFileError` and no
code from the file is ever run.

Every file written since issue 20 carries ``content_sha256`` in its JSON: the SHA-256 of its tensors (names,
dtypes, shapes and bytes, in sorted name order) and of the rest of its metadata (:func:`content_sha256`). Reading
checks it, so a file changed after it was written (a flipped bit on a failing disk, a bad copy, an edit) is refused
as corrupt instead of giving wrong outputs. Files without it (written before) are read as before; readers that
predate it ignore the key, so no schema version changed. Non-finite numbers in any float tensor are refused too.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import stat
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from . import __version__
from .config import ConfigError, ModelConfig
from .data import Normalization

__all__ = [
    "MODEL_SUFFIX",
    "CHECKPOINT_SUFFIX",
    "PSF_SUFFIX",
    "ModelFileError",
    "SavedModel",
    "save_model",
    "load_model",
    "read_model_info",
    "save_psf_model",
    "load_psf_model",
    "read_psf_info",
    "atomic_write",
    "atomic_write_bytes",
    "save_checkpoint",
    "load_checkpoint",
    "with_suffix",
    "existing_file",
    "content_sha256",
    "state_dict_mismatch",
]

MODEL_SUFFIX = ".cgmodel"
CHECKPOINT_SUFFIX = ".cgckpt"
PSF_SUFFIX = ".cgpsf"
_META_KEY = "napari_coordgate"
_MODEL_FORMAT = "napari-coordgate-model"
_CHECKPOINT_FORMAT = "napari-coordgate-checkpoint"
_PSF_FORMAT = "napari-coordgate-psf"
_SUFFIXES = {_MODEL_FORMAT: MODEL_SUFFIX, _CHECKPOINT_FORMAT: CHECKPOINT_SUFFIX, _PSF_FORMAT: PSF_SUFFIX}
_WHAT = {MODEL_SUFFIX: "model file", CHECKPOINT_SUFFIX: "checkpoint file", PSF_SUFFIX: "PSF model file"}
#: schema version of the model files this version writes (and the newest it reads)
SCHEMA_VERSION = 3
PSF_SCHEMA_VERSION = 1
#: checkpoints: 2 adds per-image normalisation (as model schema 3); 1 reads as it is
CHECKPOINT_SCHEMA_VERSION = 2
_SCHEMA_VERSIONS = {_MODEL_FORMAT: SCHEMA_VERSION, _CHECKPOINT_FORMAT: CHECKPOINT_SCHEMA_VERSION,
                    _PSF_FORMAT: PSF_SCHEMA_VERSION}
_PSF_PREFIX = "psf/"  # tensors of a PSF model's record; network weight names never contain "/"
#: JSON key of the checksum; a future checksum of another kind gets another key, so old readers never misjudge it
_CHECKSUM_KEY = "content_sha256"
_MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit: a longer header is no safetensors file


class ModelFileError(ValueError):
    """A model or checkpoint file cannot be read: missing, truncated, corrupt, foreign or too new."""


@dataclass
class SavedModel:
    """A network with everything needed to apply it correctly.

    ``psf`` is the PSF model (:class:`~napari_coordgate.optics.psfmodel.PSFModel`) the model was trained from
    or whose Wiener filters it holds, or None; anything :func:`~napari_coordgate.optics.psfmodel.get_psf_model`
    resolves (a preset name, a ``PSFConfig`` dict...) is resolved on construction.
    """

    model: Any  # torch.nn.Module (typed loosely so this module imports without torch)
    config: ModelConfig
    field_shape: tuple[int, int]
    normalization: dict[str, Any] = field(default_factory=lambda: {"offset": 0.0, "scale": 1.0})
    psf: Any = None  # PSFModel | None
    provenance: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.psf is not None:
            from .optics.psfmodel import get_psf_model

            self.psf = get_psf_model(self.psf)


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
    raise ModelFileError(f"{_WHAT.get(suffix, 'file')} {path} does not exist{tried}")


def _file_mode(path: Path) -> int:
    """The permissions of a file written at ``path``: the replaced file's, or 0666 less the process's umask."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        pass
    try:  # Linux: the umask without changing it
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Create or replace ``path`` atomically: the one writer of every file the package writes.

    ``write(tmp)`` fills a temporary file in the same folder (a model's bytes, a TIFF, a memory-mapped TIFF filled
    plane by plane); it is then flushed to disk (fsync) and renamed over ``path``. A crash, a full disk or an
    exception in ``write`` leaves the old file (or none) and no temporary file, never half a file. The folder must
    exist (callers check it with their own message).
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        os.chmod(tmp, _file_mode(path))  # mkstemp makes 0600; the file gets the mode a plain open would give
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (:func:`atomic_write`); :class:`ModelFileError` if the folder is
    missing."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise ModelFileError(f"cannot write {path}: folder {folder} does not exist")
    return atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def _state_to_cpu(state: dict) -> dict:
    # safetensors needs contiguous CPU tensors; saving from CUDA must still load on a CPU-only machine
    return {k: v.detach().to("cpu").contiguous() for k, v in state.items()}


def state_dict_mismatch(expected: dict, given: dict) -> str | None:
    """One line saying how the tensors ``given`` differ from a network's ``expected`` state dict, or None.

    E.g. ``"3 missing, 2 unexpected, 1 wrong shape: first 'enc.0.weight'"`` (the first name in sorted order),
    instead of torch's one line per tensor.
    """
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    shapes = sorted(k for k in set(expected) & set(given) if tuple(expected[k].shape) != tuple(given[k].shape))
    if not (missing or unexpected or shapes):
        return None
    parts = [f"{len(names)} {what}" for names, what in ((missing, "missing"), (unexpected, "unexpected"),
                                                        (shapes, "wrong shape")) if names]
    return f"{', '.join(parts)}: first {min(missing + unexpected + shapes)!r}"


def _canonical_json(meta: dict) -> str:
    # through a JSON round trip first, so that the writer hashes exactly what a reader parses (int keys become
    # strings, tuples lists) and both sort the same keys the same way
    return json.dumps(json.loads(json.dumps(meta, sort_keys=True)), sort_keys=True)


def content_sha256(tensors: dict, meta: dict) -> str:
    """The checksum stored as ``content_sha256``: SHA-256 of the tensors and of the metadata without it.

    Each tensor (sorted by name) contributes its name, dtype, shape and raw bytes; then the metadata as canonical
    JSON (sorted keys), so that an edit of either is detected.
    """
    import torch

    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(json.dumps([name, str(t.dtype), list(t.shape)]).encode("utf-8"))
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    body = {k: v for k, v in meta.items() if k != _CHECKSUM_KEY}
    h.update(_canonical_json(body).encode("utf-8"))
    return h.hexdigest()


def encode(tensors: dict, meta: dict) -> bytes:
    """Serialise tensors and a JSON-able metadata dict into safetensors bytes, with their checksum in the JSON."""
    from safetensors.torch import save

    tensors = _state_to_cpu(tensors)
    meta = {k: v for k, v in meta.items() if k != _CHECKSUM_KEY}
    meta[_CHECKSUM_KEY] = content_sha256(tensors, meta)
    return save(tensors, metadata={_META_KEY: json.dumps(meta, sort_keys=True)})


def _not_readable(path, why: str) -> ModelFileError:
    return ModelFileError(f"{path} is not a readable napari-coordgate file (corrupt or truncated?): {why}")


def _read_header(fh, path, size: int, expected_format: str) -> dict:
    """The header of the safetensors file open as ``fh``, checked against the file's ``size``; the data after it
    is not read, so a large file that is no model of ours costs nothing to refuse."""
    head = fh.read(9)
    # a safetensors file is an 8-byte little-endian header length and a JSON header; only what is not one is
    # checked for pickle / zip signatures (a header length whose low byte is 0x80 must not look like pickle)
    n = int.from_bytes(head[:8], "little") if len(head) >= 9 else -1
    if not (0 < n <= size - 8 and head[8:9] == b"{"):
        if head[:1] == b"\x80" or head[:4] == b"PK\x03\x04":
            raise ModelFileError(
                f"{path} looks like a pickle / torch.save file; napari-coordgate never unpickles files "
                "(they can run arbitrary code). Save models with napari-coordgate instead."
            )
        raise _not_readable(path, "it does not start with a safetensors header")
    if n > _MAX_HEADER_BYTES:
        raise _not_readable(path, f"its header would be {n} bytes long")
    try:
        header = json.loads(head[8:] + fh.read(n - 1))
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
        raise _not_readable(path, f"its header is not JSON ({exc})") from None
    if not isinstance(header, dict):
        raise _not_readable(path, "its header is not a JSON object")
    meta = header.get("__metadata__")
    if not isinstance(meta, dict) or _META_KEY not in meta:
        raise ModelFileError(f"{path} is a safetensors file but not a napari-coordgate {expected_format} file")
    # declared sizes against the file before reading it: safetensors checks them too, but only once all is read
    data = size - 8 - n
    for name, entry in header.items():
        offsets = entry.get("data_offsets") if isinstance(entry, dict) and name != "__metadata__" else None
        if offsets is not None and (not isinstance(offsets, list) or len(offsets) != 2
                                    or not all(isinstance(o, int) and 0 <= o <= data for o in offsets)):
            raise _not_readable(path, f"tensor {name!r} lies outside the file's {data} data bytes")
    return header


def _parse_meta(path, meta_raw, expected_format: str) -> dict:
    if not isinstance(meta_raw, str):
        raise ModelFileError(f"{path}: its metadata is corrupt (not a JSON string)")
    try:
        meta = json.loads(meta_raw)
    except json.JSONDecodeError as exc:
        raise ModelFileError(f"{path}: its metadata is corrupt: {exc}") from None
    if not isinstance(meta, dict):
        raise ModelFileError(f"{path}: its metadata is not a JSON object but a {type(meta).__name__} "
                             "(edited by hand, or written by another program)")
    if meta.get("format") != expected_format:
        raise ModelFileError(f"{path} holds a {meta.get('format')!r}, expected a {expected_format!r}")
    version = meta.get("schema_version")
    newest = _SCHEMA_VERSIONS.get(expected_format, SCHEMA_VERSION)
    if isinstance(version, bool) or not isinstance(version, int) or version > newest:
        raise ModelFileError(
            f"{path} has schema version {version!r}; this napari-coordgate ({__version__}) reads up to "
            f"{newest}: upgrade napari-coordgate"
        )
    if version < 1:
        raise ModelFileError(f"{path} has an invalid schema version {version!r} (edited by hand?)")
    return meta


def _check_contents(path, tensors: dict, meta: dict) -> None:
    """The checksum (where the file has one) and finite floats: a damaged file is refused, never used."""
    import torch

    stored = meta.pop(_CHECKSUM_KEY, None)
    if stored is not None and stored != content_sha256(tensors, meta):
        raise ModelFileError(f"{path} is corrupt: it changed after it was written (its checksum does not match "
                             "its contents); use another copy of it")
    bad = sorted(name for name, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all())
    if bad:
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise ModelFileError(f"{path}: tensor(s) {', '.join(map(repr, bad[:3]))}{more} hold NaN or Inf values "
                             "(a diverged training run, or a damaged file)")


def decode(path: str | os.PathLike, expected_format: str) -> tuple[dict, dict]:
    """Read a safetensors file written by :func:`encode`; return (tensors on CPU, metadata).

    The header and the metadata are checked before the data are read; then the checksum (if the file has one;
    it is not part of the returned metadata) and that every float is finite.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load

    path = existing_file(path, _SUFFIXES.get(expected_format, MODEL_SUFFIX))
    if path.is_dir():
        raise ModelFileError(f"{path} is a folder, not a {_WHAT.get(_SUFFIXES.get(expected_format), 'file')}")
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        header = _read_header(fh, path, size, expected_format)
        meta = _parse_meta(path, header["__metadata__"][_META_KEY], expected_format)
        fh.seek(0)
        raw = fh.read()
    try:
        tensors = load(raw)
    except (SafetensorError, ValueError, UnicodeDecodeError, OverflowError) as exc:
        raise _not_readable(path, str(exc)) from None
    except Exception as exc:  # safetensors raises a bare Exception subclass for some malformed headers
        raise ModelFileError(f"{path} is not a readable napari-coordgate file: {exc}") from None
    del raw
    _check_contents(path, tensors, meta)
    return tensors, meta


# -- training checkpoints -------------------------------------------------------------------------
def _optimizer_to_tensors(state_dict: dict) -> tuple[dict, dict]:
    """Split an optimizer state_dict into tensors (for safetensors) and JSON (for the metadata)."""
    import torch

    tensors, state_json = {}, {}
    for idx, st in state_dict["state"].items():
        entry = {}
        for name, value in st.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{idx}.{name}"] = value
            else:
                entry[name] = value
        state_json[str(idx)] = entry
    return tensors, {"state": state_json, "param_groups": state_dict["param_groups"]}


def _optimizer_from_tensors(tensors: dict, meta: dict) -> dict:
    """The optimiser state dict of :func:`_optimizer_to_tensors`' parts; KeyError, TypeError or ValueError for
    parts that make none (whether it fits a given optimiser is the caller's check)."""
    if not isinstance(meta, dict) or not isinstance(meta["state"], dict) or not isinstance(meta["param_groups"], list):
        raise TypeError("'optimizer' must be an object with a 'state' object and a 'param_groups' list")
    state: dict = {}
    for idx, entry in meta["state"].items():
        state[int(idx)] = dict(entry)
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = value
    groups = [dict(g, betas=tuple(g["betas"])) if "betas" in g else dict(g) for g in meta["param_groups"]]
    if any(not isinstance(g.get("params"), list) for g in groups):
        raise TypeError("every optimiser parameter group needs a 'params' list")
    return {"state": state, "param_groups": groups}


def save_checkpoint(path: str | os.PathLike, *, weights: dict, best: dict, optimizer: dict, rng_tensors: dict,
                    state: dict) -> Path:
    """Write a training checkpoint (``.cgckpt`` added if missing) atomically; returns the path written.

    Parameters
    ----------
    weights, best
        State dicts of the network's current and best weights.
    optimizer
        The optimiser's ``state_dict()``: its tensors are stored as tensors, the rest as JSON.
    rng_tensors
        Random generator states that are tensors (``{"torch": ..., "cuda": ...}``).
    state
        The JSON part: model and training configs, field shape, normalisation, data fingerprint, epoch and step
        counters, best validation PSNR, numpy RNG state, scheduler state...
    """
    opt_tensors, opt_meta = _optimizer_to_tensors(optimizer)
    tensors = {f"model.{k}": v for k, v in weights.items()}
    tensors.update({f"best.{k}": v for k, v in best.items()})
    tensors.update(opt_tensors)
    tensors.update({f"rng.{k}": v for k, v in rng_tensors.items()})
    meta = {"format": _CHECKPOINT_FORMAT, "schema_version": CHECKPOINT_SCHEMA_VERSION, **state, "optimizer": opt_meta}
    return atomic_write_bytes(with_suffix(path, CHECKPOINT_SUFFIX), encode(tensors, meta))


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Read a training checkpoint (safetensors + JSON; never unpickled).

    Returns ``{"path": ..., "tensors": ..., "meta": ..., "weights": ..., "best": ..., "optimizer": ...,
    "rng_tensors": ...}``: the file read, the raw tensors and JSON, and the parts :func:`save_checkpoint` was given
    (``optimizer`` as a state dict). :class:`ModelFileError` for a file that is unreadable, corrupt (its checksum),
    holds NaN or Inf, or whose optimiser state makes no state dict; whether the parts fit a network is the
    resuming run's check (:mod:`napari_coordgate.engine.resume`).
    """
    tensors, meta = decode(path, _CHECKPOINT_FORMAT)
    path = existing_file(path, CHECKPOINT_SUFFIX)
    try:
        optimizer = _optimizer_from_tensors(tensors, meta["optimizer"])
    except KeyError as exc:
        raise ModelFileError(f"{path}: the checkpoint's optimiser state lacks {exc} (edited by hand?)") from None
    except (TypeError, ValueError, AttributeError) as exc:
        raise ModelFileError(f"{path}: the checkpoint's optimiser state is invalid ({exc}; edited by hand?)") from None
    return {
        "path": path,
        "tensors": tensors,
        "meta": meta,
        "weights": {k[6:]: v for k, v in tensors.items() if k.startswith("model.")},
        "best": {k[5:]: v.clone() for k, v in tensors.items() if k.startswith("best.")},
        "optimizer": optimizer,
        "rng_tensors": {k[4:]: v for k, v in tensors.items() if k.startswith("rng.")},
    }


# -- PSF model records inside files ----------------------------------------------------------------
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

    from .optics.psfmodel import psf_model_from_record

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
    from .optics.psfmodel import check_field_shape

    if not isinstance(provenance, dict):
        raise ModelFileError(f"{path}: provenance must be a JSON object, got {type(provenance).__name__}")
    if provenance.get("field_shape") is not None:
        try:
            check_field_shape(provenance["field_shape"], "the PSF model's field_shape")
        except ValueError as exc:
            raise ModelFileError(f"{path}: {exc} (edited by hand?)") from None
    return provenance


def _provenance(extra: dict) -> dict:
    return {
        "package_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        **extra,
    }


def save_psf_model(path: str | os.PathLike, model, provenance: dict[str, Any] | None = None) -> Path:
    """Write a PSF model file (``.cgpsf``) atomically; returns the path written (the suffix added if missing).

    Parameters
    ----------
    path
        Destination; ``.cgpsf`` is added when missing (the suffix rule of :func:`with_suffix`).
    model
        The :class:`~napari_coordgate.optics.psfmodel.PSFModel` (or anything
        :func:`~napari_coordgate.optics.psfmodel.get_psf_model` resolves).
    provenance
        JSON-able facts about where the model came from (source images, bead count, fit residual, date...);
        default: the model's own :attr:`~napari_coordgate.optics.psfmodel.PSFModel.provenance`. The package
        version and the creation date (UTC) are added.

    Returns
    -------
    Path
    """
    from .optics.psfmodel import get_psf_model

    path = with_suffix(path, PSF_SUFFIX)
    model = get_psf_model(model)
    record, tensors = _psf_to_file(model)
    prov = _provenance(dict(model.provenance if provenance is None else provenance))
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


def save_model(path: str | os.PathLike, saved: SavedModel) -> Path:
    """Write a model file atomically; returns the path written (``.cgmodel`` added if missing)."""
    path = with_suffix(path)
    norm = Normalization.from_dict(saved.normalization).to_dict()  # ValueError for a scale <= 0
    tensors = dict(saved.model.state_dict())
    record = None
    if saved.psf is not None:
        record, psf_tensors = _psf_to_file(saved.psf)
        tensors.update(psf_tensors)
    meta = {
        "format": _MODEL_FORMAT,
        "schema_version": SCHEMA_VERSION,
        "model": saved.config.to_dict(),
        "field_shape": [int(s) for s in saved.field_shape],
        "normalization": norm,
        "psf": record,
        "provenance": _provenance(saved.provenance),
    }
    return atomic_write_bytes(path, encode(tensors, meta))


def _migrate_model_meta(path, meta: dict) -> dict:
    """A model file's metadata brought to :data:`SCHEMA_VERSION`, one version step at a time."""
    meta = dict(meta)
    if meta["schema_version"] == 1:
        # schema 1: "psf" was a PSFConfig dict (or null) and the file held no PSF arrays
        psf = meta.get("psf")
        if psf is not None and not isinstance(psf, dict):
            raise ModelFileError(f"{path}: 'psf' must be a PSF config object or null, got {type(psf).__name__}")
        meta["psf"] = None if psf is None else {**psf, "kind": "pupil"}
        meta["schema_version"] = 2
    if meta["schema_version"] == 2:
        # schema 3: "normalization" may hold "percentiles" (per-image normalisation); older models are fixed
        meta["schema_version"] = 3
    return meta


def _read_model_file(path) -> tuple[dict, dict]:
    tensors, meta = decode(path, _MODEL_FORMAT)
    return tensors, _migrate_model_meta(path, meta)


def read_model_info(path: str | os.PathLike) -> dict:
    """The JSON metadata of a model file (config, field shape, provenance...) without building the network.

    Files of an older schema are shown migrated to :data:`SCHEMA_VERSION` (``psf`` is a record's metadata).
    """
    return _read_model_file(path)[1]


def load_model(path: str | os.PathLike, device: str | Any = "cpu") -> SavedModel:
    """Load a model file onto ``device``; raises :class:`ModelFileError` for anything unreadable."""
    from .nn.unet import build_model

    tensors, meta = _read_model_file(path)
    psf_tensors = {k: v for k, v in tensors.items() if k.startswith(_PSF_PREFIX)}
    weights = {k: v for k, v in tensors.items() if not k.startswith(_PSF_PREFIX)}
    provenance = meta.get("provenance") or {}
    psf = None if meta.get("psf") is None else _psf_from_file(path, meta["psf"], psf_tensors)
    if psf is not None and isinstance(provenance, dict) and isinstance(provenance.get("psf"), dict):
        psf = psf.with_provenance(_checked_psf_provenance(path, provenance["psf"]))
    try:
        cfg = ModelConfig.from_dict(meta["model"])
        field_shape = tuple(int(s) for s in meta["field_shape"])
        norm = Normalization.from_dict(meta["normalization"]).to_dict()
    except (KeyError, TypeError, ValueError, ConfigError) as exc:
        raise ModelFileError(f"{path}: model metadata is invalid: {exc}") from None
    if len(field_shape) != 2 or min(field_shape) < 1:
        raise ModelFileError(f"{path}: invalid field_shape {field_shape}")
    model = build_model(cfg)
    mismatch = state_dict_mismatch(model.state_dict(), weights)
    if mismatch is not None:
        raise ModelFileError(f"{path}: weights do not match the stored configuration ({mismatch})")
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as exc:  # names and shapes fit (checked above): a dtype torch cannot copy from
        first = str(exc).strip().splitlines()[-1].strip()
        raise ModelFileError(f"{path}: weights do not match the stored configuration: {first}") from None
    model.to(device).eval()
    return SavedModel(
        model=model,
        config=cfg,
        field_shape=field_shape,  # type: ignore[arg-type]
        normalization=norm,
        psf=psf,
        provenance=provenance,
    )
