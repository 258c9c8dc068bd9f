"""What the dock's workers run: thin calls into the engine with typed progress. No Qt, no layers.

Every job takes plain arrays and configs (copied on the GUI thread, or lazy dask arrays that are only
read window by window), a ``report`` callable that receives :class:`~napari_coordgate.app.state.Progress` or engine
:class:`~napari_coordgate.engine.Update` messages, and a ``should_stop`` callable checked between steps.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from ..config import PredictConfig
from .state import Progress

Report = Callable[[Any], None]
ShouldStop = Callable[[], bool]


@dataclass(frozen=True)
class BuiltinSpecimens:
    """A training source the job makes: the built-in specimens at the field of the measured PSF model ``psf``,
    blurred by it, with held-out validation specimens; drawn from the stream ``seed``. A 2-D model's are the fields of
    ``specimens`` (:func:`~napari_coordgate.samples.specimens.builtin_fields`), a 3-D model's the procedural volumes
    (:func:`~napari_coordgate.samples.volumes.builtin_volumes`; ``specimens`` does not apply)."""

    psf: Any
    seed: int = 0
    specimens: str = "mixed"

    def source(self):
        """The :class:`~napari_coordgate.engine.SimulatedSource` (drawn here, off the GUI thread)."""
        from ..engine import SimulatedSource

        if getattr(self.psf, "ndim", 2) == 3:
            from ..samples.volumes import builtin_volumes

            hint = "sharp (Z, Y, X) layers and a PSF model"
            sharp, _ = builtin_volumes(self.psf, self.seed, sharp_hint=hint)
            val, _ = builtin_volumes(self.psf, self.seed, validation=True, sharp_hint=hint)
        else:
            from ..samples.specimens import builtin_fields

            hint = "sharp layers and a PSF model"
            sharp, _ = builtin_fields(self.psf, self.seed, self.specimens, sharp_hint=hint)
            val, _ = builtin_fields(self.psf, validation=True, sharp_hint=hint)
        return SimulatedSource(sharp, self.psf, val_sharp=val)


def train_job(model_cfg, train_cfg, source, init=None, *, report: Report, should_stop: ShouldStop):
    """Train in a separate process (never in the viewer's: see :mod:`napari_coordgate.runners.isolate`).

    ``source``: an engine source, or :class:`BuiltinSpecimens` (drawn here, in the worker). ``init``: a loaded model
    to fine-tune on this data. Every :class:`~napari_coordgate.engine.Update` goes to ``report``. Returns a
    ``TrainResult``; if the training process dies, its ``stopped`` starts with "crashed" and it holds the best model
    written so far.
    """
    from napari_coordgate.runners.isolate import train_isolated

    if isinstance(source, BuiltinSpecimens):
        source = source.source()
    return train_isolated(model_cfg, train_cfg, source, report=report, should_stop=should_stop, init=init)


def adapt_job(saved, images, cfg, psf=None, *, report: Report, should_stop: ShouldStop):
    """Adapt ``saved`` to the user's blurred ``images`` (H, W) or (N, H, W) in a separate process, like training.

    ``cfg``: an :class:`~napari_coordgate.config.AdaptConfig`; ``psf``: a PSF model instead of the model's own.
    Every :class:`~napari_coordgate.engine.Update` goes to ``report`` (the held-out consistency criterion in its
    PSNR slots). Returns an ``AdaptResult`` (:func:`napari_coordgate.runners.isolate.adapt_isolated`).
    """
    from napari_coordgate.runners.isolate import adapt_isolated

    return adapt_isolated(saved, images, cfg, report=report, should_stop=should_stop, psf=psf)


def save_job(path: str, saved, *, report: Report, should_stop: ShouldStop) -> str:
    from napari_coordgate.model_io import save_model

    return str(save_model(path, saved))


def load_job(paths: Sequence[str], *, report: Report, should_stop: ShouldStop) -> list:
    """Load model files or bioimage.io packages exported by this plugin onto the CPU (prediction moves them)."""
    from ..model_io.bioimageio import load_any

    return [load_any(p, "cpu") for p in paths]


def export_job(path: str, saved, *, report: Report, should_stop: ShouldStop) -> str:
    """Write a bioimage.io package of ``saved``."""
    from ..model_io.bioimageio import export_package

    return str(export_package(saved, path))


def psf_grid_job(psf, field_shape, *, report: Report, should_stop: ShouldStop) -> np.ndarray:
    """The PSF model's K x K grid of PSFs tiled into one image (any PSF model); of a 3-D PSF model one such image
    per plane of its PSFs (:func:`psf_grid_3d`)."""
    from napari_coordgate.optics.models import render_psf_grid

    if getattr(psf, "ndim", 2) == 3:
        return psf_grid_3d(psf.psf_grid(field_shape)[0])
    return render_psf_grid(psf, field_shape)


def gates_job(saved, *, report: Report, should_stop: ShouldStop) -> np.ndarray:
    from napari_coordgate.engine.gatemaps import gate_maps

    return gate_maps(saved, 0)


# -- apply ----------------------------------------------------------------------------------------
@dataclass
class ApplyRequest:
    """A prediction job: ``image`` (numpy copy or lazy array), one model, or one per channel."""

    image: Any
    models: list  # SavedModel objects or .cgmodel paths (loaded in the worker)
    channel_axis: int | None = None
    predict: PredictConfig = field(default_factory=PredictConfig)  # tiling, device, precision, binning
    out_path: str | None = None  # ``.zarr`` (needs zarr) or ``.npy`` (memory-mapped); None = in memory
    roi: tuple[int, int] | None = None  # (y, x) of the image inside the training field
    inputs: tuple[str, ...] = ()  # files the job reads (the layer's source, model files): the output never replaces one
    z_step_um: float | None = None  # of a z-stack (3-D models check it against theirs), None when not known


@dataclass
class JobResult:
    data: Any = None
    cancelled: bool = False
    extra: dict = field(default_factory=dict)


class _AxisSlot:
    """The sub-array ``out[..., index, ...]`` (``index`` at ``axis``) as a writable array-like.

    Works for arrays whose integer indexing gives no view (zarr), so one engine call per channel can
    write straight into the shared output.
    """

    def __init__(self, out, axis: int, index: int):
        self._out, self._axis, self._index = out, axis, index
        self.shape = tuple(s for i, s in enumerate(out.shape) if i != axis)

    def __setitem__(self, key, value):
        key = key if isinstance(key, tuple) else (key,)
        key = key + (slice(None),) * (len(self.shape) - len(key))
        self._out[key[: self._axis] + (self._index,) + key[self._axis :]] = value


def make_output(shape: tuple[int, ...], out_path: str | None):
    """A float32 array for the result: in memory, a ``.npy`` memory map or an OME-Zarr image (``.zarr``).

    An OME-Zarr output (NGFF 0.4, one chunk per plane) is built at ``OUT.zarr.partial`` and appears at ``OUT.zarr``
    when its last plane is written, so a cancelled or failed job never leaves a store that looks complete.
    """
    if out_path is None:
        return np.empty(shape, np.float32)
    if str(out_path).endswith(".zarr"):
        from ..image_io.omezarr import create_ome_zarr

        try:
            return create_ome_zarr(out_path, shape)
        except ImportError as exc:
            raise RuntimeError(f"{exc}; or give a .npy path for a memory-mapped file") from None
    from ..image_io.tiff import reserve_file

    path = out_path if str(out_path).endswith(".npy") else f"{out_path}.npy"
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=shape)
    try:  # a sparse map on a full disk ends in SIGBUS, which would take the viewer down: reserve the blocks now
        reserve_file(path)
    except OSError as exc:
        del out
        os.unlink(path)
        raise OSError(exc.errno, f"cannot write {path}: {exc.strerror} (needs {4 * math.prod(shape) / 1e9:.2f} GB)"
                      ) from None
    return out


def _check_channels(shape: tuple[int, ...], ax: int | None, models: list) -> int:
    """The number of channels, after checking the channel axis against the image and the models."""
    if ax is None:
        if len(models) != 1:
            raise ValueError("several models need a channel axis (one model per channel)")
        return 1
    lead = len(shape) - max(m.config.ndim for m in models)  # a 3-D model's Z axis is no channel axis
    if not 0 <= ax < lead:
        raise ValueError(f"channel axis {ax} must be one of the leading axes of an image of shape {shape}"
                         + (" (before Z, Y, X with a 3-D model)" if lead < len(shape) - 2 else ""))
    n_ch = shape[ax]
    if len(models) not in (1, n_ch):
        raise ValueError(f"the image has {n_ch} channels along axis {ax} but {len(models)} models were "
                         "given; give one model for all channels or one per channel")
    return n_ch


def apply_job(req: ApplyRequest, *, report: Report, should_stop: ShouldStop) -> JobResult:
    """Deblur every plane (2-D model) or volume (3-D model, z-step checked) of ``req.image``, and every channel, with
    the engine, reporting per-plane or per-volume progress."""
    from napari_coordgate import engine

    from ..model_io.bioimageio import load_any
    from ..outputs import check_outputs

    if req.out_path is not None:
        p = str(req.out_path)
        outs = [p, f"{p}.partial", f"{p}.lock"] if p.endswith(".zarr") else [p if p.endswith(".npy") else f"{p}.npy"]
        check_outputs(outs, req.inputs)
    models = [load_any(m, "cpu") if isinstance(m, str) else m for m in req.models]
    shape = tuple(req.image.shape)
    ax = req.channel_axis
    n_ch = _check_channels(shape, ax, models)
    out = make_output(shape, req.out_path)
    for c in range(n_ch):
        saved = models[c] if len(models) > 1 else models[0]
        nd = saved.config.ndim
        unit = "volume" if nd == 3 else "plane"
        per_ch = math.prod(shape[:-nd]) // n_ch  # planes or volumes per channel
        if ax is None:
            image, target = req.image, out
        else:
            image = req.image[(slice(None),) * ax + (c,)]
            target = _AxisSlot(out, ax, c)

        def on_progress(done: int, total: int, c=c, per_ch=per_ch, unit=unit) -> None:
            per_unit = max(total // per_ch, 1)
            k = c * per_ch + -(-done // per_unit)
            report(Progress("apply", c * total + done, n_ch * total, f"{unit} {k} of {per_ch * n_ch}"))

        z_step = req.z_step_um if nd == 3 else None
        try:
            engine.predict(saved, image, roi=req.roi, **req.predict.predict_kwargs(), out=target,
                           on_progress=on_progress, should_stop=should_stop, z_step_um=z_step)
        except BaseException as exc:
            if hasattr(out, "release"):  # an unfinished OME-Zarr output: let the next run write it
                out.release()
            if isinstance(exc, engine.Cancelled):
                return JobResult(out, cancelled=True)
            raise
    return JobResult(out)


def compare_job(image, psf, iterations: int, field_shape: tuple[int, int] | None = None,
                roi: tuple[int, int] | None = None, binning: int = 1, *, report: Report,
                should_stop: ShouldStop) -> JobResult:
    """Classical baselines plane by plane: Richardson–Lucy with the central PSF, and spatially varying RL.

    ``field_shape`` is the model's training field; ``roi`` and ``binning`` place the image in it as
    :func:`napari_coordgate.engine.predict` does, so each pixel is deblurred with the PSF of its place (and a
    binned image with the PSF model in binned pixels). Without a field the image is the whole field. ``psf`` is
    any PSF model (or what :func:`~napari_coordgate.model_io.resolve_psf` resolves).
    """
    from napari_coordgate.engine import field_geometry
    from napari_coordgate.model_io import resolve_psf
    from napari_coordgate.optics.blur import SpatiallyVaryingBlur
    from napari_coordgate.optics.deconv import richardson_lucy_central, sv_richardson_lucy

    shape = tuple(image.shape)
    if field_shape is None:
        if roi is not None or binning != 1:
            raise ValueError("a camera ROI or binning needs the training field: load or train a model first")
        full, offset = shape[-2:], (0, 0)
    else:
        full, offset = field_geometry(shape[-2:], field_shape, roi, binning)
    psf = resolve_psf(psf).binned(binning)
    lead = shape[:-2]
    n = math.prod(lead)
    total = n * (1 + iterations)
    rl = np.empty(shape, np.float32)
    sv = np.empty(shape, np.float32)
    op = SpatiallyVaryingBlur(psf, shape[-2:], offset=offset, full_field=full)
    done = 0
    for k, idx in enumerate(np.ndindex(*lead)):
        if should_stop():
            return JobResult(cancelled=True)
        plane = np.asarray(image[idx], dtype=np.float32)  # one plane of a lazy stack at a time
        rl[idx] = richardson_lucy_central(plane, psf, iterations, full_field=full)
        done += 1
        report(Progress("compare", done, total, f"RL-central, plane {k + 1} of {n}"))

        def on_iteration(it: int, its: int, base=done, k=k) -> None:
            report(Progress("compare", base + it, total, f"SV-RL iteration {it}/{its}, plane {k + 1} of {n}"))

        sv[idx] = sv_richardson_lucy(plane, op, iterations, should_stop=should_stop, on_iteration=on_iteration)
        done += iterations
        if should_stop():
            return JobResult(cancelled=True)
    return JobResult({"RL-central": rl, "SV-RL": sv})


# -- evaluate -------------------------------------------------------------------------------------
def evaluate_job(gt, restored, blurred, bin: int, volumes: bool = False, *, report: Report,
                 should_stop: ShouldStop) -> JobResult:
    """Quality report, error-by-position map and radial PSNR profiles.

    ``volumes``: the images are (..., Z, Y, X) volumes: the report also gives PSNR by depth
    (``psnr_by_depth``, :func:`~napari_coordgate.metrics.quality_report`) and the error map is a (Z, Y, X) volume,
    each plane's map averaged over the volumes; otherwise the map is (Y, X), averaged over all planes.
    """
    from napari_coordgate import metrics

    rep = metrics.quality_report(gt, restored, blurred, volumes=volumes)
    if volumes:
        emap = np.stack([metrics.error_map(gt[..., z, :, :], restored[..., z, :, :], bin)
                         for z in range(np.shape(gt)[-3])])
    else:
        emap = metrics.error_map(gt, restored, bin)
    r, prof = metrics.radial_profile(gt, restored, data_range=rep["data_range"])
    radial = {"restored": prof}
    if blurred is not None:
        radial["blurred"] = metrics.radial_profile(gt, blurred, data_range=rep["data_range"])[1]
    return JobResult(rep, extra={"error_map": emap, "radius": r, "radial": radial})


# -- calibrate ------------------------------------------------------------------------------------
@dataclass
class CalibrationOutcome:
    """What the Calibrate tab shows of a calibration, all computed off the GUI thread.

    ``result`` (a :class:`~napari_coordgate.calibration.result.CalibrationResult`) with ``psf_grid`` (the model's
    PSFs tiled, :func:`~napari_coordgate.optics.models.render_psf_grid`) and ``fwhm_map`` (bead FWHM across the
    field, :func:`~napari_coordgate.calibration.report.bead_fwhm_map`); of a bead z-stack, ``result`` a
    :class:`~napari_coordgate.calibration.zstack.ZStackCalibration` with ``psf_grid`` (D, K s', K s') the node PSFs
    tiled plane by plane (:func:`psf_grid_3d`) and ``focus_map`` (H, W) the best-focus map in µm relative to the
    field centre, ``fwhm_map`` None; or, when the calibration failed after
    detecting spots, ``error``, the :class:`~napari_coordgate.calibration.CalibrationError` with its bead table
    (``error.beads``), and the rest None.
    """

    result: Any = None
    psf_grid: np.ndarray | None = None
    fwhm_map: np.ndarray | None = None
    error: Exception | None = None
    focus_map: np.ndarray | None = None  # a z-stack's: best focus (µm from the centre's) at every pixel of the field


def _calibrate_in_child(images, cfg, source, *, report: Report, should_stop: ShouldStop,
                        workdir) -> CalibrationOutcome:
    from ..calibration.calibrate import calibrate
    from ..calibration.report import bead_fwhm_map
    from ..optics.models import render_psf_grid

    def progress(u) -> None:
        report(Progress("calibrate", int(1000 * u.progress), 1000, f"{u.stage}: {u.message}"))

    result = calibrate(images, **cfg.calibrate_kwargs(), source=source, report=progress, should_stop=should_stop)
    report(Progress("calibrate", 1000, 1000, "drawing the PSF grid and the FWHM map"))
    return CalibrationOutcome(result, render_psf_grid(result.model, result.field_shape),
                              bead_fwhm_map(result.beads, result.field_shape))


def psf_grid_3d(psfs: np.ndarray, gap: int = 2) -> np.ndarray:
    """(K, K, D, s, s) node PSFs tiled as in the field, plane by plane: (D, K s + (K + 1) gap, K s + (K + 1) gap)
    float32, each node scaled to the peak of its volume (so its focus shows as the plane where it is brightest)."""
    k, _, d, s, _ = psfs.shape
    peaks = np.maximum(psfs.max(axis=(2, 3, 4), keepdims=True), 1e-30)
    psfs = np.nan_to_num(psfs / peaks).astype(np.float32)
    side = k * s + (k + 1) * gap
    out = np.zeros((d, side, side), np.float32)
    for i in range(k):
        for j in range(k):
            r, c = gap + i * (s + gap), gap + j * (s + gap)
            out[:, r : r + s, c : c + s] = psfs[i, j]
    return out


def focus_map_field(result) -> np.ndarray:
    """A z-stack calibration's best-focus surface at every pixel of its field, µm relative to the field centre
    (:meth:`~napari_coordgate.calibration.zstack.ZStackCalibration.focus_map_um` at the pixel centres), float32."""
    from ..calibration.zstack import focus_surface
    from ..coords import field_position

    h, w = result.field_shape
    c = np.array(result.focus_coefficients, dtype=np.float64)
    c[0] = 0.0
    y, x = np.meshgrid(field_position(np.arange(h), h), field_position(np.arange(w), w), indexing="ij")
    return (focus_surface(c, y, x) * result.z_step_um).astype(np.float32)


def _calibrate_zstack_in_child(stack, settings: dict, source, *, report: Report, should_stop: ShouldStop,
                               workdir) -> CalibrationOutcome:
    from ..calibration.zstack import calibrate_zstack

    def progress(u) -> None:
        report(Progress("calibrate", int(1000 * u.progress), 1000, f"{u.stage}: {u.message}"))

    result = calibrate_zstack(stack, **settings, source=source, report=progress, should_stop=should_stop)
    report(Progress("calibrate", 1000, 1000, "drawing the 3-D PSF grid and the best-focus map"))
    return CalibrationOutcome(result, psf_grid_3d(result.model.psf_grid(result.field_shape)[0]),
                              focus_map=focus_map_field(result))


def calibrate_job(images, cfg, source: Sequence[str] = (), z_step_um: float | None = None, *, report: Report,
                  should_stop: ShouldStop) -> CalibrationOutcome:
    """Bead image(s) and a :class:`~napari_coordgate.config.CalibrateConfig` -> :class:`CalibrationOutcome`, in a
    separate process (the pupil fit runs torch autograd, which must not load the compiler stack into the viewer's
    process; see :mod:`napari_coordgate.runners.isolate`). ``source``: names of the bead images (provenance).

    With ``z_step_um``, ``images`` is one bead z-stack (Z, Y, X) with planes that far apart, calibrated by
    :func:`~napari_coordgate.calibration.zstack.calibrate_zstack` with the settings of ``cfg`` it takes
    (:func:`~napari_coordgate.app.axes.zstack_settings`).

    A :class:`~napari_coordgate.calibration.CalibrationError` that carries its bead table (too few usable beads,
    all saturated, ...) is returned as the outcome's ``error``, so that the table can be shown; any other error
    is raised.
    """
    from ..calibration import CalibrationError
    from ..runners.isolate import run_isolated
    from .axes import zstack_settings

    if z_step_um is None:
        target, args = "_calibrate_in_child", (images, cfg)
    else:
        target, args = "_calibrate_zstack_in_child", (images, zstack_settings(cfg, z_step_um)[0])
    try:
        return run_isolated(f"napari_coordgate.app.jobs:{target}", *args, list(source),
                            report=report, should_stop=should_stop)
    except CalibrationError as exc:
        if exc.beads is None:
            raise
        return CalibrationOutcome(error=exc)
