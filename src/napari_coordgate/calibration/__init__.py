"""The pieces of bead calibration (:func:`napari_coordgate.calibration.calibrate.calibrate` puts them together).

One idea per module: ``detect`` (beads in a 2-D focal-plane image), ``patches`` (registered PSF patches and
the fit of a PSF model to each bead), ``grid`` (the measured K x K PSF grid), ``pupilfit`` (the pupil model with
field-polynomial aberrations, fitted with torch autograd), ``report`` (the report figure and JSON).
Nothing here imports Qt or napari.
"""

from __future__ import annotations

__all__ = ["CalibrationError", "CalibrationCancelled"]


class CalibrationError(ValueError):
    """A bead image cannot be calibrated; the message says why and what to do."""


class CalibrationCancelled(Exception):
    """``should_stop()`` returned True before any PSF model was available."""
