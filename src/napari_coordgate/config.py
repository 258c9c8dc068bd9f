"""Validated configuration objects.

Each config is a frozen dataclass whose fields carry their bounds or allowed values. Constructing one
validates it, ``from_dict`` rejects unknown keys, and ``to_dict``/``from_dict`` (and the JSON variants)
round-trip exactly, so a config can be saved beside the weights it describes and rebuilt later.

This module is pure Python: no numpy, torch or Qt.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar

__all__ = ["ConfigError", "Config", "ModelConfig", "TrainConfig", "PredictConfig", "CalibrateConfig", "AdaptConfig",
           "FieldSpec",
           "field_specs", "bounded", "choice", "device_choice", "parse_roi", "GATES", "GATE_ACTIVATIONS", "PREFILTERS",
           "DEVICES", "PRECISIONS", "CALIBRATION_MODELS", "CALIBRATION_TARGETS", "BEAD_LIMITS_NM", "z_pool_start_for"]


class ConfigError(ValueError):
    """A configuration value is missing, of the wrong type, out of range or unknown."""


def bounded(default, lo=None, hi=None, *, kind=None, doc="", step=None):
    """A dataclass field with inclusive numeric bounds (``None`` = unbounded on that side).

    A default of None makes the value optional ("not given": None is then valid too); ``kind`` must say its type.
    ``step`` is the increment a form's spin box offers (default: from the default value).
    """
    if default is None and kind is None:
        raise TypeError("an optional field (default None) needs its kind")
    kind = kind or type(default)
    return field(default=default, metadata={"lo": lo, "hi": hi, "kind": kind, "doc": doc, "step": step})


def choice(default, options, *, doc=""):
    """A dataclass field restricted to one of ``options``."""
    return field(default=default, metadata={"options": tuple(options), "kind": type(default), "doc": doc})


def device_choice(default: str = "auto", *, doc: str = ""):
    """A device field: one of :data:`DEVICES`, or ``cuda:N`` for the N-th CUDA GPU."""
    return field(default=default, metadata={"options": DEVICES, "kind": str, "device": True, "doc": doc or
                 "auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N (the N-th GPU) or mps"})


@dataclass(frozen=True)
class FieldSpec:
    """What a form or a command line needs to offer one config field: the config is its single source."""

    name: str
    kind: type
    default: Any
    lo: Any = None
    hi: Any = None
    options: tuple | None = None
    doc: str = ""
    device: bool = False  # options plus cuda:N
    step: Any = None  # the increment a form offers (None: from the default)

    @property
    def optional(self) -> bool:
        """None is a valid value ("not given"): the field's default is None."""
        return self.default is None

    @property
    def help(self) -> str:
        """The field's help line: its doc, range or choices, and default."""
        parts = [self.doc] if self.doc else []
        if self.options is not None and not self.device:
            parts.append("one of " + ", ".join(self.options))
        elif self.lo is not None or self.hi is not None:
            parts.append(f"{'-inf' if self.lo is None else self.lo} to {'inf' if self.hi is None else self.hi}")
        parts.append("not given by default" if self.optional else f"default {self.default}")
        return "; ".join(parts)


def field_specs(cls: type, names: "tuple[str, ...] | list[str] | None" = None) -> list[FieldSpec]:
    """The :class:`FieldSpec` of each field of config class ``cls`` (all, or those ``names`` in that order)."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [n for n in (names or ()) if n not in fields]
    if unknown:
        raise KeyError(f"{cls.__name__} has no field(s) {', '.join(unknown)}")
    out = []
    for name in names or list(fields):
        f = fields[name]
        meta = f.metadata
        out.append(FieldSpec(name, meta.get("kind", type(f.default)), f.default, meta.get("lo"), meta.get("hi"),
                             meta.get("options"), meta.get("doc", ""), bool(meta.get("device")), meta.get("step")))
    return out


def parse_roi(text: "str | None") -> "tuple[int, int] | None":
    """A camera ROI's place in the training field from ``"Y,X"`` (spaces allowed); None for empty text."""
    if text is None or not str(text).strip():
        return None
    parts = str(text).replace(" ", "").split(",")
    if len(parts) != 2 or not all(p.isdigit() for p in parts):
        raise ConfigError(f"an ROI is two non-negative integers 'Y,X' (pixels of the training field), got {text!r}")
    return int(parts[0]), int(parts[1])


def _check_value(cls_name: str, f: dataclasses.Field, value: Any) -> Any:
    meta = f.metadata
    kind = meta.get("kind")
    where = f"{cls_name}.{f.name}"
    if kind is None or (value is None and f.default is None):  # an optional field left out
        return value
    if kind is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}")
        return value
    if kind in (int, float):
        # bool is an int subclass; a True depth would be a silent mistake
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} must be a number, got {value!r}")
        if kind is int:
            if isinstance(value, float):
                if not value.is_integer():
                    raise ConfigError(f"{where} must be an integer, got {value!r}")
                value = int(value)
        else:
            value = float(value)
            if value != value or value in (float("inf"), float("-inf")):
                raise ConfigError(f"{where} must be finite, got {value!r}")
        lo, hi = meta.get("lo"), meta.get("hi")
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            rng = f"[{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}]"
            raise ConfigError(f"{where} must be in {rng}, got {value!r}")
        return value
    if kind is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, got {value!r}")
        options = meta.get("options")
        if meta.get("device") and re.fullmatch(r"cuda:\d+", value):
            return value
        if options is not None and value not in options:
            raise ConfigError(f"{where} must be one of {', '.join(map(repr, options))}; got {value!r}")
        return value
    return value


@dataclass(frozen=True)
class Config:
    """Base class: validation on construction, strict dict/JSON round trip, schema version."""

    SCHEMA_VERSION: ClassVar[int] = 1
    KIND: ClassVar[str] = "config"

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = _check_value(type(self).__name__, f, getattr(self, f.name))
            object.__setattr__(self, f.name, value)
        self._validate()

    def _validate(self) -> None:
        """Cross-field checks; subclasses override."""

    def replace(self, **changes: Any):
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.KIND, "schema_version": self.SCHEMA_VERSION}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        if not isinstance(data, dict):
            raise ConfigError(f"{cls.__name__} expects a JSON object, got {type(data).__name__}")
        data = dict(data)
        kind = data.pop("kind", cls.KIND)
        if kind != cls.KIND:
            raise ConfigError(f"expected a {cls.KIND!r} config, got kind {kind!r}")
        version = data.pop("schema_version", cls.SCHEMA_VERSION)
        if version != cls.SCHEMA_VERSION:
            raise ConfigError(
                f"{cls.__name__} schema version {version!r} is not supported "
                f"(this version of napari-coordgate reads version {cls.SCHEMA_VERSION})"
            )
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(
                f"unknown key(s) for {cls.__name__}: {', '.join(unknown)}; allowed: {', '.join(sorted(names))}"
            )
        kwargs = {}
        for f in dataclasses.fields(cls):
            if f.name in data:
                value = data[f.name]
                if isinstance(f.default, tuple) and isinstance(value, list):
                    value = tuple(value)
                kwargs[f.name] = value
        return cls(**kwargs)

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, sort_keys=True)

    @classmethod
    def from_json(cls, text: str):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"invalid JSON for {cls.__name__}: {exc}") from None
        return cls.from_dict(data)


DEVICES = ("auto", "cpu", "cuda", "mps")
PRECISIONS = ("fp32", "bf16", "fp16")
GATES = ("none", "coordgate", "coordconv")
GATE_ACTIVATIONS = ("one_plus", "sigmoid", "relu", "raw")
PREFILTERS = ("none", "wiener")


@dataclass(frozen=True)
class ModelConfig(Config):
    """Everything needed to build a network; the network is built from this alone.

    depth is the number of resolution levels (``depth - 1`` poolings); channels at level ``l`` are
    ``round(channels * growth**l)``.

    ``ndim = 3`` builds the network for z-stacks (3x3x3 convolutions); its gates still read the (y, x) field
    position only. Poolings are numbered from 1 (pooling ``l`` leads to level ``l``); pooling ``l`` halves z too
    when ``l >= z_pool_start``, so ``z_pool_start = 1`` pools isotropically and ``z_pool_start >= depth`` never
    pools z (for a z-step much coarser than the pixel; :func:`z_pool_start_for` derives it from the two).
    """

    KIND: ClassVar[str] = "model"

    depth: int = bounded(2, 1, 8, doc="resolution levels; depth - 1 poolings")
    channels: int = bounded(16, 1, 512, doc="feature channels at full resolution")
    growth: float = bounded(2.0, 1.0, 4.0, doc="channel multiplier per level")
    gate: str = choice("coordgate", GATES, doc="position dependence of the network")
    gate_hidden: int = bounded(32, 1, 1024, doc="width of the coordinate MLP's hidden layers")
    gate_layers: int = bounded(2, 1, 8, doc="number of layers of the coordinate MLP")
    gate_activation: str = choice("one_plus", GATE_ACTIVATIONS, doc="how MLP output becomes the gate")
    residual: bool = bounded(True, doc="predict a correction added to the input")
    prefilter: str = choice(
        "none", PREFILTERS,
        doc="first stage: wiener = fixed Wiener filters for PSFs across the field (needs the PSF model)",
    )
    prefilter_grid: int = bounded(3, 1, 7, doc="Wiener filters for the PSFs on a K x K grid of the field")
    prefilter_size: int = bounded(49, 3, 255, doc="Wiener filter side in pixels (odd)")
    prefilter_balance: float = bounded(0.02, 1e-6, 100.0, doc="Wiener regularisation (Laplacian) weight")
    in_channels: int = bounded(1, 1, 16)
    out_channels: int = bounded(1, 1, 16)
    ndim: int = bounded(2, 2, 3, doc="2 = images, plane by plane; 3 = z-stacks: 3-D convolutions, gates from the "
                                     "(y, x) field position")
    z_pool_start: int = bounded(1, 1, 8, doc="3-D: pooling l (1 = the first) halves z too only from this pooling "
                                             "on; 1 = isotropic, depth or more = never pools z")

    def _validate(self) -> None:
        if self.ndim == 3 and self.prefilter != "none":
            raise ConfigError("ModelConfig: the Wiener first stage is 2-D only (its filters are planar PSFs); use "
                              "prefilter='none' for a 3-D model")
        if self.ndim == 3 and self.gate == "coordconv":
            raise ConfigError("ModelConfig: CoordConv is 2-D only (its coordinate channels are planar); use "
                              "gate='coordgate' or 'none' for a 3-D model")
        if self.ndim == 2 and self.z_pool_start != 1:
            raise ConfigError(f"ModelConfig.z_pool_start applies to 3-D models only (ndim=3); leave it at 1 for a "
                              f"2-D model, got {self.z_pool_start}")
        if self.prefilter_size % 2 == 0:
            raise ConfigError(f"ModelConfig.prefilter_size must be odd, got {self.prefilter_size}")
        if self.residual and self.in_channels != self.out_channels:
            raise ConfigError(
                "ModelConfig.residual needs in_channels == out_channels "
                f"(got {self.in_channels} and {self.out_channels})"
            )

    def level_channels(self) -> list[int]:
        """Feature channels at each resolution level."""
        return [max(1, int(round(self.channels * self.growth**level))) for level in range(self.depth)]

    @property
    def prefilter_channels(self) -> int:
        """Channels the Wiener first stage adds per input channel (0 without one)."""
        return self.prefilter_grid**2 if self.prefilter != "none" else 0

    @property
    def min_size(self) -> int:
        """Smallest image side the network accepts (the coarsest level keeps at least one pixel)."""
        return 2 ** (self.depth - 1)

    def to_dict(self) -> dict[str, Any]:
        """As :meth:`Config.to_dict`; a 2-D config leaves out the 3-D fields, so 2-D model files and the
        fingerprints of checkpoints written before 3-D models existed stay as they were."""
        out = super().to_dict()
        if self.ndim == 2:
            for name in ("ndim", "z_pool_start"):
                out.pop(name)
        return out

    def pools_z(self, pooling: int) -> bool:
        """Whether pooling ``pooling`` (1 to ``depth - 1``; pooling ``l`` leads to level ``l``) halves z too."""
        return self.ndim == 3 and pooling >= self.z_pool_start

    @property
    def z_poolings(self) -> int:
        """Number of poolings that halve z (0 for a 2-D model)."""
        return sum(self.pools_z(p) for p in range(1, self.depth))

    @property
    def min_depth(self) -> int:
        """Smallest z extent (planes) a 3-D network accepts, ``2**z_poolings``; 1 for a 2-D model."""
        return 2**self.z_poolings


def z_pool_start_for(z_step: float, pixel_size: float) -> int:
    """The :attr:`ModelConfig.z_pool_start` for z-stacks whose planes are ``z_step`` apart, with pixels of
    ``pixel_size`` (the same unit): z is pooled only once the xy pooling has coarsened the pixel to the z-step,
    ``1 + round(log2(max(1, z_step / pixel_size)))`` (1 = isotropic), capped at the field's maximum, 8.

    >>> z_pool_start_for(0.1, 0.1), z_pool_start_for(0.4, 0.1), z_pool_start_for(0.05, 0.1)
    (1, 3, 1)
    """
    for name, v in (("z_step", z_step), ("pixel_size", pixel_size)):
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v) or v <= 0:
            raise ConfigError(f"z_pool_start_for: {name} must be a positive number, got {v!r}")
    return min(8, 1 + int(round(math.log2(max(1.0, z_step / pixel_size)))))


LOSSES = ("l1", "l2")
SCHEDULES = ("cosine", "plateau", "constant")
INTENSITY_MODES = ("per_image", "fixed")


@dataclass(frozen=True)
class TrainConfig(Config):
    """How to train: crops, optimiser, budget, device. Saved in checkpoints and the model's provenance.

    The budget is ``epochs`` when > 0, otherwise ``minutes`` of wall time; an epoch is ``steps_per_epoch``
    optimiser steps followed by a validation.
    """

    KIND: ClassVar[str] = "train"

    crop: int = bounded(128, 16, 4096, doc="training crop side in pixels (aligned to the pooling grid)")
    crop_depth: int = bounded(16, 1, 1024, doc="3-D models: training crop depth in planes (aligned to the z "
                                               "pooling grid)")
    batch: int = bounded(8, 1, 512, doc="crops per optimiser step")
    # cover + gate_lr_scale 10: the recipe measured best in benchmarks/README.md (edge ring +2 dB at 600 steps)
    sampling: str = choice("cover", ("uniform", "cover"),
                           doc="crop offsets: uniform, or cover (crop centres uniform: the field's border is seen "
                               "as often as a crop reaches it)")
    # L2 and 3e-3 measured best in benchmarks/README.md (L1's sign gradients are noise on dark backgrounds)
    lr: float = bounded(3e-3, 1e-6, 1.0, doc="Adam learning rate")
    loss: str = choice("l2", LOSSES)
    # None: 10 for 2-D models (the recipe), 1 for 3-D ones: at 10 a 3-D CoordGate U-Net(2) froze within its first
    # 100 steps, its output its input (benchmarks/README.md, 3-D section); 1 alone did not stop it for every PSF model
    # (hence grad_clip)
    gate_lr_scale: float | None = bounded(None, 0.01, 100.0, kind=float,
                                          doc="learning-rate multiplier of the coordinate MLPs (default 10 for 2-D "
                                              "models, 1 for 3-D)")
    # None: 1 for 3-D models, off for 2-D ones: without it 3-D CoordGate runs stalled at their input from the first
    # epochs (all units dead) on some seeds and PSF models (benchmarks/README.md, 3-D section); with it and gates at 1x,
    # bench_3d's seed 1 still froze (stop 43), where gates at 10x (clipped) trained: the cure is not known yet
    grad_clip: float | None = bounded(None, 0.0, 1e6, kind=float,
                                      doc="clip the gradient's norm to this before each step; 0 = off (default 1 "
                                          "for 3-D models, off for 2-D)")
    schedule: str = choice("cosine", SCHEDULES)
    epochs: int = bounded(0, 0, 1_000_000, doc="budget in epochs; 0 = use minutes")
    minutes: float = bounded(10.0, 0.0, 100_000.0, doc="budget in wall minutes when epochs is 0")
    steps_per_epoch: int = bounded(50, 1, 1_000_000, doc="optimiser steps between validations")
    patience: int = bounded(0, 0, 100_000, doc="early stop after this many epochs without gain; 0 = off")
    seed: int = bounded(0, 0, 2**31 - 1, doc="random seed (crops, noise, initial weights)")
    device: str = device_choice()
    # benchmarks/bench_threads.py: on an idle 2-core machine 2 threads beat 1 (1.3-1.6x for plain U-Net(2));
    # with another busy process on the cores 1 thread was faster, so the choice stays the user's (--threads)
    threads: int = bounded(0, 0, 1024, doc="torch CPU threads; 0 = leave torch's default")
    amp: bool = bounded(True, doc="bfloat16 autocast on CUDA and on CPUs with AVX512-BF16/AMX (2x on those CPUs)")
    val_tile: int = bounded(32, 8, 1024, doc="tile side of the validation checkerboard (single pair)")
    register: bool = bounded(False, doc="register misaligned calibration pairs instead of warning")
    photons: float = bounded(1000.0, 1.0, 1e9, doc="photon budget of simulated pairs (PSF source)")
    read_noise: float = bounded(2.0, 0.0, 1e6, doc="read noise (photo-electrons) of simulated pairs")
    brightness: float = bounded(1.0, 1.0, 1000.0, doc="scale half the training crop pairs, each by a random factor "
                                                      "up to this (log-uniform; 1 = off): objects brighter than "
                                                      "the training images (beads, puncta on a dark background)")
    intensity: str = choice("per_image", INTENSITY_MODES,
                            doc="intensity normalisation: per_image (each image's own background and range, so "
                                "camera offset and gain do not matter) or fixed (one offset and scale from the "
                                "training images, as model files of schema 1-2)")

    def _validate(self) -> None:
        if self.epochs == 0 and not self.minutes > 0:
            raise ConfigError("TrainConfig: give a budget: epochs > 0 or minutes > 0")

    def gate_lr_scale_for(self, ndim: int) -> float:
        """The coordinate MLPs' learning-rate multiplier for a model of ``ndim`` spatial axes: the one given, else
        10 in 2-D and 1 in 3-D."""
        if self.gate_lr_scale is not None:
            return float(self.gate_lr_scale)
        return 1.0 if ndim == 3 else 10.0

    def grad_clip_for(self, ndim: int) -> float:
        """The gradient-norm bound of a model of ``ndim`` spatial axes: the one given, else 1 in 3-D and none (0)
        in 2-D."""
        if self.grad_clip is not None:
            return float(self.grad_clip)
        return 1.0 if ndim == 3 else 0.0


@dataclass(frozen=True)
class AdaptConfig(Config):
    """How to adapt a model to the user's own blurred images (no sharp images): the budget and the recipe of
    :func:`napari_coordgate.engine.adapt`, the ``adapt`` command's flags and the Train tab's *Adapt* button.

    The loss is PSF consistency: the model's restoration of a re-corrupted image, blurred by the PSF model, must
    explain an independently re-corrupted copy (``alpha`` sets the split of the noise); the prior is the model's own
    weights (training starts from them at a small constant rate); the best state is chosen on held-out tiles by the
    same criterion, never by ground truth.
    """

    KIND: ClassVar[str] = "adapt"

    minutes: float = bounded(2.0, 0.0, 100_000.0, doc="budget in wall minutes when epochs is 0")
    epochs: int = bounded(0, 0, 1_000_000, doc="budget in epochs; 0 = use minutes")
    steps_per_epoch: int = bounded(25, 1, 1_000_000, doc="optimiser steps between checks on the held-out tiles")
    crop: int = bounded(128, 32, 4096, doc="crop side in pixels (the PSF's half-width at its border is not scored)")
    batch: int = bounded(4, 1, 512, doc="crops per optimiser step")
    lr: float = bounded(1e-3, 1e-7, 1.0, doc="Adam learning rate (constant)")
    alpha: float = bounded(0.5, 0.05, 5.0, doc="re-corruption split: the input gets alpha x noise, the target "
                                               "1/alpha x (independent of each other)")
    whiten: float = bounded(0.1, 0.0, 1e6, doc="balance of the whitening filter 1 / (|OTF|^2 + whiten) the "
                                                "residual is compared through; 0 = compare blurred images")
    transfer: float = bounded(0.5, 0.0, 1.0, doc="share of each batch made of pseudo-sharp pairs: the model's "
                              "restoration of the field's sharpest region, blurred by the PSF model at other places "
                              "and re-noised; 0 = PSF consistency alone")
    val_tile: int = bounded(32, 8, 1024, doc="tile side of the held-out checkerboard")
    seed: int = bounded(0, 0, 2**31 - 1, doc="random seed (crops, re-corruption)")
    device: str = device_choice()
    threads: int = bounded(0, 0, 1024, doc="torch CPU threads; 0 = leave torch's default")
    gain: float | None = bounded(None, 1e-9, 1e9, kind=float,
                                 doc="camera gain, image units per photo-electron (with offset; measured from the "
                                     "images when not given)")
    offset: float | None = bounded(None, -1e9, 1e9, kind=float, doc="camera offset, image units (with gain)")

    def _validate(self) -> None:
        if self.epochs == 0 and not self.minutes > 0:
            raise ConfigError("AdaptConfig: give a budget: epochs > 0 or minutes > 0")
        if (self.gain is None) != (self.offset is None):
            raise ConfigError("AdaptConfig: give the camera's gain and offset together, or neither (the noise is "
                              "then measured from the images)")


@dataclass(frozen=True)
class PredictConfig(Config):
    """How to apply a model: tiling, device, precision. The CLI's apply flags and the Apply tab come from it."""

    KIND: ClassVar[str] = "predict"

    tile: int = bounded(0, 0, 1 << 16, doc="tile core side in pixels; 0 = chosen from a memory budget")
    device: str = device_choice()
    precision: str = choice("fp32", PRECISIONS, doc="fp32; bf16 (2x faster on CPUs with AVX512-BF16/AMX); fp16 (CUDA)")
    batch_tiles: int = bounded(1, 1, 1024, doc="tiles of equal shape run as one batch (helps on a GPU)")
    binning: int = bounded(1, 1, 64, doc="camera binning of the images relative to the training field")
    threads: int = bounded(0, 0, 1024, doc="torch CPU threads; 0 = leave torch's default")
    resample_z: bool = bounded(False, doc="3-D models: restore volumes of another z-step resampled to the model's "
                                          "(linear interpolation) and back, instead of refusing them")

    def predict_kwargs(self) -> dict:
        """``engine.predict``'s keyword arguments (a tile of 0 = chosen from the memory budget)."""
        return {"tile": self.tile or None, "binning": self.binning, "device": self.device,
                "precision": self.precision, "batch_tiles": self.batch_tiles, "resample_z": self.resample_z}


CALIBRATION_MODELS = ("auto", "pupil", "grid")
CALIBRATION_TARGETS = ("auto", "beads", "array")
#: the bead diameters (nm) calibration accepts, from 0 (a point) to 5 µm (optics.bead takes them from here)
BEAD_LIMITS_NM = (0.0, 5000.0)


@dataclass(frozen=True)
class CalibrateConfig(Config):
    """How to calibrate a microscope from bead images: the keyword arguments of
    :func:`napari_coordgate.calibration.calibrate.calibrate`, with their units fixed here.

    Units: ``wavelength_nm`` and ``bead_diameter_nm`` in nanometres, ``pixel_size_um`` in micrometres (the camera
    pixel in the specimen plane). A field left at None is not given: ``grid`` and ``psf_size`` are then chosen from
    the beads, and the optics (``na``, ``wavelength_nm``, ``immersion``, ``pixel_size_um``) are unknown; the pupil
    model needs all four, the pixel size may also come from the image's metadata. The ``calibrate`` command's flags
    and the dock's Calibrate form are generated from these fields.
    """

    KIND: ClassVar[str] = "calibrate"

    model: str = choice("auto", CALIBRATION_MODELS,
                        doc="PSF model; auto: the pupil model (needs the optics) or the measured grid, whichever "
                            "predicts held-out beads better")
    target: str = choice("auto", CALIBRATION_TARGETS,
                         doc="what the image shows: beads, or a point array (pinholes, nanoholes, a scanned spot "
                             "array: every lattice site modelled jointly, for spots that nearly touch); auto: a dense "
                             "point array is measured as an array, anything else as beads")
    grid: int | None = bounded(None, 1, 25, kind=int, doc="K of the measured K x K PSF grid (chosen from the bead "
                                                          "count when not given)")
    na: float | None = bounded(None, 0.01, 1.7, kind=float, step=0.05, doc="numerical aperture (pupil model)")
    wavelength_nm: float | None = bounded(None, 200.0, 2000.0, kind=float, step=1.0,
                                          doc="emission wavelength in nm, in vacuum (pupil model)")
    immersion: float | None = bounded(None, 1.0, 3.0, kind=float, step=0.001,
                                      doc="refractive index of the immersion medium (pupil model)")
    pixel_size_um: float | None = bounded(None, 0.0001, 100.0, kind=float, step=0.001,
                                          doc="pixel size in the specimen plane, µm (from the image's metadata "
                                              "when not given)")
    psf_size: int | None = bounded(None, 7, None, kind=int, step=2,
                                   doc="PSF side in pixels, odd (from the widest beads when not given)")
    min_snr: float = bounded(5.0, 0.0, 1000.0, step=0.5, doc="beads whose peak is below this many times the "
                                                             "background noise are rejected as too faint")
    bead_diameter_nm: float = bounded(0.0, *BEAD_LIMITS_NM, step=10.0,
                                      doc="bead diameter in nm, removed from the measured PSFs (needs the pixel "
                                          "size); 0 = point sources")
    holdout: float = bounded(0.0, 0.0, 0.5, step=0.05,
                             doc="fraction of the usable beads kept out of every fit and listed in the JSON report, "
                                 "to check the model without ground truth (evaluate --holdout-from)")
    device: str = device_choice(doc="device of the pupil fit: auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or "
                                    "mps")

    def _validate(self) -> None:
        if self.psf_size is not None and self.psf_size % 2 == 0:
            raise ConfigError(f"CalibrateConfig.psf_size must be odd (a PSF has a centre pixel), got {self.psf_size}")
        if self.na is not None and self.immersion is not None and self.na >= self.immersion:
            raise ConfigError(f"CalibrateConfig.na ({self.na:g}) must be smaller than the immersion index "
                              f"({self.immersion:g})")

    def calibrate_kwargs(self) -> dict[str, Any]:
        """``calibrate()``'s keyword arguments: the wavelength in µm (``wavelength_um``), a bead diameter of 0 as
        None (point sources), everything else as it is."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        nm = out.pop("wavelength_nm")
        out["wavelength_um"] = None if nm is None else nm / 1000.0
        out["bead_diameter_nm"] = self.bead_diameter_nm or None
        return out

    @classmethod
    def from_calibrate_kwargs(cls, **kwargs: Any) -> "CalibrateConfig":
        """The config of ``calibrate()``'s keyword arguments (``wavelength_um`` in µm; a bead diameter of None is
        0; integer-valued numbers of any type, e.g. numpy's, are accepted): the inverse of
        :meth:`calibrate_kwargs`. Unknown keys and bad values raise :class:`ConfigError`."""
        values = {k: (int(v) if isinstance(v, numbers.Integral) and not isinstance(v, bool) else v)
                  for k, v in kwargs.items()}
        if "wavelength_um" in values:
            um = values.pop("wavelength_um")
            values["wavelength_nm"] = (round(um * 1000.0, 9) if isinstance(um, (int, float)) and not isinstance(
                um, bool) else um)
        if values.get("bead_diameter_nm", 0.0) is None:
            values["bead_diameter_nm"] = 0.0
        return cls.from_dict(values)
