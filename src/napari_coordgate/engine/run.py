"""The state of one training run: counters, clock, progress reports and the best model so far."""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..config import ModelConfig, TrainConfig
from ..model_io import SavedModel, save_model
from .trainingdata import TrainingData

__all__ = ["Update", "TrainResult", "Run"]


@dataclass(frozen=True)
class Update:
    """One progress message from training (GUI and CLI route these; small and picklable)."""

    kind: str  # "step", "epoch" or "done"
    epoch: int
    step: int
    loss: float
    val_psnr: float | None
    best_val_psnr: float | None
    elapsed: float
    progress: float  # 0..1 of the budget
    lr: float
    device: str
    message: str = ""
    input_psnr: float | None = None  # validation PSNR of the unrestored input: the line to rise above


# a kept model at most this far above its input on the held-out data learnt nothing (TrainResult.stall_message)
STALLED_GAIN_DB = 0.05


@dataclass
class TrainResult:
    saved: SavedModel
    history: list[Update] = field(default_factory=list)
    best_val_psnr: float | None = None
    best_epoch: int = 0
    stopped: str = "budget"  # "budget", "early_stop", "stopped", "diverged" (the loss became NaN or Inf)
    device: str = "cpu"
    input_val_psnr: float | None = None  # the unrestored input's validation PSNR: the line the model must rise above

    def stall_message(self) -> str | None:
        """A line for the user when the kept model is no better than its input on the held-out data (a run that
        stalled at its input: 3-D runs have, on some seeds; benchmarks/README.md, 3-D section), else None. A run
        that was stopped, diverged or crashed has its own message."""
        if self.stopped not in ("budget", "early_stop") or self.best_val_psnr is None or self.input_val_psnr is None:
            return None
        if self.best_val_psnr - self.input_val_psnr > STALLED_GAIN_DB:
            return None
        return (f"the model is no better than its input on the held-out data (validation PSNR "
                f"{self.best_val_psnr:.2f} dB, the input's {self.input_val_psnr:.2f} dB): training stalled; train "
                "again with another seed")


@dataclass
class Run:
    """What changes while a run trains; :meth:`emit` reports it, :meth:`keep_if_best` keeps the best weights."""

    model_cfg: ModelConfig
    train_cfg: TrainConfig
    data: TrainingData
    device: Any
    opt: Any
    on_update: Callable[[Update], None] | None = None
    out_path: str | Path | None = None
    input_psnr: float | None = None
    val_range: float = 1.0
    epoch: int = 0
    step: int = 0
    elapsed_before: float = 0.0
    t0: float = field(default_factory=time.perf_counter)
    best_psnr: float | None = None
    best_epoch: int = 0
    best_state: dict | None = None
    since_best: int = 0
    running: float = 0.0  # loss summed over this epoch's steps
    count: int = 0
    stop_reason: str = "budget"
    history: list[Update] = field(default_factory=list)
    model_written: bool = False  # this run wrote out_path (a resumed run with no budget left has not, yet)
    checkpoint_written: bool = False
    at_epoch_end: bool = True  # no step since the last epoch ended: a checkpoint now resumes exactly

    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.t0

    def progress(self) -> float:
        """Fraction of the budget (epochs, else minutes) spent; may pass 1."""
        cfg = self.train_cfg
        if cfg.epochs > 0:
            return (self.step / cfg.steps_per_epoch) / cfg.epochs
        return self.elapsed() / (60.0 * cfg.minutes)

    def budget_left(self) -> bool:
        if self.train_cfg.epochs > 0:
            return self.epoch < self.train_cfg.epochs
        return self.progress() < 1.0

    def emit(self, kind: str, loss: float, val: float | None = None, message: str = "") -> None:
        u = Update(kind, self.epoch, self.step, float(loss), val, self.best_psnr, self.elapsed(),
                   min(self.progress(), 1.0), self.opt.param_groups[0]["lr"], str(self.device), message,
                   self.input_psnr)
        self.history.append(u)
        if self.on_update is not None:
            self.on_update(u)

    def mean_loss(self) -> float:
        return self.running / max(self.count, 1)

    def keep_if_best(self, val: float, model) -> bool:
        """Keep the weights (in memory and at ``out_path``) if ``val`` beats the best validation PSNR so far."""
        if self.best_psnr is not None and not val > self.best_psnr:
            self.since_best += 1
            return False
        self.best_psnr, self.best_epoch, self.since_best = val, self.epoch, 0
        self.best_state = copy.deepcopy(model.state_dict())
        self.save_best()
        return True

    def save_best(self) -> None:
        if self.out_path is not None:
            from ..nn.unet import build_model

            net = build_model(self.model_cfg)
            net.load_state_dict(self.best_state)
            save_model(self.out_path, self.saved(net))
            self.model_written = True

    def saved(self, net) -> SavedModel:
        """``net`` with everything needed to apply it: config, field, normalisation, PSF model, provenance."""
        data = self.data
        provenance: dict[str, Any] = {"training": {
            "source": "psf" if data.simulated else "calibration",
            "planes": int(data.n), "epochs": int(self.epoch), "steps": int(self.step),
            "seconds": round(self.elapsed(), 1), "best_val_psnr": self.best_psnr, "device": str(self.device),
            "train_config": self.train_cfg.to_dict(),
        }}
        if data.known_psf is not None and data.known_psf.provenance:
            # a measured PSF model's own provenance (bead images, bead count, fit residual...) travels along
            provenance["psf"] = data.known_psf.provenance
        return SavedModel(model=net, config=self.model_cfg, field_shape=data.field_shape,
                          normalization=data.norm, psf=data.known_psf, provenance=provenance,
                          z_step_um=data.z_step_um)
