"""The container every napari-coordgate file uses: safetensors tensors plus one JSON document of metadata, with
a checksum over both, never pickle; the suffix rule; the one error for a file that cannot be read."""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
from pathlib import Path

from .._version import __version__

__all__ = ["MODEL_SUFFIX", "CHECKPOINT_SUFFIX", "PSF_SUFFIX", "ModelFileError", "with_suffix", "existing_file",
           "encode", "decode", "content_sha256", "state_dict_mismatch", "stamped_provenance"]

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


def stamped_provenance(extra: dict) -> dict:
    return {
        "package_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        **extra,
    }
