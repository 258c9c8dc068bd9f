"""What a 3-D run trains on: z-stacks of pairs, or sharp volumes and a 3-D PSF model, and the crops drawn from them.

The 3-D counterpart of :class:`~.trainingdata.TrainingData`, with the same interface for the training loop: the
split (whole held-out volumes when there are several, else a checkerboard of (y, x) columns through the depth of
the single pair, masked out of the loss), the normalisation (each volume's own percentiles by default), fresh
simulated noise every epoch (the photon budget relative to each volume's brightest voxel) and random crops of
``crop_depth`` x ``crop`` x ``crop`` voxels that keep their (y, x) place in the field (the gates read it).
"""

from __future__ import annotations

import hashlib
import json

import numpy as np

from ..config import ModelConfig, TrainConfig
from ..data import (
    InputError,
    Normalization,
    check_image,
    fit_normalization,
    float32,
    sample_offsets,
)
from .trainingdata import (
    Batch,
    PairSource,
    SimulatedSource,
    _check_psf_field,
    _crop_size,
    _psf_identity,
    _RunData,
    brighten,
)

__all__ = ["TrainingVolumes"]


def _as_volumes(arr, name: str, model_cfg: ModelConfig) -> np.ndarray:
    """``arr`` as (N, D, H, W) (a (D, H, W) volume is one), checked without reading it whole."""
    shape = tuple(np.shape(arr))
    if len(shape) not in (3, 4):
        raise InputError(f"{name}: a 3-D model trains on (D, H, W) volumes or (N, D, H, W) stacks of them, got shape "
                         f"{shape}")
    vols = arr[None] if len(shape) == 3 else arr
    d = vols.shape[1]
    if d < model_cfg.min_depth:
        raise InputError(f"{name}: volumes of {d} plane(s) are thinner than the {model_cfg.min_depth} this 3-D "
                         "network needs")
    for i in range(vols.shape[0]):
        for z in range(d):  # plane by plane: a memory-mapped stack is never read whole
            check_image(vols[i, z], f"{name} volume {i} plane {z}", max_ndim=2, min_size=model_cfg.min_size)
        if _constant(vols[i]):
            raise InputError(f"{name} volume {i} is constant: it holds no structure to learn from")
    return vols


def _constant(vol) -> bool:
    lo = hi = None
    for plane in vol:
        p = float32(plane)
        lo = p.min() if lo is None else min(lo, p.min())
        hi = p.max() if hi is None else max(hi, p.max())
    return not hi > lo


def _z_step(source, psf) -> float:
    """The run's z-step: the 3-D PSF model's, or the pairs' (which must agree with a PSF model given beside)."""
    given = getattr(source, "z_step_um", None)
    model_step = None if psf is None else psf.z_step_um
    if model_step is not None and given is not None and abs(given / model_step - 1) > 0.02:
        raise InputError(f"the volumes' z-step is {given:g} µm but the PSF model's {model_step:g} µm")
    step = model_step if model_step is not None else given
    if step is None:
        raise InputError("a 3-D model needs the z-step of its volumes: give it (--z-step UM) or a 3-D PSF model")
    return float(step)


def _check_3d_psf(psf, what: str) -> None:
    if psf is not None and getattr(psf, "ndim", 2) != 3:
        raise InputError(f"{what} is a 2-D PSF model; a 3-D model needs a 3-D one (a pupil through focus or a grid "
                         "of 3-D PSFs measured from a bead z-stack)")


class TrainingVolumes(_RunData):
    """Validated volumes on the host and everything a 3-D run draws from them (see the module docstring).

    Build with :meth:`from_source`: a :class:`PairSource` of (D, H, W) or (N, D, H, W) stacks with ``z_step_um``,
    or a :class:`SimulatedSource` of sharp volumes and a 3-D PSF model.
    """

    ndim = 3

    def __init__(self, sharp, blurred, *, simulated_from, known_psf, model_cfg: ModelConfig, train_cfg: TrainConfig,
                 z_step_um: float, held_out: int = 0):
        self.sharp, self._clean = sharp, blurred
        self.simulated_from, self.known_psf = simulated_from, known_psf
        self.model_cfg, self.train_cfg, self.z_step_um = model_cfg, train_cfg, z_step_um
        self.n, D, H, W = sharp.shape
        self.volume_shape, self.field_shape = (D, H, W), (H, W)
        self.align, self.align_z = model_cfg.min_size, model_cfg.min_depth
        self.crop = _crop_size(train_cfg, self.field_shape, self.align)
        depth = min(train_cfg.crop_depth, D)
        self.crop_depth = max(self.align_z, depth - depth % self.align_z)
        self._split(self.n, train_cfg, held_out)  # one pair: (y, x) checkerboard columns through the whole depth

    @classmethod
    def from_source(cls, source, model_cfg: ModelConfig, train_cfg: TrainConfig) -> "TrainingVolumes":
        from ..model_io import resolve_psf

        if isinstance(source, PairSource):
            sharp = _as_volumes(source.sharp, "sharp", model_cfg)
            blurred = _as_volumes(source.blurred, "blurred", model_cfg)
            if sharp.shape != blurred.shape:
                raise InputError(f"sharp and blurred must have the same shape, got {sharp.shape} and {blurred.shape}")
            known = None if source.psf is None else resolve_psf(source.psf)
            _check_3d_psf(known, "the pairs' PSF model")
            _check_psf_field(known, sharp.shape[-2:])
            return cls(sharp, blurred, simulated_from=None, known_psf=known, model_cfg=model_cfg,
                       train_cfg=train_cfg, z_step_um=_z_step(source, known))
        if isinstance(source, SimulatedSource):
            psf = resolve_psf(source.psf)
            _check_3d_psf(psf, "the PSF model")
            sharp = _as_volumes(source.sharp, "sharp", model_cfg)
            _check_psf_field(psf, sharp.shape[-2:])
            held = 0
            if source.val_sharp is not None:
                val = _as_volumes(source.val_sharp, "val_sharp", model_cfg)
                if val.shape[1:] != sharp.shape[1:]:
                    raise InputError(f"the validation volumes are {val.shape[1:]} but the training ones "
                                     f"{sharp.shape[1:]}: validate on volumes of the training shape")
                sharp, held = np.concatenate([sharp, val]), len(val)
            clean = _blur_volumes(sharp, psf)
            return cls(np.asarray(sharp, np.float32), clean, simulated_from=psf, known_psf=psf, model_cfg=model_cfg,
                       train_cfg=train_cfg, z_step_um=_z_step(source, psf), held_out=held)
        raise TypeError(f"source must be a PairSource or SimulatedSource, got {type(source).__name__}")

    # -- volumes and windows as float32 -----------------------------------------------------------------------
    def _window(self, stack, i: int, window) -> np.ndarray:
        z0, z1, y0, y1, x0, x1 = window or (0, self.volume_shape[0], 0, self.field_shape[0], 0, self.field_shape[1])
        return float32(stack[i, z0:z1, y0:y1, x0:x1])

    def sharp_plane(self, i: int, window=None) -> np.ndarray:
        """Sharp volume ``i`` (or its ``window`` (z0, z1, y0, y1, x0, x1)) as float32 (the name is the 2-D one's)."""
        return self._window(self.sharp, i, window)

    def blurred_plane(self, i: int, window=None) -> np.ndarray:
        """This epoch's blurred volume ``i`` (or its ``window``) as float32."""
        return self._window(self._noisy if self._noisy is not None else self._clean, i, window)

    # -- normalisation and noise ------------------------------------------------------------------------------
    def fit_normalization(self) -> Normalization:
        """The intensity normalisation from the training sharp volumes (their planes, sampled)."""
        nt = len(self.train_idx)
        planes = self.sharp[:nt].reshape(-1, *self.field_shape)
        return fit_normalization(planes, per_image=self.train_cfg.intensity == "per_image")

    def _noise(self, clean: np.ndarray, seed: int) -> np.ndarray:
        """Camera noise with the photon budget at each volume's brightest voxel (out-of-focus planes stay dim)."""
        from ..optics.blur3d import add_volume_noise

        return add_volume_noise(clean, photons=self.train_cfg.photons, read_noise=self.train_cfg.read_noise,
                                seed=seed)

    # -- crops ------------------------------------------------------------------------------------------------
    def batch(self, rng: np.random.Generator) -> Batch:
        """One batch of random crops (B, 1, d, h, w), their (y, x) field offsets (B, 2) and, for one pair, the
        loss weights."""
        cfg = self.train_cfg
        vols = rng.choice(self.train_idx, size=cfg.batch)
        offs = sample_offsets(rng, cfg.batch, self.field_shape, self.crop, self.align, cfg.sampling)
        zs = rng.integers(0, (self.volume_shape[0] - self.crop_depth) // self.align_z + 1, size=cfg.batch)
        zs = zs * self.align_z
        windows = [(int(z), int(z) + self.crop_depth, int(oy), int(oy) + self.crop[0], int(ox), int(ox) + self.crop[1])
                   for z, (oy, ox) in zip(zs, offs)]
        x = np.stack([self.input_window(int(v), w) for v, w in zip(vols, windows)])
        y = np.stack([self.target_window(int(v), w) for v, w in zip(vols, windows)])
        weight = None
        if self._weight is not None:
            cols = np.stack([self._weight[w[2]:w[3], w[4]:w[5]] for w in windows])  # (B, h, w)
            weight = np.broadcast_to(cols[:, None, None], x[:, None].shape).copy()
        return brighten(Batch(x[:, None], y[:, None], offs, weight), rng, cfg.brightness)

    def fingerprint(self) -> dict:
        """As :meth:`TrainingData.fingerprint`, of the volumes (and the z-step)."""
        cfg = self.train_cfg
        identity = {
            "model": self.model_cfg.to_dict(),
            "psf": None if self.known_psf is None else _psf_identity(self.known_psf),
            "noise": [cfg.photons, cfg.read_noise] if self.simulated else None,
            "held_out": self.held_out, "z_step_um": self.z_step_um,
        }
        digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode())
        stacks = [self.sharp] if self.simulated else [self.sharp, self._clean]
        for stack in stacks:
            digest.update(f"{np.dtype(np.float32).str}{(self.n, *self.volume_shape)}".encode())
            for i in range(self.n):
                for z in range(self.volume_shape[0]):
                    digest.update(np.ascontiguousarray(float32(stack[i, z])))
        (d, h, w) = self.volume_shape
        what = (f"{self.n - self.held_out} sharp volume(s) of {d}x{h}x{w} blurred with PSF model "
                f"'{self.known_psf.name}'" if self.simulated else f"{self.n} volume pair(s) of {d}x{h}x{w}")
        return {"fingerprint": digest.hexdigest(), "description": what + f", z-step {self.z_step_um:g} µm"}


def _blur_volumes(sharp: np.ndarray, psf) -> np.ndarray:
    """The clean blurred volumes of sharp ones, one at a time (each one's minimum kept)."""
    from ..optics.blur3d import synthesize_pairs3d

    return np.stack([synthesize_pairs3d(vol, psf)[1] for vol in sharp])
