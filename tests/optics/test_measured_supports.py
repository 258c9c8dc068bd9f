"""A measured grid whose PSFs grow across the field: every node held on the largest side, each node's own support
recorded (record version 2), older grids (version 1, no supports) read as before."""

import numpy as np
import pytest

from napari_coordgate.model_io import load_psf_model, save_psf_model
from napari_coordgate.optics.measured import MeasuredGridPSF
from napari_coordgate.optics.models import psf_model_from_record


def _gauss(size: int, sigma: float, side: int) -> np.ndarray:
    """A Gaussian on ``size`` px, zero beyond its centred ``side`` square, unit sum."""
    c = np.arange(size) - size // 2
    g = np.exp(-(c[:, None] ** 2 + c[None, :] ** 2) / (2 * sigma**2))
    cut = np.maximum(np.abs(c)[:, None], np.abs(c)[None, :]) > side // 2
    g[cut] = 0.0
    return g / g.sum()


def _growing(size: int = 31) -> tuple[np.ndarray, np.ndarray]:
    """(3, 3, size, size) PSFs, small in the centre and wide in the corners, and their sides."""
    sides = np.array([[31, 21, 31], [21, 11, 21], [31, 21, 31]])
    psfs = np.stack([[_gauss(size, s / 6.0, s) for s in row] for row in sides])
    return psfs, sides


def test_a_grid_with_its_nodes_supports_round_trips_through_a_file_as_version_2(tmp_path):
    psfs, sides = _growing()
    model = MeasuredGridPSF(psfs, supports=sides, pixel_size_um=0.1)
    meta, arrays = model.to_record()
    assert meta["version"] == 2 and np.array_equal(arrays["supports"], sides)

    back = load_psf_model(save_psf_model(tmp_path / "scope", model))
    assert np.array_equal(back.supports, sides)
    assert np.array_equal(back.node_psfs, model.node_psfs)
    assert "node supports 11 to 31 px" in back.describe()


def test_a_grid_whose_nodes_fill_the_square_is_written_as_version_1_and_a_version_1_record_loads_unchanged():
    psfs, _ = _growing()
    meta, arrays = MeasuredGridPSF(psfs).to_record()
    assert meta["version"] == 1 and "supports" not in arrays  # what older releases read

    old = psf_model_from_record(meta, {"psfs": arrays["psfs"], "filled": arrays["filled"]})
    assert np.array_equal(old.supports, np.full((3, 3), 31))
    assert np.array_equal(old.node_psfs, MeasuredGridPSF(psfs).node_psfs)


@pytest.mark.parametrize("supports, match", [
    (np.full((3, 3), 11), "light beyond its recorded support"),  # the corners' light reaches further
    (np.full((3, 3), 12), "odd sides from 3"),
    (np.full((3, 3), 33), "odd sides from 3"),
    (np.full((2, 2), 31), r"\(3, 3\) whole numbers"),
    (np.full((3, 3), 30.5), r"\(3, 3\) whole numbers"),
])
def test_a_support_that_does_not_hold_its_node_is_refused(supports, match):
    psfs, _ = _growing()
    with pytest.raises(ValueError, match=match):
        MeasuredGridPSF(psfs, supports=supports)


def test_a_binned_grid_bins_each_nodes_support_and_keeps_nothing_beyond_it():
    psfs, sides = _growing()
    binned = MeasuredGridPSF(psfs, supports=sides).binned(2)
    assert binned.psf_size == 17
    assert np.array_equal(binned.supports, [[17, 11, 17], [11, 7, 11], [17, 11, 17]])
    centre = binned.node_psfs[1, 1]
    assert centre[:5].sum() == 0 and centre[:, -5:].sum() == 0  # 7 px of 17 in the middle
    assert np.allclose(binned.node_psfs.sum(axis=(2, 3)), 1.0)
