"""Where a run starts from and what it leaves behind: a checkpoint to resume (checked against this run's model
and data), a model to fine-tune, and the checkpoint written after every epoch."""

from __future__ import annotations

import warnings
from pathlib import Path

from ..config import ModelConfig
from ..data import InputError, Normalization
from ..modelio import ModelFileError, SavedModel, load_checkpoint, save_checkpoint
from .run import Run

__all__ = ["checkpoint_to_resume", "check_init", "starting_normalization", "restore", "write_checkpoint"]


def checkpoint_to_resume(path, model_cfg: ModelConfig, field_shape: tuple[int, int], data: dict) -> dict:
    """The checkpoint at ``path``, if it continues a run of this model on this data; a clear error otherwise."""
    ck = load_checkpoint(path)
    meta = ck["meta"]
    if ModelConfig.from_dict(meta["model"]) != model_cfg:
        raise ModelFileError(f"{path}: checkpoint was trained with a different model configuration")
    if tuple(meta["field_shape"]) != field_shape:
        raise ModelFileError(f"{path}: checkpoint field {tuple(meta['field_shape'])} != data field {field_shape}")
    old = meta.get("data")
    if old is None:
        warnings.warn(f"{path} was written by an older napari-coordgate without a data fingerprint; "
                      "it cannot be checked that this run's data are the same", stacklevel=3)
    elif old["fingerprint"] != data["fingerprint"]:
        raise InputError(
            f"checkpoint {path} was trained on other data: {old['description']} (fingerprint "
            f"{old['fingerprint'][:12]}), this run has {data['description']} (fingerprint "
            f"{data['fingerprint'][:12]}); start a new run or give the same calibration data"
        )
    return ck


def check_init(init: SavedModel | None, model_cfg: ModelConfig, field_shape: tuple[int, int], resume) -> None:
    """A model to fine-tune must have this run's network configuration and field; a clear error otherwise."""
    if init is None:
        return
    if resume is not None:
        raise InputError("give either a model to fine-tune (init) or a checkpoint to resume, not both: a "
                         "checkpoint already holds its weights")
    if init.config != model_cfg:
        mine, theirs = model_cfg.to_dict(), init.config.to_dict()
        diff = ", ".join(f"{k}={theirs.get(k)!r} (not {mine.get(k)!r})" for k in sorted(mine)
                         if mine[k] != theirs.get(k))
        raise InputError(f"the model to fine-tune has another network configuration: {diff}; train with its "
                         "configuration (its SavedModel.config) to start from its weights")
    if tuple(init.field_shape) != tuple(field_shape):
        raise InputError(f"the model to fine-tune was trained on a {init.field_shape[0]}x{init.field_shape[1]} "
                         f"field, these pairs are {field_shape[0]}x{field_shape[1]}; its gates would read other "
                         "positions: fine-tune on images of its field")


def starting_normalization(data, ck: dict | None, init: SavedModel | None) -> Normalization:
    """A resumed run continues in the units it started in, a fine-tuned model in its own; a new run fits them."""
    if ck is not None:
        return Normalization.from_dict(ck["meta"]["normalization"])
    if init is not None:
        return Normalization.from_dict(init.normalization)
    return data.fit_normalization()


def restore(ck: dict, run: Run, model, plateau, rng) -> None:
    """Continue from a checkpoint: weights, best weights, optimiser and schedule, counters, RNG states."""
    import torch

    meta = ck["meta"]
    model.load_state_dict(ck["weights"])
    run.best_state = ck["best"]
    run.opt.load_state_dict(ck["optimizer"])
    if plateau is not None and meta.get("plateau"):
        plateau.load_state_dict(meta["plateau"])
    run.epoch, run.step, run.elapsed_before = int(meta["epoch"]), int(meta["step"]), float(meta["elapsed"])
    run.best_psnr, run.best_epoch = meta.get("best_val_psnr"), int(meta.get("best_epoch", 0))
    run.since_best = int(meta.get("since_best", 0))
    rng.bit_generator.state = meta["rng"]
    if "torch" in ck["rng_tensors"]:
        torch.set_rng_state(ck["rng_tensors"]["torch"])
    if run.device.type == "cuda" and "cuda" in ck["rng_tensors"]:
        torch.cuda.set_rng_state(ck["rng_tensors"]["cuda"], run.device)


def write_checkpoint(path: str | Path | None, run: Run, model, plateau, rng, fingerprint: dict | None) -> None:
    """Everything :func:`restore` needs, plus the data fingerprint, written atomically (if ``path`` is given)."""
    import torch

    if path is None:
        return
    rng_tensors = {"torch": torch.get_rng_state()}
    if run.device.type == "cuda":
        rng_tensors["cuda"] = torch.cuda.get_rng_state(run.device)
    data = run.data
    state = {
        "model": run.model_cfg.to_dict(), "train": run.train_cfg.to_dict(), "field_shape": list(data.field_shape),
        "normalization": data.norm.to_dict(), "data": fingerprint, "epoch": run.epoch, "step": run.step,
        "elapsed": run.elapsed(), "best_val_psnr": run.best_psnr, "best_epoch": run.best_epoch,
        "since_best": run.since_best, "rng": rng.bit_generator.state, "noise_seed": data.noise_seed,
        "plateau": plateau.state_dict() if plateau is not None else None,
    }
    save_checkpoint(path, weights=model.state_dict(), best=run.best_state, optimizer=run.opt.state_dict(),
                    rng_tensors=rng_tensors, state=state)
