"""Training and prediction: arrays and configs in, arrays and model files out. No napari, no Qt.

``train(model_cfg, train_cfg, source, on_update=..., should_stop=...)`` trains a per-microscope model from
calibration pairs (:class:`PairSource`) or from sharp images and a PSF model (:class:`SimulatedSource`),
reporting typed :class:`Update` records and checking ``should_stop()`` every step. The best model so far is
kept in memory and, when ``out_path``/``checkpoint_path`` are given, on disk (atomic writes), so a stop or a
crash never loses it.

``predict(saved, image, ...)`` deblurs a 2-D image or every plane of a (..., H, W) stack (numpy, dask or any
array that slices lazily) tile by tile: each tile carries its global field offset, overlaps its neighbours
by the network's receptive field and starts on the pooling grid, so tiled output equals whole-image output.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from .config import PRECISIONS, ModelConfig, TrainConfig
from .devices import resolve_device
from .data import (
    InputError,
    Normalization,
    check_image,
    check_pairs,
    check_registration,
    checkerboard_mask,
    fit_normalization,
    sample_offsets,
)
from .modelio import _CHECKPOINT_FORMAT as _CKPT_FORMAT
from .modelio import (
    CHECKPOINT_SUFFIX,
    ModelFileError,
    SavedModel,
    atomic_write_bytes,
    decode,
    encode,
    save_model,
    with_suffix,
)

__all__ = [
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
]


class Cancelled(Exception):
    """Raised by :func:`predict` when ``should_stop()`` returned True between tiles."""


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


@dataclass
class PairSource:
    """Calibration pairs: sharp and blurred images of the same field, (H, W) or (N, H, W).

    ``psf`` optionally describes the optics (any :class:`~napari_coordgate.optics.psfmodel.PSFModel`, or a preset
    name, ``.json`` / ``.cgpsf`` path or dict); a model with a Wiener first stage (``ModelConfig.prefilter="wiener"``)
    needs it to build its filters.
    """

    sharp: Any
    blurred: Any
    psf: Any = None


@dataclass
class SimulatedSource:
    """Sharp images plus a PSF model; blurred images are simulated, with fresh noise every epoch."""

    sharp: Any
    psf: Any  # PSFModel, preset name, .json / .cgpsf path or dict


@dataclass
class TrainResult:
    saved: SavedModel
    history: list[Update] = field(default_factory=list)
    best_val_psnr: float | None = None
    best_epoch: int = 0
    stopped: str = "budget"  # "budget", "early_stop", "stopped"
    device: str = "cpu"


# -- training -------------------------------------------------------------------------------------
def _psnr(gt: np.ndarray, pred: np.ndarray, mask: np.ndarray | None, data_range: float) -> float:
    diff = (gt - pred) if mask is None else (gt - pred)[mask]
    mse = float(np.mean(np.square(diff, dtype=np.float64)))
    return float("inf") if mse == 0 else 10.0 * math.log10(data_range**2 / mse)


def _lr_factor(schedule: str, progress: float) -> float:
    if schedule == "cosine":
        # decay to 5% rather than 0: the last steps still learn
        return 0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * min(max(progress, 0.0), 1.0)))
    return 1.0


def _optimizer_to_tensors(opt) -> tuple[dict, dict]:
    """Split an optimizer state_dict into tensors (for safetensors) and JSON (for the metadata)."""
    import torch

    sd = opt.state_dict()
    tensors, state_json = {}, {}
    for idx, st in sd["state"].items():
        entry = {}
        for name, value in st.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{idx}.{name}"] = value
            else:
                entry[name] = value
        state_json[str(idx)] = entry
    return tensors, {"state": state_json, "param_groups": sd["param_groups"]}


def _optimizer_from_tensors(tensors: dict, meta: dict) -> dict:
    state: dict = {}
    for idx, entry in meta["state"].items():
        state[int(idx)] = dict(entry)
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = value
    groups = [dict(g, betas=tuple(g["betas"])) if "betas" in g else dict(g) for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


def load_checkpoint(path: str | Path) -> dict:
    """Read a training checkpoint (safetensors + JSON; never unpickled)."""
    tensors, meta = decode(path, _CKPT_FORMAT)
    return {"tensors": tensors, "meta": meta}


def _psf_identity(psf) -> dict:
    """What identifies a PSF model in a fingerprint: its record's metadata and a digest of each of its arrays."""
    import hashlib

    meta, arrays = psf.to_record()
    if not arrays:
        return meta
    digests = {}
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        digests[name] = f"{a.dtype.str}{a.shape}:" + hashlib.sha256(a).hexdigest()
    return {**meta, "arrays": digests}


def _data_summary(model_cfg: ModelConfig, train_cfg: TrainConfig, sharp: np.ndarray, clean_blurred: np.ndarray,
                  psf_model, known_psf) -> dict:
    """What a run trains on: a fingerprint (SHA-256) of the data and the model config, and a short description.

    Calibration pairs are hashed whole (shapes, dtypes, every pixel of the prepared sharp and blurred stacks, about
    1 s per GB); simulated pairs by their sharp stack, PSF model and noise settings. The budget, the seed and the
    rest of the recipe are not part of it: a resumed run may train longer.
    """
    import hashlib
    import json

    n, h, w = sharp.shape
    simulated = psf_model is not None
    digest = hashlib.sha256(json.dumps({
        "model": model_cfg.to_dict(),
        "psf": None if known_psf is None else _psf_identity(known_psf),
        "noise": [train_cfg.photons, train_cfg.read_noise] if simulated else None,
    }, sort_keys=True).encode())
    for a in (sharp,) if simulated else (sharp, clean_blurred):
        a = np.ascontiguousarray(a)
        digest.update(f"{a.dtype.str}{a.shape}".encode())
        digest.update(a)
    what = f"{n} sharp plane(s) of {h}x{w} blurred with" if simulated else f"{n} calibration pair(s) of {h}x{w}"
    if known_psf is not None:
        what += f"{'' if simulated else ' with'} PSF model '{known_psf.name}'"
    return {"fingerprint": digest.hexdigest(), "description": what}


def _resume_checkpoint(path, model_cfg: ModelConfig, field_shape: tuple[int, int], data: dict) -> dict:
    """The checkpoint at ``path``, if it continues a run of this model on this data; a clear error otherwise."""
    ck = load_checkpoint(path)
    meta = ck["meta"]
    if ModelConfig.from_dict(meta["model"]) != model_cfg:
        raise ModelFileError(f"{path}: checkpoint was trained with a different model configuration")
    if tuple(meta["field_shape"]) != field_shape:
        raise ModelFileError(f"{path}: checkpoint field {tuple(meta['field_shape'])} != data field {field_shape}")
    old = meta.get("data")
    if old is None:
        import warnings

        warnings.warn(f"{path} was written by an older napari-coordgate without a data fingerprint; "
                      "it cannot be checked that this run's data are the same", stacklevel=3)
    elif old["fingerprint"] != data["fingerprint"]:
        raise InputError(
            f"checkpoint {path} was trained on other data: {old['description']} (fingerprint "
            f"{old['fingerprint'][:12]}), this run has {data['description']} (fingerprint "
            f"{data['fingerprint'][:12]}); start a new run or give the same calibration data"
        )
    return ck


def _prepare(source, model_cfg: ModelConfig, train_cfg: TrainConfig):
    """Validated float32 stacks and the simulator (if any)."""
    m = model_cfg.min_size
    if isinstance(source, PairSource):
        sharp, blurred = check_pairs(source.sharp, source.blurred, min_size=m)
        blurred, shifts = check_registration(sharp, blurred, correct=train_cfg.register)
        return sharp, blurred, None, None
    if isinstance(source, SimulatedSource):
        from .optics.blur import SpatiallyVaryingBlur
        from .optics.psfmodel import get_psf_model

        sharp = check_image(source.sharp, "sharp", min_size=m)
        sharp = sharp[None] if sharp.ndim == 2 else sharp
        psf_model = get_psf_model(source.psf)
        op = SpatiallyVaryingBlur(psf_model, sharp.shape[-2:], device="cpu")
        clean = op.forward(np.clip(sharp - sharp.min(), 0, None)) + sharp.min()
        return sharp, clean, psf_model, op
    raise TypeError(f"source must be a PairSource or SimulatedSource, got {type(source).__name__}")


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
) -> TrainResult:
    """Train a model on one microscope's pairs.

    Parameters
    ----------
    model_cfg, train_cfg
        The network and the recipe.
    source
        :class:`PairSource` (calibration pairs) or :class:`SimulatedSource` (sharp images + PSF model).
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
        interrupted and resumed training gives the same weights as one uninterrupted run. The budget may grow;
        other data or another model config is refused with an error that says so.

    Returns
    -------
    TrainResult
        With the best model (by validation PSNR) as a :class:`SavedModel`.
    """
    import torch

    from .nn.unet import build_model

    sharp, clean_blurred, psf_model, _ = _prepare(source, model_cfg, train_cfg)
    n, H, W = sharp.shape
    field_shape = (H, W)
    align = model_cfg.min_size
    crop = min(train_cfg.crop, H - H % align if H >= align else H, W - W % align if W >= align else W)
    crop = max(align, crop - crop % align)
    crop_hw = (min(crop, H), min(crop, W))

    device = resolve_device(train_cfg.device)
    if train_cfg.threads > 0:
        torch.set_num_threads(train_cfg.threads)
    torch.manual_seed(train_cfg.seed)
    rng = np.random.default_rng(train_cfg.seed)

    # validation split: whole held-out planes when there are several, else a checkerboard of tiles
    if n >= 2:
        n_val = max(1, n // 8)
        train_idx, val_idx = np.arange(n - n_val), np.arange(n - n_val, n)
        val_mask = None
        train_weight = None
    else:
        train_idx, val_idx = np.arange(1), np.arange(1)
        val_mask = checkerboard_mask(field_shape, train_cfg.val_tile)
        train_weight = torch.from_numpy((~val_mask).astype(np.float32)).to(device)

    known_psf = psf_model  # the optics the model file will name: simulated from, or the pairs' own
    if isinstance(source, PairSource) and source.psf is not None:
        from .optics.psfmodel import get_psf_model

        known_psf = get_psf_model(source.psf)
    data = None
    if checkpoint_path is not None or resume is not None:
        data = _data_summary(model_cfg, train_cfg, sharp, clean_blurred, psf_model, known_psf)
    ck = None if resume is None else _resume_checkpoint(resume, model_cfg, field_shape, data)

    # a resumed run continues in the units it started in: normalise with the checkpoint's values
    norm = fit_normalization(sharp[train_idx]) if ck is None else Normalization.from_dict(ck["meta"]["normalization"])
    if psf_model is not None:
        # simulated pairs: the noise level is relative to each plane's peak; keep it in image units
        noise_seed = int(rng.integers(2**31))
        if ck is not None:
            noise_seed = int(ck["meta"].get("noise_seed", noise_seed))

        def noisy(epoch: int) -> np.ndarray:
            from .optics.blur import add_noise

            return add_noise(clean_blurred, photons=train_cfg.photons, read_noise=train_cfg.read_noise,
                             seed=noise_seed + epoch)

        blurred = noisy(0)
    else:
        blurred = clean_blurred

    sharp_t = torch.from_numpy(norm.apply(sharp)).to(device)
    blurred_t = torch.from_numpy(norm.apply(blurred)).to(device)
    val_range = float(sharp_t[val_idx].max() - sharp_t[val_idx].min())
    val_mask_nd = None if val_mask is None else np.broadcast_to(val_mask, (len(val_idx), *field_shape))
    input_psnr = _psnr(sharp_t[val_idx].cpu().numpy(), blurred_t[val_idx].cpu().numpy(), val_mask_nd, val_range)

    model = build_model(model_cfg)
    if model_cfg.prefilter == "wiener":
        if known_psf is None:
            raise InputError(
                "a model with a Wiener first stage needs the PSF model of the optics: train from a PSF model, "
                "or give the calibration pairs' PSF model (PairSource(psf=...), --psf with --blurred)"
            )
        from .optics.deconv import wiener_kernels

        model.prefilter.set_kernels(wiener_kernels(
            known_psf, field_shape, model_cfg.prefilter_grid, model_cfg.prefilter_size, model_cfg.prefilter_balance))
    model = model.to(device)
    # the coordinate MLPs may learn at their own rate (TrainConfig.gate_lr_scale): they start as the identity
    # and must move before the position dependence shows
    gate_params = [p for n, p in model.named_parameters() if "gate" in n.split(".")[0]]
    ids = {id(p) for p in gate_params}
    groups = [{"params": [p for p in model.parameters() if id(p) not in ids], "lr_scale": 1.0}]
    if gate_params:
        groups.append({"params": gate_params, "lr_scale": train_cfg.gate_lr_scale})
    for g in groups:
        g["lr"] = train_cfg.lr * g["lr_scale"]
    opt = torch.optim.Adam(groups, lr=train_cfg.lr)
    plateau = (
        torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="max", factor=0.5, patience=3)
        if train_cfg.schedule == "plateau" else None
    )
    use_amp = train_cfg.amp and device.type == "cuda"

    epoch, step, elapsed_before = 0, 0, 0.0
    best_psnr: float | None = None
    best_epoch = 0
    best_state = copy.deepcopy(model.state_dict())
    since_best = 0
    if ck is not None:
        meta = ck["meta"]
        model.load_state_dict({k[6:]: v for k, v in ck["tensors"].items() if k.startswith("model.")})
        best_state = {k[5:]: v.clone() for k, v in ck["tensors"].items() if k.startswith("best.")}
        opt.load_state_dict(_optimizer_from_tensors(ck["tensors"], meta["optimizer"]))
        if plateau is not None and meta.get("plateau"):
            plateau.load_state_dict(meta["plateau"])
        epoch, step, elapsed_before = int(meta["epoch"]), int(meta["step"]), float(meta["elapsed"])
        best_psnr, best_epoch = meta.get("best_val_psnr"), int(meta.get("best_epoch", 0))
        since_best = int(meta.get("since_best", 0))
        rng.bit_generator.state = meta["rng"]
        if "rng.torch" in ck["tensors"]:
            torch.set_rng_state(ck["tensors"]["rng.torch"])
        if device.type == "cuda" and "rng.cuda" in ck["tensors"]:
            torch.cuda.set_rng_state(ck["tensors"]["rng.cuda"], device)

    history: list[Update] = []
    t0 = time.perf_counter()
    stop_reason = "budget"

    def elapsed() -> float:
        return elapsed_before + time.perf_counter() - t0

    def progress() -> float:
        if train_cfg.epochs > 0:
            return (step / train_cfg.steps_per_epoch) / train_cfg.epochs
        return elapsed() / (60.0 * train_cfg.minutes)

    def emit(kind, loss, val=None, message=""):
        u = Update(kind, epoch, step, float(loss), val, best_psnr, elapsed(), min(progress(), 1.0),
                   opt.param_groups[0]["lr"], str(device), message, input_psnr)
        history.append(u)
        if on_update is not None:
            on_update(u)

    def validate() -> float:
        model.eval()
        with torch.no_grad():
            preds = [
                _predict_plane_tensor(model, blurred_t[i], (0, 0), field_shape, None, use_amp).cpu().numpy()
                for i in val_idx
            ]
        model.train()
        gt = sharp_t[val_idx].cpu().numpy()
        mask = None if val_mask is None else np.broadcast_to(val_mask, gt.shape)
        return _psnr(gt, np.stack(preds), mask, val_range)

    def save_best() -> None:
        if out_path is not None:
            tmp_model = build_model(model_cfg)
            tmp_model.load_state_dict(best_state)
            save_model(out_path, _saved(tmp_model))

    # a measured PSF model's own provenance (bead images, bead count, fit residual...) travels into the model file
    psf_provenance = {} if known_psf is None else known_psf.provenance

    def _saved(net) -> SavedModel:
        provenance: dict[str, Any] = {"training": {
            "source": "psf" if psf_model is not None else "calibration",
            "planes": int(n), "epochs": int(epoch), "steps": int(step), "seconds": round(elapsed(), 1),
            "best_val_psnr": best_psnr, "device": str(device), "train_config": train_cfg.to_dict(),
        }}
        if psf_provenance:
            provenance["psf"] = psf_provenance
        return SavedModel(model=net, config=model_cfg, field_shape=field_shape, normalization=norm.to_dict(),
                          psf=known_psf, provenance=provenance)

    def write_checkpoint() -> None:
        if checkpoint_path is None:
            return
        opt_tensors, opt_meta = _optimizer_to_tensors(opt)
        tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
        tensors.update({f"best.{k}": v for k, v in best_state.items()})
        tensors.update(opt_tensors)
        tensors["rng.torch"] = torch.get_rng_state()
        if device.type == "cuda":
            tensors["rng.cuda"] = torch.cuda.get_rng_state(device)
        meta = {
            "format": _CKPT_FORMAT, "schema_version": 1, "model": model_cfg.to_dict(),
            "train": train_cfg.to_dict(), "field_shape": list(field_shape), "normalization": norm.to_dict(),
            "data": data, "epoch": epoch, "step": step, "elapsed": elapsed(), "best_val_psnr": best_psnr,
            "best_epoch": best_epoch, "since_best": since_best, "rng": rng.bit_generator.state,
            "noise_seed": noise_seed if psf_model is not None else None, "optimizer": opt_meta,
            "plateau": plateau.state_dict() if plateau is not None else None,
        }
        atomic_write_bytes(with_suffix(checkpoint_path, CHECKPOINT_SUFFIX), encode(tensors, meta))

    model.train()
    running, count = 0.0, 0
    try:
        while True:
            if train_cfg.epochs > 0 and epoch >= train_cfg.epochs:
                break
            if train_cfg.epochs == 0 and progress() >= 1.0:
                break
            if psf_model is not None and epoch > 0:
                blurred_t = torch.from_numpy(norm.apply(noisy(epoch))).to(device)
            running, count = 0.0, 0
            for _ in range(train_cfg.steps_per_epoch):
                if should_stop is not None and should_stop():
                    stop_reason = "stopped"
                    raise StopIteration
                if train_cfg.epochs == 0 and progress() >= 1.0:
                    break
                planes = rng.choice(train_idx, size=train_cfg.batch)
                offs = sample_offsets(rng, train_cfg.batch, field_shape, crop_hw, align, train_cfg.sampling)
                ys = offs[:, 0, None] + np.arange(crop_hw[0])[None]
                xs = offs[:, 1, None] + np.arange(crop_hw[1])[None]
                pi = torch.from_numpy(planes)[:, None, None]
                yi = torch.from_numpy(ys)[:, :, None]
                xi = torch.from_numpy(xs)[:, None, :]
                x = blurred_t[pi.to(device), yi.to(device), xi.to(device)][:, None]
                y = sharp_t[pi.to(device), yi.to(device), xi.to(device)][:, None]
                if plateau is None:
                    for g in opt.param_groups:
                        g["lr"] = train_cfg.lr * g.get("lr_scale", 1.0) * _lr_factor(train_cfg.schedule, progress())
                with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_amp):
                    out = model(x, offset=torch.from_numpy(offs).to(device), field_shape=field_shape)
                diff = out.float() - y
                err = diff.abs() if train_cfg.loss == "l1" else diff.square()
                if train_weight is not None:
                    w = train_weight[yi.to(device), xi.to(device)][:, None]
                    lo = (err * w).sum() / w.sum().clamp_min(1.0)
                else:
                    lo = err.mean()
                opt.zero_grad(set_to_none=True)
                lo.backward()
                opt.step()
                step += 1
                running += float(lo.detach())
                count += 1
                if step % 10 == 0 or step == 1:  # the first step shows at once that training runs
                    emit("step", running / count)
            epoch += 1
            val = validate()
            if plateau is not None:
                plateau.step(val)
            improved = best_psnr is None or val > best_psnr
            if improved:
                best_psnr, best_epoch, since_best = val, epoch, 0
                best_state = copy.deepcopy(model.state_dict())
                save_best()
            else:
                since_best += 1
            write_checkpoint()
            emit("epoch", running / max(count, 1), val)
            if train_cfg.patience and since_best >= train_cfg.patience:
                stop_reason = "early_stop"
                break
    except StopIteration:
        pass

    if best_psnr is None:
        # stopped before the first validation: score what we have so the result is still usable
        best_psnr = validate()
        best_state = copy.deepcopy(model.state_dict())
        save_best()
    model.load_state_dict(best_state)
    model.eval()
    emit("done", running / max(count, 1), best_psnr, stop_reason)
    return TrainResult(_saved(model), history, best_psnr, best_epoch, stop_reason, str(device))


# -- prediction -----------------------------------------------------------------------------------
def receptive_halo(cfg: ModelConfig) -> int:
    """Overlap (pixels) a tile needs on each side so its core equals whole-image output.

    The receptive radius of the U-Net is 2**(depth+2) - 6 pixels (two 3x3 convolutions per level on the way
    down and up, plus pooling and transposed-convolution footprints), plus the radius of a Wiener first stage's
    kernels; rounded up to the pooling grid.
    """
    m = cfg.min_size
    r = 2 ** (cfg.depth + 2) - 6 + 2
    if cfg.prefilter_channels:
        r += cfg.prefilter_size // 2  # the first stage's kernels reach this much further
    return int(math.ceil(r / m) * m)


def _bytes_per_pixel(cfg: ModelConfig) -> float:
    # activations kept during a no-grad forward: a few feature maps per level (float32), plus the first stage's
    # filtered channels and their complex spectra
    return sum(6 * c * 4 / 4**lv for lv, c in enumerate(cfg.level_channels())) + 64 + 16 * cfg.prefilter_channels


def plan_tiles(shape: tuple[int, int], cfg: ModelConfig, tile: int | None = None, memory_mb: float = 1024.0):
    """Tile cores and halo windows for an image: list of (core, window) slices as (y0, y1, x0, x1).

    ``tile`` is the core side (rounded down to the pooling grid); by default it is chosen so a window fits
    in ``memory_mb`` of activations. An image that fits is one tile (whole-image prediction).
    """
    H, W = shape
    m = cfg.min_size
    halo = receptive_halo(cfg)
    if tile is None:
        side = int(math.sqrt(memory_mb * 2**20 / _bytes_per_pixel(cfg)))
        # cache-sized tiles are faster than one huge window on a CPU (about 2x at 1024^2 for U-Net(2):
        # benchmarks/bench_engine.py); keep the halo overhead small with a core of at least 4 halos
        tile = max(min(side - 2 * halo, max(256, 4 * halo)), m)
    tile = max(m, int(tile) - int(tile) % m)
    if tile >= H and tile >= W:
        return [((0, H, 0, W), (0, H, 0, W))]
    out = []
    for y0 in range(0, H, tile):
        for x0 in range(0, W, tile):
            y1, x1 = min(y0 + tile, H), min(x0 + tile, W)
            wy0, wx0 = max(0, y0 - halo), max(0, x0 - halo)
            wy1, wx1 = min(H, y1 + halo), min(W, x1 + halo)
            # the window must reach the network's minimum size; extend it back inside the image
            if wy1 - wy0 < m:
                wy0 = max(0, wy1 - m) // m * m
            if wx1 - wx0 < m:
                wx0 = max(0, wx1 - m) // m * m
            out.append(((y0, y1, x0, x1), (wy0, wy1, wx0, wx1)))
    return out


def field_geometry(
    image_shape: tuple[int, int], field_shape: tuple[int, int], roi: Sequence[int] | None = None, binning: int = 1
) -> tuple[tuple[int, int], tuple[int, int]]:
    """(field_shape, offset) in the image's pixel units for an image taken from the training field.

    An image of the training field's shape needs nothing. A smaller image is a region of interest at
    ``roi`` = (y, x) (training-field pixels); a binned image (``binning`` B) sees a field of ``field / B``
    pixels, with the ROI divided by B as well.
    """
    if binning < 1:
        raise InputError(f"binning must be a positive integer, got {binning}")
    fh, fw = (int(round(field_shape[0] / binning)), int(round(field_shape[1] / binning)))
    h, w = image_shape
    if roi is None:
        if (h, w) != (fh, fw):
            hint = f" (binned x{binning})" if binning > 1 else ""
            raise InputError(
                f"image is {h}x{w} but the model was trained on a {field_shape[0]}x{field_shape[1]} field{hint}; "
                "give the image's position in the field (--roi Y,X) or its binning (--binning B)"
            )
        return (fh, fw), (0, 0)
    oy, ox = int(roi[0]) // binning, int(roi[1]) // binning
    if oy < 0 or ox < 0 or oy + h > fh or ox + w > fw:
        raise InputError(
            f"an image of {h}x{w} at ROI ({roi[0]}, {roi[1]}) does not fit inside the {fh}x{fw} field "
            "the model was trained on"
        )
    return (fh, fw), (oy, ox)




def _check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise InputError(f"precision must be one of {', '.join(map(repr, PRECISIONS))}, got {precision!r}")


def _autocast_dtype(precision: str, dev):
    """The autocast dtype of ``precision`` on ``dev`` (None for fp32), or an error saying what to use instead."""
    import torch

    _check_precision(precision)
    if precision == "fp32":
        return None
    if precision == "fp16" and dev.type != "cuda":
        raise InputError(f"precision 'fp16' needs a CUDA GPU (the device is {dev.type}); use 'bf16' or 'fp32'")
    if dev.type not in ("cpu", "cuda"):
        raise InputError(f"precision {precision!r} is supported on CPU and CUDA, not on {dev.type}; use 'fp32'")
    return torch.bfloat16 if precision == "bf16" else torch.float16


def _forward_windows(model, x, offsets, field_shape, amp_dtype=None):
    """Model output for a (B, h, w) batch of normalised windows of one shape, as float32 (B, h, w).

    ``offsets`` holds each window's (y, x) in the field. One window passes its offset as a tuple, so the model
    slices its cached whole-field gates; a batch passes a (B, 2) tensor, one offset per sample.
    """
    import torch

    if len(offsets) == 1:
        off = (int(offsets[0][0]), int(offsets[0][1]))
    else:
        off = torch.tensor(offsets, dtype=torch.long, device=x.device)
    enabled = amp_dtype is not None
    with torch.autocast(device_type=x.device.type, dtype=amp_dtype if enabled else torch.bfloat16, enabled=enabled):
        pred = model(x[:, None], offset=off, field_shape=field_shape)
    return pred[:, 0].float()


def _predict_plane_tensor(model, x2d, offset, field_shape, tiles, use_amp=False):
    """Predict one normalised (H, W) tensor; ``tiles`` from :func:`plan_tiles` or None for whole-image.

    ``use_amp`` runs the forward passes under bfloat16 autocast (training's validation on CUDA).
    """
    import torch

    H, W = x2d.shape
    if tiles is None:
        tiles = [((0, H, 0, W), (0, H, 0, W))]
    amp_dtype = torch.bfloat16 if use_amp else None
    out = torch.empty((H, W), dtype=torch.float32, device=x2d.device)
    for (y0, y1, x0, x1), (wy0, wy1, wx0, wx1) in tiles:
        pred = _forward_windows(model, x2d[wy0:wy1, wx0:wx1][None], [(offset[0] + wy0, offset[1] + wx0)],
                                field_shape, amp_dtype)
        out[y0:y1, x0:x1] = pred[0, y0 - wy0 : y1 - wy0, x0 - wx0 : x1 - wx0]
    return out


def _tile_batches(tiles, batch_tiles: int) -> list[list[int]]:
    """Indices into ``tiles`` in groups of at most ``batch_tiles`` whose windows have the same shape.

    Groups come in the plan order of their first tile, so ``batch_tiles=1`` is the plan order itself.
    """
    by_shape: dict[tuple[int, int], list[int]] = {}
    for i, (_, (wy0, wy1, wx0, wx1)) in enumerate(tiles):
        by_shape.setdefault((wy1 - wy0, wx1 - wx0), []).append(i)
    groups = [ids[k : k + batch_tiles] for ids in by_shape.values() for k in range(0, len(ids), batch_tiles)]
    return sorted(groups, key=lambda g: g[0])


def _read_window(image, idx, window, norm) -> np.ndarray:
    """One halo window of one plane, read lazily, checked and normalised to float32."""
    wy0, wy1, wx0, wx1 = window
    win = image[idx + (slice(wy0, wy1), slice(wx0, wx1))]
    win = np.asarray(win.compute() if hasattr(win, "compute") else win)
    win = win.astype(np.float64 if win.dtype.kind in "iu" else np.float32, copy=False)
    if not np.isfinite(win).all():
        raise InputError(f"image plane {idx or 0} contains NaN or Inf values")
    return norm.apply(win)


def predict(
    saved: SavedModel,
    image,
    *,
    roi: Sequence[int] | None = None,
    binning: int = 1,
    tile: int | None = None,
    memory_mb: float = 1024.0,
    device: str = "auto",
    precision: str = "fp32",
    batch_tiles: int = 1,
    out=None,
    on_progress: Callable[[int, int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> np.ndarray:
    """Deblur a 2-D image or every 2-D plane of a (..., H, W) stack.

    Parameters
    ----------
    saved
        A loaded model (:func:`napari_coordgate.modelio.load_model` or a training result).
    image
        numpy array, dask array or any array that slices lazily; only the tile windows (plus halo) of one batch
        of one plane are read at a time, so a dask-backed stack is never materialised.
    roi, binning
        Where the image sits in the training field, see :func:`field_geometry`.
    tile, memory_mb
        Tile core side, or a memory budget for one window's activations from which it is chosen.
    device
        ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"mps"``.
    precision
        ``"fp32"`` (default), ``"bf16"`` (CPU and CUDA) or ``"fp16"`` (CUDA only): the forward pass runs under
        ``torch.autocast`` with that dtype; the weights and the output stay float32.
    batch_tiles
        Up to this many tiles whose windows have the same shape go through the network as one batch (fewer,
        larger kernel launches: for GPUs; a 2048^2 plane through U-Net(2) on an H200 went from 68 to 145 MP/s
        with 16, ``benchmarks/bench_gpu.py``; on a CPU it gains nothing, and CoordGate models then compute
        their gates per batch instead of slicing cached ones). Output equals one-tile-at-a-time output to
        float rounding; a batch needs about ``batch_tiles`` times the activation memory of one window.
        1 (default): one tile at a time.
    out
        Optional array-like (numpy, memmap, zarr) of the image's shape that receives the float32 result;
        by default a new float32 numpy array.
    on_progress
        Called as ``on_progress(done_tiles, total_tiles)`` after every tile.
    should_stop
        Checked before every batch of tiles (every tile with ``batch_tiles=1``); True raises :class:`Cancelled`
        (``out`` keeps the planes done so far).

    Returns
    -------
    The restored float32 array (``out`` if given), in the units of the training sharp images.
    """
    import torch

    shape = tuple(image.shape)
    dtype = np.dtype(getattr(image, "dtype", np.float32))
    if dtype == bool or np.issubdtype(dtype, np.complexfloating) or not np.issubdtype(dtype, np.number):
        raise InputError(f"image dtype {dtype} is not supported; expected integer or float grey values")
    if len(shape) < 2 or 0 in shape:
        raise InputError(f"expected a 2-D image or a stack (..., H, W), got shape {shape}")
    if len(shape) == 3 and shape[-1] in (3, 4) and min(shape[:2]) > 4:
        raise InputError(f"image of shape {shape} looks like RGB(A); convert to grey or pick a channel")
    _check_precision(precision)
    if isinstance(batch_tiles, bool) or not isinstance(batch_tiles, (int, np.integer)) or batch_tiles < 1:
        raise InputError(f"batch_tiles must be a positive integer, got {batch_tiles!r}")
    cfg = saved.config
    H, W = shape[-2:]
    if H < cfg.min_size or W < cfg.min_size:
        raise InputError(f"image is {H}x{W}, smaller than the minimum {cfg.min_size}x{cfg.min_size} of this model")
    field_shape, offset = field_geometry((H, W), saved.field_shape, roi, binning)
    if binning != 1 and cfg.prefilter_channels:
        raise InputError("this model's Wiener first stage is built for unbinned pixels; apply it to unbinned images")
    norm = Normalization.from_dict(saved.normalization)
    dev = resolve_device(device)
    amp_dtype = _autocast_dtype(precision, dev)
    model = saved.model.to(dev).eval()
    tiles = plan_tiles((H, W), cfg, tile, memory_mb)
    batches = _tile_batches(tiles, int(batch_tiles))
    lead = shape[:-2]
    if out is None:
        out = np.empty(shape, dtype=np.float32)
    elif tuple(out.shape) != shape:
        raise InputError(f"out has shape {tuple(out.shape)}, expected {shape}")
    total = int(np.prod(lead, dtype=np.int64)) * len(tiles)
    done = 0
    # The model caches gates by geometry and weights, not by dtype: gates computed under autocast are half
    # precision. Start and end a reduced-precision call with an empty cache, so a later fp32 call never reuses
    # them (fp32 output stays bit for bit what it was) and this call does not depend on what ran before.
    fresh_gates = amp_dtype is not None and hasattr(model, "clear_gate_cache")
    if fresh_gates:
        model.clear_gate_cache()
    try:
        with torch.no_grad():
            for idx in np.ndindex(*lead):
                for group in batches:
                    if should_stop is not None and should_stop():
                        raise Cancelled(f"prediction cancelled after {done} of {total} tiles")
                    wins = [_read_window(image, idx, tiles[i][1], norm) for i in group]
                    x = torch.from_numpy(wins[0][None] if len(wins) == 1 else np.stack(wins)).to(dev)
                    offs = [(offset[0] + tiles[i][1][0], offset[1] + tiles[i][1][2]) for i in group]
                    pred = _forward_windows(model, x, offs, field_shape, amp_dtype).cpu().numpy()
                    for k, i in enumerate(group):
                        (y0, y1, x0, x1), (wy0, _, wx0, _) = tiles[i]
                        core = pred[k, y0 - wy0 : y1 - wy0, x0 - wx0 : x1 - wx0]
                        out[idx + (slice(y0, y1), slice(x0, x1))] = norm.invert(core)
                        done += 1
                        if on_progress is not None:
                            on_progress(done, total)
    finally:
        if fresh_gates:
            model.clear_gate_cache()
    return out
