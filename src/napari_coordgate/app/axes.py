"""What the dock reads from a layer's axes, without Qt: the z-step of a z-stack (its scale in a length unit, or the
metadata of the file it was opened from), whether a model can restore a layer of that shape and z-step, what the
Train tab will train from its layers and PSF model (:func:`train_plan`), and which settings a z-stack calibration
takes."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, NamedTuple, Sequence

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
    if not _same_step(z_step, model_z_step):
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


class LayerAxes(NamedTuple):
    """What the Train and Evaluate tabs need of a layer's axes: its name (for messages), shape, and the z-step and
    pixel size in µm where known (:func:`layer_axes`)."""

    name: str
    shape: tuple[int, ...]
    z_step_um: float | None = None
    pixel_um: float | None = None

    @property
    def is_zstack(self) -> bool:
        """A (..., Z, Y, X) layer whose z-step is known: a z-stack, not a stack of unrelated planes."""
        return len(self.shape) >= 3 and self.z_step_um is not None


def layer_axes(name: str, shape: Sequence[int], scale: Sequence[float], units: Sequence[Any], source=None
               ) -> LayerAxes:
    """A layer's :class:`LayerAxes`: z-step and pixel size from its scale in a length unit, else from the metadata
    of the file it was opened from (read once, only when the scale does not say)."""
    shape = tuple(int(n) for n in shape)
    z = z_step_um(scale, units) if len(shape) >= 3 else None
    pixel = axis_step_um(scale[-1], units[-1]) if len(scale) and len(units) else None
    if (z is None and len(shape) >= 3) or pixel is None:
        file_z, file_pixel = source_steps_um(source, shape)
        z = z if z is not None or len(shape) < 3 else file_z
        pixel = pixel if pixel is not None else file_pixel
    return LayerAxes(name, shape, z, pixel)


@dataclass(frozen=True)
class TrainPlan:
    """What the Train tab will train: a 2-D model (planes), or a 3-D one on volumes ``z_step_um`` apart (z pooled
    from level ``z_pool_start``); ``data`` says what it trains on, when that is worth saying."""

    ndim: int = 2
    z_step_um: float | None = None
    z_pool_start: int = 1
    data: str = ""

    def describe(self) -> str:
        what = "2-D model (plane by plane)" if self.ndim == 2 else f"3-D model, z-step {self.z_step_um:g} µm"
        return f"{what}, {self.data}" if self.data else what

    def model_config(self, cfg):
        """``cfg`` (a :class:`~napari_coordgate.config.ModelConfig`) for this plan: as it is for a 2-D model;
        ``ndim=3`` and the z pooling for a 3-D one (a setting a 3-D model refuses raises ConfigError, one line)."""
        return cfg if self.ndim == 2 else replace(cfg, ndim=3, z_pool_start=self.z_pool_start)


def _plan_3d(z_step: float, pixel: float | None, data: str = "") -> TrainPlan:
    from ..config import z_pool_start_for

    start = z_pool_start_for(z_step, pixel) if pixel else 1  # pool z once the xy pooling has reached the z-step
    return TrainPlan(3, float(z_step), start, data)


def _same_step(a: float, b: float) -> bool:
    from ..engine.prediction import Z_STEP_TOLERANCE

    return abs(a / b - 1) <= Z_STEP_TOLERANCE


def train_plan(source: str, psf, sharp: LayerAxes | None, blurred: LayerAxes | None = None, *,
               specimens: str = "mixed") -> TrainPlan:
    """What training from ``source`` trains, or ValueError (one line, saying what to change) for what it refuses.

    ``source``: ``"pairs"`` (sharp + blurred layers: a 3-D model when they are z-stacks, :attr:`LayerAxes.is_zstack`,
    of one z-step), ``"simulated"`` (sharp layers blurred by ``psf``: a 3-D model for a 3-D PSF model, which needs
    (Z, Y, X) or (N, Z, Y, X) layers of its z-step where theirs is known; a 2-D PSF model refuses z-stacks) or
    ``"builtin"`` (built-in specimens at a measured PSF model's field: 2-D fields,
    :func:`~napari_coordgate.samples.specimens.builtin_field_count`, or 3-D volumes for a 3-D PSF model,
    :func:`~napari_coordgate.samples.volumes.builtin_volume_shape`; ``specimens``: the 2-D fields' set). A missing
    layer is left for the tab to name.
    """
    if source == "builtin":
        from ..samples.volumes import builtin_volume_shape

        if psf.ndim != 3:
            from ..samples.specimens import builtin_field_count

            n, h, w = builtin_field_count(psf, "sharp layers and a PSF model")
            return TrainPlan(2, data=f"{n} built-in fields of {h} x {w} ({specimens})")
        n, d, h, w = builtin_volume_shape(psf, "sharp (Z, Y, X) layers and a PSF model")
        return _plan_3d(psf.z_step_um, psf.pixel_size_um, f"{n} built-in volumes of {d} x {h} x {w}")
    if source == "pairs":
        stacks = [a for a in (sharp, blurred) if a is not None and a.is_zstack]
        if not stacks:
            return TrainPlan(2)
        if len(stacks) == 2 and not _same_step(sharp.z_step_um, blurred.z_step_um):
            raise ValueError(f"the sharp layer {sharp.name!r} has a z-step of {sharp.z_step_um:g} µm but the blurred "
                             f"{blurred.name!r} {blurred.z_step_um:g} µm: pairs of z-stacks share one z-step; correct "
                             "a layer's z scale")
        return _plan_3d(stacks[0].z_step_um, next((a.pixel_um for a in stacks if a.pixel_um), None))
    if psf.ndim != 3:
        if sharp is not None and sharp.is_zstack:
            raise ValueError(f"{sharp.name!r} is a z-stack (z-step {sharp.z_step_um:g} µm) but the PSF model is 2-D: "
                             "pick a 3-D PSF model (a .cgpsf from a bead z-stack, or a 3-D preset) to train a 3-D "
                             "model")
        return TrainPlan(2)
    if sharp is None:
        return _plan_3d(psf.z_step_um, psf.pixel_size_um)
    if len(sharp.shape) not in (3, 4):
        raise ValueError(f"the PSF model is 3-D: it simulates z-stacks, and {sharp.name!r} has shape {sharp.shape}: "
                         "pick a sharp (Z, Y, X) layer, or train on the built-in specimens (a measured PSF model)")
    if sharp.z_step_um is not None and not _same_step(sharp.z_step_um, psf.z_step_um):
        raise ValueError(f"{sharp.name!r} has a z-step of {sharp.z_step_um:g} µm but the 3-D PSF model "
                         f"{psf.z_step_um:g} µm: pick a layer of its z-step, or correct the layer's z scale")
    return _plan_3d(psf.z_step_um, psf.pixel_size_um or sharp.pixel_um)


def scored_as_volumes(layers: Sequence[LayerAxes], model_ndim: int | None = None) -> bool:
    """Whether the Evaluate tab scores ``layers`` as volumes (by depth too, the error map a volume): (..., Z, Y, X)
    layers that are z-stacks (:attr:`LayerAxes.is_zstack`), or any of three or more axes with a 3-D model."""
    if any(len(a.shape) < 3 for a in layers):
        return False
    return model_ndim == 3 or any(a.is_zstack for a in layers)
