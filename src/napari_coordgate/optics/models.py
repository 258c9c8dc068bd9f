"""Every kind of PSF model, by name: the one resolver of what a caller names into a
:class:`~napari_coordgate.optics.psfmodel.PSFModel`.

Importing this module imports every implementation (the pupil :class:`~napari_coordgate.optics.psf.PSFConfig`,
the :class:`~napari_coordgate.optics.measured.MeasuredGridPSF`, the
:class:`~napari_coordgate.optics.pupil_poly.PupilPolyPSF` and the 3-D models of
:mod:`~napari_coordgate.optics.psf3d`), so each has registered its ``kind``. Files are not read
here: :func:`napari_coordgate.model_io.resolve_psf` reads ``.cgpsf`` and ``.json`` files and then comes here.

numpy only: no torch, no Qt.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import numpy as np

from napari_coordgate.config import ConfigError
from napari_coordgate.optics import measured, psf3d, pupil_poly  # noqa: F401 - they register their kinds
from napari_coordgate.optics.psf import PRESETS, PSFConfig
from napari_coordgate.optics.psf3d import PRESETS_3D
from napari_coordgate.optics.psfmodel import PSFModel, check_record_sizes, registered_kinds

#: every named PSF model: the 2-D pupil/Gaussian presets and the 3-D ones (a preset name selects one everywhere)
ALL_PRESETS: Mapping[str, PSFModel] = {**PRESETS, **PRESETS_3D}

__all__ = ["ALL_PRESETS", "get_psf_model", "get_psf_config", "psf_model_from_record", "psf_model_kinds", "psf_at",
           "psfs_at", "psf_grid", "render_psf_grid"]


def psf_model_kinds() -> tuple[str, ...]:
    """The kinds of PSF model this napari-coordgate reads."""
    return tuple(registered_kinds())


def psf_model_from_record(meta: dict[str, Any], arrays: dict[str, np.ndarray] | None = None) -> PSFModel:
    """The PSF model stored as ``(meta, arrays)`` (see :meth:`PSFModel.to_record`).

    A record without ``"kind"`` is a plain :class:`~napari_coordgate.optics.psf.PSFConfig` dict (what model
    files of schema version 1 store). The sizes it declares (``grid``, ``nodes``, ``psf_size``, ``field_shape``)
    are checked against the bounds of :class:`~napari_coordgate.optics.psf.PSFConfig` first, for every kind.
    """
    if isinstance(meta, dict):
        check_record_sizes(meta)
    kind = meta.get("kind", "pupil") if isinstance(meta, dict) else None
    if kind == "psf":  # PSFConfig.to_dict() names its config kind "psf": schema-1 model files and JSON configs
        kind, meta = "pupil", {**meta, "kind": "pupil"}
    kinds = registered_kinds()
    if kind not in kinds:
        raise ValueError(f"unknown PSF model kind {kind!r}; this napari-coordgate reads: {', '.join(kinds)} "
                         "(a file from a newer version? upgrade napari-coordgate)")
    return kinds[kind].from_record(meta, arrays or {})


def get_psf_model(spec: "PSFModel | str | Mapping[str, Any]") -> PSFModel:
    """The PSF model that ``spec`` names: a :class:`PSFModel` (returned unchanged), a preset name
    (:data:`ALL_PRESETS`: 2-D and 3-D) or a dict (a record's metadata with ``"kind"``, or a
    ``PSFConfig`` dict).

    Files (``.cgpsf``, ``.json``) are read by :func:`napari_coordgate.model_io.resolve_psf`, which ends here.

    Raises
    ------
    ConfigError
        For an unknown preset (the message lists the presets), invalid fields or a type that names no PSF model.
    ValueError
        For a record of an unknown kind, or one declaring sizes beyond the bounds (:func:`psf_model_from_record`).
    """
    if isinstance(spec, PSFModel):
        return spec
    if isinstance(spec, Mapping):
        return psf_model_from_record(dict(spec))
    if isinstance(spec, str) and spec in ALL_PRESETS:
        return ALL_PRESETS[spec]
    if isinstance(spec, (str, os.PathLike)):
        raise ConfigError(f"unknown PSF preset {str(spec)!r}; valid presets: {', '.join(ALL_PRESETS)} (a PSF config "
                          ".json or a .cgpsf file is read by napari_coordgate.model_io.resolve_psf)")
    raise ConfigError(f"a PSF model must be a PSF model object, a preset name or a dict; got {type(spec).__name__}")


def get_psf_config(spec: "PSFConfig | str | Mapping[str, Any]") -> PSFConfig:
    """Resolve ``spec`` (as :func:`get_psf_model`) where a :class:`PSFConfig`
    specifically is needed (the dock's parameter editor, the Nyquist check).

    Parameters
    ----------
    spec
        A ``PSFConfig`` (returned unchanged), a preset name from :data:`PRESETS` or a dict of fields.

    Returns
    -------
    PSFConfig

    Raises
    ------
    ConfigError
        For an unknown preset name (the message lists the presets), an unreadable file, invalid fields, or a
        PSF model of another kind (a measured one, say), which has no pupil parameters.
    """
    model = get_psf_model(spec)
    if not isinstance(model, PSFConfig):
        raise ConfigError(f"{model.describe()} is not a pupil/Gaussian PSF config: this needs a preset, a .json "
                          "PSF config or a dict of PSFConfig fields")
    return model


def psfs_at(
    model: "PSFModel | str | Mapping[str, Any]", y: "np.ndarray", x: "np.ndarray",
    field_shape: Sequence[int] | None = None,
) -> np.ndarray:
    """PSFs at many normalised field positions at once.

    Parameters
    ----------
    model
        The PSF model (any :class:`PSFModel`, or what :func:`get_psf_model` resolves).
    y, x
        Normalised field coordinates (arrays broadcastable to one shape ``S``).
    field_shape
        (H, W) of the frame, or ``None`` for a square frame.

    Returns
    -------
    ndarray, float64, shape ``S + (psf_size, psf_size)``
        Each PSF sums to one and is centred on its middle pixel.
    """
    return get_psf_model(model).psfs_at(y, x, field_shape)


def psf_at(model: "PSFModel | str | Mapping[str, Any]", y: float, x: float,
           field_shape: Sequence[int] | None = None) -> np.ndarray:
    """The PSF at one normalised field position.

    Parameters
    ----------
    model
        The PSF model (any :class:`PSFModel`, or what :func:`get_psf_model` resolves).
    y, x
        Normalised field coordinates in [-1, 1] (``(0, 0)`` is the frame centre).
    field_shape
        (H, W) of the frame, or ``None`` for a square frame.

    Returns
    -------
    ndarray, float64, shape (psf_size, psf_size)
        Sums to one; the point's image is centred on the middle pixel.

    Warns
    -----
    UndersamplingWarning
        When the camera pixel is coarser than the Nyquist limit of a pupil-model PSF.
    """
    return get_psf_model(model).psf_at(y, x, field_shape)


def psf_grid(model: "PSFModel | str | Mapping[str, Any]", field_shape: Sequence[int] | None = None
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """PSFs on the K × K grid (``K = model.grid``) that the fast blur interpolates.

    Parameters
    ----------
    model
        The PSF model (any :class:`PSFModel`, or what :func:`get_psf_model` resolves).
    field_shape
        (H, W) of the frame, or ``None`` for a square frame.

    Returns
    -------
    psfs : ndarray, float64, shape (K, K, psf_size, psf_size)
        ``psfs[i, j]`` is the PSF at row node ``ys[i]`` and column node ``xs[j]``.
    ys, xs : ndarray, shape (K,)
        Normalised coordinates of the nodes: ``linspace(-1, 1, K)``, or ``[0]`` for ``K = 1``.
    """
    return get_psf_model(model).psf_grid(field_shape)


def render_psf_grid(
    model: "PSFModel | str | Mapping[str, Any]", field_shape: Sequence[int] | None = None, *, gap: int = 2,
    normalize: str = "each",
) -> np.ndarray:
    """The K × K PSF grid tiled into one image for display.

    Parameters
    ----------
    model
        The PSF model (any :class:`PSFModel`, or what :func:`get_psf_model` resolves).
    field_shape
        (H, W) of the frame, or ``None`` for a square frame.
    gap
        Pixels of zero between tiles.
    normalize
        ``"each"`` scales every PSF to peak 1 so shapes are visible everywhere; ``"global"`` divides all by
        the largest peak so the loss of peak intensity towards the edge shows.

    Returns
    -------
    ndarray, float32, shape (K * s + (K + 1) * gap,) * 2
        Tile ``(i, j)`` shows the PSF at grid node ``(i, j)``, laid out as in the field.
    """
    if normalize not in ("each", "global"):
        raise ValueError(f"normalize must be 'each' or 'global', got {normalize!r}")
    if gap < 0:
        raise ValueError(f"gap must be >= 0, got {gap}")
    psfs, _, _ = get_psf_model(model).psf_grid(field_shape)
    k, s = psfs.shape[0], psfs.shape[-1]
    if normalize == "each":
        psfs = psfs / psfs.max(axis=(2, 3), keepdims=True)
    else:
        psfs = psfs / psfs.max()
    side = k * s + (k + 1) * gap
    image = np.zeros((side, side), dtype=np.float32)
    for i in range(k):
        for j in range(k):
            r, c = gap + i * (s + gap), gap + j * (s + gap)
            image[r : r + s, c : c + s] = psfs[i, j]
    return image
