"""What the dock is doing, and which actions that allows. Pure Python (no Qt), so it is testable alone."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from types import MappingProxyType


class State(Enum):
    IDLE = "idle"
    BUSY = "busy"  # a short task: loading a model, rendering a PSF grid, evaluating
    TRAINING = "training"
    APPLYING = "applying"  # prediction or a classical comparison; cancellable
    STOPPING = "stopping"  # stop requested, waiting for the worker to return


# Actions that need a model loaded or trained in this dock
NEEDS_MODEL = frozenset({"save", "export", "apply", "gates"})

_ENABLED = MappingProxyType({
    # "adapt" is enabled without a model: its button then says to train or load one first
    State.IDLE: frozenset({"train", "adapt", "load", "sample", "save", "export", "apply", "compare", "evaluate",
                           "gates", "psf_grid", "calibrate", "use_psf", "save_psf"}),
    State.BUSY: frozenset(),
    State.TRAINING: frozenset({"stop"}),
    State.APPLYING: frozenset({"cancel"}),
    State.STOPPING: frozenset(),
})


def enabled_actions(state: State, has_model: bool) -> frozenset[str]:
    """The actions whose buttons are enabled in ``state``."""
    actions = _ENABLED[state]
    return actions if has_model else actions - NEEDS_MODEL


@dataclass(frozen=True)
class Progress:
    """A progress message from a worker: ``done`` of ``total`` units of ``task``."""

    task: str
    done: int
    total: int
    text: str = ""
