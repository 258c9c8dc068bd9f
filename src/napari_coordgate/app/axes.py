"""What the dock reads from a layer's axes, without Qt: the z-step of a z-stack (its scale in a length unit, or the
metadata of the file it was opened from), whether a model can restore a layer of that shape and z-step, and which
settings a z-stack calibration takes."""

from __future__ import annotations

from typing import Any, Sequence

from ..image_io.units import um_per_unit

# the Calibrate form's settings a z-stack calibration does not take (yet): field -> what it would need
NOT_IN_3D = {"target": "target", "model": "model pupil (a pupil fit through focus)", "na": "NA",
             "wavelength_nm": "wavelength", "immersion": "immersion index", "bead_diameter_nm": "bead diameter",
             "holdout": "holdout fraction"}


def axis_step_um(scale: float, unit: Any) -> float | None:
    """One axis's step in µm: ``scale`` in ``unit`` (nm, µm or mm in any spelling), or None for a unit that is no
    length (napari's default ``pixel``: the step is not known)."""
    factor = um_per_unit(str(unit)) if unit is not None else None
    return float(scale) * factor if factor is not None and float(scale) > 0 else None


def z_step_um(scale: Sequence[float], units: Sequence[Any]) -> float | None:
    """The z-step (µm) of a (..., Z, Y, X) layer: its third-last axis's :func:`axis_step_um`; None for fewer than
    three axes or a z axis without a length unit."""
    if len(scale) < 3 or len(units) < 3:
        return None
    return axis_step_um(scale[-3], units[-3])


def source_steps_um(source, shape: Sequence[int]) -> tuple[float | None, float | None]:
    """(z-step, pixel size) in µm that the metadata of the file a layer was opened from states (napari's own readers
    keep no physical scale), or None for each it does not state; (None, None) without a readable file, or when
    the file's image has another shape than the layer's (the layer is not that image)."""
    from ..image_io.read import open_image

    if not source:
        return None, None
    try:
        image = open_image(source)
    except (OSError, ValueError):  # not a file this package reads (InputError is a ValueError)
        return None, None
    if tuple(image.data.shape) != tuple(shape):
        return None, None
    return image.z_step_um, image.pixel_size_um


def layer_z_step_um(scale: Sequence[float], units: Sequence[Any], shape: Sequence[int], source=None
                    ) -> float | None:
    """The z-step (µm) of a (..., Z, Y, X) layer: from its scale (:func:`z_step_um`), else from the metadata of the
    file it was opened from (:func:`source_steps_um`), else None."""
    if len(shape) < 3:
        return None
    step = z_step_um(scale, units)
    return step if step is not None else source_steps_um(source, shape)[0]


def check_model_fits(model_ndim: int, model_z_step: float | None, shape: Sequence[int], channel_axis: int | None,
                     z_step: float | None, resample_z: bool) -> None:
    """Raise ValueError (one line, saying what to do) when a model cannot restore an image of ``shape``.

    A 2-D model restores any (..., Y, X) image plane by plane. A 3-D model restores (..., Z, Y, X) volumes whole:
    the image needs a Z axis besides the channel axis, and a known z-step other than the model's is refused unless
    ``resample_z``.
    """
    if model_ndim != 3:
        return
    spatial = len(shape) - (channel_axis is not None)
    if spatial < 3:
        raise ValueError(f"this is a 3-D model: it restores z-stacks (Z, Y, X), got an image of shape {tuple(shape)}; "
                         "apply a 2-D model to single planes")
    if channel_axis is not None and channel_axis >= len(shape) - 3:
        raise ValueError(f"with a 3-D model the channel axis must come before Z, Y, X (axis < {len(shape) - 3}), "
                         f"got axis {channel_axis}")
    if z_step is None or model_z_step is None or resample_z:
        return
    from ..engine.prediction import Z_STEP_TOLERANCE

    if abs(z_step / model_z_step - 1) > Z_STEP_TOLERANCE:
        raise ValueError(f"the layer's z-step is {z_step:g} µm but the model was trained at {model_z_step:g} µm: "
                         "tick 'resample z' to restore it resampled to the model's z-step, or correct the layer's "
                         "z scale")


def zstack_settings(cfg, z_step: float) -> tuple[dict[str, Any], list[str]]:
    """:func:`~napari_coordgate.calibration.zstack.calibrate_zstack`'s keyword arguments from a
    :class:`~napari_coordgate.config.CalibrateConfig` and the stack's z-step, and the names of the settings given
    that a z-stack calibration does not take (they are left out)."""
    from ..config import CalibrateConfig

    default = CalibrateConfig()
    ignored = [label for name, label in NOT_IN_3D.items() if getattr(cfg, name) != getattr(default, name)
               and not (name == "model" and cfg.model == "grid")]
    settings = {"z_step_um": float(z_step), "pixel_size_um": cfg.pixel_size_um, "grid": cfg.grid,
                "psf_size": cfg.psf_size, "min_snr": cfg.min_snr}
    return settings, ignored
