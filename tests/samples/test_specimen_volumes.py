"""Procedural 3-D specimens: shape, range, determinism, physical scaling with the voxel anisotropy."""

import numpy as np
import pytest

from napari_coordgate.samples.volumes import VOLUME_KINDS, specimen_volume, specimen_volumes


@pytest.mark.parametrize("kind", VOLUME_KINDS)
def test_volume_is_float32_in_unit_range_and_not_constant(kind):
    vol = specimen_volume((12, 48, 40), kind, seed=3)
    assert vol.shape == (12, 48, 40) and vol.dtype == np.float32
    assert vol.min() == 0.0 and vol.max() == 1.0


def test_same_seed_same_volume_other_seed_other_volume():
    a = specimen_volume((8, 32, 32), seed=5)
    assert np.array_equal(a, specimen_volume((8, 32, 32), seed=5))
    assert not np.array_equal(a, specimen_volume((8, 32, 32), seed=6))


def test_anisotropy_shortens_objects_along_z():
    # the same specimen in physical units: with z-steps twice the pixel, neighbouring planes differ more
    def z_roughness(vol):
        return float(np.abs(np.diff(vol, axis=0)).mean() / np.abs(np.diff(vol, axis=1)).mean())

    iso = specimen_volume((32, 64, 64), "nuclei", seed=2, anisotropy=1.0)
    aniso = specimen_volume((32, 64, 64), "nuclei", seed=2, anisotropy=2.0)
    assert z_roughness(aniso) > 1.5 * z_roughness(iso)


def test_stack_cycles_kinds_and_refuses_bad_arguments():
    vols = specimen_volumes(3, (6, 24, 24), seed=1, kinds=("nuclei", "puncta"))
    assert vols.shape == (3, 6, 24, 24)
    with pytest.raises(ValueError, match="kind"):
        specimen_volume((6, 24, 24), "cells")
    with pytest.raises(ValueError, match="depth, height, width"):
        specimen_volume((24, 24))
    with pytest.raises(ValueError, match="positive"):
        specimen_volume((6, 24, 24), anisotropy=0.0)
