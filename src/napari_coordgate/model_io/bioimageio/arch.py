"""CoordGate U-Net for a bioimage.io package exported by napari-coordgate: one self-contained file.

This file is copied verbatim into every package napari-coordgate exports (as ``coordgate_unet.py``, the
``architecture`` of its ``pytorch_state_dict`` weights). It imports only torch, so a bioimage.io consumer can
build the network without napari-coordgate; the package's state dict loads into :class:`CoordGateUNet` with its
keys unchanged (strict).

CoordGate: Howard, Norreys & Döpp, "CoordGate: Efficiently Computing Spatially-Varying Convolutions in
Convolutional Neural Networks", arXiv:2401.04680. A small pixel-wise MLP maps a pixel's absolute position in the
microscope's field of view to a gate that multiplies the feature channels, so the U-Net can undo blur that
changes across the field. ``gate="coordconv"`` concatenates the coordinates instead (CoordConv, Liu et al. 2018);
``prefilter_channels > 0`` adds a fixed bank of Wiener-filtered copies of the input (MultiWienerNet-style).

Inputs
------
``image``  (B, C, H, W): raw intensities; the network normalises them itself and maps its output back to the
input's units, so no pre- or postprocessing is needed: with ``percentiles`` (per-image normalisation) each sample's
percentiles of a regular subsample (about ``sample_pixels`` pixels) become its offset and range, so a camera
offset and gain (``a * x + c``) give ``a * f(x) + c``; give whole planes (a tile would be normalised by its own
percentiles); without them, the model's stored offset and scale are used.
``coords`` (B, 2, H, W): each pixel's field coordinates, channel 0 = x (column), channel 1 = y (row), each axis of
the full training field normalised to [-1, 1] at pixel centres: ``x = (2 * col - (W_field - 1)) / (W_field - 1)``.
A tile of the image goes with the same tile of the coordinates; that is how the gate knows where the tile is.

Outputs
-------
The restored image (B, C_out, H, W) in the input's units, and the coordinates passed through unchanged (an echo
output: a bioimage.io consumer pads and tiles an input only through an output with a halo that refers to it,
so the echo makes consumers pad and tile the coordinates exactly like the image).

Borders
-------
Tiling tools pad inputs at the image border (bioimage.io's default is symmetric padding). Padding breaks the
coordinates' grid (they stop increasing by one pixel step), so the network finds the part of its input whose
coordinates form an increasing grid, runs on that part only, and pads its output back: a border tile gives what
the image without padding gives. Symmetric, reflect and edge padding are recognised exactly; constant padding
may be taken for one extra pixel when the constant happens to continue the grid.

Downsampling levels: the network pads the image at the bottom/right to a multiple of ``2**(depth-1)`` (the
coordinates continue their grid there) and a level-``l`` feature pixel takes the mean of its ``2**l`` block of
coordinates, which is the block's centre. A tile that starts on a multiple of ``2**(depth-1)`` pixels sees the
pooling grid of the whole image and gives the whole image's output inside its halo; any other tile is correct
for its own pooling grid, which differs slightly.

3-D (z-stacks)
--------------
:class:`CoordGateUNet3D` is the same network for z-stacks (napari-coordgate's ``ModelConfig(ndim=3)``): 3x3x3
convolutions, max-poolings of (2 or 1, 2, 2) (z is pooled only from pooling ``z_pool_start`` on, counting from 1),
transposed convolutions of the same strides, a 1x1x1 head; plain or CoordGate. ``image`` is (B, C, Z, Y, X) and
``coords`` (B, 2, Z, Y, X) holds the same (x, y) field coordinates on every plane: the gates depend on the (y, x)
field position only (the blur varies across the field far more than along z within a stack), so a gate is the 2-D
gate of its place broadcast over the planes. The network reads the middle plane of ``coords``, finds the padding
in y and x from it as above, and pads the volume at the far side in z, y and x to the pooling multiples. Padding in
z cannot be recognised (the coordinates do not change along z): a tool's z padding at the first and last planes
is seen as part of the volume. Per-image normalisation reads the whole volume (every k-th row and column of every
plane, about ``sample_pixels`` voxels).
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["CoordGateUNet", "CoordGateUNet3D"]


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1), nn.ReLU(inplace=True),
    )


class Gate(nn.Module):
    """``1 + MLP(x, y)`` (or sigmoid/relu/raw of it): a per-pixel gate for ``channels`` feature channels."""

    def __init__(self, channels: int, hidden: int, layers: int, activation: str) -> None:
        super().__init__()
        if activation not in ("one_plus", "sigmoid", "relu", "raw"):
            raise ValueError(f"unknown gate activation {activation!r}")
        mods: list[nn.Module] = []
        width = 2
        for _ in range(layers - 1):
            mods += [nn.Conv2d(width, hidden, 1), nn.GELU()]
            width = hidden
        mods.append(nn.Conv2d(width, channels, 1))
        self.mlp = nn.Sequential(*mods)
        self.activation = activation

    def forward(self, coords: torch.Tensor) -> torch.Tensor:
        m = self.mlp(coords)
        if self.activation == "one_plus":
            return 1.0 + m
        if self.activation == "sigmoid":
            return torch.sigmoid(m)
        if self.activation == "relu":
            return torch.relu(m)
        return m


class FilterBank(nn.Module):
    """``n`` fixed kernels applied by FFT with symmetric reflection at the border: (B, C, H, W) -> (B, C*n, H, W)."""

    def __init__(self, n: int, size: int) -> None:
        super().__init__()
        self.n = n
        self.size = size
        self.register_buffer("kernels", torch.zeros(n, size, size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        r = self.size // 2
        mode = "reflect" if r < H and r < W else "replicate"
        xp = F.pad(x, [r, r, r, r], mode=mode)
        Hp, Wp = xp.shape[-2], xp.shape[-1]
        k = x.new_zeros((self.n, Hp, Wp))
        k[:, : self.size, : self.size] = self.kernels
        # kernel centre moved to (0, 0): the circular convolution equals the linear one where the result is kept
        k = torch.roll(k, shifts=[-r, -r], dims=[-2, -1])
        spec = torch.fft.rfft2(xp)[:, :, None] * torch.fft.rfft2(k)[None, None]
        y = torch.fft.irfft2(spec, s=[Hp, Wp])[..., r : r + H, r : r + W]
        return y.reshape(B, C * self.n, H, W)


def _longest_run(ok: list[bool]) -> tuple[int, int]:
    """(start, stop) of the longest run of True in ``ok``; among equal runs the one nearest the middle."""
    best_start, best_len, best_dist = 0, 0, 0.0
    start = -1
    mid = (len(ok) - 1) / 2.0
    for i in range(len(ok) + 1):
        inside = i < len(ok) and ok[i]
        if inside and start < 0:
            start = i
        elif not inside and start >= 0:
            length = i - start
            dist = abs((start + i - 1) / 2.0 - mid)
            if length > best_len or (length == best_len and dist < best_dist):
                best_start, best_len, best_dist = start, length, dist
            start = -1
    return best_start, best_start + best_len


def _grid_span(along: torch.Tensor, across: torch.Tensor, dim: int) -> tuple[int, int]:
    """Pixels [start, stop) along ``dim`` whose coordinates form an increasing grid (padding breaks it).

    ``along`` is the coordinate that grows along ``dim`` (x along columns), ``across`` the other one (constant
    along ``dim`` on a true grid). A step between neighbours belongs to the grid where ``along`` increases and
    ``across`` stays put, in any line of the tile.
    """
    n = along.shape[dim]
    if n == 1:
        return 0, 1
    d_along = torch.diff(along, dim=dim)
    d_across = torch.diff(across, dim=dim)
    ok = (d_along > 0) & (d_across.abs() <= 1e-6)
    steps: list[bool] = ok.any(dim=1 - dim).tolist()
    a, b = _longest_run(steps)
    if b == a:
        raise ValueError(
            "the coordinate input is not a grid of field coordinates (channel 0 must increase along x, "
            "channel 1 along y)"
        )
    return a, b + 1


def _extend_grid(coords: torch.Tensor, pad_h: int, pad_w: int) -> torch.Tensor:
    """``coords`` padded at the bottom/right with the grid continued (one pixel step per pixel)."""
    H, W = coords.shape[-2], coords.shape[-1]
    step_x = (coords[:, 0, 0, W - 1] - coords[:, 0, 0, 0]) / max(W - 1, 1)
    step_y = (coords[:, 1, H - 1, 0] - coords[:, 1, 0, 0]) / max(H - 1, 1)
    c = F.pad(coords, [0, pad_w, 0, pad_h], mode="replicate")
    ramp_x = torch.clamp(torch.arange(W + pad_w, device=c.device, dtype=c.dtype) - (W - 1), min=0.0)
    ramp_y = torch.clamp(torch.arange(H + pad_h, device=c.device, dtype=c.dtype) - (H - 1), min=0.0)
    cx = c[:, 0] + step_x[:, None, None] * ramp_x[None, None, :]
    cy = c[:, 1] + step_y[:, None, None] * ramp_y[None, :, None]
    return torch.stack([cx, cy], dim=1)


def _plane_spans(plane: torch.Tensor) -> list[tuple[int, int, int, int]]:
    """(y0, y1, x0, x1) per sample of the grid part of a (B, 2, Y, X) coordinate plane (see :func:`_grid_span`)."""
    spans: list[tuple[int, int, int, int]] = []
    for b in range(plane.shape[0]):
        y0, y1 = _grid_span(plane[b, 1], plane[b, 0], 0)
        x0, x1 = _grid_span(plane[b, 0], plane[b, 1], 1)
        spans.append((y0, y1, x0, x1))
    return spans


class _UNet(nn.Module):
    """What the 2-D and 3-D networks share: their common arguments, the gates, the border handling (the grid part of
    the input, padded back) and the normalisation. Each subclass builds its layers and runs its U (``_restore``)."""

    def _setup(self, spatial_dims: int, depth: int, level_channels: list[int], gate: str, residual: bool,
               in_channels: int, offset: float, scale: float, percentiles: list[float] | None,
               sample_pixels: int) -> list[int]:
        """Check and keep the common arguments; the channels of each level. ``spatial_dims``: 2 for inputs
        (B, C, H, W), 3 for (B, C, Z, Y, X)."""
        if len(level_channels) != depth:
            raise ValueError(f"level_channels needs {depth} entries, got {len(level_channels)}")
        if not scale > 0:
            raise ValueError(f"scale must be > 0, got {scale}")
        self.spatial_dims = spatial_dims
        self.depth = depth
        self.min_size = 2 ** (depth - 1)
        self.gated = gate == "coordgate"
        self.residual = residual
        self.in_channels = in_channels
        self.offset = float(offset)
        self.scale = float(scale)
        # per-image normalisation: each sample's own percentiles (of a regular subsample of about sample_pixels)
        self.percentiles = None if percentiles is None else [float(p) / 100.0 for p in percentiles]
        self.sample_pixels = int(sample_pixels)
        return [int(c) for c in level_channels]

    def _add_gates(self, ch: list[int], hidden: int, layers: int, activation: str) -> None:
        """A gate after every down block but the bottom one (the only one when depth is 1) and every upsampling."""
        self.down_gates = nn.ModuleList()
        self.up_gates = nn.ModuleList()
        if self.gated:
            for level in range(max(1, self.depth - 1)):
                self.down_gates.append(Gate(ch[level], hidden, layers, activation))
            for level in reversed(range(self.depth - 1)):
                self.up_gates.append(Gate(ch[level], hidden, layers, activation))

    def forward(self, image: torch.Tensor, coords: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        axes = "H, W" if self.spatial_dims == 2 else "Z, Y, X"
        if image.dim() != 2 + self.spatial_dims or coords.dim() != 2 + self.spatial_dims:
            raise ValueError(f"expected image (B, C, {axes}) and coords (B, 2, {axes})")
        if coords.shape[1] != 2:
            raise ValueError("coords must have 2 channels (x, y)")
        if image.shape[0] != coords.shape[0] or image.shape[2:] != coords.shape[2:]:
            raise ValueError("image and coords must have the same batch size and spatial shape")
        if image.shape[1] != self.in_channels:
            raise ValueError(f"expected {self.in_channels} image channel(s), got {image.shape[1]}")
        image = image.float()
        coords = coords.float()
        # 3-D: every plane holds the same (x, y); the middle one is never part of a tool's z padding
        plane = coords if coords.dim() == 4 else coords[:, :, coords.shape[2] // 2]
        spans = _plane_spans(plane)
        same = True
        for s in spans:
            same = same and s == spans[0]
        if same:
            return self._padded(image, plane, spans[0]), coords
        outs: list[torch.Tensor] = []
        for b in range(image.shape[0]):
            outs.append(self._padded(image[b : b + 1], plane[b : b + 1], spans[b]))
        return torch.cat(outs, dim=0), coords

    def _padded(self, image: torch.Tensor, plane: torch.Tensor, span: tuple[int, int, int, int]) -> torch.Tensor:
        """The network on the (y, x) grid part ``span`` of the input, padded back (edge values) to its shape."""
        y0, y1, x0, x1 = span
        H, W = image.shape[-2], image.shape[-1]
        part = image[..., y0:y1, x0:x1]
        offset, scale = self._units(part)
        out = self._restore(part, plane[:, :, y0:y1, x0:x1], offset, scale)
        if y0 > 0 or x0 > 0 or y1 < H or x1 < W:
            pad = [x0, W - x1, y0, H - y1]
            if out.dim() == 5:
                pad = pad + [0, 0]
            out = F.pad(out, pad, mode="replicate")
        return out

    def _units(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(offset, scale), each (B, C, 1, 1) (3-D: (B, C, 1, 1, 1)): the stored ones, or (per-image) each sample's
        percentiles (of every k-th row and column of every plane)."""
        B, C = image.shape[0], image.shape[1]
        shape = [B, C] + [1] * (image.dim() - 2)
        if self.percentiles is None:
            return (torch.full(shape, self.offset, device=image.device),
                    torch.full(shape, self.scale, device=image.device))
        pixels = 1
        for n in image.shape[2:]:
            pixels *= n
        k = max(1, int(math.ceil(math.sqrt(pixels / self.sample_pixels))))
        sample = image[..., ::k, ::k].reshape(B, C, -1).double()
        q = torch.quantile(sample, torch.tensor(self.percentiles, dtype=torch.float64, device=image.device), dim=-1)
        lo, hi = q[0], q[1]
        scale = torch.where(hi > lo, hi - lo, torch.full_like(lo, self.scale))
        return lo.float().reshape(shape), scale.float().reshape(shape)

    def _restore(self, image: torch.Tensor, plane: torch.Tensor, offset: torch.Tensor,
                 scale: torch.Tensor) -> torch.Tensor:
        """The network on the grid part of the input: normalised, padded to the pooling multiples, the U, back."""
        raise NotImplementedError


class CoordGateUNet(_UNet):
    """The napari-coordgate U-Net (plain, CoordGate or CoordConv), normalisation included; see the module doc."""

    def __init__(
        self,
        depth: int,
        level_channels: list[int],
        gate: str = "coordgate",
        gate_hidden: int = 32,
        gate_layers: int = 2,
        gate_activation: str = "one_plus",
        residual: bool = True,
        prefilter_channels: int = 0,
        prefilter_size: int = 49,
        in_channels: int = 1,
        out_channels: int = 1,
        offset: float = 0.0,
        scale: float = 1.0,
        percentiles: list[float] | None = None,
        sample_pixels: int = 1 << 20,
    ) -> None:
        super().__init__()
        if gate not in ("none", "coordgate", "coordconv"):
            raise ValueError(f"unknown gate {gate!r}")
        ch = self._setup(2, depth, level_channels, gate, residual, in_channels, offset, scale, percentiles,
                         sample_pixels)
        self.gate = gate
        self.coordconv = gate == "coordconv"
        extra = 2 if self.coordconv else 0
        self.has_prefilter = prefilter_channels > 0
        self.prefilter = FilterBank(prefilter_channels, prefilter_size) if self.has_prefilter else nn.Identity()
        cin = n_in = in_channels * (1 + prefilter_channels)
        self.down = nn.ModuleList()
        for level in range(depth):
            self.down.append(_block(cin + extra, ch[level]))
            cin = ch[level]
        self.upconv = nn.ModuleList()
        self.up = nn.ModuleList()
        for level in reversed(range(depth - 1)):
            self.upconv.append(nn.ConvTranspose2d(ch[level + 1], ch[level], 2, stride=2))
            self.up.append(_block(2 * ch[level] + extra, ch[level]))
        self.head = nn.Conv2d(ch[0], out_channels, 1)
        self.has_input_gate = self.gated and self.has_prefilter
        self.input_gate = (
            Gate(n_in, gate_hidden, gate_layers, gate_activation) if self.has_input_gate else nn.Identity()
        )
        self._add_gates(ch, gate_hidden, gate_layers, gate_activation)

    def _restore(self, image: torch.Tensor, plane: torch.Tensor, offset: torch.Tensor,
                 scale: torch.Tensor) -> torch.Tensor:
        H, W = image.shape[-2], image.shape[-1]
        m = self.min_size
        if H < m or W < m:
            raise ValueError(f"image of {H}x{W} pixels is smaller than the minimum {m}x{m} of this network")
        x = (image - offset) / scale
        pad_h, pad_w = (-H) % m, (-W) % m
        mode = "reflect" if pad_h < H and pad_w < W else "replicate"
        inp = x
        c = plane
        if pad_h > 0 or pad_w > 0:
            inp = F.pad(x, [0, pad_w, 0, pad_h], mode=mode)
            c = _extend_grid(plane, pad_h, pad_w)
        h = inp
        if self.has_prefilter:
            filt = self.prefilter(x)
            if pad_h > 0 or pad_w > 0:
                filt = F.pad(filt, [0, pad_w, 0, pad_h], mode=mode)
            h = torch.cat([inp, filt], dim=1)
            if self.has_input_gate:
                h = h * self.input_gate(c)
        level_coords: list[torch.Tensor] = []
        skips: list[torch.Tensor] = []
        for level, block in enumerate(self.down):
            if level > 0:
                h = F.max_pool2d(h, 2)
                # a level-l pixel stands for a 2**l block; its coordinate is the block's centre = the block's mean
                c = F.avg_pool2d(c, 2)
            level_coords.append(c)
            if self.coordconv:
                h = torch.cat([h, c], dim=1)
            h = block(h)
            for j, g in enumerate(self.down_gates):
                if j == level and (level < self.depth - 1 or self.depth == 1):
                    h = h * g(c)
            skips.append(h)
        for i, (upconv, block) in enumerate(zip(self.upconv, self.up)):
            level = self.depth - 2 - i
            h = upconv(h)
            for j, g in enumerate(self.up_gates):
                if j == i:
                    h = h * g(level_coords[level])
            h = torch.cat([h, skips[level]], dim=1)
            if self.coordconv:
                h = torch.cat([h, level_coords[level]], dim=1)
            h = block(h)
        out = self.head(h)
        if self.residual:
            out = out + inp
        out = out[:, :, :H, :W]
        return out * scale + offset


def _block3d(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv3d(cin, cout, 3, padding=1), nn.ReLU(inplace=True),
        nn.Conv3d(cout, cout, 3, padding=1), nn.ReLU(inplace=True),
    )


class CoordGateUNet3D(_UNet):
    """The napari-coordgate 3-D U-Net (plain or CoordGate) for z-stacks, normalisation included; see the module
    doc. ``z_pool_start``: pooling ``l`` (1 to ``depth - 1``) halves z too when ``l >= z_pool_start``."""

    def __init__(
        self,
        depth: int,
        level_channels: list[int],
        z_pool_start: int = 1,
        gate: str = "coordgate",
        gate_hidden: int = 32,
        gate_layers: int = 2,
        gate_activation: str = "one_plus",
        residual: bool = True,
        in_channels: int = 1,
        out_channels: int = 1,
        offset: float = 0.0,
        scale: float = 1.0,
        percentiles: list[float] | None = None,
        sample_pixels: int = 1 << 20,
    ) -> None:
        super().__init__()
        if gate not in ("none", "coordgate"):
            raise ValueError(f"unknown gate {gate!r} for a 3-D network (none or coordgate)")
        ch = self._setup(3, depth, level_channels, gate, residual, in_channels, offset, scale, percentiles,
                         sample_pixels)
        kernels = [(2 if p >= z_pool_start else 1, 2, 2) for p in range(1, depth)]
        self.min_depth = 2 ** sum(1 for k in kernels if k[0] == 2)
        # level l's input is pooled by pools[l] (nothing before level 0): no weights, so the state dict is unchanged
        self.pools = nn.ModuleList([nn.Identity()] + [nn.MaxPool3d(k) for k in kernels])
        self.down = nn.ModuleList(_block3d(in_channels if lv == 0 else ch[lv - 1], ch[lv]) for lv in range(depth))
        self.upconv = nn.ModuleList()
        self.up = nn.ModuleList()
        for level in reversed(range(depth - 1)):
            self.upconv.append(nn.ConvTranspose3d(ch[level + 1], ch[level], kernels[level], stride=kernels[level]))
            self.up.append(_block3d(2 * ch[level], ch[level]))
        self.head = nn.Conv3d(ch[0], out_channels, 1)
        self._add_gates(ch, gate_hidden, gate_layers, gate_activation)

    def _restore(self, image: torch.Tensor, plane: torch.Tensor, offset: torch.Tensor,
                 scale: torch.Tensor) -> torch.Tensor:
        D, H, W = image.shape[-3], image.shape[-2], image.shape[-1]
        m, mz = self.min_size, self.min_depth
        if D < mz or H < m or W < m:
            raise ValueError(f"volume of {D}x{H}x{W} voxels is smaller than the minimum {mz}x{m}x{m} (z, y, x) of "
                             "this network")
        x = (image - offset) / scale
        pad_d, pad_h, pad_w = (-D) % mz, (-H) % m, (-W) % m
        inp = x
        c = plane
        if pad_d > 0 or pad_h > 0 or pad_w > 0:
            # at the far side only, so the field offset of the first voxel stays on the pooling grid
            mode = "reflect" if pad_d < D and pad_h < H and pad_w < W else "replicate"
            inp = F.pad(x, [0, pad_w, 0, pad_h, 0, pad_d], mode=mode)
            c = _extend_grid(plane, pad_h, pad_w)
        out = self.head(self._levels(inp, c))
        if self.residual:
            out = out + inp
        out = out[:, :, :D, :H, :W]
        return out * scale + offset

    def _levels(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """The U from the first block's input to the last block's output; ``c`` the (B, 2, Y, X) coordinates."""
        level_coords: list[torch.Tensor] = []
        skips: list[torch.Tensor] = []
        for level, (pool, block) in enumerate(zip(self.pools, self.down)):
            if level > 0:
                h = pool(h)
                # y and x are halved by every pooling: a level-l pixel's coordinate is its 2**l block's mean
                c = F.avg_pool2d(c, 2)
            level_coords.append(c)
            h = block(h)
            for j, g in enumerate(self.down_gates):
                if j == level and (level < self.depth - 1 or self.depth == 1):
                    h = h * g(c).unsqueeze(2)  # the (y, x) gate, the same on every plane
            skips.append(h)
        for i, (upconv, block) in enumerate(zip(self.upconv, self.up)):
            level = self.depth - 2 - i
            h = upconv(h)
            for j, g in enumerate(self.up_gates):
                if j == i:
                    h = h * g(level_coords[level]).unsqueeze(2)
            h = torch.cat([h, skips[level]], dim=1)
            h = block(h)
        return h
