"""Prediction: the tile plan and tiled, lazy, batched inference of a 2-D image or a (..., H, W) stack.

Each tile carries its global field offset, overlaps its neighbours by the network's receptive field and starts on
the pooling grid, so tiled output equals whole-image output. Training's validation runs through the same tiles
(:func:`predict_batch`), so neither ever holds a whole plane's activations.
"""

from __future__ import annotations

import copy
import math
from contextlib import contextmanager
from functools import partial
from typing import Callable, Sequence

import numpy as np

from ..checks import InputError, check_layout, check_values
from ..config import PRECISIONS, ModelConfig
from ..data import Normalization, plane_sample
from ..devices import on_device, resolve_device, tensor_layout
from ..model_io import SavedModel
from ..nn.unet import receptive_halo, receptive_halo_z

__all__ = ["Cancelled", "predict", "predict_batch", "predict_slab", "plan_tiles", "plan_tiles_3d", "axis_tiles",
           "field_geometry", "resample_depth", "volume_normalization", "volume_slabs", "z_slabs", "SLAB_DEPTH"]

Window = tuple[int, int, int, int]  # (y0, y1, x0, x1)


class Cancelled(Exception):
    """Raised by :func:`predict` when ``should_stop()`` returned True between tiles."""


def _bytes_per_pixel(cfg: ModelConfig) -> float:
    # activations kept during a no-grad forward: a few feature maps per level (float32), plus the first stage's
    # filtered channels and their complex spectra
    return sum(6 * c * 4 / 4**lv for lv, c in enumerate(cfg.level_channels())) + 64 + 16 * cfg.prefilter_channels


def plan_tiles(shape: tuple[int, int], cfg: ModelConfig, tile: int | None = None,
               memory_mb: float = 1024.0) -> list[tuple[Window, Window]]:
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
    rows, cols = axis_tiles(H, tile, halo, m), axis_tiles(W, tile, halo, m)
    return [((y0, y1, x0, x1), (wy0, wy1, wx0, wx1)) for y0, y1, wy0, wy1 in rows for x0, x1, wx0, wx1 in cols]


def plan_tiles_3d(shape: tuple[int, int, int], cfg: ModelConfig, tile: int | None = None,
                  memory_mb: float = 1024.0, tile_z: int | None = None) -> list[tuple[tuple, tuple]]:
    """The 3-D tile plan of a (D, H, W) volume: (core, window) pairs as (z0, z1, y0, y1, x0, x1).

    Slabs of ``tile_z`` planes (default: the whole depth up to :data:`SLAB_DEPTH` planes) with the network's z
    halo (:func:`z_slabs`), each cut into ``tile`` x ``tile`` columns with the xy halo, all on the pooling grid, so
    tiled output equals whole-volume output; by default the column side is chosen so one window's activations fit
    in ``memory_mb``. Slabs come one after another: a volume is restored (and written) slab by slab.
    """
    D, H, W = shape
    m = cfg.min_size
    halo, tile_z = receptive_halo(cfg), _slab_depth(D, cfg, tile_z)
    if tile is None:
        depth = min(D, tile_z + 2 * receptive_halo_z(cfg))
        side = int(math.sqrt(memory_mb * 2**20 / (_bytes_per_pixel(cfg) * depth)))
        tile = max(min(side - 2 * halo, max(128, 4 * halo)), m)
    tile = max(m, int(tile) - int(tile) % m)
    slabs = z_slabs(D, cfg, tile_z)
    rows, cols = axis_tiles(H, tile, halo, m), axis_tiles(W, tile, halo, m)
    return [((z0, z1, y0, y1, x0, x1), (wz0, wz1, wy0, wy1, wx0, wx1))
            for z0, z1, wz0, wz1 in slabs for y0, y1, wy0, wy1 in rows for x0, x1, wx0, wx1 in cols]


#: planes per z-slab of a 3-D prediction (a deeper volume is restored slab by slab; a dask task each): bounds the
#: memory of one slab's windows
SLAB_DEPTH = 32


def _slab_depth(depth: int, cfg: ModelConfig, tile_z: int | None = None) -> int:
    """The core depth of the z-slabs of a volume of ``depth`` planes: ``tile_z`` (default: the whole depth up to
    :data:`SLAB_DEPTH`) rounded down to the z pooling grid."""
    if tile_z is None:
        tile_z = min(depth, SLAB_DEPTH)
    return max(cfg.min_depth, int(tile_z) - int(tile_z) % cfg.min_depth)


def z_slabs(depth: int, cfg: ModelConfig, tile_z: int | None = None) -> list[tuple[int, int, int, int]]:
    """The z-slabs of :func:`plan_tiles_3d` in a volume of ``depth`` planes: (core start, core end, window start,
    window end) each, the window reaching the network's z halo further where the volume goes on."""
    return axis_tiles(depth, _slab_depth(depth, cfg, tile_z), receptive_halo_z(cfg), cfg.min_depth)


def axis_tiles(n: int, tile: int, halo: int, multiple: int) -> list[tuple[int, int, int, int]]:
    """One axis of a tile plan: (core start, core end, window start, window end) per tile of ``n`` pixels.

    Cores of ``tile`` pixels (a multiple of ``multiple``, the pooling grid) each see ``halo`` more on both sides
    where the image goes on; a window shorter than ``multiple`` is extended back inside the image on the grid. One
    tile when ``tile >= n``.
    """
    if tile >= n:
        return [(0, n, 0, n)]
    out = []
    for c0 in range(0, n, tile):
        c1 = min(c0 + tile, n)
        w0, w1 = max(0, c0 - halo), min(n, c1 + halo)
        if w1 - w0 < multiple:  # the window must reach the network's minimum size
            w0 = max(0, w1 - multiple) // multiple * multiple
        out.append((c0, c1, w0, w1))
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


def autocast_dtype(precision: str, dev):
    """The reduced-precision dtype of ``precision`` on ``dev`` (None for fp32), or an error saying what to use
    instead: autocast's dtype on CUDA, the network's ``compute_dtype`` on a CPU (:func:`_computes_in`)."""
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
    if _computes_in(amp_dtype, x.device):  # the network's own reduced-precision path (CPU), not autocast
        return model(x[:, None], offset=off, field_shape=field_shape, compute_dtype=amp_dtype)[:, 0].float()
    enabled = amp_dtype is not None
    with torch.autocast(device_type=x.device.type, dtype=amp_dtype if enabled else torch.bfloat16, enabled=enabled):
        pred = model(x[:, None], offset=off, field_shape=field_shape)
    return pred[:, 0].float()


def _computes_in(amp_dtype, dev) -> bool:
    """Whether reduced precision on ``dev`` runs as the network's ``compute_dtype`` rather than under autocast.

    On a CPU, autocast casts each operation's inputs and keeps feature maps in float32 (0.6x the speed of fp32,
    ``benchmarks/bench_engine.py --levers``); a network whose feature maps are bfloat16 throughout, its
    convolutions with fused ReLUs, is the fast path there. CUDA keeps autocast (measured on an H200).
    """
    return amp_dtype is not None and dev.type == "cpu"


def tile_batches(tiles, batch_tiles: int) -> list[list[int]]:
    """Indices into ``tiles`` in groups of at most ``batch_tiles`` whose windows have the same shape.

    Groups come in the plan order of their first tile, so ``batch_tiles=1`` is the plan order itself. A group of
    3-D tiles stays within one z-slab: a volume is restored slab by slab, and a slab alone (:func:`predict_slab`)
    is batched as within the whole volume.
    """
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for i, (core, window) in enumerate(tiles):
        by_shape.setdefault((*core[:-4], *_extent(window)), []).append(i)
    groups = [ids[k : k + batch_tiles] for ids in by_shape.values() for k in range(0, len(ids), batch_tiles)]
    return sorted(groups, key=lambda g: g[0])


def predict_batch(model, read: Callable[[Window], np.ndarray], tiles, group: Sequence[int], offset: tuple[int, int],
                  field_shape: tuple[int, int], dev, amp_dtype=None) -> list[tuple[Window, np.ndarray]]:
    """Run ``model`` (under no_grad) on one batch of tiles of a plane: (core, float32 prediction of the core) each.

    ``read(window)`` returns a normalised float32 window of the plane (read lazily, from host memory); the windows
    of ``group`` (indices into ``tiles``, of one window shape) go to ``dev`` together. Prediction and training's
    validation both go through here, so neither ever holds more than one batch of windows on the device.
    """
    import torch

    wins = [read(tiles[i][1]) for i in group]
    x = torch.from_numpy(wins[0][None] if len(wins) == 1 else np.stack(wins)).to(dev)
    # a window's (y, x) origin in the image: its last two axes' starts ((y0, y1, x0, x1) or (z0, z1, y0, ...))
    offs = [(offset[0] + tiles[i][1][-4], offset[1] + tiles[i][1][-2]) for i in group]
    with torch.no_grad():
        pred = _forward_windows(model, x, offs, field_shape, amp_dtype).cpu().numpy()
    cores = []
    for k, i in enumerate(group):
        core, window = tiles[i]
        inside = tuple(slice(core[2 * a] - window[2 * a], core[2 * a + 1] - window[2 * a])
                       for a in range(len(core) // 2))
        cores.append((core, pred[(k, *inside)]))
    return cores


def _extent(window) -> tuple[int, ...]:
    """The shape of a window (y0, y1, x0, x1) or (z0, z1, y0, y1, x0, x1)."""
    return tuple(window[2 * a + 1] - window[2 * a] for a in range(len(window) // 2))


def _slices(window) -> tuple[slice, ...]:
    return tuple(slice(window[2 * a], window[2 * a + 1]) for a in range(len(window) // 2))


def _read_window(image, idx, norm, window) -> np.ndarray:
    """One halo window of one plane (or volume), read lazily, checked and normalised to float32."""
    win = image[idx + _slices(window)]
    win = np.asarray(win.compute() if hasattr(win, "compute") else win)
    win = win.astype(np.float64 if win.dtype.kind in "iu" else np.float32, copy=False)
    check_values(win, f"image plane {idx or 0}")
    return norm.apply(win)


def _plane_normalization(norm: Normalization, image, idx) -> Normalization:
    """The intensity map of one plane: the model's, or (per-image normalisation) measured on the plane, checked."""
    if not norm.per_image:
        return norm
    plane = image[idx] if idx else image
    sample = plane_sample(plane)
    check_values(sample, f"image plane {idx or 0}")
    return norm.for_sample(sample)


def _in_place(model, dev) -> bool:
    """Whether every parameter and buffer of ``model`` is on ``dev`` in its :func:`tensor_layout` already."""
    import torch

    target = torch.empty(0, device=dev).device  # "cuda" -> the current GPU, where .to("cuda") would put it
    return all(t.device == target and t.is_contiguous(memory_format=tensor_layout(t.dim(), dev))
               for t in (*model.parameters(), *model.buffers()))


@contextmanager
def _network_on(model, dev):
    """``model`` in eval mode on ``dev`` in that device's layout, the caller's network left as it was.

    A network already there is used itself (its gate cache lasts from call to call) and its train/eval modes are
    restored afterwards; any other runs as a copy, so a CPU model predicted on CUDA (or a model in the usual
    layout predicted on a CPU, which wants channels-last) comes back untouched.
    """
    if not _in_place(model, dev):
        yield on_device(copy.deepcopy(model), dev).eval()
        return
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, training in modes:
            m.training = training


def _check_call(saved: SavedModel, image, precision: str, batch_tiles, binning: int, z_step_um=None
                ) -> tuple[int, ...]:
    """The image's shape, after the checks its shape, dtype and the call's options allow without reading it."""
    shape = tuple(image.shape)
    cfg = saved.config
    if cfg.ndim == 3:
        _require_volumes(shape)
    check_layout(shape, np.dtype(getattr(image, "dtype", np.float32)), "image", min_ndim=cfg.ndim,
                 min_size=cfg.min_size)
    if cfg.ndim == 3:
        _check_volume_call(saved, shape, z_step_um)
    _check_precision(precision)
    if isinstance(batch_tiles, bool) or not isinstance(batch_tiles, (int, np.integer)) or batch_tiles < 1:
        raise InputError(f"batch_tiles must be a positive integer, got {batch_tiles!r}")
    if binning != 1 and cfg.prefilter_channels:
        raise InputError("this model's Wiener first stage is built for unbinned pixels; apply it to unbinned images")
    return shape


def _require_volumes(shape: tuple[int, ...]) -> None:
    if len(shape) < 3:
        raise InputError(f"this is a 3-D model: it restores z-stacks (D, H, W), got a {len(shape)}-D image of shape "
                         f"{shape}; use a 2-D model for single planes")


#: how far a volume's z-step may differ from a 3-D model's before it is refused (relative)
Z_STEP_TOLERANCE = 0.02


def _z_steps_differ(saved: SavedModel, z_step_um) -> bool:
    """Whether a volume's known z-step differs from its 3-D model's by more than :data:`Z_STEP_TOLERANCE`."""
    model_step = saved.z_step_um
    return (saved.config.ndim == 3 and z_step_um is not None and model_step is not None
            and abs(z_step_um / model_step - 1) > Z_STEP_TOLERANCE)


def resample_depth(volume: np.ndarray, step_from: float, step_to: float, planes: int | None = None) -> np.ndarray:
    """``volume`` (..., D, H, W) with planes ``step_from`` apart, linearly interpolated onto planes ``step_to`` apart
    from its first plane: ``planes`` of them (default: as many as its extent holds), float32. Planes beyond the
    volume's last repeat it."""
    d = volume.shape[-3]
    n = int(planes) if planes is not None else int(math.floor((d - 1) * step_from / step_to + 1e-6)) + 1
    z = np.clip(np.arange(n) * (step_to / step_from), 0, d - 1)
    i0 = np.floor(z).astype(int)
    i1 = np.minimum(i0 + 1, d - 1)
    f = (z - i0).astype(np.float32)[:, None, None]
    vol = np.asarray(volume, dtype=np.float32)
    return vol[..., i0, :, :] * (1 - f) + vol[..., i1, :, :] * f


def _predict_resampled(saved: SavedModel, image, z_step_um: float, out, on_progress, kwargs) -> np.ndarray:
    """:func:`predict` of every volume resampled to the model's z-step, resampled back to its own planes."""
    shape = tuple(image.shape)
    _require_volumes(shape)
    if out is None:
        out = np.empty(shape, dtype=np.float32)
    lead = list(np.ndindex(*shape[:-3]))
    for k, idx in enumerate(lead):
        vol = np.asarray(image[idx], dtype=np.float32)
        there = resample_depth(vol, z_step_um, saved.z_step_um)
        restored = predict(saved, there, z_step_um=saved.z_step_um, **kwargs)
        back = resample_depth(restored, saved.z_step_um, z_step_um, planes=shape[-3])
        out[idx] = back
        if on_progress is not None:
            on_progress(k + 1, len(lead))
    return out


def _check_volume_call(saved: SavedModel, shape: tuple[int, ...], z_step_um) -> None:
    """A 3-D model restores (D, H, W) volumes of its own z-step and at least its minimum depth."""
    mz = saved.config.min_depth
    if shape[-3] < mz:
        raise InputError(f"the volume has {shape[-3]} plane(s), fewer than the {mz} this 3-D network needs")
    model_step = saved.z_step_um
    if _z_steps_differ(saved, z_step_um):
        raise InputError(f"the volume's z-step is {z_step_um:g} µm but the model was trained at {model_step:g} µm: "
                         "its 3-D PSF would be squeezed or stretched; resample the stack to the model's z-step "
                         "(--resample-z) or train a model at this z-step")


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
    z_step_um: float | None = None,
    resample_z: bool = False,
) -> np.ndarray:
    """Deblur a 2-D image or every 2-D plane of a (..., H, W) stack; with a 3-D model, a (D, H, W) volume or
    every volume of a (..., D, H, W) stack (a TZYX time-lapse volume by volume).

    Parameters
    ----------
    saved
        A loaded model (:func:`napari_coordgate.model_io.load_model` or a training result). Its network is left
        as it was (device, layout, train/eval mode): it runs on ``device`` as a copy unless it is already there
        in that device's layout (a training result on its training device is).
    image
        numpy array, dask array or any array that slices lazily; only the tile windows (plus halo) of one batch
        of one plane are read at a time, so a dask-backed stack is never materialised.
    roi, binning
        Where the image sits in the training field, see :func:`field_geometry`.
    tile, memory_mb
        Tile core side, or a memory budget for one window's activations from which it is chosen.
    device
        ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"mps"``.
    precision
        ``"fp32"`` (default), ``"bf16"`` (CPU and CUDA) or ``"fp16"`` (CUDA only): on CUDA the forward pass runs
        under ``torch.autocast`` with that dtype; on a CPU the network's feature maps are bfloat16 throughout (fast
        on CPUs with AVX512-BF16 or AMX, slow elsewhere); the weights, the gates' MLPs and the output stay float32.
    batch_tiles
        Up to this many tiles whose windows have the same shape go through the network as one batch (fewer,
        larger kernel launches: for GPUs; a 2048^2 plane through U-Net(2) on an H200 went from 68 to 145 MP/s
        with 16, ``benchmarks/bench_gpu.py``; on a CPU it gains nothing). Output equals one-tile-at-a-time output
        to float rounding; a batch needs ``batch_tiles`` times one window's memory. 1 (default): one at a time.
    out
        Optional array-like (numpy, memmap, zarr) of the image's shape for the result (default: a new array).
    on_progress
        Called as ``on_progress(done_tiles, total_tiles)`` after every tile.
    should_stop
        Checked before every batch of tiles (every tile with ``batch_tiles=1``); True raises :class:`Cancelled`
        (``out`` keeps the planes done so far).
    z_step_um, resample_z
        A 3-D model only: the volume's z-step (µm), when known; one other than the model's is refused, or with
        ``resample_z`` each volume is read whole, resampled (linearly) to it, restored and resampled back.

    Returns
    -------
    The restored float32 array (``out`` if given), in each plane's own units (``a * x + c`` gives ``a * f(x) + c``;
    models of fixed normalisation: the training images' units).
    """
    kwargs = {"roi": roi, "binning": binning, "tile": tile, "memory_mb": memory_mb, "device": device,
              "precision": precision, "batch_tiles": batch_tiles}
    if resample_z and _z_steps_differ(saved, z_step_um):
        return _predict_resampled(saved, image, z_step_um, out, on_progress, dict(kwargs, should_stop=should_stop))
    with _planned(saved, image, z_step_um=z_step_um, **kwargs) as (shape, tiles, run):
        if out is None:
            out = np.empty(shape, dtype=np.float32)
        elif tuple(out.shape) != shape:
            raise InputError(f"out has shape {tuple(out.shape)}, expected {shape}")
        batches = tile_batches(tiles, int(batch_tiles))
        _predict_planes(run, image, saved.normalization, out, tiles, batches, on_progress, should_stop)
    return out


@contextmanager
def _planned(saved: SavedModel, image, *, roi, binning, tile, memory_mb, device, precision, batch_tiles, z_step_um):
    """:func:`predict`'s checks, field placement, device and tile plan: yields (the image's shape, the tiles of one
    plane or volume, ``run(read, tiles, group)``: :func:`predict_batch` with the network on the device)."""
    shape = _check_call(saved, image, precision, batch_tiles, binning, z_step_um)
    field_shape, offset = field_geometry(shape[-2:], saved.field_shape, roi, binning)
    dev = resolve_device(device)
    amp_dtype = autocast_dtype(precision, dev)
    # a 3-D model goes slab by slab through each volume, columns of tile x tile pixels
    plan = partial(plan_tiles_3d, shape[-3:]) if saved.config.ndim == 3 else partial(plan_tiles, shape[-2:])
    tiles = plan(saved.config, tile, memory_mb)
    with _network_on(saved.model, dev) as model:
        yield shape, tiles, partial(predict_batch, model, offset=offset, field_shape=field_shape, dev=dev,
                                    amp_dtype=amp_dtype)


def volume_slabs(saved: SavedModel, shape: Sequence[int], *, z_step_um: float | None = None,
                 resample_z: bool = False) -> list[tuple[int, int, int, int]]:
    """The z-slabs :func:`predict` restores one after another in each (D, H, W) volume of a (..., D, H, W) stack
    of ``shape`` with a 3-D model: (core start, core end, window start, window end) each (:func:`z_slabs`); one
    slab, the whole volume, where ``resample_z`` resamples it (such a volume is read whole).

    Raises
    ------
    InputError
        A stack :func:`predict` refuses by its shape and z-step alone, with the same message.
    """
    shape = tuple(int(s) for s in shape)
    _require_volumes(shape)
    if resample_z and _z_steps_differ(saved, z_step_um):
        return [(0, shape[-3], 0, shape[-3])]
    _check_volume_call(saved, shape, z_step_um)
    return z_slabs(shape[-3], saved.config)


def volume_normalization(saved: SavedModel, volume) -> Normalization:
    """The intensity map :func:`predict` uses for one (D, H, W) volume (or 2-D plane): the model's, or with
    per-image normalisation the one measured on a sample of it (every plane read, a few of its pixels kept)."""
    return _plane_normalization(saved.normalization, volume, ())


def predict_slab(saved: SavedModel, volume, planes: tuple[int, int], *, normalization: Normalization | None = None,
                 roi: Sequence[int] | None = None, binning: int = 1, tile: int | None = None,
                 memory_mb: float = 1024.0, device: str = "auto", precision: str = "fp32", batch_tiles: int = 1,
                 z_step_um: float | None = None) -> np.ndarray:
    """The planes ``z0:z1`` of :func:`predict`'s output for one (D, H, W) ``volume`` with a 3-D model, bit for bit,
    computed from their z-slabs alone: the same tiles, batches and normalisation (a dask task each).

    Parameters
    ----------
    volume
        Any (D, H, W) array that slices lazily: only the windows of the slabs' tiles (``z_slabs``' windows) are
        read.
    planes
        (z0, z1): the cores of one or more consecutive slabs of :func:`volume_slabs`.
    normalization
        :func:`volume_normalization` of the volume, measured once for all its slabs (default: measured here).
    roi, binning, tile, memory_mb, device, precision, batch_tiles, z_step_um
        As for :func:`predict`.

    Returns
    -------
    The restored float32 planes, (z1 - z0, H, W).
    """
    z0, z1 = (int(z) for z in planes)
    if saved.config.ndim != 3 or len(volume.shape) != 3:
        raise InputError(f"predict_slab restores one (D, H, W) volume with a 3-D model, got a {saved.config.ndim}-D "
                         f"model and shape {tuple(volume.shape)}")
    with _planned(saved, volume, roi=roi, binning=binning, tile=tile, memory_mb=memory_mb, device=device,
                  precision=precision, batch_tiles=batch_tiles, z_step_um=z_step_um) as (shape, tiles, run):
        groups = [g for g in tile_batches(tiles, int(batch_tiles)) if z0 <= tiles[g[0]][0][0] < z1]
        cores = {tiles[i][0][:2] for g in groups for i in g}
        if not cores or sum(c1 - c0 for c0, c1 in cores) != z1 - z0 or max(c1 for _, c1 in cores) > z1:
            raise ValueError(f"planes {z0}:{z1} are not the cores of whole z-slabs {sorted(cores)} of this volume")
        norm = volume_normalization(saved, volume) if normalization is None else normalization
        out = np.empty((z1 - z0, *shape[1:]), dtype=np.float32)
        read = partial(_read_window, volume, (), norm)
        for group in groups:
            for core, pred in run(read, tiles, group):
                out[(slice(core[0] - z0, core[1] - z0), *_slices(core[2:]))] = norm.invert(pred)
    return out


def _predict_planes(run, image, norm: Normalization, out, tiles, batches, on_progress, should_stop) -> None:
    """:func:`predict`'s loop over the planes (volumes, for a 3-D model) and their batches of tiles;
    ``run(read, tiles, group)`` is :func:`predict_batch` with the network and the field placement bound."""
    shape = tuple(out.shape)
    nd = len(tiles[0][0]) // 2  # 2: tiles of planes; 3: tiles of volumes
    total = int(np.prod(shape[:-nd], dtype=np.int64)) * len(tiles)
    done = 0
    for idx in np.ndindex(*shape[:-nd]):
        pnorm = _plane_normalization(norm, image, idx)
        for group in batches:
            if should_stop is not None and should_stop():
                raise Cancelled(f"prediction cancelled after {done} of {total} tiles")
            read = partial(_read_window, image, idx, pnorm)
            for core_window, core in run(read, tiles, group):
                out[idx + _slices(core_window)] = pnorm.invert(core)
                done += 1
                if on_progress is not None:
                    on_progress(done, total)
