"""The pieces of bead calibration (:func:`napari_coordgate.calibration.calibrate.calibrate` puts them together).

One idea per module: ``detect`` (beads in a 2-D focal-plane image), ``crowd`` (every spot's light modelled, so a
bead's window loses its neighbours'), ``lattice`` (the lattice of a point array), ``patches`` (registered PSF
patches and the fit of a PSF model to each bead), ``beadsize`` (the beads' own size divided out), ``grid`` (the
measured K x K PSF grid), ``pupilfit`` (the pupil model with field-polynomial aberrations, fitted with torch
autograd), ``report`` (the report figure and JSON), ``advice`` (what to change per rejection reason).
Nothing here imports Qt or napari.
"""

from __future__ import annotations

__all__ = ["CalibrationError", "CalibrationCancelled"]


class CalibrationError(ValueError):
    """A bead image cannot be calibrated; the message says why and what to do.

    ``beads`` is the table of every detected spot (a :class:`~napari_coordgate.calibration.detect.BeadTable`,
    with why each was rejected) when detection got that far, else None, and ``field_shape`` the (H, W) of the
    bead images: a failed calibration can still show (points layer, report) what it saw. Both travel with the
    exception through pickling (the training process, dask).
    """

    def __init__(self, message: str, beads=None, field_shape=None):
        super().__init__(message)
        self.beads = beads
        self.field_shape = None if field_shape is None else tuple(int(n) for n in field_shape)

    def __reduce__(self):
        return (type(self), (str(self), self.beads, self.field_shape))


class CalibrationCancelled(Exception):
    """``should_stop()`` returned True before any PSF model was available."""
