"""U-Net family with optional position dependence: plain, CoordGate or CoordConv.

``UNet(ModelConfig(depth=d, ...))`` has ``d`` resolution levels (``d - 1`` max-poolings); every level has two
3x3 convolutions with ReLU. With ``gate="coordgate"`` a :class:`CoordGate` multiplies the features at each
down-sampling point (before pooling) and each up-sampling point (after the transposed convolution), as in
the CoordGate U-Net of Howard et al. (arXiv:2401.04680); U-Net(1) gates its single level. With
``gate="coordconv"`` two coordinate channels are concatenated to every block's input (CoordConv, Liu et al.
2018), the baseline the paper compares against.

With ``prefilter="wiener"`` a fixed bank of Wiener filters for PSFs across the field (:mod:`.prefilter`,
MultiWienerNet-style) adds filtered channels to the input; with CoordGate those channels are also gated by
position before the first convolution.

The network accepts any image of at least ``cfg.min_size`` pixels per side: it pads at the bottom and right to
the multiple the poolings need and crops back. Padding only at the far edges keeps a crop's offset aligned,
so a crop at an offset that is a multiple of ``2**(depth-1)`` sees the same pooling grid as the whole field.

3-D (``cfg.ndim = 3``, z-stacks ``(B, C, D, H, W)``): the same U-Net with 3x3x3 convolutions, max-poolings of
``(2 or 1, 2, 2)`` (z is pooled only from pooling ``cfg.z_pool_start`` on, for z-steps coarser than the pixel),
transposed convolutions of the same strides and a 1x1x1 head. The PSF of a widefield microscope varies across
the field far more than along z within a stack's few microns, so each CoordGate still reads the pixel's (y, x)
field position only: its gate is the 2-D gate of that place (same MLP input, same cache, same slice of the
whole-field gate), broadcast over the planes. The volume is padded at the far side in z, y and x to the pooling
multiples (``cfg.min_depth``, ``cfg.min_size``, ``cfg.min_size``); tiles in z need :func:`receptive_halo_z`.
CoordConv and the Wiener first stage are 2-D only (the config refuses them with ``ndim = 3``).
"""

from __future__ import annotations

import functools
import math
import platform
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .coordgate import CoordGate, field_coordinates
from .prefilter import FilterBank

__all__ = ["UNet", "build_model", "count_parameters", "ImageTooSmallError", "receptive_halo", "receptive_halo_z"]


class ImageTooSmallError(ValueError):
    """The image is smaller than the network's minimum size."""


def _block(cin: int, cout: int, ndim: int = 2) -> nn.Sequential:
    conv = nn.Conv2d if ndim == 2 else nn.Conv3d
    return nn.Sequential(
        conv(cin, cout, 3, padding=1), nn.ReLU(inplace=True),
        conv(cout, cout, 3, padding=1), nn.ReLU(inplace=True),
    )


@functools.cache
def _fused_conv_relu(dtype: torch.dtype):
    """oneDNN's convolution with a ReLU post-op (one pass over the output instead of two) for ``dtype`` on this
    CPU, or None: only on x86 builds with oneDNN, and for bfloat16 only where oneDNN has bf16 kernels (AVX512 or
    newer; elsewhere torch's own convolution runs bf16)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    try:
        if not torch.backends.mkldnn.is_available():
            return None
        if dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
            return None
        return torch.ops.mkldnn._convolution_pointwise
    except (AttributeError, RuntimeError):
        return None


def _cpu_autocast() -> bool:
    try:
        return torch.is_autocast_enabled("cpu")
    except TypeError:  # torch < 2.4
        return torch.is_autocast_cpu_enabled()


def _onednn_conv(x: torch.Tensor):
    """oneDNN's pointwise-fused convolution for ``x`` (see :func:`_fused_conv_relu`), or None where it does not
    apply: off the CPU, other dtypes, oneDNN disabled, or under autocast (which does not know the op)."""
    use = (x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16)
           and torch.backends.mkldnn.enabled and not _cpu_autocast())
    return _fused_conv_relu(x.dtype) if use else None


def _conv_relu(conv: nn.Conv2d | nn.Conv3d, x: torch.Tensor) -> torch.Tensor:
    """``relu(conv(x))`` for inference, computed in ``x``'s dtype (the weights cast to it on the fly, so a float32
    model runs in bfloat16 without a bfloat16 copy of the model). On an x86 CPU the ReLU is fused into oneDNN's
    convolution (the same values as torch's own oneDNN convolution followed by a ReLU); in 3-D this is also the
    fast path for float32, which torch's own ``conv3d`` runs about 10x slower on a CPU."""
    w, b = conv.weight.to(x.dtype), conv.bias.to(x.dtype)
    op = _onednn_conv(x)
    if op is not None:
        return op(x, w, b, list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups, "relu", [None],
                  "")
    forward = F.conv2d if x.dim() == 4 else F.conv3d
    return F.relu(forward(x, w, b, conv.stride, conv.padding, conv.dilation, conv.groups), inplace=True)


def _run_block(block: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """A :func:`_block` on ``x``: as a module while autograd records (training), else conv+ReLU fused."""
    if torch.is_grad_enabled():
        return block(x)
    return _conv_relu(block[2], _conv_relu(block[0], x))


def _conv_as(conv: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``conv(x)`` in ``x``'s dtype: the module's own call while autograd records or where the weights already
    have that dtype, else with the weights cast to it (inference with a ``compute_dtype``, or under autocast)."""
    op = _onednn_conv(x) if isinstance(conv, nn.Conv3d) and not torch.is_grad_enabled() else None
    if op is not None:
        # torch's own conv3d of a 3-D head (1x1x1) is a slow path with a copy of its input on a CPU
        w, b = conv.weight.to(x.dtype), conv.bias.to(x.dtype)
        return op(x, w, b, list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups, "none", [None],
                  "")
    if conv.weight.dtype == x.dtype or torch.is_grad_enabled():
        return conv(x)
    w, b = conv.weight.to(x.dtype), conv.bias.to(x.dtype)
    if isinstance(conv, (nn.ConvTranspose2d, nn.ConvTranspose3d)):
        transpose = F.conv_transpose2d if isinstance(conv, nn.ConvTranspose2d) else F.conv_transpose3d
        return transpose(x, w, b, conv.stride, conv.padding, conv.output_padding, conv.groups, conv.dilation)
    forward = F.conv2d if isinstance(conv, nn.Conv2d) else F.conv3d
    return forward(x, w, b, conv.stride, conv.padding, conv.dilation, conv.groups)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


class UNet(nn.Module):
    """U-Net built from a :class:`~napari_coordgate.config.ModelConfig` alone.

    ``forward(x, offset=None, field_shape=None, compute_dtype=None)``: ``x`` is ``(B, C, H, W)``, or
    ``(B, C, D, H, W)`` for a 3-D model (``cfg.ndim = 3``); ``offset`` is the crop's (y, x) position in the field,
    shared by the batch, or a ``(B, 2)`` integer tensor with one offset per sample; ``field_shape`` is the full
    frame's (H, W), defaulting to the input's own (the input *is* the field). A 3-D crop's z position needs no
    offset: the gates depend on (y, x) only. ``compute_dtype`` (inference only, e.g. ``torch.bfloat16`` on a CPU
    with bf16 instructions): the convolutions and feature maps use that dtype, the weights cast on the fly, the
    gates computed in float32 and cached in that dtype; the input, the residual and the output stay in ``x``'s
    dtype.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        ch = cfg.level_channels()
        extra = 2 if cfg.gate == "coordconv" else 0
        self.down = nn.ModuleList()
        # the optional Wiener first stage adds its filtered channels to the raw input
        self.prefilter = FilterBank(cfg.prefilter_channels, cfg.prefilter_size) if cfg.prefilter_channels else None
        cin = n_in = cfg.in_channels * (1 + cfg.prefilter_channels)
        for level in range(cfg.depth):
            self.down.append(_block(cin + extra, ch[level], cfg.ndim))
            cin = ch[level]
        self.upconv = nn.ModuleList()
        self.up = nn.ModuleList()
        transpose = nn.ConvTranspose2d if cfg.ndim == 2 else nn.ConvTranspose3d
        for level in reversed(range(cfg.depth - 1)):
            k = self._pool_kernel(level + 1)  # undoes the pooling into level + 1
            self.upconv.append(transpose(ch[level + 1], ch[level], k, stride=k))
            self.up.append(_block(2 * ch[level] + extra, ch[level], cfg.ndim))
        self.head = (nn.Conv2d if cfg.ndim == 2 else nn.Conv3d)(ch[0], cfg.out_channels, 1)
        if cfg.residual:
            # start as the identity: a fresh model returns its input, training learns the correction
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)

        def make_gate(c: int) -> CoordGate:
            return CoordGate(c, cfg.gate_hidden, cfg.gate_layers, cfg.gate_activation)

        # with a Wiener first stage, a gate on the input lets the network pick, per position, the filters whose
        # PSFs match there (MultiWienerNet blends them with learned convolutions only)
        self.input_gate = make_gate(n_in) if cfg.gate == "coordgate" and self.prefilter is not None else None
        if cfg.gate == "coordgate":
            n_down = max(1, cfg.depth - 1)
            self.down_gates = nn.ModuleList(make_gate(ch[lv]) for lv in range(n_down))
            self.up_gates = nn.ModuleList(make_gate(ch[lv]) for lv in reversed(range(cfg.depth - 1)))
        else:
            self.down_gates = nn.ModuleList()
            self.up_gates = nn.ModuleList()

    # -- geometry -----------------------------------------------------------------------------------
    def _pool_kernel(self, pooling: int) -> int | tuple[int, int, int]:
        """Kernel (= stride) of pooling ``pooling`` (1 to depth - 1): 2, or (2 or 1, 2, 2) in 3-D."""
        if self.cfg.ndim == 2:
            return 2
        return (2 if self.cfg.pools_z(pooling) else 1, 2, 2)

    def _multiples(self) -> tuple[int, ...]:
        """The size each spatial axis is padded to a multiple of: (H, W), or (D, H, W) in 3-D."""
        m = self.cfg.min_size
        return (m, m) if self.cfg.ndim == 2 else (self.cfg.min_depth, m, m)

    def _check_input(self, x: torch.Tensor) -> None:
        cfg = self.cfg
        if x.ndim != cfg.ndim + 2:
            axes = "height, width" if cfg.ndim == 2 else "depth, height, width"
            model = "" if cfg.ndim == 2 else " for a 3-D model"
            raise ValueError(f"expected a (batch, channels, {axes}) tensor{model}, got shape {tuple(x.shape)}")
        if x.shape[1] != cfg.in_channels:
            raise ValueError(f"expected {cfg.in_channels} input channel(s), got {x.shape[1]}")
        mins = self._multiples()
        if any(n < k for n, k in zip(x.shape[2:], mins)):
            if cfg.ndim == 2:
                raise ImageTooSmallError(
                    f"image of {x.shape[-2]}x{x.shape[-1]} pixels is smaller than the minimum {mins[0]}x{mins[1]} "
                    f"for a depth-{cfg.depth} U-Net"
                )
            raise ImageTooSmallError(
                f"volume of {' x '.join(map(str, x.shape[2:]))} voxels is smaller than the minimum "
                f"{' x '.join(map(str, mins))} (depth x height x width) for a depth-{cfg.depth} 3-D U-Net"
            )

    @staticmethod
    def _geometry(x: torch.Tensor, offset, field_shape) -> tuple:
        """``(field (H, W), offset (y, x) or a (B, 2) tensor)`` of the input's place in the field."""
        H, W = x.shape[-2:]
        field = (int(H), int(W)) if field_shape is None else (int(field_shape[0]), int(field_shape[1]))
        if offset is None:
            offset = (0, 0)
        if isinstance(offset, torch.Tensor):
            if offset.shape != (x.shape[0], 2):
                raise ValueError(f"offset tensor must have shape ({x.shape[0]}, 2), got {tuple(offset.shape)}")
        else:
            offset = (int(offset[0]), int(offset[1]))
        return field, offset

    def _coords(self, geom, shape, level, x: torch.Tensor) -> torch.Tensor:
        field, offset = geom
        c = field_coordinates(field, offset, shape, level, device=x.device, dtype=torch.float32)
        if c.ndim == 3:
            c = c[None].expand(x.shape[0], -1, -1, -1)
        return c.to(x.dtype)

    def _gate(self, gate: CoordGate, feats: torch.Tensor, geom, level: int) -> torch.Tensor:
        field, offset = geom
        # without autograd the features are this forward's own intermediate: gate them in place
        return gate(feats, field, offset, level, self.cfg.min_size, inplace=not torch.is_grad_enabled())

    def _with_coords(self, feats: torch.Tensor, geom, level: int) -> torch.Tensor:
        if self.cfg.gate != "coordconv":
            return feats
        return torch.cat([feats, self._coords(geom, feats.shape[-2:], level, feats)], dim=1)

    # -- forward ------------------------------------------------------------------------------------
    def forward(
        self,
        x: torch.Tensor,
        offset: Sequence[int] | torch.Tensor | None = None,
        field_shape: Sequence[int] | None = None,
        compute_dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        self._check_input(x)
        if compute_dtype is not None and torch.is_grad_enabled():
            raise ValueError("compute_dtype is for inference (under torch.no_grad()); train under autocast")
        geom = self._geometry(x, offset, field_shape)
        sizes = x.shape[2:]
        pads = [(-n) % k for n, k in zip(sizes, self._multiples())]
        inp = x
        if any(pads):
            # at the far side only, so a crop's offset stays on the pooling grid
            mode = "reflect" if all(p < n for p, n in zip(pads, sizes)) else "replicate"
            inp = F.pad(x, [v for p in reversed(pads) for v in (0, p)], mode=mode)
        h = inp
        if self.prefilter is not None:
            # filtered on the unpadded image (reflection at the true border), then padded like the input
            filt = self.prefilter(x)
            if any(pads):
                filt = F.pad(filt, [v for p in reversed(pads) for v in (0, p)], mode=mode)
            h = torch.cat([inp, filt], dim=1)
            if self.input_gate is not None:
                h = self._gate(self.input_gate, h, geom, 0)
        if compute_dtype is not None:
            h = h.to(compute_dtype)
        out = _conv_as(self.head, self._levels(h, geom)).to(x.dtype)
        if self.cfg.residual:
            out = out + inp
        return out[(...,) + tuple(slice(0, n) for n in sizes)]

    def _levels(self, h: torch.Tensor, geom) -> torch.Tensor:
        """The U from the first block's input to the last block's output."""
        skips = []
        depth = self.cfg.depth
        for level in range(depth):
            if level > 0:
                h = F.max_pool2d(h, 2) if self.cfg.ndim == 2 else F.max_pool3d(h, self._pool_kernel(level))
            h = _run_block(self.down[level], self._with_coords(h, geom, level))
            if self.down_gates and (level < depth - 1 or depth == 1):
                h = self._gate(self.down_gates[level], h, geom, level)
            skips.append(h)
        for i, level in enumerate(reversed(range(depth - 1))):
            h = _conv_as(self.upconv[i], h)
            if self.up_gates:
                h = self._gate(self.up_gates[i], h, geom, level)
            h = torch.cat([h, skips[level]], dim=1)
            h = _run_block(self.up[i], self._with_coords(h, geom, level))
        return h

    def clear_gate_cache(self) -> None:
        extra = [self.input_gate] if self.input_gate is not None else []
        for g in list(self.down_gates) + list(self.up_gates) + extra:
            g.clear_cache()


def build_model(cfg: ModelConfig) -> UNet:
    """Build the network described by ``cfg``."""
    if not isinstance(cfg, ModelConfig):
        raise TypeError(f"expected a ModelConfig, got {type(cfg).__name__}")
    return UNet(cfg)


def receptive_halo(cfg: ModelConfig) -> int:
    """Overlap (pixels) a tile needs on each side in y and x so its core equals whole-image output.

    The receptive radius of the U-Net is 2**(depth+2) - 6 pixels (two 3x3 convolutions per level on the way
    down and up, plus pooling and transposed-convolution footprints), plus the radius of a Wiener first stage's
    kernels; rounded up to the pooling grid. The same in y and x for a 3-D model (z: :func:`receptive_halo_z`).
    """
    m = cfg.min_size
    r = 2 ** (cfg.depth + 2) - 6 + 2
    if cfg.prefilter_channels:
        r += cfg.prefilter_size // 2  # the first stage's kernels reach this much further
    return int(math.ceil(r / m) * m)


def receptive_halo_z(cfg: ModelConfig) -> int:
    """Overlap (planes) a tile of a 3-D model needs on each side in z so its core equals whole-volume output; 0
    for a 2-D model.

    A plane of level ``l`` stands for ``s_l = 2**(z poolings up to l)`` input planes. Each level's convolutions
    reach ``s_l`` planes each (two on the way down, two on the way up, the coarsest level's two once), a pooling
    that halves z reaches one plane of its level further (the transposed convolutions, of stride = kernel, add
    nothing); plus 2 planes of margin as in :func:`receptive_halo`, rounded up to ``cfg.min_depth`` so tiles stay
    on the z pooling grid. Isotropic pooling gives at most the xy halo.
    """
    if cfg.ndim == 2:
        return 0
    scale = [2 ** sum(cfg.pools_z(p) for p in range(1, level + 1)) for level in range(cfg.depth)]
    r = 4 * sum(scale) - 2 * scale[-1] + sum(scale[lv] for lv in range(cfg.depth - 1) if cfg.pools_z(lv + 1)) + 2
    md = cfg.min_depth
    return int(math.ceil(r / md) * md)
