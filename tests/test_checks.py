"""Image validation: the one set of rules, reading a stack one plane at a time without copying it."""

import numpy as np
import pytest

from napari_coordgate.checks import InputError, as_float, check_image, check_layout


def test_check_image_returns_the_array_itself():
    stack = np.random.default_rng(0).random((3, 8, 9)).astype(np.float32)
    assert check_image(stack) is stack
    ints = np.arange(72, dtype=np.uint16).reshape(8, 9)
    assert check_image(ints).dtype == np.uint16


@pytest.mark.parametrize("shape, dtype, kw, match", [
    ((40, 40, 3), np.float32, {}, r"sharp of shape \(40, 40, 3\) looks like an RGB\(A\) image"),
    ((2, 2, 8, 8), np.float32, {"max_ndim": 3}, r"sharp: expected a 2-D image \(H, W\) or a stack \(N, H, W\)"),
    ((8,), np.float32, {}, r"sharp: expected a 2-D image \(H, W\) or a stack \(\.\.\., H, W\)"),
    ((3, 8, 8), np.float32, {"max_ndim": 2}, r"sharp: expected a 2-D image \(H, W\), got"),
    ((0, 8), np.float32, {}, "sharp is empty"),
    ((3, 8), np.float32, {"min_size": 4}, "sharp is 3x8 pixels, smaller than the minimum 4x4"),
    ((8, 8), bool, {}, r"sharp is boolean \(dtype bool"),
    ((8, 8), np.complex64, {}, "sharp is complex"),
    ((8, 8), object, {}, "sharp must be numeric"),
])
def test_layout_rules_name_the_array_and_say_what_to_do(shape, dtype, kw, match):
    with pytest.raises(InputError, match=match):
        check_layout(shape, dtype, "sharp", **kw)


def test_values_are_checked_plane_by_plane_with_the_plane_named():
    stack = np.random.default_rng(1).random((3, 8, 8))
    stack[2, 1, 1] = np.inf
    with pytest.raises(InputError, match="blurred plane 2 contains 1 NaN or Inf value"):
        check_image(stack, "blurred")
    flat = np.random.default_rng(1).random((3, 8, 8))
    flat[1] = 4.0
    assert check_image(flat, "sharp") is flat  # constant planes are fine for optics ...
    with pytest.raises(InputError, match=r"sharp plane 1 is constant \(all 4\)"):
        check_image(flat, "sharp", allow_constant=False)  # ... not for training


def test_as_float_keeps_floats_and_converts_integers_exactly():
    f = np.zeros((2, 2), np.float64)
    assert as_float(f) is f
    assert as_float(np.array([[65535]], np.uint16)).dtype == np.float32
    assert as_float(np.array([[2**40]], np.int64)).dtype == np.float64
