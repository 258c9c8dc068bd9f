"""The Fourier shift: the one sub-pixel image shift of the package."""

import numpy as np

from napari_coordgate.optics.shift import fourier_shift, shift_phase


def test_an_integer_fourier_shift_is_np_roll():
    image = np.random.default_rng(0).random((12, 17))

    moved = fourier_shift(image, 3, -5)

    np.testing.assert_allclose(moved, np.roll(image, (3, -5), axis=(0, 1)), rtol=0, atol=1e-12)


def test_each_image_of_a_stack_moves_by_its_own_shift_and_two_halves_make_one_pixel():
    stack = np.random.default_rng(1).random((3, 10, 14))
    dy, dx = np.array([1.0, 0.0, -2.0]), np.array([0.0, 4.0, 1.0])

    moved = fourier_shift(stack, dy, dx)

    for i in range(3):
        np.testing.assert_allclose(moved[i], np.roll(stack[i], (int(dy[i]), int(dx[i])), axis=(0, 1)), atol=1e-12)
    odd = stack[:, :9, :13]  # no Nyquist row or column, whose phase a real image cannot keep
    np.testing.assert_allclose(fourier_shift(fourier_shift(odd, 0.5, -0.5), 0.5, -0.5), fourier_shift(odd, 1, -1),
                               atol=1e-12)


def test_shift_phase_is_the_spectrum_factor_of_the_shift():
    image = np.random.default_rng(2).random((9, 8))

    phase = shift_phase(image.shape, 0.3, -1.2)

    assert phase.shape == (9, 8)
    np.testing.assert_allclose(np.abs(phase), 1.0)
    np.testing.assert_array_equal(np.fft.ifft2(np.fft.fft2(image) * phase).real, fourier_shift(image, 0.3, -1.2))
