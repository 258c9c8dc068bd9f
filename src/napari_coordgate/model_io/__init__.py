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

from ..outputs import atomic_write, atomic_write_bytes
from .checkpoint import load_checkpoint, save_checkpoint
from .container import (
    CHECKPOINT_SCHEMA_VERSION,
    CHECKPOINT_SUFFIX,
    MODEL_SUFFIX,
    PSF_SCHEMA_VERSION,
    PSF_SUFFIX,
    SCHEMA_VERSION,
    ModelFileError,
    content_sha256,
    decode,
    encode,
    existing_file,
    state_dict_mismatch,
    with_suffix,
)
from .model import SavedModel, load_model, read_model_info, save_model
from .psf_file import load_psf_model, read_psf_info, resolve_psf, save_psf_model

__all__ = [
    "SCHEMA_VERSION",
    "PSF_SCHEMA_VERSION",
    "CHECKPOINT_SCHEMA_VERSION",
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
    "resolve_psf",
    "atomic_write",
    "atomic_write_bytes",
    "save_checkpoint",
    "load_checkpoint",
    "with_suffix",
    "existing_file",
    "content_sha256",
    "state_dict_mismatch",
    "encode",
    "decode",
]
