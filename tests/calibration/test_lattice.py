"""Point arrays: the lattice of the spots (calibration.lattice); a dense array measured as one, refused as beads."""

import numpy as np
from scipy.spatial import cKDTree

from napari_coordgate.calibration.lattice import fit_lattice
from napari_coordgate.samples.beads import array_positions


def test_fit_lattice_finds_a_turned_array_and_every_site_of_it():
    y, x = array_positions((400, 400), 5.11, margin=2, angle_deg=3.0)
    rng = np.random.default_rng(0)
    # whole-pixel detections (a little jitter), some spots missed: indices must not drift across 78 pitches
    keep = rng.random(y.size) > 0.2
    yd, xd = np.round(y[keep] + rng.normal(0, 0.2, keep.sum())), np.round(x[keep] + rng.normal(0, 0.2, keep.sum()))
    lattice = fit_lattice(yd, xd)
    assert lattice is not None
    assert abs(lattice.pitch - 5.11) < 0.01
    assert lattice.explained > 0.95
    sites, _ = lattice.sites((400, 400), margin=2)
    d, _ = cKDTree(np.stack([y, x], 1)).query(sites)
    assert len(sites) == y.size
    assert d.max() < 0.1


def test_scattered_beads_are_no_lattice():
    rng = np.random.default_rng(1)
    y, x = rng.uniform(0, 500, 300), rng.uniform(0, 500, 300)
    lattice = fit_lattice(y, x)
    assert lattice is None or lattice.explained < 0.6
    assert fit_lattice(y[:10], x[:10]) is None  # too few spots to call anything a lattice


def test_a_dense_point_array_is_measured_as_an_array_and_refused_as_beads():
    import pytest

    from napari_coordgate.calibration import CalibrationError
    from napari_coordgate.calibration.calibrate import calibrate
    from napari_coordgate.samples.beads import EllipticalOptics, bead_slide, psf_error

    optics = EllipticalOptics(width=1.6, radial=0.3, tangential=0.1, beta=3.0, psf_size=21)
    # 5 px: 2.7 PSF widths; 4.5 px: the crowd hides the noise, the detection measures no spot at all
    for pitch in (5.0, 4.5):
        pos = array_positions((128, 128), pitch, margin=2, angle_deg=2.0)
        image, _ = bead_slide(optics, (128, 128), n_beads=0, photons=3000, positions=pos, hot_fraction=0, seed=0)
        with pytest.raises(CalibrationError, match="dense point array.*--target array") as err:
            calibrate(image, model="grid", grid=1, target="beads")
        assert err.value.beads is not None
        result = calibrate(image, model="grid", grid=1)  # target auto
        assert any("measured as a point array" in w for w in result.warnings)
        assert result.n_beads >= 0.9 * len(pos[0]) and np.median(psf_error(result.model, optics, (128, 128))) < 0.1
    # a sparse array is calibrated like beads
    pos = array_positions((256, 256), 24.0, margin=2, angle_deg=2.0)
    image, _ = bead_slide(optics, (256, 256), n_beads=0, photons=3000, positions=pos, hot_fraction=0, seed=0)
    assert calibrate(image, model="grid", grid=1).n_beads >= 50
