"""Training: a short orchestrator over the pieces of a run.

:func:`train` checks the data (:class:`~.trainingdata.TrainingData`: split, normalisation, noise, crops), builds
the network and its optimiser (:mod:`.optimizer`), then repeats one epoch of optimiser steps and one validation
through the tiled predictor until the budget is spent, a stop is requested or validation stops improving. The
best model is kept after every validation and a checkpoint written after every epoch (:mod:`.resume`).
"""

from __future__ import annotations

import math
import time
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np

from ..config import ModelConfig, TrainConfig
from ..data import InputError
from ..devices import bf16_is_fast, on_device, resolve_device
from ..metrics import PSNRAccumulator
from ..model_io import SavedModel
from .optimizer import build_optimizer, set_learning_rate
from .prediction import plan_tiles, plan_tiles_3d, predict_batch, tile_batches
from .resume import (
    check_init,
    checkpoint_to_resume,
    restore,
    starting_normalization,
    write_checkpoint,
)
from .run import Run, TrainResult, Update
from .trainingdata import Batch, PairSource, SimulatedSource, TrainingData
from .volumes import TrainingVolumes

__all__ = ["train"]


def _setup_torch(cfg: TrainConfig):
    """The run's device; torch's thread count and seed (the initial weights)."""
    import torch

    device = resolve_device(cfg.device)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    return device


def _build_network(model_cfg: ModelConfig, data: TrainingData, device, init: SavedModel | None):
    """The network, with a fine-tuned model's weights or its Wiener first stage's filters from the PSF model."""
    from ..nn.unet import build_model

    model = build_model(model_cfg)
    if init is not None:
        model.load_state_dict(init.model.state_dict())  # the first stage's filters included
    elif model_cfg.prefilter == "wiener":
        if data.known_psf is None:
            raise InputError(
                "a model with a Wiener first stage needs the PSF model of the optics: train from a PSF model, "
                "or give the calibration pairs' PSF model (PairSource(psf=...), --psf with --blurred)"
            )
        from ..optics.deconv import wiener_kernels

        model.prefilter.set_kernels(wiener_kernels(data.known_psf, data.field_shape, model_cfg.prefilter_grid,
                                                   model_cfg.prefilter_size, model_cfg.prefilter_balance))
    return on_device(model, device)


def _start_data(data: TrainingData, rng: np.random.Generator, ck: dict | None, init: SavedModel | None) -> None:
    """Fix the normalisation and, for simulated pairs, the noise seed (the checkpoint's when resuming)."""
    noise_seed = None
    norm = starting_normalization(data, ck, init)
    if data.simulated:
        noise_seed = int(rng.integers(2**31))
        if ck is not None:
            noise_seed = int(ck["meta"].get("noise_seed", noise_seed))
    data.start(norm, noise_seed)


def _loss(out, target, weight, kind: str):
    """The training loss of a batch: mean L2 (or L1) error, weighted by ``weight`` where given (a single pair:
    0 on the validation tiles, so they send no gradient)."""
    diff = out.float() - target
    err = diff.abs() if kind == "l1" else diff.square()
    if weight is None:
        return err.mean()
    return (err * weight).sum() / weight.sum().clamp_min(1.0)


def _step(model, opt, batch: Batch, device, cfg: TrainConfig, field_shape, use_amp: bool,
          clip: float = 0.0) -> float:
    """One optimiser step on a batch (moved to the device here), the gradient's norm clipped to ``clip`` when > 0;
    returns its loss."""
    import torch

    x = torch.from_numpy(batch.blurred).to(device)
    y = torch.from_numpy(batch.sharp).to(device)
    w = None if batch.weight is None else torch.from_numpy(batch.weight).to(device)
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_amp):
        out = model(x, offset=torch.from_numpy(batch.offsets).to(device), field_shape=field_shape)
    if batch.scale is not None:  # brightened crops: their error in the crop's own units
        s = torch.from_numpy(batch.scale).to(device)
        out, y = out / s, y / s
    loss = _loss(out, y, w, cfg.loss)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if clip > 0:
        torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], clip)
    opt.step()
    return float(loss.detach())


def _train_epoch(run: Run, model, plateau, rng, should_stop, use_amp: bool) -> bool:
    """Up to ``steps_per_epoch`` steps (fewer when the time budget runs out); False, with ``run.stop_reason`` set,
    if a stop was requested ("stopped") or the loss stopped being a number ("diverged")."""
    cfg = run.train_cfg
    run.running, run.count = 0.0, 0
    for _ in range(cfg.steps_per_epoch):
        if should_stop is not None and should_stop():
            run.stop_reason = "stopped"
            return False
        if cfg.epochs == 0 and run.progress() >= 1.0:
            break
        batch = run.data.batch(rng)
        if plateau is None:
            set_learning_rate(run.opt, cfg, run.progress())
        loss = _step(model, run.opt, batch, run.device, cfg, run.data.field_shape, use_amp,
                     clip=cfg.grad_clip_for(run.model_cfg.ndim))
        run.step += 1
        run.at_epoch_end = False
        if not math.isfinite(loss):  # the weights are no model any more: keep the best so far, write nothing new
            run.stop_reason = "diverged"
            run.emit("step", loss, message=f"the loss became {loss} at step {run.step}")
            return False
        run.running += loss
        run.count += 1
        if run.step % 10 == 0 or run.step == 1:  # the first step shows at once that training runs
            run.emit("step", run.running / run.count)
    return True


def _validate(run: Run, model, use_amp: bool) -> float:
    """PSNR of the network's output on the validation planes (masked to the checkerboard for one pair), predicted
    tile by tile through the predictor's plan, each window read and normalised from host memory."""
    import torch

    data = run.data
    if data.ndim == 3:
        tiles = plan_tiles_3d(data.volume_shape, run.model_cfg)
    else:
        tiles = plan_tiles(data.field_shape, run.model_cfg)
    acc = PSNRAccumulator(run.val_range)
    model.eval()
    for i in data.val_idx:
        read = partial(data.input_window, int(i))
        for group in tile_batches(tiles, 1):
            for core, pred in predict_batch(model, read, tiles, group, (0, 0), data.field_shape, run.device,
                                            torch.bfloat16 if use_amp else None):
                y0, y1, x0, x1 = core[-4:]  # a volume's tile: its columns' mask holds for every plane
                mask = None if data.val_mask is None else data.val_mask[y0:y1, x0:x1]
                acc.add(data.target_window(int(i), core), pred, mask)
    model.train()
    return acc.value


def _input_psnr(data: TrainingData, val_range: float) -> float:
    """Validation PSNR of the unrestored input: the line the validation curve has to rise above."""
    acc = PSNRAccumulator(val_range)
    for i in data.val_idx:
        acc.add(data.target_window(int(i)), data.input_window(int(i), None), data.val_mask)
    return acc.value


def _end_epoch(run: Run, model, plateau, use_amp: bool) -> float:
    """Count the epoch, validate, step the plateau schedule and keep the best model; returns the validation PSNR."""
    run.epoch += 1
    run.at_epoch_end = True
    val = _validate(run, model, use_amp)
    if plateau is not None:
        plateau.step(val)
    run.keep_if_best(val, model)
    return val


def _finish(run: Run, model, use_amp: bool) -> TrainResult:
    """Load the best weights (scoring the current ones if no epoch ended) and report the end of the run."""
    if run.best_psnr is None:  # stopped before the first validation: score what we have so the result is usable
        if run.stop_reason == "diverged":  # the starting weights, not the diverged ones
            model.load_state_dict(run.best_state)
        run.best_psnr = _validate(run, model, use_amp)
        run.best_state = {k: v.clone() for k, v in model.state_dict().items()}
        run.save_best()
    elif not run.model_written:  # resumed with no budget left (or into a new output): still leave the model
        run.save_best()
    model.load_state_dict(run.best_state)
    model.eval()
    run.emit("done", run.mean_loss(), run.best_psnr, run.stop_reason)
    return TrainResult(run.saved(model), run.history, run.best_psnr, run.best_epoch, run.stop_reason, str(run.device),
                       run.input_psnr)


def train(
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    source: PairSource | SimulatedSource,
    *,
    on_update: Callable[[Update], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    out_path: str | Path | None = None,
    checkpoint_path: str | Path | None = None,
    resume: str | Path | None = None,
    init: SavedModel | None = None,
) -> TrainResult:
    """Train a model on one microscope's pairs.

    Parameters
    ----------
    model_cfg, train_cfg
        The network and the recipe.
    source
        :class:`PairSource` (calibration pairs; numpy arrays or memory maps, read crop by crop) or
        :class:`SimulatedSource` (sharp images + PSF model).
    on_update
        Called with an :class:`Update` every few steps and after every validation.
    should_stop
        Checked every step; returning True ends training early and keeps the best model so far.
    out_path
        If given, the best model so far is written there (atomically) whenever validation improves.
    checkpoint_path
        If given, a resumable checkpoint (weights, optimiser, schedule, normalisation, numpy and torch RNG states,
        a fingerprint of the data and the model config) is written after every epoch.
    resume
        A checkpoint to continue from (epoch count, optimiser and schedule state, normalisation, RNG states):
        interrupted and resumed training gives the same weights as one uninterrupted run (a 3-D model under bf16
        autocast on a CPU: to float rounding; oneDNN's bf16 3-D convolutions are not bit-reproducible). The budget
        may grow; other data or another model config is refused with an error that says so.
    init
        A model to fine-tune (a :class:`SavedModel`, e.g. :func:`~napari_coordgate.model_io.load_model`): training
        starts from its weights and keeps its normalisation and PSF model (unless the source names one). It must
        have ``model_cfg`` and the data's field shape; not with ``resume``.

    Returns
    -------
    TrainResult
        With the best model (by validation PSNR) as a :class:`SavedModel`.
    """
    data = (TrainingVolumes if model_cfg.ndim == 3 else TrainingData).from_source(source, model_cfg, train_cfg)
    check_init(init, model_cfg, data.field_shape, resume)
    if init is not None and data.known_psf is None:
        data.known_psf = init.psf
    device = _setup_torch(train_cfg)
    rng = np.random.default_rng(train_cfg.seed)
    fingerprint = data.fingerprint() if checkpoint_path is not None or resume is not None else None
    ck = None if resume is None else checkpoint_to_resume(resume, model_cfg, data.field_shape, fingerprint,
                                                          train_cfg)
    _start_data(data, rng, ck, init)
    val_range = data.val_range()
    model = _build_network(model_cfg, data, device, init)
    opt, plateau = build_optimizer(model, train_cfg, model_cfg.ndim)
    run = Run(model_cfg, train_cfg, data, device, opt, on_update, out_path, _input_psnr(data, val_range), val_range)
    run.best_state = {k: v.clone() for k, v in model.state_dict().items()}
    if ck is not None:
        restore(ck, run, model, plateau, rng)
    use_amp = train_cfg.amp and bf16_is_fast(device)
    model.train()
    run.t0 = time.perf_counter()
    while run.budget_left():
        if data.simulated and run.epoch > 0:
            data.new_epoch(run.epoch)
        if not _train_epoch(run, model, plateau, rng, should_stop, use_amp):
            break
        val = _end_epoch(run, model, plateau, use_amp)
        _checkpoint(checkpoint_path, run, model, plateau, rng, fingerprint)
        run.emit("epoch", run.mean_loss(), val)
        if train_cfg.patience and run.since_best >= train_cfg.patience:
            run.stop_reason = "early_stop"
            break
    if not run.checkpoint_written and run.at_epoch_end and run.epoch > 0:
        # a resumed run with no budget left: its state is the checkpoint's, which the new path must hold too
        _checkpoint(checkpoint_path, run, model, plateau, rng, fingerprint)
    return _finish(run, model, use_amp)


def _checkpoint(path, run: Run, model, plateau, rng, fingerprint) -> None:
    if path is not None:
        write_checkpoint(path, run, model, plateau, rng, fingerprint)
        run.checkpoint_written = True
