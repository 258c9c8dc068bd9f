"""Units in image metadata: one table for the TIFF reader's pixel size and the OME-Zarr axes."""

import numpy as np
import pytest

from napari_coordgate.image_io.omezarr import axes_from_tiff
from napari_coordgate.image_io.tiff import TiffImage, pixel_size_um
from napari_coordgate.image_io.units import NGFF_UNITS, ngff_unit, um_per_unit


@pytest.mark.parametrize("spelling", ["µm", "\u03bcm", "um", "UM", "micron", "microns", "micrometre", "micrometer",
                                      "\\u00B5m", " µm "])
def test_every_spelling_of_the_micrometre_is_one_unit(spelling):
    assert ngff_unit(spelling) == "micrometer" and um_per_unit(spelling) == 1.0


def test_length_factors_and_units_that_are_not_a_pixel_size():
    assert um_per_unit("nm") == 1e-3 and um_per_unit("nanometer") == 1e-3 and um_per_unit("mm") == 1e3
    assert ngff_unit("s") == "second" and um_per_unit("s") is None  # a time is no pixel size
    assert ngff_unit("pixel") is None and ngff_unit("") is None and ngff_unit(None) is None
    assert "micrometer" in NGFF_UNITS


@pytest.mark.parametrize("unit", ["\\u00B5m", "UM", "nm"])
def test_the_tiff_pixel_size_and_the_zarr_axes_read_an_imagej_unit_alike(unit):
    image = TiffImage(np.zeros((4, 5), np.float32), "YX", resolution=(4.0, 4.0), resolution_unit=1,
                      imagej={"unit": unit})

    axes, scale = axes_from_tiff(image)

    assert pixel_size_um(image) == pytest.approx(0.25 * um_per_unit(unit))
    assert axes[-1]["unit"] == ngff_unit(unit) and scale[-1] == 0.25
