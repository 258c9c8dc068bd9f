"""Where a run starts from and what it leaves behind: a checkpoint to resume (checked against this run's model
and data), a model to fine-tune, and the checkpoint written after every epoch."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np

from ..config import ConfigError, ModelConfig, TrainConfig
from ..data import InputError, Normalization
from ..model_io import ModelFileError, SavedModel, load_checkpoint, save_checkpoint, state_dict_mismatch
from .run import Run

__all__ = ["checkpoint_to_resume", "check_init", "starting_normalization", "restore", "write_checkpoint"]


def _invalid(path, what: str) -> ModelFileError:
    return ModelFileError(f"{path}: the checkpoint's {what} (edited by hand, or damaged?); start a new run")


def _whole(value, lo: int = 0) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= lo


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_state(path, meta: dict) -> ModelConfig:
    """Everything a resume reads from the checkpoint's JSON, checked before any of it is used: the model config
    (returned), field, normalisation, counters, data fingerprint and generator states. One line per problem."""
    if "model" not in meta:
        raise _invalid(path, "model configuration is missing")
    try:
        cfg = ModelConfig.from_dict(meta["model"])
    except (ConfigError, TypeError, ValueError, KeyError, AttributeError) as exc:
        raise _invalid(path, f"model configuration is invalid ({exc})") from None
    shape = meta.get("field_shape")
    if not (isinstance(shape, list) and len(shape) == 2 and all(_whole(n, 1) for n in shape)):
        raise _invalid(path, f"field_shape {shape!r} is no [height, width]")
    try:
        Normalization.from_dict(meta["normalization"])
    except KeyError:
        raise _invalid(path, "normalisation is missing") from None
    except (TypeError, ValueError, AttributeError) as exc:
        raise _invalid(path, f"normalisation is invalid ({exc})") from None
    for key in ("epoch", "step"):
        if not _whole(meta.get(key)):
            raise _invalid(path, f"{key} counter {meta.get(key)!r} is not a whole number >= 0")
    for key in ("best_epoch", "since_best"):
        if key in meta and not _whole(meta[key]):
            raise _invalid(path, f"{key} counter {meta[key]!r} is not a whole number >= 0")
    if not _number(meta.get("elapsed")) or meta["elapsed"] < 0:
        raise _invalid(path, f"elapsed time {meta.get('elapsed')!r} is not a number of seconds")
    if meta.get("best_val_psnr") is not None and not _number(meta["best_val_psnr"]):
        raise _invalid(path, f"best validation PSNR {meta['best_val_psnr']!r} is not a number")
    if meta.get("noise_seed") is not None and not _whole(meta["noise_seed"]):
        raise _invalid(path, f"noise seed {meta['noise_seed']!r} is not a whole number >= 0")
    data = meta.get("data")
    if data is not None and not (isinstance(data, dict) and isinstance(data.get("fingerprint"), str)
                                 and isinstance(data.get("description"), str)):
        raise _invalid(path, "data fingerprint is invalid")
    try:  # the generator a run resumes with (np.random.default_rng) is a PCG64
        np.random.PCG64().state = meta["rng"]
    except KeyError:
        raise _invalid(path, "random generator state is missing") from None
    except (TypeError, ValueError) as exc:
        raise _invalid(path, f"random generator state is invalid ({exc})") from None
    return cfg


# what a resumed run may change without a word: how long it trains, and where and how fast it computes
_FREE_TO_CHANGE = {"epochs", "minutes", "device", "threads"}


def changed_settings(meta: dict, train_cfg: TrainConfig) -> list[str]:
    """The training settings a resumed run changes from its checkpoint's (``"lr 0.001 -> 0.01"``), budget and
    device aside: with any of them the run no longer equals one uninterrupted run."""
    old, new = meta.get("train"), train_cfg.to_dict()
    if not isinstance(old, dict):
        return []
    model = meta.get("model")
    ndim = model.get("ndim", 2) if isinstance(model, dict) else 2
    defaults = TrainConfig()
    for key, rule in (("gate_lr_scale", TrainConfig.gate_lr_scale_for), ("grad_clip", TrainConfig.grad_clip_for)):
        # compared as the values they give (not given, or written before the setting existed: the default of the
        # model's ndim)
        given = old.get(key, 0.0 if key == "grad_clip" else None)  # runs before grad_clip did not clip
        old = {**old, key: given if given is not None else rule(defaults, ndim)}
        new[key] = rule(train_cfg, ndim)
    return [f"{k} {old[k]!r} -> {new[k]!r}" for k in sorted(new)
            if k in old and k not in _FREE_TO_CHANGE and old[k] != new[k]]


def checkpoint_to_resume(path, model_cfg: ModelConfig, field_shape: tuple[int, int], data: dict,
                         train_cfg: TrainConfig | None = None) -> dict:
    """The checkpoint at ``path``, if it continues a run of this model on this data; a clear error otherwise.

    Raises
    ------
    ModelFileError
        One line naming the file: unreadable, corrupt, edited into something no run can continue from, or
        written for another model or field.
    InputError
        Written for other data (its fingerprint differs).

    Warns
    -----
    UserWarning
        ``train_cfg`` changes settings of the checkpoint's run other than its budget and device
        (:func:`changed_settings`): the run goes on with the new ones.
    """
    ck = load_checkpoint(path)
    meta = ck["meta"]
    changed = [] if train_cfg is None else changed_settings(meta, train_cfg)
    if changed:
        warnings.warn(f"resuming {path} with changed settings ({', '.join(changed)}): the run goes on with the new "
                      "ones, so it no longer equals one uninterrupted run", stacklevel=3)
    if _check_state(path, meta) != model_cfg:
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
        return init.normalization
    return data.fit_normalization()


def _json_kind(value) -> str:
    return "number" if isinstance(value, (int, float)) and not isinstance(value, bool) else type(value).__name__


def _check_tensors(path, ck: dict, model, run: Run, plateau) -> None:
    """The checkpoint's tensors and schedule against this run's network, optimiser and scheduler."""
    import torch

    expected = model.state_dict()
    for key, what in (("weights", "weights"), ("best", "best weights")):
        mismatch = state_dict_mismatch(expected, ck[key])
        if mismatch is not None:
            raise _invalid(path, f"{what} do not match its model configuration ({mismatch})")
    for name, t in ck["rng_tensors"].items():
        if name in ("torch", "cuda") and (t.dtype != torch.uint8 or t.dim() != 1):
            raise _invalid(path, f"{name} random generator state is invalid (a {t.dtype} tensor of shape "
                           f"{tuple(t.shape)})")
    state = (ck["meta"].get("plateau") or None) if plateau is not None else None
    if state is not None:
        # torch adds keys between versions (and loading just sets attributes): compare the kinds of shared keys only
        fresh = plateau.state_dict()
        if not isinstance(state, dict) or any(_json_kind(state[k]) != _json_kind(v) for k, v in fresh.items()
                                              if k in state and v is not None):
            raise _invalid(path, "learning-rate schedule state is invalid")


def _load_optimizer(path, ck: dict, run: Run) -> None:
    """The optimiser state, refused unless every state tensor has its parameter's shape (torch checks the groups
    but not the shapes: a wrong one would only fail at the first step, with a message about broadcasting)."""
    import torch

    try:
        run.opt.load_state_dict(ck["optimizer"])
    except (ValueError, KeyError, TypeError, IndexError, RuntimeError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise _invalid(path, f"optimiser state does not fit the model ({first})") from None
    for group in run.opt.param_groups:
        for p in group["params"]:
            for name, v in run.opt.state.get(p, {}).items():
                if torch.is_tensor(v) and v.dim() > 0 and v.shape != p.shape:
                    raise _invalid(path, f"optimiser state {name!r} has shape {tuple(v.shape)} for a parameter "
                                   f"of shape {tuple(p.shape)}")


def restore(ck: dict, run: Run, model, plateau, rng) -> None:
    """Continue from a checkpoint: weights, best weights, optimiser and schedule, counters, RNG states.

    ``ck`` is :func:`checkpoint_to_resume`'s; its tensors are checked against this run's network, optimiser and
    scheduler first (:class:`~napari_coordgate.model_io.ModelFileError`, one line naming the file), before any
    training step.
    """
    import torch

    meta = ck["meta"]
    path = ck.get("path", "checkpoint")
    _check_tensors(path, ck, model, run, plateau)
    model.load_state_dict(ck["weights"])
    run.best_state = ck["best"]
    _load_optimizer(path, ck, run)
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
