"""Rendered bead z-stacks: finite beads are points spread over the sphere, whatever their size."""

import numpy as np
import pytest

from napari_coordgate.samples.beadstack import _sphere


@pytest.mark.parametrize("diameter", [0.3, 0.77, 1.54, 2.5, 4.0])
def test_a_finite_bead_is_several_equal_points_inside_its_sphere_even_below_a_pixel(diameter):
    z_step_px = 1.9
    dz, dy, dx, w = _sphere(diameter, z_step_px)
    assert w.size > 8  # a sub-pixel bead was once no point at all (a division by zero)
    assert np.allclose(w, w[0]) and np.isclose(w.sum(), 1.0)
    r = np.sqrt((dz * z_step_px) ** 2 + dy**2 + dx**2)
    assert r.max() <= diameter / 2 + 1e-9
    assert np.allclose([np.mean(dz), np.mean(dy), np.mean(dx)], 0.0, atol=1e-9)  # centred on the bead


def test_a_point_bead_is_one_point():
    dz, dy, dx, w = _sphere(0.0, 1.0)
    assert w.tolist() == [1.0] and dz.tolist() == dy.tolist() == dx.tolist() == [0.0]
