"""Model files (``.cgmodel``): a network's weights with its config, field, normalisation, PSF model and
provenance (:mod:`.container`); older schemas are migrated on reading."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import ConfigError, ModelConfig
from ..data import Normalization
from ..outputs import atomic_write_bytes
from .container import (
    _MODEL_FORMAT,
    _PSF_PREFIX,
    SCHEMA_VERSION,
    ModelFileError,
    decode,
    encode,
    stamped_provenance,
    state_dict_mismatch,
    with_suffix,
)
from .psf_file import _checked_psf_provenance, _psf_from_file, _psf_to_file, resolve_psf

__all__ = ["SavedModel", "save_model", "load_model", "read_model_info"]


@dataclass
class SavedModel:
    """A network with everything needed to apply it correctly.

    ``psf`` is the PSF model (:class:`~napari_coordgate.optics.psfmodel.PSFModel`) the model was trained from
    or whose Wiener filters it holds, or None; anything :func:`~napari_coordgate.optics.models.get_psf_model`
    resolves (a preset name, a ``PSFConfig`` dict...) is resolved on construction. ``normalization`` is a
    :class:`~napari_coordgate.data.Normalization`; its dict form (``{"offset": o, "scale": s}``, as in the file) is
    converted and checked on construction (ValueError for a scale <= 0 or bad percentiles).
    """

    model: Any  # torch.nn.Module (typed loosely so this module imports without torch)
    config: ModelConfig
    field_shape: tuple[int, int]
    normalization: Normalization = field(default_factory=Normalization)
    psf: Any = None  # PSFModel | None
    provenance: dict[str, Any] = field(default_factory=dict)
    z_step_um: float | None = None  # a 3-D model's z-step (µm): the volumes it restores must have it

    def __post_init__(self) -> None:
        norm = self.normalization
        if isinstance(norm, Normalization):
            norm = norm.to_dict()  # validated like a dict, with plain floats
        if not isinstance(norm, dict):
            raise TypeError(f"normalization must be a Normalization or its dict form, got {type(norm).__name__}")
        self.normalization = Normalization.from_dict(norm)
        if self.psf is not None:
            self.psf = resolve_psf(self.psf)
        self.z_step_um = _checked_z_step(self.config, self.z_step_um)


def _checked_z_step(cfg: ModelConfig, z_step) -> float | None:
    """A model's z-step: a positive number of µm for a 3-D model, None for a 2-D one (ValueError otherwise)."""
    if cfg.ndim == 2:
        if z_step is not None:
            raise ValueError(f"a 2-D model has no z-step, got z_step_um={z_step!r}")
        return None
    ok = isinstance(z_step, (int, float)) and not isinstance(z_step, bool) and 0 < z_step < 1e3
    if not ok:
        raise ValueError(f"a 3-D model needs its z-step in µm (0 to 1000), got z_step_um={z_step!r}")
    return float(z_step)


def save_model(path: str | os.PathLike, saved: SavedModel) -> Path:
    """Write a model file atomically; returns the path written (``.cgmodel`` added if missing)."""
    path = with_suffix(path)
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
        "normalization": saved.normalization.to_dict(),
        "psf": record,
        "provenance": stamped_provenance(saved.provenance),
    }
    if saved.z_step_um is not None:  # 3-D models only: 2-D files stay as they were
        meta["z_step_um"] = float(saved.z_step_um)
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
    from ..nn.unet import build_model

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
        norm = Normalization.from_dict(meta["normalization"])
        z_step = _checked_z_step(cfg, meta.get("z_step_um"))
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
        z_step_um=z_step,
    )
