"""Adaptation: fine-tune a model on the user's own blurred images, with no sharp images (issue 23).

A model trained from a PSF model has learnt the microscope on built-in specimens, not on the user's samples. Here
it keeps learning on the very images to restore, with the PSF model it carries as the only teacher:

* **PSF consistency with re-corrupted pairs.** For a blurred image ``y`` with camera noise of variance ``v(y)``
  (:mod:`napari_coordgate.optics.noise`: measured from the images, or from the camera's gain and offset), draw
  ``g ~ N(0, v)`` and form ``y_in = y + alpha g`` and ``y_target = y - g / alpha``: their noises are independent,
  so the loss ``|B f(y_in) - y_target|^2 / v`` (``B``: the field-dependent blur of the PSF model at the crop's
  place in the field) is, up to a constant, the error of the re-blurred restoration against the noise-free image.
  The network cannot lower it by copying noise. The residual is compared after a whitening filter ``W`` with
  ``|W|^2 = 1 / (|H|^2 + whiten)`` (``H``: the transfer function of the PSF at the images' centre): a fixed linear
  filter leaves the noise independent of the restoration, so the loss stays unbiased, but ``W B`` is close to the
  identity wherever the optics pass signal, so the loss measures the restoration's error as an image error rather
  than a blurred one. Without it, the frequencies the blur attenuates receive gradients ``|H|^2`` times smaller and
  adaptation crawls (measured in ``benchmarks/bench_adapt.py``).
* **Pseudo-sharp pairs** (``transfer``, half of each batch by default). After every epoch the current model
  restores the planes; crops of the field's sharpest region (the smallest PSF area ``1 / sum(p^2)``) are blurred by
  the PSF model at a blurrier place, given the camera's noise, and the restoration must return the crop. Consistency
  alone leaves what the wide PSFs at the edge hide in nobody's loss; the pairs teach the edge the user's content.
* **The prior is what the model learnt**: training starts from its weights (and its normalisation), at a small
  constant learning rate, and stops at its best state.
* **Model selection without ground truth.** A sparse checkerboard of tiles is held out of the loss; after every
  epoch the same consistency criterion is measured there, on whole planes, with one fixed re-corruption. The best
  state by that criterion is kept; if no state beats the original model, the original is kept and the result says
  so.

Pixels within half a PSF of a crop side inside the frame are not scored (the light there came partly from outside
the crop); at the frame's own border the blur reflects the frame, as the PSF model's simulations do, so the edge of
the field, where the blur is worst, is trained and checked too. Crop centres are uniform over the frame.
"""

from __future__ import annotations

import copy
import math
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from ..config import AdaptConfig
from ..data import InputError, as_planes, check_image, checkerboard_mask, float32
from ..devices import resolve_device
from ..model_io import SavedModel, save_model
from .prediction import field_geometry, plan_tiles, predict_batch, tile_batches
from .run import Update

__all__ = ["adapt", "AdaptResult", "AdaptationData"]

_FIXED_SEED = 20231  # the held-out criterion's one re-corruption (the same for every state that is compared)
_MAX_BLURS = 256  # blur operators of crop positions kept (each holds the FFTs of a few PSFs)
_MIN_GAIN = 1e-3  # a state must lower the held-out criterion by this fraction to replace the original
# planes whose checkerboard tiles are held out (evenly spread through the stack): the criterion predicts these whole
# planes after every epoch, so a long stack costs no more to check than two planes; the others train on every pixel
_CRITERION_PLANES = 2
# pseudo-sharp sources: crops whose mean PSF area lies within this share of the way from the sharpest to the blurriest
SHARP_SHARE = 0.25


@dataclass
class AdaptResult:
    """The adapted model (or the original, when adaptation did not help by the held-out criterion)."""

    saved: SavedModel
    criterion_before: float  # held-out consistency of the original model (1 = noise level alone)
    criterion_best: float
    kept_original: bool
    noise: Any  # the NoiseModel used, in image units
    history: list[Update] = field(default_factory=list)
    stopped: str = "budget"  # "budget", "stopped" or "diverged"
    device: str = "cpu"
    steps: int = 0


def _check_model(saved: SavedModel, psf) -> Any:
    """The PSF model to adapt with: ``psf`` or the model's own; a clear error for models that cannot adapt."""
    from ..model_io import resolve_psf

    if getattr(saved.config, "ndim", 2) != 2:
        raise InputError("adaptation works on 2-D models only: a 3-D model cannot be adapted yet")
    if saved.config.in_channels != 1 or saved.config.out_channels != 1:
        raise InputError("adaptation needs a one-channel model (grey images in, grey images out)")
    if psf is not None:
        return resolve_psf(psf)
    if saved.psf is None:
        raise InputError("this model carries no PSF model (it was trained on calibration pairs only): give the PSF "
                         "model of its optics (--psf PRESET|CONFIG.json|MODEL.cgpsf) to adapt it")
    return saved.psf


class AdaptationData:
    """The user's blurred planes, normalised as the model reads them, with their noise, the held-out tiles, the
    blur of every crop position and the fixed re-corruption of the criterion."""

    def __init__(self, saved: SavedModel, images, cfg: AdaptConfig, psf, *, roi: Sequence[int] | None = None,
                 binning: int = 1, device="cpu"):
        from ..optics.noise import estimate_noise

        planes = as_planes(np.asarray(check_image(images, "images", max_ndim=3, min_size=saved.config.min_size,
                                                  allow_constant=False)))
        self.shape = tuple(int(s) for s in planes.shape[-2:])
        self.field, self.offset = field_geometry(self.shape, saved.field_shape, roi, binning)
        self.psf = psf.binned(binning) if binning > 1 else psf
        try:
            self.noise = estimate_noise(planes, cfg.gain, cfg.offset)
        except ValueError as exc:
            raise InputError(f"cannot measure the images' noise: {exc}") from None
        norms = [saved.normalization.for_plane(p) for p in planes]
        self.y = np.stack([n.apply(float32(p)) for n, p in zip(norms, planes)])
        self.var = np.stack([self.noise.scaled(n.offset, n.scale).variance(_smooth(p)) for n, p in
                             zip(norms, self.y)]).astype(np.float32)
        self.cfg = cfg
        self.pad = self.psf.psf_size // 2
        crop = min(cfg.crop, *self.shape)
        self.crop = max(saved.config.min_size, crop - crop % saved.config.min_size)
        if self.crop <= 2 * self.pad:
            raise InputError(f"images of {self.shape[0]} x {self.shape[1]} are too small to adapt on with PSFs of "
                             f"{self.psf.psf_size} px: each crop must be larger than a PSF")
        # the criterion re-blurs whole planes, so held-out tiles at the frame border are scored too
        self.held_out = checkerboard_mask(self.shape, cfg.val_tile)
        n = len(self.y)
        self.checked = np.unique(np.linspace(0, n - 1, min(n, _CRITERION_PLANES)).round().astype(int))
        self._train_weight = np.ones((n, *self.shape), np.float32)
        self._train_weight[self.checked] = ~self.held_out
        g = np.random.default_rng(_FIXED_SEED).standard_normal((len(self.checked), *self.shape)).astype(np.float32)
        g *= np.sqrt(self.var[self.checked])
        self.fixed_in = self.y[self.checked] + cfg.alpha * g
        self.fixed_target = self.y[self.checked] - g / cfg.alpha
        self._nodes = None
        self._blurs: OrderedDict = OrderedDict()
        self.device = resolve_device(device)
        centre = [(o + n / 2.0) / f * 2.0 - 1.0 for o, n, f in zip(self.offset, self.shape, self.field)]
        self._centre_psf = np.asarray(self.psf.psf_at(centre[0], centre[1], self.field), np.float64)
        self._filters: dict = {}
        # pseudo-sharp pairs: the noise of each plane in its normalised units, the crop offsets of the field's
        # sharpest region (the sources) and, refreshed every epoch, the model's restoration of the planes there
        self._plane_noise = [self.noise.scaled(n.offset, n.scale) for n in norms]
        self.sources = _sharp_offsets(_psf_area(self.psf, self.field, self.offset, self.shape), self.crop,
                                      self._grid()) if cfg.transfer > 0 else []
        self._source_set = set(self.sources)
        self.pseudo: np.ndarray | None = None
        self._restored: list[int] = []  # planes of ``pseudo`` restored so far (oldest refresh first)

    @property
    def _step(self) -> int:
        return max(self.crop // 4, 1)  # crops snap to every quarter crop, so their blurs are reused

    def _grid(self) -> list[list[int]]:
        """The offsets crops snap to along each axis (every quarter crop, and the last one: :meth:`crops`)."""
        step = self._step
        return [sorted({*range(0, n - self.crop + 1, step), n - self.crop}) for n in self.shape]

    def restore(self, model, stack: np.ndarray, device) -> np.ndarray:
        """The model's restoration of whole planes (n, H, W) of these images, tiled as ``predict`` tiles them."""
        tiles = plan_tiles(self.shape, model.cfg)
        out = np.empty(stack.shape, np.float32)
        was_training = model.training
        model.eval()
        for k in range(len(stack)):

            def read(window, k=k):
                y0, y1, x0, x1 = window
                return stack[k, y0:y1, x0:x1]

            for group in tile_batches(tiles, 1):
                for (y0, y1, x0, x1), pred in predict_batch(model, read, tiles, group, self.offset, self.field,
                                                            device):
                    out[k, y0:y1, x0:x1] = pred
        model.train(was_training)
        return out

    def refresh(self, model, device) -> None:
        """Restore planes with the current model: the pseudo-sharp sources of the next epoch. At most as many pixels
        as half an epoch's crops are restored each time (whole planes, in turn, at least one), so the cost per epoch
        does not grow with the stack's length (about 7 % of an epoch on 8 x 512²: benchmarks/README.md)."""
        if not self.sources:
            return
        n = len(self.y)
        budget = self.cfg.steps_per_epoch * self.cfg.batch * self.crop**2 // 2
        count = min(n, max(1, budget // (self.shape[0] * self.shape[1])))
        if self.pseudo is None:
            self.pseudo = np.zeros_like(self.y)
        start = (self._restored[-1] + 1) % n if self._restored else 0
        planes = [(start + k) % n for k in range(count)]
        self.pseudo[planes] = self.restore(model, self.y[planes], device)
        self._restored = [i for i in self._restored if i not in planes] + planes

    def whiten(self, resid):
        """``resid`` (..., h, w) through the whitening filter (identity when ``AdaptConfig.whiten`` is 0)."""
        import torch

        if not self.cfg.whiten:
            return resid
        shape = tuple(int(n) for n in resid.shape[-2:])
        key = (shape, str(resid.device))
        if key not in self._filters:
            self._filters[key] = torch.from_numpy(_whitening(self._centre_psf, shape, self.cfg.whiten)).to(
                resid.device)
        return torch.fft.irfft2(torch.fft.rfft2(resid) * self._filters[key], s=shape)

    def blur(self, y0: int, x0: int, h: int, w: int):
        """The blur operator of an (h, w) window at (y0, x0) of the images (their place in the field added)."""
        from ..optics.blur import SpatiallyVaryingBlur
        from ..optics.measured import MeasuredGridPSF

        key = (y0, x0, h, w)
        if key in self._blurs:
            self._blurs.move_to_end(key)
            return self._blurs[key]
        if self._nodes is None:  # the node PSFs once: every operator then shares them
            self._nodes = MeasuredGridPSF(self.psf.psf_grid(self.field)[0], name=self.psf.name)
        op = SpatiallyVaryingBlur(self._nodes, (h, w), offset=(self.offset[0] + y0, self.offset[1] + x0),
                                  full_field=self.field, device=self.device)
        self._blurs[key] = op
        if len(self._blurs) > _MAX_BLURS:
            self._blurs.popitem(last=False)
        return op

    def crops(self, rng: np.random.Generator) -> tuple[list[tuple[int, int]], np.ndarray]:
        """A batch of (plane, crop offset) draws. The crop's centre is uniform over the frame and the crop clipped
        inside it, so the frame's border is in a crop as often as the centre is ("cover" sampling: the edge ring is
        where the field's blur is worst); offsets are snapped to a grid that includes the last one, so their blurs
        are reused."""
        planes = rng.integers(0, len(self.y), self.cfg.batch)
        return [self._offset(rng) for _ in planes], planes

    def _offset(self, rng: np.random.Generator) -> tuple[int, int]:
        step = self._step
        off = []
        for n in self.shape:
            start = float(np.clip(rng.uniform(0, n) - self.crop / 2, 0, n - self.crop))
            off.append(int(min(round(start / step) * step, n - self.crop)))
        return off[0], off[1]

    def _blurrier_offset(self, rng: np.random.Generator, off: tuple[int, int]) -> tuple[int, int]:
        """``off``, or where it lies among the sharpest crops (the sources) another cover draw outside them: a
        pseudo-sharp pair teaches the places blurrier than its source."""
        grid = self._grid()
        if len(self.sources) >= len(grid[0]) * len(grid[1]):
            return off  # the PSF hardly varies: every place is as sharp as the sources
        for _ in range(100):  # bounded: the cover draws may reach few places outside the sources
            if off not in self._source_set:
                break
            off = self._offset(rng)
        return off

    def scored_window(self, oy: int, ox: int) -> tuple[int, int, int, int]:
        """The part of a crop at (oy, ox) whose residual is scored: half a PSF in from a crop side inside the frame
        (light from outside the crop reached it), up to the frame's own border (where the blur reflects the frame,
        as the PSF model's simulations do)."""
        c, p = self.crop, self.pad
        h, w = self.shape
        return (p if oy > 0 else 0, c - p if oy + c < h else c, p if ox > 0 else 0, c - p if ox + c < w else c)

    def _consistency_item(self, i: int, oy: int, ox: int, rng) -> tuple:
        """A re-corrupted crop: (input, target of the re-blurred restoration, noise variance, weight)."""
        c, a = self.crop, self.cfg.alpha
        y = self.y[i, oy : oy + c, ox : ox + c]
        var = self.var[i, oy : oy + c, ox : ox + c]
        g = rng.standard_normal(y.shape).astype(np.float32) * np.sqrt(var)
        return y + a * g, y - g / a, var, self._train_weight[i, oy : oy + c, ox : ox + c]

    def _pseudo_item(self, i: int, oy: int, ox: int, rng) -> tuple:
        """A pseudo-sharp pair for the place (oy, ox): a crop of the restored sharpest region of plane ``i``
        blurred by the PSF model at (oy, ox), with the camera's noise: (input, target, noise variance, weight;
        the source's held-out pixels weigh 0)."""
        import torch

        c = self.crop
        if i not in self._restored:  # a long stack: the planes restored so far are the sources
            i = self._restored[int(rng.integers(len(self._restored)))]
        sy, sx = self.sources[int(rng.integers(len(self.sources)))]
        sharp = self.pseudo[i, sy : sy + c, sx : sx + c]
        with torch.no_grad():
            clean = self.blur(oy, ox, c, c).apply(torch.from_numpy(sharp).to(self.device)).cpu().numpy()
        var = np.asarray(self._plane_noise[i].variance(clean), np.float32)
        noisy = clean + rng.standard_normal(clean.shape).astype(np.float32) * np.sqrt(var)
        return noisy, sharp, var, self._train_weight[i, sy : sy + c, sx : sx + c]

    def loss(self, model, rng: np.random.Generator, device):
        """The loss of one batch of crops: PSF consistency of re-corrupted crops and, for a ``transfer`` share of
        the batch, pseudo-sharp pairs (held-out tiles and crop borders scored in neither)."""
        import torch

        offs, planes = self.crops(rng)
        c, a = self.crop, self.cfg.alpha
        n_pseudo = int(round(len(offs) * self.cfg.transfer)) if self.pseudo is not None else 0
        n_cons = len(offs) - n_pseudo
        offs[n_cons:] = [self._blurrier_offset(rng, o) for o in offs[n_cons:]]
        items = [(self._consistency_item if k < n_cons else self._pseudo_item)(int(i), oy, ox, rng)
                 for k, (i, (oy, ox)) in enumerate(zip(planes, offs))]
        x_in = torch.from_numpy(np.stack([it[0] for it in items])).to(device)
        field_off = torch.tensor([(self.offset[0] + oy, self.offset[1] + ox) for oy, ox in offs], device=device)
        out = model(x_in[:, None], offset=field_off, field_shape=self.field)[:, 0]
        total = 0.0
        for k, ((oy, ox), (_, target, var, weight)) in enumerate(zip(offs, items)):
            r0, r1, c0, c1 = self.scored_window(oy, ox)
            mask = torch.from_numpy(weight[r0:r1, c0:c1]).to(device)
            sd = torch.from_numpy(np.sqrt(var[r0:r1, c0:c1])).to(device)
            if k < n_cons:  # the re-blurred restoration against the re-corrupted target, through the whitening
                resid = self.blur(oy, ox, c, c).apply(out[k].float()) - torch.from_numpy(target).to(device)
                # held-out pixels are zeroed before the filter, so none of their residual reaches the loss
                scaled = self.whiten(resid[r0:r1, c0:c1] / sd * mask)
            else:  # the restoration against the pseudo-sharp crop itself, in units of the input's noise
                scaled = (out[k].float() - torch.from_numpy(target).to(device))[r0:r1, c0:c1] / sd
            total = total + (scaled.square() * mask).sum() / mask.sum().clamp_min(1.0)
        # the consistency target's own noise is var / alpha^2: scaled by alpha^2, a restoration that re-blurs to
        # the noise-free image scores about 1 (a little more: the input's noise passes the network); the pseudo-sharp
        # pairs' error weighs the same per unit of restoration error
        return total / len(offs) * a**2

    def criterion(self, model, device) -> float:
        """Held-out consistency on whole planes with the fixed re-corruption; 1 is the noise level alone
        (a restoration that, re-blurred, equals the noise-free image scores about 1)."""
        import torch

        restored = self.restore(model, self.fixed_in, device)
        full = self.blur(0, 0, *self.shape)
        total, count = 0.0, 0
        for k, i in enumerate(self.checked):
            with torch.no_grad():
                reblurred = full.apply(torch.from_numpy(restored[k]).to(self.device)).cpu().numpy()
            scaled = (reblurred - self.fixed_target[k]) / np.sqrt(self.var[i]) * self.held_out
            r2 = self.whiten(torch.from_numpy(scaled.astype(np.float32))).square().numpy()
            total += float(r2[self.held_out].sum())
            count += int(self.held_out.sum())
        a = self.cfg.alpha
        return total / max(count, 1) * a**2


def _psf_area(psf, field: tuple[int, int], offset: tuple[int, int], shape: tuple[int, int]) -> np.ndarray:
    """The PSF's effective area ``1 / sum(p^2)`` (pixels) at every pixel of the images, linear between the nodes
    of the PSF model's grid: small where the optics are sharp."""
    psfs, ys, xs = psf.psf_grid(field)
    p = psfs / psfs.sum(axis=(-2, -1), keepdims=True)
    area = 1.0 / np.square(p).sum(axis=(-2, -1))
    yn = (offset[0] + np.arange(shape[0]) + 0.5) / field[0] * 2.0 - 1.0
    xn = (offset[1] + np.arange(shape[1]) + 0.5) / field[1] * 2.0 - 1.0
    if len(ys) == 1:
        return np.full(shape, float(area[0, 0]))
    rows = np.stack([np.interp(xn, xs, a) for a in area])  # (K, W)
    return np.stack([np.interp(yn, ys, col) for col in rows.T], axis=1)  # (H, W)


def _sharp_offsets(area: np.ndarray, crop: int, grid: list[list[int]]) -> list[tuple[int, int]]:
    """Crop offsets on ``grid`` whose crop is among the sharpest of the images: a mean PSF area within a quarter
    of the way from the sharpest crop's to the blurriest's (every crop when the PSF hardly varies)."""
    means = {(oy, ox): float(area[oy : oy + crop, ox : ox + crop].mean()) for oy in grid[0] for ox in grid[1]}
    lo, hi = min(means.values()), max(means.values())
    return [o for o, m in means.items() if m <= lo + SHARP_SHARE * (hi - lo)]


def _whitening(psf: np.ndarray, shape: tuple[int, int], balance: float) -> np.ndarray:
    """``|W|`` on the rfft2 grid of ``shape``: ``1 / sqrt(|H|^2 + balance)`` for the PSF's transfer function ``H``,
    scaled so that white noise keeps its variance (mean ``|W|^2`` = 1)."""
    h, w = shape
    s = psf.shape[0]
    iy, ix = np.meshgrid((np.arange(s) - s // 2) % h, (np.arange(s) - s // 2) % w, indexing="ij")
    kernel = np.zeros((h, w), np.float64)
    np.add.at(kernel, (iy, ix), psf / psf.sum())  # centred on pixel (0, 0), wrapped: any frame size works
    inverse = 1.0 / (np.abs(np.fft.rfft2(kernel)) ** 2 + balance)
    return np.sqrt(inverse / inverse.mean()).astype(np.float32)


def _smooth(plane: np.ndarray) -> np.ndarray:
    """The local mean the noise variance is read at (a noisy pixel's own value would bias it)."""
    from scipy.ndimage import gaussian_filter

    return gaussian_filter(plane, 1.5, mode="reflect")


@dataclass
class _Progress:
    cfg: AdaptConfig
    device: Any
    on_update: Callable[[Update], None] | None
    history: list[Update]
    t0: float = field(default_factory=time.perf_counter)
    epoch: int = 0
    step: int = 0
    best: float | None = None
    before: float | None = None

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def fraction(self) -> float:
        if self.cfg.epochs > 0:
            return self.step / (self.cfg.steps_per_epoch * self.cfg.epochs)
        return self.elapsed() / (60.0 * self.cfg.minutes)

    def emit(self, kind: str, loss: float, val: float | None = None, message: str = "") -> None:
        # the criterion is reported in the PSNR slots as -10 log10: higher is better, like a validation PSNR
        def db(c):
            return None if c is None else -10.0 * math.log10(max(c, 1e-12))

        u = Update(kind, self.epoch, self.step, float(loss), db(val), db(self.best), self.elapsed(),
                   min(self.fraction(), 1.0), self.cfg.lr, str(self.device), message, db(self.before))
        self.history.append(u)
        if self.on_update is not None:
            self.on_update(u)


def _with_weights(saved: SavedModel, state: dict, provenance: dict) -> SavedModel:
    from ..nn.unet import build_model

    net = build_model(saved.config)
    net.load_state_dict(state)
    net.eval()
    return SavedModel(model=net, config=saved.config, field_shape=saved.field_shape,
                      normalization=saved.normalization, psf=saved.psf, provenance=provenance)


def _epoch(model, opt, data: AdaptationData, rng, prog: _Progress, should_stop, device) -> tuple[str | None, float]:
    """One epoch of steps: the reason to stop ("stopped", "diverged") or None to go on, and the epoch's mean loss."""
    cfg = data.cfg
    running, n = 0.0, 0
    for _ in range(cfg.steps_per_epoch):
        if should_stop is not None and should_stop():
            return "stopped", running / max(n, 1)
        if cfg.epochs == 0 and prog.fraction() >= 1.0:
            break
        loss = data.loss(model, rng, device)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        prog.step += 1
        value = float(loss.detach())
        if not math.isfinite(value):
            prog.emit("step", value, message=f"the loss became {value} at step {prog.step}")
            return "diverged", value
        running, n = running + value, n + 1
        if prog.step % 10 == 0 or prog.step == 1:
            prog.emit("step", running / n)
    return None, running / max(n, 1)


def adapt(
    saved: SavedModel,
    images,
    cfg: AdaptConfig | None = None,
    *,
    psf=None,
    roi: Sequence[int] | None = None,
    binning: int = 1,
    on_update: Callable[[Update], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    out_path=None,
) -> AdaptResult:
    """Adapt ``saved`` to the user's blurred ``images`` (H, W) or (N, H, W), in the camera's units.

    Parameters
    ----------
    saved
        The model to adapt (it must carry a PSF model, or give ``psf``).
    images
        The blurred images to restore, of the model's field (or a region of it at ``roi``, binned by ``binning``).
    cfg
        Budget and recipe (:class:`~napari_coordgate.config.AdaptConfig`); the camera's gain and offset there,
        or the noise is measured from the images.
    psf
        A PSF model (any form :func:`~napari_coordgate.model_io.resolve_psf` reads) instead of the model's own.
    on_update, should_stop
        Progress (:class:`Update`: the held-out criterion in the ``val_psnr`` slots as ``-10 log10``, so higher is
        better) and cancellation, checked every step; a stop keeps the best state so far.
    out_path
        Where the best model so far is written whenever it improves (the original if nothing beat it).

    Returns
    -------
    AdaptResult
    """
    import torch

    cfg = cfg or AdaptConfig()
    psf_model = _check_model(saved, psf)
    device = resolve_device(cfg.device)
    data = AdaptationData(saved, images, cfg, psf_model, roi=roi, binning=binning, device=device)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    model = copy.deepcopy(saved.model).to(device).train()
    prog = _Progress(cfg, device, on_update, [])
    prog.before = prog.best = data.criterion(model, device)
    best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    improved = False
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    stopped = "budget"
    while (prog.epoch < cfg.epochs) if cfg.epochs > 0 else prog.fraction() < 1.0:
        data.refresh(model, device)
        reason, mean_loss = _epoch(model, opt, data, rng, prog, should_stop, device)
        if reason in ("stopped", "diverged"):
            stopped = reason
            break
        prog.epoch += 1
        value = data.criterion(model, device)
        if value < prog.best and value < prog.before * (1.0 - _MIN_GAIN):
            prog.best, improved = value, True
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            if out_path is not None:
                save_model(out_path, _with_weights(saved, best_state, _provenance(saved, data, prog)))
        prog.emit("epoch", mean_loss, value)
    if out_path is not None and not improved:
        save_model(out_path, saved)
    result = saved if not improved else _with_weights(saved, best_state, _provenance(saved, data, prog))
    prog.emit("done", prog.history[-1].loss if prog.history else 0.0, prog.best, stopped)
    return AdaptResult(result, prog.before, prog.best, not improved, data.noise, prog.history, stopped,
                       str(device), prog.step)


def _provenance(saved: SavedModel, data: AdaptationData, prog: _Progress) -> dict:
    """The original model's provenance with this adaptation added (the recipe, the noise, the criterion)."""
    out = copy.deepcopy(saved.provenance)
    out.setdefault("adaptations", []).append({
        "planes": int(len(data.y)), "shape": list(data.shape), "roi": list(data.offset),
        "steps": int(prog.step), "seconds": round(prog.elapsed(), 1), "adapt_config": data.cfg.to_dict(),
        "noise": {"slope": data.noise.slope, "intercept": data.noise.intercept, "measured": data.noise.estimated},
        "criterion_before": prog.before, "criterion_best": prog.best, "psf": data.psf.name,
    })
    return out
