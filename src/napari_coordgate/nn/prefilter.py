"""A fixed bank of large deconvolution kernels applied before the U-Net (MultiWienerNet-style first stage).

MultiWienerNet (Yanny et al., "Deep learning for fast spatially varying deconvolution", Optica 2022) deconvolves
the image with Wiener filters of several PSFs sampled across the field and lets a U-Net combine the results.
Here the kernels are the spatial Wiener filters of the PSFs on a K x K grid of the field (computed by
:func:`napari_coordgate.optics.deconv.wiener_kernels` when training starts) and stay fixed; with CoordGate the
network learns, per position, which filtered channels to trust. The kernels are a buffer, saved with the
weights, so a model file needs no PSF model to be applied.

Large kernels are applied by FFT: the input is reflected by the kernel radius on every side, so a tile whose
halo covers that radius gives the same values as the whole image.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["FilterBank"]


class FilterBank(nn.Module):
    """``n`` fixed ``size x size`` convolution kernels; ``(B, C, H, W) -> (B, C * n, H, W)``.

    Output channel ``c * n + k`` is input channel ``c`` convolved (true convolution, not correlation) with
    kernel ``k``, with symmetric reflection at the image border.
    """

    def __init__(self, n: int, size: int) -> None:
        super().__init__()
        if size % 2 == 0:
            raise ValueError(f"kernel size must be odd, got {size}")
        self.n, self.size = int(n), int(size)
        self.register_buffer("kernels", torch.zeros(self.n, self.size, self.size))

    @property
    def radius(self) -> int:
        return self.size // 2

    def set_kernels(self, kernels) -> None:
        k = torch.as_tensor(kernels, dtype=torch.float32)
        if tuple(k.shape) != (self.n, self.size, self.size):
            raise ValueError(f"expected kernels of shape {(self.n, self.size, self.size)}, got {tuple(k.shape)}")
        if not torch.isfinite(k).all():
            raise ValueError("kernels contain NaN or Inf")
        with torch.no_grad():
            self.kernels.copy_(k.to(self.kernels.device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        r = self.radius
        # reflection needs the image to be wider than the radius; tiny images fall back to edge replication
        mode = "reflect" if r < H and r < W else "replicate"
        xp = F.pad(x.float(), (r, r, r, r), mode=mode)
        Hp, Wp = xp.shape[-2:]
        k = x.new_zeros((self.n, Hp, Wp), dtype=torch.float32)
        k[:, : self.size, : self.size] = self.kernels.float()
        # centre of each kernel at index (0, 0): circular convolution then equals linear convolution on the
        # padded image wherever the result is kept (r pixels from every padded edge)
        k = torch.roll(k, shifts=(-r, -r), dims=(-2, -1))
        spec = torch.fft.rfft2(xp)[:, :, None] * torch.fft.rfft2(k)[None, None]
        y = torch.fft.irfft2(spec, s=(Hp, Wp))[..., r : r + H, r : r + W]
        return y.reshape(B, C * self.n, H, W).to(x.dtype)
