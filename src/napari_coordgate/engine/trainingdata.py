"""What a run trains on: the sources, and the training-data object that owns the split, the normalisation, the
simulated noise and the crop sampling.

The stacks stay in host memory as they were given (a memory-mapped calibration stack stays memory-mapped): the
checks read one plane at a time, crops and validation windows are read and normalised on the fly, and only a
batch ever goes to the device.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..config import ModelConfig, TrainConfig
from ..data import (
    InputError,
    Normalization,
    as_planes,
    check_image,
    check_pairs,
    check_registration,
    checkerboard_mask,
    fit_normalization,
    float32,
    sample_offsets,
)

__all__ = ["PairSource", "SimulatedSource", "TrainingData", "Batch"]


@dataclass
class PairSource:
    """Calibration pairs: sharp and blurred images of the same field, (H, W) or (N, H, W); for a 3-D model
    volumes (D, H, W) or (N, D, H, W) and their ``z_step_um``.

    Any array that slices like numpy (a memory map...) is read plane by plane and crop by crop, never copied whole.
    ``psf`` optionally describes the optics (any :class:`~napari_coordgate.optics.psfmodel.PSFModel`, or a preset
    name, ``.json`` / ``.cgpsf`` path or dict); a model with a Wiener first stage (``ModelConfig.prefilter="wiener"``)
    needs it to build its filters.
    """

    sharp: Any
    blurred: Any
    psf: Any = None
    z_step_um: float | None = None  # z-stacks (a 3-D model): the distance between planes, µm


@dataclass
class SimulatedSource:
    """Sharp images plus a PSF model; blurred images are simulated, with fresh noise every epoch.

    ``val_sharp`` optionally holds sharp validation images of the same field shape, kept out of training (e.g.
    :func:`~napari_coordgate.samples.specimens.validation_fields`): then every ``sharp`` plane trains and only these
    validate, each with noise drawn once per run. Without them the last ``max(1, n // 8)`` planes of ``sharp`` are
    held out (see :class:`TrainingData`).
    """

    sharp: Any
    psf: Any  # PSFModel, preset name, .json / .cgpsf path or dict
    val_sharp: Any = None


@dataclass
class Batch:
    """One optimiser step's crops on the host: normalised float32 (B, 1, h, w), their field offsets (B, 2) and,
    for a single pair, the loss weights (B, 1, h, w; 0 on validation pixels); ``scale``: each crop's brightness
    factor (B, 1, 1, 1) where :attr:`TrainConfig.brightness <napari_coordgate.config.TrainConfig.brightness>` drew
    one (the loss divides it out, so a brighter crop weighs as much as any other)."""

    blurred: np.ndarray
    sharp: np.ndarray
    offsets: np.ndarray
    weight: np.ndarray | None
    scale: np.ndarray | None = None


#: the fraction of crops :func:`brighten` leaves at their own brightness, so the training images' range keeps its
#: weight (all crops brightened cost up to 1 dB of validation PSNR on ordinary specimens, benchmarks/README.md)
KEEP_BRIGHTNESS = 0.5


def brighten(batch: Batch, rng: np.random.Generator, brightness: float) -> Batch:
    """``batch`` with each crop pair multiplied by its own factor, log-uniform in [1, ``brightness``] for half of
    them (:data:`KEEP_BRIGHTNESS`), 1 for the others (nothing drawn for ``brightness`` 1). Blur and noise scale
    with the light, so a brighter pair is as true a pair, and the network learns objects brighter than the training
    images' range (a sparse bead slide's beads, normalised, reach 10-20)."""
    if not brightness > 1.0:
        return batch
    n = batch.blurred.shape[0]
    scale = np.exp(rng.uniform(0.0, np.log(brightness), n))
    scale = np.where(rng.random(n) < KEEP_BRIGHTNESS, 1.0, scale)
    scale = scale.astype(np.float32).reshape((n,) + (1,) * (batch.blurred.ndim - 1))
    return Batch(batch.blurred * scale, batch.sharp * scale, batch.offsets, batch.weight, scale)


def _psf_identity(psf) -> dict:
    """What identifies a PSF model in a fingerprint: its record's metadata and a digest of each of its arrays."""
    meta, arrays = psf.to_record()
    if not arrays:
        return meta
    digests = {}
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        digests[name] = f"{a.dtype.str}{a.shape}:" + hashlib.sha256(a).hexdigest()
    return {**meta, "arrays": digests}


def _check_psf_field(psf, shape) -> None:
    """A PSF model measured on a field (its provenance says which) describes images of that field only: smaller
    or larger images would squeeze or stretch its variation across the field."""
    field = (getattr(psf, "provenance", None) or {}).get("field_shape") if psf is not None else None
    if not field or tuple(int(s) for s in field) == tuple(int(s) for s in shape):
        return
    raise InputError(f"the PSF model was measured on a {int(field[0])} x {int(field[1])} field but these images are "
                     f"{int(shape[0])} x {int(shape[1])}: its PSFs would be squeezed onto them; train on whole "
                     "frames of the calibrated camera field")


# added to the run's noise seed for the noise of the planes held out apart, drawn once per run
_HELD_OUT_NOISE = 2**31


def _held_out_pairs(val_sharp, psf, field_shape, min_size: int) -> tuple[np.ndarray, np.ndarray]:
    """A :class:`SimulatedSource`'s validation planes and their clean blurred images, checked against the
    training planes' field."""
    from ..optics.blur import synthesize_pairs

    check_image(val_sharp, "val_sharp", max_ndim=3, min_size=min_size, allow_constant=False)
    if tuple(np.shape(val_sharp)[-2:]) != tuple(field_shape):
        h, w = np.shape(val_sharp)[-2:]
        raise InputError(f"the validation sharp images are {h} x {w} but the training ones {field_shape[0]} x "
                         f"{field_shape[1]}: validate on images of the training field")
    return tuple(as_planes(a) for a in synthesize_pairs(val_sharp, psf))


def _crop_size(train_cfg: TrainConfig, field_shape: tuple[int, int], align: int) -> tuple[int, int]:
    """The training crop (h, w): the configured side, inside the field, on the pooling grid."""
    H, W = field_shape
    crop = min(train_cfg.crop, H - H % align if H >= align else H, W - W % align if W >= align else W)
    crop = max(align, crop - crop % align)
    return min(crop, H), min(crop, W)


class _RunData:
    """What the data of a 2-D run (:class:`TrainingData`: planes) and of a 3-D run
    (:class:`~.volumes.TrainingVolumes`: volumes) share: the split, each item's normalisation, normalised windows,
    the noise schedule of simulated pairs and the validation range. An item is a plane or a volume; subclasses read
    items and windows (``sharp_plane``, ``blurred_plane``) and draw noise (``_noise``)."""

    def _split(self, n: int, train_cfg: TrainConfig, held_out: int) -> None:
        """The held-out items (given apart, else the last eighth of several) or a checkerboard mask of one."""
        self.held_out = held_out
        n_val = held_out or (max(1, n // 8) if n >= 2 else 0)
        self.train_idx = np.arange(n - n_val)
        self.val_idx = np.arange(n - n_val, n) if n_val else np.arange(1)
        self.val_mask = None if n_val else checkerboard_mask(self.field_shape, train_cfg.val_tile)
        self._weight = None if n_val else (~self.val_mask).astype(np.float32)
        self.norm = Normalization()
        self._plane_norms: list[Normalization] = []  # each item's fixed map (per-image normalisation)
        self.noise_seed: int | None = None
        self._noisy = None  # this epoch's simulated blurred stack

    def norm_of(self, i: int) -> Normalization:
        """Item ``i``'s intensity map (sharp and blurred alike): the run's, or with per-image normalisation the
        one measured on the item's blurred input at the start of the run (kept, so validation stays comparable
        across epochs of fresh simulated noise)."""
        return self._plane_norms[i] if self._plane_norms else self.norm

    def input_window(self, i: int, window) -> np.ndarray:
        """The network's input: this epoch's blurred item ``i`` (or its ``window``), normalised."""
        return self.norm_of(i).apply(self.blurred_plane(i, window))

    def target_window(self, i: int, window=None) -> np.ndarray:
        """The network's target: sharp item ``i`` (or its ``window``), normalised as its input."""
        return self.norm_of(i).apply(self.sharp_plane(i, window))

    @property
    def simulated(self) -> bool:
        return self.simulated_from is not None

    def start(self, norm: Normalization, noise_seed: int | None) -> None:
        """Fix the normalisation and (simulated pairs) the noise seed, and draw epoch 0's noise."""
        self.norm, self.noise_seed, self._noisy = norm, noise_seed, None
        self.new_epoch(0)
        self._plane_norms = [norm.for_plane(self.blurred_plane(i)) for i in range(self.n)] if norm.per_image else []

    def new_epoch(self, epoch: int) -> None:
        """Simulated pairs get fresh noise every epoch; items held out apart get theirs once per run (from the run's
        noise seed), so every epoch validates on the same images."""
        if not self.simulated:
            return
        if not self.held_out:
            self._noisy = self._noise(self._clean, self.noise_seed + epoch)
            return
        nt = len(self.train_idx)
        if self._noisy is None:
            self._noisy = np.empty(self._clean.shape, np.float32)
            # the noise seed is below 2**31, so this seed is no epoch's (an epoch's is noise_seed + epoch)
            self._noisy[nt:] = self._noise(self._clean[nt:], self.noise_seed + _HELD_OUT_NOISE)
        self._noisy[:nt] = self._noise(self._clean[:nt], self.noise_seed + epoch)

    def val_range(self) -> float:
        """Data range of the normalised validation sharp items (the PSNR's peak)."""
        lo, hi = np.inf, -np.inf
        for i in self.val_idx:  # one item at a time
            item = self.target_window(int(i))
            lo, hi = min(lo, item.min()), max(hi, item.max())
        return float(np.float32(hi) - np.float32(lo))


class TrainingData(_RunData):
    """Validated calibration planes on the host and everything a run draws from them.

    Build with :meth:`from_source`. The split: the ``held_out`` planes given apart from the training ones (the
    last ``held_out`` of the stacks: a :class:`SimulatedSource`'s ``val_sharp``), else whole held-out planes when
    there are several pairs (the last ``max(1, n // 8)``), otherwise a sparse checkerboard of tiles of the single
    pair, masked out of the loss.
    """

    ndim = 2  # planes (TrainingVolumes: 3)
    z_step_um = None  # planes have no z-step

    def __init__(self, sharp, blurred, registered: dict[int, np.ndarray], *, simulated_from, known_psf,
                 model_cfg: ModelConfig, train_cfg: TrainConfig, held_out: int = 0):
        self.sharp, self._clean, self._registered = sharp, blurred, registered
        self.simulated_from, self.known_psf = simulated_from, known_psf
        self.model_cfg, self.train_cfg = model_cfg, train_cfg
        self.n, H, W = sharp.shape
        self.field_shape = (H, W)
        self.align = model_cfg.min_size
        self.crop = _crop_size(train_cfg, self.field_shape, self.align)
        self._split(self.n, train_cfg, held_out)

    @classmethod
    def from_source(cls, source, model_cfg: ModelConfig, train_cfg: TrainConfig) -> "TrainingData":
        """Check a :class:`PairSource` (plane by plane, registration included) or simulate the clean blurred
        stack of a :class:`SimulatedSource`; a clear :class:`InputError` for anything unusable."""
        from ..model_io import resolve_psf

        m = model_cfg.min_size
        if isinstance(source, PairSource):
            sharp, blurred = check_pairs(source.sharp, source.blurred, min_size=m)
            registered, _ = check_registration(sharp, blurred, correct=train_cfg.register)
            known = None if source.psf is None else resolve_psf(source.psf)
            _check_psf_field(known, sharp.shape[-2:])
            return cls(sharp, blurred, registered, simulated_from=None, known_psf=known, model_cfg=model_cfg,
                       train_cfg=train_cfg)
        if isinstance(source, SimulatedSource):
            from ..optics.blur import synthesize_pairs

            check_image(source.sharp, "sharp", max_ndim=3, min_size=m, allow_constant=False)
            psf = resolve_psf(source.psf)
            _check_psf_field(psf, np.shape(source.sharp)[-2:])
            sharp, clean = (as_planes(a) for a in synthesize_pairs(source.sharp, psf))
            if source.val_sharp is None:
                return cls(sharp, clean, {}, simulated_from=psf, known_psf=psf, model_cfg=model_cfg,
                           train_cfg=train_cfg)
            val_sharp, val_clean = _held_out_pairs(source.val_sharp, psf, sharp.shape[-2:], m)
            return cls(np.concatenate([sharp, val_sharp]), np.concatenate([clean, val_clean]), {},
                       simulated_from=psf, known_psf=psf, model_cfg=model_cfg, train_cfg=train_cfg,
                       held_out=len(val_sharp))
        raise TypeError(f"source must be a PairSource or SimulatedSource, got {type(source).__name__}")

    # -- the stacks, one plane or window at a time, as float32 ------------------------------------------------
    def sharp_plane(self, i: int, window=None) -> np.ndarray:
        """Sharp plane ``i`` (or its ``window`` (y0, y1, x0, x1)) as float32, in image units."""
        y0, y1, x0, x1 = window or (0, self.field_shape[0], 0, self.field_shape[1])
        return float32(self.sharp[i, y0:y1, x0:x1])

    def blurred_plane(self, i: int, window=None) -> np.ndarray:
        """This epoch's blurred plane ``i`` (registered, or with this epoch's noise) as float32, in image units."""
        y0, y1, x0, x1 = window or (0, self.field_shape[0], 0, self.field_shape[1])
        if self._noisy is not None:
            return self._noisy[i, y0:y1, x0:x1]
        if i in self._registered:
            return self._registered[i][y0:y1, x0:x1]
        return float32(self._clean[i, y0:y1, x0:x1])

    # -- normalisation and noise ------------------------------------------------------------------------------
    def fit_normalization(self) -> Normalization:
        """Fit the intensity normalisation on the training sharp planes (they are the first planes)."""
        return fit_normalization(self.sharp[: len(self.train_idx)], per_image=self.train_cfg.intensity == "per_image")

    def _noise(self, clean: np.ndarray, seed: int) -> np.ndarray:
        """Camera noise relative to each plane's peak, in image units."""
        from ..optics.blur import add_noise

        return add_noise(clean, photons=self.train_cfg.photons, read_noise=self.train_cfg.read_noise, seed=seed)

    # -- crops ------------------------------------------------------------------------------------------------
    def batch(self, rng: np.random.Generator) -> Batch:
        """One batch of random crops (planes drawn from the training planes, offsets on the pooling grid)."""
        cfg = self.train_cfg
        planes = rng.choice(self.train_idx, size=cfg.batch)
        offs = sample_offsets(rng, cfg.batch, self.field_shape, self.crop, self.align, cfg.sampling)
        windows = [(int(oy), int(oy) + self.crop[0], int(ox), int(ox) + self.crop[1]) for oy, ox in offs]
        x = np.stack([self.input_window(int(p), w) for p, w in zip(planes, windows)])
        y = np.stack([self.target_window(int(p), w) for p, w in zip(planes, windows)])
        weight = None
        if self._weight is not None:
            weight = np.stack([self._weight[y0:y1, x0:x1] for y0, y1, x0, x1 in windows])[:, None]
        return brighten(Batch(x[:, None], y[:, None], offs, weight), rng, cfg.brightness)

    # -- what the run trains on -------------------------------------------------------------------------------
    def fingerprint(self) -> dict:
        """A fingerprint (SHA-256) of the data and the model config, and a short description.

        Calibration pairs are hashed whole (shapes, every pixel of the checked sharp and (registered) blurred
        stacks as float32, about 1 s per GB, one plane at a time); simulated pairs by their sharp stack (held-out
        validation planes included, and how many they are), PSF model and noise settings. The budget, the seed and
        the rest of the recipe are not part of it: a resumed run may train longer.
        """
        cfg = self.train_cfg
        identity = {
            "model": self.model_cfg.to_dict(),
            "psf": None if self.known_psf is None else _psf_identity(self.known_psf),
            "noise": [cfg.photons, cfg.read_noise] if self.simulated else None,
        }
        if self.held_out:  # only then: runs without held-out planes keep the fingerprints their checkpoints hold
            identity["held_out"] = self.held_out
        digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode())
        stacks = [self.sharp_plane] if self.simulated else [self.sharp_plane, self._clean_plane]
        for plane in stacks:
            digest.update(f"{np.dtype(np.float32).str}{(self.n, *self.field_shape)}".encode())
            for i in range(self.n):
                digest.update(np.ascontiguousarray(plane(i)))
        n, (h, w) = self.n, self.field_shape
        held = f" (and {self.held_out} held-out validation plane(s))" if self.held_out else ""
        what = (f"{n - self.held_out} sharp plane(s) of {h}x{w}{held} blurred with" if self.simulated
                else f"{n} calibration pair(s) of {h}x{w}")
        if self.known_psf is not None:
            what += f"{'' if self.simulated else ' with'} PSF model '{self.known_psf.name}'"
        return {"fingerprint": digest.hexdigest(), "description": what}

    def _clean_plane(self, i: int) -> np.ndarray:
        return self._registered[i] if i in self._registered else float32(self._clean[i])
