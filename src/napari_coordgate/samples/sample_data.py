"""napari File > Open Sample: bundled specimens and a synthetic calibration pair (no download at run time)."""

from __future__ import annotations

# The calibration pair is small enough to train a useful model on a laptop CPU in about a minute.
SAMPLE_SHAPE = (256, 256)
SAMPLE_PRESET = "gaussian"
SAMPLE_PHOTONS = 1000.0


def cell_field():
    """The bundled scikit-image ``cell`` image as a float32 sharp specimen field."""
    import numpy as np
    from skimage import data

    img = data.cell().astype(np.float32)
    img = (img - img.min()) / max(float(np.ptp(img)), 1e-12)
    return [(img, {"name": "cell (sharp)", "colormap": "gray"}, "image")]


def calibration_pair():
    """A procedural sharp field and the same field blurred by the ``gaussian`` preset PSF, with camera noise.

    The blur widens toward the edges of the field, so a position-aware model has something to learn.
    """
    from ..optics.blur import synthesize_pairs
    from .specimens import procedural_specimen

    sharp, blurred = synthesize_pairs(procedural_specimen(SAMPLE_SHAPE, seed=0), SAMPLE_PRESET,
                                      photons=SAMPLE_PHOTONS, seed=1)
    meta = {"psf_preset": SAMPLE_PRESET, "photons": SAMPLE_PHOTONS}
    return [
        (sharp, {"name": "calibration (sharp)", "colormap": "gray", "metadata": {**meta, "role": "sharp"}}, "image"),
        (blurred, {"name": "calibration (blurred)", "colormap": "gray", "metadata": {**meta, "role": "blurred"}},
         "image"),
    ]


def psf_grid():
    """The PSFs of the calibration pair's preset on its K x K grid, each scaled to peak 1."""
    from ..optics.models import render_psf_grid

    grid = render_psf_grid(SAMPLE_PRESET, SAMPLE_SHAPE)
    return [(grid, {"name": f"PSF grid ({SAMPLE_PRESET})", "colormap": "magma"}, "image")]
