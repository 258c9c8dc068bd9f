"""The fixed filter bank of the Wiener first stage."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from napari_coordgate.nn.prefilter import FilterBank


def test_centred_delta_kernel_is_the_identity():
    bank = FilterBank(1, 5)
    k = torch.zeros(1, 5, 5)
    k[0, 2, 2] = 1.0
    bank.set_kernels(k)
    x = torch.rand(2, 1, 13, 17)
    assert torch.allclose(bank(x), x, atol=1e-5)


def test_bank_is_a_true_convolution_with_reflected_borders():
    g = torch.Generator().manual_seed(0)
    bank = FilterBank(3, 7)
    kernels = torch.randn(3, 7, 7, generator=g)
    bank.set_kernels(kernels)
    x = torch.rand(2, 2, 20, 24, generator=g)
    got = bank(x)
    # reference: direct correlation with the flipped kernels on the reflected image
    xp = F.pad(x.reshape(4, 1, 20, 24), (3, 3, 3, 3), mode="reflect")
    ref = F.conv2d(xp, kernels.flip(-1, -2)[:, None]).reshape(2, 6, 20, 24)
    assert got.shape == (2, 6, 20, 24)
    assert torch.allclose(got, ref, atol=1e-4)


def test_bank_on_an_image_smaller_than_its_radius_still_works():
    bank = FilterBank(2, 9)
    bank.set_kernels(torch.ones(2, 9, 9) / 81)
    y = bank(torch.ones(1, 1, 3, 3))
    assert torch.allclose(y, torch.ones(1, 2, 3, 3), atol=1e-5)


def test_bad_kernels_are_rejected():
    bank = FilterBank(2, 5)
    with pytest.raises(ValueError, match="shape"):
        bank.set_kernels(np.zeros((3, 5, 5)))
    with pytest.raises(ValueError, match="NaN"):
        bank.set_kernels(np.full((2, 5, 5), np.nan))
    with pytest.raises(ValueError, match="odd"):
        FilterBank(1, 4)
