"""Field coordinates, grid nodes and tent weights: the formulas every part of the package shares."""

import numpy as np
import pytest

from napari_coordgate.coords import field_axis, field_position, grid_positions, tent_weights


def test_field_position_puts_the_outer_pixel_centres_at_minus_one_and_one():
    assert field_position(0, 5) == -1.0 and field_position(4, 5) == 1.0 and field_position(2, 5) == 0.0
    assert field_position(1.25, 6) == pytest.approx((2 * 1.25 - 5) / 5)  # sub-pixel positions too
    assert field_position(0, 1) == 0.0  # a one-pixel axis sits at 0
    assert field_position(np.zeros((2, 3)), 4).shape == (2, 3)


def test_field_axis_is_field_position_of_its_sample_centres():
    np.testing.assert_array_equal(field_axis(9), field_position(np.arange(9), 9))
    np.testing.assert_array_equal(field_axis(40, 8, 5), field_position(8 + np.arange(5), 40))  # a crop
    # a sample of two pixels sits between them
    np.testing.assert_array_equal(field_axis(40, 8, 5, step=2), field_position(8.5 + 2 * np.arange(5), 40))


def test_grid_positions_span_the_field_and_put_a_single_node_in_the_middle():
    np.testing.assert_array_equal(grid_positions(5), np.linspace(-1.0, 1.0, 5))
    np.testing.assert_array_equal(grid_positions(1), [0.0])
    with pytest.raises(ValueError, match="at least 1 node"):
        grid_positions(0)


@pytest.mark.parametrize("k", [1, 2, 4, 7])
def test_tent_weights_are_a_partition_of_unity_that_interpolates_linearly(k):
    t = np.linspace(-1.0, 1.0, 101)

    w = tent_weights(t, k)

    assert w.shape == (101, k) and (w >= 0).all() and ((w > 0).sum(axis=1) <= 2).all()
    np.testing.assert_allclose(w.sum(axis=1), 1.0, rtol=0, atol=1e-15)
    # exact for anything linear in t: the weighted nodes give back t itself
    np.testing.assert_allclose(w @ grid_positions(k), t if k > 1 else 0.0, rtol=0, atol=1e-15)


def test_tent_weights_are_one_at_their_node_and_clamped_outside_the_field():
    np.testing.assert_array_equal(tent_weights(grid_positions(4), 4), np.eye(4))
    np.testing.assert_array_equal(tent_weights([-3.0, 2.0], 4), tent_weights([-1.0, 1.0], 4))
    np.testing.assert_allclose(tent_weights(-2.0 / 3.0, 4), [0.5, 0.5, 0.0, 0.0])  # halfway between two nodes
