"""napari File > Open Sample: bundled specimens (no download at run time)."""

from __future__ import annotations


def cell_field():
    """The bundled scikit-image ``cell`` image as a float32 sharp specimen field."""
    import numpy as np
    from skimage import data

    img = data.cell().astype(np.float32)
    img = (img - img.min()) / max(float(np.ptp(img)), 1e-12)
    return [(img, {"name": "cell (sharp)", "colormap": "gray"}, "image")]
