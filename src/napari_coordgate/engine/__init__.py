"""Training and prediction: arrays and configs in, arrays and model files out. No napari, no Qt.

``train(model_cfg, train_cfg, source, on_update=..., should_stop=...)`` (:mod:`.training`) trains a per-microscope
model from calibration pairs (:class:`PairSource`) or from sharp images and a PSF model (:class:`SimulatedSource`),
reporting typed :class:`Update` records and checking ``should_stop()`` every step; ``init=`` fine-tunes a loaded
model. The calibration stacks stay in host memory (memory maps allowed) and only a batch of crops or validation
tiles goes to the device. The best model so far is kept in memory and, when ``out_path``/``checkpoint_path`` are
given, on disk (atomic writes, :mod:`napari_coordgate.model_io`), so a stop or a crash never loses it.

``adapt(saved, images, cfg)`` (:mod:`.adaptation`) fine-tunes a model on the user's own blurred images with the
PSF model it carries (PSF consistency under the camera's noise; the best state chosen on held-out tiles).

``predict(saved, image, ...)`` (:mod:`.prediction`) deblurs a 2-D image or every plane of a (..., H, W) stack
(numpy, dask or any array that slices lazily) tile by tile: each tile carries its global field offset, overlaps its
neighbours by the network's receptive field and starts on the pooling grid, so tiled output equals whole-image
output.

Layout: :mod:`.trainingdata` (sources; the training-data object: split, normalisation, noise, crops),
:mod:`.optimizer` (parameter groups, schedule), :mod:`.run` (counters, reports, best model), :mod:`.resume`
(checkpoints, fine-tuning), :mod:`.training` (the orchestrator),
:mod:`.adaptation` (self-supervised), :mod:`.prediction` (tile plan, predict).
"""

from __future__ import annotations

from ..config import PRECISIONS
from ..devices import resolve_device
from ..model_io import load_checkpoint, save_checkpoint
from ..nn.unet import receptive_halo
from .adaptation import AdaptResult, adapt
from .prediction import Cancelled, field_geometry, plan_tiles, predict
from .run import TrainResult, Update
from .training import train
from .trainingdata import PairSource, SimulatedSource

__all__ = [
    "adapt",
    "AdaptResult",
    "Cancelled",
    "Update",
    "PairSource",
    "SimulatedSource",
    "TrainResult",
    "resolve_device",
    "train",
    "predict",
    "receptive_halo",
    "plan_tiles",
    "field_geometry",
    "load_checkpoint",
    "save_checkpoint",
    "PRECISIONS",
]
