"""Field coordinates and the CoordGate layer.

CoordGate (Howard, Norreys & Döpp, "CoordGate: Efficiently Computing Spatially-Varying Convolutions in
Convolutional Neural Networks", arXiv:2401.04680) multiplies the output channels of a convolution block by a
gate that a small pixel-wise MLP computes from the pixel's absolute position in the field of view. The
channels act as a basis of kernels; the gate mixes them differently at each position, which gives a
spatially varying convolution at the cost of one multiplication at inference (the gate depends on
coordinates only, so it is computed once per geometry and reused).

Field coordinates: a pixel's position in the full sensor frame, each axis normalised to [-1, 1] with pixel
centres at ``(2 p - (N - 1)) / (N - 1)``. A crop or tile passes its offset inside the field and the field
shape, so the same pixel gets the same gate whatever the crop. A pixel of downsampling level ``l`` stands
for a block of ``2**l`` full-resolution pixels and takes the coordinate of the block's centre.

A 3-D feature map ``(B, C, d, h, w)`` of a z-stack is gated by the (y, x) position alone: the gate is the 2-D
gate ``(B|1, C, h, w)`` of its place, computed and cached exactly as for a plane, broadcast over z as
``(B|1, C, 1, h, w)``.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..coords import field_axis

__all__ = ["field_coordinates", "CoordGate", "coordinate_mlp"]


def is_channels_last(x: torch.Tensor) -> bool:
    """Whether a (B, C, h, w) feature map keeps its channels innermost (torch.channels_last)."""
    return x.dim() == 4 and x.shape[1] > 1 and x.stride(1) == 1


def _axis(n_field: int, offsets: torch.Tensor, length: int, level: int, dtype, device) -> torch.Tensor:
    """Normalised centre coordinates along one axis, shape (B, length) (the formula: ``coords.field_axis``)."""
    rows = [field_axis(n_field, float(o), length, 2**level) for o in offsets.tolist()]
    return torch.from_numpy(np.stack(rows)).to(device=device, dtype=dtype)


def field_coordinates(
    field_shape: Sequence[int],
    offset: Sequence[int] | torch.Tensor = (0, 0),
    shape: Sequence[int] | None = None,
    level: int = 0,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Coordinate grid of a crop of the field at a downsampling level.

    Parameters
    ----------
    field_shape
        (H, W) of the full sensor frame, in full-resolution pixels.
    offset
        (y, x) of the crop's top-left pixel inside the field, in full-resolution pixels; or an integer
        tensor of shape (B, 2) with one offset per sample.
    shape
        (h, w) of the grid at this level (the feature map's spatial shape). Defaults to the field shape
        downsampled to ``level``.
    level
        Downsampling level: a grid pixel covers ``2**level`` full-resolution pixels per axis.

    Returns
    -------
    torch.Tensor
        ``(2, h, w)`` for a single offset, ``(B, 2, h, w)`` for a tensor of offsets. Channel 0 is x (columns),
        channel 1 is y (rows), both in [-1, 1] at pixel centres of the full field.
    """
    if len(field_shape) != 2 or min(field_shape) < 1:
        raise ValueError(f"field_shape must be (H, W) with positive sides, got {tuple(field_shape)}")
    if level < 0:
        raise ValueError(f"level must be >= 0, got {level}")
    H, W = int(field_shape[0]), int(field_shape[1])
    if shape is None:
        shape = (max(1, H // 2**level), max(1, W // 2**level))
    h, w = int(shape[0]), int(shape[1])
    batched = isinstance(offset, torch.Tensor) and offset.ndim == 2
    offsets = torch.as_tensor(offset if batched else [tuple(offset)], dtype=torch.float64)
    if offsets.ndim != 2 or offsets.shape[1] != 2:
        raise ValueError(f"offset must be (y, x) or a (B, 2) tensor, got shape {tuple(offsets.shape)}")
    ys = _axis(H, offsets[:, 0], h, level, dtype, device)  # (B, h)
    xs = _axis(W, offsets[:, 1], w, level, dtype, device)  # (B, w)
    grid = torch.stack(
        [xs[:, None, :].expand(-1, h, w), ys[:, :, None].expand(-1, h, w)], dim=1
    )  # (B, 2, h, w)
    return grid if batched else grid[0]


def coordinate_mlp(out_channels: int, hidden: int, layers: int) -> nn.Sequential:
    """Pixel-wise MLP (1x1 convolutions) from 2 coordinates to ``out_channels`` values.

    ``layers`` counts linear layers; a GELU sits between consecutive ones (the public reference code is
    affine-only, which limits the gate to a linear function of position per channel).
    """
    mods: list[nn.Module] = []
    width_in = 2
    for _ in range(layers - 1):
        mods += [nn.Conv2d(width_in, hidden, 1), nn.GELU()]
        width_in = hidden
    mods.append(nn.Conv2d(width_in, out_channels, 1))
    return nn.Sequential(*mods)


class _CropGather(torch.autograd.Function):
    """Crops ``(B, h, w, C)`` of a whole-field gate ``(Hf, Wf, C)`` at the given top-left corners, as slice copies;
    the backward adds each crop's gradient into its slice of one zeroed field (advanced indexing's scatter with
    accumulation was about 7 % of a CPU training step)."""

    @staticmethod
    def forward(ctx, field, corners, h: int, w: int):
        out = field.new_empty((len(corners), h, w, field.shape[-1]))
        for k, (y, x) in enumerate(corners):
            out[k] = field[y : y + h, x : x + w]
        ctx.corners, ctx.h, ctx.w, ctx.field_shape = corners, h, w, field.shape
        return out

    @staticmethod
    def backward(ctx, grad):
        h, w = ctx.h, ctx.w
        out = grad.new_zeros(ctx.field_shape)
        for k, (y, x) in enumerate(ctx.corners):
            out[y : y + h, x : x + w] += grad[k]
        return out, None, None, None


class CoordGate(nn.Module):
    """Multiply feature channels by a gate computed from absolute field coordinates.

    Parameters
    ----------
    channels
        Number of feature channels gated.
    hidden, layers
        Width and number of layers of the coordinate MLP.
    activation
        How the MLP output ``m`` becomes the gate: ``"one_plus"`` = ``1 + m`` with the last layer
        zero-initialised (a fresh gated network equals the plain one), ``"sigmoid"``, ``"relu"`` or ``"raw"``.
    cache_size
        Number of gate tensors kept for inference (keyed by geometry, device, dtype and the weights'
        versions, so an optimiser step or a ``load_state_dict`` invalidates them).
    """

    def __init__(
        self,
        channels: int,
        hidden: int = 32,
        layers: int = 2,
        activation: str = "one_plus",
        cache_size: int = 16,
    ) -> None:
        super().__init__()
        if activation not in ("one_plus", "sigmoid", "relu", "raw"):
            raise ValueError(f"unknown gate activation {activation!r}")
        self.channels = channels
        self.activation = activation
        self.mlp = coordinate_mlp(channels, hidden, layers)
        if activation == "one_plus":
            nn.init.zeros_(self.mlp[-1].weight)
            nn.init.zeros_(self.mlp[-1].bias)
        self.cache_size = cache_size
        self._cache: OrderedDict = OrderedDict()

    def gate(self, coords: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
        """The gate for a coordinate grid ``(2, h, w)`` or ``(B, 2, h, w)``; returns ``(B|1, C, h, w)``.

        Always float32, also under autocast: the MLP is tiny, and a cached gate must not depend on the
        precision of the call that first computed it. The MLP runs on pixel rows ``(..., 2) -> (..., C)`` (its
        1x1 convolutions as matrix products: one GEMM per layer), so the gate comes out channels-last; with
        ``channels_last=False`` it is made contiguous in the usual (B, C, h, w) order.
        """
        if coords.ndim == 3:
            coords = coords[None]
        with torch.autocast(device_type=coords.device.type, enabled=False):
            m = coords.float().permute(0, 2, 3, 1)  # (B, h, w, 2)
            for mod in self.mlp:
                if isinstance(mod, nn.Conv2d):  # float32 also for a model of another dtype (float64)
                    m = F.linear(m, mod.weight.flatten(1).float(), mod.bias.float())
                else:
                    m = mod(m)
            m = self._activate(m).permute(0, 3, 1, 2)  # (B, C, h, w) with channels-last strides
        return m if channels_last else m.contiguous()

    def _activate(self, m: torch.Tensor) -> torch.Tensor:
        if self.activation == "one_plus":
            return 1.0 + m
        if self.activation == "sigmoid":
            return torch.sigmoid(m)
        if self.activation == "relu":
            return torch.relu(m)
        return m

    def _weights_version(self) -> tuple:
        # Tensor._version counts in-place writes (optimiser steps, load_state_dict's copy_), so a cached
        # gate can never outlive the weights it was computed from.
        return tuple((p.data_ptr(), p._version) for p in self.parameters())

    def cached_gate(self, key, make_coords, channels_last: bool = False, dtype=None) -> torch.Tensor:
        """Gate for a geometry ``key``, computed from ``make_coords()`` once and then reused.

        Caching applies only in eval mode without autograd; otherwise the gate is recomputed. ``dtype``: the
        cached copy's dtype (computed in float32, then converted once), float32 if None.
        """
        if self.training or torch.is_grad_enabled() or self.cache_size == 0:
            return self.gate(make_coords(), channels_last)
        dtype = None if dtype == torch.float32 else dtype
        full_key = (key, channels_last, dtype, self._weights_version())
        hit = self._cache.get(full_key)
        if hit is not None:
            self._cache.move_to_end(full_key)
            return hit
        g = self.gate(make_coords(), channels_last)
        if dtype is not None:
            g = g.to(dtype)
        self._cache[full_key] = g
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return g

    def clear_cache(self) -> None:
        self._cache.clear()

    def forward(
        self,
        x: torch.Tensor,
        field_shape: Sequence[int],
        offset: Sequence[int] | torch.Tensor = (0, 0),
        level: int = 0,
        multiple: int = 1,
        inplace: bool = False,
    ) -> torch.Tensor:
        """``x`` (B, C, h, w), a crop of the field at downsampling ``level``, times the gate of its place.

        ``offset`` is the crop's (y, x) in full-resolution field pixels, or a (B, 2) tensor with one offset per
        sample; ``multiple`` is the size the network pads the field to a multiple of (tiles at the far edge
        reach that far). ``inplace``: multiply ``x`` itself (inference on a feature map nothing else uses).
        A 3-D ``x`` (B, C, d, h, w) is multiplied by the gate of its (y, x) place, the same on every plane.
        """
        if x.dim() == 5:
            g = self.field_gate(x[:, :, 0], field_shape, offset, level, multiple).to(x.dtype).unsqueeze(2)
        else:
            g = self.field_gate(x, field_shape, offset, level, multiple).to(x.dtype)
        return x.mul_(g) if inplace else x * g

    def field_gate(self, x: torch.Tensor, field_shape: Sequence[int], offset, level: int, multiple: int = 1
                   ) -> torch.Tensor:
        """The gate for ``x``'s place in the field, broadcastable to ``x``.

        The gate of the whole field at this level is computed once (cached in eval mode) and every crop or
        tile aligned to the level's grid takes its slice, so a tile costs one multiplication however many
        tiles there are; a training batch gathers each crop from one whole-field evaluation (with gradients)
        when that takes fewer MLP evaluations than one per crop pixel.
        """
        field = (int(field_shape[0]), int(field_shape[1]))
        shape = tuple(x.shape[-2:])
        step = 2**level
        cl = is_channels_last(x)
        # the field padded to the network's multiple, at this level
        extent = (-(-field[0] // multiple) * multiple // step, -(-field[1] // multiple) * multiple // step)
        if isinstance(offset, torch.Tensor):
            gathered = self._gathered(x, field, offset, level, extent)
            if gathered is not None:
                return gathered if cl else gathered.contiguous()
            return self.gate(field_coordinates(field, offset, shape, level, device=x.device), cl)
        y, x0 = int(offset[0]), int(offset[1])
        gy, gx = y // step, x0 // step
        if y % step == 0 and x0 % step == 0 and gy + shape[0] <= extent[0] and gx + shape[1] <= extent[1]:
            whole = self._whole_field(field, extent, level, x.device, cl, x.dtype)
            return whole[..., gy : gy + shape[0], gx : gx + shape[1]]
        key = (field, (y, x0), shape, level, str(x.device))
        return self.cached_gate(key, lambda: field_coordinates(field, (y, x0), shape, level, device=x.device), cl,
                                x.dtype)

    def _whole_field(self, field, extent, level: int, device, cl: bool = False, dtype=None) -> torch.Tensor:
        key = ("field", field, extent, level, str(device))
        return self.cached_gate(key, lambda: field_coordinates(field, (0, 0), extent, level, device=device), cl,
                                dtype)

    def _gathered(self, x: torch.Tensor, field, offset: torch.Tensor, level: int, extent):
        """Per-sample crops of the whole-field gate, (B, C, h, w); None where that does not apply."""
        B, _, h, w = x.shape
        step = 2**level
        if extent[0] * extent[1] >= B * h * w or bool((offset % step).any()) or bool((offset < 0).any()):
            return None
        y0, x0 = offset[:, 0] // step, offset[:, 1] // step
        if bool((y0 + h > extent[0]).any()) or bool((x0 + w > extent[1]).any()):
            return None
        g = self._whole_field(field, extent, level, x.device, True, x.dtype)[0].permute(1, 2, 0)  # (Hf, Wf, C)
        corners = list(zip(y0.tolist(), x0.tolist()))
        return _CropGather.apply(g, corners, h, w).permute(0, 3, 1, 2)  # (B, C, h, w), channels-last
