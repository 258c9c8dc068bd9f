"""The optimiser of a run: Adam with its parameter groups (the coordinate MLPs at their own rate) and the
learning-rate schedule."""

from __future__ import annotations

import math

from ..config import TrainConfig

__all__ = ["build_optimizer", "lr_factor", "set_learning_rate"]


def build_optimizer(model, cfg: TrainConfig, ndim: int = 2):
    """(Adam, ReduceLROnPlateau or None) for ``model`` (of ``ndim`` spatial axes) under the recipe ``cfg``.

    The coordinate MLPs may learn at their own rate (``cfg.gate_lr_scale_for(ndim)``): they start as the identity
    and must move before the position dependence shows. Each parameter group carries its ``lr_scale``.
    """
    import torch

    gate_params = [p for n, p in model.named_parameters() if "gate" in n.split(".")[0]]
    ids = {id(p) for p in gate_params}
    groups = [{"params": [p for p in model.parameters() if id(p) not in ids], "lr_scale": 1.0}]
    if gate_params:
        groups.append({"params": gate_params, "lr_scale": cfg.gate_lr_scale_for(ndim)})
    for g in groups:
        g["lr"] = cfg.lr * g["lr_scale"]
    opt = torch.optim.Adam(groups, lr=cfg.lr)
    plateau = None
    if cfg.schedule == "plateau":
        plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="max", factor=0.5, patience=3)
    return opt, plateau


def lr_factor(schedule: str, progress: float) -> float:
    """The schedule's multiplier of the learning rate at ``progress`` (0..1 of the budget)."""
    if schedule == "cosine":
        # decay to 5% rather than 0: the last steps still learn
        return 0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * min(max(progress, 0.0), 1.0)))
    return 1.0


def set_learning_rate(opt, cfg: TrainConfig, progress: float) -> None:
    """Every group's rate for this step: the base rate x the group's scale x the schedule's factor."""
    for g in opt.param_groups:
        g["lr"] = cfg.lr * g.get("lr_scale", 1.0) * lr_factor(cfg.schedule, progress)
