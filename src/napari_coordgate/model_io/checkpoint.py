"""Training checkpoints (``.cgckpt``): weights, best weights, optimiser state and RNG states as tensors, the
rest of a run's state as JSON (:mod:`.container`)."""

from __future__ import annotations

import os
from pathlib import Path

from ..outputs import atomic_write_bytes
from .container import (
    _CHECKPOINT_FORMAT,
    CHECKPOINT_SCHEMA_VERSION,
    CHECKPOINT_SUFFIX,
    ModelFileError,
    decode,
    encode,
    existing_file,
    with_suffix,
)

__all__ = ["save_checkpoint", "load_checkpoint"]


def _optimizer_to_tensors(state_dict: dict) -> tuple[dict, dict]:
    """Split an optimizer state_dict into tensors (for safetensors) and JSON (for the metadata)."""
    import torch

    tensors, state_json = {}, {}
    for idx, st in state_dict["state"].items():
        entry = {}
        for name, value in st.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{idx}.{name}"] = value
            else:
                entry[name] = value
        state_json[str(idx)] = entry
    return tensors, {"state": state_json, "param_groups": state_dict["param_groups"]}


def _optimizer_from_tensors(tensors: dict, meta: dict) -> dict:
    """The optimiser state dict of :func:`_optimizer_to_tensors`' parts; KeyError, TypeError or ValueError for
    parts that make none (whether it fits a given optimiser is the caller's check)."""
    if not isinstance(meta, dict) or not isinstance(meta["state"], dict) or not isinstance(meta["param_groups"], list):
        raise TypeError("'optimizer' must be an object with a 'state' object and a 'param_groups' list")
    state: dict = {}
    for idx, entry in meta["state"].items():
        state[int(idx)] = dict(entry)
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = value
    groups = [dict(g, betas=tuple(g["betas"])) if "betas" in g else dict(g) for g in meta["param_groups"]]
    if any(not isinstance(g.get("params"), list) for g in groups):
        raise TypeError("every optimiser parameter group needs a 'params' list")
    return {"state": state, "param_groups": groups}


def save_checkpoint(path: str | os.PathLike, *, weights: dict, best: dict, optimizer: dict, rng_tensors: dict,
                    state: dict) -> Path:
    """Write a training checkpoint (``.cgckpt`` added if missing) atomically; returns the path written.

    Parameters
    ----------
    weights, best
        State dicts of the network's current and best weights.
    optimizer
        The optimiser's ``state_dict()``: its tensors are stored as tensors, the rest as JSON.
    rng_tensors
        Random generator states that are tensors (``{"torch": ..., "cuda": ...}``).
    state
        The JSON part: model and training configs, field shape, normalisation, data fingerprint, epoch and step
        counters, best validation PSNR, numpy RNG state, scheduler state...
    """
    opt_tensors, opt_meta = _optimizer_to_tensors(optimizer)
    tensors = {f"model.{k}": v for k, v in weights.items()}
    tensors.update({f"best.{k}": v for k, v in best.items()})
    tensors.update(opt_tensors)
    tensors.update({f"rng.{k}": v for k, v in rng_tensors.items()})
    meta = {"format": _CHECKPOINT_FORMAT, "schema_version": CHECKPOINT_SCHEMA_VERSION, **state, "optimizer": opt_meta}
    return atomic_write_bytes(with_suffix(path, CHECKPOINT_SUFFIX), encode(tensors, meta))


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Read a training checkpoint (safetensors + JSON; never unpickled).

    Returns ``{"path": ..., "tensors": ..., "meta": ..., "weights": ..., "best": ..., "optimizer": ...,
    "rng_tensors": ...}``: the file read, the raw tensors and JSON, and the parts :func:`save_checkpoint` was given
    (``optimizer`` as a state dict). :class:`ModelFileError` for a file that is unreadable, corrupt (its checksum),
    holds NaN or Inf, or whose optimiser state makes no state dict; whether the parts fit a network is the
    resuming run's check (:mod:`napari_coordgate.engine.resume`).
    """
    tensors, meta = decode(path, _CHECKPOINT_FORMAT)
    path = existing_file(path, CHECKPOINT_SUFFIX)
    try:
        optimizer = _optimizer_from_tensors(tensors, meta["optimizer"])
    except KeyError as exc:
        raise ModelFileError(f"{path}: the checkpoint's optimiser state lacks {exc} (edited by hand?)") from None
    except (TypeError, ValueError, AttributeError) as exc:
        raise ModelFileError(f"{path}: the checkpoint's optimiser state is invalid ({exc}; edited by hand?)") from None
    return {
        "path": path,
        "tensors": tensors,
        "meta": meta,
        "weights": {k[6:]: v for k, v in tensors.items() if k.startswith("model.")},
        "best": {k[5:]: v.clone() for k, v in tensors.items() if k.startswith("best.")},
        "optimizer": optimizer,
        "rng_tensors": {k[4:]: v for k, v in tensors.items() if k.startswith("rng.")},
    }


