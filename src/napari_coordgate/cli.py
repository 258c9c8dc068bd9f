"""The ``napari-coordgate`` command: the same steps as the napari widgets, headless, for batch work.

::

    napari-coordgate demo [-o OUTDIR] [--minutes M]
    napari-coordgate simulate SHARP.tif [...] --psf PRESET|CONFIG.json|MODEL.cgpsf -o OUTDIR [--seed S]
    napari-coordgate train --sharp S.tif [...] [--blurred B.tif [...]] [--psf PRESET|CONFIG.json|MODEL.cgpsf] -o MODEL
            [--depth D] [--channels C] [--gate coordgate|none|coordconv] [--prefilter none|wiener]
            [--minutes M | --epochs N]
            [--device auto|cpu|cuda|cuda:N|mps] [--seed S] [--resume CHECKPOINT] [--threads T] [...]
    napari-coordgate apply -m MODEL|PACKAGE.zip INPUT.tif|INPUT.zarr [...] -o OUT[.zarr] [--tile N] [--roi Y,X]
            [--binning B] [--device ...] [--precision fp32|bf16|fp16] [--batch-tiles N]
            [--dask local|SCHEDULER_ADDRESS [--workers N]]
    napari-coordgate evaluate -m MODEL --sharp S.tif --blurred B.tif [--json REPORT.json] [--png REPORT.png]
    napari-coordgate evaluate -m MODEL --beads BEADS.tif [--holdout-from CALIBRATION.json] [--json REPORT.json]
    napari-coordgate export -m MODEL -o PACKAGE.zip [--test-image FIELD.tif]
    napari-coordgate calibrate BEADS.tif [...] -o PSF.cgpsf [--target auto|beads|array] [--model auto|pupil|grid]
            [--grid K]
            [--na NA --wavelength NM --immersion N] [--pixel-size UM] [--bead-diameter NM] [--psf-size PX]
            [--min-snr SNR] [--holdout F] [--png REPORT.png] [--json REPORT.json]
    napari-coordgate calibrate BEADS_ZYX.tif --z-step UM [--psf-depth PLANES] -o PSF3D.cgpsf [...]

Option flags, their types, ranges, choices, defaults and help come from the configs in ``config.py``.

Errors are one clear message and a non-zero exit, never a traceback (``--debug`` shows the traceback).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Sequence

from ._version import __version__
from .runners.console import adapt_with_bar as _adapt_with_bar
from .runners.console import format_table as _format_table
from .runners.console import predict_with_bar as _predict_with_bar
from .runners.console import progress
from .runners.console import train_with_bar as _train_with_bar

__all__ = ["main", "build_parser"]


class CLIError(Exception):
    """An error the user can fix; printed as one line."""


# -- helpers --------------------------------------------------------------------------------------
def _writable_file(path: Path) -> Path:
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise CLIError(f"output folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise CLIError(f"output folder {folder} is not writable")
    return path


def _output_file(text: str, suffix: str | None = None) -> Path:
    """The file an ``-o``, ``--json`` or ``--png`` names (``suffix`` added if missing) in a writable folder.

    A folder is refused: ``-o DIR/`` would otherwise write ``DIR.cgpsf`` beside it.
    """
    from .model_io import with_suffix

    path = with_suffix(text, suffix) if suffix else Path(text)
    if text.endswith(("/", os.sep)) or Path(text).is_dir() or path.is_dir():
        name = Path(text) / f"NAME{suffix or ''}"
        raise CLIError(f"{text} is a folder; give a file name (e.g. {name})")
    return _writable_file(path)


def _write_json(path: Path, text: str) -> Path:
    """A JSON report, written atomically (never a truncated file under its final name)."""
    from .model_io import atomic_write_bytes

    return atomic_write_bytes(path, text.encode("utf-8"))


def _write_png(path: Path, draw) -> Path:
    """A figure written atomically: ``draw(tmp)`` writes the PNG to a temporary file renamed over ``path``."""
    from .model_io import atomic_write

    return atomic_write(path, draw)


def _model_inputs(model: str) -> list[Path]:
    """The files ``-m MODEL`` may name (as given, or with the model suffix): inputs no output may replace."""
    from .model_io import with_suffix

    return [Path(model), with_suffix(model)]


def _out_dir(path: Path) -> Path:
    if path.exists() and not path.is_dir():
        raise CLIError(f"{path} exists and is not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CLIError(f"cannot create output folder {path}: {exc.strerror}") from None
    if not os.access(path, os.W_OK):
        raise CLIError(f"output folder {path} is not writable")
    return path


def _set_threads(n: int) -> None:
    import torch

    if n > 0:
        torch.set_num_threads(n)


# -- flags from the configs (config.py is the one home of every option's name, bounds, choices, default) --
# the options a user sets on each command; everything else keeps the config's default
MODEL_FLAGS = ("depth", "channels", "gate", "prefilter", "ndim")
MODEL_HELP = "model file (.cgmodel, suffix optional) or a bioimage.io package (.zip) exported by napari-coordgate"
ADAPT_FLAGS = ("crop", "batch", "steps_per_epoch", "lr", "alpha", "transfer", "val_tile", "seed", "device", "threads",
               "gain", "offset")
TRAIN_FLAGS = ("crop", "crop_depth", "batch", "steps_per_epoch", "lr", "seed", "device", "threads", "register",
               "photons", "brightness", "intensity", "amp")
PREDICT_FLAGS = ("tile", "binning", "device", "precision", "batch_tiles", "threads", "resample_z")
CALIBRATE_FLAGS = ("target", "model", "grid", "na", "wavelength_nm", "immersion", "pixel_size_um", "bead_diameter_nm",
                   "psf_size", "min_snr", "holdout", "device")
# the calibrate flags named by what users type (and as before CalibrateConfig): the unit is the field's, in its help
CALIBRATE_FLAG_NAMES = {"wavelength_nm": ("--wavelength", "NM"), "pixel_size_um": ("--pixel-size", "UM"),
                        "bead_diameter_nm": ("--bead-diameter", "NM"), "grid": ("--grid", "K"),
                        "psf_size": ("--psf-size", "PX"), "min_snr": ("--min-snr", "SNR"),
                        "holdout": ("--holdout", "F"), "immersion": ("--immersion", "N")}


def _add_config_flags(p, cls, names, *, defaults: dict | None = None,
                      flags: dict[str, tuple[str, str]] | None = None) -> None:
    """One ``--name`` flag per config field, typed, with its choices, default and help from ``config.py``.

    ``flags`` renames some: field -> (flag, metavar), e.g. ``wavelength_nm`` -> ``("--wavelength", "NM")``.
    """
    from .config import field_specs

    for spec in field_specs(cls, names):
        default = (defaults or {}).get(spec.name, spec.default)
        flag, metavar = (flags or {}).get(spec.name, ("--" + spec.name.replace("_", "-"), spec.name.upper()))
        help_ = spec.help if default == spec.default else spec.help.replace(f"default {spec.default}",
                                                                            f"default {default}")
        if spec.kind is bool:
            p.add_argument(flag, dest=spec.name, action=argparse.BooleanOptionalAction, default=default, help=help_)
        else:
            choices = spec.options if spec.options is not None and not spec.device else None
            p.add_argument(flag, dest=spec.name, type=spec.kind, default=default, choices=choices, help=help_,
                           metavar=metavar if choices is None else None)


def _config_from_flags(cls, args, names, *, flags: dict[str, tuple[str, str]] | None = None, **extra):
    """The config built from the flags (bounds are checked there: one clear error for a bad value, naming the flag
    where ``flags`` renamed it)."""
    from .config import ConfigError

    try:
        return cls(**{n: getattr(args, n) for n in names if hasattr(args, n)}, **extra)
    except ConfigError as exc:
        text = str(exc)
        for name, (flag, _) in (flags or {}).items():
            text = text.replace(f"{cls.__name__}.{name} ", f"{cls.__name__}.{name} ({flag}) ")
        raise ConfigError(text) from None


# -- commands -------------------------------------------------------------------------------------
def _cmd_models(args: argparse.Namespace) -> int:
    """Parameter counts of the U-Net family, and one CoordGate U-Net run on a bundled image."""
    import numpy as np
    import torch

    from .config import ModelConfig
    from .nn import build_model, count_parameters
    from .samples.specimens import bundled_specimen

    _set_threads(args.threads)
    print(f"Parameters at base channels {args.channels}, growth 2 (gate MLP hidden {ModelConfig().gate_hidden}):")
    print(f"{'depth':>5} {'plain':>12} {'coordgate':>12} {'coordconv':>12}")
    for depth in range(1, 7):
        counts = [
            count_parameters(build_model(ModelConfig(depth=depth, channels=args.channels, gate=g)))
            for g in ("none", "coordgate", "coordconv")
        ]
        print(f"{depth:>5} " + " ".join(f"{c:>12,}" for c in counts))
    image = bundled_specimen("cell")
    model = build_model(ModelConfig(depth=args.depth, channels=args.channels, gate="coordgate")).eval()
    with torch.no_grad():
        out = model(torch.from_numpy(np.ascontiguousarray(image))[None, None])
    print(f"CoordGate U-Net({args.depth}) on the bundled 'cell' image {image.shape}: output shape "
          f"{tuple(out.shape[-2:])}, {count_parameters(model):,} parameters")
    return 0


def _cmd_simulate(args: argparse.Namespace) -> int:
    import numpy as np

    from .checks import check_image
    from .image_io.tiff import read_tiff, write_tiff
    from .model_io import resolve_psf
    from .optics.blur import synthesize_pairs
    from .outputs import check_outputs

    psf = resolve_psf(args.psf)
    outdir = Path(args.output)
    dests = []
    for p in args.sharp:
        name = Path(p).name
        stem = name[: -len(".ome.tif")] if name.endswith(".ome.tif") else Path(p).stem
        dests.append(outdir / f"{stem}_blurred.tif")
    check_outputs(dests, [*args.sharp, args.psf])
    _out_dir(outdir)
    noise = {"photons": args.photons or None, "read_noise": args.read_noise, "device": args.device}
    for i, (p, dest) in enumerate(zip(args.sharp, dests)):
        img = read_tiff(p)
        if psf.ndim == 3:  # a 3-D PSF model blurs z-stacks (Z, Y, X) or series of them in 3-D
            from .optics.blur3d import check_volume, synthesize_pairs3d

            if np.ndim(img.data) == 2:
                raise CLIError(f"{p} is a 2-D image; the 3-D PSF model {psf.name!r} blurs z-stacks (Z, Y, X): give a "
                               "z-stack, or a 2-D PSF model")
            sharp = check_volume(img.data, str(p), max_ndim=4)
            _, blurred = synthesize_pairs3d(sharp, psf, seed=args.seed + i, **noise)
        else:
            sharp = check_image(img.data, str(p), max_ndim=3, allow_constant=False)
            _, blurred = synthesize_pairs(sharp, psf, seed=args.seed + i, **noise)
        dest = write_tiff(dest, np.asarray(blurred, np.float32), img)
        print(f"{p} -> {dest}")
    return 0


def _model_cfg(args):
    from .config import ModelConfig

    return _config_from_flags(ModelConfig, args, MODEL_FLAGS)


def _train_cfg(args):
    from .config import TrainConfig

    budget = {"epochs": args.epochs, "minutes": 0.0} if args.epochs else {"minutes": args.minutes}
    return _config_from_flags(TrainConfig, args, TRAIN_FLAGS, **budget)


def _predict_cfg(args):
    from .config import PredictConfig

    return _config_from_flags(PredictConfig, args, PREDICT_FLAGS)


def _builtin_specimens(psf, seed: int, specimens: str = "mixed", validation: bool = False):
    """Sharp training (or held-out validation) images when the user gives none, saying what they are
    (:func:`~napari_coordgate.samples.specimens.builtin_fields`)."""
    from .samples.specimens import builtin_fields

    try:
        fields, what = builtin_fields(psf, seed, specimens, validation)
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    print(f"{'validation' if validation else 'training'} images: {what}")
    return fields


def _train_outputs(args) -> tuple[Path, Path, Path | None]:
    """(model, checkpoint, checkpoint to resume from) of ``train``; none of the outputs may replace an input (the
    checkpoint of a resumed run is its own to update)."""
    from .model_io import CHECKPOINT_SUFFIX, MODEL_SUFFIX, existing_file
    from .outputs import check_outputs, real_path

    out = _output_file(args.output, MODEL_SUFFIX)
    ckpt = out.with_suffix(CHECKPOINT_SUFFIX)
    resume = existing_file(args.resume, CHECKPOINT_SUFFIX) if args.resume else None
    inputs = [*(args.sharp or []), *(args.blurred or []), args.psf]
    check_outputs({out: "model", ckpt: "checkpoint"}, inputs)
    if resume is not None and real_path(resume) != real_path(ckpt):
        check_outputs({out: "model", ckpt: "checkpoint"}, [resume])
    return out, ckpt, resume


def _stamp(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns


def _report_written(out: Path, ckpt: Path, before: dict, resume: Path | None, interrupted: bool) -> None:
    """Say which of the run's files it wrote, and plainly when there is none (never announce a file not written)."""
    wrote = {p: _stamp(p) is not None and _stamp(p) != before[p] for p in (out, ckpt)}
    stream = sys.stderr if interrupted else sys.stdout
    if not wrote[out]:
        print(f"no model was written to {out} (stopped before the first validation)", file=stream)
    elif interrupted:
        print(f"best model so far: {out}", file=stream)
    if wrote[ckpt]:
        print(f"checkpoint: {ckpt} (continue with --resume {ckpt})", file=stream)
    elif resume is not None:
        print(f"no new checkpoint (no epoch ended); {resume} still resumes the run", file=stream)
    else:
        print("no checkpoint was written (stopped before the first epoch ended)", file=stream)


def _cmd_train(args: argparse.Namespace) -> int:
    from .model_io import resolve_psf

    out, ckpt, resume = _train_outputs(args)
    if args.blurred and not args.sharp:
        raise CLIError("--blurred needs the sharp images of the same fields (--sharp)")
    if not args.blurred and not args.psf:
        raise CLIError("give calibration pairs (--blurred, with --psf too if the PSF model is known) or a PSF "
                       "model (--psf) to simulate pairs from")
    if args.blurred and len(args.blurred) != len(args.sharp):
        raise CLIError(f"{len(args.sharp)} sharp file(s) but {len(args.blurred)} blurred file(s); "
                       "the k-th sharp file pairs with the k-th blurred file")
    if args.prefilter != "none" and not args.psf:
        raise CLIError("--prefilter wiener needs the PSF model of the optics: add --psf PRESET|CONFIG.json|MODEL.cgpsf")
    model_cfg, train_cfg = _model_cfg(args), _train_cfg(args)  # a bad flag or --psf fails before images are read
    psf = resolve_psf(args.psf) if args.psf else None
    if model_cfg.ndim == 3 or (psf is not None and psf.ndim == 3):
        source, model_cfg = _volume_source(args, psf, model_cfg)
    else:
        source = _plane_source(args, psf)
    _set_threads(args.threads)
    before = {p: _stamp(p) for p in (out, ckpt)}
    try:
        res = _train_with_bar(model_cfg, train_cfg, source, out_path=out, checkpoint_path=ckpt,
                              resume=resume, label=f"train {args.gate} U-Net({args.depth})"
                                                   f"{' 3-D' if model_cfg.ndim == 3 else ''}")
    except KeyboardInterrupt:  # a second Ctrl-C, or SIGTERM: the files written so far are complete
        _report_written(out, ckpt, before, resume, interrupted=True)
        raise
    if _stamp(out) != before[out]:
        print(f"model: {out}  (best validation PSNR {res.best_val_psnr:.2f} dB at epoch {res.best_epoch}, "
              f"{res.stopped}, device {res.device})")
    _report_written(out, ckpt, before, resume, interrupted=False)
    stalled = res.stall_message()
    if stalled:
        print(f"napari-coordgate: warning: {stalled} (--seed)", file=sys.stderr)
    if res.stopped == "diverged":
        why = next((u.message for u in reversed(res.history) if u.message.startswith("the loss became")), "")
        raise CLIError(f"training diverged ({why}): the best model so far is kept at {out}; train again with a lower "
                       "--lr")
    # Ctrl-C stops training and keeps the best model, but the run did not finish: the exit status says so
    return 130 if res.stopped == "stopped" else 0


def _plane_source(args, psf):
    """What a 2-D model trains on: calibration pairs, or sharp images (the user's or built-in) and a PSF model."""
    from .engine import PairSource, SimulatedSource
    from .image_io.read import read_planes

    if args.sharp and args.specimens:
        raise CLIError("--specimens chooses the built-in training specimens; with --sharp your images train instead: "
                       "leave one out")
    sharp = (read_planes(args.sharp, "sharp") if args.sharp
             else _builtin_specimens(psf, args.seed, args.specimens or "mixed"))
    if args.blurred:
        source = PairSource(sharp, read_planes(args.blurred, "blurred"), psf=psf)
    else:
        val = None if args.sharp else _builtin_specimens(psf, args.seed, validation=True)
        source = SimulatedSource(sharp, psf, val_sharp=val)
    return source


def _volume_source(args, psf, model_cfg):
    """What a 3-D model trains on (z-stack pairs, or sharp volumes and a 3-D PSF model), and its config with the
    z pooling that the z-step and pixel size call for."""
    from dataclasses import replace

    from .config import z_pool_start_for
    from .engine import PairSource, SimulatedSource
    from .image_io.read import read_volumes

    if args.specimens:
        raise CLIError("--specimens chooses the built-in fields of a 2-D model; a 3-D model trains on procedural "
                       "volumes (or --sharp volumes): leave it out")
    if psf is not None and psf.ndim != 3:
        raise CLIError(f"--ndim 3 needs a 3-D PSF model (a pupil through focus, or 3-D PSFs measured from a bead "
                       f"z-stack); {args.psf} is 2-D")
    model_cfg = replace(model_cfg, ndim=3)
    z_step, pixel = args.z_step, None if psf is None else psf.pixel_size_um
    if args.sharp:
        sharp, meta_step, meta_pixel = read_volumes(args.sharp, "sharp")
        z_step, pixel = z_step or meta_step, pixel or meta_pixel
    else:
        sharp = _builtin_volumes(psf, args.seed)
    z_step = z_step or (None if psf is None else psf.z_step_um)
    if z_step is None:
        raise CLIError("give the z-step of the volumes (--z-step UM): their metadata states none")
    if pixel:  # pool z only once the xy pooling has reached the z-step
        model_cfg = replace(model_cfg, z_pool_start=z_pool_start_for(z_step, pixel))
    if args.blurred:
        blurred, _, _ = read_volumes(args.blurred, "blurred")
        return PairSource(sharp, blurred, psf=psf, z_step_um=z_step), model_cfg
    val = None if args.sharp else _builtin_volumes(psf, args.seed, validation=True)
    return SimulatedSource(sharp, psf, val_sharp=val), model_cfg


def _builtin_volumes(psf, seed: int, validation: bool = False):
    """Sharp training (or held-out validation) volumes when the user gives none
    (:func:`~napari_coordgate.samples.volumes.builtin_volumes`), saying what they are."""
    from .samples.volumes import builtin_volumes

    try:
        volumes, what = builtin_volumes(psf, seed, validation)
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    print(f"{'validation' if validation else 'training'} volumes: {what}")
    return volumes


def _cmd_adapt(args: argparse.Namespace) -> int:
    from .config import AdaptConfig
    from .image_io.read import read_planes
    from .model_io import MODEL_SUFFIX, resolve_psf
    from .model_io.bioimageio import load_any
    from .outputs import check_outputs

    out = _output_file(args.output, MODEL_SUFFIX)
    check_outputs({out: "model"}, [*args.images, *_model_inputs(args.model), args.psf])
    budget = {"epochs": args.epochs, "minutes": 0.0} if args.epochs else {"minutes": args.minutes}
    cfg = _config_from_flags(AdaptConfig, args, ADAPT_FLAGS, **budget)  # a bad flag fails before anything is read
    roi = _roi(args.roi)
    if args.binning < 1:
        raise CLIError(f"--binning must be a positive integer, got {args.binning}")
    saved = load_any(args.model, "cpu")
    psf = resolve_psf(args.psf) if args.psf else None
    images = read_planes(args.images, "image")
    _set_threads(args.threads)
    res = _adapt_with_bar(saved, images, cfg, psf=psf, roi=roi, binning=args.binning, out_path=out,
                          label=f"adapt on {len(images)} plane(s)")
    print(res.noise.describe())
    change = f"held-out consistency {res.criterion_before:.4f} -> {res.criterion_best:.4f}"
    if res.kept_original:
        print(f"adaptation did not improve the held-out consistency ({res.criterion_before:.4f}, the original's, "
              f"not beaten in {res.steps} steps): the original model is kept and written to {out}")
    else:
        print(f"model: {out}  ({change}, {res.steps} steps, {res.stopped}, device {res.device})")
    if res.stopped == "diverged":
        raise CLIError(f"adaptation diverged: the best state so far is kept at {out}; adapt again with a lower --lr")
    return 130 if res.stopped == "stopped" else 0


def _roi(text):
    from .config import ConfigError, parse_roi

    try:
        return parse_roi(text)
    except ConfigError as exc:
        raise CLIError(f"--roi: {exc}") from None


def _apply_dask(args, cfg, roi, jobs) -> int:
    """``apply --dask``: every plane (a 3-D model: every z-slab of every volume) a dask.distributed task; each input
    into one OME-Zarr store."""
    from .engine.prediction import volume_slabs
    from .image_io.omezarr import create_ome_zarr
    from .image_io.read import open_image
    from .model_io.bioimageio import load_any
    from .runners.distributed import ImageSource, apply_distributed, connect

    threads = args.threads or 1
    inputs = [(open_image(p), p, dest) for p, dest in jobs]  # missing or bad inputs fail before a cluster starts
    with connect(args.dask, workers=args.workers, threads=threads) as client:  # nothing is written before this
        saved = load_any(args.model)
        n_workers = len(client.scheduler_info()["workers"])
        for image, p, dest in inputs:
            _warn_pixel_size(saved, image.pixel_size_um, p, cfg.binning)
            data = image.data
            z_step = image.z_step_um if saved.config.ndim == 3 else None  # a 3-D model refuses another z-step
            if saved.config.ndim == 3:  # ... before its output is created
                volume_slabs(saved, data.shape, z_step_um=z_step, resample_z=cfg.resample_z)
            t0 = time.perf_counter()
            writer = create_ome_zarr(dest, data.shape, axes=image.axes, scale=image.scale,
                                     translation=image.translation, overwrite=args.overwrite)
            with writer, progress(Path(p).name, "plane") as on_progress:
                apply_distributed(client, saved, ImageSource(str(Path(p).resolve()), tuple(data.shape)), writer,
                                  roi=roi, predict_kwargs=cfg.predict_kwargs(), threads=threads,
                                  on_progress=on_progress, z_step_um=z_step)
            print(f"{p} -> {dest}  ({data.size / 1e6:.1f} MP in {time.perf_counter() - t0:.1f} s on {n_workers} "
                  f"dask worker(s), {threads} torch thread(s) each)")
    return 0


def _warn_pixel_size(saved, have: float | None, path, binning: int) -> None:
    """A warning when an image's pixel size (metadata, µm) differs from the one its model's PSF model was measured
    at."""
    from .optics.psf import PSFConfig

    psf = saved.psf
    if have is None or psf is None or psf.pixel_size_um is None:
        return
    if isinstance(psf, PSFConfig) and psf.model == "gaussian":  # a Gaussian config's pixel size is nominal
        return
    want = psf.pixel_size_um * binning
    if have is not None and abs(have - want) > 0.02 * want:
        print(f"napari-coordgate: warning: {path} has {have:.4g} µm pixels but the model was calibrated at "
              f"{want:.4g} µm; its PSFs do not match this image's sampling", file=sys.stderr)


def _apply_jobs(args) -> list[tuple[str, Path]]:
    """(input, output) of each image ``apply`` writes, checked before anything is read: no output overlaps an input
    or another output, and a zarr store is replaced only if napari-coordgate wrote it (or with --overwrite)."""
    from .image_io.omezarr import LOCK_SUFFIX, PARTIAL_SUFFIX, check_replaceable, is_zarr
    from .outputs import check_outputs

    out = Path(args.output)
    as_folder = args.output.endswith(("/", os.sep)) or out.is_dir()
    many = len(args.inputs) > 1 or (as_folder and not is_zarr(out))
    jobs, outputs = [], {}
    for p in args.inputs:
        name = Path(p).name
        if many and args.dask and not is_zarr(name):
            name = (name[: -len(".ome.tif")] if name.endswith(".ome.tif") else Path(name).stem) + ".zarr"
        dest = out / name if many else out
        if args.dask and not is_zarr(dest):
            raise CLIError(f"--dask writes OME-Zarr: give -o OUT.zarr (or a folder), not {dest}")
        outputs[dest] = "output"
        if is_zarr(dest):
            for suffix in (PARTIAL_SUFFIX, LOCK_SUFFIX):
                outputs[dest.with_name(dest.name + suffix)] = f"output's {suffix[1:]} file"
        jobs.append((p, dest))
    check_outputs(outputs, [*args.inputs, *_model_inputs(args.model)])
    for _, dest in jobs:
        if is_zarr(dest):
            check_replaceable(dest, overwrite=args.overwrite)
    if many:
        _out_dir(out)
    else:
        _writable_file(out)
    return jobs


def _cmd_apply(args: argparse.Namespace) -> int:
    from .devices import on_device, resolve_device
    from .image_io.omezarr import create_ome_zarr, is_zarr
    from .image_io.read import open_image
    from .image_io.tiff import write_tiff_streamed
    from .model_io.bioimageio import load_any

    cfg, roi = _predict_cfg(args), _roi(args.roi)
    if args.dask is not None:  # '' or a malformed address: one line before anything is read or contacted
        from .runners.distributed import parse_dask_target

        args.dask = parse_dask_target(args.dask)
    if args.workers is not None and args.dask != "local":
        raise CLIError("--workers sizes a local cluster: add --dask local (a cluster at an address has its own)")
    jobs = _apply_jobs(args)
    if args.dask:
        return _apply_dask(args, cfg, roi, jobs)
    saved = load_any(args.model)
    # the network in the prediction device's place and layout once, so that every input reuses it and its gates
    saved.model = on_device(saved.model, resolve_device(cfg.device))
    _set_threads(args.threads)
    for p, dest in jobs:
        image = open_image(p)
        data = image.data
        _warn_pixel_size(saved, image.pixel_size_um, p, cfg.binning)
        t0 = time.perf_counter()

        z_step = image.z_step_um if saved.config.ndim == 3 else None  # a 3-D model refuses another z-step

        def run(target, data=data, p=p, z_step=z_step):
            return _predict_with_bar(saved, data, label=Path(p).name, roi=roi, out=target, z_step_um=z_step,
                                     **cfg.predict_kwargs())

        if is_zarr(dest):  # OME-Zarr: at OUT.zarr.partial until every plane is written
            with create_ome_zarr(dest, data.shape, axes=image.axes, scale=image.scale,
                                 translation=image.translation, overwrite=args.overwrite) as writer:
                run(writer).finalize()
        else:  # memory-mapped out: a stack larger than RAM goes through tile by tile
            write_tiff_streamed(dest, data.shape, run, image.tiff)
        print(f"{p} -> {dest}  ({data.size / 1e6:.1f} MP in {time.perf_counter() - t0:.1f} s)")
    return 0


def _table_rings(rings: list[dict]) -> list[dict]:
    # a ring outside the image (the centre of a corner ROI) has no PSNR: the table shows nan, the JSON null
    return [dict(d, psnr=float("nan") if d["psnr"] is None else d["psnr"]) for d in rings]


def _report_outputs(args, input_lists) -> None:
    """``evaluate``'s --json and --png: files (not folders) in writable folders that replace no input."""
    from .outputs import check_outputs

    outputs = {_output_file(t): what for t, what in ((args.json, "JSON report"), (args.png, "figure")) if t}
    check_outputs(outputs, [p for paths in input_lists if paths for p in paths] + _model_inputs(args.model))


def _format_depth_table(rep: dict) -> str:
    """PSNR by depth (planes z0 to z1 - 1), blurred and restored, one row per slab."""
    lines = [f"{'planes':<12}{'blurred':>9}{'restored':>10}", "-" * 31]
    for b, r in zip(rep["psnr_by_depth_blurred"], rep["psnr_by_depth"]):
        z0, z1 = r["planes"]
        lines.append(f"{f'{z0}-{z1 - 1}':<12}{b['psnr']:>9.2f}{r['psnr']:>10.2f}")
    return "\n".join(lines)


def _cmd_evaluate(args: argparse.Namespace) -> int:
    import numpy as np

    from .engine import field_geometry
    from .image_io.read import read_planes, read_volumes
    from .metrics import quality_report
    from .model_io.bioimageio import load_any
    from .report import write_report_png

    _report_outputs(args, [args.sharp, args.blurred, [args.beads] if args.beads else None,
                           [args.holdout_from] if args.holdout_from else None])
    if args.holdout_from:
        if not args.beads:
            raise CLIError("--holdout-from scores held-out beads in a bead image: add --beads IMG (the image that "
                           "was calibrated)")
        return _evaluate_holdout(args, _read_report(args.holdout_from))
    saved = load_any(args.model)
    if args.beads:
        return _evaluate_beads(args, saved)
    if not (args.sharp and args.blurred):
        raise CLIError("give --sharp and --blurred images of the same fields, or a bead image (--beads)")
    z_step = None
    if saved.config.ndim == 3:  # volumes: scored by ring and by depth
        (sharp, z_step, _), (blurred, _, _) = read_volumes(args.sharp, "sharp"), read_volumes(args.blurred, "blurred")
    else:
        sharp, blurred = read_planes(args.sharp, "sharp"), read_planes(args.blurred, "blurred")
    if sharp.shape != blurred.shape:
        raise CLIError(f"sharp {sharp.shape} and blurred {blurred.shape} must have the same shape")
    cfg, roi = _predict_cfg(args), _roi(args.roi)
    # the rings are those of the training field: an ROI or a binned image sits somewhere inside it
    field_shape, offset = field_geometry(sharp.shape[-2:], saved.field_shape, roi, cfg.binning)
    _set_threads(cfg.threads)
    t0 = time.perf_counter()
    restored = _predict_with_bar(saved, blurred, label="evaluate", roi=roi, z_step_um=z_step, **cfg.predict_kwargs())
    secs = time.perf_counter() - t0
    rep = quality_report(sharp, restored, blurred, field_shape=field_shape, offset=offset,
                         volumes=saved.config.ndim == 3)
    rep.update(model=str(args.model), planes=int(np.prod(sharp.shape[:-2])), mp_per_s=sharp.size / 1e6 / secs,
               field_shape=list(field_shape), offset=list(offset))
    rows = [
        {"method": "blurred", "psnr": rep["psnr_blurred"], "ssim": rep["ssim_blurred"],
         "psnr_by_ring": _table_rings(rep["psnr_by_ring_blurred"])},
        {"method": "restored", "psnr": rep["psnr"], "ssim": rep["ssim"],
         "psnr_by_ring": _table_rings(rep["psnr_by_ring"]), "mp_per_s": rep["mp_per_s"]},
    ]
    print(_format_table(rows))
    if "psnr_by_depth" in rep:
        print(_format_depth_table(rep))
    if args.json:
        print(f"report: {_write_json(Path(args.json), json.dumps(rep, indent=2, default=float))}")
    if args.png:
        def draw(tmp, title=Path(args.model).name):
            # volumes: the figure shows each one's middle plane
            mid = (slice(None), sharp.shape[-3] // 2) if saved.config.ndim == 3 else ()
            write_report_png(tmp, sharp[mid], blurred[mid], restored[mid], title=title)

        print(f"figure: {_write_png(Path(args.png), draw)}")
    return 0


def _evaluate_beads(args, saved) -> int:
    """Bead FWHM by field ring before and after the model (a good model makes it small and uniform)."""

    from .calibration.beadcheck import bead_fwhm_report
    from .engine import field_geometry

    image = _bead_image(args.beads)
    cfg, roi = _predict_cfg(args), _roi(args.roi)
    field_shape, offset = field_geometry(image.shape, saved.field_shape, roi, cfg.binning)
    restored = _predict_with_bar(saved, image, label="beads", roi=roi, **cfg.predict_kwargs())
    rep = bead_fwhm_report(image, restored, field_shape, offset)
    rings = "".join(f"{ring:>9}" for ring in ("centre", "middle", "edge"))
    print(f"{'bead FWHM (px)':<16}{'beads':>7}{'median':>8}{'spread':>8}{rings}")
    for name in ("before", "after"):
        r = rep[name]
        rings = "".join(f"{x['fwhm']:>9.2f}" if x["fwhm"] is not None else f"{'-':>9}" for x in r["rings"])
        print(f"{name:<16}{r['beads']:>7}{r['fwhm_median']:>8.2f}{r['fwhm_spread']:>8.2f}{rings}")
    if args.json:
        print(f"report: {_write_json(Path(args.json), json.dumps(rep, indent=2))}")
    return 0


def _bead_image(path):
    """The one 2-D image ``evaluate --beads`` takes."""
    from .image_io.read import read_planes

    image = read_planes([path], "bead")
    if image.ndim == 3 and image.shape[0] == 1:
        image = image[0]
    if image.ndim != 2:
        raise CLIError(f"--beads expects one 2-D bead image, got shape {image.shape}")
    return image


def _read_report(path) -> dict:
    """A calibration's JSON report (``calibrate --json``)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CLIError(f"{path} does not exist; give the JSON report of a calibration (calibrate --json)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise CLIError(f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}") from None
    try:
        report = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CLIError(f"{path} is not JSON ({exc.msg}, line {exc.lineno}); give the JSON report of a calibration "
                       "(calibrate --json)") from None
    if not isinstance(report, dict):
        raise CLIError(f"{path} is not a calibration report (calibrate --json)")
    return report


def _evaluate_holdout(args, report: dict) -> int:
    """The held-out beads of a calibration, before and after the model: FWHM and energy within the in-focus FWHM,
    per field ring."""
    from .calibration.beadcheck import holdout_beads, holdout_report
    from .engine import field_geometry
    from .model_io.bioimageio import load_any

    image = _bead_image(args.beads)
    y, x = holdout_beads(report, image.shape, what=str(args.holdout_from))  # before the model is loaded
    saved = load_any(args.model)
    cfg, roi = _predict_cfg(args), _roi(args.roi)
    field_shape, offset = field_geometry(image.shape, saved.field_shape, roi, cfg.binning)
    restored = _predict_with_bar(saved, image, label="beads", roi=roi, **cfg.predict_kwargs())
    rep = holdout_report(image, restored, y, x, field_shape, offset)
    rep.update(model=str(args.model), beads_image=str(args.beads), holdout_from=str(args.holdout_from))
    print(f"holdout beads: {rep['matched']} of {rep['holdout_beads']} found in {args.beads} (within "
          f"{rep['match_px']:g} px), {rep['matched'] - rep['outside']} measured; energy within "
          f"{rep['radius_px']:.2f} px (the in-focus FWHM: median of the {rep['radius_ring']} ring before)")
    print(f"{'':<18}{'beads':>7}" + "".join(f"{ring:>9}" for ring in ("centre", "middle", "edge")))
    print(f"{'beads per ring':<18}{rep['before']['beads']:>7}"
          + "".join(f"{r['beads']:>9}" for r in rep["before"]["rings"]))
    for key, label in (("fwhm", "FWHM (px)"), ("energy", "energy")):
        for name in ("before", "after"):
            r = rep[name]
            cells = "".join(f"{x[key]:>9.2f}" if x[key] is not None else f"{'-':>9}" for x in r["rings"])
            print(f"{label + ' ' + name:<18}{r['beads']:>7}{cells}")
    if args.json:
        print(f"report: {_write_json(Path(args.json), json.dumps(rep, indent=2))}")
    return 0


def _calibrate_outputs(args, channels) -> dict[int, dict[str, Path | None]]:
    """Per channel: the PSF model file and the reports ``calibrate`` writes (a suffix ``_cN`` for several
    channels), checked before the fit: files in writable folders, none of them an input or another output."""
    from .model_io import PSF_SUFFIX
    from .outputs import check_outputs

    out = _output_file(args.output, PSF_SUFFIX)
    png = _output_file(args.png) if args.png else None
    js = _output_file(args.json) if args.json else None
    plan, named = {}, {}
    for c in channels:
        suffix = "" if len(channels) == 1 else f"_c{c}"
        files = {"PSF model": out.with_stem(out.stem + suffix),
                 "figure": png.with_stem(png.stem + suffix) if png else None,
                 "JSON report": js.with_stem(js.stem + suffix) if js else None}
        plan[c] = files
        named.update({path: what for what, path in files.items() if path is not None})
    check_outputs(named, args.beads)
    return plan


def _calibrate_cfg(args, metadata_pixel_size: float | None):
    """The calibration's config from the flags, with the pixel size of the images' metadata where --pixel-size is not
    given (a warning when the two differ)."""
    from .config import CalibrateConfig, ConfigError

    cfg = _config_from_flags(CalibrateConfig, args, CALIBRATE_FLAGS, flags=CALIBRATE_FLAG_NAMES)
    given, meta = cfg.pixel_size_um, metadata_pixel_size
    if given and meta and abs(given - meta) > 0.02 * meta:
        print(f"napari-coordgate: warning: --pixel-size {given:g} µm differs from the {meta:.4g} µm the bead "
              "images' metadata state; using --pixel-size", file=sys.stderr)
    if given is None and meta is not None:
        try:
            cfg = cfg.replace(pixel_size_um=meta)
        except ConfigError as exc:
            raise CLIError(f"the bead images' metadata state {meta:g} µm pixels, which cannot be right ({exc}); give "
                           "the pixel size with --pixel-size UM") from None
    return cfg


def _calibration_failed(exc, stack, files: dict, settings: dict) -> None:
    """A calibration that failed after finding spots still writes its --png and --json (every candidate with why it
    was rejected, and the ``settings`` it ran with) and says what to change; the error itself is then raised as one
    line. ``stack``: the (N, H, W) bead images the figure shows (a z-stack's maximum projection)."""
    from .calibration.advice import advice_lines
    from .calibration.report import write_failure_png
    from .calibration.result import failure_json

    if exc.beads is None:
        return
    if files["figure"]:
        print(f"  report: {_write_png(files['figure'], lambda tmp: write_failure_png(exc, stack, tmp))}")
    if files["JSON report"]:
        print(f"  report: {_write_json(files['JSON report'], failure_json(exc, settings))}")
    for line in advice_lines(exc.beads.counts()):
        print(f"  what to change: {line}")


def _is_bead_zstack(args) -> bool:
    """``calibrate`` of a bead z-stack: --z-step given, or one file whose metadata has a z axis of several planes."""
    from .image_io.read import open_image

    if args.z_step is not None or args.psf_depth is not None:
        return True
    if len(args.beads) != 1:
        return False
    image = open_image(args.beads[0])
    names = [a.get("name") for a in image.axes]
    return "z" in names and image.data.shape[names.index("z")] > 1


# the 2-D calibration's settings a z-stack calibration does not take (yet): flag -> what it would need
_NOT_3D = {"target": "--target", "model": "--model pupil (a pupil fit through focus)", "na": "--na",
           "wavelength_nm": "--wavelength", "immersion": "--immersion", "holdout": "--holdout"}


def _calibrate_zstack(args) -> int:
    """``calibrate`` of one bead z-stack: the measured 3-D PSF grid and the best-focus map."""
    from .calibration import CalibrationError
    from .calibration.zstack import calibrate_zstack
    from .config import CalibrateConfig
    from .image_io.read import read_volumes

    cfg = _calibrate_cfg(args, None)
    default = CalibrateConfig()
    given = [flag for name, flag in _NOT_3D.items() if getattr(cfg, name) != getattr(default, name)
             and not (name == "model" and cfg.model == "grid")]
    if given:
        raise CLIError(f"a bead z-stack is calibrated as a measured 3-D PSF grid; {', '.join(given)} not yet in 3-D: "
                       "leave them out")
    if len(args.beads) != 1:
        raise CLIError("give one bead z-stack (Z, Y, X) at a time")
    vols, meta_step, meta_pixel = read_volumes(args.beads, "bead")
    if len(vols) != 1:
        raise CLIError(f"{args.beads[0]} holds {len(vols)} z-stacks; give one bead z-stack (Z, Y, X)")
    z_step = args.z_step if args.z_step is not None else meta_step
    if z_step is None:
        raise CLIError(f"{args.beads[0]} is a z-stack that does not state its z-step: give it with --z-step UM to "
                       "calibrate in 3-D, or give 2-D images of the focal plane")
    cfg = _calibrate_cfg(args, meta_pixel)
    files = _calibrate_outputs(args, [0])[0]
    settings = {"z_step_um": z_step, "pixel_size_um": cfg.pixel_size_um, "grid": cfg.grid, "psf_size": cfg.psf_size,
                "psf_depth": args.psf_depth, "min_snr": cfg.min_snr, "bead_diameter_nm": cfg.bead_diameter_nm or None}
    try:
        res = calibrate_zstack(vols[0], **settings, source=[str(p) for p in args.beads])
    except CalibrationError as exc:
        _calibration_failed(exc, vols[0].max(axis=0)[None], files, settings)
        raise
    _calibration_written(res, files)
    return 0


def _calibration_written(res, files: dict, label: str = "") -> None:
    """Save a calibration's PSF model and its --png / --json reports; say what was found and written."""
    from .model_io import save_psf_model

    written = save_psf_model(files["PSF model"], res.model)
    print(label + res.summary())
    for warning in res.warnings:
        print(f"  warning: {warning}")
    if files["figure"]:
        print(f"  report: {_write_png(files['figure'], res.report_png)}")
    if files["JSON report"]:
        print(f"  report: {_write_json(files['JSON report'], res.to_json())}")
    print(f"PSF model: {written}")


def _cmd_calibrate(args: argparse.Namespace) -> int:
    from .calibration import CalibrationError
    from .calibration.calibrate import calibrate
    from .image_io.read import read_bead_images

    _calibrate_cfg(args, None)  # a bad flag fails before the images are read
    if _is_bead_zstack(args):
        return _calibrate_zstack(args)
    channels, pixel_size = read_bead_images(args.beads)
    plan = _calibrate_outputs(args, channels)
    cfg = _calibrate_cfg(args, pixel_size)
    for c, stack in channels.items():
        files = plan[c]
        try:
            res = calibrate(stack if len(stack) > 1 else stack[0], **cfg.calibrate_kwargs(),
                            source=[str(p) for p in args.beads])
        except CalibrationError as exc:
            _calibration_failed(exc, stack, files, cfg.calibrate_kwargs())
            raise
        _calibration_written(res, files, "" if len(channels) == 1 else f"channel {c}: ")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    import numpy as np

    from .image_io.tiff import read_tiff
    from .model_io.bioimageio import export_package
    from .outputs import check_outputs

    out = _output_file(args.output, ".zip")
    check_outputs({out: "package"}, [args.test_image, *_model_inputs(args.model)])
    test = np.asarray(read_tiff(args.test_image).data) if args.test_image else None
    out = export_package(args.model, out, test_input=test)
    print(f"{args.model} -> {out}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(Path(args.output), minutes=args.minutes, seed=args.seed, threads=args.threads, device=args.device)
    return 0


# -- parser ---------------------------------------------------------------------------------------
def _add_dask_flags(p) -> None:
    p.add_argument("--dask", metavar="local|ADDRESS", help="run the planes as dask.distributed tasks on a new local "
                   "cluster ('local') or on the scheduler at ADDRESS (e.g. tcp://node01:8786); writes OME-Zarr; "
                   "--threads torch threads per worker (default 1) (pip install 'napari-coordgate[distributed]')")
    p.add_argument("--workers", type=int, metavar="N", help="worker processes of --dask local (default: CPU cores "
                   "/ threads)")


def _add_calibrate_parser(sub) -> None:
    from .config import CalibrateConfig

    p = sub.add_parser("calibrate", help="measure the field-dependent PSF from bead images -> PSF model (.cgpsf)")
    p.add_argument("beads", nargs="+", help="2-D images of sub-resolution beads in the focal plane (one field; "
                                             "several files are pooled; a channel axis gives one model per channel), "
                                             "or one z-stack of them through focus (--z-step)")
    p.add_argument("-o", "--output", required=True, help="PSF model file (.cgpsf is added if missing)")
    _add_config_flags(p, CalibrateConfig, CALIBRATE_FLAGS, flags=CALIBRATE_FLAG_NAMES)
    p.add_argument("--z-step", type=float, metavar="UM", help="BEADS is a z-stack through focus (Z, Y, X) with planes "
                   "UM µm apart: measure the 3-D PSF grid and the best-focus map (a z-stack whose metadata states its "
                   "z-step is calibrated in 3-D without this flag)")
    p.add_argument("--psf-depth", type=int, metavar="PLANES", help="z-stack: the 3-D PSFs' depth in planes, odd "
                   "(default: as deep as the stack allows around the slide, up to the PSF's reach)")
    p.add_argument("--png", help="write the calibration report figure (also when too few beads are usable: every "
                                 "candidate marked by why it was rejected)")
    p.add_argument("--json", help="write the calibration report as JSON (also when too few beads are usable: the "
                                  "bead table, counts and the error)")
    p.set_defaults(func=_cmd_calibrate)


def _add_evaluate_parser(sub) -> None:
    from .config import PredictConfig

    p = sub.add_parser("evaluate", help="PSNR/SSIM overall and by field ring, error map")
    p.add_argument("-m", "--model", required=True, help=MODEL_HELP)
    p.add_argument("--sharp", nargs="+", help="TIFF, OME-Zarr or zarr files")
    p.add_argument("--blurred", nargs="+", help="TIFF, OME-Zarr or zarr files")
    p.add_argument("--beads", help="a bead image instead of sharp/blurred pairs: bead FWHM across the field "
                                   "before and after (no ground truth needed)")
    p.add_argument("--holdout-from", metavar="REPORT.json", help="with --beads (the image calibrated): score only the "
                   "beads the calibration's JSON report lists as held out of its fit (calibrate --holdout F)")
    p.add_argument("--json", help="write the report as JSON")
    p.add_argument("--png", help="write the report figure")
    p.add_argument("--roi", help="Y,X of the images' top-left pixel inside the training field")
    _add_config_flags(p, PredictConfig, PREDICT_FLAGS)
    p.set_defaults(func=_cmd_evaluate)


def _add_adapt_parser(sub, psf_help: str) -> None:
    from .config import AdaptConfig

    p = sub.add_parser("adapt", help="fine-tune a model on your own blurred images (no sharp images needed), "
                                     "with the PSF model it carries")
    p.add_argument("-m", "--model", required=True, help=MODEL_HELP)
    p.add_argument("images", nargs="+", help="the blurred images to restore (TIFF files, OME-Zarr or zarr; stacks "
                                             "are read plane by plane)")
    p.add_argument("-o", "--output", required=True, help="adapted model file (.cgmodel is added if missing); the "
                                                         "original when adaptation does not help")
    p.add_argument("--psf", help=psf_help + ": instead of the model's own (needed for a model trained on pairs only)")
    p.add_argument("--roi", help="Y,X of the images' top-left pixel inside the training field (a camera ROI)")
    p.add_argument("--binning", type=int, default=1, help="camera binning of the images relative to the training "
                                                        "field (default 1)")
    budget = p.add_mutually_exclusive_group()
    _add_config_flags(budget, AdaptConfig, ("minutes", "epochs"))
    _add_config_flags(p, AdaptConfig, ADAPT_FLAGS)
    p.set_defaults(func=_cmd_adapt)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="napari-coordgate",
        description="Position-aware deblurring of microscope images with CoordGate U-Nets.",
    )
    parser.add_argument("--version", action="version", version=f"napari-coordgate {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    from .config import ModelConfig, PredictConfig, TrainConfig
    from .model_io import PSF_SUFFIX
    from .optics.models import ALL_PRESETS
    from .samples.specimens import SPECIMEN_HELP, SPECIMEN_SETS

    p = sub.add_parser("demo", help="train plain and CoordGate U-Nets on a synthetic calibration set; compare")
    p.add_argument("-o", "--output", default="coordgate-demo", help="output folder (default: coordgate-demo)")
    p.add_argument("--minutes", type=float, default=2.0, help="training minutes per model (default 2: the demo's "
                                                              "own budget; train's default is 10)")
    _add_config_flags(p, TrainConfig, ("seed", "device", "threads"))
    p.set_defaults(func=_cmd_demo)

    psf_help = (f"PSF preset ({', '.join(ALL_PRESETS)}), a PSF config JSON file, or a PSF model file ({PSF_SUFFIX}, "
                "e.g. measured from beads)")
    p = sub.add_parser("simulate", help="blur sharp TIFFs with a PSF model -> OUTDIR/<stem>_blurred.tif")
    p.add_argument("sharp", nargs="+")
    p.add_argument("--psf", required=True, help=psf_help)
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--photons", type=float, default=0.0, help="photons at the brightest pixel (0 = no noise)")
    p.add_argument("--read-noise", type=float, default=0.0, help="read noise, photo-electrons (default 0)")
    _add_config_flags(p, TrainConfig, ("seed", "device"), defaults={"device": "cpu"})
    p.set_defaults(func=_cmd_simulate)

    p = sub.add_parser("train", help="train a model from calibration pairs or a PSF model")
    p.add_argument("--sharp", nargs="+", help="sharp images (without them, with a PSF model measured from beads: "
                                               "built-in specimens at its field shape)")
    p.add_argument("--specimens", choices=list(SPECIMEN_SETS), help=f"without --sharp, the {SPECIMEN_HELP}; "
                   "default mixed")
    p.add_argument("--blurred", nargs="+", help="blurred calibration images, one per sharp file")
    p.add_argument("--psf", help=psf_help + ": without --blurred, pairs are simulated from it; with --blurred, "
                                           "it describes the optics for --prefilter wiener")
    p.add_argument("-o", "--output", required=True, help="model file (.cgmodel is added if missing)")
    _add_config_flags(p, ModelConfig, MODEL_FLAGS)
    budget = p.add_mutually_exclusive_group()
    _add_config_flags(budget, TrainConfig, ("minutes", "epochs"))
    _add_config_flags(p, TrainConfig, TRAIN_FLAGS)
    p.add_argument("--z-step", type=float, metavar="UM", help="z-stacks (--ndim 3): distance between planes, µm "
                   "(default: from the volumes' metadata, or the 3-D PSF model's)")
    p.add_argument("--resume", help="checkpoint (.cgckpt) to continue from")
    p.set_defaults(func=_cmd_train)

    _add_adapt_parser(sub, psf_help)
    p = sub.add_parser("apply", help="deblur TIFF, OME-Zarr or zarr images or stacks with a model")
    p.add_argument("-m", "--model", required=True, help=MODEL_HELP)
    p.add_argument("inputs", nargs="+", help="TIFF files, OME-Zarr images (NGFF 0.4/0.5) or zarr arrays (..., y, x)")
    p.add_argument("-o", "--output", required=True, help="output TIFF, or OUT.zarr (OME-Zarr NGFF 0.4: axes, scale "
                                                         "and units kept), or a folder for several inputs")
    p.add_argument("--roi", help="Y,X of the image's top-left pixel inside the training field (a camera ROI)")
    _add_config_flags(p, PredictConfig, PREDICT_FLAGS)
    p.add_argument("--overwrite", action="store_true", help="replace an existing zarr store at -o that "
                   "napari-coordgate did not write (one it wrote is replaced without asking; an input never is)")
    _add_dask_flags(p)
    p.set_defaults(func=_cmd_apply)

    _add_evaluate_parser(sub)
    _add_calibrate_parser(sub)

    p = sub.add_parser("export", help="write a bioimage.io model package (.zip) of a model "
                                      "(pip install 'napari-coordgate[bioimageio]')")
    p.add_argument("-m", "--model", required=True, help="model file (the .cgmodel suffix may be left out)")
    p.add_argument("-o", "--output", required=True, help="package file (.zip added if missing)")
    p.add_argument("--test-image", help="TIFF of the training field's shape; its centre becomes the test tensor")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("models", help="parameter counts of the U-Net family; runs one on a bundled image")
    _add_config_flags(p, ModelConfig, ("depth", "channels"))
    _add_config_flags(p, TrainConfig, ("threads",), defaults={"threads": 1})
    p.set_defaults(func=_cmd_models)
    return parser


class Terminated(KeyboardInterrupt):
    """SIGTERM (``kill``, a batch scheduler's time limit) raised as an interrupt, so that every writer cleans up
    what it had not finished (temporary files, partial stores) exactly as on Ctrl-C."""


def _raise_terminated(signum, frame):
    raise Terminated


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    # a warning is a line for the user, not a source location; tqdm.write keeps it off a progress bar's line
    from tqdm import tqdm

    tqdm.write(f"napari-coordgate: warning: {message}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    import signal
    import warnings

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        old_term = signal.signal(signal.SIGTERM, _raise_terminated)
    except ValueError:  # not the main thread (called from a test or a library): leave signals alone
        old_term = None
    old_show, warnings.showwarning = warnings.showwarning, _show_warning
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt as exc:
        if isinstance(exc, Terminated):
            print("napari-coordgate: terminated (SIGTERM); temporary files removed (an OME-Zarr output stays at "
                  "OUT.zarr.partial until a run completes it)", file=sys.stderr)
            return 143
        print("napari-coordgate: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # one clear line for the user; --debug for the traceback
        if args.debug:
            raise
        name = "error" if isinstance(exc, (CLIError, ValueError, OSError)) else type(exc).__name__
        print(f"napari-coordgate: {name}: {exc}", file=sys.stderr)
        return 1
    finally:
        warnings.showwarning = old_show
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
