"""Spatially varying 3-D blur of z-stacks: the PSF-interpolation operator in 3-D, its exact adjoint, a brute-force
reference and simulated pairs.

The method is :mod:`napari_coordgate.optics.blur`'s, with volumes: a 3-D PSF model
(:mod:`napari_coordgate.optics.psf3d`, ``ndim`` 3) gives 3-D PSFs (D, s, s) on a K x K grid of nodes in (y, x), and

    blurred = Σ_k PSF3D_k ∗ (w_k(y, x) · volume)

with the tent weights ``w_k(y, x) = a_i(y) b_j(x)`` of :func:`~napari_coordgate.coords.tent_weights`, constant in
z (the PSF varies across the field, not with depth). Each voxel spreads its light with the bilinear interpolation
of the four node PSFs around its (y, x), which is what :func:`brute_force_blur3d` computes voxel by voxel. Each
weight map is non-zero on at most two grid cells per axis, so each term is a 3-D FFT convolution of a block of
the volume (all its planes): the cost is about four FFT convolutions of the whole volume whatever K is (more
exactly: the blocks of the interior nodes span two cells, so the FFT work is (2 K - 2 + margins)² / K² times the
whole volume's, about 4).

Why blocks and not a low-rank (SVD) expansion of the grid into a few eigen-PSFs: the blocks are exact (the
operator equals the tent-interpolation model to rounding, and so does its adjoint), while a rank-r expansion
costs r whole-volume convolutions plus an error that depends on how the PSFs vary. On the 3-D preset (K = 5,
17 x 25 x 25 PSFs) the blocks blur a 64 x 256 x 256 volume in 0.25 s on two threads and 0.5 s on one, forward or
adjoint, on the project's 2-core CPU machine (``benchmarks/bench_blur3d.py``; up to 2.5 s when other jobs share the
cores; the target was 10 s on two threads), so the exact operator is the one here. Its
price is memory: one OTF per block, about 170 MiB for that volume in float32. Against the exact blur (every
pixel with its own pupil-model PSF) the K x K interpolation of that preset errs by 1.2 % (K = 3), 0.4 % (K = 5)
and 0.2 % (K = 7) in relative L2 norm.

Borders: the volume is extended by half-sample symmetric reflection (``d c b a | a b c d``, SciPy's
``"reflect"``) in z, y and x before blurring, so light from outside the stack and the frame is modelled as a
mirror of the inside; voxels of the reflected margin take the PSF of the nearest frame position. A frame may be a
region of a larger field (``offset`` in ``full_field``), as in 2-D.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from scipy.fft import next_fast_len

from napari_coordgate.checks import as_float, check_image
from napari_coordgate.coords import field_axis, grid_positions
from napari_coordgate.devices import resolve_device
from napari_coordgate.optics.blur import _checked_region, _node_blocks, _numpy_items, _reflect_index, add_noise
from napari_coordgate.optics.measured import tent_interpolate
from napari_coordgate.optics.models import get_psf_model
from napari_coordgate.optics.psfmodel import PSFModel, require_ndim

__all__ = ["SpatiallyVaryingBlur3D", "brute_force_blur3d", "synthesize_pairs3d", "add_volume_noise", "check_volume"]

_USE_2D = "use SpatiallyVaryingBlur (plane by plane) for a 2-D model, or build a 3-D one (Pupil3DPSF.from_pupil)"


def check_volume(volume, name: str = "volume", *, max_ndim: int | None = None) -> np.ndarray:
    """A volume (D, H, W) or a series (..., D, H, W; at most ``max_ndim`` axes) as a numpy array, checked by
    :func:`~napari_coordgate.checks.check_image` (dtype, NaN/Inf) after a message of its own for too few or too many
    axes."""
    if hasattr(volume, "detach") and hasattr(volume, "cpu"):
        volume = volume.detach().cpu().numpy()
    arr = np.asarray(volume)
    if arr.ndim < 3 or (max_ndim is not None and arr.ndim > max_ndim):
        series = "a series (T, D, H, W)" if max_ndim == 4 else "a series (..., D, H, W)"
        raise ValueError(f"{name}: expected a volume (D, H, W) (planes, rows, columns) or {series}, got shape "
                         f"{arr.shape}" + ("; a 2-D image needs the 2-D functions" if arr.ndim == 2 else ""))
    return check_image(arr, name, min_ndim=3, max_ndim=max_ndim)


def _checked_shape(shape: Sequence[int]) -> tuple[int, int, int]:
    out = tuple(int(n) for n in shape)
    if len(out) != 3 or min(out) < 1:
        raise ValueError(f"shape must be (D, H, W) with positive sides (planes, rows, columns), got {tuple(shape)}")
    return out  # type: ignore[return-value]


def _checked_grid3d(model: PSFModel, full_field) -> np.ndarray:
    """``model.psf_grid(full_field)`` checked against what the tent weights assume: (K, K, D, s, s), D and s odd,
    nodes ``linspace(-1, 1, K)``."""
    psfs, ys, xs = model.psf_grid(full_field)
    psfs = np.asarray(psfs)
    k, d, s = model.grid, model.psf_depth, model.psf_size
    if psfs.shape != (k, k, d, s, s) or s % 2 == 0 or d % 2 == 0:
        raise ValueError(f"{model.describe()}: psf_grid gave PSFs of shape {psfs.shape}, expected {(k, k, d, s, s)} "
                         "with an odd depth and side")
    nodes = grid_positions(k)
    if not (np.allclose(ys, nodes) and np.allclose(xs, nodes)):
        raise ValueError(f"{model.describe()}: psf_grid nodes must be linspace(-1, 1, {k})")
    return psfs


class SpatiallyVaryingBlur3D:
    """The 3-D PSF-interpolation blur of one 3-D PSF model on one volume shape, and its exact adjoint.

    Parameters
    ----------
    psf
        A 3-D PSF model (``ndim`` 3: :class:`~napari_coordgate.optics.psf3d.Pupil3DPSF`,
        :class:`~napari_coordgate.optics.psf3d.MeasuredGrid3DPSF`, or what
        :func:`~napari_coordgate.optics.models.get_psf_model` resolves to one); ``psf.grid`` sets K.
    shape
        (D, H, W) of the volumes it will blur: planes, rows, columns. The planes are assumed ``psf.z_step_um``
        apart.
    offset, full_field
        (y, x) of the volumes' top-left voxel in the whole field and the field's (H, W), when the volumes are a
        region of it (a camera ROI); default: the volumes span the field.
    device
        Torch device for the FFTs (``"cpu"``, ``"cuda"``, ``"mps"`` or ``"auto"``).
    dtype
        ``torch.float32`` (default) or ``torch.float64``.

    Notes
    -----
    ``apply`` / ``apply_adjoint`` take tensors (..., D, H, W) (all volumes at once) on the operator's device;
    ``forward`` / ``adjoint`` take arrays (D, H, W) or (..., D, H, W), volume by volume, and return float32 numpy.
    The operator keeps one OTF per block: about four times a volume's padded spectrum in memory.
    """

    def __init__(self, psf: "PSFModel | str | dict", shape: Sequence[int], *, offset: Sequence[int] = (0, 0),
                 full_field: Sequence[int] | None = None, device: "str | torch.device" = "cpu",
                 dtype: torch.dtype = torch.float32):
        self.psf_model = require_ndim(get_psf_model(psf), 3, _USE_2D)
        self.shape = _checked_shape(shape)
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
        self.field_shape: tuple[int, int] = self.shape[1:]  # type: ignore[assignment]
        self.full_field, self.offset = _checked_region(self.field_shape, offset, full_field)
        self.device = resolve_device(device)
        self.dtype = dtype
        self.psfs = _checked_grid3d(self.psf_model, self.full_field)
        self.pad_z, self.pad = self.psfs.shape[2] // 2, self.psfs.shape[-1] // 2
        d, h, w = self.shape
        self._iz, self._iy, self._ix = (torch.as_tensor(_reflect_index(n, p), device=self.device)
                                        for n, p in ((d, self.pad_z), (h, self.pad), (w, self.pad)))
        # every block holds all planes: the padded depth plus the PSF's
        nz = next_fast_len(d + 4 * self.pad_z, real=True)
        self._blocks = _node_blocks(self.psfs, self.field_shape, self.full_field, self.offset, dtype, self.device,
                                    (nz,))

    def __repr__(self) -> str:
        region = "" if self.full_field == self.field_shape else f", offset={self.offset}, full_field={self.full_field}"
        return (f"SpatiallyVaryingBlur3D(psf={self.psf_model.name!r}, shape={self.shape}{region}, "
                f"K={self.psfs.shape[0]}, psf={self.psfs.shape[2:]}, device={str(self.device)!r})")

    # ----------------------------------------------------------------------------------------- tensors
    def _check_tensor(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim < 3 or tuple(x.shape[-3:]) != self.shape:
            raise ValueError(f"volume is {tuple(x.shape[-3:])} but this operator was built for {self.shape} "
                             "(D, H, W); build a SpatiallyVaryingBlur3D for that shape")
        return x.to(device=self.device, dtype=self.dtype)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """Blur volumes: a tensor (..., D, H, W), moved to the operator's device and dtype; same shape back."""
        x = self._check_tensor(x)
        lead = x.shape[:-3]
        x = x.reshape(-1, *self.shape)
        d = self.shape[0]
        z0 = 2 * self.pad_z
        padded = x[:, self._iz][:, :, self._iy][:, :, :, self._ix]
        out = torch.zeros_like(x)
        for b in self._blocks:
            (r0, r1), (c0, c1) = b.rows, b.cols
            fr0, fr1, fc0, fc1 = b.frame
            lr0, lr1, lc0, lc1 = b.local
            block = padded[:, :, r0:r1, c0:c1] * b.weight
            spec = torch.fft.rfftn(block, s=b.size, dim=(-3, -2, -1))
            conv = torch.fft.irfftn(spec * b.otf, s=b.size, dim=(-3, -2, -1))
            out[:, :, fr0:fr1, fc0:fc1] += conv[:, z0 : z0 + d, lr0:lr1, lc0:lc1]
        return out.reshape(*lead, *self.shape)

    def apply_adjoint(self, y: torch.Tensor) -> torch.Tensor:
        """The exact adjoint (transpose) of :meth:`apply`: each block correlated with its PSF and weighted, then
        the reflected margins folded back onto the voxels they were copied from."""
        y = self._check_tensor(y)
        lead = y.shape[:-3]
        y = y.reshape(-1, *self.shape)
        n, (d, h, w), p, pz = y.shape[0], self.shape, self.pad, self.pad_z
        opts = {"dtype": self.dtype, "device": self.device}
        padded = torch.zeros((n, d + 2 * pz, h + 2 * p, w + 2 * p), **opts)
        for b in self._blocks:
            (r0, r1), (c0, c1) = b.rows, b.cols
            fr0, fr1, fc0, fc1 = b.frame
            lr0, lr1, lc0, lc1 = b.local
            local = torch.zeros((n, d + 4 * pz, r1 - r0 + 2 * p, c1 - c0 + 2 * p), **opts)
            local[:, 2 * pz : 2 * pz + d, lr0:lr1, lc0:lc1] = y[:, :, fr0:fr1, fc0:fc1]
            spec = torch.fft.rfftn(local, s=b.size, dim=(-3, -2, -1))
            corr = torch.fft.irfftn(spec * b.otf.conj(), s=b.size, dim=(-3, -2, -1))
            padded[:, :, r0:r1, c0:c1] += corr[:, : d + 2 * pz, : r1 - r0, : c1 - c0] * b.weight
        # adjoint of the reflection, axis by axis: the margins' values go back to the voxels they were copied from
        planes = torch.zeros((n, d, h + 2 * p, w + 2 * p), **opts).index_add_(1, self._iz, padded)
        rows = torch.zeros((n, d, h, w + 2 * p), **opts).index_add_(2, self._iy, planes)
        out = torch.zeros((n, d, h, w), **opts).index_add_(3, self._ix, rows)
        return out.reshape(*lead, d, h, w)

    # ------------------------------------------------------------------------------------------ numpy
    def _numpy_call(self, volume, fn) -> np.ndarray:
        arr = as_float(check_volume(volume))
        if arr.shape[-3:] != self.shape:
            raise ValueError(f"volume is {arr.shape[-3:]} but this operator was built for {self.shape} (D, H, W); "
                             "build a SpatiallyVaryingBlur3D for that shape")
        return _numpy_items(arr, self.shape, fn, self.device)

    def forward(self, volume) -> np.ndarray:
        """Blur a volume (D, H, W) or a series (..., D, H, W); float32 numpy of the same shape."""
        return self._numpy_call(volume, self.apply)

    __call__ = forward

    def adjoint(self, volume) -> np.ndarray:
        """The exact adjoint of :meth:`forward` on (D, H, W) or (..., D, H, W); float32 numpy of the same shape."""
        return self._numpy_call(volume, self.apply_adjoint)


def brute_force_blur3d(volume, psf: "PSFModel | str | dict", *, exact: bool = False) -> np.ndarray:
    """Reference 3-D blur: every voxel spreads its light with the tent (bilinear) interpolation of the four node
    PSFs of ``psf.psf_grid()`` around its (y, x), written out voxel by voxel.

    What :class:`SpatiallyVaryingBlur3D` computes with FFTs, with the same borders (symmetric reflection in z, y
    and x; margin voxels take the PSF of the nearest frame position). It costs D s² passes over the padded
    volume: use small volumes (a few tens of thousands of voxels). With ``exact=True`` every voxel takes the
    model's own PSF at its (y, x) instead (:meth:`PSFModel.psfs_at`, one 3-D PSF per pixel of the frame, as the 2-D
    :func:`~napari_coordgate.optics.blur.brute_force_blur` does): the difference is the error of interpolating a
    K x K grid.

    Parameters
    ----------
    volume
        Array-like (D, H, W) or (..., D, H, W).
    psf
        A 3-D PSF model (or what :func:`get_psf_model` resolves to one).
    exact
        False: the interpolated node PSFs (the fast operator's model); True: the model's PSF of every pixel.

    Returns
    -------
    ndarray, float32, same shape as ``volume`` (computed in float64)
    """
    model = require_ndim(get_psf_model(psf), 3, _USE_2D)
    arr = check_volume(volume).astype(np.float64)
    d, h, w = arr.shape[-3:]
    pd, s = model.psf_depth, model.psf_size
    pz, p = pd // 2, s // 2
    yy, xx = np.meshgrid(field_axis(h), field_axis(w), indexing="ij")
    psfs = model.psfs_at(yy, xx, (h, w)) if exact else tent_interpolate(model.psf_grid((h, w))[0], yy, xx)
    # PSF of the nearest frame pixel for every padded (y, x): (h + 2p, w + 2p, pd, s, s)
    psf_pad = psfs[np.clip(np.arange(-p, h + p), 0, h - 1)][:, np.clip(np.arange(-p, w + p), 0, w - 1)]
    iz, iy, ix = _reflect_index(d, pz), _reflect_index(h, p), _reflect_index(w, p)
    vols = arr.reshape(-1, d, h, w)
    out = np.empty(vols.shape, dtype=np.float32)
    for n, vol in enumerate(vols):
        src = vol[iz][:, iy][:, :, ix]
        acc = np.zeros((d + 4 * pz, h + 4 * p, w + 4 * p))
        for c in range(pd):
            for a in range(s):
                for b in range(s):
                    # a source at padded (q, r, t) with PSF voxel (c, a, b) lands at (q + c, r + a, t + b)
                    acc[c : c + d + 2 * pz, a : a + h + 2 * p, b : b + w + 2 * p] += src * psf_pad[:, :, c, a, b]
        out[n] = acc[2 * pz : 2 * pz + d, 2 * p : 2 * p + h, 2 * p : 2 * p + w]
    return out.reshape(arr.shape)


def _stacked_volumes(sharp_volumes) -> np.ndarray:
    """(N, D, H, W) float32 of one volume, a series or a sequence of volumes of one shape."""
    if isinstance(sharp_volumes, (list, tuple)):
        if not sharp_volumes:
            raise ValueError("sharp_volumes is empty; give at least one (D, H, W) volume")
        checked = [as_float(check_volume(v, f"sharp_volumes[{i}]", max_ndim=3))
                   for i, v in enumerate(sharp_volumes)]
        shapes = {v.shape for v in checked}
        if len(shapes) > 1:
            raise ValueError(f"sharp_volumes have different shapes {sorted(shapes)}; the PSF field is defined on one "
                             "frame and one z sampling, so crop them to one shape")
        return np.stack(checked).astype(np.float32)
    arr = as_float(check_volume(sharp_volumes, "sharp_volumes", max_ndim=4))
    return arr.astype(np.float32).reshape(-1, *arr.shape[-3:])


def add_volume_noise(volumes, *, photons: float | None = 1000.0, read_noise: float = 0.0, offset: float = 0.0,
                     seed: int | None = 0) -> np.ndarray:
    """:func:`~napari_coordgate.optics.blur.add_noise` with the photon scale of each whole volume of (N, D, H, W)
    (or one (D, H, W)): its brightest voxel collects ``photons`` photons and every plane is counted on that scale,
    so planes far from focus stay dim and noisy as in a real z-stack (each volume is given to ``add_noise`` as one
    plane). Returns float32 of the input's shape."""
    arr = np.asarray(volumes)
    if arr.ndim not in (3, 4):
        raise ValueError(f"expected a volume (D, H, W) or volumes (N, D, H, W), got shape {arr.shape}")
    flat = arr.reshape(-1, 1, int(np.prod(arr.shape[-3:])))
    return add_noise(flat, photons=photons, read_noise=read_noise, offset=offset, seed=seed).reshape(arr.shape)


def synthesize_pairs3d(sharp_volumes, psf: "PSFModel | str | dict", *, seed: int | None = 0,
                       photons: float | None = None, read_noise: float = 0.0, offset: float = 0.0,
                       device: "str | torch.device" = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """3-D training pairs from sharp volumes: (sharp, blurred [+ noise]), as
    :func:`~napari_coordgate.optics.blur.synthesize_pairs` makes 2-D ones.

    The blur acts on the volume above its minimum and the minimum is added back. The noise is
    :func:`~napari_coordgate.optics.blur.add_noise`'s with the **photon scale of the whole volume**: its brightest
    voxel collects ``photons`` photons and every plane is counted on that scale, so the planes far from focus
    stay dim and noisy as in a real z-stack (``add_noise`` alone would scale each plane to its own peak; it is given
    each volume as one plane).

    Parameters
    ----------
    sharp_volumes
        One volume (D, H, W), a series (N, D, H, W) or a sequence of (D, H, W) volumes of one shape.
    psf
        A 3-D PSF model (or what :func:`get_psf_model` resolves to one).
    seed, photons, read_noise, offset
        Noise parameters, see :func:`~napari_coordgate.optics.blur.add_noise`; ``photons=None`` and
        ``read_noise=0`` give noise-free blurred volumes.
    device
        Torch device for the blur.

    Returns
    -------
    sharp, blurred : ndarray, float32, shape (N, D, H, W) (or (D, H, W) for one volume given as such)
    """
    one = not isinstance(sharp_volumes, (list, tuple)) and np.ndim(sharp_volumes) == 3
    sharp = _stacked_volumes(sharp_volumes)
    op = SpatiallyVaryingBlur3D(psf, sharp.shape[-3:], device=device)
    lo = sharp.min()
    blurred = op.forward(sharp - lo) + lo
    if photons is not None or read_noise > 0 or offset != 0:
        blurred = add_volume_noise(blurred, photons=photons, read_noise=read_noise, offset=offset, seed=seed)
    blurred = blurred.astype(np.float32)
    return (sharp[0], blurred[0]) if one else (sharp, blurred)
