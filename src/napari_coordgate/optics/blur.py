"""Spatially varying blur: a fast PSF-interpolation operator, its exact adjoint, a brute-force reference, noise.

The fast model places PSFs on a K × K grid of nodes spanning the frame (nodes on the frame edges) and
writes the blur as

    blurred = Σ_k PSF_k ∗ (w_k · image)

with tent (bilinear) weight maps ``w_k(y, x) = a_i(y) · b_j(x)``: continuous, non-negative, summing to one
everywhere, and exact for PSFs that vary linearly across a grid cell. Equivalently each input pixel spreads
its light with the bilinear interpolation of the four surrounding node PSFs, which is what
:func:`brute_force_blur` does with the exact PSF of every pixel. Each weight map is non-zero on at most
two grid cells per axis, so each term is an FFT convolution of a small block: the total cost is about four
FFT convolutions of the whole image whatever K is.

Borders: the image is extended by half-sample symmetric reflection (``d c b a | a b c d``, SciPy's
``"reflect"`` mode) before blurring, so light from outside the frame is modelled as a mirror of the inside
and the field edge is not darkened. Pixels of the reflected margin spread their light with the PSF of the
nearest frame position (the weights are clamped at the frame edge).

A frame may be a region of a larger field (a camera ROI): built with the region's ``offset`` in the
``full_field``, the operator uses the nodes and tent weights of the whole field, so every pixel is blurred with
the PSF of its place in the field. A binned camera sees the PSF model in larger pixels
(:meth:`~napari_coordgate.optics.psfmodel.PSFModel.binned`).

Every function here takes any :class:`~napari_coordgate.optics.psfmodel.PSFModel` (or what
:func:`~napari_coordgate.optics.models.get_psf_model` resolves: a preset or a dict; files are read by
:func:`napari_coordgate.model_io.resolve_psf`).
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np
import torch
from scipy.fft import next_fast_len

from napari_coordgate.checks import as_float, check_image
from napari_coordgate.coords import field_axis, field_position, grid_positions, tent_weights
from napari_coordgate.devices import resolve_device
from napari_coordgate.optics.models import get_psf_model
from napari_coordgate.optics.psfmodel import PSFModel, require_ndim

__all__ = [
    "SpatiallyVaryingBlur",
    "binned_psf_config",
    "brute_force_blur",
    "add_noise",
    "synthesize_pairs",
    "check_image",
    "normalized_coordinates",
    "resolve_device",
]

# what the 2-D blur tells a caller who hands it a 3-D PSF model (psfmodel.require_ndim)
_USE_3D = "use SpatiallyVaryingBlur3D (napari_coordgate.optics.blur3d) to blur z-stacks with a 3-D model"


def normalized_coordinates(n: int) -> np.ndarray:
    """Normalised field coordinates of the pixel centres of one axis (the convention of the network).

    Parameters
    ----------
    n
        Number of pixels along the axis.

    Returns
    -------
    ndarray, float64, shape (n,)
        ``(2 p - (n - 1)) / (n - 1)`` for ``p = 0 .. n - 1``: -1 and 1 at the outer pixel centres, 0 for
        ``n = 1``.
    """
    return field_axis(n)


def _reflect_index(n: int, pad: int) -> np.ndarray:
    """Source index in [0, n) of each position of an axis padded by ``pad`` with symmetric reflection."""
    q = np.arange(-pad, n + pad) % (2 * n)
    return np.where(q < n, q, 2 * n - 1 - q)


def _axis_weights(n: int, pad: int, k: int, field_n: int, offset: int) -> np.ndarray:
    """(k, n + 2 pad) tent weights (:func:`~napari_coordgate.coords.tent_weights`) of the nodes of one axis over
    the padded axis; columns sum to one.

    The axis is pixels ``offset .. offset + n - 1`` of a field axis of ``field_n`` pixels whose nodes span the
    field; the reflected margin takes the weights of the nearest frame pixel, and nodes whose tents miss the axis
    get all-zero rows.
    """
    p = np.clip(np.arange(-pad, n + pad), 0, n - 1) + offset
    return tent_weights(field_position(p, field_n), k).T


class _Block(NamedTuple):
    """One term PSF_k ∗ (w_k · image): the (y, x) support of w_k in the padded image and where it lands (the 2-D
    and the 3-D blur: a 3-D block holds every plane)."""

    rows: tuple[int, int]  # support rows [r0, r1) in the reflect-padded image
    cols: tuple[int, int]
    size: tuple[int, ...]  # FFT size ((z,) y, x), at least the linear-convolution size
    weight: torch.Tensor  # w_k on the support, (rows, cols)
    otf: torch.Tensor  # rfftn of PSF_k at ``size``
    frame: tuple[int, int, int, int]  # frame rows/cols [fr0, fr1) x [fc0, fc1) the term reaches
    local: tuple[int, int, int, int]  # the same region in the block's full-convolution coordinates


def _checked_region(shape: tuple[int, int], offset, full_field) -> tuple[tuple[int, int], tuple[int, int]]:
    """(full_field, offset) as int tuples if a frame of ``shape`` at ``offset`` fits inside ``full_field``."""
    full = shape if full_field is None else tuple(int(n) for n in full_field)
    off = tuple(int(o) for o in offset)
    fits = len(full) == 2 and len(off) == 2 and min(off) >= 0
    if not (fits and off[0] + shape[0] <= full[0] and off[1] + shape[1] <= full[1]):
        raise ValueError(f"a frame of {shape[0]}x{shape[1]} at offset {tuple(offset)} does not fit inside the field "
                         f"{tuple(full)}; give the frame's (y, x) inside the field and the field's (H, W)")
    return full, off  # type: ignore[return-value]


def _node_blocks(psfs: np.ndarray, frame: tuple[int, int], full_field: tuple[int, int], offset: tuple[int, int],
                 dtype: torch.dtype, device: torch.device, depth: tuple[int, ...] = ()) -> list[_Block]:
    """The blocks of the nodes whose tents reach a frame: (K, K, s, s) PSFs (K, K, D, s, s in 3-D, with ``depth``
    the FFT length along z), the frame's (H, W) at ``offset`` in ``full_field``."""
    k, p = psfs.shape[0], psfs.shape[-1] // 2
    h, w = frame
    wy, wx = _axis_weights(h, p, k, full_field[0], offset[0]), _axis_weights(w, p, k, full_field[1], offset[1])
    blocks = []
    for i in range(k):
        if not wy[i].any():  # a node whose tent misses this region of the field
            continue
        r0, r1 = _support(wy[i])
        for j in range(k):
            if not wx[j].any():
                continue
            c0, c1 = _support(wx[j])
            size = (*depth, next_fast_len(r1 - r0 + 2 * p, real=True), next_fast_len(c1 - c0 + 2 * p, real=True))
            weight = torch.as_tensor(np.outer(wy[i, r0:r1], wx[j, c0:c1]), dtype=dtype, device=device)
            otf = torch.fft.rfftn(torch.as_tensor(psfs[i, j], dtype=dtype, device=device), s=size)
            # frame rows touched by the block's full convolution (padded row r0 + m lands on frame row r0 + m - 2p;
            # in 3-D plane z likewise from padded plane 0), clipped to the frame
            fr0, fr1, fc0, fc1 = max(r0 - 2 * p, 0), min(r1, h), max(c0 - 2 * p, 0), min(c1, w)
            local = (fr0 - r0 + 2 * p, fr1 - r0 + 2 * p, fc0 - c0 + 2 * p, fc1 - c0 + 2 * p)
            blocks.append(_Block((r0, r1), (c0, c1), size, weight, otf, (fr0, fr1, fc0, fc1), local))
    return blocks


def _numpy_items(arr: np.ndarray, item_shape: tuple[int, ...], fn, device: torch.device) -> np.ndarray:
    """``fn`` (a tensor operator) applied to each ``item_shape`` item of ``arr`` (an image plane, a volume) in turn:
    bounded memory for long stacks; float32 numpy of ``arr``'s shape."""
    items = arr.reshape(-1, *item_shape)
    out = np.empty(items.shape, dtype=np.float32)
    with torch.no_grad():
        for i, item in enumerate(items):
            t = torch.as_tensor(np.ascontiguousarray(item), device=device)
            out[i] = fn(t).to("cpu", torch.float32).numpy()
    return out.reshape(arr.shape)


class SpatiallyVaryingBlur:
    """The PSF-interpolation blur operator of one PSF model on one frame shape, and its exact adjoint.

    Parameters
    ----------
    psf
        The PSF model (any :class:`PSFModel`, or a preset name, JSON or ``.cgpsf`` path, or dict);
        ``psf.grid`` sets K and :meth:`PSFModel.psf_grid` of the whole field gives the node PSFs.
    field_shape
        (H, W) of the frames it will blur.
    offset
        (y, x) of the frames' top-left pixel in ``full_field``.
    full_field
        (H, W) of the whole field the PSF model describes, when the frames are a region of it (a camera ROI);
        default ``field_shape``: the frames are the whole field. For a binned camera both are in binned pixels
        and ``psf`` is the model's :meth:`PSFModel.binned`.
    device
        Torch device for the FFTs (``"cpu"``, ``"cuda"``, ``"mps"`` or ``"auto"``).
    dtype
        ``torch.float32`` (default) or ``torch.float64``.

    Notes
    -----
    ``forward`` and ``adjoint`` accept (H, W) arrays or stacks (..., H, W), treated plane by plane, and
    return float32 numpy arrays. ``apply`` / ``apply_adjoint`` do the same on torch tensors already on the
    device (used by iterative methods).
    """

    def __init__(
        self,
        psf: "PSFModel | str | dict",
        field_shape: Sequence[int],
        *,
        offset: Sequence[int] = (0, 0),
        full_field: Sequence[int] | None = None,
        device: "str | torch.device" = "cpu",
        dtype: torch.dtype = torch.float32,
    ):
        self.psf_model = require_ndim(get_psf_model(psf), 2, _USE_3D)
        shape = tuple(int(n) for n in field_shape)
        if len(shape) != 2 or min(shape) < 1:
            raise ValueError(f"field_shape must be (H, W) with positive sides, got {tuple(field_shape)}")
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
        full, off = _checked_region(shape, offset, full_field)
        self.field_shape: tuple[int, int] = shape  # type: ignore[assignment]
        self.full_field: tuple[int, int] = full
        self.offset: tuple[int, int] = off
        self.device = resolve_device(device)
        self.dtype = dtype
        self.psfs, self.grid_y, self.grid_x = _checked_grid(self.psf_model, full)
        self.pad = p = self.psfs.shape[-1] // 2
        h, w = shape
        self._iy = torch.as_tensor(_reflect_index(h, p), device=self.device)
        self._ix = torch.as_tensor(_reflect_index(w, p), device=self.device)
        self._blocks = _node_blocks(self.psfs, shape, full, off, dtype, self.device)

    def __repr__(self) -> str:
        region = "" if self.full_field == self.field_shape else f", offset={self.offset}, full_field={self.full_field}"
        return (
            f"SpatiallyVaryingBlur(psf={self.psf_model.name!r}, field_shape={self.field_shape}{region}, "
            f"K={self.psfs.shape[0]}, psf_size={self.psfs.shape[-1]}, device={str(self.device)!r})"
        )

    # ----------------------------------------------------------------------------------------- tensors

    def _check_tensor(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-2:]) != self.field_shape:
            raise ValueError(
                f"image frame is {tuple(x.shape[-2:])} but this operator was built for {self.field_shape}; "
                "build a SpatiallyVaryingBlur for that shape"
            )
        return x.to(device=self.device, dtype=self.dtype)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """Blur a tensor on the operator's device (all planes at once).

        Parameters
        ----------
        x
            Tensor (..., H, W); moved to the operator's device and dtype.

        Returns
        -------
        torch.Tensor
            Same shape, operator's device and dtype.
        """
        x = self._check_tensor(x)
        lead = x.shape[:-2]
        x = x.reshape(-1, *self.field_shape)
        padded = x[:, self._iy][:, :, self._ix]
        out = torch.zeros_like(x)
        for b in self._blocks:
            (r0, r1), (c0, c1) = b.rows, b.cols
            fr0, fr1, fc0, fc1 = b.frame
            lr0, lr1, lc0, lc1 = b.local
            block = padded[:, r0:r1, c0:c1] * b.weight
            conv = torch.fft.irfft2(torch.fft.rfft2(block, s=b.size) * b.otf, s=b.size)
            out[:, fr0:fr1, fc0:fc1] += conv[:, lr0:lr1, lc0:lc1]
        return out.reshape(*lead, *self.field_shape)

    def apply_adjoint(self, y: torch.Tensor) -> torch.Tensor:
        """The exact adjoint (transpose) of :meth:`apply`.

        Correlates each block with its PSF, multiplies by the weight map, and folds the reflected margin
        back onto the pixels it was copied from.

        Parameters
        ----------
        y
            Tensor (..., H, W); moved to the operator's device and dtype.

        Returns
        -------
        torch.Tensor
            Same shape, operator's device and dtype.
        """
        y = self._check_tensor(y)
        lead = y.shape[:-2]
        y = y.reshape(-1, *self.field_shape)
        n = y.shape[0]
        h, w = self.field_shape
        p = self.pad
        padded = torch.zeros((n, h + 2 * p, w + 2 * p), dtype=self.dtype, device=self.device)
        for b in self._blocks:
            (r0, r1), (c0, c1) = b.rows, b.cols
            fr0, fr1, fc0, fc1 = b.frame
            lr0, lr1, lc0, lc1 = b.local
            local = torch.zeros((n, r1 - r0 + 2 * p, c1 - c0 + 2 * p), dtype=self.dtype, device=self.device)
            local[:, lr0:lr1, lc0:lc1] = y[:, fr0:fr1, fc0:fc1]
            corr = torch.fft.irfft2(torch.fft.rfft2(local, s=b.size) * b.otf.conj(), s=b.size)
            padded[:, r0:r1, c0:c1] += corr[:, : r1 - r0, : c1 - c0] * b.weight
        # adjoint of the reflection: the margin's values go back to the pixels they were copied from
        rows = torch.zeros((n, h, w + 2 * p), dtype=self.dtype, device=self.device)
        rows.index_add_(1, self._iy, padded)
        out = torch.zeros((n, h, w), dtype=self.dtype, device=self.device)
        out.index_add_(2, self._ix, rows)
        return out.reshape(*lead, h, w)

    # ------------------------------------------------------------------------------------------ numpy

    def _numpy_call(self, image, fn) -> np.ndarray:
        arr = as_float(check_image(image))
        if arr.shape[-2:] != self.field_shape:
            raise ValueError(
                f"image frame is {arr.shape[-2:]} but this operator was built for {self.field_shape}; "
                "build a SpatiallyVaryingBlur for that shape"
            )
        return _numpy_items(arr, self.field_shape, fn, self.device)

    def forward(self, image) -> np.ndarray:
        """Blur an image (H, W) or a stack (..., H, W) plane by plane.

        Parameters
        ----------
        image
            Array-like intensities; frame shape must equal ``field_shape``.

        Returns
        -------
        ndarray, float32, same shape as ``image``
        """
        return self._numpy_call(image, self.apply)

    __call__ = forward

    def adjoint(self, image) -> np.ndarray:
        """Apply the exact adjoint of :meth:`forward` (correlation with the PSFs, then weights).

        Parameters
        ----------
        image
            Array-like (H, W) or (..., H, W).

        Returns
        -------
        ndarray, float32, same shape as ``image``
        """
        return self._numpy_call(image, self.apply_adjoint)


def binned_psf_config(psf: "PSFModel | str | dict", binning: int) -> PSFModel:
    """The PSF model as a camera binning ``binning`` x ``binning`` pixels sees it.

    ``get_psf_model(psf).binned(binning)``, kept for callers of the name from before the PSF-model interface; see
    :meth:`PSFModel.binned`.
    """
    return get_psf_model(psf).binned(binning)


def _checked_grid(model: PSFModel, field_shape) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``model.psf_grid(field_shape)``, checked against what the tent weights assume (odd PSFs, nodes
    ``linspace(-1, 1, K)``), so a faulty PSF model implementation fails here with its name, not in an FFT."""
    psfs, ys, xs = model.psf_grid(field_shape)
    psfs = np.asarray(psfs)
    k, s = model.grid, model.psf_size
    nodes = grid_positions(k)
    if psfs.shape != (k, k, s, s) or s % 2 == 0:
        raise ValueError(f"{model.describe()}: psf_grid gave PSFs of shape {psfs.shape}, expected "
                         f"{(k, k, s, s)} with an odd PSF side")
    if not (np.allclose(ys, nodes) and np.allclose(xs, nodes)):
        raise ValueError(f"{model.describe()}: psf_grid nodes must be linspace(-1, 1, {k})")
    return psfs, np.asarray(ys), np.asarray(xs)


def _support(weights: np.ndarray) -> tuple[int, int]:
    nz = np.flatnonzero(weights > 0)
    return int(nz[0]), int(nz[-1]) + 1


def brute_force_blur(image, psf: "PSFModel | str | dict") -> np.ndarray:
    """Reference blur: every pixel spreads its light with the exact PSF of its own position.

    It costs one PSF per pixel, so use it on small images (tens of thousands of pixels) to check the fast
    operator. Borders are treated as in :class:`SpatiallyVaryingBlur` (symmetric reflection; margin pixels use
    the PSF of the nearest frame position).

    Parameters
    ----------
    image
        Array-like (H, W) or (..., H, W).
    psf
        The PSF model (any :class:`PSFModel`, or what :func:`get_psf_model` resolves).

    Returns
    -------
    ndarray, float32, same shape as ``image`` (computed in float64)
    """
    model = require_ndim(get_psf_model(psf), 2, _USE_3D)
    arr = check_image(image).astype(np.float64)
    h, w = arr.shape[-2:]
    s = model.psf_size
    p = s // 2
    yy, xx = np.meshgrid(normalized_coordinates(h), normalized_coordinates(w), indexing="ij")
    psfs = model.psfs_at(yy, xx, (h, w))  # (h, w, s, s)
    iy, ix = _reflect_index(h, p), _reflect_index(w, p)
    cy = np.clip(np.arange(-p, h + p), 0, h - 1)
    cx = np.clip(np.arange(-p, w + p), 0, w - 1)
    psf_pad = psfs[cy][:, cx]  # PSF of the nearest frame pixel for every padded position
    planes = arr.reshape(-1, h, w)
    out = np.empty(planes.shape, dtype=np.float32)
    for n, plane in enumerate(planes):
        src = plane[iy][:, ix]
        acc = np.zeros((h + 4 * p, w + 4 * p))
        for a in range(s):
            for b in range(s):
                # source at padded (q, r) with PSF pixel (a, b) lands at accumulator (q + a, r + b)
                acc[a : a + h + 2 * p, b : b + w + 2 * p] += src * psf_pad[:, :, a, b]
        out[n] = acc[2 * p : 2 * p + h, 2 * p : 2 * p + w]
    return out.reshape(arr.shape)


def add_noise(
    blurred,
    *,
    photons: float | None = 1000.0,
    read_noise: float = 0.0,
    offset: float = 0.0,
    seed: int | None = 0,
) -> np.ndarray:
    """Camera noise: Poisson shot noise, Gaussian read noise and a constant offset.

    Each plane (H, W) is scaled so that its brightest pixel collects ``photons`` photons on average; shot
    and read noise are drawn in photon units, then the result is scaled back to the input's intensity units
    and ``offset`` (in those units) is added.

    Parameters
    ----------
    blurred
        Non-negative intensities, (H, W) or (..., H, W).
    photons
        Expected photon count at each plane's brightest pixel; ``None`` turns shot noise off.
    read_noise
        Standard deviation of the read noise, in photons (electrons); in image units when ``photons`` is
        ``None``.
    offset
        Camera offset added to every pixel, in the image's units.
    seed
        Seed of the random generator; the same seed gives the same noise.

    Returns
    -------
    ndarray, float32, same shape as ``blurred``
    """
    arr = check_image(blurred, "blurred").astype(np.float64)
    if photons is not None and not photons > 0:
        raise ValueError(f"photons must be positive (or None for no shot noise), got {photons!r}")
    if not read_noise >= 0:
        raise ValueError(f"read_noise must be >= 0, got {read_noise!r}")
    if not np.isfinite(offset):
        raise ValueError(f"offset must be finite, got {offset!r}")
    rng = np.random.default_rng(seed)
    planes = arr.reshape(-1, *arr.shape[-2:])
    out = np.empty(planes.shape, dtype=np.float32)
    for i, plane in enumerate(planes):
        peak = plane.max()
        # without shot noise there is no photon scale: read noise is then in image units; an all-zero
        # plane has no brightest pixel, so one image unit stands for ``photons`` photons
        scale = 1.0 if photons is None else photons / peak if peak > 0 else photons
        counts = np.clip(plane, 0.0, None) * scale
        if photons is not None:
            counts = rng.poisson(counts).astype(np.float64)
        if read_noise > 0:
            counts = counts + rng.normal(0.0, read_noise, size=counts.shape)
        out[i] = counts / scale + offset
    return out.reshape(arr.shape)


def synthesize_pairs(
    sharp_images,
    psf: "PSFModel | str | dict",
    *,
    seed: int | None = 0,
    photons: float | None = None,
    read_noise: float = 0.0,
    offset: float = 0.0,
    device: "str | torch.device" = "cpu",
) -> tuple[np.ndarray, np.ndarray]:
    """Training pairs from sharp images: (sharp, blurred [+ noise]). The one way the package simulates pairs
    (training from a PSF model, ``napari-coordgate simulate``, the demo and the sample data).

    The blur acts on the image above its minimum and the minimum is added back: light is non-negative, and a
    constant background (a camera offset) passes unchanged whatever the PSF model's normalisation.

    Parameters
    ----------
    sharp_images
        One image (H, W), a stack (N, H, W) or a sequence of (H, W) images of one shape (the PSF field is
        defined on the frame, so all must share it). Intensity units are kept.
    psf
        The PSF model (any :class:`PSFModel`, or a preset name, JSON or ``.cgpsf`` path, or dict).
    seed
        Seed of the noise; the same inputs and seed give identical pairs.
    photons, read_noise, offset
        Noise parameters, see :func:`add_noise`; ``photons=None`` and ``read_noise=0`` give noise-free
        blurred images.
    device
        Torch device for the blur.

    Returns
    -------
    sharp, blurred : ndarray, float32, shape (N, H, W) (or (H, W) for one image)
    """
    if isinstance(sharp_images, (list, tuple)):
        if not sharp_images:
            raise ValueError("sharp_images is empty; give at least one (H, W) image")
        checked = [as_float(check_image(im, f"sharp_images[{i}]", max_ndim=2)) for i, im in enumerate(sharp_images)]
        shapes = {im.shape for im in checked}
        if len(shapes) > 1:
            raise ValueError(
                f"sharp_images have different shapes {sorted(shapes)}; the PSF field is defined on one frame, "
                "so crop or resize them to one shape"
            )
        sharp = np.stack(checked)
    else:
        sharp = as_float(check_image(sharp_images, "sharp_images", max_ndim=3))
    sharp = sharp.astype(np.float32)
    op = SpatiallyVaryingBlur(psf, sharp.shape[-2:], device=device)
    lo = sharp.min()
    blurred = op.forward(sharp - lo) + lo
    if photons is not None or read_noise > 0 or offset != 0:
        blurred = add_noise(blurred, photons=photons, read_noise=read_noise, offset=offset, seed=seed)
    return sharp, blurred.astype(np.float32)
